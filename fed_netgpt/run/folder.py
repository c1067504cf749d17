"""The run folder contract (ARCHITECTURE.md): config, regional adapters, checkpoints, metrics, report."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import shutil
import time
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import IO, Any

import numpy as np
from safetensors.numpy import save_file

from fed_netgpt.config import Config, ConfigError, from_yaml, to_yaml
from fed_netgpt.evaluation.report import write_atomically
from fed_netgpt.model.adapters import AdapterError, AdapterState, attach_adapter, publish_adapter, read_tensors
from fed_netgpt.model.base import BaseModel


class RunFolderError(ValueError):
    """A path that is not a finished run folder; the message says what is missing."""


OWNED = ("adapters", "site_adapters", "checkpoints")  # what a fresh run clears of an earlier one in its folder
PUBLISHED = "published.json"  # written last, once every final adapter is in place: serving reloads on it
METRICS = "metrics.jsonl"  # a run's rounds and sites, one JSON object a line (ARCHITECTURE.md: run folder)
FAILED = "failed.json"  # a run that never trained some adapter: complete, evaluate and serve refuse the folder


LOCK = ".lock"  # held by the process writing the folder; left behind, it marks a folder fed-netgpt wrote


@contextlib.contextmanager
def run_lock(path: str | Path) -> Iterator[Path]:
    """Create the run folder and hold its lock for the block: a second run into the same folder while one is
    running is refused (a killed run releases it too), and a folder that cannot be one (a file, unwritable, a
    folder of someone else's files) is named before anything is written there."""
    folder = Path(path)
    if folder.exists() and not folder.is_dir():
        raise RunFolderError(f"run.output_dir={folder} is a file, not a folder")
    check_folder_is_ours(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        lock = (folder / LOCK).open("a+")
    except OSError as err:
        raise RunFolderError(f"run.output_dir={folder}: cannot write there ({err.strerror})") from None
    with lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RunFolderError(f"run.output_dir={folder} is in use by a running run ({_holder(lock)}); wait for "
                                 "it or choose another folder") from None
        lock.seek(0)
        lock.truncate()
        lock.write(f"pid {os.getpid()}")
        lock.flush()
        try:
            yield folder
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def check_folder_is_ours(folder: Path) -> None:
    """A run writes only into a new or empty folder or one that fed-netgpt wrote before (a run, resumed or run
    again, or a comparison): a fresh run clears adapters/, checkpoints/ and site_adapters/ there, and a folder of
    the user's own files must never lose one."""
    if not folder.is_dir() or (folder / "run.json").is_file() or _our_lock(folder / LOCK):
        return
    entries = sorted(p.name + ("/" if p.is_dir() else "") for p in folder.iterdir())
    if entries:
        shown = ", ".join(entries[:4]) + (f" and {len(entries) - 4} more" if len(entries) > 4 else "")
        raise RunFolderError(f"run.output_dir={folder} holds files no fed-netgpt run wrote ({shown}); nothing was "
                             "written there: choose a new or empty folder")


def _our_lock(path: Path) -> bool:
    try:
        return path.read_text().startswith("pid ")
    except OSError:
        return False


MANIFEST_PACKAGES = ("torch", "transformers", "peft", "flwr", "opacus", "numpy", "safetensors")


def manifest(config: Config) -> dict[str, Any]:
    """What produced a run: package versions, the code's commit, the machine's CPU and GPU features, and the
    device and precision the run resolved (a number is only comparable with this beside it)."""
    import importlib.metadata
    import platform
    import subprocess

    import torch

    versions: dict[str, str | None] = {}
    for name in MANIFEST_PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                                text=True, timeout=5).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        commit = None
    try:
        cpuinfo = dict(line.split(":", 1) for line in Path("/proc/cpuinfo").read_text().splitlines() if ":" in line)
    except OSError:
        cpuinfo = {}
    cpuinfo = {key.strip(): value.strip() for key, value in cpuinfo.items()}
    flags = cpuinfo.get("flags", "")
    return {"python": platform.python_version(), "packages": versions, "commit": commit,
            "cpu": {"model": cpuinfo.get("model name") or platform.machine(), "cores": os.cpu_count(),
                    "features": sorted(set(flags.split()) & {"avx2", "avx512f", "avx512_bf16", "amx_bf16",
                                                             "amx_tile"})},
            "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
            "device": config.train.device, "bf16": config.train.bf16}


def start_run(config: Config) -> tuple[Path, str]:
    """Create the run folder, write config.yaml, return it and the run's id (kept when resumed).

    A fresh run removes the adapters and checkpoints an earlier run left in the folder, so nothing stale is
    served or continued; a resumed run keeps them and its metrics.jsonl.
    """
    folder = Path(config.run.output_dir)
    folder.mkdir(parents=True, exist_ok=True)
    resuming = config.run.resume and (folder / "run.json").is_file()
    if not resuming:
        (folder / PUBLISHED).unlink(missing_ok=True)
        (folder / FAILED).unlink(missing_ok=True)
        for name in OWNED:
            shutil.rmtree(folder / name, ignore_errors=True)
        (folder / "run.json").write_text(json.dumps({"run_id": uuid.uuid4().hex}))
    (folder / "config.yaml").write_text(to_yaml(config))
    (folder / "manifest.json").write_text(json.dumps(manifest(config), indent=1))
    if resuming:
        restore_metrics(folder, latest_round(folder))
    else:
        (folder / METRICS).write_text("")
    return folder, str(json.loads((folder / "run.json").read_text())["run_id"])


def read_run_config(folder: str | Path) -> Config:
    path = Path(folder) / "config.yaml"
    if not path.is_file():
        raise RunFolderError(f"{folder} is not a run folder: config.yaml is missing")
    try:
        return from_yaml(path.read_text())
    except ConfigError as err:
        raise RunFolderError(f"{path}: {err}") from None


GLOBAL = "global"  # the adapter's name when federation.adapters=global
LOCAL = "local"  # federation.adapters=local: every site trains alone, its adapter under site_adapters/


def aggregation_group(config: Config, site_id: str, region: str) -> str:
    """Which adapter a site trains in the federation: its region's, the one global adapter, or its own."""
    return {GLOBAL: GLOBAL, LOCAL: site_id}.get(config.federation.adapters, region)


def federated_variant(config: Config) -> str:
    """The report's name for what the federation trained: regional, global or local."""
    return config.federation.adapters


def serving_adapter(folder: str | Path, config: Config, region: str, site_id: str = "",
                    variant: str = "personalized") -> Path | None:
    """The one place that decides which adapter folder serves a site of `region` (None: the base model).

    `personalized` (what `complete` and serving use): the site's own adapter when it has one, else the region's
    (or the global one). The federated variant (`regional`, `global`, `local`) ignores site adapters except in a
    local run, where a site's own adapter is all there is and a site that never trained gets the base model.
    """
    if variant == "base":
        return None
    own = site_adapter_dir(folder, site_id) if site_id else None
    local = config.federation.adapters == LOCAL
    if own is not None and (variant == "personalized" or local) and is_adapter(own):
        return own
    if local:
        return None
    name = aggregation_group(config, site_id, region)
    path = adapter_dir(folder, name)
    if not is_adapter(path):
        known = ", ".join(run_regions(folder)) or "none"
        raise RunFolderError(f"region {region!r} has no adapter {path}; adapters in the run: {known}")
    return path


def adapter_dir(folder: str | Path, region: str) -> Path:
    return Path(folder) / "adapters" / region


def site_adapter_dir(folder: str | Path, site_id: str) -> Path:
    """Where a site keeps its own adapter (simulation: inside the run folder, standing for the site's disk)."""
    return Path(folder) / "site_adapters" / site_id


def is_adapter(folder: Path) -> bool:
    return (folder / "adapter_model.safetensors").is_file() and (folder / "adapter_config.json").is_file()


def run_regions(folder: str | Path) -> list[str]:
    """Regions with a saved adapter in the run folder."""
    root = Path(folder) / "adapters"
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if (p / "adapter_model.safetensors").is_file())


