"""Run any Flower strategy once per aggregation group: one adapter per group from one federation.

An aggregation group is what the federation averages over: a region (`federation.adapters=regional`), the
single global group (`global`), or one site (`local`). The ArrayRecord this strategy carries holds every
group's adapter, keys prefixed "<group>/", so Flower's own `Strategy.start` loop drives it unchanged. Each
round, every group's strategy instance (FedAvg, FedProx, FedAdam, ...) sees only that group's nodes and
adapter: it samples, configures and aggregates exactly as it would alone. Replies that do not fit the group's
adapter are dropped with a logged reason; a group left with no valid reply keeps its previous adapter and says
so in a WARNING.

LoRA aggregation (`lora_aggregation`): `factors` keeps the inner strategy's result, which averages A and B
apart (not the mean of the updates B·A); `ffa` is the same averaging over sites that froze A at the shared
initialisation (replies that changed A are rejected), which makes it the exact mean of B·A; `svd` replaces the
inner result by the example-weighted mean of B·A re-factorised to rank r (`svd_average`), logging the residual.
A group's strategy may be wrapped for client-level DP (strategies/client_dp.py); its epsilon so far is then in
the round's metrics as `<group>/client_epsilon`.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, TypeGuard

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.exception import PrivacyBudgetExhausted
from flwr.serverapp.strategy import DifferentialPrivacyClientSideFixedClipping, Strategy

from fed_netgpt.model.adapters import describe_mismatch
from fed_netgpt.protocol import ARRAYS, NUM_EXAMPLES, from_record, metric_record, scalar, to_record
from strategies.aggregation import (
    group_by,
    merge_groups,
    shared_factor_mismatch,
    split_groups,
    svd_average,
    update_norm,
    weighted_average,
)
from strategies.client_dp import sample_shortfall
from strategies.optimizer_state import export_optimizer, restore_optimizer

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RoundOutcome:
    """What a round produced, handed to whoever ends it: the run's round number, every group's adapter, the
    round's summary ("train": each group's mean metrics, "bytes": the adapters' traffic, "evaluate": validation)
    and each site's record of the round, by the id the strategy knows it by."""

    server_round: int
    arrays: ArrayRecord
    summary: dict[str, dict[str, float]]
    sites: dict[int, dict[str, Any]]


class GroupGrid:
    """A view of the Grid that shows a strategy only its group's nodes."""

    def __init__(self, grid: Grid, node_ids: list[int]) -> None:
        self._grid = grid
        self._node_ids = node_ids

    def get_node_ids(self) -> list[int]:
        connected = set(self._grid.get_node_ids())
        return [node for node in self._node_ids if node in connected]

    def __getattr__(self, name: str) -> Any:
        return getattr(self._grid, name)


