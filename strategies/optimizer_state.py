"""A server optimizer's state as flat arrays, so that a checkpoint holds it and a resumed run continues it.

FedAdam, FedYogi and FedAdagrad keep their moments in `m_t` / `v_t` (dicts of arrays by parameter name), FedAvgM
its `momentum_vector` (a list in the order of the adapter's arrays). Without them a resumed run would restart
the optimizer and end with other adapters than an uninterrupted one.
"""

from __future__ import annotations

from typing import Any

import numpy as np

MOMENTS = ("m_t", "v_t")


def export_optimizer(strategy: Any) -> dict[str, np.ndarray]:
    """`{"m_t/<key>": ..., "v_t/<key>": ..., "momentum_vector/<i>": ...}`: whatever the strategy holds."""
    state: dict[str, np.ndarray] = {}
    for name in MOMENTS:
        for key, value in (getattr(strategy, name, None) or {}).items():
            state[f"{name}/{key}"] = np.asarray(value)
    for i, value in enumerate(getattr(strategy, "momentum_vector", None) or []):
        state[f"momentum_vector/{i}"] = np.asarray(value)
    return state


def restore_optimizer(strategy: Any, state: dict[str, np.ndarray]) -> None:
    """Put an `export_optimizer` state back; a state for an optimizer the strategy does not have is an error."""
    for name in MOMENTS:
        moments = {key.split("/", 1)[1]: value for key, value in state.items() if key.startswith(f"{name}/")}
        if moments:
            if not hasattr(strategy, name):
                raise ValueError(f"the checkpoint holds {name} but {type(strategy).__name__} keeps no such moment")
            setattr(strategy, name, moments)
    vector = sorted(((int(key.split("/", 1)[1]), value) for key, value in state.items()
                     if key.startswith("momentum_vector/")))
    if vector:
        if not hasattr(strategy, "momentum_vector"):
            raise ValueError(f"the checkpoint holds a momentum vector but {type(strategy).__name__} keeps none")
        strategy.momentum_vector = [value for _, value in vector]
