"""strategies/groups.py and registry.py with real Flower messages, records and strategies.

Only the transport is a test double: a `Grid` that knows which nodes are connected. Instructions are
built by the real strategies; replies are real `Message(content, reply_to=instruction)` objects, so
their `src_node_id` is set by Flower exactly as on a SuperLink.
"""

from __future__ import annotations

import logging

import numpy as np
import pytest
from flwr.app import ArrayRecord, ConfigRecord, Error, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAdam, FedAvg, FedAvgM, FedProx, FedYogi

from fed_netgpt.config import Config, FederationConfig, TrainConfig
from strategies.groups import GroupStrategy
from strategies.registry import make_strategy
from tests.messages import (  # noqa: F401 - server_identity is a fixture
    NODE_REGIONS,
    SHAPES,
    ConnectedNodesGrid,
    instruction,
    merged,
    numpy_of,
    record,
    reply,
    round_outcome,
    server_identity,
    state_of,
)

pytestmark = pytest.mark.usefixtures("server_identity")


def _config(train: TrainConfig | None = None, **federation) -> Config:
    """A Config with these federation settings; FederationConfig itself does not validate (Config does)."""
    return Config(federation=FederationConfig(**federation), train=train or TrainConfig())


def _fedavg(num_sites: int) -> FedAvg:
    return make_strategy(_config(), num_sites)


@pytest.fixture
def configured() -> GroupStrategy:
    return _configured_strategy()


def test_reply_src_node_id_comes_from_the_instruction():
    # Execute
    msg = reply(12, state_of(1.0), 1, 0.5)

    # Assert
    assert msg.metadata.src_node_id == 12
    assert msg.metadata.dst_node_id == 1
    assert msg.metadata.message_type == MessageType.TRAIN


def test_constructor_groups_nodes_into_sorted_groups():
    # Execute
    strategy = GroupStrategy(_fedavg, NODE_REGIONS)

    # Assert
    assert strategy.groups == ["france", "japan"]
    assert set(strategy.strategies) == {"france", "japan"}
    assert strategy.strategies["france"] is not strategy.strategies["japan"]
    with pytest.raises(ValueError, match="at least one node"):
        GroupStrategy(_fedavg, {})


def test_configure_train_sends_each_node_its_own_regions_adapter():
    # Prepare
    strategy = GroupStrategy(_fedavg, NODE_REGIONS)
    arrays = merged({"france": state_of(1.5), "japan": state_of(-2.0)})

    # Execute
    messages = list(strategy.configure_train(3, arrays, ConfigRecord({"lr": 0.1}), ConnectedNodesGrid([11, 12, 21])))

    # Assert
    assert sorted(m.metadata.dst_node_id for m in messages) == [11, 12, 21]
    for message in messages:
        region = NODE_REGIONS[message.metadata.dst_node_id]
        expected = state_of(1.5 if region == "france" else -2.0)
        sent = numpy_of(message.content["arrays"])
        assert sent.keys() == expected.keys()  # the group prefix is gone
        for key, value in expected.items():
            np.testing.assert_array_equal(sent[key], value)
        config = message.content["config"]
        assert "region" not in config  # a site knows its region; nothing on the wire repeats it
        assert config["lr"] == pytest.approx(0.1)
        assert config["server-round"] == 3
        assert message.metadata.message_type == MessageType.TRAIN
    assert strategy.current["japan"]["lora_A.weight"].tolist() == [[-2.0] * 3] * 2


def test_configure_train_only_addresses_connected_nodes():
    # Prepare
    strategy = GroupStrategy(_fedavg, NODE_REGIONS)

    # Execute: node 12 is not connected, node 99 has no region
    messages = strategy.configure_train(
        1, merged({"france": state_of(0.0), "japan": state_of(0.0)}), ConfigRecord({}), ConnectedNodesGrid([11, 21, 99])
    )

    # Assert
    assert sorted(m.metadata.dst_node_id for m in messages) == [11, 21]


