"""fed_netgpt/run/folder.py: which adapter serves a site, aggregation groups, and the run folder's lifecycle."""

from __future__ import annotations

import json
import re
import shutil

import numpy as np
import pytest
from safetensors.numpy import save_file

from fed_netgpt.config import load_config
from fed_netgpt.model.adapters import attach_adapter, save_adapter
from fed_netgpt.run.folder import (
    OWNED,
    RunFolderError,
    adapter_dir,
    aggregation_group,
    check_folder_is_ours,
    checkpoint_sampling,
    federated_variant,
    is_adapter,
    latest_checkpoint,
    read_run_config,
    restore_metrics,
    round_summaries,
    run_finished,
    run_lock,
    run_regions,
    save_checkpoint,
    serving_adapter,
    site_adapter_dir,
    site_records,
    start_run,
)


@pytest.fixture
def save_into(tiny_base, default_config, adapter_name):
    """Saves a real peft adapter (the tiny model's, fresh) into each folder it is given."""
    model = attach_adapter(tiny_base, adapter_name, default_config.lora)

    def save(*folders):
        for folder in folders:
            save_adapter(model, adapter_name, folder)

    return save


def _config(*overrides: str):
    return load_config(overrides=list(overrides))


# ---- serving_adapter -------------------------------------------------------------------------------


@pytest.fixture
def regional_run(tmp_path, save_into):
    """A regional run: adapters for france and japan (none for brazil), a personal adapter at paris."""
    folder = tmp_path / "run"
    save_into(folder / "adapters" / "france", folder / "adapters" / "japan", folder / "site_adapters" / "paris")
    return folder


def test_personalized_serves_the_site_adapter_first_then_the_region(regional_run):
    # Prepare
    config = _config()

    # Execute
    paris = serving_adapter(regional_run, config, "france", "paris", "personalized")
    lyon = serving_adapter(regional_run, config, "france", "lyon", "personalized")
    default_variant = serving_adapter(regional_run, config, "france", "paris")
    no_site = serving_adapter(regional_run, config, "japan")

    # Assert
    assert paris == regional_run / "site_adapters" / "paris"
    assert lyon == regional_run / "adapters" / "france"
    assert default_variant == paris  # personalized is the default (what serving uses)
    assert no_site == regional_run / "adapters" / "japan"


def test_regional_variant_ignores_site_adapters_and_base_serves_nothing(regional_run):
    # Prepare
    config = _config()

    # Execute / Assert
    assert serving_adapter(regional_run, config, "france", "paris", "regional") == regional_run / "adapters" / "france"
    assert serving_adapter(regional_run, config, "japan", "tokyo", "regional") == regional_run / "adapters" / "japan"
    assert serving_adapter(regional_run, config, "france", "paris", "base") is None
    assert serving_adapter(regional_run, config, "brazil", "salvador", "base") is None  # no adapter needed


def test_a_region_without_adapter_names_the_path_and_the_known_adapters(regional_run):
    # Prepare: an unfinished adapter (config only) is neither served nor listed
    config = _config()
    (regional_run / "adapters" / "brazil").mkdir()
    (regional_run / "adapters" / "brazil" / "adapter_config.json").write_text("{}")
    expected = (f"region 'brazil' has no adapter {regional_run / 'adapters' / 'brazil'}; "
                "adapters in the run: france, japan")

    # Execute / Assert
    for variant in ("personalized", "regional"):
        with pytest.raises(RunFolderError, match=re.escape(expected)):
            serving_adapter(regional_run, config, "brazil", "salvador", variant)


def test_a_run_without_adapters_says_none(tmp_path):
    # Execute / Assert
    with pytest.raises(RunFolderError, match=re.escape("adapters in the run: none")):
        serving_adapter(tmp_path, _config(), "france", "paris", "regional")


def test_global_run_serves_the_global_adapter_to_every_region(tmp_path, save_into):
    # Prepare
    folder = tmp_path / "run"
    save_into(folder / "adapters" / "global", folder / "site_adapters" / "paris")
    config = _config("federation.adapters=global")

    # Execute / Assert
    assert serving_adapter(folder, config, "brazil", "salvador", "global") == folder / "adapters" / "global"
    assert serving_adapter(folder, config, "france", "paris", "global") == folder / "adapters" / "global"
    assert serving_adapter(folder, config, "france", "paris", "personalized") == folder / "site_adapters" / "paris"
    assert serving_adapter(folder, config, "japan", "tokyo", "personalized") == folder / "adapters" / "global"


