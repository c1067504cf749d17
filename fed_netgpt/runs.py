"""The run folder contract (ARCHITECTURE.md): config, regional adapters, checkpoints, metrics, report."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import load_file, save_file

from fed_netgpt.adapters import AdapterState, attach_adapter, save_adapter
from fed_netgpt.config import Config, ConfigError, from_yaml, to_yaml
from fed_netgpt.models import BaseModel


class RunFolderError(ValueError):
    """A path that is not a finished run folder; the message says what is missing."""


def start_run(config: Config) -> Path:
    """Create the run folder and write config.yaml; a resumed run keeps its metrics.jsonl."""
    folder = Path(config.run.output_dir)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.yaml").write_text(to_yaml(config))
    if not config.run.resume or not (folder / "metrics.jsonl").is_file():
        (folder / "metrics.jsonl").write_text("")
    return folder


def read_run_config(folder: str | Path) -> Config:
    path = Path(folder) / "config.yaml"
    if not path.is_file():
        raise RunFolderError(f"{folder} is not a run folder: config.yaml is missing")
    try:
        return from_yaml(path.read_text())
    except ConfigError as err:
        raise RunFolderError(f"{path}: {err}") from None


GLOBAL = "global"  # the adapter's name when federation.adapters=global


def serving_adapter(config: Config, region: str) -> str:
    """Which saved adapter serves `region`: its own, or the one global adapter."""
    return GLOBAL if config.federation.adapters == GLOBAL else region


def adapter_dir(folder: str | Path, region: str) -> Path:
    return Path(folder) / "adapters" / region


def run_regions(folder: str | Path) -> list[str]:
    """Regions with a saved adapter in the run folder."""
    root = Path(folder) / "adapters"
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if (p / "adapter_model.safetensors").is_file())


def save_adapters(folder: Path, base: BaseModel, config: Config, states: dict[str, AdapterState]) -> None:
    """Each region's adapter as a peft folder under adapters/<region>/."""
    model = attach_adapter(base, "export", config.lora)
    for region, state in states.items():
        save_adapter(model, "export", adapter_dir(folder, region), state=state)


def save_checkpoint(folder: Path, server_round: int, merged: dict[str, np.ndarray]) -> Path:
    """checkpoints/round-<n>/: every region's adapter ("<region>/<key>" tensors) and the round number."""
    path = folder / "checkpoints" / f"round-{server_round}"
    path.mkdir(parents=True, exist_ok=True)
    save_file({k: np.ascontiguousarray(v) for k, v in merged.items()}, str(path / "adapters.safetensors"))
    (path / "state.json").write_text(json.dumps({"round": server_round}))
    return path


def latest_checkpoint(folder: Path) -> tuple[int, dict[str, np.ndarray]] | None:
    """The highest round checkpointed in `folder` and its arrays, or None when there is none."""
    rounds = sorted(
        int(path.name.removeprefix("round-")) for path in (folder / "checkpoints").glob("round-*")
        if path.name.removeprefix("round-").isdigit() and (path / "adapters.safetensors").is_file()
    )
    if not rounds:
        return None
    return rounds[-1], load_file(str(folder / "checkpoints" / f"round-{rounds[-1]}" / "adapters.safetensors"))


def append_metrics(folder: Path, row: dict[str, Any]) -> None:
    with (folder / "metrics.jsonl").open("a") as out:
        out.write(json.dumps(row) + "\n")
