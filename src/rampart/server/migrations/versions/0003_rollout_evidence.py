"""Rollout evidence kept per rollout instead of derived from `checks` at each report:
offers, each machine's latest counted outcome, running totals; the minimum number of
failing machines before an auto-halt, when a rollout started; an index on last_seen.

Revision ID: 0003
Revises: 0002
"""

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column(
        "channels", sa.Column("min_failing", sa.Integer(), nullable=False, server_default="5")
    )
    op.add_column("channels", sa.Column("rollout_started_at", sa.Float(), nullable=True))
    op.execute(
        "UPDATE channels SET rollout_started_at = updated_at WHERE rollout_version IS NOT NULL"
    )
    op.create_index("ix_machines_last_seen", "machines", ["last_seen"])
    op.create_table(
        "offers",
        sa.Column("os", sa.String(64), primary_key=True),
        sa.Column("channel", sa.String(64), primary_key=True),
        sa.Column("version", sa.String(128), primary_key=True),
        sa.Column("machine_id", sa.String(32), primary_key=True),
        sa.Column("at", sa.Float(), nullable=False),
    )
    op.create_table(
        "rollout_outcomes",
        sa.Column("os", sa.String(64), primary_key=True),
        sa.Column("channel", sa.String(64), primary_key=True),
        sa.Column("version", sa.String(128), primary_key=True),
        sa.Column("machine_id", sa.String(32), primary_key=True),
        sa.Column("outcome", sa.String(16), nullable=False),
        sa.Column("at", sa.Float(), nullable=False),
    )
    op.create_table(
        "rollout_tallies",
        sa.Column("os", sa.String(64), primary_key=True),
        sa.Column("channel", sa.String(64), primary_key=True),
        sa.Column("version", sa.String(128), primary_key=True),
        sa.Column("machines", sa.Integer(), nullable=False),
        sa.Column("failures", sa.Integer(), nullable=False),
    )
    # The offers made so far (the first time each machine was offered a version other
    # than the one it ran), so a rollout in progress keeps its evidence.
    op.execute(
        "INSERT INTO offers (os, channel, version, machine_id, at) "
        "SELECT os, channel, offered, machine_id, min(at) FROM checks "
        "WHERE offered IS NOT NULL AND offered <> version "
        "GROUP BY os, channel, offered, machine_id"
    )
    # Each offered machine's latest report after its offer, and the totals.
    op.execute(
        "INSERT INTO rollout_outcomes (os, channel, version, machine_id, outcome, at) "
        "SELECT o.os, o.channel, o.version, o.machine_id, r.outcome, r.at "
        "FROM offers o JOIN reports r ON r.id = ("
        "  SELECT max(r2.id) FROM reports r2 WHERE r2.os = o.os AND r2.to_version = o.version"
        "  AND r2.machine_id = o.machine_id AND r2.at >= o.at)"
    )
    op.execute(
        "INSERT INTO rollout_tallies (os, channel, version, machines, failures) "
        "SELECT os, channel, version, count(*), "
        "sum(CASE WHEN outcome = 'failure' THEN 1 ELSE 0 END) "
        "FROM rollout_outcomes GROUP BY os, channel, version"
    )


def downgrade() -> None:
    for table in ("rollout_tallies", "rollout_outcomes", "offers"):
        op.drop_table(table)
    op.drop_index("ix_machines_last_seen", "machines")
    with op.batch_alter_table("channels") as batch:
        batch.drop_column("min_failing")
        batch.drop_column("rollout_started_at")