def test_configure_evaluate_sends_region_adapters_as_evaluate_messages():
    # Prepare
    strategy = GroupStrategy(_fedavg, NODE_REGIONS)

    # Execute
    messages = strategy.configure_evaluate(
        2, merged({"france": state_of(4.0), "japan": state_of(5.0)}), ConfigRecord({}), ConnectedNodesGrid(NODE_REGIONS)
    )

    # Assert
    assert len(messages) == 3
    for message in messages:
        assert message.metadata.message_type == MessageType.EVALUATE
        value = 4.0 if NODE_REGIONS[message.metadata.dst_node_id] == "france" else 5.0
        np.testing.assert_array_equal(numpy_of(message.content["arrays"])["lora_B.weight"], np.full((3, 2), value))


def test_aggregate_train_fedavg_is_the_example_weighted_mean_per_region(configured):
    # Prepare
    replies = [reply(11, state_of(1.0), 1, 2.0), reply(12, state_of(3.0), 3, 4.0), reply(21, state_of(7.0), 5, 1.0)]

    # Execute
    arrays, metrics = configured.aggregate_train(1, replies)

    # Assert: france (1*1 + 3*3) / 4 = 2.5; japan has one reply: 7.0
    result = numpy_of(arrays)
    assert sorted(result) == [
        "france/lora_A.weight",
        "france/lora_B.weight",
        "japan/lora_A.weight",
        "japan/lora_B.weight",
    ]
    np.testing.assert_allclose(result["france/lora_A.weight"], np.full((2, 3), 2.5))
    np.testing.assert_allclose(result["france/lora_B.weight"], np.full((3, 2), 2.5))
    np.testing.assert_allclose(result["japan/lora_B.weight"], np.full((3, 2), 7.0))
    assert result["france/lora_A.weight"].dtype == np.float32
    # metrics: france loss (1*2 + 3*4) / 4 = 3.5 over 4 examples
    assert dict(metrics) == pytest.approx(
        {"france/train_loss": 3.5, "france/num-examples": 4.0, "japan/train_loss": 1.0, "japan/num-examples": 5.0}
    )
    # bytes: every message carries one region's A (2x3) and B (3x2) in float32: 48 bytes; 3 sent, 3 received
    assert round_outcome(configured).summary == {"train": dict(metrics), "bytes": {"downlink": 144, "uplink": 144}}


def test_float16_on_the_wire_halves_the_bytes_and_averages_in_float32():
    # Prepare: france starts at 1/3 (not a float16 number); replies come back in float16
    strategy = GroupStrategy(_fedavg, NODE_REGIONS, wire_dtype="float16")
    third = {key: np.full(shape, 1 / 3, dtype=np.float32) for key, shape in SHAPES.items()}
    messages = list(strategy.configure_train(1, merged({"france": third, "japan": state_of(10.0)}), ConfigRecord({}),
                                             ConnectedNodesGrid(NODE_REGIONS)))
    replies = [reply(node, {k: v.astype(np.float16) for k, v in state_of(value).items()}, n, 1.0)
               for node, value, n in ((11, 1.0 / 3, 1), (12, 2.0 / 3, 2), (21, 7.0, 5))]

    # Execute
    arrays, _ = strategy.aggregate_train(1, replies)

    # Assert: sent as float16 (the nearest float16 to 1/3), 24 bytes a message instead of 48
    sent = numpy_of(messages[0].content["arrays"])
    assert {v.dtype for v in sent.values()} == {np.dtype(np.float16)}
    assert sent["lora_A.weight"][0, 0] == np.float16(1 / 3) != np.float32(1 / 3)
    assert round_outcome(strategy).summary["bytes"] == {"downlink": 72, "uplink": 72}
    assert {node: (r["bytes_down"], r["bytes_up"]) for node, r in round_outcome(strategy).sites.items()} == {
        11: (24, 24), 12: (24, 24), 21: (24, 24)}
    # the mean is taken in float32 over the float16 values: (1 x f16(1/3) + 2 x f16(2/3)) / 3
    result = numpy_of(arrays)
    expected = (float(np.float16(1 / 3)) + 2 * float(np.float16(2 / 3))) / 3
    assert result["france/lora_A.weight"].dtype == np.float32
    np.testing.assert_allclose(result["france/lora_A.weight"], np.full((2, 3), expected), rtol=1e-6)


