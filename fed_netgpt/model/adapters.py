"""LoRA adapters on the shared frozen base: build, move state as NumPy arrays, save/load in peft format.

Every adapter a process uses is a named peft adapter on the one base model, so switching region is a
`set_adapter` call, not a model copy. On disk an adapter is `adapter_config.json` +
`adapter_model.safetensors`, loadable by stock `peft.PeftModel.from_pretrained(base, folder)`.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
from peft import LoraConfig as PeftLoraConfig
from peft import PeftModel, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
from safetensors.numpy import load_file, save_file

from fed_netgpt.config import ConfigError, LoraConfig
from fed_netgpt.model.base import BaseModel

AdapterState = dict[str, np.ndarray]
_PEFT_MODELS: dict[int, PeftModel] = {}


class AdapterError(ValueError):
    """An adapter file or update that does not fit the base model; the message says what differs."""


def peft_config(config: LoraConfig, base: BaseModel) -> PeftLoraConfig:
    """peft's LoraConfig; the base path is the local folder, so peft never looks the model up on a hub."""
    return PeftLoraConfig(
        r=config.r, lora_alpha=config.alpha, lora_dropout=config.dropout, target_modules=list(config.target_modules),
        task_type="CAUSAL_LM", base_model_name_or_path=base.model.name_or_path,
    )


def check_rank(base: BaseModel, config: LoraConfig) -> None:
    """`lora.target_modules` must name layers of the model, and `lora.r` must not pass the smallest dimension of
    those layers: a larger rank adds parameters and time but no capacity (B·A cannot exceed that rank)."""
    targets = set(config.target_modules)
    dims = [min(module.weight.shape) for name, module in base.model.named_modules()
            if name.rsplit(".", 1)[-1] in targets and getattr(module, "weight", None) is not None
            and module.weight.dim() == 2]
    if not dims:
        raise ConfigError(f"lora.target_modules={sorted(targets)}: no layer of {base.name} has one of these names")
    if config.r > min(dims):
        raise ConfigError(f"lora.r={config.r} is larger than the smallest dimension ({min(dims)}) of the layers it "
                          f"adapts in {base.name}: such a rank adds parameters and time but no capacity; use at "
                          f"most {min(dims)}")


def attach_adapter(base: BaseModel, name: str, config: LoraConfig, seed: int = 0) -> PeftModel:
    """The process's peft model with adapter `name` active (created, seeded, on first use)."""
    model = _PEFT_MODELS.get(id(base.model))
    if model is None or name not in model.peft_config:
        torch.manual_seed(seed)  # identical initial adapters for every region and every process
        if model is None:
            model = get_peft_model(base.model, peft_config(config, base), adapter_name=name)
            _PEFT_MODELS[id(base.model)] = model
        else:
            model.add_adapter(name, peft_config(config, base))
    model.set_adapter(name)
    return model


def peft_model_of(base: BaseModel) -> PeftModel | None:
    """The peft model wrapping `base` in this process, or None before any adapter was attached."""
    return _PEFT_MODELS.get(id(base.model))


def get_state(model: PeftModel, name: str) -> AdapterState:
    state = get_peft_model_state_dict(model, adapter_name=name)
    return {key: _snapshot(value) for key, value in state.items()}


def state_of_parameters(params: Mapping[str, torch.Tensor], name: str) -> AdapterState:
    """Adapter `name`'s tensors keyed as in `model.named_parameters()`, in `get_state`'s format (peft's rule: the
    adapter's name leaves the key)."""
    return {key.replace(f".{name}", ""): _snapshot(value) for key, value in params.items()}


def _snapshot(tensor: torch.Tensor) -> np.ndarray:
    """A float32 host copy (.float().cpu() of a float32 CPU tensor is the tensor itself: hence the copy)."""
    return tensor.detach().float().cpu().numpy().copy()


def set_state(model: PeftModel, name: str, state: AdapterState) -> None:
    """Load arrays into adapter `name`, refusing missing, extra or misshapen tensors (nothing changes then)."""
    expected = get_peft_model_state_dict(model, adapter_name=name)
    problem = describe_mismatch({k: tuple(v.shape) for k, v in expected.items()}, state)
    if problem:
        raise AdapterError(problem)
    tensors = {key: torch.from_numpy(np.ascontiguousarray(value)) for key, value in state.items()}
    set_peft_model_state_dict(model, tensors, adapter_name=name)


