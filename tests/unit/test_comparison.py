"""fed_netgpt/evaluation/comparison.py: which runs a comparison trains, their configs, and the mean over seeds."""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import pytest

from fed_netgpt.config import DEFAULT_VARIANTS, VARIANTS, CompareConfig, ConfigError, load_config
from fed_netgpt.evaluation.comparison import RUNS, SOURCES, Job, jobs_for, mean_over_seeds, privacy_utility, run_config

# ---- jobs_for --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("variants", "runs"),
    [
        (["base"], []),
        (["regional", "personalized"], ["regional"]),
        (["personalized", "base", "regional"], ["regional"]),
        (["global_city", "global"], ["global_city", "global"]),
        (list(DEFAULT_VARIANTS), ["local", "global", "global_city", "regional", "regional_ffa", "regional_svd"]),
    ],
)
def test_jobs_for_trains_each_run_once(variants, runs):
    # Execute
    jobs = jobs_for(CompareConfig(variants=variants))

    # Assert
    assert [job.name for job in jobs] == runs
    assert all(job.epsilon == math.inf for job in jobs)


def test_jobs_for_trains_dp_variants_once_per_epsilon_sharing_runs():
    # Prepare: regional and personalized come from one run; at inf the DP variants are the non-private run
    compare = CompareConfig(variants=["base", "regional", "regional_dp", "personalized_dp", "local_dp"],
                            epsilons=[math.inf, 8.0, 0.5])

    # Execute
    jobs = jobs_for(compare)

    # Assert
    assert [job.name for job in jobs] == ["regional", "regional-eps8", "regional-eps0.5", "local", "local-eps8",
                                          "local-eps0.5"]
    assert jobs[0].served == (("regional", "regional"), ("regional_dp@inf", "regional"),
                              ("personalized_dp@inf", "personalized"))
    assert jobs[1] == Job("regional", 8.0, (("regional_dp@8", "regional"), ("personalized_dp@8", "personalized")))
    assert jobs[5].served == (("local_dp@0.5", "local"),)


def test_every_compare_variant_but_base_has_a_source_run_that_serves_it():
    # Execute / Assert
    assert set(SOURCES) == set(DEFAULT_VARIANTS) - {"base"}
    for variant, (run, served) in SOURCES.items():
        assert served in RUNS[run][1], variant
    assert all(v in jobs_for(CompareConfig(variants=[v]))[0].served[0][0] for v in VARIANTS if v != "base")


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["compare.epsilons=[8,0]"], "compare.epsilons must be > 0"),
        (["compare.epsilons=[8,8]"], "names an epsilon twice"),
        (["compare.variants=[regional_dp]", "privacy.mode=sample_dp", "privacy.noise_multiplier=1"],
         "leave privacy.mode=none"),
        (["compare.variants=[regional_private]"], "compare.variants must be one of"),
    ],
)
def test_compare_config_refuses(overrides, message):
    # Execute / Assert
    with pytest.raises(ConfigError, match=message):
        load_config(overrides=overrides)


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
    assert config.privacy.mode == "none"


def test_run_config_at_a_finite_epsilon_trains_under_dp_sgd_in_its_own_folder(user_config):
    # Execute
    config = run_config(user_config, "regional", 1, epsilon=4.0)

    # Assert: the noise is derived from the target; everything else as the non-private run
    assert config.privacy.mode == "sample_dp"
    assert config.privacy.target_epsilon == 4.0 and config.privacy.noise_multiplier == 0.0
    assert config.run.output_dir.endswith("runs/regional-eps4-seed1")
    plain = run_config(user_config, "regional", 1)
    assert replace(config, privacy=plain.privacy, run=plain.run) == plain


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


def test_privacy_utility_rows_per_dp_variant_in_epsilon_order():
    # Prepare
    variants = {"base": {"fact_accuracy": 0.0}, "regional": {"fact_accuracy": 0.9},
                "regional_dp@inf": {"fact_accuracy": 0.9}, "regional_dp@8": {"fact_accuracy": 0.5},
                "regional_dp@1": {"fact_accuracy": 0.1}, "local_dp@8": {"fact_accuracy": 0.2}}

    # Execute
    table = privacy_utility(variants, [math.inf, 8.0, 4.0, 1.0])

    # Assert: a missing epsilon is left out, the plain variants are not rows
    assert list(table) == ["local_dp", "regional_dp"]
    assert list(table["regional_dp"]) == ["inf", "8", "1"]
    assert table["regional_dp"]["8"]["fact_accuracy"] == 0.5
    assert table["local_dp"] == {"8": {"fact_accuracy": 0.2}}