@pytest.mark.parametrize(
    ("bad_state", "reason"),
    [
        ({"lora_A.weight": np.ones((2, 4), np.float32), "lora_B.weight": np.ones((3, 2), np.float32)}, "shape"),
        ({"lora_A.weight": np.full((2, 3), np.nan, np.float32), "lora_B.weight": np.ones((3, 2), np.float32)}, "NaN"),
        ({"lora_A.weight": np.ones((2, 3), np.float32)}, "missing"),
    ],
)
def test_aggregate_train_rejects_and_excludes_a_misfit_reply(configured, caplog, bad_state, reason):
    # Prepare
    replies = [reply(11, state_of(1.0), 1, 2.0), reply(12, bad_state, 100, 9.0), reply(21, state_of(7.0), 5, 1.0)]

    # Execute
    with caplog.at_level(logging.WARNING, logger="strategies.groups"):
        arrays, metrics = configured.aggregate_train(1, replies)

    # Assert: france is node 11 alone, with its metrics alone
    np.testing.assert_array_equal(numpy_of(arrays)["france/lora_A.weight"], np.full((2, 3), 1.0))
    assert metrics["france/train_loss"] == pytest.approx(2.0)
    assert metrics["france/num-examples"] == pytest.approx(1.0)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "rejected the update of node 12 (france)" in warnings[0].getMessage()
    assert reason in warnings[0].getMessage()


def test_aggregate_train_rejects_a_reply_without_examples(configured, caplog):
    # Prepare
    replies = [reply(11, state_of(1.0), 0, 2.0), reply(12, state_of(3.0), 2, 4.0), reply(21, state_of(7.0), 5, 1.0)]

    # Execute
    with caplog.at_level(logging.WARNING, logger="strategies.groups"):
        arrays, _ = configured.aggregate_train(1, replies)

    # Assert
    np.testing.assert_array_equal(numpy_of(arrays)["france/lora_A.weight"], np.full((2, 3), 3.0))
    assert "rejected the update of node 11 (france)" in caplog.text
    assert "num-examples > 0" in caplog.text


def test_group_without_valid_replies_keeps_its_adapter_and_warns(configured, caplog):
    # Prepare: japan's only reply holds NaN, france's two replies fail or are missing
    nan_state = {k: np.full(shape, np.nan, np.float32) for k, shape in SHAPES.items()}
    failed = Message(Error(code=0, reason="out of memory"), reply_to=instruction(11))
    replies = [failed, reply(21, nan_state, 5, 1.0)]

    # Execute
    with caplog.at_level(logging.WARNING, logger="strategies.groups"):
        arrays, metrics = configured.aggregate_train(4, replies)

    # Assert: both regions keep round 1's adapters (france 0.0, japan 10.0), no metrics
    result = numpy_of(arrays)
    np.testing.assert_array_equal(result["france/lora_A.weight"], np.zeros((2, 3)))
    np.testing.assert_array_equal(result["japan/lora_B.weight"], np.full((3, 2), 10.0))
    assert dict(metrics) == {}
    messages = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("node 11 (france) failed: out of memory" in m for m in messages)
    assert any("rejected the update of node 21 (japan)" in m and "NaN" in m for m in messages)
    assert any("group france has no valid update in round 4" in m for m in messages)
    assert any("group japan has no valid update in round 4" in m for m in messages)


def test_a_reply_with_other_metric_keys_is_dropped_not_fatal(configured, caplog):
    # Prepare: node 12 reports no train_loss, its adapter is fine
    odd = Message(
        RecordDict({"arrays": record(state_of(3.0)), "metrics": MetricRecord({"num-examples": 3})}),
        reply_to=instruction(12),
    )
    replies = [reply(11, state_of(1.0), 1, 2.0), odd, reply(21, state_of(7.0), 5, 1.0)]

    # Execute
    with caplog.at_level(logging.WARNING, logger="strategies.groups"):
        arrays, _ = configured.aggregate_train(1, replies)

    # Assert: the round completes; france aggregates what it can
    assert "france/lora_A.weight" in numpy_of(arrays)


