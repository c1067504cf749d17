"""`fed-netgpt compare`: the same sites and test split through every variant, one report.

| variant        | what trains                                                                 |
|----------------|------------------------------------------------------------------------------|
| base           | nothing: the base model with the same instruction                           |
| local          | each site alone (`federation.adapters=local`), the same steps x rounds      |
| global         | one adapter for every site (`federation.adapters=global`)                   |
| global_city    | the same, with the city in the context (`data.context=city`): the honest competitor of regional |
| regional       | one adapter per region (FedAvg of A and B apart)                             |
| personalized   | the regional run's site adapters (Ditto), the region's for held-out sites    |
| regional_ffa   | regional with FFA-LoRA (A frozen: the mean of B·A is exact)                  |
| regional_svd   | regional with the mean of B·A re-factorised to rank r by SVD                 |

regional and personalized come from one run: Ditto's personal adapters change nothing the federation averages.
Trained variants repeat over `compare.seeds` seeds (run.seed = train.seed = k, the data fixed), reported as
mean ± std.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from fed_netgpt.config import CompareConfig, Config

# run name -> (overrides of federation / data / personalization, the variants that run serves)
RUNS: dict[str, tuple[dict[str, dict[str, Any]], tuple[str, ...]]] = {
    "local": ({"federation": {"adapters": "local"}, "personalization": {"method": "none"}}, ("local",)),
    "global": ({"federation": {"adapters": "global"}, "personalization": {"method": "none"}}, ("global",)),
    "global_city": ({"federation": {"adapters": "global"}, "personalization": {"method": "none"},
                     "data": {"context": "city"}}, ("global",)),
    "regional": ({"federation": {"adapters": "regional"}, "personalization": {"method": "ditto"}},
                 ("regional", "personalized")),
    "regional_ffa": ({"federation": {"adapters": "regional", "lora_aggregation": "ffa"},
                      "personalization": {"method": "none"}}, ("regional",)),
    "regional_svd": ({"federation": {"adapters": "regional", "lora_aggregation": "svd"},
                      "personalization": {"method": "none"}}, ("regional",)),
}
# compare variant -> (run, the variant's name inside that run's report)
SOURCES = {
    "local": ("local", "local"), "global": ("global", "global"), "global_city": ("global_city", "global"),
    "regional": ("regional", "regional"), "personalized": ("regional", "personalized"),
    "regional_ffa": ("regional_ffa", "regional"), "regional_svd": ("regional_svd", "regional"),
}


def runs_for(variants: Sequence[str]) -> list[str]:
    """The runs that train the asked variants, each once."""
    return list(dict.fromkeys(SOURCES[v][0] for v in variants if v != "base"))


def run_config(config: Config, run: str, seed: int) -> Config:
    """The config of one trained run of the comparison, in its own folder under `run.output_dir`. The compare
    section is left at its defaults: a run does not depend on which other runs or how many seeds surround it
    (so `run.resume=true` recognises it when the comparison grows)."""
    overrides, _ = RUNS[run]
    sections = {name: replace(getattr(config, name), **values) for name, values in overrides.items()}
    folder = Path(config.run.output_dir) / "runs" / f"{run}-seed{seed}"
    return replace(config, **sections, train=replace(config.train, seed=seed), compare=CompareConfig(),
                   run=replace(config.run, output_dir=str(folder), seed=seed, resume=False, report=False))


def mean_over_seeds(results: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """One variant's results of several seeds: numbers averaged (nested dicts too), "std" beside the top level,
    the examples of the first seed."""
    merged = _mean(results)
    if len(results) > 1:
        merged["std"] = {key: _std([r[key] for r in results]) for key, value in results[0].items()
                         if _is_number(value)}
    merged["seeds"] = len(results)
    return merged


def _mean(results: Sequence[Any]) -> Any:
    first = results[0]
    if isinstance(first, dict):
        return {key: _mean([r[key] for r in results]) if all(key in r for r in results) else first[key]
                for key in first}
    if _is_number(first):
        values = [float(r) for r in results if not math.isnan(float(r))]
        return sum(values) / len(values) if values else math.nan
    return first


def _std(values: Sequence[float]) -> float:
    finite = [float(v) for v in values if not math.isnan(float(v))]
    if len(finite) < 2:
        return math.nan
    mean = sum(finite) / len(finite)
    return math.sqrt(sum((v - mean) ** 2 for v in finite) / (len(finite) - 1))


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
