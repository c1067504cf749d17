"""Cost of DP-SGD: one local step with Opacus (per-pair gradients, clipping, noise) against a plain step on the
same batch, side by side.

    python benchmarks/dp_step.py [--model smollm2-135m] [--batch 8] [--steps 4] [--device cpu|cuda] [key=value ...]

Both train the same LoRA adapter on the same `--batch` pairs: the private step draws every pair with
probability 1 (q = batch / pairs = 1), so both see the full batch each step. Rounds alternate so machine noise
hits both alike; prints median step times, their ratio, and on a GPU the peak memory of each.
"""

from __future__ import annotations

import statistics
import time

import torch
from train_step import random_base, step_parser  # benchmarks/ is the running script's folder

from fed_netgpt.adapters import attach_adapter
from fed_netgpt.config import load_config
from fed_netgpt.data.sites import load_sites
from fed_netgpt.models import load_base
from fed_netgpt.privacy import train_adapter_private
from fed_netgpt.training import train_adapter


def main() -> None:
    parser = step_parser()
    parser.add_argument("--batch", type=int, default=8)
    args = parser.parse_args()
    config = load_config(overrides=[f"model.name={args.model}", f"train.local_steps={args.steps}",
                                    f"train.batch_size={args.batch}", "privacy.mode=sample_dp",
                                    "privacy.noise_multiplier=1.0", *args.overrides])
    base = random_base(args.model) if args.random_init else load_base(config.model.name)
    base.model.to(args.device)
    pairs = max(load_sites(config.data), key=lambda site: len(site.train)).train[: args.batch]
    if len(pairs) < args.batch:
        parser.error(f"the biggest site has {len(pairs)} training pairs; --batch must be at most that")
    model = attach_adapter(base, "bench", config.lora)
    cuda = args.device == "cuda"

    def plain() -> None:
        train_adapter(model, "bench", base.tokenizer, pairs, config.train)

    def private() -> None:
        train_adapter_private(model, "bench", base.tokenizer, pairs, config.train, config.privacy, [],
                              planned_steps=args.steps)

    runs = {"plain": plain, "dp-sgd": private}
    times: dict[str, list[float]] = {name: [] for name in runs}
    peaks: dict[str, int] = {}
    for run in runs.values():  # warm-up
        run()
    for _ in range(args.rounds):
        for name, run in runs.items():
            if cuda:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            started = time.perf_counter()
            run()
            if cuda:
                torch.cuda.synchronize()
                peaks[name] = max(peaks.get(name, 0), torch.cuda.max_memory_allocated())
            times[name].append((time.perf_counter() - started) / args.steps)
    plain_s, private_s = statistics.median(times["plain"]), statistics.median(times["dp-sgd"])
    device = torch.cuda.get_device_name() if cuda else f"cpu, {torch.get_num_threads()} threads"
    print(f"{args.model} LoRA r={config.lora.r}, batch {args.batch}, on {device}")
    print(f"step plain {plain_s * 1000:.0f} ms | DP-SGD {private_s * 1000:.0f} ms | ratio {private_s / plain_s:.2f}x")
    if cuda:
        print(f"peak memory plain {peaks['plain'] / 2**20:.0f} MiB | DP-SGD {peaks['dp-sgd'] / 2**20:.0f} MiB | "
              f"ratio {peaks['dp-sgd'] / peaks['plain']:.2f}x")


if __name__ == "__main__":
    main()