def test_aggregate_train_ignores_replies_from_unknown_nodes(configured):
    # Prepare
    replies = [reply(11, state_of(1.0), 1, 2.0), reply(99, state_of(50.0), 1000, 0.0), reply(21, state_of(7.0), 5, 1.0)]

    # Execute
    arrays, metrics = configured.aggregate_train(1, replies)

    # Assert
    np.testing.assert_array_equal(numpy_of(arrays)["france/lora_A.weight"], np.full((2, 3), 1.0))
    assert set(metrics) == {"france/train_loss", "france/num-examples", "japan/train_loss", "japan/num-examples"}


def test_aggregate_evaluate_prefixes_example_weighted_metrics(configured):
    # Prepare
    def eval_reply(node, loss, n):
        return Message(
            RecordDict({"metrics": MetricRecord({"eval_loss": loss, "num-examples": n})}), reply_to=instruction(node)
        )

    failed = Message(Error(code=0, reason="boom"), reply_to=instruction(21))

    # Execute
    metrics = configured.aggregate_evaluate(1, [eval_reply(11, 1.0, 1), eval_reply(12, 3.0, 3), failed])

    # Assert: france (1*1 + 3*3) / 4 = 2.5; japan failed -> no japan keys
    assert dict(metrics) == pytest.approx({"france/eval_loss": 2.5, "france/num-examples": 4.0})
    assert round_outcome(configured).summary["evaluate"] == dict(metrics)


def test_regional_fedavgm_runs_per_region_and_keeps_regions_apart():
    # Prepare: server lr 1, momentum 0 -> FedAvgM's first step equals the plain average
    config = _config(strategy="fedavgm", server_learning_rate=1.0, server_momentum=0.0)
    strategy = GroupStrategy(lambda num_sites: make_strategy(config, num_sites), NODE_REGIONS)
    strategy.configure_train(
        1, merged({"france": state_of(0.0), "japan": state_of(10.0)}), ConfigRecord({}),
        ConnectedNodesGrid(NODE_REGIONS),
    )

    # Execute
    arrays, _ = strategy.aggregate_train(
        1, [reply(11, state_of(2.0), 1, 1.0), reply(12, state_of(4.0), 1, 1.0), reply(21, state_of(12.0), 1, 1.0)]
    )

    # Assert
    result = numpy_of(arrays)
    np.testing.assert_allclose(result["france/lora_A.weight"], np.full((2, 3), 3.0), rtol=1e-6)
    np.testing.assert_allclose(result["japan/lora_A.weight"], np.full((2, 3), 12.0), rtol=1e-6)


# ---- registry --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "cls"),
    [("fedavg", FedAvg), ("fedprox", FedProx), ("fedadam", FedAdam), ("fedyogi", FedYogi), ("fedavgm", FedAvgM)],
)
def test_make_strategy_returns_the_named_flower_strategy(name, cls):
    # Execute
    strategy = make_strategy(_config(TrainConfig(proximal_mu=0.3), strategy=name, fraction_train=0.5), 4)

    # Assert
    assert type(strategy) is cls
    assert strategy.fraction_train == 0.5
    assert (strategy.min_train_nodes, strategy.min_evaluate_nodes, strategy.min_available_nodes) == (1, 1, 1)


def test_make_strategy_passes_the_server_hyperparameters():
    # Execute
    prox = make_strategy(_config(TrainConfig(proximal_mu=0.3), strategy="fedprox"), 3)
    adam = make_strategy(_config(strategy="fedadam", eta=0.05, tau=0.002), 3)
    yogi = make_strategy(_config(strategy="fedyogi", eta=0.03, tau=0.004), 3)
    avgm = make_strategy(_config(strategy="fedavgm", server_learning_rate=0.5, server_momentum=0.7), 3)
    no_eval = make_strategy(_config(fraction_evaluate=0.0), 3)

    # Assert
    assert prox.proximal_mu == pytest.approx(0.3)
    assert (adam.eta, adam.tau) == (0.05, 0.002)
    assert (yogi.eta, yogi.tau) == (0.03, 0.004)
    assert (avgm.server_learning_rate, avgm.server_momentum) == (0.5, 0.7)
    assert no_eval.min_evaluate_nodes == 0


