"""The initial schema: channels, machines, checks, reports, admin tokens, server state.

Revision ID: 0001
Revises:
"""

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "channels",
        sa.Column("os", sa.String(64), primary_key=True),
        sa.Column("name", sa.String(64), primary_key=True),
        sa.Column("version", sa.String(128), nullable=True),
        sa.Column("is_default", sa.Boolean(), nullable=False),
        sa.Column("rollout_version", sa.String(128), nullable=True),
        sa.Column("rollout_percent", sa.Float(), nullable=False),
        sa.Column("rollout_state", sa.String(16), nullable=False),
        sa.Column("failure_threshold", sa.Float(), nullable=False),
        sa.Column("min_reports", sa.Integer(), nullable=False),
        sa.Column("updated_at", sa.Float(), nullable=False),
    )
    op.create_table(
        "machines",
        sa.Column("machine_id", sa.String(32), primary_key=True),
        sa.Column("os", sa.String(64), nullable=True),
        sa.Column("channel", sa.String(64), nullable=True),
        sa.Column("version", sa.String(128), nullable=True),
        sa.Column("first_seen", sa.Float(), nullable=True),
        sa.Column("last_seen", sa.Float(), nullable=True),
        sa.Column("address", sa.String(64), nullable=True),
    )
    op.create_table(
        "checks",
        sa.Column("id", _ID, primary_key=True, autoincrement=True),
        sa.Column("machine_id", sa.String(32), nullable=False),
        sa.Column("os", sa.String(64), nullable=False),
        sa.Column("version", sa.String(128), nullable=False),
        sa.Column("channel", sa.String(64), nullable=False),
        sa.Column("offered", sa.String(128), nullable=True),
        sa.Column("at", sa.Float(), nullable=False),
        sa.Column("address", sa.String(64), nullable=True),
    )
    op.create_index("ix_checks_machine", "checks", ["machine_id"])
    op.create_index("ix_checks_at", "checks", ["at"])
    op.create_table(
        "reports",
        sa.Column("id", _ID, primary_key=True, autoincrement=True),
        sa.Column("machine_id", sa.String(32), nullable=False),
        sa.Column("os", sa.String(64), nullable=False),
        sa.Column("from_version", sa.String(128), nullable=True),
        sa.Column("to_version", sa.String(128), nullable=True),
        sa.Column("outcome", sa.String(16), nullable=False),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("at", sa.Float(), nullable=False),
        sa.Column("address", sa.String(64), nullable=True),
    )
    op.create_index("ix_reports_to", "reports", ["os", "to_version"])
    op.create_index("ix_reports_at", "reports", ["at"])
    op.create_table(
        "admin_tokens",
        sa.Column("name", sa.String(64), primary_key=True),
        sa.Column("digest", sa.String(64), nullable=False, unique=True),
        sa.Column("created_at", sa.Float(), nullable=False),
    )
    op.create_table(
        "server_state",
        sa.Column("key", sa.String(64), primary_key=True),
        sa.Column("value", sa.BigInteger(), nullable=False),
    )


def downgrade() -> None:
    for table in ("server_state", "admin_tokens", "reports", "checks", "machines", "channels"):
        op.drop_table(table)
