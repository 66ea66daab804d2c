"""Fixtures shared by several test files."""
from __future__ import annotations

import pytest

from modbal.registry import DATASETS


@pytest.fixture
def synthetic_without_val(monkeypatch):
    """The registered ``synthetic`` dataset with its validation split removed (the runner then carves one)."""
    real = DATASETS.get("synthetic")

    def no_val(**kw):
        splits = real(**kw)
        splits.val = None
        return splits
    monkeypatch.setitem(DATASETS._factories, "synthetic", no_val)
