"""Comparing adapter states (dicts of arrays) in tests."""

from __future__ import annotations

import math

import numpy as np


def l2_distance(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> float:
    """Euclidean distance between two states over all their tensors (float64)."""
    return math.sqrt(sum(float(np.sum((a[k].astype(np.float64) - b[k]) ** 2)) for k in a))


def assert_same_state(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> None:
    """The same keys and bit-identical tensors."""
    assert a.keys() == b.keys()
    for key, value in a.items():
        np.testing.assert_array_equal(value, b[key], err_msg=key)
