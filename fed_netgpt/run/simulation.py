"""`fed-netgpt simulate` on the path Flower keeps: `flwr run` against a SuperLink whose runtime is simulation.

Flower retires `run_simulation` (the Python entry point); what it supports is `flwr run APP SUPERLINK`. The
command starts a SuperLink of its own for each run, on a free port of 127.0.0.1 and with an in-memory state (two
runs on one machine never share one, and none outlives its run), and hands it an app folder that holds nothing
but a pyproject.toml: it names the installed ServerApp and ClientApp and the resolved config's path, so the code
that runs is the installed code and the app archive stays a few hundred bytes whatever else lies beside it. The
run's log stream is printed without Flower's own INFO/DEBUG lines (the ServerApp sends Flower's INFO log to
`<run>/flower.log`); the SuperLink's log is `<run>/superlink.log`.

Nothing here imports flwr: Flower's own commands are the interface (they run in this interpreter's environment,
with runtime dependency installation off, since the environment is already installed).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from fractions import Fraction
from pathlib import Path

from fed_netgpt.config import ConfigError, SimulationConfig

RESOLVED_CONFIG = "resolved-config"  # the run_config key naming the config file the simulation ServerApp reads
LAUNCHER = "launcher"  # the run_config key naming the `fed-netgpt simulate` process ("PID:START") the run lives for
SUPERLINK_START_SECONDS = 60.0
_STARTED_RUN = re.compile(r"Successfully started run \d+")
# Flower's own INFO/DEBUG lines, as its logger prints them ("INFO :  ...", "12/07/2026 21:53:01:DEBUG:...")
_FLOWER_CHATTER = re.compile(r"^(\x1b\[\d+m)?(INFO|DEBUG)\s*(\x1b\[0m)?\s*:"
                             r"|^\d\d/\d\d/\d{4} \d\d:\d\d:\d\d:(INFO|DEBUG):")

_STDERR_RECORD = re.compile(r"(DEBUG|INFO|WARNING|ERROR|CRITICAL) [A-Za-z_][\w.]*: "  # fed-netgpt's log format
                            r"|(\x1b\[\d+m)?(WARNING|ERROR|CRITICAL)\s*(\x1b\[0m)?\s*:"  # Flower's warnings
                            r"|\S+\.py:\d+: \w*Warning: |\s+warnings\.warn\(")  # Python's warnings
_RAY_PREFIX = re.compile(r"^(\x1b\[\d+m)?\(\w+ pid=\d+\)(\x1b\[0m)? ")  # a Ray worker's "(ClientAppActor pid=7) "
_NOT_FOR_THIS_RUN = ("default simulated SuperNodes changed", "Successfully installed fed-netgpt-simulation")


class SimulationError(RuntimeError):
    """Flower's SuperLink or `flwr run` failed before the run could start (not a failed round)."""


def federation_config(simulation: SimulationConfig, num_supernodes: int, cpus: int) -> tuple[list[str], dict]:
    """`flwr run --federation-config` items and the environment for this run's Ray.

    Flower's federation config takes whole CPUs per ClientApp; a fractional share (0.5: two sites at once per core)
    is kept exact by scaling both sides: p/q CPUs a client on `cpus` cores is p CPUs a client on cpus*q. A Ray
    cluster (`simulation.ray_address`) is joined through RAY_ADDRESS, and its size is its own."""
    share = Fraction(simulation.num_cpus_per_client).limit_denominator(100)
    if share <= 0:
        raise ConfigError(f"simulation.num_cpus_per_client: must be > 0, got {simulation.num_cpus_per_client}")
    items = [f"num-supernodes={num_supernodes}", f"client-resources-num-gpus={float(simulation.num_gpus_per_client)}"]
    if simulation.ray_address:
        if share.denominator != 1:
            raise ConfigError("simulation.num_cpus_per_client: a Ray cluster (simulation.ray_address) takes whole CPUs "
                              f"per client; got {simulation.num_cpus_per_client}")
        return [*items, f"client-resources-num-cpus={share.numerator}"], {"RAY_ADDRESS": simulation.ray_address}
    return [*items, f"client-resources-num-cpus={share.numerator}",
            f"init-args-num-cpus={cpus * share.denominator}"], {}