def save_adapters(folder: Path, base: BaseModel, config: Config, states: dict[str, AdapterState],
                  publish: bool = True) -> None:
    """Each group's adapter as a peft folder: adapters/<region or global>/, or site_adapters/<site>/ when local;
    each swapped in whole, then (unless the run failed) `published.json` says the run's adapters are final."""
    model = attach_adapter(base, "export", config.lora)
    place = site_adapter_dir if config.federation.adapters == LOCAL else adapter_dir
    for group, state in states.items():
        publish_adapter(model, "export", place(folder, group), state=state)
    if not publish:
        return
    run_id = json.loads((folder / "run.json").read_text())["run_id"] if (folder / "run.json").is_file() else ""
    marker = {"run_id": run_id, "rounds": config.federation.num_rounds, "adapters": sorted(states),
              "published_at": time.time()}
    write_atomically(folder / PUBLISHED, json.dumps(marker))


def never_updated(folder: str | Path, groups: list[str]) -> list[str]:
    """The adapters (regions, or sites when local) that no round of the run ever aggregated an update for."""
    rows = round_summaries(folder)
    return [g for g in groups if not any(row.get("train", {}).get(f"{g}/num-examples", 0) > 0 for row in rows)]


def failure_summary(folder: str | Path) -> dict[str, Any]:
    """How many site-rounds failed or were rejected, and why (the reasons by count), from metrics.jsonl."""
    reasons: dict[str, int] = {}
    records = site_records(folder)
    for record in records:
        reason = record.get("error") or record.get("rejected")
        if reason:
            key = short_reason(str(reason))
            reasons[key] = reasons.get(key, 0) + 1
    return {"site_rounds": len(records), "failed_or_rejected": sum(reasons.values()),
            "reasons": dict(sorted(reasons.items(), key=lambda item: -item[1]))}


