"""Poisoned sites against robust aggregation: the same federation clean, with 20 % of each region's sites sending
poisoned updates under FedAvg, and under each robust aggregator; location-fact accuracy of the regional adapters.

    python benchmarks/poisoning.py [--out runs/poisoning] [--robust trimmed_mean krum median clipped_mean]
                                   [key=value ...]

Defaults: the embedded SmolLM2, France and Japan with 10 training sites each (`data.sites_per_region=10`), the
regional adapters alone (`personalization.method=none`), every test row scored (30 a region), 20 % poisoned
(2 sites a region) with `faults.poison_kind=sign_flip`. Each run is a real `fed-netgpt simulate` into
`<out>/<name>`; a finished run (its report.json) is read again rather than retrained. Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

COMMON = ["data.countries=[FR,JP]", "data.sites_per_region=10", "personalization.method=none",
          "evaluation.max_examples_per_region=30"]
POISONED = ["faults.poison_fraction=0.2"]


def run(out: Path, name: str, overrides: list[str]) -> tuple[dict, float]:
    """The run's report.json and its wall seconds (0 when it was already there)."""
    folder = out / name
    if not (folder / "report.json").is_file():
        started = time.perf_counter()
        log = (out / f"{name}.log").open("w")
        done = subprocess.run([sys.executable, "-m", "fed_netgpt.cli", "simulate", *overrides,
                               f"run.output_dir={folder}"], stdout=log, stderr=subprocess.STDOUT)
        if done.returncode != 0:
            print(f"| {name} | failed (exit {done.returncode}, see {out}/{name}.log) |", flush=True)
            return {}, time.perf_counter() - started
        return json.loads((folder / "report.json").read_text()), time.perf_counter() - started
    return json.loads((folder / "report.json").read_text()), 0.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("runs/poisoning"))
    parser.add_argument("--robust", nargs="+", default=["trimmed_mean", "krum", "median", "clipped_mean"])
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    settings = {"clean, fedavg": [], "poisoned, fedavg": POISONED}
    settings.update({f"poisoned, {robust}": [*POISONED, f"federation.robust={robust}"] for robust in args.robust})
    print("| run | location facts | region-level | site-level | france | japan | poisoned sites | minutes |")
    print("|---|---|---|---|---|---|---|---|", flush=True)
    for label, overrides in settings.items():
        name = label.replace(", ", "-")
        report, seconds = run(args.out, name, [*COMMON, *overrides, *args.overrides])
        if not report:
            continue
        regional = report["variants"]["regional"]
        regions = regional["regions"]
        print(f"| {label} | {regional['fact_accuracy']:.1%} | {regional['region_fact_accuracy']:.1%} | "
              f"{regional['site_fact_accuracy']:.1%} | {regions['france']['fact_accuracy']:.1%} | "
              f"{regions['japan']['fact_accuracy']:.1%} | {', '.join(report.get('poisoned_sites', [])) or '-'} | "
              f"{seconds / 60:.1f} |", flush=True)


if __name__ == "__main__":
    main()
