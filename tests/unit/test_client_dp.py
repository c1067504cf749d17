"""strategies/client_dp.py and the client's clipping mod: Flower's central-DP wrapper per region, its epsilon
against dp-accounting called directly, equal weights, the noise's size, and the clipping at the site."""

from __future__ import annotations

import math

import numpy as np
import pytest
from dp_accounting import dp_event, rdp
from flwr.app import ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict

from clients.app import clip_for_client_dp
from fed_netgpt.config import Config, ConfigError, FederationConfig, PrivacyConfig, load_config
from fed_netgpt.protocol import CLIPPING_NORM, UNIT_WEIGHT
from strategies.client_dp import client_noise_multiplier, epsilon_after
from strategies.groups import GroupStrategy
from strategies.registry import make_strategy
from tests.messages import ConnectedNodesGrid, merged, numpy_of, record, server_identity  # noqa: F401

pytestmark = pytest.mark.usefixtures("server_identity")
SHAPES = {"lora_A.weight": (40, 100), "lora_B.weight": (100, 60)}  # 10,000 numbers: enough to measure the noise
NODE_REGIONS = {11: "france", 12: "france", 21: "japan"}


def _privacy(**values) -> PrivacyConfig:
    return PrivacyConfig(**{"mode": "client_dp", **values})


def _independent_epsilon(noise: float, rounds: int, delta: float) -> float:
    """dp-accounting's RDP accountant called directly: `rounds` Gaussian releases, no sampling."""
    accountant = rdp.RdpAccountant()
    accountant.compose(dp_event.GaussianDpEvent(noise), rounds)
    return accountant.get_epsilon(delta)


@pytest.mark.parametrize(("noise", "rounds", "delta"), [(1.0, 3, 1e-5), (2.5, 10, 1e-6), (0.8, 1, 1e-3)])
def test_epsilon_equals_dp_accounting_called_directly(noise, rounds, delta):
    # Execute / Assert
    assert epsilon_after(_privacy(delta=delta, noise_multiplier=noise), noise, rounds) == pytest.approx(
        _independent_epsilon(noise, rounds, delta), rel=1e-12)


@pytest.mark.parametrize(("target", "rounds"), [(8.0, 3), (1.0, 3), (4.0, 20)])
def test_derived_noise_ends_the_planned_rounds_at_the_target(target, rounds):
    # Execute
    noise = client_noise_multiplier(_privacy(target_epsilon=target), rounds)

    # Assert: within the budget, and spending it (a tighter noise would exceed it)
    reached = _independent_epsilon(noise, rounds, 1e-5)
    assert target * 0.99 <= reached <= target
    assert _independent_epsilon(noise * 0.99, rounds, 1e-5) > reached


def test_a_given_noise_multiplier_is_used_as_is():
    assert client_noise_multiplier(_privacy(noise_multiplier=1.7), 5) == 1.7


def _state(value: float) -> dict[str, np.ndarray]:
    return {key: np.full(shape, value, dtype=np.float32) for key, shape in SHAPES.items()}


def _reply(instruction: Message, value: float, num_examples: int) -> Message:
    metrics = MetricRecord({"train_loss": 1.0, "num-examples": num_examples, UNIT_WEIGHT: 1.0})
    return Message(RecordDict({"arrays": record(_state(value)), "metrics": metrics}), reply_to=instruction)


def test_regional_client_dp_weighs_sites_alike_adds_the_calibrated_noise_and_reports_epsilon():
    # Prepare: noise 2, clipping 1; france samples 2 sites (noise std 2 x 1 / 2 = 1), japan 1 (std 2)
    config = Config(federation=FederationConfig(num_rounds=3),
                    privacy=_privacy(noise_multiplier=2.0, max_grad_norm=1.0))
    strategy = GroupStrategy(lambda num_sites: make_strategy(config, num_sites), NODE_REGIONS)
    messages = list(strategy.configure_train(1, merged({"france": _state(0.0), "japan": _state(0.0)}),
                                             ConfigRecord({}), ConnectedNodesGrid(NODE_REGIONS)))
    by_node = {msg.metadata.dst_node_id: msg for msg in messages}

    # Execute: france's sites sent 0 (1 example) and 4 (3 examples): equal weights make the mean 2, not 3
    arrays, metrics = strategy.aggregate_train(1, [_reply(by_node[11], 0.0, 1), _reply(by_node[12], 4.0, 3),
                                                   _reply(by_node[21], 1.0, 5)])

    # Assert
    assert all(msg.content["config"][CLIPPING_NORM] == 1.0 for msg in messages)  # the sites clip to this
    result = numpy_of(arrays)
    france = np.concatenate([result[f"france/{key}"].ravel() - 2.0 for key in SHAPES])
    japan = np.concatenate([result[f"japan/{key}"].ravel() - 1.0 for key in SHAPES])
    assert abs(france.mean()) < 0.05 and france.std() == pytest.approx(1.0, rel=0.05)
    assert abs(japan.mean()) < 0.1 and japan.std() == pytest.approx(2.0, rel=0.05)
    assert metrics["france/client_epsilon"] == pytest.approx(_independent_epsilon(2.0, 1, 1e-5), rel=1e-9)
    assert metrics["france/client_sites_sampled"] == 2 and metrics["japan/client_sites_sampled"] == 1
    assert metrics["france/client_releases"] == 1 and metrics["france/client_noise_multiplier"] == 2.0


