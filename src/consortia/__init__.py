"""Consortia: federated MLOps for consortia of institutions.

Raw data never crosses a tenant boundary; only model updates, aggregate statistics and
signed operational signals do.
"""

__version__ = "0.1.0"
__all__ = ["__version__"]
