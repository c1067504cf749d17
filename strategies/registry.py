"""Build the Flower strategy that each region runs, by the name in `federation.strategy`."""

from __future__ import annotations

from flwr.serverapp.strategy import FedAdam, FedAvg, FedAvgM, FedProx, FedYogi, Strategy

from fed_netgpt.config import FederationConfig


def make_strategy(federation: FederationConfig, proximal_mu: float = 0.0) -> Strategy:
    """A strategy for one region. Nodes were discovered before the first round, so one node is enough."""
    common = dict(
        fraction_train=federation.fraction_train, fraction_evaluate=federation.fraction_evaluate,
        min_train_nodes=1, min_evaluate_nodes=1, min_available_nodes=1,
    )
    if federation.fraction_evaluate == 0.0:
        common["min_evaluate_nodes"] = 0
    name = federation.strategy
    if name == "fedavg":
        return FedAvg(**common)
    if name == "fedprox":
        return FedProx(**common, proximal_mu=proximal_mu)
    if name == "fedavgm":
        return FedAvgM(**common, server_learning_rate=federation.server_learning_rate,
                       server_momentum=federation.server_momentum)
    if name in ("fedadam", "fedyogi"):
        optimizer = FedAdam if name == "fedadam" else FedYogi
        return optimizer(**common, eta=federation.eta, tau=federation.tau)
    raise ValueError(f"federation.strategy: unknown strategy {name!r}")
