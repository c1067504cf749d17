"""`flwr run .` drives the same apps through Flower's own CLI and a local SuperLink (simulation runtime)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fed_netgpt.run.folder import round_summaries, site_records

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]


def superlink_pids(flwr_home: Path) -> list[int]:
    """SuperLinks started on behalf of this FLWR_HOME (they outlive `flwr run`)."""
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            environ = (proc / "environ").read_bytes()
        except OSError:
            continue
        if "flower-superlink" in cmdline and f"FLWR_HOME={flwr_home}".encode() in environ:
            pids.append(int(proc.name))
    return pids


def test_flwr_run_with_run_config_overrides(tmp_path: Path) -> None:
    flwr_home = tmp_path / "flwr-home"
    flwr_home.mkdir()
    (flwr_home / "config.toml").write_text(
        '[superlink]\ndefault = "local"\n\n[superlink.local]\naddress = ":local:"\noptions.num-supernodes = 2\n'
    )  # Flower's own default on a fresh home: fewer nodes than the smoke preset's 4 sites, which share them
    out = tmp_path / "run"
    bin_dir = Path(sys.executable).parent  # flwr and flower-superlink live beside this interpreter
    env = {**os.environ, "FLWR_HOME": str(flwr_home), "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
           "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"}
    overrides = f"preset='smoke' run.output_dir='{out}' federation.num_rounds=1"
    try:
        command = [str(bin_dir / "flwr"), "run", ".", "--stream", "--run-config", overrides]
        done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
        deadline = time.monotonic() + 120  # --stream may return before the ServerApp wrote its report
        while not (out / "report.json").is_file() and time.monotonic() < deadline:
            time.sleep(1)
    finally:
        for pid in superlink_pids(flwr_home):
            os.kill(pid, signal.SIGTERM)
    assert (out / "report.json").is_file(), done.stdout[-3000:] + done.stderr[-3000:]
    assert [row["round"] for row in round_summaries(out)] == [1]  # the --run-config override reached the ServerApp
    assert sorted(p.name for p in (out / "adapters").iterdir()) == ["france", "japan"]
    assert sorted(r["site_id"] for r in site_records(out)) == ["marseille", "paris", "tokyo", "yokohama"]  # all trained
