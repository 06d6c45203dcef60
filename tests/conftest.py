"""Shared fixtures: an in-process coordinator (real app, real SQLite, real blob store)."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from consortia.coordinator import Settings, create_app
from support import Coord


@pytest.fixture
def coord(tmp_path):
    app = create_app(Settings(home=tmp_path / "coord", tick_seconds=0.05, max_update_bytes=2_000_000))
    with TestClient(app) as http:
        yield Coord(http, tmp_path / "coord")