def test_local_run_serves_the_sites_own_adapter_or_the_base(tmp_path, save_into):
    # Prepare: only site adapters exist in a local run
    folder = tmp_path / "run"
    save_into(folder / "site_adapters" / "paris", folder / "site_adapters" / "tokyo")
    config = _config("federation.adapters=local")

    # Execute / Assert
    assert serving_adapter(folder, config, "france", "paris", "local") == folder / "site_adapters" / "paris"
    assert serving_adapter(folder, config, "japan", "tokyo", "local") == folder / "site_adapters" / "tokyo"
    assert serving_adapter(folder, config, "france", "paris", "personalized") == folder / "site_adapters" / "paris"
    assert serving_adapter(folder, config, "france", "toulouse", "local") is None  # never trained: the base
    assert serving_adapter(folder, config, "brazil", "salvador", "personalized") is None
    assert serving_adapter(folder, config, "france", "paris", "base") is None


def test_adapter_folders_and_run_regions(tmp_path, save_into):
    # Prepare
    save_into(tmp_path / "adapters" / "japan", tmp_path / "adapters" / "france")
    (tmp_path / "adapters" / "empty").mkdir()

    # Execute / Assert
    assert adapter_dir(tmp_path, "france") == tmp_path / "adapters" / "france"
    assert site_adapter_dir(tmp_path, "paris") == tmp_path / "site_adapters" / "paris"
    assert run_regions(tmp_path) == ["france", "japan"]
    assert run_regions(tmp_path / "missing") == []
    assert is_adapter(tmp_path / "adapters" / "france")
    assert not is_adapter(tmp_path / "adapters" / "empty")


# ---- aggregation_group / federated_variant ---------------------------------------------------------


@pytest.mark.parametrize(
    ("adapters", "group"), [("regional", "france"), ("global", "global"), ("local", "paris")],
)
def test_aggregation_group_and_federated_variant(adapters, group):
    # Prepare
    config = _config(f"federation.adapters={adapters}")

    # Execute / Assert
    assert aggregation_group(config, "paris", "france") == group
    assert federated_variant(config) == adapters


# ---- start_run -------------------------------------------------------------------------------------


def _leave_earlier_run(folder):
    """What a run leaves behind: adapters, site adapters, checkpoints and metrics."""
    for name in OWNED:
        (folder / name / "x").mkdir(parents=True)
        (folder / name / "x" / "file").write_text("old")
    (folder / "metrics.jsonl").write_text('{"round": 1}\n')


def test_start_run_creates_the_folder_with_an_id_and_the_config(tmp_path):
    # Prepare
    config = _config(f"run.output_dir={tmp_path / 'run'}", "federation.num_rounds=7")

    # Execute
    folder, run_id = start_run(config)

    # Assert
    assert folder == tmp_path / "run"
    assert re.fullmatch(r"[0-9a-f]{32}", run_id)
    assert json.loads((folder / "run.json").read_text()) == {"run_id": run_id}
    assert read_run_config(folder) == config
    assert (folder / "metrics.jsonl").read_text() == ""


def test_a_fresh_run_clears_what_an_earlier_run_left(tmp_path):
    # Prepare
    config = _config(f"run.output_dir={tmp_path}")
    _, first_id = start_run(config)
    _leave_earlier_run(tmp_path)

    # Execute
    _, second_id = start_run(config)

    # Assert
    assert second_id != first_id
    assert json.loads((tmp_path / "run.json").read_text()) == {"run_id": second_id}
    for name in OWNED:
        assert not (tmp_path / name).exists(), name
    assert (tmp_path / "metrics.jsonl").read_text() == ""


def test_a_resumed_run_keeps_its_adapters_checkpoints_metrics_and_id(tmp_path):
    # Prepare
    _, first_id = start_run(_config(f"run.output_dir={tmp_path}"))
    _leave_earlier_run(tmp_path)
    save_checkpoint(tmp_path, 1, {"france/a": np.zeros(2)}, rows=[{"round": 1}])
    resumed = _config(f"run.output_dir={tmp_path}", "run.resume=true")

    # Execute
    folder, second_id = start_run(resumed)

    # Assert
    assert second_id == first_id
    for name in OWNED:
        assert (folder / name / "x" / "file").read_text() == "old", name
    assert (folder / "metrics.jsonl").read_text() == '{"round": 1}\n'
    assert read_run_config(folder).run.resume is True


