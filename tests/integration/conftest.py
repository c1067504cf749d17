"""Fixtures the integration tests share: one smoke run serves every test that only reads a finished run."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """2 regions x 2 sites, 2 rounds (conf/smoke.yaml), on Flower's simulation engine, through `fed-netgpt
    simulate`; read, never changed, by the tests that take it."""
    out = tmp_path_factory.mktemp("run") / "smoke"
    scratch = out.parent / "tmp"  # the command's temporary files (its SuperLink's FLWR_HOME), looked at afterwards
    scratch.mkdir()
    done = subprocess.run([sys.executable, "-m", "fed_netgpt.cli", "simulate", "preset=smoke",
                           f"run.output_dir={out}"], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "TMPDIR": str(scratch)})
    (out.parent / "console.txt").write_text(done.stdout + done.stderr)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "[round 2/2 |" in done.stdout
    return out