class GroupStrategy(Strategy):
    """Runs any Flower strategy once per aggregation group (a region, the global group, or a site in local mode):
    one `make_strategy(number of the group's nodes)` instance per group; `node_groups` maps each node id to its
    group."""

    def __init__(self, make_strategy: Callable[[int], Strategy], node_groups: dict[int, str],
                 lora_aggregation: str = "factors", rank: int = 0, wire_dtype: str = "float32",
                 rounds_done: int = 0, min_replies: int = 1, max_update_norm: float = math.inf) -> None:
        if not node_groups:
            raise ValueError("GroupStrategy needs at least one node with a group")
        if lora_aggregation not in ("factors", "ffa", "svd") or (lora_aggregation == "svd" and rank < 1):
            raise ValueError(f"lora_aggregation must be factors, ffa, or svd with rank >= 1; got "
                             f"{lora_aggregation!r}, rank {rank}")
        self.lora_aggregation = lora_aggregation
        self.rank = rank
        self.rounds_done = rounds_done  # a resumed run: Flower counts from 1 again, the groups' strategies go on
        self.min_replies, self.max_update_norm = min_replies, max_update_norm
        self.wire_dtype = wire_dtype
        self.node_groups = dict(node_groups)
        self.groups = sorted(set(node_groups.values()))
        self.strategies = {group: make_strategy(sum(g == group for g in self.node_groups.values()))
                           for group in self.groups}
        self.current: dict[str, dict[str, Any]] = {}
        # what the round in progress produces, handed over at its end (`round_end`)
        self._summary: dict[str, dict[str, float]] = {}  # "train", "bytes", "evaluate"
        self._sites: dict[int, dict[str, Any]] = {}  # node -> its training reply's metrics or error
        self._downlink: dict[int, int] = {}  # node -> adapter bytes sent to it this round

    def round_end(self, receive: Callable[[RoundOutcome], None]) -> Callable[[int, ArrayRecord], None]:
        """Flower's `evaluate_fn`, which its round loop calls once a round is over: it hands `receive` what the
        round produced (round 0, before any training, produced nothing)."""
        def evaluate_fn(server_round: int, arrays: ArrayRecord) -> None:
            if server_round > 0:
                receive(RoundOutcome(server_round + self.rounds_done, arrays, dict(self._summary), dict(self._sites)))
        return evaluate_fn

    def optimizer_states(self) -> dict[str, Any]:
        """Every group's server optimizer state, keys prefixed by group (empty for FedAvg)."""
        return {f"{group}/{key}": value for group, strategy in self.strategies.items()
                for key, value in export_optimizer(strategy).items()}

    def restore_optimizer_states(self, state: dict[str, Any]) -> None:
        for group, strategy in self.strategies.items():
            restore_optimizer(strategy, {k.removeprefix(f"{group}/"): v for k, v in state.items()
                                         if k.startswith(f"{group}/")})

    def summary(self) -> None:
        log.info("\t├──> GroupStrategy over %d groups:", len(self.groups))
        for group in self.groups:
            nodes = sum(g == group for g in self.node_groups.values())
            log.info("\t│\t├── %s: %d nodes, %s", group, nodes, type(self.strategies[group]).__name__)
        next(iter(self.strategies.values())).summary()

    def _configure(self, method: str, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                   grid: Grid) -> list[Message]:
        server_round += self.rounds_done  # the run's round: sites seed with it, FedAdam's bias correction uses it
        states = split_groups(dict(arrays.items()))
        self.current = {group: from_record(ArrayRecord(states[group])) for group in self.groups}
        messages: list[Message] = []
        for group, strategy in self.strategies.items():
            nodes = [node for node, g in self.node_groups.items() if g == group]
            configure = getattr(strategy, method)
            group_grid = GroupGrid(grid, nodes)
            if not group_grid.get_node_ids():  # Flower's sample_nodes would wait for one with no timeout
                log.warning("%s: group %s has no connected site; it sits out round %d and keeps its adapter",
                            method, group, server_round)
                continue
            reason = sample_shortfall(strategy, len(group_grid.get_node_ids()))
            if reason:
                log.warning("%s: group %s sits out round %d and keeps its adapter: %s", method, group,
                            server_round, reason)
                continue
            try:
                # a copy each: a group's strategy writes its own keys (server-round, a clipping norm) into it
                messages += configure(server_round, ArrayRecord(states[group]), ConfigRecord(dict(config)),
                                      group_grid)
            except PrivacyBudgetExhausted as err:  # client_dp: the round would pass privacy.target_epsilon
                log.warning("%s: group %s sits out round %d and keeps its adapter: %s", method, group,
                            server_round, err)
        if self.wire_dtype != "float32":
            for msg in messages:
                msg.content[ARRAYS] = to_record(from_record(msg.content.array_records[ARRAYS]), self.wire_dtype)
        return messages

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        messages = self._configure("configure_train", server_round, arrays, config, grid)
        self._downlink = {msg.metadata.dst_node_id: array_bytes(msg) for msg in messages}
        return messages

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        return self._configure("configure_evaluate", server_round, arrays, config, grid)

    def _by_group(self, replies: Iterable[Message]) -> dict[str, list[Message]]:
        replies = [msg for msg in replies if msg.metadata.src_node_id in self.node_groups]
        return group_by(replies, [self.node_groups[msg.metadata.src_node_id] for msg in replies])

    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        server_round += self.rounds_done
        self._sites = {msg.metadata.src_node_id: {
            **_reply_record(msg), "bytes_down": self._downlink.get(msg.metadata.src_node_id, 0),
            "bytes_up": 0 if msg.has_error() else array_bytes(msg)} for msg in replies}
        for node in self._downlink.keys() - self._sites.keys():
            log.warning("aggregate_train: node %d (%s) did not reply within federation.timeout in round %d", node,
                        self.node_groups[node], server_round)
            self._sites[node] = {"error": "no reply within federation.timeout",
                                 "bytes_down": self._downlink[node], "bytes_up": 0}
        if self.wire_dtype != "float32":  # 16-bit replies are averaged in float32
            for msg in replies:
                if not msg.has_error() and ARRAYS in msg.content.array_records:
                    msg.content[ARRAYS] = to_record(from_record(msg.content.array_records[ARRAYS]))
        grouped = self._by_group(replies)
        new_states, metrics = {}, {}
        for group in self.groups:
            accepted = [msg for msg in grouped.get(group, []) if self._accept(group, msg)]
            valid = _same_metric_keys(group, accepted)
            for msg in accepted:
                if msg not in valid:
                    self._rejected(msg, "its metric keys differ from the group's other replies")
            if 0 < len(valid) < self.min_replies:
                log.warning("aggregate_train: group %s got %d valid replies in round %d, fewer than "
                            "federation.min_replies=%d", group, len(valid), server_round, self.min_replies)
                valid = []
            arrays, _ = self.strategies[group].aggregate_train(server_round, valid) if valid else (None, None)
            group_metrics = _mean_metrics(valid)
            if arrays is not None and not all(np.all(np.isfinite(v)) for v in from_record(arrays).values()):
                log.warning("aggregate_train: group %s: the aggregate of round %d is not finite", group,
                            server_round)
                arrays, group_metrics = None, {}
            if arrays is None:
                log.warning("aggregate_train: group %s has no valid update in round %d; it keeps its previous "
                            "adapter", group, server_round)
                new_states[group] = self.current[group]
            elif self.lora_aggregation == "svd":
                new_states[group], residual = self._svd(group, valid)
                group_metrics["svd_residual"] = residual
            else:
                new_states[group] = from_record(arrays)
            group_metrics.update(_client_privacy(self.strategies[group]))
            metrics.update(_prefixed(group, group_metrics))
        uplink = sum(record["bytes_up"] for record in self._sites.values())
        self._summary = {"train": metrics, "bytes": {"downlink": sum(self._downlink.values()), "uplink": uplink}}
        return to_record(merge_groups(new_states)), metric_record(metrics)

    def _svd(self, group: str, replies: list[Message]) -> tuple[dict[str, Any], float]:
        """The group's mean of B·A at rank r; returns it and the largest relative residual over modules."""
        states = [from_record(msg.content.array_records[ARRAYS]) for msg in replies]
        counts = [next(iter(msg.content.metric_records.values()))[NUM_EXAMPLES] for msg in replies]
        weights = [float(scalar(count, NUM_EXAMPLES)) for count in counts]
        state, residuals = svd_average(states, weights, self.rank)
        worst = max(residuals.values(), default=0.0)
        log.info("aggregate_train: %s: rank-%d SVD of the mean B·A discards at most %.2e of its norm",
                 group, self.rank, worst)
        return state, worst

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        grouped = self._by_group(replies)
        metrics: dict[str, float] = {}
        for group in self.groups:
            valid = [msg for msg in grouped.get(group, []) if not msg.has_error()]
            metrics.update(_prefixed(group, _mean_metrics(valid)))
        self._summary["evaluate"] = metrics
        return metric_record(metrics) if metrics else None

    def _accept(self, group: str, msg: Message) -> bool:
        """Keep a reply only if it carries a finite adapter of the group's shapes and an example count."""
        node = msg.metadata.src_node_id
        if msg.has_error():
            log.warning("aggregate_train: node %d (%s) failed: %s", node, group, msg.error.reason)
            return False
        arrays = msg.content.array_records
        metrics = list(msg.content.metric_records.values())
        count = metrics[0].get(NUM_EXAMPLES, 0) if len(metrics) == 1 else 0
        reason: str | None
        if list(arrays) != [ARRAYS] or len(metrics) != 1 or not (_finite(count) and float(count) > 0):
            reason = (f"it must carry one ArrayRecord {ARRAYS!r} and one MetricRecord with a finite {NUM_EXAMPLES} > 0"
                      f" (got {count!r})")
        else:
            shapes = {key: value.shape for key, value in self.current[group].items()}
            state = from_record(arrays[ARRAYS])
            reason = describe_mismatch(shapes, state)
            if not reason and self.lora_aggregation == "ffa":
                reason = shared_factor_mismatch([state], self.current[group])
            if not reason and math.isfinite(self.max_update_norm):
                norm = update_norm(state, self.current[group])
                if norm > self.max_update_norm:
                    reason = f"update norm {norm:.4g} > federation.max_update_norm={self.max_update_norm:g}"
        if reason:
            log.warning("aggregate_train: rejected the update of node %d (%s): %s", node, group, reason)
            self._rejected(msg, reason)
            return False
        return True

    def _rejected(self, msg: Message, reason: str) -> None:
        """Say why in the site's metrics.jsonl record of this round."""
        record = self._sites.get(msg.metadata.src_node_id)
        if record is not None:
            record["rejected"] = reason