def test_make_strategy_rejects_an_unknown_name():
    # Prepare: a config that skipped validation
    config = _config()
    object.__setattr__(config.federation, "strategy", "fedsgd")

    # Execute / Assert
    with pytest.raises(ValueError, match="unknown strategy 'fedsgd'"):
        make_strategy(config, 3)


# ---- LoRA aggregation options ----------------------------------------------------------------


def _configured_with(lora_aggregation: str, start: dict[str, np.ndarray]) -> GroupStrategy:
    strategy = GroupStrategy(_fedavg, NODE_REGIONS, lora_aggregation=lora_aggregation, rank=2)
    strategy.configure_train(1, merged({"france": start, "japan": start}), ConfigRecord({}),
                             ConnectedNodesGrid(NODE_REGIONS))
    return strategy


def test_ffa_rejects_a_reply_that_changed_lora_a_and_averages_b_exactly(caplog):
    # Prepare: A is the shared initialisation (ones); node 12 trained A as well
    start = {"lora_A.weight": np.ones((2, 3), np.float32), "lora_B.weight": np.zeros((3, 2), np.float32)}
    strategy = _configured_with("ffa", start)
    kept = {"lora_A.weight": start["lora_A.weight"], "lora_B.weight": np.full((3, 2), 2.0, np.float32)}
    moved = {"lora_A.weight": np.full((2, 3), 1.5, np.float32), "lora_B.weight": np.full((3, 2), 9.0, np.float32)}

    # Execute
    with caplog.at_level(logging.WARNING):
        arrays, _ = strategy.aggregate_train(1, [reply(11, kept, 1, 1.0), reply(12, moved, 3, 1.0)])

    # Assert: only node 11 counts; its B·A is the region's B·A exactly
    result = numpy_of(arrays)
    np.testing.assert_array_equal(result["france/lora_A.weight"], start["lora_A.weight"])
    np.testing.assert_array_equal(result["france/lora_B.weight"], kept["lora_B.weight"])
    assert "rejected the update of node 12" in caplog.text and "FFA-LoRA keeps A frozen" in caplog.text


def test_svd_aggregation_is_the_best_rank_r_approximation_of_the_weighted_mean_product():
    # Prepare: two france sites with different A and B (rank 2 each; their mean product has rank 3)
    rng = np.random.default_rng(0)
    sites = [{"lora_A.weight": rng.normal(size=(2, 3)).astype(np.float32),
              "lora_B.weight": rng.normal(size=(3, 2)).astype(np.float32)} for _ in range(2)]
    strategy = _configured_with("svd", state_of(0.0))

    # Execute
    arrays, metrics = strategy.aggregate_train(1, [reply(11, sites[0], 1, 1.0), reply(12, sites[1], 3, 1.0)])

    # Assert: numpy's truncated SVD of (1·B1A1 + 3·B2A2)/4, computed here independently
    mean = sum(w * s["lora_B.weight"].astype(np.float64) @ s["lora_A.weight"] for w, s in zip((1, 3), sites)) / 4
    u, sv, vt = np.linalg.svd(mean)
    best = (u[:, :2] * sv[:2]) @ vt[:2]
    result = numpy_of(arrays)
    np.testing.assert_allclose(result["france/lora_B.weight"] @ result["france/lora_A.weight"], best, atol=1e-5)
    assert metrics["france/svd_residual"] == pytest.approx(sv[2] / np.linalg.norm(sv), rel=1e-4)


def test_svd_needs_a_rank():
    with pytest.raises(ValueError, match="svd with rank >= 1"):
        GroupStrategy(_fedavg, NODE_REGIONS, lora_aggregation="svd")


@pytest.mark.parametrize("count", [float("inf"), float("nan"), -3.0])
def test_a_non_finite_or_negative_example_count_is_rejected_not_averaged(configured, caplog, count):
    # Prepare: node 11 claims inf examples (Flower's weighted mean would compute inf/inf = NaN)
    replies = [reply(11, state_of(1.0), count, 2.0), reply(12, state_of(3.0), 2, 4.0), reply(21, state_of(7.0), 5, 1.0)]
    # Execute
    with caplog.at_level(logging.WARNING, logger="strategies.groups"):
        arrays, metrics = configured.aggregate_train(1, replies)
    # Assert: france is node 12's update alone, finite; the rejection is logged and in the site's record
    np.testing.assert_array_equal(numpy_of(arrays)["france/lora_A.weight"], np.full((2, 3), 3.0))
    assert metrics["france/num-examples"] == 2
    assert "rejected the update of node 11 (france)" in caplog.text and "finite num-examples" in caplog.text
    assert "finite num-examples" in round_outcome(configured).sites[11]["rejected"]
    assert "rejected" not in round_outcome(configured).sites[12]


