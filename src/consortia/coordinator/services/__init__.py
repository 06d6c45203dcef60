"""Coordinator services: the logic the HTTP routes call. Routes hold no SQL."""
