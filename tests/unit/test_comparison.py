"""fed_netgpt/comparison.py: which runs a comparison trains, their configs, and the mean over seeds."""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import pytest

from fed_netgpt.comparison import RUNS, SOURCES, mean_over_seeds, run_config, runs_for
from fed_netgpt.config import VARIANTS, load_config

# ---- runs_for --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("variants", "runs"),
    [
        (["base"], []),
        (["regional", "personalized"], ["regional"]),
        (["personalized", "base", "regional"], ["regional"]),
        (["global_city", "global"], ["global_city", "global"]),
        (list(VARIANTS), ["local", "global", "global_city", "regional", "regional_ffa", "regional_svd"]),
    ],
)
def test_runs_for_trains_each_run_once(variants, runs):
    # Execute / Assert
    assert runs_for(variants) == runs


def test_every_compare_variant_but_base_has_a_source_run_that_serves_it():
    # Execute / Assert
    assert set(SOURCES) == set(VARIANTS) - {"base"}
    for variant, (run, served) in SOURCES.items():
        assert served in RUNS[run][1], variant


# ---- run_config ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def user_config(tmp_path_factory):
    """What a user runs compare with: a resume and report flag the runs must not inherit."""
    out = tmp_path_factory.mktemp("compare")
    return load_config(overrides=[f"run.output_dir={out}", "run.resume=true", "run.report=true", "run.seed=9",
                                  "train.seed=9", "data.seed=4", "federation.num_rounds=5", "lora.r=4"])


@pytest.mark.parametrize("seed", [0, 2])
def test_run_config_puts_each_run_in_its_folder_with_its_seed(user_config, seed):
    # Execute
    config = run_config(user_config, "regional", seed)

    # Assert
    assert config.run.output_dir == str(Path(user_config.run.output_dir) / "runs" / f"regional-seed{seed}")
    assert config.run.seed == seed
    assert config.train.seed == seed
    assert config.data.seed == 4  # the data stays fixed across seeds
    assert config.run.resume is False
    assert config.run.report is False
    assert config.federation.num_rounds == 5 and config.lora.r == 4  # everything else as the user set it
    # the same run whatever surrounds it: more seeds or other variants leave its config (and resume) unchanged
    grown = replace(user_config, compare=replace(user_config.compare, seeds=7, variants=["base", "regional"]))
    assert run_config(grown, "regional", seed) == config


@pytest.mark.parametrize(
    ("run", "adapters", "aggregation", "method", "context"),
    [
        ("local", "local", "factors", "none", "none"),
        ("global", "global", "factors", "none", "none"),
        ("global_city", "global", "factors", "none", "city"),
        ("regional", "regional", "factors", "ditto", "none"),
        ("regional_ffa", "regional", "ffa", "none", "none"),
        ("regional_svd", "regional", "svd", "none", "none"),
    ],
)
def test_run_config_applies_each_runs_overrides(user_config, run, adapters, aggregation, method, context):
    # Execute
    config = run_config(user_config, run, 1)

    # Assert
    assert config.federation.adapters == adapters
    assert config.federation.lora_aggregation == aggregation
    assert config.personalization.method == method
    assert config.data.context == context
    assert config.run.output_dir.endswith(f"runs/{run}-seed1")


# ---- mean_over_seeds -------------------------------------------------------------------------------


def _result(accuracy, loss, worst, france, examples):
    return {"fact_accuracy": accuracy, "loss": loss, "worst_site_fact_accuracy": worst, "num_examples": 9,
            "regions": {"france": {"fact_accuracy": france}}, "examples": examples,
            "heldout_sites": {"fact_accuracy": accuracy / 2}}


def test_mean_over_seeds_averages_numbers_and_nested_dicts():
    # Prepare: three seeds; worst_site_fact_accuracy is nan in the second
    results = [
        _result(0.5, 2.0, 0.2, 0.1, [{"completion": "first"}]),
        _result(0.7, 3.0, math.nan, 0.3, [{"completion": "second"}]),
        _result(0.9, 4.0, 0.4, 0.8, [{"completion": "third"}]),
    ]

    # Execute
    merged = mean_over_seeds(results)

    # Assert: means; sample std (n - 1); nan left out of both
    assert merged["fact_accuracy"] == pytest.approx(0.7)
    assert merged["loss"] == pytest.approx(3.0)
    assert merged["worst_site_fact_accuracy"] == pytest.approx(0.3)
    assert merged["num_examples"] == 9
    assert merged["regions"]["france"]["fact_accuracy"] == pytest.approx(0.4)
    assert merged["heldout_sites"]["fact_accuracy"] == pytest.approx(0.35)
    assert merged["examples"] == [{"completion": "first"}]
    assert merged["seeds"] == 3
    assert merged["std"]["fact_accuracy"] == pytest.approx(0.2)  # sqrt((0.04 + 0 + 0.04) / 2)
    assert merged["std"]["loss"] == pytest.approx(1.0)
    assert merged["std"]["worst_site_fact_accuracy"] == pytest.approx(math.sqrt(0.02))  # 0.2, 0.4: sqrt(0.02 / 1)
    assert merged["std"]["num_examples"] == 0.0
    assert set(merged["std"]) == {"fact_accuracy", "loss", "worst_site_fact_accuracy", "num_examples"}


def test_mean_over_seeds_of_one_seed_has_no_std_and_all_nan_stays_nan():
    # Prepare
    one = _result(0.5, 2.0, math.nan, 0.1, [])
    two_nan = [_result(0.5, 2.0, math.nan, 0.1, []), _result(0.5, 2.0, math.nan, 0.1, [])]

    # Execute
    single = mean_over_seeds([one])
    both = mean_over_seeds(two_nan)

    # Assert
    assert "std" not in single
    assert single["seeds"] == 1
    assert single["fact_accuracy"] == 0.5
    assert math.isnan(single["worst_site_fact_accuracy"])
    assert math.isnan(both["worst_site_fact_accuracy"])
    assert math.isnan(both["std"]["worst_site_fact_accuracy"])
    assert both["std"]["fact_accuracy"] == 0.0


def test_mean_over_seeds_keeps_the_first_seeds_value_of_a_key_missing_elsewhere():
    # Prepare: only the first seed has held-out sites
    first = {"fact_accuracy": 0.2, "heldout_sites": {"fact_accuracy": 0.6}}
    second = {"fact_accuracy": 0.4}

    # Execute
    merged = mean_over_seeds([first, second])

    # Assert
    assert merged["fact_accuracy"] == pytest.approx(0.3)
    assert merged["heldout_sites"] == {"fact_accuracy": 0.6}
