"""Persistence: SQLAlchemy store with Alembic migrations, and a content-addressed blob store."""
