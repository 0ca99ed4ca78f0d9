"""What is kept: the database (tables, migrations, keys), the usage ledger and its writer, the
journal of upstream tasks, and generated images (local disk or S3)."""
