"""fed_netgpt/run/simulation: what `fed-netgpt simulate` hands Flower's `flwr run` and prints of its stream."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import pytest

from fed_netgpt.config import ConfigError, SimulationConfig
from fed_netgpt.run.simulation import (
    LAUNCHER,
    RESOLVED_CONFIG,
    ConsoleRouter,
    app_pyproject,
    federation_config,
    process_identity,
)


def test_a_ray_of_this_machine_with_each_clients_share():
    items, env = federation_config(SimulationConfig(num_cpus_per_client=1.0, num_gpus_per_client=0.25), 4, cpus=2)
    assert items == ["num-supernodes=4", "client-resources-num-gpus=0.25", "client-resources-num-cpus=1",
                     "init-args-num-cpus=2"]
    assert env == {}


def test_a_fractional_cpu_share_scales_the_ray_so_as_many_clients_run_at_once():
    # Flower takes whole CPUs a client: 0.5 of 2 cores (4 at once) is 1 of 4 (still 4 at once); 2/3 of 2 is 2 of 6
    items, _ = federation_config(SimulationConfig(num_cpus_per_client=0.5), 9, cpus=2)
    assert "client-resources-num-cpus=1" in items and "init-args-num-cpus=4" in items
    items, _ = federation_config(SimulationConfig(num_cpus_per_client=2 / 3), 9, cpus=2)
    assert "client-resources-num-cpus=2" in items and "init-args-num-cpus=6" in items


def test_a_ray_address_joins_that_cluster_and_leaves_its_size_to_it():
    # Ray refuses num_cpus when it connects to a running cluster: only the address goes, through RAY_ADDRESS
    items, env = federation_config(SimulationConfig(ray_address="10.0.0.5:6379"), 4, cpus=2)
    assert env == {"RAY_ADDRESS": "10.0.0.5:6379"}
    assert not any(item.startswith("init-args") for item in items)
    assert "client-resources-num-cpus=2" in items


@pytest.mark.parametrize(("share", "address", "message"), [
    (0.0, "", "must be > 0"), (0.5, "auto", "whole CPUs per client; got 0.5")])
def test_a_cpu_share_flower_cannot_take_is_refused_naming_the_key(share, address, message):
    with pytest.raises(ConfigError, match=rf"simulation.num_cpus_per_client: .*{message}"):
        federation_config(SimulationConfig(num_cpus_per_client=share, ray_address=address), 4, cpus=2)


def test_the_app_folder_names_the_installed_apps_and_the_config_file(tmp_path: Path):
    config = tmp_path / 'a "quoted" \\ path' / "config.yaml"
    project = tomllib.loads(app_pyproject(config, "123:456"))
    assert project["tool"]["flwr"]["app"]["components"] == {"serverapp": "server.entry:simulation_app",
                                                            "clientapp": "clients.entry:app"}
    assert project["tool"]["flwr"]["app"]["config"] == {RESOLVED_CONFIG: str(config), LAUNCHER: "123:456"}
    assert project["project"]["dependencies"] == []  # nothing for Flower to install: the environment is ready


def test_the_console_splits_the_merged_stream_back_into_stdout_and_stderr_and_drops_flowers_chatter():
    router = ConsoleRouter()
    lines = [
        ("\x1b[92mINFO \x1b[0m:      Starting Flower Simulation", ""),
        ("12/07/2026 21:55:19:DEBUG:ServerApp finished running.", ""),
        ("\x1b[93mWARNING \x1b[0m:   Since flwr 1.32, default simulated SuperNodes changed from 10 to 2.", ""),
        ("INFO fed_netgpt.server: discover_sites: node 1 serves site paris in region france", "err"),
        ("WARNING strategies.groups: configure_train: group japan sits out round 2", "err"),
        ("\x1b[93mWARNING \x1b[0m:   a Flower warning", "err"),
        ("[round 1/2 | 0m13s elapsed, ETA 0m13s] france: train 10.747", "out"),
        ("\x1b[36m(ClientAppActor pid=25182)\x1b[0m [round 1] site marseille (france): loss 10.749", "out"),
        ("\x1b[36m(ClientAppActor pid=25182)\x1b[0m /x/modeling_utils.py:3312: FutureWarning: deprecated", "err"),
        ("\x1b[36m(ClientAppActor pid=25182)\x1b[0m   warnings.warn(", "err"),
        ("| base | 8 | 0.0% |", "out"),
        ("Traceback (most recent call last):", "err"),
        ('  File "server/app.py", line 9, in main', "err"),
        ("ValueError: the server's step", "err"),
        ("INFORMATION about Paris", "out"),
    ]
    assert [(line, router.route(line)) for line, _ in lines] == lines


def test_a_process_identity_tells_a_reused_pid_apart():
    me = process_identity(os.getpid())
    assert me.startswith(f"{os.getpid()}:") and me != f"{os.getpid()}:?"
    assert process_identity(os.getpid()) == me
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    assert process_identity(int(gone.stdout)) == f"{int(gone.stdout)}:?"


def test_the_simulation_process_group_ends_when_its_launcher_does():
    # Prepare: a stand-in launcher, and a "simulation" in a session of its own (as Flower starts it) with a child
    launcher = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    simulation = subprocess.Popen(
        [sys.executable, "-c", "import subprocess, sys, time\n"
         "from fed_netgpt.run.simulation import end_with\n"
         "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
         "print(child.pid, flush=True)\n"
         f"end_with({process_identity(launcher.pid)!r}, poll_seconds=0.05)\n"
         "time.sleep(60)\n"], stdout=subprocess.PIPE, text=True, start_new_session=True)
    try:
        assert simulation.stdout is not None
        child = int(simulation.stdout.readline())
        time.sleep(0.3)
        assert simulation.poll() is None  # the launcher lives: the simulation goes on
        # Execute: the launcher is killed
        launcher.kill()
        launcher.wait()
        # Assert: the simulation and its child are gone within a moment
        assert simulation.wait(timeout=10) == -9
        deadline = time.monotonic() + 10
        while not _gone(child) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _gone(child)
    finally:
        for process in (launcher, simulation):
            if process.poll() is None:
                process.kill()


def _gone(pid: int) -> bool:
    """Exited (a zombie counts: where PID 1 reaps nothing, an orphan stays one)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def test_a_child_armed_to_die_with_its_parent_does_when_the_parent_is_killed():
    # what `compare` does to each of its `simulate` runs: a SIGKILL of the comparison ends them too
    parent = subprocess.Popen(
        [sys.executable, "-c", "import signal, subprocess, sys, time\n"
         "from fed_netgpt.run.simulation import dying_with_parent\n"
         "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'],"
         " preexec_fn=dying_with_parent(signal.SIGTERM))\n"
         "print(child.pid, flush=True)\n"
         "time.sleep(60)\n"], stdout=subprocess.PIPE, text=True)
    assert parent.stdout is not None
    child = int(parent.stdout.readline())
    assert not _gone(child)
    parent.kill()
    parent.wait()
    deadline = time.monotonic() + 10
    while not _gone(child) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _gone(child)


def test_the_apps_flower_loads_for_a_simulation_import_no_model_library():
    # Flower's simulation process imports both before it starts Ray: torch and the like are imported when they run
    loaded = subprocess.run([sys.executable, "-c", "import sys, server.entry, clients.entry; "
                             "print(sorted({'torch', 'transformers', 'peft', 'fed_netgpt'} & set(sys.modules)))"],
                            capture_output=True, text=True, check=True)
    assert loaded.stdout.strip() == "[]"
