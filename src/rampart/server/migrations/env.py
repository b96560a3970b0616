"""Alembic environment: runs on the connection `rampart.server.db.migrate` passes in."""

from alembic import context

from rampart.server.db import metadata

connection = context.config.attributes["connection"]
context.configure(connection=connection, target_metadata=metadata)
with context.begin_transaction():
    context.run_migrations()
