"""The README's deployment walkthrough on loopback, secured: credentials from fed_netgpt/deployment.py, a SuperLink
with TLS and SuperNode authentication, registered SuperNodes naming their sites (one edge server serves two) in
two regions, `flwr run`. A node whose key was never registered is refused; a node killed mid-round does not stop
the run."""

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

from fed_netgpt.deployment import NodeSpec, deployment_commands, write_credentials
from fed_netgpt.runs import round_summaries, site_records
from tests.serving_runs import free_port

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]
SITES = {"paris": "france", "marseille": "france", "tokyo": "japan", "yokohama": "japan"}
NODES = [NodeSpec("paris", ("paris",)), NodeSpec("marseille", ("marseille",)),
         NodeSpec("japan-edge", ("tokyo", "yokohama"))]  # one node, two sites
INTRUDER = NodeSpec("intruder", ("paris",))  # a key pair like the others', never registered
KILLED = "marseille"  # SIGKILLed once it has received its round-2 train message


def wait_for_port(port: int, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.5)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout}s")


def descendants(pid: int) -> list[int]:
    """Every process below `pid` (Flower detaches its SuperExec and app processes into sessions of their own, so
    a process group does not hold them all); read before the tree is killed, while the parent links exist."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        below = children.get(todo.pop(), [])
        found += below
        todo += below
    return found


class Processes:
    """The deployment's processes, each in its own session with its log file; `kill` ends one like a machine
    losing power, `stop_all` ends them all (in a finally block)."""

    def __init__(self, logs: Path, env: dict[str, str]) -> None:
        self.logs, self.env = logs, env
        self.started: dict[str, subprocess.Popen] = {}

    def start(self, name: str, argv: list[str], cwd: Path = ROOT) -> subprocess.Popen:
        with (self.logs / f"{name}.log").open("w") as log:
            self.started[name] = subprocess.Popen(argv, cwd=cwd, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                                  start_new_session=True)
        return self.started[name]

    def log(self, name: str) -> str:
        return (self.logs / f"{name}.log").read_text(errors="replace")

    def kill(self, name: str) -> None:
        process = self.started[name]
        tree = descendants(process.pid)
        _signal_group(process.pid, signal.SIGKILL)
        for pid in tree:
            _signal(pid, signal.SIGKILL)
        process.wait(timeout=20)

    def stop_all(self) -> None:
        trees = {name: descendants(p.pid) for name, p in self.started.items() if p.poll() is None}
        for name in trees:
            _signal_group(self.started[name].pid, signal.SIGTERM)
        for name, tree in trees.items():
            try:
                self.started[name].wait(timeout=20)
            except subprocess.TimeoutExpired:
                _signal_group(self.started[name].pid, signal.SIGKILL)
                self.started[name].wait(timeout=20)
            for pid in tree:  # a detached helper that outlived its parent
                _signal(pid, signal.SIGKILL)


def _signal_group(pid: int, sig: signal.Signals) -> None:
    try:
        os.killpg(pid, sig)
    except ProcessLookupError:
        pass


def _signal(pid: int, sig: signal.Signals) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def test_secured_deployment_refuses_unregistered_nodes_and_survives_a_killed_one(tmp_path: Path) -> None:
    # Prepare: credentials and commands as `fed-netgpt deploy credentials` writes and prints them
    link_port = free_port()
    credentials = write_credentials(tmp_path / "credentials", [], [*NODES, INTRUDER])
    commands = deployment_commands(credentials, f"127.0.0.1:{link_port}", [*NODES, INTRUDER],
                                   database=str(tmp_path / "superlink-state.db"))
    flwr_home = tmp_path / "flwr-home"
    flwr_home.mkdir()
    (flwr_home / "config.toml").write_text(commands.config_toml)
    bin_dir = Path(sys.executable).parent  # flower-superlink, flower-supernode and flwr live beside this python
    env = {**os.environ, "FLWR_HOME": str(flwr_home), "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"}
    (tmp_path / "logs").mkdir()
    processes = Processes(tmp_path / "logs", env)
    out = tmp_path / "run"
    try:
        registered, refused = _start_federation(processes, commands, link_port, env)
        overrides = (f"preset='smoke' run.output_dir='{out}' federation.num_rounds=2 federation.fraction_evaluate=0.0 "
                     "train.sites_per_pass=2")
        run = processes.start("flwr-run", [*commands.run, "--run-config", overrides])
        killed_at = _kill_when_training(processes, KILLED, round_number=2, deadline=time.monotonic() + 300)
        run.wait(timeout=300)
        deadline = time.monotonic() + 120  # --stream may return before the ServerApp wrote its report
        while not (out / "report.json").is_file() and time.monotonic() < deadline:
            time.sleep(1)
        listed = _listed_nodes(env)
    finally:
        processes.stop_all()
    # Assert: the run finished with the registered nodes and without the killed one's round-2 update
    server_log = processes.log("flwr-run")
    assert (out / "report.json").is_file(), server_log[-4000:]
    assert "Failed to activate SuperNode" in refused, refused[-2000:]
    assert listed == set(registered.values())  # the intruder never became a node
    for site, region in SITES.items():
        assert f"serves site {site} in region {region}" in server_log
    served_by = {int(node) for node in _discovered_nodes(server_log)}
    assert served_by == set(registered.values())
    assert killed_at and "Sending: train" not in processes.log(KILLED).split("Receiving: train")[2]
    rows = round_summaries(out)
    assert [row["round"] for row in rows] == [1, 2]
    assert rows[0]["train"]["france/num-examples"] == 43 and rows[0]["train"]["japan/num-examples"] == 43  # 32+11
    second = {r["site_id"]: r for r in site_records(out) if r["round"] == 2}
    assert "error" in second[KILLED] and all("error" not in second[s] for s in SITES if s != KILLED)
    assert sorted(p.name for p in (out / "adapters").iterdir()) == ["france", "japan"]
    report = json.loads((out / "report.json").read_text())
    assert report["scored_by"] == "sites"
    assert report["sites_missing"] == [KILLED] and report["sites_scored"] == sorted(set(SITES) - {KILLED})
    assert {ex["site_id"] for ex in report["variants"]["regional"]["examples"]} == {"paris"}  # only paris shares


def _start_federation(processes: Processes, commands, link_port: int, env: dict[str, str]) -> tuple[dict, str]:
    """The SuperLink, the registration of every node but the intruder, the SuperNodes (the intruder too: its
    refusal is waited for). Returns the registered node ids by name and the intruder's log."""
    processes.start("superlink", commands.superlink, cwd=processes.logs.parent)
    wait_for_port(link_port)
    registered = {}
    for node in NODES:
        done = subprocess.run([*commands.register[node.name], "--format", "json"], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stdout + done.stderr
        registered[node.name] = int(json_printed(done.stdout)["node-id"])
    for node in [*NODES, INTRUDER]:  # several nodes on one machine: each its own Runtime API port
        argv = [*commands.supernodes[node.name], "--port", str(free_port())]
        if node.name == "paris":
            argv[-3] += " share-examples=true"
        processes.start(node.name, argv)
    processes.started[INTRUDER.name].wait(timeout=60)
    return registered, processes.log(INTRUDER.name)


def _kill_when_training(processes: Processes, name: str, round_number: int, deadline: float) -> float:
    """SIGKILL node `name` (its whole process tree) once it has received its `round_number`-th train message and
    before it replies; returns when it did."""
    while time.monotonic() < deadline and processes.started["flwr-run"].poll() is None:
        if processes.log(name).count("Receiving: train") >= round_number:
            processes.kill(name)
            return time.monotonic()
        time.sleep(0.1)
    raise AssertionError(f"node {name} never received its round-{round_number} train message:\n"
                         + processes.log("flwr-run")[-3000:])


def _listed_nodes(env: dict[str, str]) -> set[int]:
    """The node ids the SuperLink knows (`flwr supernode ls`), whatever their status."""
    done = subprocess.run(["flwr", "supernode", "ls", "edge", "--format", "json"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=60)
    return {int(node["node-id"]) for node in json_printed(done.stdout)["nodes"]}


def json_printed(stdout: str) -> dict:
    """The JSON object `flwr ... --format json` prints (indented, after any other output)."""
    return json.JSONDecoder().raw_decode(stdout[stdout.index("{"):])[0]


def _discovered_nodes(server_log: str) -> set[str]:
    return {line.split("discover_sites: node ")[1].split()[0] for line in server_log.splitlines()
            if "discover_sites: node " in line and " serves site " in line}
