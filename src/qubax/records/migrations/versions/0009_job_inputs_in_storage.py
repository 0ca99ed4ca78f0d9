"""A job's uploaded files live in the image storage; its rows name them instead of holding them.

Jobs still waiting to be made when this runs had their files in rows, which go: they fail, and say why.

Revision ID: 0009
"""

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"

LOST = (
    '{"message": "The server was upgraded while this job waited, and its uploaded files were not kept: send it '
    'again.", "type": "server_error", "param": null, "code": "job_inputs_lost"}'
)


def upgrade() -> None:
    op.execute(
        sa.text(
            "UPDATE image_jobs SET status = 'failed', error = :error, completed_at = CURRENT_TIMESTAMP, "
            "heartbeat_at = NULL WHERE status IN ('queued', 'in_progress') AND id IN (SELECT job_id FROM job_inputs)"
        ).bindparams(error=LOST)
    )
    op.execute(sa.text("DELETE FROM job_inputs"))
    with op.batch_alter_table("job_inputs") as table:
        table.drop_column("data")
        table.add_column(sa.Column("stored", sa.String(128), nullable=False))


def downgrade() -> None:
    op.execute(sa.text("DELETE FROM job_inputs"))
    with op.batch_alter_table("job_inputs") as table:
        table.drop_column("stored")
        table.add_column(sa.Column("data", sa.LargeBinary, nullable=False))
