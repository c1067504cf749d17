"""A real Flower simulation (Ray backend) through the `fed-netgpt` command, on the tiny model."""

from __future__ import annotations

import copy
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from fed_netgpt.model.base import load_base
from fed_netgpt.run.folder import round_summaries, site_records

pytestmark = pytest.mark.integration
REGIONS = ("france", "japan")
TRAINING_SITES = ["marseille", "paris", "tokyo", "yokohama"]  # smoke: 2 a region train, the third is held out


def fed_netgpt(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fed_netgpt.cli", *args], capture_output=True, text=True,
                          timeout=timeout)


def test_run_folder_has_the_contracted_layout(run_dir: Path) -> None:
    for region in REGIONS:
        assert (run_dir / "adapters" / region / "adapter_config.json").is_file()
        assert (run_dir / "adapters" / region / "adapter_model.safetensors").is_file()
    for name in ("config.yaml", "metrics.jsonl", "report.json", "report.md", "report.png", "manifest.json",
                 "published.json"):
        assert (run_dir / name).is_file(), name
    for n in (1, 2):
        assert (run_dir / "checkpoints" / f"round-{n}" / "adapters.safetensors").is_file()


def test_simulate_runs_on_flowers_supported_path_and_leaves_nothing_behind(run_dir: Path) -> None:
    console = (run_dir.parent / "console.txt").read_text()
    assert "DEPRECATED" not in console and "run_simulation" not in console  # `flwr run` on a SuperLink of its own
    assert "Starting Flower SuperLink" in (run_dir / "superlink.log").read_text()
    assert "Starting GroupStrategy strategy" in (run_dir / "flower.log").read_text()  # Flower's INFO log
    assert "Starting GroupStrategy strategy" not in console  # ... kept off the console
    scratch = run_dir.parent / "tmp"
    assert [p.name for p in scratch.iterdir() if p.name != "ray"] == []  # its app folder and FLWR_HOME removed
    environments = []
    for proc in Path("/proc").glob("[0-9]*/environ"):
        try:
            environments.append(proc.read_bytes())
        except OSError:
            continue
    assert not [env for env in environments if f"FLWR_HOME={scratch}".encode() in env]  # no process left running


def test_metrics_has_one_line_per_round_with_every_region(run_dir: Path) -> None:
    rows = round_summaries(run_dir)
    assert [row["round"] for row in rows] == [1, 2]
    for row in rows:
        for region in REGIONS:
            assert row["train"][f"{region}/num-examples"] == 43  # the long tail: 32 + 11 training pairs
            assert np.isfinite(row["train"][f"{region}/train_loss"])
            assert np.isfinite(row["train"][f"{region}/personal_loss"])
            assert np.isfinite(row["evaluate"][f"{region}/eval_loss"])
            assert row["evaluate"][f"{region}/num-examples"] == 4  # validation split: 2 sites x 2 pairs
        assert row["bytes"]["uplink"] == row["bytes"]["downlink"] > 0  # 4 sites, one adapter each way
    # and a line per site and round, with what that site reported
    sites = site_records(run_dir)
    assert sorted((r["round"], r["site_id"]) for r in sites) == [(n, s) for n in (1, 2) for s in TRAINING_SITES]
    paris = next(r for r in sites if r["site_id"] == "paris")
    assert paris["region"] == "france" and paris["num-examples"] == 32 and np.isfinite(paris["train_loss"])
    # its adapter both ways, float32: well under 1 % of the base model's float32 bytes
    assert paris["bytes_down"] == paris["bytes_up"] == rows[0]["bytes"]["uplink"] // len(TRAINING_SITES)
    assert paris["bytes_up"] < 0.01 * 4 * sum(p.numel() for p in load_base("tiny-random").model.parameters())


