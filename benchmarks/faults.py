"""Faults on the embedded SmolLM2, read through the personalization metrics (location-fact accuracy):

    python benchmarks/faults.py poisoning [--out runs/faults] [--robust trimmed_mean krum median clipped_mean]
    python benchmarks/faults.py crashes [--out runs/faults]

`poisoning`: one region of 10 training sites (France, `data.sites_per_region=10`), its regional adapter alone
(`personalization.method=none`), every test row scored (30); the federation clean, then with 20 % of the sites
(2) sending sign-flipped x10 updates every round under FedAvg and under each robust aggregator.
`crashes`: the default federation (France, Japan, Brazil, 3 training sites each, Ditto) with 30 % of the sites
crashing at random every round; base, regional and personalized (the clean run is the README's comparison).
Each run is a real `fed-netgpt simulate` into `<out>/<name>` (extra key=value overrides go to every run); a run
whose report.json exists is read again rather than retrained. Prints a Markdown table as runs finish.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

POISONING = ["data.countries=[FR]", "data.sites_per_region=10", "personalization.method=none",
             "evaluation.max_examples_per_region=30"]
POISONED = ["faults.poison_fraction=0.2", "faults.poison_kind=sign_flip"]


def run(out: Path, name: str, overrides: list[str]) -> tuple[dict, float]:
    """The run's report.json ({} when it failed) and its wall seconds (0 when it was already there)."""
    folder = out / name
    if (folder / "report.json").is_file():
        return json.loads((folder / "report.json").read_text()), 0.0
    started = time.perf_counter()
    with (out / f"{name}.log").open("w") as log:
        done = subprocess.run([sys.executable, "-m", "fed_netgpt.cli", "simulate", *overrides,
                               f"run.output_dir={folder}"], stdout=log, stderr=subprocess.STDOUT)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        print(f"| {name} | failed (exit {done.returncode}, see {out}/{name}.log) |", flush=True)
        return {}, seconds
    return json.loads((folder / "report.json").read_text()), seconds


def settings(part: str, robust: list[str]) -> dict[str, list[str]]:
    if part == "crashes":
        return {"30 % crashing": ["faults.crash_probability=0.3"]}
    return {"clean, fedavg": POISONING, "poisoned, fedavg": [*POISONING, *POISONED],
            **{f"poisoned, {name}": [*POISONING, *POISONED, f"federation.robust={name}"] for name in robust}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("part", choices=["poisoning", "crashes"])
    parser.add_argument("--out", type=Path, default=Path("runs/faults"))
    parser.add_argument("--robust", nargs="+", default=["trimmed_mean", "krum", "median", "clipped_mean"])
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    variants = ["regional"] if args.part == "poisoning" else ["base", "regional", "personalized"]
    print(f"| run | {' | '.join(f'{v}: location facts' for v in variants)} | site-rounds failed | poisoned sites | "
          "minutes |")
    print("|---|" + "---|" * (len(variants) + 3), flush=True)
    for label, overrides in settings(args.part, args.robust).items():
        name = f"{args.part}-" + label.replace(", ", "-").replace(" % ", "pct-").replace(" ", "-")
        report, seconds = run(args.out, name, [*overrides, *args.overrides])
        if report:
            facts = " | ".join(f"{report['variants'][v]['fact_accuracy']:.1%}" for v in variants)
            failures = report.get("failures", {})
            print(f"| {label} | {facts} | {failures.get('failed_or_rejected', 0)} of {failures.get('site_rounds', 0)} "
                  f"| {', '.join(report.get('poisoned_sites', [])) or '-'} | {seconds / 60:.1f} |", flush=True)


if __name__ == "__main__":
    main()