def describe_mismatch(expected_shapes: dict[str, tuple[int, ...]], state: AdapterState) -> str | None:
    """Why `state` does not fit the adapter, or None when it does."""
    missing = sorted(set(expected_shapes) - set(state))
    if missing:
        return f"adapter is missing {len(missing)} tensor(s), e.g. {missing[0]!r}"
    extra = sorted(set(state) - set(expected_shapes))
    if extra:
        return f"adapter has {len(extra)} unexpected tensor(s), e.g. {extra[0]!r}"
    for key, shape in expected_shapes.items():
        if tuple(state[key].shape) != shape:
            return f"tensor {key!r} has shape {tuple(state[key].shape)}, expected {shape}"
        if not np.all(np.isfinite(state[key])):
            return f"tensor {key!r} holds NaN or infinite values"
    return None


def save_adapter(model: PeftModel, name: str, folder: str | Path, state: AdapterState | None = None) -> Path:
    """Write adapter `name` (or `state` in its shape) in peft's format: config JSON + safetensors."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model.peft_config[name].save_pretrained(str(folder))
    state = get_state(model, name) if state is None else state
    save_file({k: np.ascontiguousarray(v, dtype=np.float32) for k, v in state.items()},
              str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
    return folder


def publish_adapter(model: PeftModel, name: str, folder: str | Path, state: AdapterState | None = None) -> Path:
    """`save_adapter` into a sibling folder, then swap it in: a reader sees the old adapter or the new, never half."""
    folder = Path(folder)
    staging = folder.with_name(f".{folder.name}.tmp-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    save_adapter(model, name, staging, state=state)
    retired = folder.with_name(f".{folder.name}.old-{os.getpid()}")
    if folder.exists():
        folder.rename(retired)
    staging.rename(folder)
    shutil.rmtree(retired, ignore_errors=True)
    return folder


def read_adapter(folder: str | Path) -> tuple[dict, AdapterState]:
    """The adapter config (as JSON) and tensors of a saved adapter; never unpickles anything."""
    folder = Path(folder)
    config_path, weights_path = folder / "adapter_config.json", folder / "adapter_model.safetensors"
    for path in (config_path, weights_path):
        if not path.is_file():
            raise AdapterError(f"{folder} is not an adapter folder: {path.name} is missing")
    try:
        adapter_config = json.loads(config_path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as err:
        raise AdapterError(f"{config_path}: not valid JSON ({err})") from None
    if not isinstance(adapter_config, dict):
        raise AdapterError(f"{config_path}: expected a JSON object, got {type(adapter_config).__name__}")
    return adapter_config, read_tensors(weights_path)


def read_tensors(path: Path) -> AdapterState:
    """A safetensors file's tensors; a truncated or foreign file is an AdapterError naming it."""
    try:
        return load_file(str(path))
    except Exception as err:  # safetensors raises its own error types for truncated or foreign files
        raise AdapterError(f"{path}: not a readable safetensors file ({err})") from None


def l2_norm(arrays: Mapping[str, np.ndarray]) -> float:
    """The L2 norm of all `arrays` together, as one vector (in float64)."""
    return float(np.sqrt(sum(float(np.sum(np.asarray(a, np.float64) ** 2)) for a in arrays.values())))


def lora_config_from_json(adapter_config: dict, where: str = "adapter_config.json") -> LoraConfig:
    """The LoRA settings of a saved adapter; a missing or malformed key is an AdapterError naming it."""
    try:
        return LoraConfig(
            r=int(adapter_config["r"]), alpha=int(adapter_config["lora_alpha"]),
            dropout=float(adapter_config.get("lora_dropout", 0.0)),
            target_modules=sorted(adapter_config["target_modules"]),
        )
    except KeyError as err:
        raise AdapterError(f"{where}: key {err.args[0]!r} is missing") from None
    except (TypeError, ValueError) as err:
        raise AdapterError(f"{where}: r, lora_alpha, lora_dropout or target_modules is malformed ({err})") from None


def adapter_name_for(folder: str | Path) -> str:
    """A peft adapter name for a saved folder: stable per absolute path, and free of the "." peft refuses."""
    return "saved-" + hashlib.sha1(str(Path(folder).resolve()).encode()).hexdigest()[:16]


def load_adapter(base: BaseModel, name: str, folder: str | Path) -> PeftModel:
    """Attach a saved adapter to the shared base under `name` and make it active."""
    adapter_config, state = read_adapter(folder)
    model = attach_adapter(base, name, lora_config_from_json(adapter_config, f"{folder}/adapter_config.json"))
    try:
        set_state(model, name, state)
    except AdapterError as err:
        raise AdapterError(f"{folder}: {err}") from None
    return model
