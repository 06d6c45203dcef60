"""Bridges to other tools (MLflow)."""