def array_bytes(msg: Message) -> int:
    """Bytes of adapter weights a message carries (what a round costs the sites' links, framing aside)."""
    return sum(array.numpy().nbytes for record in msg.content.array_records.values() for array in record.values())


def _reply_record(msg: Message) -> dict[str, Any]:
    """What a site's training reply says about it, for its line in metrics.jsonl: its metrics, or its error."""
    if msg.has_error():
        return {"error": msg.error.reason}
    records = list(msg.content.metric_records.values())[:1]
    return {key: float(value) for record in records for key, value in record.items() if isinstance(value, (int, float))}


def _client_privacy(strategy: Strategy) -> dict[str, float]:
    """A DP-wrapped group's spending so far, with what recomputing it takes (none for other strategies)."""
    if not isinstance(strategy, DifferentialPrivacyClientSideFixedClipping):
        return {}
    spent = strategy.privacy_spent()
    if spent is None:
        return {}
    return {"client_epsilon": spent.epsilon, "client_delta": spent.delta, "client_releases": spent.num_releases,
            "client_noise_multiplier": strategy.noise_multiplier, "client_sites_sampled": strategy.num_sampled_clients}


def _same_metric_keys(group: str, replies: list[Message]) -> list[Message]:
    """Flower's strategies refuse a round whose replies differ in metric keys: keep the replies with the most
    common key set (ties: the larger set), drop the odd ones out, whichever reply came first."""
    if not replies:
        return replies
    key_sets = [frozenset(next(iter(msg.content.metric_records.values()))) for msg in replies]
    keys = max(set(key_sets), key=lambda k: (key_sets.count(k), len(k), sorted(k)))
    kept = []
    for msg, other in zip(replies, key_sets):
        if other == keys:
            kept.append(msg)
        else:
            log.warning("aggregate_train: rejected the update of node %d (%s): metric keys %s differ from %s",
                        msg.metadata.src_node_id, group, sorted(other), sorted(keys))
    return kept