_RAISED = re.compile(r"^\s*(?:[\w.]+\.)?(\w+(?:Error|Exception|Crash|Exhausted|Interrupt)): (.+)$")


def short_reason(reason: str, width: int = 160) -> str:
    """One line for a site's failure: the last `Error: message` line of a traceback (Flower's simulation returns
    the whole Ray traceback as the reason), else its first line."""
    raised = [m for m in map(_RAISED.match, reason.splitlines()) if m]
    line = f"{raised[-1][1]}: {raised[-1][2]}" if raised else (reason.splitlines() or [""])[0]
    return line.strip()[:width]


def mark_failed(folder: Path, reason: str) -> None:
    write_atomically(folder / FAILED, json.dumps({"reason": reason, "failure_summary": failure_summary(folder)}))


def check_finished(folder: str | Path, config: Config) -> None:
    """The one rule for evaluate, complete and serve: a run's adapters are used only once it finished. A failed
    run's folder says why; a run still going, or stopped (killed) before its last round, is named as such. A run
    that checkpointed every round counts as finished even without published.json (it predates the marker)."""
    folder = Path(folder)
    path = folder / FAILED
    if path.is_file():
        try:
            reason = json.loads(path.read_text()).get("reason", "see the file")
        except ValueError:
            reason = "see the file"
        raise RunFolderError(f"{folder} holds a failed run ({reason}); {path} says so. Train it again")
    if published(folder) is not None:
        return
    done, planned = latest_round(folder), config.federation.num_rounds
    if done >= planned:
        return
    holder = _lock_holder(folder / LOCK)
    if holder:
        raise RunFolderError(f"{folder} holds a run still going ({holder}, {done} of {planned} rounds done); wait "
                             f"for its {PUBLISHED}")
    raise RunFolderError(f"{folder} holds a run that stopped after {done} of {planned} rounds (no {PUBLISHED}); "
                         f"its adapters are not final: fed-netgpt simulate --resume {folder}")


def _lock_holder(path: Path) -> str | None:
    """Who holds the run folder's lock now ("pid N"), or None when nobody does."""
    try:
        with path.open("r") as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                return _holder(lock)
            fcntl.flock(lock, fcntl.LOCK_UN)
    except OSError:
        pass
    return None


def _holder(lock: IO[str]) -> str:
    """What the lock's holder wrote in it ("pid N")."""
    lock.seek(0)
    return lock.read().strip() or "another process"


def published(folder: str | Path) -> dict[str, Any] | None:
    """The run's publication marker (None: the run is not finished, or predates the marker)."""
    path = Path(folder) / PUBLISHED
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def save_checkpoint(folder: Path, server_round: int, merged: dict[str, np.ndarray],
                    optimizer: dict[str, np.ndarray] | None = None, rows: Sequence[dict[str, Any]] = (),
                    sampling: Any = None) -> Path:
    """checkpoints/round-<n>/: every region's adapter ("<region>/<key>" tensors), the server optimizer's state
    when there is one (optimizer.safetensors), the round number, the state of the generator that samples sites
    (`sampling`: Python's `random.getstate()`, which Flower's strategies draw from) and the round's metrics.jsonl
    rows (with DP they carry each site's accountant state); written beside, then renamed into place, so a crash
    mid-write leaves the previous round's checkpoint the latest."""
    path = folder / "checkpoints" / f"round-{server_round}"
    staging = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    save_file({k: np.ascontiguousarray(v) for k, v in merged.items()}, str(staging / "adapters.safetensors"))
    if optimizer:
        save_file({k: np.ascontiguousarray(v) for k, v in optimizer.items()}, str(staging / "optimizer.safetensors"))
    (staging / "state.json").write_text(json.dumps({"round": server_round, "sampling": sampling}))
    (staging / METRICS).write_text("".join(json.dumps(row) + "\n" for row in rows))
    shutil.rmtree(path, ignore_errors=True)
    staging.rename(path)
    return path


