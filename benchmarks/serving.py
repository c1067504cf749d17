"""Edge serving on the machine at hand: latency, mixed-adapter batching, and the NetGPT claim itself.

    python benchmarks/serving.py --run RUN [--part latency|batch|netgpt|all] [--rows-per-region 6]

RUN is a finished run folder on the embedded SmolLM2 (e.g. `fed-netgpt simulate`'s runs/latest).
- latency: one request at a time, exactly 32 new tokens (the end-of-turn token ignored), p50/p95 over prompts of
  the test split: fp32 and int8 weights, each with and without drafted (prompt-lookup) decoding, after one
  warm-up request an adapter.
- batch: 16 prompts over 8 adapters in one batch, against the same 16 prompts on one adapter (tokens/s ratio).
- quality: the edge's completions of the test rows in each of those variants, scored as the report scores them.
- netgpt: the test split (`--rows-per-region` rows a region and test group), edge + cloud against cloud-only
  (no location; and the raw city and country the user allows): latency, cloud input tokens, uplink bytes, and
  the fraction of cloud answers naming the user's local facts (`metrics.carries_local_facts`). The cloud is the
  local SmolLM2 (a LLaMA-class stand-in, fp32), answering up to `--cloud-tokens` tokens.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from fed_netgpt.config import ServingConfig
from fed_netgpt.data.facts import fact_levels, fact_vocabulary, levels_of
from fed_netgpt.data.sites import load_pairs
from fed_netgpt.evaluation.metrics import carries_local_facts, score_row
from fed_netgpt.evaluation.scoring import sample_test_rows
from fed_netgpt.model.prompting import chat_prompt
from fed_netgpt.run.folder import read_run_config
from fed_netgpt.serving.cloud import LocalCloud
from fed_netgpt.serving.edge import EdgeService
from fed_netgpt.serving.engine import DecodeRow
from fed_netgpt.serving.pipeline import cloud_only, generate


def test_rows(run: Path, per_region: int) -> list:
    config = read_run_config(run)
    groups = sample_test_rows(load_pairs(config.data), per_region)
    return [pair for rows in groups.values() for pair in rows]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def decode_rows(service: EdgeService, pairs: list, tokens: int, slots: list[int]) -> list[DecodeRow]:
    tok = service.tokenizer
    return [DecodeRow(tok(chat_prompt(tok, p.context, p.prompt), add_special_tokens=False)["input_ids"], slot,
                      tokens, ignore_stop=True) for p, slot in zip(pairs, slots)]


VARIANTS = {"fp32": ("fp32", 0), "int8": ("int8", 0), "fp32+draft": ("fp32", 8), "int8+draft": ("int8", 8)}


def service_for(run: Path, variant: str) -> EdgeService:
    precision, draft_tokens = VARIANTS[variant]
    return EdgeService(ServingConfig(precision=precision, draft_tokens=draft_tokens), run=run)


def latency(run: Path, pairs: list, repeats: int) -> dict:
    results = {}
    for variant in VARIANTS:
        service = service_for(run, variant)
        engine, catalog = service.engine, service.catalog
        rows = decode_rows(service, pairs, 32, [catalog.slot(catalog.resolve(p.site_id, p.region)) for p in pairs])
        started = time.perf_counter()
        for slot in sorted({row.slot for row in rows}):  # warm-up: one request an adapter (makes its draft source)
            engine.generate([next(row for row in rows if row.slot == slot)])
        warm_up = time.perf_counter() - started
        times, passes = [], engine.stats.passes
        for _ in range(repeats):
            for row in rows:
                started = time.perf_counter()
                engine.generate([row])
                times.append(time.perf_counter() - started)
        results[variant] = {"p50_s": percentile(times, 0.5), "p95_s": percentile(times, 0.95),
                            "ms_per_token": 1000 * statistics.median(times) / 32, "requests": len(times),
                            "warm_up_s": warm_up, "passes_per_request": (engine.stats.passes - passes) / len(times)}
        print(f"latency {variant}: p50 {results[variant]['p50_s']:.3f} s, p95 {results[variant]['p95_s']:.3f} s "
              f"for 32 new tokens ({len(times)} requests; {results[variant]['passes_per_request']:.1f} passes a "
              f"request; warm-up of {len({row.slot for row in rows})} adapters {warm_up:.1f} s)", flush=True)
        service.close()
    results["int8_speedup_p50"] = results["fp32"]["p50_s"] / results["int8"]["p50_s"]
    results["draft_speedup_p50"] = results["int8"]["p50_s"] / results["int8+draft"]["p50_s"]
    return results


def batching(run: Path, pairs: list, repeats: int) -> dict:
    results = {}
    for precision in ("fp32", "int8"):
        service = EdgeService(ServingConfig(precision=precision), run=run)
        engine = service.engine
        adapters = min(8, engine.slots - 1)
        prompts = (pairs * 16)[:16]
        mixed = decode_rows(service, prompts, 32, [1 + k % adapters for k in range(16)])
        single = decode_rows(service, prompts, 32, [1] * 16)
        engine.generate(mixed[:2])
        timed = {"mixed": [], "single": []}
        for _ in range(repeats):  # interleaved, so drifting machine load hits both alike
            for name, rows in (("mixed", mixed), ("single", single)):
                started = time.perf_counter()
                engine.generate(rows)
                timed[name].append(time.perf_counter() - started)
        mixed_s, single_s = statistics.median(timed["mixed"]), statistics.median(timed["single"])
        results[precision] = {"adapters": adapters, "mixed_tokens_per_s": 16 * 32 / mixed_s,
                              "single_tokens_per_s": 16 * 32 / single_s, "ratio": single_s / mixed_s}
        print(f"batch {precision}: 16 prompts x 32 tokens over {adapters} adapters {16 * 32 / mixed_s:.0f} tok/s, "
              f"one adapter {16 * 32 / single_s:.0f} tok/s: {single_s / mixed_s:.2f}x", flush=True)
        service.close()
    return results


def quality(run: Path, pairs: list) -> dict:
    """Edge completions of the test rows in each variant, scored as the report scores them; drafted decoding is
    also compared text for text with the same precision without drafts."""
    config = read_run_config(run)
    all_pairs = load_pairs(config.data)
    levels, vocabulary = fact_levels(all_pairs), fact_vocabulary(all_pairs)
    results, texts = {}, {}
    for variant in VARIANTS:
        service = service_for(run, variant)
        texts[variant] = [service.complete(p.prompt, p.site_id, p.region).text for p in pairs]
        service.close()
        scores = [score_row(text, p.completion, p.prompt, p.facts, levels_of(p, levels), vocabulary)
                  for text, p in zip(texts[variant], pairs)]
        found = sum(s.region_found + s.site_found for s in scores)
        facts = sum(s.region_facts + s.site_facts for s in scores)
        results[variant] = {"fact_accuracy": found / facts,
                            "request_kept": statistics.mean(s.request_kept for s in scores),
                            "wrong_facts_per_row": statistics.mean(s.wrong_facts for s in scores),
                            "rouge_l": statistics.mean(s.rouge_l for s in scores)}
        precision = VARIANTS[variant][0]
        if variant != precision:
            same = sum(a == b for a, b in zip(texts[variant], texts[precision])) / len(pairs)
            results[variant][f"same_text_as_{precision}"] = same
        print(f"quality {variant}: " + ", ".join(f"{k} {v:.3f}" for k, v in results[variant].items()), flush=True)
    return results


def netgpt(run: Path, pairs: list, cloud_tokens: int) -> dict:
    config = read_run_config(run)
    all_pairs = load_pairs(config.data)
    levels, vocabulary = fact_levels(all_pairs), fact_vocabulary(all_pairs)
    edge = EdgeService(ServingConfig(), run=run)
    cloud_service = EdgeService(ServingConfig(precision="fp32"), model_name=config.model.name)
    cloud = LocalCloud(cloud_service, cloud_tokens)
    ways = {"edge_cloud": [], "cloud_only": [], "cloud_only_raw_location": []}
    for n, pair in enumerate(pairs, 1):
        city = pair.facts[0] if pair.facts else pair.site_id
        country = pair.facts[1] if len(pair.facts) > 1 else pair.region
        done = {"edge_cloud": generate(edge, cloud, pair.prompt, pair.site_id, pair.region),
                "cloud_only": cloud_only(cloud, pair.prompt),
                "cloud_only_raw_location": cloud_only(cloud, pair.prompt, f"{city}, {country}")}
        for name, result in done.items():
            answer = score_row(result.answer, "", pair.prompt, pair.facts, levels_of(pair, levels), vocabulary)
            sent = score_row(result.completion, "", pair.prompt, pair.facts, levels_of(pair, levels), vocabulary)
            ways[name].append({"seconds": result.edge_seconds + result.cloud_seconds, "edge_s": result.edge_seconds,
                               "cloud_s": result.cloud_seconds, "cloud_input_tokens": result.cloud_input_tokens,
                               "uplink_bytes": result.uplink_bytes, "answer_carries": carries_local_facts(answer),
                               "sent_carries": carries_local_facts(sent),
                               "answer_fact_recall": (answer.region_found + answer.site_found)
                               / max(1, answer.region_facts + answer.site_facts)})
        if n == 1 or n % 10 == 0:
            print(f"netgpt: {n}/{len(pairs)} rows; e.g. {pair.site_id}: {done['edge_cloud'].completion!r} -> "
                  f"{done['edge_cloud'].answer[:120]!r}", flush=True)
    summary = {}
    for name, rows in ways.items():
        summary[name] = {key: statistics.mean(float(r[key]) for r in rows) for key in rows[0]}
        summary[name]["p50_seconds"] = percentile([r["seconds"] for r in rows], 0.5)
        mean = summary[name]
        print(f"netgpt {name}: answers carrying local facts {mean['answer_carries']:.2f}, "
              f"sent text carrying them {mean['sent_carries']:.2f}, cloud input {mean['cloud_input_tokens']:.1f} "
              f"tokens, uplink {mean['uplink_bytes']:.0f} B, latency mean {mean['seconds']:.2f} s "
              f"(edge {mean['edge_s']:.2f} s)", flush=True)
    summary["rows"] = len(pairs)
    edge.close()
    cloud_service.close()
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=Path, required=True)
    parser.add_argument("--part", choices=("latency", "batch", "quality", "netgpt", "all"), default="all")
    parser.add_argument("--rows-per-region", type=int, default=6)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--cloud-tokens", type=int, default=64)
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads", flush=True)
    pairs = test_rows(args.run, args.rows_per_region)
    results = {"run": str(args.run), "threads": torch.get_num_threads()}
    if args.part in ("latency", "all"):
        results["latency"] = latency(args.run, pairs[:10], args.repeats)
    if args.part in ("batch", "all"):
        results["batch"] = batching(args.run, pairs, args.repeats)
    if args.part in ("quality", "all"):
        results["quality"] = quality(args.run, pairs)
    if args.part in ("netgpt", "all"):
        results["netgpt"] = netgpt(args.run, pairs, args.cloud_tokens)
    text = json.dumps(results, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
