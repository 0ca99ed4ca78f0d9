"""Money columns as 64-bit integers: 32 bits of micro-USD end at $2147.48, too low for a monthly budget.

Revision ID: 0004
"""

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"


def upgrade() -> None:
    with op.batch_alter_table("api_keys") as table:
        table.alter_column("monthly_budget_micros", type_=sa.BigInteger, existing_type=sa.Integer)
    with op.batch_alter_table("generations") as table:
        table.alter_column("cost_micros", type_=sa.BigInteger, existing_type=sa.Integer, existing_nullable=False)


def downgrade() -> None:
    with op.batch_alter_table("generations") as table:
        table.alter_column("cost_micros", type_=sa.Integer, existing_type=sa.BigInteger, existing_nullable=False)
    with op.batch_alter_table("api_keys") as table:
        table.alter_column("monthly_budget_micros", type_=sa.Integer, existing_type=sa.BigInteger)
