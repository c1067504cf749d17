"""The deployment engine on loopback: a real SuperLink, SuperNodes naming their sites (one edge server serves two),
`flwr run`."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fed_netgpt.runs import round_summaries

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]
SITES = {"paris": "france", "marseille": "france", "tokyo": "japan", "yokohama": "japan"}
NODES = {"paris": "site-id='paris' share-examples=true", "marseille": "site-id='marseille'",
         "japan-edge": "site-ids='tokyo,yokohama'"}  # one node, two sites


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for_port(port: int, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.5)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout}s")


def stop_group(process: subprocess.Popen, sig: signal.Signals) -> None:
    try:
        os.killpg(process.pid, sig)
    except ProcessLookupError:
        pass


def test_supernodes_name_their_sites_and_the_server_trains_per_region(tmp_path: Path) -> None:
    bin_dir = Path(sys.executable).parent
    flwr_home = tmp_path / "flwr-home"
    flwr_home.mkdir()
    link_port = free_port()
    (flwr_home / "config.toml").write_text(
        f'[superlink]\ndefault = "lab"\n\n[superlink.lab]\naddress = "127.0.0.1:{link_port}"\ninsecure = true\n'
    )
    env = {**os.environ, "FLWR_HOME": str(flwr_home), "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"}
    logs = tmp_path / "logs"
    logs.mkdir()
    out = tmp_path / "run"
    processes = []

    def start(name: str, *command: str) -> None:
        log = (logs / f"{name}.log").open("w")
        processes.append(subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT,
                                          start_new_session=True))

    try:
        start("superlink", str(bin_dir / "flower-superlink"), "--insecure", "--port", str(link_port),
              "--disable-runtime-dependency-installation", "--database", str(tmp_path / "state.db"))
        wait_for_port(link_port)
        for name, node_config in NODES.items():
            start(name, str(bin_dir / "flower-supernode"), "--insecure", "--superlink", f"127.0.0.1:{link_port}",
                  "--port", str(free_port()), "--node-config", node_config)
        overrides = f"preset='smoke' run.output_dir='{out}' federation.num_rounds=1"
        done = subprocess.run([str(bin_dir / "flwr"), "run", ".", "lab", "--stream", "--run-config", overrides],
                              cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
        deadline = time.monotonic() + 120
        while not (out / "report.json").is_file() and time.monotonic() < deadline:
            time.sleep(1)
    finally:
        for process in processes:  # each started its own session: end it with the helpers it spawned
            stop_group(process, signal.SIGTERM)
        for process in processes:
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                stop_group(process, signal.SIGKILL)
    server_log = done.stdout + done.stderr
    assert (out / "report.json").is_file(), server_log[-4000:]
    for site, region in SITES.items():
        assert f"serves site {site} in region {region}" in server_log
    row = round_summaries(out)[0]
    assert row["train"]["france/num-examples"] == 43 and row["train"]["japan/num-examples"] == 43  # 32 + 11
    assert sorted(p.name for p in (out / "adapters").iterdir()) == ["france", "japan"]
    # the final report: each deployed site scored its own test rows and sent counts; only paris shares examples
    report = json.loads((out / "report.json").read_text())
    assert report["scored_by"] == "sites"
    assert report["sites_scored"] == sorted(SITES) and report["sites_missing"] == []
    for name in ("base", "regional", "personalized"):
        variant = report["variants"][name]
        assert variant["num_examples"] == 8  # smoke: 4 a region, shared out over its 2 sites
        assert sorted(variant["sites"]) == sorted(SITES)
        assert {ex["site_id"] for ex in variant["examples"]} == {"paris"}
        assert variant["heldout_sites"]["num_examples"] > 0  # no node serves them: the server scores them
