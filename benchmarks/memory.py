"""Peak resident memory of a whole simulation (every process: driver, Ray, workers) as the number of sites grows.

    python benchmarks/memory.py [--sites 10 100 1000] [--trained 10] [--model tiny-random] [key=value ...]

Each run is `fed-netgpt simulate` with `data.num_sites=N` over 10 regions, one round, and `federation.fraction_train`
(and `fraction_evaluate`) set so that `--trained` sites train in every run: what grows is only the number of sites
that exist. The process tree's summed RSS is sampled every 0.2 s. For contrast, the naive design (a model copy per
site, as frameworks that build a model per virtual client do) is measured in this process by deep-copying the base
`--naive` times, and extrapolated per site.
"""

from __future__ import annotations

import argparse
import copy
import subprocess
import sys
import tempfile
import time

import psutil

from fed_netgpt.model.base import load_base


def tree_rss(process: psutil.Process) -> int:
    """Resident bytes of a process and all its descendants (processes that vanish meanwhile count 0)."""
    total = 0
    for proc in [process, *process.children(recursive=True)]:
        try:
            total += proc.memory_info().rss
        except psutil.Error:
            pass
    return total


def simulate_peak(sites: int, trained: int, model: str, nodes: int, overrides: list[str]) -> tuple[int, float, int]:
    """Peak tree RSS (bytes), wall seconds and exit code of one simulation of `sites` sites."""
    fraction = min(1.0, trained / sites)
    with tempfile.TemporaryDirectory() as folder:
        command = [sys.executable, "-m", "fed_netgpt.cli", "simulate", f"model.name={model}",
                   f"data.num_sites={sites}", f"data.num_regions={min(10, sites)}", "federation.num_rounds=1",
                   f"federation.fraction_train={fraction}", f"federation.fraction_evaluate={fraction}",
                   "personalization.method=none", "run.report=false", f"run.output_dir={folder}/run",
                   f"simulation.num_supernodes={nodes}", *overrides]
        started = time.perf_counter()
        with open(f"{folder}/log", "w") as log:
            child = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
            process, peak = psutil.Process(child.pid), 0
            while child.poll() is None:
                peak = max(peak, tree_rss(process))
                time.sleep(0.2)
        if child.returncode:
            print(open(f"{folder}/log").read()[-3000:], file=sys.stderr)
        return peak, time.perf_counter() - started, child.returncode


def naive_per_site(model: str, copies: int) -> float:
    """Bytes each extra full model copy adds to this process's RSS."""
    base = load_base(model).model
    before = psutil.Process().memory_info().rss
    kept = [copy.deepcopy(base) for _ in range(copies)]
    grown = psutil.Process().memory_info().rss - before
    del kept
    return grown / copies


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sites", type=int, nargs="+", default=[10, 100, 1000])
    parser.add_argument("--trained", type=int, default=10, help="sites trained per round in every run")
    parser.add_argument("--model", default="tiny-random")
    parser.add_argument("--naive", type=int, default=20, help="model copies for the naive baseline")
    parser.add_argument("--nodes", type=int, default=0, help="Flower nodes the sites share (0: one per site)")
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    args = parser.parse_args()
    per_copy = naive_per_site(args.model, args.naive)
    first = None
    nodes = f"{args.nodes} nodes" if args.nodes else "a node per site"
    print(f"{args.model}, 1 round, {args.trained} sites trained per run, {nodes}, every process of the simulation:")
    for sites in args.sites:
        peak, seconds, code = simulate_peak(sites, args.trained, args.model, args.nodes, args.overrides)
        first = first or (sites, peak)
        extra = (peak - first[1]) / (sites - first[0]) if sites != first[0] else 0.0
        print(f"  {sites:5d} sites: peak RSS {peak / 2**30:5.2f} GiB  ({peak / first[1]:.2f}x the {first[0]}-site run, "
              f"{extra / 2**20:+.3f} MiB per added site)  {seconds:5.0f} s  exit {code}  | a model copy per site "
              f"would hold {sites * per_copy / 2**30:6.2f} GiB more", flush=True)
    print(f"naive baseline: {per_copy / 2**20:.1f} MiB per model copy (measured over {args.naive} copies)")


if __name__ == "__main__":
    main()
