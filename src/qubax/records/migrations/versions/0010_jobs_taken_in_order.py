"""The oldest queued job is read off an index on (status, id) instead of sorting every queued job.

Revision ID: 0010
"""

from alembic import op

revision = "0010"
down_revision = "0009"


def upgrade() -> None:
    op.create_index("ix_image_jobs_status_id", "image_jobs", ["status", "id"])


def downgrade() -> None:
    op.drop_index("ix_image_jobs_status_id", table_name="image_jobs")