def test_resume_without_run_json_starts_fresh(tmp_path):
    # Prepare: leftovers but no run.json: nothing to resume
    _leave_earlier_run(tmp_path)

    # Execute
    _, run_id = start_run(_config(f"run.output_dir={tmp_path}", "run.resume=true"))

    # Assert
    assert json.loads((tmp_path / "run.json").read_text()) == {"run_id": run_id}
    for name in OWNED:
        assert not (tmp_path / name).exists(), name
    assert (tmp_path / "metrics.jsonl").read_text() == ""


def _metrics(folder, *rows, tail=""):
    (folder / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows) + tail)


ROUND_1 = [{"round": 1, "seconds": 1.0}, {"round": 1, "site_id": "paris", "dp_steps": 6}]
ROUND_2 = [{"round": 2, "seconds": 2.0}, {"round": 2, "site_id": "paris", "dp_steps": 12}]


@pytest.mark.parametrize(("logged", "tail"), [
    ([*ROUND_1], ""),  # killed after the checkpoint was renamed, before its rows were appended
    ([*ROUND_1, ROUND_2[0]], '{"round": 2, "site_id": "pa'),  # killed while appending them
    ([*ROUND_1, *ROUND_2, {"round": 3, "seconds": 3.0}], ""),  # a round logged but never checkpointed
])
def test_restore_metrics_leaves_rounds_up_to_the_checkpoint_exactly_once(tmp_path, logged, tail):
    # Prepare: rounds 1 and 2 checkpointed with their rows
    for done, rows in ((1, ROUND_1), (2, ROUND_2)):
        save_checkpoint(tmp_path, done, {"france/a": np.zeros(2)}, rows=rows)
    _metrics(tmp_path, *logged, tail=tail)

    # Execute
    restore_metrics(tmp_path, 2)

    # Assert: what an uninterrupted run logged up to round 2; the sites' DP steps of round 2 are counted
    assert [row["round"] for row in round_summaries(tmp_path)] == [1, 2]
    assert [row["dp_steps"] for row in site_records(tmp_path)] == [6, 12]


def test_a_resume_without_a_checkpoint_keeps_no_round(tmp_path):
    _metrics(tmp_path, *ROUND_1)
    restore_metrics(tmp_path, 0)
    assert (tmp_path / "metrics.jsonl").read_text() == ""


@pytest.mark.parametrize(("damage", "message"), [
    (lambda path: path.write_bytes(path.read_bytes()[:40]), "not a readable safetensors file"),
    (lambda path: save_file({"france/a": np.array([np.nan])}, str(path)), "'france/a' holds NaN or inf"),
])
def test_a_damaged_checkpoint_says_which_file_and_how_to_fall_back(tmp_path, damage, message):
    save_checkpoint(tmp_path, 1, {"france/a": np.zeros(2)})
    saved = save_checkpoint(tmp_path, 2, {"france/a": np.ones(2)})
    damage(saved / "adapters.safetensors")
    with pytest.raises(RunFolderError, match=f"round-2/adapters.safetensors: .*{message}.*remove .*round-2 to "
                                             "resume from the round before it"):
        latest_checkpoint(tmp_path)
    shutil.rmtree(saved)
    assert latest_checkpoint(tmp_path)[0] == 1


def test_the_site_sampling_state_survives_a_checkpoint(tmp_path):
    import random

    generator = random.Random(7)
    generator.random()
    save_checkpoint(tmp_path, 1, {"france/a": np.zeros(2)}, sampling=generator.getstate())
    expected = [generator.random() for _ in range(3)]
    restored = random.Random()
    restored.setstate(checkpoint_sampling(tmp_path, 1))
    assert [restored.random() for _ in range(3)] == expected
    save_checkpoint(tmp_path, 2, {"france/a": np.zeros(2)})
    assert checkpoint_sampling(tmp_path, 2) is None


