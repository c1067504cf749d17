"""Training through the Flower simulation against the same training in one plain process: what the path costs.

    python benchmarks/flower_path.py [--sites 100] [--trained 10] [--model smollm2-135m] [key=value ...]

`fed-netgpt simulate` runs 2 rounds over `--sites` sites (10 regions), `--trained` of them sampled a round,
without per-round evaluation or report; round 2's wall time (messages, Ray, set_state, training, replies,
aggregation, checkpoint) is compared with the same training in this process: `engine.train_sites` once per site
on that site's `SiteJob` (K=1, what a node serving one site runs; `train.engine=peft` makes both sides peft's loop,
`reference.train_adapter`), on the same sites with the same seeds, the same tokens. Round 1 is left out: it
includes loading the model into the worker.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from fed_netgpt.config import load_config
from fed_netgpt.data.sites import load_sites
from fed_netgpt.model.adapters import attach_adapter, get_state
from fed_netgpt.model.base import load_base
from fed_netgpt.training.engine import SiteJob, train_sites


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sites", type=int, default=100)
    parser.add_argument("--trained", type=int, default=10)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    args = parser.parse_args()
    overrides = [f"model.name={args.model}", f"data.num_sites={args.sites}", "data.num_regions=10",
                 "federation.num_rounds=2", f"federation.fraction_train={args.trained / args.sites}",
                 "federation.fraction_evaluate=0", "personalization.method=none", "run.report=false",
                 *args.overrides]
    with tempfile.TemporaryDirectory() as folder:
        command = [sys.executable, "-m", "fed_netgpt.cli", "simulate", *overrides, f"run.output_dir={folder}"]
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode:
            sys.exit(f"simulate failed:\n{done.stdout[-3000:]}{done.stderr[-3000:]}")
        rows = [json.loads(line) for line in (Path(folder) / "metrics.jsonl").read_text().splitlines()]
    rounds = {row["round"]: row["seconds"] for row in rows if "site_id" not in row}
    flower_seconds = rounds[2] - rounds[1]
    trained = sorted(row["site_id"] for row in rows if "site_id" in row and row["round"] == 2)
    config = load_config(overrides=overrides)
    sites = {site.site_id: site for site in load_sites(config.data)}
    base = load_base(config.model.name)
    model = attach_adapter(base, "path", config.lora, seed=config.run.seed)
    start = get_state(model, "path")
    started = time.perf_counter()
    for site_id in trained:  # each from the round's start, seeded by the round (2) as the nodes seed it
        train_sites(base, [SiteJob(site_id, sites[site_id].train, start, seed=2)], config.lora, config.train)
    raw_seconds = time.perf_counter() - started
    print(f"{args.model}, {args.sites} sites, round 2 trained {len(trained)}: through Flower {flower_seconds:.1f} s, "
          f"the same training in one process {raw_seconds:.1f} s on {torch.get_num_threads()} threads: "
          f"{raw_seconds / flower_seconds:.2f}x the raw tokens/s")


if __name__ == "__main__":
    main()
