"""Multi-site batched training against the per-site loop: training tokens/s, side by side in one run.

    python benchmarks/multisite.py [--model smollm2-135m] [--sites 1 8 32 128] [--loop-sites 8] [--steps 4]
                                   [--device cpu|cuda] [--random-init] [key=value ...]

For each K in --sites, K sites' adapters train together (`fed_netgpt.training.engine.train_sites` on K `SiteJob`s:
one forward/backward a step, each row with its own site's LoRA) for --steps steps. Two per-site loops train
--loop-sites sites one after another, taking turns: the per-site loop with the reference engine
`reference.train_adapter` (peft, one adapter at a time; what "x the loop" is relative to), and the per-site engine
(K=1), `train_sites` called once per site with that one site's job (what a federation with train.sites_per_pass=1
runs); their throughput does not depend on K. Training tokens are the real (unpadded) tokens of the rows trained.
Sites come from the built-in data (`data.num_sites=K`) with at least one full batch of pairs each. Prints tokens/s,
the ratio to the loop, peak GPU memory and the model FLOPs utilisation, counting 4 x parameters FLOPs per token
(forward 2, backward through the frozen base 2) against the GPU's dense bf16 peak (`--peak-tflops`, H200: 989).
"""

from __future__ import annotations

import cProfile
import functools
import pstats
import statistics
import time
from dataclasses import replace
from unittest import mock

import numpy as np
import torch
from train_step import random_base, step_parser  # benchmarks/ is the running script's folder

from fed_netgpt.config import Config, load_config
from fed_netgpt.data.sites import load_sites
from fed_netgpt.model import fused, grouped_lora
from fed_netgpt.model.adapters import attach_adapter, get_state
from fed_netgpt.model.base import BaseModel, load_base
from fed_netgpt.model.prompting import encode_pair
from fed_netgpt.training.batches import batches
from fed_netgpt.training.engine import SiteJob, train_sites
from fed_netgpt.training.reference import train_adapter


def tokens_trained(base: BaseModel, config: Config, sites: list, seed: int = 0) -> int:
    """Real tokens the sites' first `local_steps` batches hold: what both paths train on."""
    total = 0
    for site in sites:
        stream = batches(site.train, config.train.batch_size, seed=config.train.seed + seed)
        for _ in range(config.train.local_steps):
            total += sum(len(encode_pair(base.tokenizer, p.context, p.prompt, p.completion,
                                         config.train.max_length)[0]) for p in next(stream))
    return total


def interleaved(calls: dict, device: str, repeats: int) -> dict:
    """Per named call: median seconds after one warm-up call, the last result, the warm-up's seconds (compilation
    shows there) and the peak GPU memory. The calls take turns, so drifting machine load hits them alike."""
    seconds: dict = {name: [] for name in calls}
    first, results, peak = {}, {}, {}
    for i in range(repeats + 1):
        for name, fn in calls.items():
            if device == "cuda":
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            results[name] = None  # as a caller that has used its last results: their host memory can be reused
            started = time.perf_counter()
            results[name] = fn()
            if device == "cuda":
                torch.cuda.synchronize()
                peak[name] = max(peak.get(name, 0), torch.cuda.max_memory_allocated())
            elapsed = time.perf_counter() - started
            if i:
                seconds[name].append(elapsed)
            else:
                first[name] = elapsed
    return {name: (statistics.median(seconds[name]), results[name], first[name], peak.get(name, 0))
            for name in calls}


def transformers_rotary(call):  # type: ignore[no-untyped-def]
    with mock.patch.object(fused, "rotary", fused._TRANSFORMERS_ROTARY):
        return call()


def separate_projections(call):  # type: ignore[no-untyped-def]
    with mock.patch.object(grouped_lora.SharedInputProjection, "applies", lambda self: False):
        return call()


def sdpa_backend(backend: str, call):  # type: ignore[no-untyped-def]
    with torch.nn.attention.sdpa_kernel(getattr(torch.nn.attention.SDPBackend, backend)):
        return call()