def _mean_metrics(replies: list[Message]) -> dict[str, float]:
    """Example-weighted mean of the replies' finite scalar metrics (replies without metrics are skipped)."""
    records = [_finite_scalars(r) for msg in replies for r in list(msg.content.metric_records.values())[:1]]
    records = [r for r in records if r.get(NUM_EXAMPLES, 0) > 0]
    if not records:
        return {}
    mean: dict[str, float] = {}
    for key in sorted({k for r in records for k in r} - {NUM_EXAMPLES}):  # each over the replies where it is finite
        holding = [r for r in records if key in r]
        weights = [r[NUM_EXAMPLES] for r in holding]
        mean[key] = float(weighted_average([{key: r[key]} for r in holding], weights)[key])
    mean[NUM_EXAMPLES] = sum(r[NUM_EXAMPLES] for r in records)
    return mean


def _finite_scalars(record: MetricRecord) -> dict[str, float]:
    """A metric record's finite scalars, as floats (lists and NaN or infinite values left out)."""
    return {key: float(value) for key, value in record.items() if _finite(value)}


def _finite(value: object) -> TypeGuard[int | float]:
    return isinstance(value, (int, float)) and math.isfinite(value)


def _prefixed(group: str, metrics: dict[str, float]) -> dict[str, float]:
    return {f"{group}/{key}": value for key, value in metrics.items()}
