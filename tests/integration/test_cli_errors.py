"""Bad input at the command line: one clear `error:` line naming what is wrong, exit code 2, no traceback."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fed_netgpt.cli import main
from fed_netgpt.config import load_config

GOOD = {"site_id": "lyon", "region": "france", "prompt": "Hi?", "completion": "I am in Lyon. Hi?"}


def write_lines(path: Path, *lines: str) -> Path:
    path.write_text("\n".join(lines) + "\n")
    return path


def run_cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    code = main(list(args))
    return code, capsys.readouterr().err


def test_malformed_jsonl_line_names_the_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = write_lines(tmp_path / "pairs.jsonl", json.dumps(GOOD), "{not json")
    code, err = run_cli(capsys, "data", "build", f"data.path={data}", "--out", str(tmp_path / "out.jsonl"))
    assert code == 2
    assert f"{data} line 2: not valid JSON" in err


def test_missing_field_names_the_field_and_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    row = {k: v for k, v in GOOD.items() if k != "completion"}
    data = write_lines(tmp_path / "pairs.jsonl", json.dumps(GOOD), json.dumps(GOOD), json.dumps(row))
    code, err = run_cli(capsys, "simulate", f"data.path={data}", "model.name=tiny-random")
    assert code == 2
    assert "line 3: missing required field 'completion'" in err


def test_unknown_region_in_config(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    code, err = run_cli(capsys, "data", "build", "data.countries=[FR,XX]", "--out", str(tmp_path / "o.jsonl"))
    assert code == 2
    assert "data.countries: unknown country code 'XX'" in err


def test_unknown_city_in_a_named_region(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    code, err = run_cli(capsys, "data", "build", "data.region_by=list", "data.regions={alps: [Xyzzyville]}",
                        "--out", str(tmp_path / "o.jsonl"))
    assert code == 2
    assert "data.regions.alps: no city named 'Xyzzyville'" in err


def test_unknown_config_key(capsys: pytest.CaptureFixture[str]) -> None:
    code, err = run_cli(capsys, "simulate", "federation.num_round=3")
    assert code == 2
    assert "unknown config key" in err and "num_round" in err


def test_wrong_type_names_the_key(capsys: pytest.CaptureFixture[str]) -> None:
    code, err = run_cli(capsys, "simulate", "federation.num_rounds=many")
    assert code == 2
    assert "federation.num_rounds" in err


def test_a_site_with_nothing_to_train_or_test_is_named(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    only_valid = {**GOOD, "site_id": "nice", "split": "valid"}  # a test-only site is fine: it is held out
    data = write_lines(tmp_path / "pairs.jsonl", json.dumps(GOOD), json.dumps(only_valid))
    code, err = run_cli(capsys, "simulate", f"data.path={data}", "model.name=tiny-random")
    assert code == 2
    assert "site 'nice' has neither training nor test pairs" in err


def test_missing_run_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, err = run_cli(capsys, "complete", "--run", str(tmp_path / "nope"), "--site", "lyon", "Hi")
    assert code == 2
    assert "is not a run folder: config.yaml is missing" in err


def test_the_command_itself_exits_2_without_traceback(tmp_path: Path) -> None:
    data = write_lines(tmp_path / "pairs.jsonl", json.dumps({**GOOD, "split": "later"}))
    done = subprocess.run([sys.executable, "-m", "fed_netgpt.cli", "simulate", f"data.path={data}"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1].startswith("error: ")
    assert "field 'split' must be 'train', 'valid' or 'test', got 'later'" in done.stderr
    assert "Traceback" not in done.stderr


def test_an_override_that_is_not_yaml_is_named(capsys: pytest.CaptureFixture[str]) -> None:
    code, err = run_cli(capsys, "simulate", "data.regions={alps:[Atlantis]}")
    assert code == 2
    assert "override 'data.regions={alps:[Atlantis]}': the value is not valid YAML" in err


def test_a_missing_config_file_is_named(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, err = run_cli(capsys, "simulate", "--config", str(tmp_path / "mine.yaml"))
    assert code == 2
    assert f"config file not found: {tmp_path / 'mine.yaml'}" in err


def test_a_config_file_and_its_preset_apply_before_overrides(tmp_path: Path) -> None:
    mine = tmp_path / "mine.yaml"
    mine.write_text("preset: smoke\ntrain:\n  local_steps: 7\nfederation:\n  num_rounds: 9\n")
    config = load_config(mine, ["federation.num_rounds=5"])
    assert (config.model.name, config.train.local_steps, config.federation.num_rounds) == ("tiny-random", 7, 5)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU: train.device=cuda is valid here")
def test_cuda_asked_on_a_machine_without_one(capsys: pytest.CaptureFixture[str]) -> None:
    code, err = run_cli(capsys, "simulate", "model.name=tiny-random", "train.device=cuda")
    assert code == 2
    assert "train.device=cuda, but this process sees no CUDA device" in err


def test_unknown_device(capsys: pytest.CaptureFixture[str]) -> None:
    code, err = run_cli(capsys, "simulate", "train.device=tpu")
    assert code == 2
    assert "train.device must be one of auto, cpu, cuda; got 'tpu'" in err


def test_a_pair_too_long_for_training_is_refused_before_any_round(tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    huge = {**GOOD, "prompt": "word " * 20_000, "completion": "I am in Lyon. Hi?"}
    data = write_lines(tmp_path / "pairs.jsonl", *[json.dumps(GOOD)] * 4, json.dumps(huge))
    out = tmp_path / "run"
    code, err = run_cli(capsys, "simulate", f"data.path={data}", "model.name=tiny-random", f"run.output_dir={out}")
    assert code == 2
    assert "site lyon: prompt pair 'word word" in err and "(100000 characters)" in err
    assert "more than train.max_length=128" in err and len(err) < 1000  # named, not echoed
    assert not (out / "adapters").exists() and not (out / "metrics.jsonl").exists()


def test_max_length_too_small_is_refused_before_any_round(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, err = run_cli(capsys, "simulate", "preset=smoke", "train.max_length=1", f"run.output_dir={tmp_path / 'r'}")
    assert code == 2 and "more than train.max_length=1" in err


def test_complete_refuses_an_empty_or_too_long_prompt(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                      tiny_base) -> None:
    from tests.serving_runs import write_run

    write_run(tmp_path / "run", tiny_base)
    code, err = run_cli(capsys, "complete", "--run", str(tmp_path / "run"), "--site", "paris", "  ")
    assert code == 2 and "the prompt is empty" in err
    code, err = run_cli(capsys, "complete", "--run", str(tmp_path / "run"), "--site", "paris", "word " * 400)
    assert code == 2 and "limit is serving.max_prompt_tokens=256" in err


@pytest.mark.parametrize(("damage", "message"), [
    (lambda run: (run / "adapters" / "france" / "adapter_model.safetensors").write_bytes(b"\x00" * 10),
     "adapter_model.safetensors: not a readable safetensors file"),
    (lambda run: (run / "adapters" / "france" / "adapter_model.safetensors").write_bytes(b""),
     "adapter_model.safetensors: not a readable safetensors file"),
    (lambda run: (run / "adapters" / "france" / "adapter_config.json").write_text("{not json"),
     "adapter_config.json: not valid JSON"),
    (lambda run: (run / "adapters" / "france" / "adapter_config.json").write_text(json.dumps({"lora_alpha": 16})),
     "adapter_config.json: key 'r' is missing"),
    (lambda run: (run / "config.yaml").write_text("model: [unclosed\n"), "config.yaml: not valid YAML"),
    (lambda run: (run / "config.yaml").write_text("- a\n- b\n"), "config.yaml: the saved config: a config must be"),
])
def test_a_damaged_run_folder_is_named_by_complete(tmp_path: Path, capsys: pytest.CaptureFixture[str], tiny_base,
                                                   damage, message) -> None:
    from tests.serving_runs import write_run

    run = tmp_path / "run"
    write_run(run, tiny_base)
    damage(run)
    code, err = run_cli(capsys, "complete", "--run", str(run), "--site", "marseille", "Hi?")
    assert code == 2 and message in err, err


def test_a_second_run_into_a_folder_in_use_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "busy"
    holder = subprocess.Popen([sys.executable, "-c", "import time; from fed_netgpt.run.folder import run_lock\n"
                               f"with run_lock({str(out)!r}):\n    print('held', flush=True); time.sleep(60)"],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        code, err = run_cli(capsys, "simulate", "preset=smoke", f"run.output_dir={out}")
        assert code == 2 and f"is in use by a running run (pid {holder.pid})" in err
    finally:
        holder.kill()
        holder.wait()
    assert not (out / "metrics.jsonl").exists()  # nothing of the refused run was written


@pytest.mark.parametrize(("setup", "args", "message"), [
    (lambda tmp: (tmp / "afile").touch(), ["simulate", "preset=smoke", "run.output_dir={tmp}/afile"],
     "afile is a file, not a folder"),
    (lambda tmp: (tmp / "adir").mkdir(), ["data", "build", "--out", "{tmp}/adir"], "adir is a folder; --out names"),
])
def test_output_paths_that_cannot_be_written_are_named(tmp_path: Path, capsys: pytest.CaptureFixture[str], setup,
                                                       args, message) -> None:
    setup(tmp_path)
    code, err = run_cli(capsys, *[a.format(tmp=tmp_path) for a in args])
    assert code == 2 and message in err


def test_a_folder_of_someone_elses_files_is_refused_and_kept_byte_for_byte(tmp_path: Path,
                                                                           capsys: pytest.CaptureFixture[str]) -> None:
    # Prepare: a user's folder that happens to use the names a run clears
    mine = tmp_path / "mine"
    files = {"adapters/mine.bin": b"\x01\x02", "checkpoints/epoch9.pt": b"weights", "site_adapters/x.txt": b"x",
             "config.yaml": b"lr: 3\n"}
    for name, content in files.items():
        (mine / name).parent.mkdir(parents=True, exist_ok=True)
        (mine / name).write_bytes(content)
    # Execute
    code, err = run_cli(capsys, "simulate", "preset=smoke", f"run.output_dir={mine}")
    # Assert: refused, naming what is there; every file as it was, and no lock left behind
    assert code == 2 and "holds files no fed-netgpt run wrote (adapters/, checkpoints/, config.yaml," in err, err
    assert {str(p.relative_to(mine)): p.read_bytes() for p in mine.rglob("*") if p.is_file()} == files


def test_bad_data_is_refused_before_the_run_folder_is_touched(tmp_path: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    data = write_lines(tmp_path / "pairs.jsonl", json.dumps(GOOD), "{not json")
    out = tmp_path / "empty"
    out.mkdir()
    for command in ("simulate", "compare"):
        code, err = run_cli(capsys, command, "preset=smoke", f"data.path={data}", f"run.output_dir={out}")
        assert code == 2 and f"{data} line 2: not valid JSON" in err
        assert list(out.iterdir()) == []  # no .lock, no config.yaml


def test_a_run_folder_under_home_is_expanded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    import argparse

    from fed_netgpt.cli import prepared_config

    monkeypatch.setenv("HOME", str(tmp_path))
    config = prepared_config(argparse.Namespace(config=None, overrides=["preset=smoke", "run.output_dir=~/runs/x"]))
    assert config.run.output_dir == str(tmp_path / "runs" / "x")  # not ./~/runs/x


@pytest.mark.parametrize(("override", "message"), [
    ("lora.r=100000", "lora.r=100000 is larger than the smallest dimension (32) of the layers it adapts in "
                      "tiny-random"),
    ("lora.target_modules=[foo]", "lora.target_modules=['foo']: no layer of tiny-random has one of these names"),
])
def test_a_lora_the_model_cannot_take_is_refused_before_the_run(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                               override: str, message: str) -> None:
    code, err = run_cli(capsys, "simulate", "preset=smoke", override, f"run.output_dir={tmp_path / 'run'}")
    assert code == 2 and message in err, err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(("args", "message"), [
    (["data", "build", "data.path={tmp}", "--out", "{tmp}/x.jsonl"], "is a folder; data.path names a JSONL file"),
    (["data", "build", "data.path=/dev/null", "--out", "{tmp}/x.jsonl"],
     "/dev/null is not a regular file (a device, FIFO or socket)"),
    (["data", "build", "--out", "/proc/x.jsonl"], "cannot write /proc/x.jsonl ("),
    (["deploy", "credentials", "--out", "/proc/creds"], "--out /proc/creds: cannot create it ("),
    (["deploy", "credentials", "--out", "{tmp}/c", "--node", "n1=a.b"],
     "site ids are letters, digits, '-' or '_' (the data contract's site_id)"),
])
def test_paths_and_ids_that_cannot_work_are_one_line_each(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                          args: list[str], message: str) -> None:
    code, err = run_cli(capsys, *[a.format(tmp=tmp_path) for a in args])
    assert code == 2 and message in err and "Traceback" not in err, err
    assert not (tmp_path / "c").exists()
