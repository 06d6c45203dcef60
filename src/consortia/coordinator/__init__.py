"""The coordinator: control plane, round orchestration and aggregation."""

from consortia.coordinator.app import create_app
from consortia.coordinator.settings import Settings

__all__ = ["Settings", "create_app"]