def app_pyproject(config_path: Path, launcher: str) -> str:
    """The pyproject.toml of the app folder `flwr run` packs: the installed apps, and where the config is."""
    return (
        '[project]\nname = "fed-netgpt-simulation"\nversion = "1.0.0"\n'
        'description = "fed-netgpt simulate: the installed fed-netgpt apps, run on a resolved config"\n'
        'license = "Apache-2.0"\ndependencies = []\n\n'
        '[tool.flwr.app]\npublisher = "fed-netgpt"\n\n'
        '[tool.flwr.app.components]\nserverapp = "server.entry:simulation_app"\nclientapp = "clients.entry:app"\n\n'
        f'[tool.flwr.app.config]\n"{RESOLVED_CONFIG}" = "{_toml_string(str(config_path))}"\n'
        f'"{LAUNCHER}" = "{launcher}"\n'
    )


class ConsoleRouter:
    """Where a line of the run's log stream goes: Flower merges the simulation's stdout and stderr into one
    stream, so they are told apart again by their form. Log records (fed-netgpt's "LEVEL name: message" and
    Flower's warnings), Python warnings and tracebacks go to stderr, as they would from the process itself;
    the progress lines and the report to stdout; Flower's INFO/DEBUG chatter and notes that do not apply to a run
    whose SuperLink, app and node count the command chose itself nowhere."""

    def __init__(self) -> None:
        self._in_traceback = False

    def route(self, line: str) -> str:
        """"out", "err" or "" (dropped)."""
        if _FLOWER_CHATTER.match(line) or any(note in line for note in _NOT_FOR_THIS_RUN):
            return ""
        text = _RAY_PREFIX.sub("", line)
        if self._in_traceback:
            self._in_traceback = text[:1].isspace()  # the exception's own line ends it
            return "err"
        if text.startswith("Traceback (most recent call last):"):
            self._in_traceback = True
            return "err"
        return "err" if _STDERR_RECORD.match(text) else "out"


def run_simulation_app(config_yaml: str, simulation: SimulationConfig, num_supernodes: int, run_dir: Path) -> None:
    """Run the federation described by `config_yaml` (a resolved config) on a SuperLink started for it; returns
    when the run has ended. What the run produced is judged by the caller, from the run folder."""
    items, ray_env = federation_config(simulation, num_supernodes, os.cpu_count() or 1)
    with tempfile.TemporaryDirectory(prefix="fed-netgpt-sim-") as scratch:
        root = Path(scratch)
        (root / "app").mkdir()
        (root / "config.yaml").write_text(config_yaml)
        (root / "app" / "pyproject.toml").write_text(app_pyproject(root / "config.yaml", process_identity(os.getpid())))
        env = _flower_environment(root / "flwr-home", ray_env)
        run_dir.mkdir(parents=True, exist_ok=True)
        with _superlink(env, run_dir / "superlink.log") as port:
            (root / "flwr-home" / "config.toml").write_text(
                f'[superlink]\ndefault = "simulation"\n\n[superlink.simulation]\n'
                f'address = "127.0.0.1:{port}"\ninsecure = true\n')
            command = [_tool("flwr"), "run", str(root / "app"), "simulation", "--stream",
                       "--federation-config", " ".join(items)]
            _stream(command, env)  # returns once the run has finished: the SuperLink ends the stream then


def process_identity(pid: int) -> str:
    """"PID:START" (start in clock ticks since boot): names one process, even after its pid is reused."""
    fields = _proc_stat(pid)
    return f"{pid}:{fields[19] if fields else '?'}"  # no /proc: the pid alone


def _proc_stat(pid: int) -> list[str] | None:
    """The fields of /proc/PID/stat after the command name (state, parent, ..., start time), or None when the
    process is gone or there is no /proc."""
    try:
        fields = (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return fields if len(fields) > 19 else None


def end_with(launcher: str, poll_seconds: float = 0.5) -> None:
    """In the simulation process: a daemon thread that ends this process group (the simulation and its Ray)
    as soon as the `fed-netgpt simulate` process that launched it is gone, however it went (Ctrl-C, SIGKILL,
    a closed terminal). Flower starts the simulation in a session of its own, out of reach of both the
    launcher's process group and its SuperLink's death signal; without this a run would go on, unlocked,
    writing into its folder after its command ended."""
    def watch() -> None:
        pid = int(launcher.split(":")[0])
        while process_identity(pid) == launcher:
            time.sleep(poll_seconds)
        os.killpg(os.getpgid(0), signal.SIGKILL)

    threading.Thread(target=watch, name="end-with-launcher", daemon=True).start()


def _flower_environment(flwr_home: Path, ray_env: dict) -> dict:
    flwr_home.mkdir()
    bin_dir = str(Path(sys.executable).parent)  # flower-superlink, flwr and flwr-simulation of this environment
    return {**os.environ, **ray_env, "FLWR_HOME": str(flwr_home), "FLWR_DISABLE_UPDATE_CHECK": "1",
            "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
            "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"}


@contextmanager
def _superlink(env: dict, log_file: Path) -> Iterator[int]:
    """A SuperLink in simulation mode on a free port. It stays in this command's process group (Ctrl-C, or a
    kill of the group, reaches it and all it started) and dies with this process (PR_SET_PDEATHSIG), so a run
    never goes on without the command that holds its lock; on the way out its whole tree is stopped."""
    port = _free_port()
    command = [_tool("flower-superlink"), "--insecure", "--simulation", "--isolation", "subprocess",
               "--host", "127.0.0.1", "--port", str(port), "--disable-runtime-dependency-installation",
               "--log-file", str(log_file)]
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               preexec_fn=dying_with_parent(signal.SIGKILL))
    previous = signal.signal(signal.SIGTERM, _exit_on_sigterm)
    try:
        _wait_for_health(process, port, log_file)
        yield port
    finally:
        signal.signal(signal.SIGTERM, previous)
        _stop_tree(process)