def test_a_resumed_region_counts_the_rounds_released_before():
    # Prepare
    config = Config(privacy=_privacy(noise_multiplier=1.5))

    # Execute
    resumed = make_strategy(config, 4, rounds_done=2)

    # Assert
    spent = resumed.privacy_spent()
    assert spent.num_releases == 2
    assert spent.epsilon == pytest.approx(_independent_epsilon(1.5, 2, 1e-5), rel=1e-9)


def _train_message(config: dict) -> Message:
    content = RecordDict({"arrays": record(_state(0.0)), "config": ConfigRecord(config)})
    return Message(content, dst_node_id=11, message_type=MessageType.TRAIN)


@pytest.mark.parametrize("clipping_norm", [None, 0.5])
def test_the_site_clips_its_update_only_in_a_client_dp_run(clipping_norm):
    # Prepare: the site's update is 0 -> 1 on 10,000 numbers (norm 100)
    sent = _train_message({} if clipping_norm is None else {CLIPPING_NORM: clipping_norm})
    context = Context(run_id=1, node_id=11, node_config={}, state=RecordDict(), run_config={})

    # Execute
    reply = clip_for_client_dp(sent, context, lambda msg, _: _reply(msg, 1.0, 3))

    # Assert: clipped to the norm in the message, or untouched
    update = np.concatenate([a.numpy().ravel() for a in reply.content["arrays"].values()])
    expected = 100.0 if clipping_norm is None else clipping_norm
    assert np.linalg.norm(update) == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["federation.strategy=fedadam"], "works with federation.strategy fedavg or fedprox, not fedadam"),
        (["federation.lora_aggregation=svd"], "use factors or ffa"),
        (["federation.adapters=local"], "averages nothing"),
        (["federation.wire_dtype=float16"], "use federation.wire_dtype=float32, not float16"),
        (["privacy.target_epsilon=8", "privacy.noise_multiplier=1"], "exactly one of"),
    ],
)
def test_client_dp_refuses_what_breaks_its_noise_calibration(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(overrides=["privacy.mode=client_dp", "privacy.noise_multiplier=1", *overrides])


def test_client_dp_noise_derivation_is_monotone_in_the_target():
    noises = [client_noise_multiplier(_privacy(target_epsilon=e), 3) for e in (1.0, 4.0, 8.0, 64.0)]
    assert noises == sorted(noises, reverse=True) and all(math.isfinite(n) for n in noises)


def test_a_region_over_its_budget_sits_out_the_round_and_keeps_its_adapter(caplog):
    # Prepare: the noise planned for one round at epsilon 2; a second round would exceed it
    config = Config(federation=FederationConfig(num_rounds=1), privacy=_privacy(target_epsilon=2.0))
    strategy = GroupStrategy(lambda num_sites: make_strategy(config, num_sites), NODE_REGIONS)
    start = merged({"france": _state(0.0), "japan": _state(0.0)})
    first = list(strategy.configure_train(1, start, ConfigRecord({}), ConnectedNodesGrid(NODE_REGIONS)))
    arrays, metrics = strategy.aggregate_train(1, [_reply(msg, 0.1, 1) for msg in first])

    # Execute
    with caplog.at_level("WARNING"):
        second = list(strategy.configure_train(2, arrays, ConfigRecord({}), ConnectedNodesGrid(NODE_REGIONS)))
        kept, _ = strategy.aggregate_train(2, [])

    # Assert: round 1 spent the budget without passing it; round 2 trains nowhere and changes nothing
    assert 1.9 < metrics["france/client_epsilon"] <= 2.0
    assert second == []
    assert "group france sits out round 2" in caplog.text and "exceed max_epsilon" in caplog.text
    for key, value in numpy_of(arrays).items():
        np.testing.assert_array_equal(numpy_of(kept)[key], value)


def test_a_region_with_a_site_disconnected_sits_out_and_a_bug_in_its_strategy_is_not_hidden(caplog, monkeypatch):
    # Prepare: france's noise is sized for its 2 sites, but only node 11 is connected; japan's site is
    config = Config(federation=FederationConfig(num_rounds=2), privacy=_privacy(noise_multiplier=1.0))
    strategy = GroupStrategy(lambda num_sites: make_strategy(config, num_sites), NODE_REGIONS)
    start = merged({"france": _state(0.0), "japan": _state(0.0)})
    connected = ConnectedNodesGrid([11, 21])

    # Execute
    with caplog.at_level("WARNING"):
        sent = list(strategy.configure_train(1, start, ConfigRecord({}), connected))

    # Assert: france sits out, saying why; japan trains
    assert [msg.metadata.dst_node_id for msg in sent] == [21]
    assert "group france sits out round 1" in caplog.text and "sized for 2" in caplog.text

    # Execute / Assert: any other error of a region's strategy reaches the caller instead of a log line
    def broken(*args, **kwargs):
        raise ValueError("a bug")

    monkeypatch.setattr(strategy.strategies["japan"], "configure_train", broken)
    with pytest.raises(ValueError, match="a bug"):
        strategy.configure_train(2, start, ConfigRecord({}), ConnectedNodesGrid(NODE_REGIONS))
