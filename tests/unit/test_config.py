"""fed_netgpt/config.py: merge order, validation messages, Flower run_config round trip."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from fed_netgpt.config import (
    CONF_DIR,
    Config,
    ConfigError,
    from_yaml,
    load_config,
    overrides_from_run_config,
    scalar_defaults,
    to_yaml,
)

REPO = Path(__file__).resolve().parents[2]


def _flatten(tree: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def test_load_config_defaults_equal_every_value_of_base_yaml():
    # Prepare
    base = _flatten(OmegaConf.to_container(OmegaConf.load(CONF_DIR / "base.yaml")))

    # Execute
    config = load_config()

    # Assert: every key of base.yaml reaches the typed config with its value
    assert len(base) > 30
    for key, value in base.items():
        actual = config
        for part in key.split("."):
            actual = getattr(actual, part)
        assert actual == value, key


def test_the_typed_config_is_the_one_source_of_defaults_base_yaml_and_pyproject_repeat_it():
    # Prepare: the dataclasses' own defaults, base.yaml (the commented copy users read), pyproject's run_config
    defaults = _flatten(OmegaConf.to_container(OmegaConf.structured(Config)))
    preset = defaults.pop("preset")  # chosen on the command line (or in run_config), never in base.yaml
    base = _flatten(OmegaConf.to_container(OmegaConf.load(CONF_DIR / "base.yaml")))
    with (REPO / "pyproject.toml").open("rb") as f:
        flower = tomllib.load(f)["tool"]["flwr"]["app"]["config"]

    scalars = {key: value for key, value in defaults.items() if isinstance(value, (str, int, float, bool))}
    scalars["preset"] = preset

    # Execute: the first key whose default differs, or that one side lacks
    def first_difference(copy: dict, reference: dict) -> str | None:
        for key in sorted(set(reference) | set(copy)):
            if key not in copy or key not in reference or copy[key] != reference[key]:
                return f"{key}: config.py {reference.get(key, '<missing>')!r}, copy {copy.get(key, '<missing>')!r}"
        return None

    # Assert
    assert first_difference(base, defaults) is None, f"conf/base.yaml differs: {first_difference(base, defaults)}"
    assert first_difference(flower, scalars) is None, (
        f"pyproject.toml [tool.flwr.app.config] differs: {first_difference(flower, scalars)}")


def test_load_config_hand_picked_defaults():
    # Execute
    config = load_config()

    # Assert
    assert isinstance(config, Config)
    assert config.model.name == "smollm2-135m"
    assert config.data.countries == ["FR", "JP", "BR"]
    assert config.data.test_intents == ["taxi", "pharmacy", "museum"]
    assert config.lora.target_modules == ["q_proj", "k_proj", "v_proj", "o_proj"]
    assert config.train.learning_rate == pytest.approx(0.004)
    assert config.federation.strategy == "fedavg"
    assert config.preset == ""


def test_list_overrides_are_applied_with_their_types():
    # Execute
    config = load_config(
        overrides=[
            "federation.num_rounds=5",
            "model.name=tiny-random",
            "train.bf16=false",
            "data.countries=[DE,IT]",
            "train.learning_rate=0.01",
        ]
    )

    # Assert
    assert config.federation.num_rounds == 5
    assert config.model.name == "tiny-random"
    assert config.train.bf16 == "false"  # YAML false, kept as the word
    assert config.data.countries == ["DE", "IT"]
    assert config.train.learning_rate == pytest.approx(0.01)
    assert config.train.batch_size == 4  # untouched keys keep base.yaml's value


def test_mapping_overrides_are_applied():
    # Execute
    config = load_config(
        overrides={
            "train.batch_size": 2,
            "data.region_by": "list",
            "data.regions": {"europe-west": ["Lyon", "Paris, FR"]},
        }
    )

    # Assert
    assert config.train.batch_size == 2
    assert config.data.regions == {"europe-west": ["Lyon", "Paris, FR"]}


def test_preset_smoke_applies_its_yaml_and_later_overrides_win():
    # Prepare
    smoke = _flatten(OmegaConf.to_container(OmegaConf.load(CONF_DIR / "smoke.yaml")))

    # Execute
    config = load_config(overrides=["preset=smoke", "train.batch_size=3"])

    # Assert
    assert config.preset == "smoke"
    assert config.model.name == "tiny-random"
    assert config.data.countries == ["FR", "JP"]
    assert config.train.local_steps == 2
    assert config.train.batch_size == 3  # the override beats smoke.yaml's 4
    assert smoke["train.batch_size"] == 4
    assert config.train.learning_rate == pytest.approx(0.004)  # not in smoke.yaml: base.yaml's value


def test_config_file_sits_between_preset_and_overrides(tmp_path):
    # Prepare
    path = tmp_path / "mine.yaml"
    path.write_text("preset: smoke\ntrain:\n  local_steps: 7\n  batch_size: 5\n")

    # Execute
    config = load_config(path, overrides=["train.batch_size=6"])

    # Assert
    assert config.model.name == "tiny-random"  # preset named in the file applied
    assert config.train.local_steps == 7  # file beats preset
    assert config.train.batch_size == 6  # override beats file


@pytest.mark.parametrize("key", ["train.bogus", "nosuchsection"])
def test_unknown_key_names_the_key(key):
    # Execute / Assert
    with pytest.raises(ConfigError, match="unknown config key") as err:
        load_config(overrides=[f"{key}=1"])
    assert key in str(err.value)


def test_wrong_type_names_the_key():
    # Execute / Assert
    with pytest.raises(ConfigError) as err:
        load_config(overrides=["train.batch_size=abc"])
    assert "train.batch_size" in str(err.value)
    assert "abc" in str(err.value)


def test_bad_choice_names_the_key_and_the_choices():
    # Execute / Assert
    with pytest.raises(ConfigError) as err:
        load_config(overrides=["federation.strategy=x"])
    message = str(err.value)
    assert "federation.strategy" in message and "'x'" in message
    assert "fedavg" in message and "fedyogi" in message


@pytest.mark.parametrize("key", ["train.batch_size", "lora.r", "federation.num_rounds", "train.learning_rate"])
def test_non_positive_values_are_rejected(key):
    # Execute / Assert
    with pytest.raises(ConfigError, match=rf"{key} must be a finite number > 0, got 0"):
        load_config(overrides=[f"{key}=0"])


@pytest.mark.parametrize("key", ["data.num_sites", "data.num_regions", "data.heldout_sites_per_region"])
def test_negative_counts_are_rejected(key):
    # Execute / Assert
    with pytest.raises(ConfigError, match=rf"{key} must be >= 0, got -1"):
        load_config(overrides=[f"{key}=-1"])


def test_num_sites_and_num_regions_default_to_not_set():
    # Execute
    defaults = load_config().data
    config = load_config(overrides=["data.num_sites=1000", "data.num_regions=10"])

    # Assert: 0 means "not set" (sites_per_region and the country list apply)
    assert (defaults.num_sites, defaults.num_regions) == (0, 0)
    assert (config.data.num_sites, config.data.num_regions) == (1000, 10)


def test_fraction_outside_unit_interval_is_rejected():
    # Execute / Assert
    with pytest.raises(ConfigError, match=r"data.test_fraction must be within \[0, 1\], got 1.5"):
        load_config(overrides=["data.test_fraction=1.5"])


def test_fedprox_needs_a_positive_proximal_mu():
    # Execute / Assert
    with pytest.raises(ConfigError, match="train.proximal_mu > 0"):
        load_config(overrides=["federation.strategy=fedprox", "train.proximal_mu=0"])
    config = load_config(overrides=["federation.strategy=fedprox", "train.proximal_mu=0.1"])
    assert config.train.proximal_mu == pytest.approx(0.1)


def test_region_by_list_needs_regions():
    # Execute / Assert
    with pytest.raises(ConfigError, match="data.regions"):
        load_config(overrides=["data.region_by=list"])


def test_unknown_preset_lists_the_known_ones():
    # Execute / Assert
    with pytest.raises(ConfigError, match="no preset named 'nope'; known presets: smoke"):
        load_config(overrides=["preset=nope"])


def test_override_without_equals_sign_is_rejected():
    # Execute / Assert
    with pytest.raises(ConfigError, match="'train.batch_size' is not of the form key=value"):
        load_config(overrides=["train.batch_size"])


def test_overrides_from_run_config_returns_only_changed_keys():
    # Prepare: Flower's run_config holds every key of pyproject.toml; the user changed two
    run_config = dict(scalar_defaults(load_config()))
    run_config["federation.num_rounds"] = 5
    run_config["model.name"] = "tiny-random"

    # Execute
    overrides = overrides_from_run_config(run_config)

    # Assert
    assert overrides == {"federation.num_rounds": 5, "model.name": "tiny-random"}
    assert overrides_from_run_config(scalar_defaults(load_config())) == {}
    assert load_config(overrides=overrides).federation.num_rounds == 5


def test_overrides_from_run_config_lets_a_preset_apply():
    # Prepare
    run_config = {**scalar_defaults(load_config()), "preset": "smoke"}

    # Execute
    config = load_config(overrides=overrides_from_run_config(run_config))

    # Assert: smoke.yaml's values are not masked by base.yaml's values in run_config
    assert config.model.name == "tiny-random"
    assert config.train.batch_size == 4


def test_to_yaml_from_yaml_round_trip_is_equal():
    # Prepare
    config = load_config(
        overrides=["preset=smoke", "data.region_by=list", "data.regions={west: [Lyon]}", "train.proximal_mu=0.5"]
    )

    # Execute
    restored = from_yaml(to_yaml(config))

    # Assert
    assert restored == config
    assert restored.data.regions == {"west": ["Lyon"]}


def test_from_yaml_rejects_unknown_keys():
    # Execute / Assert
    with pytest.raises(ConfigError, match="unknown config key"):
        from_yaml("train:\n  nonsense: 1\n")


def test_scalar_defaults_flattens_only_scalars():
    # Execute
    flat = scalar_defaults(load_config())

    # Assert
    assert flat["train.batch_size"] == 4
    assert flat["preset"] == ""
    assert "lora.target_modules" not in flat  # lists cannot travel in Flower's run_config
    assert "data.regions" not in flat
    assert all(isinstance(v, (str, int, float, bool)) for v in flat.values())


def test_pyproject_flower_config_equals_base_yaml_scalars():
    # Prepare
    with (REPO / "pyproject.toml").open("rb") as f:
        table = tomllib.load(f)["tool"]["flwr"]["app"]["config"]

    # Execute
    expected = scalar_defaults(load_config())

    # Assert: same keys, same values, same types (TOML 1 vs 1.0 would change Flower's parsing)
    assert table == expected
    assert {k: type(v) for k, v in table.items()} == {k: type(v) for k, v in expected.items()}


def test_a_grouped_pass_is_refused_under_client_dp_and_opacus_hooks_and_taken_under_sample_dp():
    with pytest.raises(ConfigError, match="privacy.mode=client_dp needs train.sites_per_pass=1"):
        load_config(overrides=["privacy.mode=client_dp", "privacy.noise_multiplier=1", "train.sites_per_pass=4"])
    config = load_config(overrides=["privacy.mode=sample_dp", "privacy.noise_multiplier=1", "train.sites_per_pass=4"])
    assert config.train.sites_per_pass == 4
    with pytest.raises(ConfigError, match="privacy.engine=opacus needs train.sites_per_pass=1"):
        load_config(overrides=["privacy.mode=sample_dp", "privacy.noise_multiplier=1", "train.sites_per_pass=4",
                               "privacy.engine=opacus"])
    assert load_config(overrides=["privacy.mode=sample_dp", "privacy.noise_multiplier=1",
                                  "privacy.engine=opacus"]).privacy.engine == "opacus"


@pytest.mark.parametrize(("override", "message"), [
    ("train.learning_rate=nan", "train.learning_rate must be a finite number > 0, got nan"),
    ("train.learning_rate=inf", "train.learning_rate must be a finite number > 0, got inf"),
    ("lora.dropout=5", "lora.dropout must be within [0, 1), got 5.0"),
    ("lora.dropout=-1", "lora.dropout must be within [0, 1), got -1.0"),
    ("federation.min_nodes=-2", "federation.min_nodes must be >= 0, got -2"),
    ("evaluation.examples_to_show=-1", "evaluation.examples_to_show must be >= 0, got -1"),
    ("federation.timeout=-1", "federation.timeout must be a finite number > 0, got -1.0"),
    ("federation.discovery_timeout=0", "federation.discovery_timeout must be a finite number > 0, got 0.0"),
    ("simulation.num_cpus_per_client=0", "simulation.num_cpus_per_client must be a finite number > 0, got 0.0"),
    ("serving.max_batch=0", "serving.max_batch must be a finite number > 0, got 0"),
    ("serving.precision=int4", "serving.precision must be one of auto, fp32, int8; got 'int4'"),
    ("federation=5", "override: config key federation is a section; set its keys"),
    ("federation.eta=inf", "federation.eta must be a finite number > 0, got inf"),  # FedAdam's step: NaN adapters
    ("federation.tau=0", "federation.tau must be a finite number > 0, got 0.0"),
    ("federation.server_momentum=1", "federation.server_momentum must be within [0, 1), got 1.0"),
])
def test_values_that_used_to_pass_or_crash_are_named(override, message):
    with pytest.raises(ConfigError) as caught:
        load_config(overrides=[override])
    assert message in str(caught.value)


def test_a_config_file_that_is_a_list_is_named(tmp_path):
    path = tmp_path / "list.yaml"
    path.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="list.yaml: a config must be a mapping of sections"):
        load_config(path)