def dying_with_parent(sig: int) -> Callable[[], None]:
    """For `preexec_fn`: the child gets `sig` when this process dies, however it dies (Linux's
    PR_SET_PDEATHSIG; elsewhere nothing)."""
    def arm() -> None:
        if sys.platform == "linux":
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, sig)  # 1: PR_SET_PDEATHSIG

    return arm


def _exit_on_sigterm(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)  # runs the `finally` that stops the SuperLink's tree


def _wait_for_health(process: subprocess.Popen, port: int, log_file: Path) -> None:
    deadline = time.monotonic() + SUPERLINK_START_SECONDS
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SimulationError(f"Flower's SuperLink exited with code {process.returncode} at start; see {log_file}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1) as answer:
                if answer.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.2)
    raise SimulationError(f"Flower's SuperLink did not answer within {SUPERLINK_START_SECONDS:.0f}s; see {log_file}")


def _stop_tree(process: subprocess.Popen) -> None:
    """SIGTERM to the SuperLink and everything under it (the simulation process, its Ray), then SIGKILL to what
    is left after a grace period."""
    for sig, grace in ((signal.SIGTERM, 15.0), (signal.SIGKILL, 5.0)):
        tree = [process.pid, *_descendants(process.pid)]
        for pid in tree:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and (process.poll() is None or _any_alive(tree[1:])):
            time.sleep(0.1)
        if process.poll() is not None and not _any_alive(tree[1:]):
            return


def _descendants(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for folder in Path("/proc").glob("[0-9]*"):
        fields = _proc_stat(int(folder.name))
        if fields:
            children.setdefault(int(fields[1]), []).append(int(folder.name))
    found, todo = [], [root]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _any_alive(pids: list[int]) -> bool:
    """Whether any of `pids` still runs; a zombie (exited, not yet reaped: in a container whose first process
    reaps nothing, never) does not."""
    return any((fields := _proc_stat(pid)) and fields[0] not in ("Z", "X") for pid in pids)


def _stream(command: list[str], env: dict) -> None:
    """Run `flwr run --stream`, printing its lines on stdout or stderr (`ConsoleRouter`). The SuperLink ends the
    stream when the run's status is finished; a broken stream is an error exit of `flwr`."""
    started = False
    tail: list[str] = []
    router = ConsoleRouter()
    with subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          errors="replace") as flwr:
        for line in flwr.stdout or ():
            tail = [*tail[-19:], line]
            if not started:
                started = bool(_STARTED_RUN.search(line))
            elif where := router.route(line):
                console = sys.stdout if where == "out" else sys.stderr
                console.write(line)
                console.flush()
    if flwr.returncode != 0 or not started:
        raise SimulationError(f"`flwr run` failed (exit {flwr.returncode}):\n{''.join(tail).rstrip()}")


def _tool(name: str) -> str:
    """Flower's command of this environment: beside this interpreter (a virtual environment), else on PATH."""
    beside = Path(sys.executable).parent / name
    found = str(beside) if beside.is_file() else shutil.which(name)
    if not found:
        raise SimulationError(f"Flower's `{name}` command is neither beside {sys.executable} nor on PATH; "
                              "install flwr[simulation] into this environment")
    return found


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _toml_string(text: str) -> str:
    return text.replace("\\", "\\\\").replace('"', '\\"')
