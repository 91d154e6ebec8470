"""exchanges: every request the gateway answered

Revision ID: 0001
Revises:
Create Date: 2026-11-28
"""

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "exchanges",
        sa.Column("id", sa.String(32), primary_key=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("model", sa.String(256), nullable=False),
        sa.Column("task", sa.String(128), nullable=True),
        sa.Column("stream", sa.Boolean, nullable=False),
        sa.Column("served_by", sa.String(16), nullable=False),
        sa.Column("status", sa.Integer, nullable=False),
        sa.Column("request", sa.JSON, nullable=False),
        sa.Column("task_input", sa.Text, nullable=True),
        sa.Column("teacher_model", sa.String(256), nullable=True),
        sa.Column("response", sa.JSON, nullable=True),
        sa.Column("answer", sa.Text, nullable=True),
        sa.Column("target", sa.JSON, nullable=True),
        sa.Column("target_valid", sa.Boolean, nullable=True),
        sa.Column("student_version", sa.String(64), nullable=True),
        sa.Column("student_target", sa.JSON, nullable=True),
        sa.Column("student_confidence", sa.Float, nullable=True),
        sa.Column("prompt_tokens", sa.Integer, nullable=False),
        sa.Column("completion_tokens", sa.Integer, nullable=False),
        sa.Column("cost_usd", sa.Float, nullable=False),
        sa.Column("latency_ms", sa.Float, nullable=False),
        sa.Column("upstream_ms", sa.Float, nullable=False),
        sa.Column("error", sa.Text, nullable=True),
    )
    op.create_index("ix_exchanges_task_created", "exchanges", ["task", "created_at"])
    op.create_index("ix_exchanges_model_created", "exchanges", ["model", "created_at"])


def downgrade() -> None:
    op.drop_index("ix_exchanges_model_created", "exchanges")
    op.drop_index("ix_exchanges_task_created", "exchanges")
    op.drop_table("exchanges")