def test_regions_train_different_adapters_that_moved_from_the_start(run_dir: Path) -> None:
    france, japan = (load_file(str(run_dir / "adapters" / r / "adapter_model.safetensors")) for r in REGIONS)
    assert france.keys() == japan.keys()
    b_keys = [k for k in france if "lora_B" in k]
    assert any(np.abs(france[k]).max() > 0 for k in b_keys)  # B starts at zero: training moved it
    assert any(not np.allclose(france[k], japan[k]) for k in france)


def test_each_training_site_keeps_its_own_peft_adapter(run_dir: Path) -> None:
    from peft import PeftModel

    from fed_netgpt.model.base import load_base

    assert sorted(p.name for p in (run_dir / "site_adapters").iterdir()) == TRAINING_SITES
    fresh = copy.deepcopy(load_base("tiny-random").model)
    model = PeftModel.from_pretrained(fresh, str(run_dir / "site_adapters" / "paris"))
    assert any(".lora_B." in name and float(p.abs().max()) > 0 for name, p in model.named_parameters())


def test_report_has_every_variant_on_held_out_intents_and_held_out_sites(run_dir: Path) -> None:
    report = json.loads((run_dir / "report.json").read_text())
    assert list(report["variants"]) == ["base", "regional", "personalized"]
    for result in report["variants"].values():
        for key in ("fact_accuracy", "region_fact_accuracy", "site_fact_accuracy", "rouge_l", "request_kept"):
            assert 0.0 <= result[key] <= 1.0, key
        assert result["num_examples"] == 8  # smoke: 4 a region, spread over 2 sites x 3 held-out intents
        assert {e["site_id"] for e in result["examples"]} == set(TRAINING_SITES)
        assert result["heldout_sites"]["num_examples"] == 8
        assert {e["site_id"] for e in result["heldout_sites"]["examples"]} == {"lyon", "osaka"}
    md = (run_dir / "report.md").read_text()
    assert "| personalized |" in md and "Held-out sites" in md


def test_evaluate_prints_the_runs_report_as_json(run_dir: Path) -> None:
    done = fed_netgpt("evaluate", "--run", str(run_dir))
    assert done.returncode == 0, done.stderr[-2000:]
    printed = json.loads(done.stdout)
    saved = json.loads((run_dir / "report.json").read_text())
    assert printed["variants"].keys() == saved["variants"].keys()
    for name, result in saved["variants"].items():
        assert printed["variants"][name]["fact_accuracy"] == pytest.approx(result["fact_accuracy"])
        assert printed["variants"][name]["loss"] == pytest.approx(result["loss"], rel=1e-4)
        assert printed["variants"][name]["examples"] == result["examples"]  # greedy decoding: the same text


def test_complete_uses_the_site_adapter_then_the_regions(run_dir: Path) -> None:
    from fed_netgpt.evaluation.scoring import generate_completions
    from fed_netgpt.model.adapters import load_adapter
    from fed_netgpt.model.base import load_base

    base = load_base("tiny-random")
    for site, folder in (("paris", run_dir / "site_adapters" / "paris"), ("lyon", run_dir / "adapters" / "france")):
        done = fed_netgpt("complete", "--run", str(run_dir), "--site", site, "Where can I eat?",
                          "serving.precision=fp32", "serving.max_new_tokens=8")
        assert done.returncode == 0, done.stderr[-2000:]
        model = load_adapter(base, f"check-{site}", folder)
        expected = generate_completions(model, base.tokenizer, [("", "Where can I eat?")], max_new_tokens=8)
        assert done.stdout.rstrip("\n") == expected[0], site


def test_complete_with_an_unknown_region_is_a_clear_error(run_dir: Path) -> None:
    done = fed_netgpt("complete", "--run", str(run_dir), "--site", "atlantis", "--region", "mars", "Hi")
    assert done.returncode == 2
    assert "region 'mars' has no adapter" in done.stderr and "france" in done.stderr, done.stderr
    assert "Traceback" not in done.stderr


