"""bf16 or fp32 for a LoRA step: `train.bf16` = "auto" (default), "true" or "false".

bf16 autocast is only worth it where the hardware runs bf16 matmuls fast. Measured on a SmolLM2-135M LoRA step:
2.1x faster on a CPU with AMX, 0.53x (slower) on one AMD EPYC with avx512_bf16 and no AMX, 1.32x faster on
another whose flags read the same, and 0.81x on an H200 GPU (a 135M model is kernel-launch bound there). CPU
flags cannot tell these apart, so "auto" times it: given a `benchmark` (one bf16 and one fp32 step of the real
model and batch), bf16 is chosen only when it is more than 5% faster. The result is cached as JSON (default
`<cache_root>/precision.json`) under a key naming the processor, threads, model and batch size, so it runs once
per machine. Without a benchmark, a CPU falls back to a capability rule (bf16 only with AMX) and a GPU trusts its
bf16 support. The caller logs and saves `Precision.reason`.
"""

from __future__ import annotations

import json
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from fed_netgpt.evaluation.report import write_atomically
from fed_netgpt.model.base import cache_root

MIN_SPEEDUP = 1.05  # bf16 must beat fp32 by more than 5% to be chosen


@dataclass(frozen=True)
class Precision:
    bf16: bool
    reason: str  # one line for the log, e.g. "fp32: bf16 not more than 5% faster on this CPU (...)"


def parse_bf16_setting(value: str | bool) -> str:
    """"auto", "true" or "false" from a str or bool (OmegaConf may hand "True", "False" or True)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str) and value.strip().lower() in ("auto", "true", "false"):
        return value.strip().lower()
    raise ValueError(f"train.bf16 must be auto, true or false; got {value!r}")


def cpu_has_amx() -> bool:
    """AMX bf16 tiles: the "flags" line of /proc/cpuinfo, else torch's own CPU capabilities, else False."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("flags"):
                    return "amx_bf16" in line.split(":", 1)[1].split()
    except OSError:
        pass
    get_capabilities = getattr(torch.cpu, "get_capabilities", None)
    if get_capabilities is not None:
        return bool(get_capabilities().get("amx_bf16", False))
    return False


def choose_precision(
    setting: str | bool,
    device: torch.device,
    benchmark: Callable[[bool], float] | None = None,
    cache_key: str = "",
    cache_file: Path | None = None,
) -> Precision:
    """bf16 or fp32 for training on `device`; `benchmark(bf16)` returns seconds per step ("auto" only)."""
    setting = parse_bf16_setting(setting)
    if setting != "auto":
        return Precision(setting == "true", f"{'bf16' if setting == 'true' else 'fp32'}: set by train.bf16")
    if device.type not in ("cpu", "cuda"):
        return Precision(False, f"fp32: no bf16 autocast on {device.type} devices")
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        return Precision(False, "fp32: GPU without bf16 support")
    if benchmark is not None:
        return _benchmarked(benchmark, "GPU" if device.type == "cuda" else "CPU", cache_key,
                            cache_file or cache_root() / "precision.json")
    if device.type == "cuda":
        return Precision(True, "bf16: GPU supports bf16 (not measured)")
    if cpu_has_amx():
        return Precision(True, "bf16: CPU with AMX (not measured; bf16 autocast was ~2x faster on one)")
    return Precision(False, "fp32: CPU without AMX (not measured; bf16 autocast was 0.53x-1.32x on such CPUs)")


def device_name(device: torch.device) -> str:
    """What the benchmark cache is keyed on: the GPU's name, or the CPU's model name and torch's thread count."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            name = next((line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")), "")
    except OSError:
        name = ""
    return f"{name or platform.processor() or platform.machine()} ({torch.get_num_threads()} threads)"


def _benchmarked(benchmark: Callable[[bool], float], where: str, cache_key: str, cache_file: Path) -> Precision:
    """Seconds per step in bf16 and fp32, measured once per `cache_key` and kept in `cache_file`."""
    try:
        cache = json.loads(cache_file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        cache = {}
    if not isinstance(cache, dict):
        cache = {}
    entry = cache.get(cache_key)
    if isinstance(entry, dict) and {"bf16_seconds", "fp32_seconds"} <= entry.keys():
        source = f"cached in {cache_file}"
    else:
        entry = {"fp32_seconds": float(benchmark(False)), "bf16_seconds": float(benchmark(True))}
        cache[cache_key] = entry
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        write_atomically(cache_file, json.dumps(cache, indent=2, sort_keys=True) + "\n")  # workers race here
        source = "measured"
    bf16_s, fp32_s = entry["bf16_seconds"], entry["fp32_seconds"]
    bf16 = bf16_s * MIN_SPEEDUP < fp32_s
    times = f"bf16 {bf16_s * 1000:.1f} ms vs fp32 {fp32_s * 1000:.1f} ms per step, {source}"
    if bf16:
        return Precision(True, f"bf16: faster on this {where} ({times})")
    return Precision(False, f"fp32: bf16 not more than 5% faster on this {where} ({times})")


def step_benchmark(model, batch: dict[str, torch.Tensor], repeats: int = 3,
                   loss: Callable[..., torch.Tensor] | None = None) -> Callable[[bool], float]:
    """A `benchmark(bf16)` for `choose_precision`: median seconds of a forward+backward pass of `model`, through
    `loss(model, batch)` (default: the model's own loss), the way the training loop computes it.

    One warm-up, then `repeats` timed passes; gradients are cleared after and there is no optimizer step, so the
    model is unchanged. The RNG state is restored, so dropout in later training draws the same masks.
    """
    from fed_netgpt.training.batches import on_device
    from fed_netgpt.training.engine import autocast  # here, so the engine may import this module

    device = next(model.parameters()).device
    batch = on_device(batch, device)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def run(bf16: bool) -> float:
        was_training = model.training
        seconds = []
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            model.train()
            try:
                for i in range(max(repeats, 1) + 1):  # pass 0 warms up
                    sync()
                    started = time.perf_counter()
                    with autocast(bf16, device):
                        value = loss(model, batch) if loss else model(**batch).loss
                    value.backward()
                    sync()
                    if i:
                        seconds.append(time.perf_counter() - started)
            finally:
                model.zero_grad(set_to_none=True)
                model.train(was_training)
        return statistics.median(seconds)

    return run