def test_a_damaged_line_inside_metrics_names_the_file_and_line(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"round": 1}\n{"round": \n{"round": 2}\n')
    with pytest.raises(RunFolderError, match=r"metrics.jsonl:2: not a JSON object"):
        round_summaries(tmp_path)


def test_read_run_config_of_a_folder_without_config(tmp_path):
    # Execute / Assert
    with pytest.raises(RunFolderError, match="config.yaml is missing"):
        read_run_config(tmp_path)


def test_run_finished_needs_the_same_config_and_its_last_round(tmp_path):
    # Prepare: a run of 2 rounds that recorded round 1 and a per-site record of round 2
    config = _config(f"run.output_dir={tmp_path}", "federation.num_rounds=2")
    start_run(config)
    (tmp_path / "metrics.jsonl").write_text('{"round": 1, "seconds": 3.0}\n{"round": 2, "site_id": "lyon"}\n')

    # Execute / Assert
    assert round_summaries(tmp_path) == [{"round": 1, "seconds": 3.0}]
    assert not run_finished(tmp_path, config)  # stopped before its last round's summary
    with (tmp_path / "metrics.jsonl").open("a") as out:
        out.write('{"round": 2, "seconds": 6.0}\n')
    assert run_finished(tmp_path, config)
    assert not run_finished(tmp_path, _config(f"run.output_dir={tmp_path}", "federation.num_rounds=3"))
    assert not run_finished(tmp_path, _config(f"run.output_dir={tmp_path}", "federation.num_rounds=2",
                                              "train.seed=5"))  # another config: not this run
    assert not run_finished(tmp_path / "missing", config)


def test_crashes_are_reproducible_and_as_frequent_as_asked():
    from fed_netgpt.run.faults import crashes

    draws = [crashes(0.3, 0, r, f"site-{k}") for r in range(1, 51) for k in range(200)]
    assert abs(sum(draws) / len(draws) - 0.3) < 0.01
    assert draws == [crashes(0.3, 0, r, f"site-{k}") for r in range(1, 51) for k in range(200)]
    assert draws != [crashes(0.3, 1, r, f"site-{k}") for r in range(1, 51) for k in range(200)]  # the seed matters
    assert not any(crashes(0.0, 0, 1, f"site-{k}") for k in range(100))
    assert all(crashes(1.0, 0, 1, f"site-{k}") for k in range(100))


def test_short_reason_is_the_raised_line_of_a_traceback():
    from fed_netgpt.run.folder import short_reason

    ray = ("<class 'ray.exceptions.RayTaskError(ClientAppException)'>:<'ray::ClientAppActor.run() (pid=1)\n"
           "  File \"x.py\", line 3, in f\n    raise InjectedCrash(...)\n"
           "fed_netgpt.run.faults.InjectedCrash: injected crash of site lyon in round 2\n")
    assert short_reason(ray) == "InjectedCrash: injected crash of site lyon in round 2"
    assert short_reason("out of memory\nmore") == "out of memory"
    assert short_reason("ValueError: x" + "y" * 500) == "ValueError: x" + "y" * 147


def test_a_run_folder_records_its_manifest(tmp_path):
    from fed_netgpt.config import load_config
    from fed_netgpt.run.folder import start_run

    config = load_config(overrides=[f"run.output_dir={tmp_path / 'run'}", "train.device=cpu", "train.bf16=false"])
    folder, _ = start_run(config)
    saved = json.loads((folder / "manifest.json").read_text())
    assert saved["packages"]["torch"] and saved["packages"]["flwr"] == "1.42.0"
    assert saved["cpu"]["cores"] >= 1 and isinstance(saved["cpu"]["features"], list)
    assert (saved["device"], saved["bf16"]) == ("cpu", "false")


def test_a_run_may_write_into_a_new_or_empty_folder_or_one_fed_netgpt_wrote(tmp_path):
    check_folder_is_ours(tmp_path / "new")
    check_folder_is_ours(tmp_path)  # empty
    earlier = tmp_path / "earlier"
    start_run(_config(f"run.output_dir={earlier}"))  # a run (run.json)
    (earlier / "notes.txt").write_text("the user's own note beside a run")
    check_folder_is_ours(earlier)
    compared = tmp_path / "compared"
    with run_lock(compared):  # a comparison's folder: only the lock marks it
        (compared / "report.json").write_text("{}")
    check_folder_is_ours(compared)


def test_a_folder_of_other_files_is_not_a_run_folder(tmp_path):
    (tmp_path / "adapters").mkdir()
    (tmp_path / ".lock").write_text("someone else's lock")
    with pytest.raises(RunFolderError, match=r"holds files no fed-netgpt run wrote \(\.lock, adapters/\)"):
        check_folder_is_ours(tmp_path)
    with pytest.raises(RunFolderError, match="holds files no fed-netgpt run wrote"):
        with run_lock(tmp_path):
            pass
    assert (tmp_path / ".lock").read_text() == "someone else's lock"
