"""The `fed-netgpt` command: simulate, data build, evaluate, complete.

User mistakes (bad config, bad data, missing model or run folder) print one `error:` line and exit 2;
no traceback. This is the outermost layer: the only module of fed_netgpt that starts Flower apps.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

from fed_netgpt.adapters import AdapterError, load_adapter
from fed_netgpt.config import ConfigError, load_config
from fed_netgpt.data.schema import DataError, read_jsonl, write_jsonl
from fed_netgpt.data.sites import load_pairs, load_sites
from fed_netgpt.evaluation import evaluate_run, generate_completions, report_json
from fed_netgpt.models import ModelNotFoundError, load_base
from fed_netgpt.runs import RunFolderError, adapter_dir, read_run_config, run_regions, serving_adapter

USER_ERRORS = (ConfigError, DataError, AdapterError, ModelNotFoundError, RunFolderError)


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        return int(args.handler(args) or 0)
    except USER_ERRORS as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fed-netgpt", description="Federated LoRA personalization of edge LLMs.")
    commands = parser.add_subparsers(dest="command", required=True)

    simulate = commands.add_parser("simulate", help="run a whole federation on Flower's simulation engine")
    simulate.add_argument("--config", help="a YAML file merged over conf/base.yaml")
    simulate.add_argument("overrides", nargs="*", metavar="key=value")
    simulate.set_defaults(handler=simulate_command)

    data = commands.add_parser("data", help="prompt-pair data")
    data_commands = data.add_subparsers(dest="data_command", required=True)
    build = data_commands.add_parser("build", help="write the location prompt-pair JSONL")
    build.add_argument("--config")
    build.add_argument("--out", default="data/prompt_pairs.jsonl")
    build.add_argument("overrides", nargs="*", metavar="key=value")
    build.set_defaults(handler=data_build_command)

    evaluate = commands.add_parser("evaluate", help="metrics of a finished run, as JSON on stdout")
    evaluate.add_argument("--run", required=True, type=Path)
    evaluate.add_argument("--data", help="a prompt-pair JSONL to evaluate on instead of the run's data")
    evaluate.set_defaults(handler=evaluate_command)

    complete = commands.add_parser("complete", help="complete a prompt with a site's regional adapter")
    complete.add_argument("--run", required=True, type=Path)
    complete.add_argument("--site", required=True)
    complete.add_argument("--region", help="the site's region, when the run's data does not know the site")
    complete.add_argument("prompt")
    complete.set_defaults(handler=complete_command)
    return parser


def simulate_command(args: argparse.Namespace) -> int:
    config = load_config(args.config, args.overrides)
    sites = load_sites(config.data)  # bad data fails here, before any engine starts
    load_base(config.model.name, config.model.cache_dir)  # converts SmolLM2 once, before workers race
    from flwr.simulation import run_simulation  # Flower (and Ray) load only for the command that needs them

    from clients.app import app as client_app
    from server.app import server_app_for

    regions = sorted({s.region for s in sites})
    print(f"Simulating {len(sites)} edge sites in {len(regions)} regions ({', '.join(regions)}), "
          f"{config.federation.num_rounds} rounds, model {config.model.name}", flush=True)
    backend = {
        "client_resources": {"num_cpus": config.simulation.num_cpus_per_client, "num_gpus": 0.0},
        "init_args": {"num_cpus": os.cpu_count() or 1, "include_dashboard": False},
    }
    run_simulation(server_app_for(config), client_app, num_supernodes=len(sites), backend_config=backend)
    return 0 if (Path(config.run.output_dir) / "report.json").is_file() else 1


def data_build_command(args: argparse.Namespace) -> int:
    config = load_config(args.config, args.overrides)
    pairs = load_pairs(config.data)
    sites = load_sites(config.data)
    path = write_jsonl(pairs, args.out)
    print(f"wrote {len(pairs)} prompt pairs for {len(sites)} sites to {path}")
    return 0


def evaluate_command(args: argparse.Namespace) -> int:
    config = read_run_config(args.run)
    pairs = read_jsonl(args.data) if args.data else load_pairs(config.data)
    if args.data and not any(p.split == "test" for p in pairs):
        pairs = [replace(p, split="test") for p in pairs]  # the file names no split: evaluate on all of it
    base = load_base(config.model.name, config.model.cache_dir)
    print(json.dumps(report_json(*evaluate_run(args.run, config, pairs, base)), indent=2))
    return 0


def complete_command(args: argparse.Namespace) -> int:
    config = read_run_config(args.run)
    pairs = [p for p in load_pairs(config.data) if p.site_id == args.site]
    region = args.region or (pairs[0].region if pairs else None)
    if region is None:
        raise RunFolderError(f"site {args.site!r} is not in the run's data; pass --region (one of: "
                             f"{', '.join(run_regions(args.run))})")
    adapter_region = serving_adapter(config, region)
    if adapter_region not in run_regions(args.run):
        raise RunFolderError(f"region {region!r} has no adapter in {args.run}/adapters; known regions: "
                             f"{', '.join(run_regions(args.run))}")
    context = pairs[0].context if pairs else f"site: {args.site}"
    base = load_base(config.model.name, config.model.cache_dir)
    model = load_adapter(base, adapter_region, adapter_dir(args.run, adapter_region))
    completion = generate_completions(model, base.tokenizer, [(context, args.prompt)], config.evaluation.max_new_tokens)
    print(completion[0])
    return 0


def main_exit() -> None:
    sys.exit(main())


if __name__ == "__main__":
    main_exit()