def test_the_odd_reply_out_is_dropped_even_when_it_comes_first():
    # Prepare: three french nodes; the first reply lacks train_loss, the other two agree
    regions = {11: "france", 12: "france", 13: "france"}
    strategy = GroupStrategy(_fedavg, regions)
    strategy.configure_train(1, merged({"france": state_of(0.0)}), ConfigRecord({}), ConnectedNodesGrid(regions))
    odd = Message(RecordDict({"arrays": record(state_of(9.0)), "metrics": MetricRecord({"num-examples": 3})}),
                  reply_to=instruction(11))
    replies = [odd, reply(12, state_of(1.0), 1, 2.0), reply(13, state_of(3.0), 1, 4.0)]
    # Execute
    arrays, metrics = strategy.aggregate_train(1, replies)
    # Assert: the two agreeing replies are averaged, the first one is the one dropped
    np.testing.assert_array_equal(numpy_of(arrays)["france/lora_A.weight"], np.full((2, 3), 2.0))
    assert metrics["france/train_loss"] == pytest.approx(3.0)
    assert "metric keys differ" in round_outcome(strategy).sites[11]["rejected"]


def test_one_nan_loss_does_not_remove_the_regions_loss(configured):
    replies = [reply(11, state_of(1.0), 1, float("nan")), reply(12, state_of(3.0), 3, 4.0),
               reply(21, state_of(7.0), 5, 1.0)]
    _, metrics = configured.aggregate_train(1, replies)
    assert metrics["france/train_loss"] == pytest.approx(4.0)  # the finite one, weighted by its own examples
    assert metrics["france/num-examples"] == 4


def test_a_group_whose_sites_are_all_gone_sits_out_instead_of_waiting_forever(caplog):
    import threading

    strategy = GroupStrategy(_fedavg, NODE_REGIONS)
    arrays = merged({"france": state_of(0.0), "japan": state_of(10.0)})
    sent: list[Message] = []
    with caplog.at_level(logging.WARNING, logger="strategies.groups"):
        worker = threading.Thread(target=lambda: sent.extend(strategy.configure_train(
            3, arrays, ConfigRecord({}), ConnectedNodesGrid([11, 12]))), daemon=True)  # japan's node 21 is gone
        worker.start()
        worker.join(timeout=10)
    assert not worker.is_alive(), "configure_train waited for a node that will not come"
    assert sorted(msg.metadata.dst_node_id for msg in sent) == [11, 12]
    assert "group japan has no connected site; it sits out round 3" in caplog.text


@pytest.mark.parametrize("name", ["fedadam", "fedyogi", "fedavgm"])
def test_a_restored_server_optimizer_continues_exactly(name):
    def strategy_for() -> GroupStrategy:
        return GroupStrategy(lambda n: make_strategy(_config(strategy=name), n), NODE_REGIONS)

    def one_round(strategy: GroupStrategy, arrays: ArrayRecord, server_round: int) -> ArrayRecord:
        strategy.configure_train(server_round, arrays, ConfigRecord({}), ConnectedNodesGrid(NODE_REGIONS))
        current = numpy_of(arrays)
        replies = [reply(node, {k.split("/", 1)[1]: v + server_round * (node % 7) * 0.1 for k, v in current.items()
                                 if k.startswith(NODE_REGIONS[node] + "/")}, 2, 1.0) for node in NODE_REGIONS]
        new, _ = strategy.aggregate_train(server_round, replies)
        return new

    start = merged({"france": state_of(0.0), "japan": state_of(10.0)})
    whole = strategy_for()
    arrays = start
    for server_round in (1, 2, 3):
        arrays = one_round(whole, arrays, server_round)
    first = strategy_for()
    mid = one_round(first, one_round(first, start, 1), 2)
    saved = first.optimizer_states()
    resumed = strategy_for()
    resumed.restore_optimizer_states(saved)
    cut = one_round(resumed, mid, 3)
    fresh = one_round(strategy_for(), mid, 3)
    assert saved and all(key.split("/")[0] in ("france", "japan") for key in saved)
    for key, value in numpy_of(arrays).items():
        np.testing.assert_allclose(numpy_of(cut)[key], value, rtol=1e-6)
    assert any(not np.allclose(numpy_of(fresh)[k], v) for k, v in numpy_of(arrays).items())  # without it, not


