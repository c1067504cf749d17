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

The privacy-utility variants (`local_dp`, `regional_dp`, `personalized_dp`, `regional_ffa_dp`) are `local`,
`regional`, `personalized` and `regional_ffa` trained under DP-SGD at each site (`privacy.mode=sample_dp`) once
per epsilon in `compare.epsilons`, named `<variant>@<epsilon>`; at `inf` they are the non-private run itself.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
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


# privacy-utility variant -> the variant it is under DP-SGD
DP_VARIANTS = {"local_dp": "local", "regional_dp": "regional", "personalized_dp": "personalized",
               "regional_ffa_dp": "regional_ffa"}


@dataclass(frozen=True)
class Job:
    """One trained run of a comparison: which of `RUNS`, its privacy budget (inf: not private) and what it
    serves: (name in the comparison, variant in the run's own report)."""

    run: str
    epsilon: float
    served: tuple[tuple[str, str], ...]

    @property
    def name(self) -> str:
        return run_name(self.run, self.epsilon)


def run_name(run: str, epsilon: float) -> str:
    """`regional`, `regional-eps8`: a run's folder under runs/, without the seed."""
    return run if math.isinf(epsilon) else f"{run}-eps{epsilon:g}"


def dp_name(variant: str, epsilon: float) -> str:
    """`regional_dp@8`: a privacy-utility variant at one epsilon."""
    return f"{variant}@{epsilon:g}"


def jobs_for(compare: CompareConfig) -> list[Job]:
    """The runs that train the asked variants, each once, in the order first asked: a variant at an epsilon
    shares its run with the other variants that run serves (regional and personalized come from one run), and
    at inf with the non-private variant."""
    served: dict[tuple[str, float], list[tuple[str, str]]] = {}
    for variant in compare.variants:
        if variant in DP_VARIANTS:
            run, inside = SOURCES[DP_VARIANTS[variant]]
            for epsilon in compare.epsilons:
                served.setdefault((run, float(epsilon)), []).append((dp_name(variant, epsilon), inside))
        elif variant != "base":
            run, inside = SOURCES[variant]
            served.setdefault((run, math.inf), []).append((variant, inside))
    return [Job(run, epsilon, tuple(names)) for (run, epsilon), names in served.items()]


def run_config(config: Config, run: str, seed: int, epsilon: float = math.inf) -> Config:
    """The config of one trained run of the comparison, in its own folder under `run.output_dir`. The compare
    section is left at its defaults: a run does not depend on which other runs or how many seeds surround it
    (so `run.resume=true` recognises it when the comparison grows). A finite `epsilon` trains under DP-SGD at
    every site with the noise derived to end the run at that epsilon."""
    overrides, _ = RUNS[run]
    sections = {section: replace(getattr(config, section), **values) for section, values in overrides.items()}
    if math.isfinite(epsilon):
        sections["privacy"] = replace(config.privacy, mode="sample_dp", target_epsilon=epsilon, noise_multiplier=0.0)
    folder = Path(config.run.output_dir) / "runs" / f"{run_name(run, epsilon)}-seed{seed}"
    return replace(config, **sections, train=replace(config.train, seed=seed), compare=CompareConfig(),
                   run=replace(config.run, output_dir=str(folder), seed=seed, resume=False, report=False))


def privacy_utility(variants: dict[str, dict[str, Any]], epsilons: Sequence[float]) -> dict[str, dict[str, Any]]:
    """Per privacy-utility variant, its result at each epsilon (label -> result), in `epsilons`' order."""
    table: dict[str, dict[str, Any]] = {}
    for variant in DP_VARIANTS:
        row = {f"{e:g}": variants[dp_name(variant, e)] for e in epsilons if dp_name(variant, e) in variants}
        if row:
            table[variant] = row
    return table


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
