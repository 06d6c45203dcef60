"""Consortia: federated MLOps for consortia of institutions.

Raw data never crosses a tenant boundary; only model updates, aggregate statistics and
signed operational signals do.

``consortia.load_release(path).predict(frame)`` runs a release bundle in-process (model
as a dependency); it needs only numpy, pandas and onnxruntime (``pip install consortia[edge]``).
"""

from typing import Any

__version__ = "0.1.0"
__all__ = ["__version__", "load_release"]


def __getattr__(name: str) -> Any:
    if name == "load_release":  # imported lazily: the package root stays light
        from consortia.edge.runtime import load_release

        return load_release
    raise AttributeError(f"module 'consortia' has no attribute {name!r}")
