"""The README's deployment walkthrough on loopback, secured: credentials from fed_netgpt/run/deployment.py, a SuperLink
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

from fed_netgpt.run.deployment import CONNECTION, Commands, NodeSpec, deployment_commands, write_credentials
from fed_netgpt.run.folder import round_summaries, site_records
from tests.serving_runs import free_port

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]
SITES = {"paris": "france", "marseille": "france", "tokyo": "japan", "yokohama": "japan"}
NODES = [NodeSpec("paris", ("paris",)), NodeSpec("marseille", ("marseille",)),
         NodeSpec("japan-edge", ("tokyo", "yokohama"))]  # one node, two sites
INTRUDER = NodeSpec("intruder", ("paris",))  # a key pair like the others', never registered
KILLED = "marseille"  # SIGKILLed once it has received its round-1 train message, before it replies


def wait_for_port(port: int, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.5)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout}s")


Pid = tuple[int, str]  # a process id and its start time (/proc/<pid>/stat field 22): never a reused id


def descendants(pid: int) -> list[Pid]:
    """Every process below `pid` (Flower detaches its SuperExec and app processes into sessions of their own, so
    a process group does not hold them all); read before the tree is killed, while the parent links exist."""
    children: dict[int, list[Pid]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        children.setdefault(int(fields[1]), []).append((int(stat.parent.name), fields[19]))
    found, todo = [], [pid]
    while todo:
        below = children.get(todo.pop(), [])
        found += below
        todo += [child for child, _ in below]
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

    def reap(self) -> None:
        """Collect the exit of those that ended by themselves: their detached helpers watch for it to exit too."""
        for process in self.started.values():
            process.poll()

    def log(self, name: str) -> str:
        return (self.logs / f"{name}.log").read_text(errors="replace")

    def kill(self, name: str) -> None:
        process = self.started[name]
        tree = descendants(process.pid)
        _signal_group(process.pid, signal.SIGKILL)
        for helper in tree:
            _signal(helper, signal.SIGKILL)
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
            for helper in tree:  # a detached helper that outlived its parent
                _signal(helper, signal.SIGKILL)


def _signal_group(pid: int, sig: signal.Signals) -> None:
    try:
        os.killpg(pid, sig)
    except ProcessLookupError:
        pass


def _signal(process: Pid, sig: signal.Signals) -> None:
    """Signal a process found by `descendants`, if it is still that one."""
    pid, started = process
    try:
        if Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19] == started:
            os.kill(pid, sig)
    except (OSError, IndexError):
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
    overrides = (f"preset='smoke' run.output_dir='{out}' federation.num_rounds=2 "
                 "federation.fraction_evaluate=0.0 train.sites_per_pass=2")  # fewer ClientApp starts: a shorter test
    # Execute: the walkthrough; one node killed mid-round
    try:
        registered = _start_federation(processes, commands, link_port)
        run = processes.start("flwr-run", [*commands.run, "--run-config", overrides])
        _kill_when_training(processes, KILLED, deadline=time.monotonic() + 300)
        _wait_for_report(run, out)
        listed = _listed_nodes(env)
    finally:
        processes.stop_all()
    # Assert
    server_log = processes.log("flwr-run")
    assert (out / "report.json").is_file(), server_log[-4000:]
    _assert_only_registered_nodes_joined(processes, registered, listed, server_log)
    _assert_the_run_went_on_without_the_killed_node(processes, out)


def _start_federation(processes: Processes, commands: Commands, link_port: int) -> dict[str, int]:
    """The SuperLink, every node's registration but the intruder's, the SuperNodes (the intruder too). Returns
    the registered node ids by name."""
    processes.start("superlink", commands.superlink, cwd=processes.logs.parent)
    wait_for_port(link_port)
    registered = {}
    for node in NODES:
        done = subprocess.run([*commands.register[node.name], "--format", "json"], cwd=ROOT, env=processes.env,
                              capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stdout + done.stderr
        registered[node.name] = int(json_printed(done.stdout)["node-id"])
    for node in [*NODES, INTRUDER]:
        argv = [*commands.supernodes[node.name], "--port", str(free_port())]  # one machine: a Runtime API port each
        if node.name == "paris":
            argv[argv.index("--node-config") + 1] += " share-examples=true"
        processes.start(node.name, argv)
    return registered


def _kill_when_training(processes: Processes, name: str, deadline: float) -> None:
    """SIGKILL node `name` (its whole process tree) as soon as it has received its first train message. Its
    ClientApp takes seconds to start, so the kill lands before it replies; the SuperLink answers for it with
    "Node Unavailable" once its heartbeat is overdue (2 x 30 s after the last one, Flower's fixed interval),
    while the other nodes train."""
    while time.monotonic() < deadline and processes.started["flwr-run"].poll() is None:
        processes.reap()  # the refused intruder
        if "Receiving: train" in processes.log(name):
            processes.kill(name)
            return
        time.sleep(0.1)
    raise AssertionError(f"node {name} never received a train message:\n" + processes.log("flwr-run")[-3000:])


def _wait_for_report(run: subprocess.Popen, out: Path) -> None:
    try:
        run.wait(timeout=300)
    except subprocess.TimeoutExpired:
        return  # the assertions show the server's log
    deadline = time.monotonic() + 120  # --stream may return before the ServerApp wrote its report
    while not (out / "report.json").is_file() and time.monotonic() < deadline:
        time.sleep(1)


def _listed_nodes(env: dict[str, str]) -> set[int]:
    """The node ids the SuperLink knows (`flwr supernode ls`), whatever their status."""
    done = subprocess.run(["flwr", "supernode", "ls", CONNECTION, "--format", "json"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=60)
    return {int(node["node-id"]) for node in json_printed(done.stdout)["nodes"]}


def json_printed(stdout: str) -> dict:
    """The JSON object `flwr ... --format json` prints (indented, after any other output)."""
    return json.JSONDecoder().raw_decode(stdout[stdout.index("{"):])[0]


def _assert_only_registered_nodes_joined(processes: Processes, registered: dict[str, int], listed: set[int],
                                         server_log: str) -> None:
    assert processes.started[INTRUDER.name].returncode == 1  # it gave up by itself (not stopped by the test)
    assert "Failed to activate SuperNode" in processes.log(INTRUDER.name), processes.log(INTRUDER.name)[-2000:]
    assert listed == set(registered.values())  # the SuperLink never made it a node
    discovered = {line.split("discover_sites: node ")[1].split()[0] for line in server_log.splitlines()
                  if "discover_sites: node " in line and " serves site " in line}
    assert {int(node) for node in discovered} == set(registered.values())
    for site, region in SITES.items():
        assert f"serves site {site} in region {region}" in server_log


def _assert_the_run_went_on_without_the_killed_node(processes: Processes, out: Path) -> None:
    assert "Sending: train" not in processes.log(KILLED)  # killed mid-round: its update never left
    rows = round_summaries(out)
    assert [row["round"] for row in rows] == [1, 2]
    for row in rows:  # france: paris alone (32 examples; marseille's 11 are lost), japan: 32 + 11 from one node
        assert row["train"]["france/num-examples"] == 32 and row["train"]["japan/num-examples"] == 43
    records = sorted((r["round"], r["site_id"], "error" in r) for r in site_records(out))
    others = [site for site in SITES if site != KILLED]
    assert records == sorted([(1, KILLED, True), *((n, site, False) for n in (1, 2) for site in others)])
    assert sorted(p.name for p in (out / "adapters").iterdir()) == ["france", "japan"]
    report = json.loads((out / "report.json").read_text())
    assert report["scored_by"] == "sites"
    assert report["sites_missing"] == [KILLED] and report["sites_scored"] == sorted(others)
    for variant in report["variants"].values():  # only paris shares its generated examples
        assert {ex["site_id"] for ex in variant["examples"]} <= {"paris"}
