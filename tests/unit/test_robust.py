"""Poisoned sites (fed_netgpt/run/faults.py) and robust aggregation (strategies/robust.py): who is poisoned and what
they send, and that under 20 % of sign-flipped updates FedAvg is dragged away while every robust aggregator
stays near the honest sites' mean."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import ConfigRecord
from flwr.serverapp.strategy import FedMedian, FedTrimmedAvg
from flwr.supercore.differential_privacy import compute_clip_model_update

from fed_netgpt.config import Config, ConfigError, FederationConfig, load_config
from fed_netgpt.run.faults import poison_update, poisoned_count, poisoned_sites
from strategies.aggregation import clip_update, clipped_mean, update_norm
from strategies.groups import GroupStrategy
from strategies.registry import make_strategy
from strategies.robust import ClippedMean, PerRoundKrum
from tests.messages import ConnectedNodesGrid, merged, numpy_of, reply, server_identity  # noqa: F401
from tests.states import l2_distance

pytestmark = pytest.mark.usefixtures("server_identity")
SHAPES = {"lora_A.weight": (4, 6), "lora_B.weight": (6, 4)}


def _random_state(rng: np.random.Generator, scale: float = 1.0) -> dict[str, np.ndarray]:
    return {key: (scale * rng.standard_normal(shape)).astype(np.float32) for key, shape in SHAPES.items()}


# ---- who is poisoned, and what a poisoned site sends ------------------------------------------


@pytest.mark.parametrize(("fraction", "sites", "expected"), [
    (0.2, 10, 2), (0.2, 4, 1), (0.2, 2, 0), (0.1, 4, 0), (0.5, 4, 2), (0.25, 2, 1), (0.9, 3, 2), (0.0, 10, 0),
])
def test_poisoned_count_rounds_to_the_nearest_site_halves_up_and_never_all(fraction, sites, expected):
    assert poisoned_count(fraction, sites) == expected


def test_poisoned_sites_are_drawn_per_region_and_do_not_depend_on_order():
    # Prepare: 10 sites in each of two regions
    regions = {f"{region}-{k}": region for region in ("france", "japan") for k in range(10)}
    shuffled = dict(sorted(regions.items(), key=lambda item: item[0][::-1]))

    # Execute
    chosen = poisoned_sites(0.2, 0, regions)

    # Assert: 2 a region, the same set from any order, another seed another set
    assert sorted(regions[s] for s in chosen) == ["france", "france", "japan", "japan"]
    assert poisoned_sites(0.2, 0, shuffled) == chosen
    assert any(poisoned_sites(0.2, seed, regions) != chosen for seed in range(1, 5))
    assert poisoned_sites(0.0, 0, regions) == set()


def test_scale_and_sign_flip_multiply_the_sites_real_update():
    rng = np.random.default_rng(0)
    start, trained = _random_state(rng), _random_state(rng)
    for kind, factor in (("scale", 10.0), ("sign_flip", -10.0)):
        sent = poison_update(trained, start, kind, 10.0, seed=0, server_round=1, site_id="paris")
        for key in start:
            np.testing.assert_allclose(sent[key], start[key] + factor * (trained[key] - start[key]), rtol=1e-5,
                                       atol=1e-5)
            assert sent[key].dtype == np.float32


def test_a_random_update_has_the_scaled_norm_and_no_signal():
    rng = np.random.default_rng(1)
    start, trained = _random_state(rng), _random_state(rng)
    sent = poison_update(trained, start, "random", 3.0, seed=0, server_round=2, site_id="paris")
    again = poison_update(trained, start, "random", 3.0, seed=0, server_round=2, site_id="paris")
    real = np.concatenate([(trained[k] - start[k]).ravel() for k in start])
    noise = np.concatenate([(sent[k] - start[k]).ravel() for k in start])
    assert update_norm(sent, start) == pytest.approx(3.0 * update_norm(trained, start), rel=1e-5)
    assert abs(real @ noise) / (np.linalg.norm(real) * np.linalg.norm(noise)) < 0.5  # not the real direction
    assert all(np.array_equal(sent[k], again[k]) for k in start)  # reproducible
    with pytest.raises(ValueError, match="poison kind must be one of"):
        poison_update(trained, start, "invert", 3.0, seed=0, server_round=2, site_id="paris")


# ---- clipping ----------------------------------------------------------------------------------


@pytest.mark.parametrize("bound", [0.1, 1.0, 100.0])
def test_clip_update_equals_flowers_client_dp_clipping(bound):
    rng = np.random.default_rng(2)
    start, trained = _random_state(rng), _random_state(rng)
    flower = [trained[k].copy() for k in start]
    compute_clip_model_update(flower, [start[k] for k in start], bound)
    ours = clip_update(trained, start, bound)
    for key, expected in zip(start, flower):
        np.testing.assert_allclose(ours[key], expected, rtol=1e-5, atol=1e-6)
    assert update_norm(ours, start) <= bound * (1 + 1e-5)


def test_clipped_mean_gives_a_scaled_update_no_more_pull_than_a_typical_one():
    # Prepare: four sites move +1 per coordinate, a fifth moves 1000 times as far the other way
    start = {key: np.zeros(shape, np.float32) for key, shape in SHAPES.items()}
    honest = [{key: np.ones(shape, np.float32) for key, shape in SHAPES.items()} for _ in range(4)]
    attacker = {key: np.full(shape, -1000.0, np.float32) for key, shape in SHAPES.items()}

    # Execute
    state, bound = clipped_mean([*honest, attacker], start)

    # Assert: the bound is the median norm (an honest one); the mean is (4 - 1) / 5 per coordinate
    assert bound == pytest.approx(update_norm(honest[0], start))
    for key in SHAPES:
        np.testing.assert_allclose(state[key], 0.6, rtol=1e-6)


# ---- the aggregators under attack --------------------------------------------------------------

NODES = {node: "france" for node in range(100, 110)}  # 10 sites a region: 20 % poisoned is 2 of them


def _attacked_round(robust: str) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], dict[str, np.ndarray]]:
    """One round of 10 sites, 8 honest (a shared update plus a little noise), 2 sending it sign-flipped x10;
    returns the region's new adapter, the honest sites' mean and the adapter the round started from."""
    rng = np.random.default_rng(3)
    start, direction = _random_state(rng), _random_state(rng)
    honest = [{k: start[k] + direction[k] + 0.05 * rng.standard_normal(v.shape).astype(np.float32)
               for k, v in start.items()} for _ in range(8)]
    poisoned = [poison_update(state, start, "sign_flip", 10.0, 0, 1, f"bad-{i}") for i, state in enumerate(honest[:2])]
    config = Config(federation=FederationConfig(robust=robust))
    strategy = GroupStrategy(lambda n: make_strategy(config, n), NODES)
    strategy.configure_train(1, merged({"france": start}), ConfigRecord({}), ConnectedNodesGrid(NODES))
    replies = [reply(node, state, 10, 1.0) for node, state in zip(NODES, [*honest, *poisoned])]
    arrays, _ = strategy.aggregate_train(1, replies)
    new = {key.removeprefix("france/"): value for key, value in numpy_of(arrays).items()}
    honest_mean = {k: np.mean([s[k] for s in honest], axis=0) for k in start}
    return new, honest_mean, start


def test_fedavg_is_dragged_away_by_two_poisoned_sites_of_ten():
    new, honest_mean, start = _attacked_round("none")
    # (8 d - 2 x 10 d) / 10 = -1.2 d: the region moves backwards, 2.2 honest steps away from where it should be
    assert l2_distance(new, honest_mean) > 2.0 * update_norm(honest_mean, start)


@pytest.mark.parametrize("robust", ["median", "trimmed_mean", "krum", "clipped_mean"])
def test_robust_aggregators_stay_near_the_honest_mean(robust):
    new, honest_mean, start = _attacked_round(robust)
    # clipped_mean still lets the two flipped updates, clipped to an honest norm, pull back: (8 - 2) / 10 of the
    # step is left, 0.4 steps short; the others drop them outright
    tolerance = 0.45 if robust == "clipped_mean" else 0.05
    error = l2_distance(new, honest_mean) / update_norm(honest_mean, start)
    assert error < tolerance, (robust, error)


def test_krum_keeps_exactly_the_honest_updates():
    new, honest_mean, _ = _attacked_round("krum")
    for key in honest_mean:  # equal example counts: the kept 8 averaged are the honest mean
        np.testing.assert_allclose(new[key], honest_mean[key], rtol=1e-4, atol=1e-5)


def test_make_strategy_builds_the_named_robust_aggregator():
    def built(robust: str, strategy: str = "fedavg"):
        config = Config(federation=FederationConfig(robust=robust, strategy=strategy),
                        train=load_config(overrides=["train.proximal_mu=0.1"]).train)
        return make_strategy(config, 10)

    assert isinstance(built("median"), FedMedian)
    assert isinstance(built("trimmed_mean"), FedTrimmedAvg) and built("trimmed_mean").beta == 0.2
    assert isinstance(built("krum"), PerRoundKrum)
    assert isinstance(built("clipped_mean", "fedprox"), ClippedMean)


@pytest.mark.parametrize(("overrides", "message"), [
    (["federation.robust=median", "federation.strategy=fedadam"], "would feed it to a server optimizer"),
    (["federation.robust=krum", "privacy.mode=client_dp", "privacy.noise_multiplier=1"], "sizes its noise"),
    (["federation.robust=trimmed_mean", "federation.lora_aggregation=svd"], "lora_aggregation=svd replaces"),
    (["federation.robust=mean"], "federation.robust must be one of none, median"),
    (["federation.robust_fraction=0.5"], "federation.robust_fraction must be within \\[0, 0.5\\)"),
    (["faults.poison_fraction=1"], "faults.poison_fraction must be within \\[0, 1\\)"),
    (["faults.poison_kind=noise"], "faults.poison_kind must be one of scale, sign_flip, random"),
    (["faults.poison_scale=inf"], "faults.poison_scale must be a finite number > 0"),
])
def test_combinations_that_would_undo_robustness_are_refused(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(overrides=overrides)
