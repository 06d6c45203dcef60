"""Coordinator settings: one pydantic ``BaseSettings`` (env prefix ``CONSORTIA_``)."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

__all__ = ["Settings"]


class Settings(BaseSettings):
    """Everything the coordinator needs; the app is built from one instance."""

    model_config = SettingsConfigDict(env_prefix="CONSORTIA_", frozen=True)

    home: Path = Field(description="state directory: database, blobs, admin credential")
    db_url: str | None = Field(default=None, description="SQLAlchemy URL; default SQLite under home")
    max_update_bytes: int = Field(default=256 * 1024 * 1024, gt=0)
    max_json_bytes: int = Field(default=4 * 1024 * 1024, gt=0)
    max_poll_seconds: float = Field(default=30.0, gt=0)
    tick_seconds: float = Field(default=0.25, gt=0)
    enrollment_ttl_hours: float = Field(default=72.0, gt=0)
    site_credential_ttl_days: float = Field(default=365.0, gt=0)
    llm_url: str | None = Field(
        default=None, description="OpenAI-compatible endpoint (e.g. a local llama.cpp server) to rephrase incidents"
    )
    upstream_url: str | None = Field(default=None, description="upper coordinator this one joins as a site (hub)")
    upstream_token: str | None = Field(default=None, description="one-time enrollment token at the upper coordinator")
    upstream_name: str = Field(default="hub", min_length=1, max_length=63, description="site name at the upper")
    llm_model: str = Field(default="local", description="model name sent to the LLM endpoint")
    restart_grace_fraction: float = Field(
        default=0.5, ge=0, description="after a restart, open rounds get this share of their deadline again"
    )

    @property
    def database_url(self) -> str:
        return self.db_url or f"sqlite:///{(self.home / 'coordinator.db').resolve()}"

    @property
    def blob_dir(self) -> Path:
        return self.home / "blobs"

    @property
    def key_dir(self) -> Path:
        return self.home / "keys"

    @property
    def release_dir(self) -> Path:
        return self.home / "releases"

    @property
    def admin_credential_path(self) -> Path:
        return self.home / "admin.token"
