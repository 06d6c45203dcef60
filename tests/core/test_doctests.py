"""The examples in the core modules' docstrings are run, so they stay true."""

from __future__ import annotations

import doctest
import importlib

import pytest

MODULES = [
    "consortia.core.aggregate",
    "consortia.core.compression",
    "consortia.core.detect",
    "consortia.core.drift",
    "consortia.core.merkle",
    "consortia.core.metrics",
    "consortia.core.privacy",
    "consortia.core.profile",
    "consortia.core.robust",
    "consortia.core.secagg",
    "consortia.core.strategies",
]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples_hold(name):
    result = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0
