"""student_versions: the model registry

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-28
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "student_versions",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("task", sa.String(128), nullable=False),
        sa.Column("version", sa.String(32), nullable=False),
        sa.Column("trainer", sa.String(128), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("promoted_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("train_examples", sa.Integer, nullable=False),
        sa.Column("holdout_examples", sa.Integer, nullable=False),
        sa.Column("threshold", sa.Float, nullable=True),
        sa.Column("metrics", sa.JSON, nullable=True),
        sa.Column("options", sa.JSON, nullable=True),
        sa.Column("artifact_path", sa.Text, nullable=False),
        sa.Column("error", sa.Text, nullable=True),
        sa.UniqueConstraint("task", "version", name="uq_student_versions_task_version"),
    )
    # At most one active version per task, enforced by the database itself.
    op.create_index(
        "uq_student_versions_one_active",
        "student_versions",
        ["task"],
        unique=True,
        sqlite_where=sa.text("status = 'active'"),
        postgresql_where=sa.text("status = 'active'"),
    )


def downgrade() -> None:
    op.drop_index("uq_student_versions_one_active", "student_versions")
    op.drop_table("student_versions")