def _configured_strategy(**options) -> GroupStrategy:
    """A GroupStrategy with these options after configure_train of round 1: france at 0.0, japan at 10.0."""
    strategy = GroupStrategy(_fedavg, NODE_REGIONS, **options)
    strategy.configure_train(1, merged({"france": state_of(0.0), "japan": state_of(10.0)}), ConfigRecord({}),
                             ConnectedNodesGrid(NODE_REGIONS))
    return strategy


def test_an_update_beyond_max_update_norm_is_rejected_with_its_norm(caplog):
    strategy = _configured_strategy(max_update_norm=5.0)
    # node 11 moved every one of its 12 numbers by 3 (norm sqrt(12 * 9) = 10.4), node 12 by 1 (norm 3.46)
    replies = [reply(11, state_of(3.0), 1, 2.0), reply(12, state_of(1.0), 1, 4.0), reply(21, state_of(10.5), 1, 1.0)]
    with caplog.at_level(logging.WARNING, logger="strategies.groups"):
        arrays, _ = strategy.aggregate_train(1, replies)
    np.testing.assert_array_equal(numpy_of(arrays)["france/lora_A.weight"], np.full((2, 3), 1.0))
    assert "update norm 10.39 > federation.max_update_norm=5" in round_outcome(strategy).sites[11]["rejected"]
    assert "rejected" not in round_outcome(strategy).sites[12] and "rejected" not in round_outcome(strategy).sites[21]


def test_a_group_below_min_replies_keeps_its_adapter(caplog):
    strategy = _configured_strategy(min_replies=2)
    replies = [reply(11, state_of(1.0), 1, 2.0), reply(12, state_of(3.0), 1, 4.0), reply(21, state_of(7.0), 5, 1.0)]
    with caplog.at_level(logging.WARNING, logger="strategies.groups"):
        arrays, metrics = strategy.aggregate_train(1, replies)
    np.testing.assert_array_equal(numpy_of(arrays)["france/lora_A.weight"], np.full((2, 3), 2.0))  # 2 replies: fine
    np.testing.assert_array_equal(numpy_of(arrays)["japan/lora_A.weight"], np.full((2, 3), 10.0))  # 1 < 2: kept
    assert "group japan got 1 valid replies in round 1, fewer than federation.min_replies=2" in caplog.text
    assert "japan/num-examples" not in metrics


def test_update_norm_is_the_l2_norm_over_every_array():
    from strategies.aggregation import update_norm

    start = {"a": np.zeros((2, 2)), "b": np.ones(3)}
    state = {"a": np.full((2, 2), 3.0), "b": np.ones(3) + 4.0}  # 4 x 3^2 + 3 x 4^2 = 84
    assert update_norm(state, start) == pytest.approx(np.sqrt(84))
    assert update_norm(start, start) == 0.0


def test_a_node_sent_a_message_that_never_replied_gets_a_record_saying_so(configured, caplog):
    # Prepare: configure_train addressed nodes 11, 12 and 21; 12 never answers (timed out)
    # Execute
    with caplog.at_level(logging.WARNING):
        configured.aggregate_train(1, [reply(11, state_of(1.0), 2, 0.5), reply(21, state_of(11.0), 3, 0.5)])

    # Assert: its record says why, with the bytes it was sent and none back
    record = round_outcome(configured).sites[12]
    assert record["error"] == "no reply within federation.timeout"
    assert record["bytes_down"] > 0 and record["bytes_up"] == 0
    assert "node 12 (france) did not reply within federation.timeout in round 1" in caplog.text
    assert "error" not in round_outcome(configured).sites[11]