def test_resume_continues_from_the_latest_checkpoint(run_dir: Path, tmp_path: Path) -> None:
    resumed = tmp_path / "resumed"
    shutil.copytree(run_dir, resumed)
    round_2 = load_file(str(resumed / "checkpoints" / "round-2" / "adapters.safetensors"))

    done = fed_netgpt("simulate", "preset=smoke", f"run.output_dir={resumed}", "run.resume=true",
                      "federation.num_rounds=3")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    assert "resuming after round 2" in done.stderr
    assert [row["round"] for row in round_summaries(resumed)] == [1, 2, 3]
    assert "[round 3/3 |" in done.stdout and "[round 1/3 |" not in done.stdout
    unchanged = load_file(str(resumed / "checkpoints" / "round-2" / "adapters.safetensors"))
    assert all(np.array_equal(round_2[k], unchanged[k]) for k in round_2)
    round_3 = load_file(str(resumed / "checkpoints" / "round-3" / "adapters.safetensors"))
    assert any(not np.array_equal(round_2[k], round_3[k]) for k in round_2)


def test_global_mode_trains_one_adapter_that_every_region_is_evaluated_with(tmp_path: Path) -> None:
    out = tmp_path / "global"
    done = fed_netgpt("simulate", "preset=smoke", f"run.output_dir={out}", "federation.adapters=global",
                      "federation.num_rounds=1")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert sorted(p.name for p in (out / "adapters").iterdir()) == ["global"]
    report = json.loads((out / "report.json").read_text())
    assert list(report["variants"]) == ["base", "global", "personalized"]
    assert sorted(report["variants"]["global"]["regions"]) == list(REGIONS)
    (row,) = round_summaries(out)
    assert row["train"]["global/num-examples"] == 86  # all 4 sites (2 x (32 + 11) pairs) in one aggregate


def test_one_node_trains_its_sites_in_one_grouped_pass(tmp_path: Path) -> None:
    # Prepare: the smoke preset's 4 sites on a single node, all 4 in one pass
    out = tmp_path / "grouped"
    # Execute
    done = fed_netgpt("simulate", "preset=smoke", f"run.output_dir={out}", "federation.num_rounds=1",
                      "simulation.num_supernodes=1", "train.sites_per_pass=4", "run.report=false")
    # Assert: every site trained, together, and each region aggregated its sites' replies
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    sites = site_records(out)
    assert sorted(r["site_id"] for r in sites) == ["marseille", "paris", "tokyo", "yokohama"]
    assert all(r["group_size"] == 4 and np.isfinite(r["train_loss"]) for r in sites)
    (row,) = round_summaries(out)
    assert row["train"]["france/num-examples"] == row["train"]["japan/num-examples"] == 43
    # in round 1 every region starts from the same adapter: the node got one copy for its four sites
    assert row["bytes_down_unshared"] == 4 * row["bytes_down_wire"] > 0
    assert sorted(p.name for p in (out / "site_adapters").iterdir()) == sorted(r["site_id"] for r in sites)