def checkpoint_sampling(folder: Path, server_round: int) -> tuple | None:
    """The site-sampling generator's state saved with round `server_round` (None: an older checkpoint), in the
    form `random.setstate` takes."""
    path = folder / "checkpoints" / f"round-{server_round}" / "state.json"
    try:
        saved = json.loads(path.read_text()).get("sampling")
    except (OSError, ValueError) as err:
        raise RunFolderError(f"{path}: not readable as JSON ({err})") from None
    if saved is None:
        return None
    version, internal, gauss = saved
    return version, tuple(internal), gauss


def checkpoint_optimizer(folder: Path, server_round: int) -> dict[str, np.ndarray]:
    """The server optimizer's state saved with round `server_round` ({} when it had none)."""
    path = folder / "checkpoints" / f"round-{server_round}" / "optimizer.safetensors"
    return _checkpoint_file(path) if path.is_file() else {}


def latest_round(folder: Path) -> int:
    """The highest round checkpointed in `folder` (0: none)."""
    return max((int(path.name.removeprefix("round-")) for path in (folder / "checkpoints").glob("round-*")
                if path.name.removeprefix("round-").isdigit() and (path / "adapters.safetensors").is_file()),
               default=0)


def latest_checkpoint(folder: Path) -> tuple[int, dict[str, np.ndarray]] | None:
    """The highest round checkpointed in `folder` and its arrays, or None when there is none."""
    done = latest_round(folder)
    if not done:
        return None
    return done, _checkpoint_file(folder / "checkpoints" / f"round-{done}" / "adapters.safetensors")


def _checkpoint_file(path: Path) -> dict[str, np.ndarray]:
    """A checkpoint's tensors; a damaged file is a RunFolderError that says how to fall back a round."""
    try:
        tensors = read_tensors(path)
    except AdapterError as err:
        raise RunFolderError(f"{err}; remove {path.parent} to resume from the round before it") from None
    bad = [key for key, value in tensors.items() if not np.all(np.isfinite(value))]
    if bad:
        raise RunFolderError(f"{path}: tensor {bad[0]!r} holds NaN or inf; remove {path.parent} to resume from "
                             "the round before it")
    return tensors


def metrics_rows(path: Path) -> list[dict[str, Any]]:
    """The rows of a metrics.jsonl; a last line cut short by a crash mid-write is left out."""
    if not path.is_file():
        return []
    lines = path.read_text().splitlines()
    rows = []
    for number, line in enumerate(lines, start=1):
        try:
            if line.strip():
                rows.append(json.loads(line))
        except ValueError:
            if number < len(lines):
                raise RunFolderError(f"{path}:{number}: not a JSON object, expected one row a line") from None
    return rows


def restore_metrics(folder: Path, done: int) -> None:
    """Before a resumed run goes on after round `done`: metrics.jsonl holds rounds 1..done exactly once. A crash
    may have struck after the checkpoint was renamed into place and before (or while) its rows were appended:
    the round's rows come from the checkpoint, and nothing after it is kept."""
    rows = [row for row in metrics_rows(folder / METRICS) if int(row.get("round", 0)) <= done]
    saved = folder / "checkpoints" / f"round-{done}" / METRICS
    if done and saved.is_file():
        rows = [row for row in rows if int(row.get("round", 0)) < done] + metrics_rows(saved)
    write_atomically(folder / METRICS, "".join(json.dumps(row) + "\n" for row in rows))


def round_summaries(folder: str | Path) -> list[dict[str, Any]]:
    """The per-round summary rows of metrics.jsonl, per-site records left out ([] before the first round)."""
    return [row for row in metrics_rows(Path(folder) / METRICS) if "round" in row and "site_id" not in row]


def site_records(folder: str | Path) -> list[dict[str, Any]]:
    """The per-site records of metrics.jsonl (a site's metrics or error, each round it was asked to train)."""
    return [row for row in metrics_rows(Path(folder) / METRICS) if "site_id" in row]


def run_finished(folder: str | Path, config: Config) -> bool:
    """Whether `folder` holds a run of exactly `config` that recorded its last round."""
    path = Path(folder) / "config.yaml"
    if not path.is_file() or path.read_text() != to_yaml(config):
        return False
    return any(row["round"] == config.federation.num_rounds for row in round_summaries(folder))


def append_metrics(folder: Path, rows: Sequence[dict[str, Any]]) -> None:
    with (folder / METRICS).open("a") as out:
        out.write("".join(json.dumps(row) + "\n" for row in rows))
