"""SQLAlchemy table definitions; the schema itself is created by the Alembic migrations."""

from __future__ import annotations

import sqlalchemy as sa

metadata = sa.MetaData()

exchanges = sa.Table(
    "exchanges",
    metadata,
    sa.Column("id", sa.String(32), primary_key=True),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("kind", sa.String(16), nullable=False),
    sa.Column("model", sa.String(256), nullable=False),
    sa.Column("task", sa.String(128), nullable=True),
    sa.Column("stream", sa.Boolean, nullable=False),
    sa.Column("served_by", sa.String(16), nullable=False),
    sa.Column("status", sa.Integer, nullable=False),
    sa.Column("request", sa.JSON(none_as_null=True), nullable=False),
    sa.Column("task_input", sa.Text, nullable=True),
    sa.Column("teacher_model", sa.String(256), nullable=True),
    sa.Column("response", sa.JSON(none_as_null=True), nullable=True),
    sa.Column("answer", sa.Text, nullable=True),
    sa.Column("target", sa.JSON(none_as_null=True), nullable=True),
    sa.Column("target_valid", sa.Boolean, nullable=True),
    sa.Column("student_version", sa.String(64), nullable=True),
    sa.Column("student_target", sa.JSON(none_as_null=True), nullable=True),
    sa.Column("student_confidence", sa.Float, nullable=True),
    sa.Column("prompt_tokens", sa.Integer, nullable=False),
    sa.Column("completion_tokens", sa.Integer, nullable=False),
    sa.Column("cost_usd", sa.Float, nullable=False),
    sa.Column("latency_ms", sa.Float, nullable=False),
    sa.Column("upstream_ms", sa.Float, nullable=False),
    sa.Column("error", sa.Text, nullable=True),
    sa.Index("ix_exchanges_task_created", "task", "created_at"),
    sa.Index("ix_exchanges_model_created", "model", "created_at"),
)

# One row per trained student; at most one "active" row per task (a partial unique index).
student_versions = sa.Table(
    "student_versions",
    metadata,
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
    sa.Column("metrics", sa.JSON(none_as_null=True), nullable=True),
    sa.Column("options", sa.JSON(none_as_null=True), nullable=True),
    sa.Column("artifact_path", sa.Text, nullable=False),
    sa.Column("error", sa.Text, nullable=True),
    sa.UniqueConstraint("task", "version", name="uq_student_versions_task_version"),
    sa.Index(
        "uq_student_versions_one_active",
        "task",
        unique=True,
        sqlite_where=sa.text("status = 'active'"),
        postgresql_where=sa.text("status = 'active'"),
    ),
)

# A lease per task: the SQLite path's way to have one trainer per task (Postgres uses an
# advisory lock, which also ends with the session of a process that died).
training_locks = sa.Table(
    "training_locks",
    metadata,
    sa.Column("task", sa.String(128), primary_key=True),
    sa.Column("holder", sa.String(128), nullable=False),
    sa.Column("expires_at", sa.Float, nullable=False),  # unix time
)

# Why the loop or the drift guard did what it did, for operators and `status`.
events = sa.Table(
    "events",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("task", sa.String(128), nullable=False),
    sa.Column("kind", sa.String(32), nullable=False),
    sa.Column("message", sa.Text, nullable=False),
    sa.Column("details", sa.JSON(none_as_null=True), nullable=True),
    sa.Index("ix_events_task_created", "task", "created_at"),
)