def test_a_fedadam_run_killed_after_round_2_and_resumed_ends_with_the_uninterrupted_adapters(tmp_path: Path) -> None:
    # Prepare: FedAdam keeps moments on the server; the sites seed their training with the round number; half of
    # each region's sites are sampled a round, from the generator the checkpoints carry
    common = ["preset=smoke", "federation.strategy=fedadam", "federation.num_rounds=4", "personalization.method=none",
              "federation.fraction_train=0.5", "run.report=false"]
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    done = fed_netgpt("simulate", *common, f"run.output_dir={whole}")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    # Execute: the same run, its whole process group killed with SIGKILL once round 2 is checkpointed
    killed = subprocess.Popen([sys.executable, "-m", "fed_netgpt.cli", "simulate", *common, f"run.output_dir={cut}"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while not (cut / "checkpoints" / "round-2").is_dir() and killed.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        os.killpg(killed.pid, signal.SIGKILL)
        killed.wait()
    assert not (cut / "checkpoints" / "round-3").exists(), "the run got past round 2 before the kill"
    resumed = fed_netgpt("simulate", "--resume", str(cut))  # the config comes from the run folder
    # Assert: the run went on after round 2, and ends with the adapters of the uninterrupted one
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert "resuming after round 2" in resumed.stderr
    assert [row["round"] for row in round_summaries(cut)] == [1, 2, 3, 4]
    sampled = [sorted((r["round"], r["site_id"]) for r in site_records(run)) for run in (whole, cut)]
    assert sampled[0] == sampled[1]  # the same sites, round by round, before and after the kill
    assert len({site for _, site in sampled[0]}) > 2  # and the sampling did vary (2 sites a round, 4 in all)
    final = [load_file(str(run / "checkpoints" / "round-4" / "adapters.safetensors")) for run in (whole, cut)]
    for key in final[0]:
        np.testing.assert_allclose(final[1][key], final[0][key], rtol=1e-5, atol=1e-6, err_msg=key)
    round_2 = load_file(str(cut / "checkpoints" / "round-2" / "adapters.safetensors"))
    assert any(not np.allclose(round_2[k], final[1][k]) for k in round_2)  # rounds 3 and 4 did move the adapters


def _contents(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_resuming_a_finished_run_says_so_and_changes_nothing(run_dir: Path, tmp_path: Path,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    from fed_netgpt.cli import main

    run = tmp_path / "finished"
    shutil.copytree(run_dir, run)
    before = _contents(run)
    assert main(["simulate", "--resume", str(run)]) == 0
    assert "the run finished all 2 rounds" in capsys.readouterr().out
    assert _contents(run) == before  # published.json, config.yaml, the lock: all as they were


def test_resuming_checkpoints_the_edited_config_no_longer_fits_is_refused(run_dir: Path, tmp_path: Path,
                                                                        capsys: pytest.CaptureFixture[str]) -> None:
    from fed_netgpt.cli import main

    run = tmp_path / "edited"
    shutil.copytree(run_dir, run)
    (run / "published.json").unlink()  # as if killed before the end
    config = (run / "config.yaml").read_text()
    (run / "config.yaml").write_text(config.replace("\n  r: 8\n", "\n  r: 4\n", 1))
    before = _contents(run)
    assert main(["simulate", "--resume", str(run)]) == 2
    err = capsys.readouterr().err
    assert "checkpoints/round-2: group france: tensor" in err and "has shape (8, 64), expected (4, 64)" in err
    assert "lora.r=4" in err and "cannot be resumed" in err
    assert _contents(run) == before


def test_a_run_that_stopped_before_its_last_round_is_not_served(run_dir: Path, tmp_path: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    # Prepare: the smoke run as a kill -9 after round 1 leaves it: round 2's checkpoint and the marker not written
    from fed_netgpt.cli import main

    run = tmp_path / "killed"
    shutil.copytree(run_dir, run)
    (run / "published.json").unlink()
    shutil.rmtree(run / "checkpoints" / "round-2")
    expected = (f"{run} holds a run that stopped after 1 of 2 rounds (no published.json); its adapters are not "
                f"final: fed-netgpt simulate --resume {run}")
    # Execute / Assert: complete, evaluate and serve all refuse it with the same line
    for command in (["complete", "--run", str(run), "--site", "paris", "Hi?"], ["evaluate", "--run", str(run)],
                    ["serve", "--run", str(run), "--port", "65535"]):
        assert main(command) == 2, command
        assert expected in capsys.readouterr().err, command
    # while a run still holds the folder, it is named as running
    holder = subprocess.Popen([sys.executable, "-c", "import time; from fed_netgpt.run.folder import run_lock\n"
                               f"with run_lock({str(run)!r}):\n    print('held', flush=True); time.sleep(60)"],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        assert main(["complete", "--run", str(run), "--site", "paris", "Hi?"]) == 2
        assert f"holds a run still going (pid {holder.pid}, 1 of 2 rounds done)" in capsys.readouterr().err
    finally:
        holder.kill()
        holder.wait()
