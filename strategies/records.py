"""Adapter states <-> Flower ArrayRecords (shared by the ClientApp, the ServerApp and the strategies)."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
from flwr.app import Array, ArrayRecord

CONFIG_KEY = "fed-netgpt-config"  # the resolved config (YAML) in every message's ConfigRecord
RUN_ID_KEY = "run-id"  # which run a message belongs to: a site adapter of another run is never continued


def to_record(state: Mapping[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({key: Array(np.ascontiguousarray(value)) for key, value in state.items()})


def from_record(record: ArrayRecord) -> dict[str, np.ndarray]:
    return {key: array.numpy() for key, array in record.items()}
