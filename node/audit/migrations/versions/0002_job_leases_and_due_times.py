"""job leases and due times: the audit DB drives recovery (issue 10)

A job now says when its next step is due (``next_attempt_at``: a scheduled
retry), who holds it and until when (``lease_expires_at``, renewed by the
worker's heartbeat), how often the current phase was retried and re-published,
and which earlier job of the same study it follows (a late instance).

Revision ID: 0002
Revises: 0001
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("next_attempt_at", sa.DateTime(timezone=True), nullable=True))
        batch.add_column(sa.Column("lease_expires_at", sa.DateTime(timezone=True), nullable=True))
        batch.add_column(sa.Column("retries", sa.Integer(), nullable=False, server_default="0"))
        batch.add_column(sa.Column("republished", sa.Integer(), nullable=False, server_default="0"))
        batch.add_column(sa.Column("follows_job_id", sa.String(length=36), nullable=True))
        batch.create_index("ix_jobs_state", ["state"])


def downgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.drop_index("ix_jobs_state")
        for column in ("follows_job_id", "republished", "retries", "lease_expires_at", "next_attempt_at"):
            batch.drop_column(column)
