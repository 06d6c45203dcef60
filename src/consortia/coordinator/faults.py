"""Deterministic crash points for the end-to-end crash-consistency tests.

With ``CONSORTIA_CRASH_AT=point:round`` in its environment, the coordinator sends itself
SIGKILL the first time it reaches ``point`` in training round ``round`` — a real
``kill -9`` at a precise moment. Unset (always, in production) it does nothing.
Points: ``tasks_handed_out``, ``update_stored``, ``mid_aggregation``, ``model_written``.
"""

from __future__ import annotations

import os
import signal

__all__ = ["crash_point"]


def crash_point(point: str, round_number: int) -> None:
    spec = os.environ.get("CONSORTIA_CRASH_AT")
    if not spec:
        return
    name, _, rnd = spec.partition(":")
    if name == point and (not rnd or int(rnd) == round_number):
        os.kill(os.getpid(), signal.SIGKILL)
