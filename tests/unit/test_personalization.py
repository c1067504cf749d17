"""fed_netgpt/training/personalization.py: Ditto's personal adapter on the tiny random model."""

from __future__ import annotations

import json

import numpy as np
import pytest

from fed_netgpt.config import load_config
from fed_netgpt.evaluation.scoring import completion_loss
from fed_netgpt.model.adapters import attach_adapter, get_state, load_adapter, read_adapter, set_state
from fed_netgpt.run.folder import is_adapter
from fed_netgpt.training.engine import SiteJob, TrainResult
from fed_netgpt.training.personalization import RUN_MARK, train_personal_adapters
from tests.states import assert_same_state, l2_distance

# fp32 (exact and reproducible), small batches, a rate that moves the tiny model in a few steps.
FAST = ["model.name=tiny-random", "train.bf16=false", "train.batch_size=4", "train.learning_rate=0.01",
        "personalization.steps=3"]




def train_personal_adapter(base, config, pairs, regional, folder, run_id: str, seed: int) -> TrainResult:
    """One site's personal pass, as a node runs it after the site's federated update."""
    (result,) = train_personal_adapters(base, config, [SiteJob("paris", pairs, regional, seed=seed)], [folder], run_id)
    return result


@pytest.fixture
def regional(tiny_base, default_config, adapter_name) -> dict[str, np.ndarray]:
    """A regional adapter state as the server would send it: the fresh adapter moved off its start (B != 0)."""
    start = get_state(attach_adapter(tiny_base, adapter_name, default_config.lora), adapter_name)
    rng = np.random.default_rng(3)
    return {k: (v + rng.normal(0.0, 0.05, v.shape)).astype(np.float32) for k, v in start.items()}


@pytest.fixture
def site_pairs(paris_train_pairs):
    return paris_train_pairs[:8]


def test_publishes_a_peft_adapter_and_the_run_mark(tiny_base, regional, site_pairs, tmp_path):
    # Prepare
    config = load_config(overrides=FAST)
    folder = tmp_path / "site_adapters" / "paris"

    # Execute
    result = train_personal_adapter(tiny_base, config, site_pairs, regional, folder, "run-1", seed=0)

    # Assert
    assert is_adapter(folder)
    assert json.loads((folder / RUN_MARK).read_text()) == {"run_id": "run-1"}
    adapter_config, saved = read_adapter(folder)
    assert adapter_config["r"] == 8 and adapter_config["peft_type"] == "LORA"
    assert_same_state(saved, result.state)
    assert l2_distance(regional, result.state) > 0  # it trained
    assert result.num_examples == 8
    assert result.metrics["steps"] == 3.0  # personalization.steps, not train.local_steps (4)
    assert sorted(p.name for p in folder.parent.iterdir()) == ["paris"]  # no staging folder left behind


def test_a_large_ditto_lambda_keeps_the_personal_adapter_near_the_regional(tiny_base, regional, site_pairs,
                                                                           tmp_path):
    # Prepare
    distances = {}

    # Execute: same seed, same data; only lambda differs
    for lam in (0.0, 100.0):
        config = load_config(overrides=[*FAST, "personalization.steps=6", f"personalization.ditto_lambda={lam}"])
        result = train_personal_adapter(tiny_base, config, site_pairs, regional, tmp_path / f"l{lam:g}", "r", seed=0)
        distances[lam] = l2_distance(regional, result.state)

    # Assert (measured: 2.80 free, 0.31 pulled)
    assert 0 < distances[100.0] < 0.3 * distances[0.0]


def test_same_run_continues_from_its_adapter_another_run_restarts_from_the_regional(
    tiny_base, regional, site_pairs, tmp_path
):
    # Prepare
    config = load_config(overrides=FAST)
    folder = tmp_path / "paris"
    fresh = train_personal_adapter(tiny_base, config, site_pairs, regional, tmp_path / "fresh", "run-1", seed=0)
    first = train_personal_adapter(tiny_base, config, site_pairs, regional, folder, "run-1", seed=0)

    # Execute
    continued = train_personal_adapter(tiny_base, config, site_pairs, regional, folder, "run-1", seed=0)
    other_run = train_personal_adapter(tiny_base, config, site_pairs, regional, folder, "run-2", seed=0)
    (folder / RUN_MARK).write_text("not json")
    unreadable_mark = train_personal_adapter(tiny_base, config, site_pairs, regional, folder, "run-2", seed=0)

    # Assert: a first call is reproducible; the second of the same run started from the first's result
    assert_same_state(first.state, fresh.state)
    assert l2_distance(continued.state, fresh.state) > 1e-3
    assert_same_state(other_run.state, fresh.state)  # a stale adapter of another run is not inherited
    assert_same_state(unreadable_mark.state, fresh.state)
    assert json.loads((folder / RUN_MARK).read_text()) == {"run_id": "run-2"}


def test_loss_on_the_sites_pairs_falls_over_rounds(tiny_base, regional, site_pairs, tmp_path, adapter_name):
    # Prepare
    config = load_config(overrides=FAST)
    folder = tmp_path / "paris"
    model = attach_adapter(tiny_base, adapter_name + "_check", config.lora)
    set_state(model, adapter_name + "_check", regional)
    losses = [completion_loss(model, tiny_base.tokenizer, site_pairs)]

    # Execute: 3 rounds of the same run, each loss measured on the published adapter
    for server_round in range(3):
        train_personal_adapter(tiny_base, config, site_pairs, regional, folder, "run-1", seed=server_round)
        model = load_adapter(tiny_base, adapter_name + "_check", folder)
        losses.append(completion_loss(model, tiny_base.tokenizer, site_pairs))

    # Assert (measured with lambda 0.1: 10.799, 10.616, 10.566, 10.565)
    assert all(later < earlier for earlier, later in zip(losses, losses[1:])), losses
    assert losses[-1] < losses[0] - 0.1
