"""Pure aggregation math on adapter states; no Flower here, so every function is unit-tested by hand."""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from typing import TypeVar

import numpy as np

T = TypeVar("T")
K = TypeVar("K", bound=Hashable)

REGION_SEPARATOR = "/"


def weighted_average(
    states: Sequence[Mapping[str, np.ndarray | float]], weights: Sequence[float]
) -> dict[str, np.ndarray | float]:
    """FedAvg: sum_i w_i * state_i / sum_i w_i, key by key, accumulated in float64.

    On LoRA adapters this averages the A and B factors separately (what FedAvg does), which is not the
    average of the products B·A; the difference is second order in how far the sites drifted apart.
    """
    if not states or len(states) != len(weights):
        raise ValueError(f"need one weight per state, got {len(states)} states and {len(weights)} weights")
    total = float(sum(weights))
    if total <= 0 or any(w < 0 for w in weights):
        raise ValueError(f"weights must be >= 0 with a positive sum, got {list(weights)}")
    keys = set(states[0])
    for i, state in enumerate(states[1:], start=1):
        if set(state) != keys:
            raise ValueError(f"state {i} has keys {sorted(set(state) ^ keys)} that state 0 does not share")
    averaged: dict[str, np.ndarray | float] = {}
    for key in states[0]:
        acc = sum(np.asarray(s[key], dtype=np.float64) * (w / total) for s, w in zip(states, weights))
        first = states[0][key]
        if isinstance(first, np.ndarray):
            averaged[key] = acc.astype(first.dtype) if np.issubdtype(first.dtype, np.floating) else acc
        else:
            averaged[key] = float(acc)
    return averaged


def group_by(items: Sequence[T], keys: Sequence[K]) -> dict[K, list[T]]:
    """Items grouped by their key (e.g. replies by region), keys in order of first appearance."""
    if len(items) != len(keys):
        raise ValueError(f"need one key per item, got {len(items)} items and {len(keys)} keys")
    groups: dict[K, list[T]] = {}
    for item, key in zip(items, keys):
        groups.setdefault(key, []).append(item)
    return groups


def merge_regions(regions: Mapping[str, Mapping[str, T]]) -> dict[str, T]:
    """`{region: {key: v}}` -> `{"region/key": v}`: every region's adapter in one flat record."""
    return {f"{region}{REGION_SEPARATOR}{key}": v for region, state in regions.items() for key, v in state.items()}


def split_regions(merged: Mapping[str, T]) -> dict[str, dict[str, T]]:
    """Inverse of `merge_regions`."""
    regions: dict[str, dict[str, T]] = {}
    for flat_key, value in merged.items():
        region, sep, key = flat_key.partition(REGION_SEPARATOR)
        if not sep or not key:
            raise ValueError(f"key {flat_key!r} has no region prefix")
        regions.setdefault(region, {})[key] = value
    return regions