def site_jobs(sites: list, starts: list, first: int = 0) -> list[SiteJob]:
    """One job per site, from its start, with the seed `train_adapter(..., seed=k)` gets in the per-site loop."""
    return [SiteJob(site.site_id, site.train, starts[first + k], seed=first + k) for k, site in enumerate(sites)]


def measure(args, base: BaseModel, model, config: Config, all_sites: list, starts: list):  # type: ignore[no-untyped-def]
    """The per-site loops' tokens/s (peft's, and the engine's with K=1, taking turns), then each K's grouped run
    against the peft loop (with and/or without fused kernels, taking turns); returns the last K's jobs."""

    def loop() -> None:
        with torch.compiler.set_stance("force_eager"):  # peft's layers in the loop would compile graphs of their own
            for k, site in enumerate(all_sites[: args.loop_sites]):
                train_adapter(model, "bench", base.tokenizer, site.train, config.train, seed=k)

    def engine_loop() -> None:
        for k, site in enumerate(all_sites[: args.loop_sites]):
            train_sites(base, site_jobs([site], starts, first=k), config.lora, config.train)

    loops = interleaved({"loop": loop, "engine": engine_loop}, args.device, args.rounds)
    loop_tokens = tokens_trained(base, config, all_sites[: args.loop_sites])
    loop_rate, engine_rate = loop_tokens / loops["loop"][0], loop_tokens / loops["engine"][0]
    print(f"  per-site loop ({args.loop_sites} sites one by one, peft): {loop_rate:,.0f} tokens/s")
    print(f"  per-site engine (K=1) ({args.loop_sites} sites one by one, train_sites): {engine_rate:,.0f} tokens/s "
          f"{engine_rate / loop_rate:6.1f}x the loop", flush=True)
    params = sum(p.numel() for n, p in base.model.named_parameters() if ".lora_" not in n)
    trains = {f"fused_kernels={v}": replace(config.train, fused_kernels=v != "false") for v in args.fused_kernels}
    if args.device != "cuda":  # the fused kernels are GPU-only: on the CPU every variant is the same pass
        trains = {"": config.train}
    for k in args.sites:
        sites = all_sites[:k]
        jobs = site_jobs(sites, starts)
        calls = {name: functools.partial(train_sites, base, jobs, config.lora, train) for name, train in trains.items()}
        for name in calls:
            if name.endswith("no-rotary"):  # the fused pass with transformers' own rotary embedding
                calls[name] = functools.partial(transformers_rotary, calls[name])
            if name.endswith("no-shared-inputs"):  # each projection of one input on its own
                calls[name] = functools.partial(separate_projections, calls[name])
            if name.endswith("-attention"):  # SDPA held to one backend (torch's default on Hopper: cuDNN's)
                backend = name.split("=")[1].upper().replace("-", "_")  # e.g. FLASH_ATTENTION
                calls[name] = functools.partial(sdpa_backend, backend, calls[name])
        try:
            measured = interleaved(calls, args.device, args.rounds)
        except torch.OutOfMemoryError:
            print(f"  grouped K={k}: out of memory")
            break
        for name, (seconds, results, first, peak) in measured.items():
            rate = tokens_trained(base, config, sites) / seconds
            steps_alone = results[0].metrics["train_seconds"] * k / args.steps  # without loading and exporting
            line = (f"  grouped K={k:4d} {name:19s} {rate:10,.0f} tokens/s {rate / loop_rate:6.1f}x the loop "
                    f"{seconds / args.steps * 1000:6.0f} ms/step ({steps_alone * 1000:4.0f} in the steps), first "
                    f"call {first:.0f} s")
            if args.device == "cuda":
                mfu = rate * 4 * params / (args.peak_tflops * 1e12)
                line += f"  peak {peak / 2**30:6.1f} GiB  MFU {mfu:5.1%}"
            print(line, flush=True)
    return jobs


