"""Per-key limits and budgets.

Revision ID: 0003
"""

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
COLUMNS = ("rpm", "images_per_day", "max_concurrent", "monthly_budget_micros")


def upgrade() -> None:
    with op.batch_alter_table("api_keys") as table:
        for name in COLUMNS:
            table.add_column(sa.Column(name, sa.Integer, nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("api_keys") as table:
        for name in COLUMNS:
            table.drop_column(name)
