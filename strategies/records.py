"""Adapter states <-> Flower ArrayRecords (shared by the ClientApp, the ServerApp and the strategies)."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
from flwr.app import Array, ArrayRecord

CONFIG_KEY = "fed-netgpt-config"  # the resolved config (YAML) in every message's ConfigRecord
DP_HISTORIES_KEY = "dp-histories"  # {site: DP accountant history} recorded by the server: a resume continues it
RUN_ID_KEY = "run-id"  # which run a message belongs to: a site adapter of another run is never continued
SITE_KEY = "site-id"  # which of its node's sites a message is for (server/site_grid.py)
PACK_KEY = "pack"  # a train message for several sites of a node, trained in one grouped pass: {"sites": [...]}
SITE_ERROR_KEY = "error"  # in a packed reply, "<site>/error": {"reason": ...}: that site did not train, the others did


def to_record(state: Mapping[str, np.ndarray], dtype: str = "") -> ArrayRecord:
    """Arrays as they go on the wire: in their own dtype, or cast to `dtype` (`federation.wire_dtype`)."""
    return ArrayRecord({key: Array(np.ascontiguousarray(value, dtype=dtype or None)) for key, value in state.items()})


def from_record(record: ArrayRecord) -> dict[str, np.ndarray]:
    """The arrays of a record; float16 ones (16 bits on the wire) come back as float32 for the arithmetic."""
    arrays = {key: array.numpy() for key, array in record.items()}
    return {key: value.astype(np.float32) if value.dtype == np.float16 else value for key, value in arrays.items()}


FINAL_REPORT_KEY = "final-report"  # an evaluate message that asks a site for its part of the federated report


def tallies_to_metrics(tallies: Mapping[str, Mapping[str, float]]) -> dict[str, float]:
    """`{variant: tally}` (numbers only) as the flat keys of a MetricRecord, "<variant>/<field>"."""
    return {f"{variant}/{key}": float(value) for variant, counts in tallies.items() for key, value in counts.items()}


def tallies_from_metrics(metrics: Mapping[str, float]) -> dict[str, dict[str, float]]:
    """The inverse of `tallies_to_metrics`."""
    tallies: dict[str, dict[str, float]] = {}
    for key, value in metrics.items():
        variant, _, field = key.partition("/")
        tallies.setdefault(variant, {})[field] = float(value)
    return tallies