def main() -> None:
    parser = step_parser()
    parser.add_argument("--sites", type=int, nargs="+", default=[1, 8, 32, 128])
    parser.add_argument("--loop-sites", type=int, default=8)
    parser.add_argument("--peak-tflops", type=float, default=989.0)
    parser.add_argument("--base-dtypes", nargs="+", default=["float32"], choices=["float32", "bfloat16"],
                        help="frozen base weights: float32 (bf16 autocast where chosen) and/or stored in bfloat16")
    parser.add_argument("--compile", choices=["none", "layers"], default="none",
                        help="torch.compile the decoder layers (fuses RMSNorm, rotary embedding, SiLU and the "
                             "casts); they share one compiled graph for every K and batch shape")
    parser.add_argument("--fused-kernels", nargs="+", default=["true"],
                        choices=["false", "true", "no-rotary", "no-shared-inputs", "flash-attention",
                                 "cudnn-attention", "efficient-attention"],
                        help="train.fused_kernels, measured taking turns in one run (no-rotary: true but with "
                             "transformers' rotary embedding; no-shared-inputs: true but q, k and v projected "
                             "one by one; X-attention: true with SDPA held to backend X)")
    parser.add_argument("--distinct-starts", action="store_true",
                        help="each site starts from its own adapter (as Ditto's personal pass does), not all from one "
                             "(as the sites of a region start from its regional adapter)")
    parser.add_argument("--profile", action="store_true", help="print the top operators of the largest K's run")
    args = parser.parse_args()
    config = load_config(overrides=[f"model.name={args.model}", f"train.local_steps={args.steps}",
                                    *args.overrides])
    rows = config.train.batch_size
    base = random_base(args.model) if args.random_init else load_base(config.model.name)
    base.model.to(args.device)
    params = sum(p.numel() for p in base.model.parameters())
    cuda = args.device == "cuda"
    all_sites = load_sites(replace(config.data, num_sites=max(max(args.sites), args.loop_sites),
                                   num_regions=min(10, max(args.sites)), min_pairs_per_site=rows))
    start = get_state(attach_adapter(base, "bench", config.lora), "bench")
    rng = np.random.default_rng(0)
    count = max(max(args.sites), args.loop_sites)  # the per-site engine's sites start from theirs too
    starts = ([{key: value + rng.normal(0, 1e-3, value.shape).astype(value.dtype) for key, value in start.items()}
               for _ in range(count)] if args.distinct_starts else [start] * count)
    model = attach_adapter(base, "bench", config.lora)
    if args.compile == "layers":
        # the stacked factors' K is a dimension like the rows: dynamic, or every K would compile anew; no duck
        # sizing, or K = r = 8 would tie the two. Layer 0 stays eager: its input (the embeddings) needs no
        # gradient, so it would compile a second graph (each takes ~2 minutes on the H200 machine)
        torch._dynamo.config.force_parameter_static_shapes = False
        torch.fx.experimental._config.use_duck_shape = False
        for layer in base.model.get_decoder().layers[1:]:
            layer.compile(dynamic=True)
    device = torch.cuda.get_device_name() if cuda else f"cpu, {torch.get_num_threads()} threads"
    weights = "random weights" if args.random_init else "pretrained weights"
    print(f"{args.model} ({weights}, {params / 1e6:.1f}M parameters) LoRA r={config.lora.r} on "
          f"{','.join(config.lora.target_modules)}, {rows} rows a site, {args.steps} steps, on {device}")
    for dtype in args.base_dtypes:
        for name, param in base.model.named_parameters():  # the frozen base only: LoRA weights stay float32
            if ".lora_" not in name:
                param.data = param.data.to(getattr(torch, dtype))
        print(f"base weights in {dtype}:")
        jobs = measure(args, base, model, config, all_sites, starts)
    if args.profile:
        call = functools.partial(train_sites, base, jobs, config.lora, config.train)
        with torch.profiler.profile(record_shapes=True) as profiler:
            call()
        sort = "self_cuda_time_total" if cuda else "self_cpu_time_total"
        print(profiler.key_averages().table(sort_by=sort, row_limit=25))
        print("by operator and input shapes:")  # which tensors the element-wise time goes to
        print(profiler.key_averages(group_by_input_shape=True).table(
            sort_by=sort, row_limit=40, max_name_column_width=30, max_shapes_column_width=90))
        print("host side (Python functions by cumulative time):")  # what the call does besides the steps
        with cProfile.Profile() as host:
            call()
        pstats.Stats(host).sort_stats("cumulative").print_stats(35)


if __name__ == "__main__":
    main()
