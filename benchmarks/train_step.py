"""Time one local training step (LoRA on SmolLM2-135M) in fp32 and with bf16 autocast, side by side.

    python benchmarks/train_step.py [--model smollm2-135m] [--steps 4] [--device cpu|cuda] [key=value ...]

A step is the engine's (`engine.train_sites` on one site's `SiteJob`: K=1, what a site alone trains with);
`train.engine=peft` times peft's loop (`reference.train_adapter`), the step this benchmark timed before the one
engine. Rounds alternate fp32 and bf16 so machine noise hits both alike; prints the median step times and the
ratio.
`--random-init --model FOLDER` times FOLDER's architecture with random weights (a config.json and tokenizer
suffice): step time does not depend on the weights' values, so machines without the weights can be measured.
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import replace

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from fed_netgpt.config import load_config
from fed_netgpt.data.sites import load_sites
from fed_netgpt.model.adapters import attach_adapter, get_state
from fed_netgpt.model.base import BaseModel, load_base
from fed_netgpt.training.engine import SiteJob, train_sites


def random_base(folder: str) -> BaseModel:
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(folder), dtype=torch.float32)
    return BaseModel(model=model.requires_grad_(False).eval(), tokenizer=AutoTokenizer.from_pretrained(folder),
                     name=folder)


def step_parser() -> argparse.ArgumentParser:
    """The arguments every step benchmark takes (model, steps per round, rounds, device, random weights)."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--steps", type=int, default=4, help="steps per timed round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--random-init", action="store_true", help="architecture of --model FOLDER, random weights")
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    return parser


def main() -> None:
    args = step_parser().parse_args()
    config = load_config(overrides=[f"model.name={args.model}", f"train.local_steps={args.steps}", *args.overrides])
    base = random_base(args.model) if args.random_init else load_base(config.model.name)
    base.model.to(args.device)
    site = load_sites(config.data)[0]
    job = SiteJob(site.site_id, site.train, get_state(attach_adapter(base, "bench", config.lora), "bench"))
    times: dict[str, list[float]] = {"fp32": [], "bf16": []}
    train_sites(base, [job], config.lora, replace(config.train, local_steps=1))  # warm-up
    for _ in range(args.rounds):
        for name, bf16 in (("fp32", False), ("bf16", True)):
            if args.device == "cuda":
                torch.cuda.synchronize()
            started = time.perf_counter()
            train_sites(base, [job], config.lora, replace(config.train, bf16=str(bf16).lower()))
            if args.device == "cuda":
                torch.cuda.synchronize()
            times[name].append((time.perf_counter() - started) / args.steps)
    fp32, bf16 = statistics.median(times["fp32"]), statistics.median(times["bf16"])
    device = torch.cuda.get_device_name() if args.device == "cuda" else f"cpu, {torch.get_num_threads()} threads"
    weights = "random weights" if args.random_init else "pretrained weights"
    print(f"{args.model} ({weights}) LoRA r={config.lora.r}, batch {config.train.batch_size}, on {device}")
    print(f"step fp32 {fp32 * 1000:.0f} ms | bf16 autocast {bf16 * 1000:.0f} ms | speed-up {fp32 / bf16:.2f}x")


if __name__ == "__main__":
    main()
