"""Robust aggregation per aggregation group (`federation.robust`), for groups where some sites may send poisoned
updates.

Each is a Flower strategy a group runs in place of FedAvg. Median, trimmed mean and clipped mean weigh every site
alike, since a compromised site can claim any example count; Krum weighs by examples only among the updates it
kept. Flower's own classes where they fit:
- `median`: FedMedian, the coordinate-wise median of the sites' adapters (of their updates: the start is shared).
- `trimmed_mean`: FedTrimmedAvg, per coordinate the mean after cutting `federation.robust_fraction` of the
  values at each end (int(fraction x replies) of them, so with 4 replies and 0.2 nothing is cut).
- `krum`: Multi-Krum (Blanchard et al., 2017) through Flower's MultiKrum: with f = int(fraction x replies)
  assumed malicious, each update is scored by its squared distances to its n - f - 2 nearest others, and the
  n - f best scored are averaged.
- `clipped_mean`: our own: every update clipped to the median update norm of the round, then the plain mean
  (strategies/aggregation.py:clipped_mean). It bounds what a scaled update can do but still lets a flipped one
  pull the mean back.
These replace FedAvg's mean; a server optimizer on top (fedadam, fedyogi, fedavgm), client-level DP noise (sized
for a plain mean) or an SVD of the mean of B·A would undo them, and the config refuses those combinations.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg, FedMedian, FedTrimmedAvg, MultiKrum, Strategy

from fed_netgpt.config import ROBUST
from fed_netgpt.protocol import from_record, to_record
from strategies.aggregation import clipped_mean

log = logging.getLogger(__name__)


class PerRoundKrum(MultiKrum):
    """Multi-Krum whose f follows the replies that arrived: f = int(fraction x n), the n - f best kept."""

    def __init__(self, *, fraction: float, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.fraction = fraction

    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        self.num_malicious_nodes = int(self.fraction * len(replies))
        self.num_nodes_to_select = max(len(replies) - self.num_malicious_nodes, 1)
        return super().aggregate_train(server_round, replies)


class ClippedMean(FedAvg):
    """The mean of the updates clipped to their median norm; it remembers the adapter it sent as the start."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.sent: dict[str, Any] = {}  # not `start`: that is Strategy's round loop

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        self.sent = from_record(arrays)
        return super().configure_train(server_round, arrays, config, grid)

    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        valid, _ = self._check_and_log_replies(replies, is_train=True)
        if not valid:
            return None, None
        states = [from_record(msg.content.array_records[self.arrayrecord_key]) for msg in valid]
        state, bound = clipped_mean(states, self.sent)
        log.info("aggregate_train: clipped_mean: %d updates clipped to the median norm %.4g", len(states), bound)
        return to_record(state), self.train_metrics_aggr_fn([msg.content for msg in valid], self.weighted_by_key)


def robust_strategy(name: str, fraction: float, **common: Any) -> Strategy:
    """The group's strategy for `federation.robust=name` (not `none`), with FedAvg's sampling settings."""
    if name == "median":
        return FedMedian(**common)
    if name == "trimmed_mean":
        return FedTrimmedAvg(**common, beta=fraction)
    if name == "krum":
        return PerRoundKrum(**common, fraction=fraction)
    if name == "clipped_mean":
        return ClippedMean(**common)
    raise ValueError(f"federation.robust: unknown aggregator {name!r}; expected one of {', '.join(ROBUST)}")
