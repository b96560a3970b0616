"""Device identity (rampart.server.devices): the keys machines present or operators
enroll, known-good PCR 7 values, shared settings, the per-channel attestation policy,
and whether each machine, check and report was authenticated (the machines before it
were not).

Revision ID: 0006
Revises: 0005
"""

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "machine_keys",
        sa.Column("machine_id", sa.String(32), primary_key=True),
        sa.Column("key_id", sa.String(64), primary_key=True),
        sa.Column("kind", sa.String(8), nullable=False),
        sa.Column("public_key", sa.Text(), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("first_seen", sa.Float(), nullable=False),
        sa.Column("decided_at", sa.Float(), nullable=True),
        sa.Column("decided_by", sa.String(64), nullable=True),
        sa.Column("counter", sa.BigInteger(), nullable=False),
        sa.Column("last_auth", sa.Float(), nullable=True),
        sa.Column("attested_at", sa.Float(), nullable=True),
        sa.Column("pcr7", sa.String(64), nullable=True),
        sa.Column("epoch", sa.BigInteger(), nullable=True),
    )
    op.create_index("ix_machine_keys_state", "machine_keys", ["state"])
    op.create_table(
        "known_pcr7",
        sa.Column("os", sa.String(64), primary_key=True),
        sa.Column("value", sa.String(64), primary_key=True),
        sa.Column("note", sa.String(128), nullable=True),
        sa.Column("added_at", sa.Float(), nullable=False),
    )
    op.create_table(
        "settings",
        sa.Column("name", sa.String(64), primary_key=True),
        sa.Column("value", sa.Text(), nullable=False),
    )
    with op.batch_alter_table("channels") as batch:
        batch.add_column(
            sa.Column(
                "require_attestation", sa.Boolean(), nullable=False, server_default=sa.false()
            )
        )
    for table in ("machines", "checks", "reports"):
        with op.batch_alter_table(table) as batch:
            batch.add_column(
                sa.Column("authenticated", sa.Boolean(), nullable=False, server_default=sa.false())
            )


def downgrade() -> None:
    for table in ("machines", "checks", "reports"):
        with op.batch_alter_table(table) as batch:
            batch.drop_column("authenticated")
    with op.batch_alter_table("channels") as batch:
        batch.drop_column("require_attestation")
    op.drop_table("settings")
    op.drop_table("known_pcr7")
    op.drop_table("machine_keys")
