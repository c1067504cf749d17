"""Cost of DP-SGD: a private local step against a plain step on the same batch, side by side.

    python benchmarks/dp_step.py [--model smollm2-135m] [--batch 8] [--steps 4] [--device cpu|cuda]
                                 [--grouped K [K ...]] [--base-dtype bfloat16] [-- key=value ...]

One site alone, by the reference engines: a plain step (`reference.train_adapter`, peft) against a DP-SGD step
through Opacus (per-pair gradients, clipping, noise: `reference.train_adapter_private`). Then one site alone by the
engine a site now trains with (`engine.train_sites` on that one site's `SiteJob`, K=1; `train.sites_per_pass=1`),
plain against DP-SGD (the job with a `SiteAccountant`; `privacy.engine` picks grouped or Opacus). With --grouped,
K sites in one grouped pass (`train_sites` on K jobs) against the same K sites under DP-SGD in one grouped pass
(every job with its own `SiteAccountant`: the grouped layers keep each pair's gradient). Every site has exactly
--batch pairs and the private steps draw each pair with probability 1, so both sides of a ratio train the same
rows each step. The calls take turns, so machine noise hits them alike; prints
median step times, the ratios, and on a GPU the peak memory of each.
"""

from __future__ import annotations

import functools
from dataclasses import replace

import torch
from multisite import interleaved  # benchmarks/ is the running script's folder
from train_step import random_base, step_parser

from fed_netgpt.config import load_config
from fed_netgpt.data.sites import load_sites
from fed_netgpt.model.adapters import attach_adapter, get_state
from fed_netgpt.model.base import load_base
from fed_netgpt.training.engine import SiteJob, train_sites
from fed_netgpt.training.privacy import SiteAccountant
from fed_netgpt.training.reference import train_adapter, train_adapter_private


def main() -> None:
    parser = step_parser()
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--grouped", type=int, nargs="*", default=[], metavar="K",
                        help="also K sites in one grouped pass, plain against DP-SGD")
    parser.add_argument("--base-dtype", default="float32", choices=["float32", "bfloat16"],
                        help="the frozen base's weights (LoRA weights stay float32)")
    args = parser.parse_args()
    config = load_config(overrides=[f"model.name={args.model}", f"train.local_steps={args.steps}",
                                    f"train.batch_size={args.batch}", "privacy.mode=sample_dp",
                                    "privacy.noise_multiplier=1.0", *args.overrides])
    base = random_base(args.model) if args.random_init else load_base(config.model.name)
    base.model.to(args.device, getattr(torch, args.base_dtype))
    sites = load_sites(replace(config.data, min_pairs_per_site=args.batch))
    if len(sites) < max(args.grouped, default=0):
        sites = load_sites(replace(config.data, num_sites=max(args.grouped), min_pairs_per_site=args.batch))
    pairs = [site.train[: args.batch] for site in sites]
    model = attach_adapter(base, "bench", config.lora)
    start = get_state(model, "bench")
    steps = config.train.local_steps

    def engine(k: int, private: bool) -> None:  # K sites in one pass, each DP job with a fresh accountant
        jobs = [SiteJob(site.site_id, pairs[i], start, seed=i,
                        accountant=SiteAccountant(config.privacy, steps, []) if private else None)
                for i, site in enumerate(sites[:k])]
        train_sites(base, jobs, config.lora, config.train)

    def opacus_alone() -> None:  # the reference DP engine, a fresh accountant each call
        train_adapter_private(model, "bench", base.tokenizer, pairs[0], config.train,
                              SiteAccountant(config.privacy, steps, []))

    calls = {  # each plain call followed by its private twin
        "one site, peft": functools.partial(train_adapter, model, "bench", base.tokenizer, pairs[0], config.train),
        "one site, Opacus": opacus_alone,
        "per-site engine (K=1)": functools.partial(engine, 1, False),
        "per-site engine (K=1), DP-SGD": functools.partial(engine, 1, True),
    }
    for k in args.grouped:
        calls[f"grouped K={k}"] = functools.partial(engine, k, False)
        calls[f"grouped K={k}, DP-SGD"] = functools.partial(engine, k, True)
    measured = interleaved(calls, args.device, args.rounds)
    cuda = args.device == "cuda"
    device = torch.cuda.get_device_name() if cuda else f"cpu, {torch.get_num_threads()} threads"
    print(f"{args.model} LoRA r={config.lora.r} on {','.join(config.lora.target_modules)}, {args.batch} pairs a "
          f"site, {steps} steps a call, on {device}")
    names = list(calls)
    width = max(16, *map(len, names[::2])), max(24, *map(len, names[1::2]))
    for plain, private in zip(names[::2], names[1::2]):  # each plain call is followed by its private one
        (plain_s, _, _, plain_peak), (private_s, _, _, private_peak) = measured[plain], measured[private]
        line = (f"{plain:{width[0]}s} {plain_s / steps * 1000:7.0f} ms/step | {private:{width[1]}s} "
                f"{private_s / steps * 1000:7.0f} ms/step | time {private_s / plain_s:.2f}x")
        if cuda:
            line += (f" | peak {plain_peak / 2**20:,.0f} vs {private_peak / 2**20:,.0f} MiB, "
                     f"{private_peak / plain_peak:.2f}x")
        print(line, flush=True)


if __name__ == "__main__":
    main()
