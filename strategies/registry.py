"""Build the Flower strategy that each aggregation group runs, by the name in `federation.strategy`."""

from __future__ import annotations

from typing import Any

from flwr.serverapp.strategy import FedAdam, FedAvg, FedAvgM, FedProx, FedYogi, Strategy

from fed_netgpt.config import Config
from fed_netgpt.protocol import NUM_EXAMPLES, UNIT_WEIGHT
from strategies.client_dp import with_client_dp
from strategies.robust import robust_strategy


def make_strategy(config: Config, num_sites: int, rounds_done: int = 0) -> Strategy:
    """A strategy for one aggregation group of `num_sites` sites; with `privacy.mode=client_dp` behind Flower's DP
    wrapper, every site weighted alike. Nodes were discovered before the first round, so one node is enough to
    start."""
    federation = config.federation
    client_dp = config.privacy.mode == "client_dp"
    common: dict[str, Any] = dict(
        fraction_train=federation.fraction_train, fraction_evaluate=federation.fraction_evaluate,
        min_train_nodes=1, min_evaluate_nodes=1, min_available_nodes=1,
        weighted_by_key=UNIT_WEIGHT if client_dp else NUM_EXAMPLES,
    )
    if federation.fraction_evaluate == 0.0:
        common["min_evaluate_nodes"] = 0
    name = federation.strategy
    strategy: Strategy
    if federation.robust != "none":  # in place of FedAvg's mean; FedProx's term comes from train.proximal_mu
        strategy = robust_strategy(federation.robust, federation.robust_fraction, **common)
    elif name == "fedavg":
        strategy = FedAvg(**common)
    elif name == "fedprox":
        strategy = FedProx(**common, proximal_mu=config.train.proximal_mu)
    elif name == "fedavgm":
        strategy = FedAvgM(**common, server_learning_rate=federation.server_learning_rate,
                           server_momentum=federation.server_momentum)
    elif name in ("fedadam", "fedyogi"):
        optimizer = FedAdam if name == "fedadam" else FedYogi
        strategy = optimizer(**common, eta=federation.eta, tau=federation.tau)
    else:
        raise ValueError(f"federation.strategy: unknown strategy {name!r}")
    if client_dp:
        return with_client_dp(strategy, config.privacy, num_sites, federation.fraction_train,
                              federation.num_rounds, rounds_done)
    return strategy
