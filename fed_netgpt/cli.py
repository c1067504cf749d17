"""The `fed-netgpt` command: simulate, compare, data build, evaluate, complete, serve, deploy credentials.

User mistakes (bad config, bad data, missing model or run folder) print one `error:` line and exit 2;
no traceback. This is the outermost layer: the only module of fed_netgpt that starts Flower apps.
"""

from __future__ import annotations

import os

# Library progress bars (datasets' partitioning, weight loading) in every process and Ray worker: tqdm reads this
# when it is imported, so it is set before anything imports it (hence E402 is off for this file in pyproject.toml).
os.environ.setdefault("TQDM_DISABLE", "1")

import argparse
import gc
import json
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import torch

from fed_netgpt.config import Config, ConfigError, ServingConfig, load_config, to_yaml
from fed_netgpt.data.schema import DataError, read_jsonl, write_jsonl
from fed_netgpt.data.sites import SiteData, load_heldout_sites, load_pairs, load_sites
from fed_netgpt.evaluation.comparison import jobs_for, mean_over_seeds, privacy_utility, run_config
from fed_netgpt.evaluation.plots import mean_curve, validation_curves, write_plot, write_privacy_plot
from fed_netgpt.evaluation.report import duration, json_safe, write_report
from fed_netgpt.evaluation.scoring import evaluate_run
from fed_netgpt.model.adapters import AdapterError, check_rank
from fed_netgpt.model.base import DeviceError, ModelNotFoundError, cache_root, load_base, resolve_device
from fed_netgpt.model.prompting import check_pair_lengths
from fed_netgpt.run.deployment import (
    DEFAULT_PORT,
    CredentialsError,
    check_host,
    deployment_commands,
    parse_address,
    parse_node,
    render_commands,
    write_credentials,
)
from fed_netgpt.run.folder import (
    FAILED,
    RunFolderError,
    aggregation_group,
    check_finished,
    latest_round,
    published,
    read_run_config,
    round_summaries,
    run_finished,
    run_lock,
    site_records,
)
from fed_netgpt.run.simulation import SimulationError, dying_with_parent, run_simulation_app
from fed_netgpt.training.privacy import privacy_report

USER_ERRORS = (ConfigError, DataError, AdapterError, ModelNotFoundError, RunFolderError, DeviceError,
               CredentialsError, SimulationError)


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        return int(args.handler(args) or 0)
    except USER_ERRORS as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C: what was started is stopped on the way out; no traceback
        print("interrupted", file=sys.stderr)
        return 130


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fed-netgpt", description="Federated LoRA personalization of edge LLMs.")
    commands = parser.add_subparsers(dest="command", required=True)

    simulate = commands.add_parser("simulate", help="run a whole federation on Flower's simulation engine")
    simulate.add_argument("--config", help="a YAML file merged over conf/base.yaml")
    simulate.add_argument("--resume", type=Path, metavar="RUN_DIR",
                          help="continue the run in RUN_DIR from its latest checkpoint, with its config.yaml "
                          "(overrides still apply, e.g. federation.num_rounds=6 to go on further)")
    simulate.add_argument("overrides", nargs="*", metavar="key=value")
    simulate.set_defaults(handler=simulate_command)

    compare = commands.add_parser("compare", help="train and evaluate base / local / global / regional / "
                                  "personalized side by side on the same sites and test split")
    compare.add_argument("--config", help="a YAML file merged over conf/base.yaml")
    compare.add_argument("overrides", nargs="*", metavar="key=value")
    compare.set_defaults(handler=compare_command)

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

    complete = commands.add_parser("complete", help="complete a prompt with a site's adapter (its own, else its "
                                   "region's); --cloud: and the cloud's answer to it")
    complete.add_argument("--run", required=True, type=Path)
    complete.add_argument("--site", required=True)
    complete.add_argument("--region", help="the site's region, when the run's data does not know the site")
    complete.add_argument("--cloud", action="store_true", help="send the completed prompt to the cloud too")
    _cloud_arguments(complete)
    complete.add_argument("prompt")
    complete.add_argument("overrides", nargs="*", metavar="key=value", help="serving.* settings")
    complete.set_defaults(handler=complete_command)

    serve = commands.add_parser("serve", help="the edge HTTP service (OpenAI-compatible); without --run the base "
                                "model alone (a local cloud)")
    serve.add_argument("--run", type=Path, help="a finished run folder: its adapters serve its sites and regions")
    serve.add_argument("--model", default="smollm2-135m", help="the base model when there is no --run "
                       "(smollm2-135m, tiny-random, or a folder)")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=_port, default=8000)
    serve.add_argument("--token", type=_token,
                       help="bearer token required on /v1 routes (default: $FED_NETGPT_TOKEN); needed for any host "
                       "but 127.0.0.1 / localhost")
    _cloud_arguments(serve)
    serve.add_argument("--log-prompts", action="store_true", help="write prompts and completions to the log")
    serve.add_argument("overrides", nargs="*", metavar="key=value", help="serving.* settings")
    serve.set_defaults(handler=serve_command)

    deploy = commands.add_parser("deploy", help="deployment on real edge nodes")
    deploy_commands = deploy.add_subparsers(dest="deploy_command", required=True)
    credentials = deploy_commands.add_parser(
        "credentials", help="write a CA, the SuperLink's TLS certificate and a key pair per node into a new folder, "
        "and print the commands of a deployment secured with them (TLS + SuperNode authentication)")
    credentials.add_argument("--out", type=Path, help="a new (or empty) folder for the credentials")
    credentials.add_argument("--host", action="append", default=[], help="a name or address nodes use to reach the "
                             "SuperLink, put in its certificate (repeat it; 127.0.0.1 and localhost always are)")
    credentials.add_argument("--node", action="append", default=[], metavar="NAME[=SITE,...]",
                             help="a SuperNode to make a key pair for (repeat it), with the sites it serves")
    credentials.add_argument("--superlink-address", metavar="HOST:PORT", help="where nodes and flwr reach the "
                             f"SuperLink (default: the first --host, else 127.0.0.1, port {DEFAULT_PORT})")
    credentials.add_argument("--insecure", action="store_true", help="write nothing; print the commands without "
                             "TLS or node authentication, for a lab on one machine only")
    credentials.set_defaults(handler=deploy_credentials_command)
    return parser


def prepared_config(args: argparse.Namespace) -> Config:
    """The config with what this machine decides resolved, logged and saved with the run: an absolute run folder
    (Ray workers write site adapters there) and `train.device=auto` turned into cpu or cuda (with a GPU share per
    client when none is set). `train.bf16=auto` stays: the first worker to train times a bf16 and an fp32 step of
    the real model once per machine, model and batch (fed_netgpt/model/precision.py) and logs what it chose."""
    config = load_config(args.config, args.overrides)
    device = resolve_device(config.train.device)
    train, simulation = replace(config.train, device=device.type), config.simulation
    where = "cpu"
    if device.type == "cuda":
        if simulation.num_gpus_per_client == 0:
            at_once = max(1, int((os.cpu_count() or 1) // simulation.num_cpus_per_client))
            simulation = replace(simulation, num_gpus_per_client=min(1.0, torch.cuda.device_count() / at_once))
        where = (f"cuda ({torch.cuda.device_count()} x {torch.cuda.get_device_name()}), "
                 f"{simulation.num_gpus_per_client:g} GPU per client")
    how = (f" (bf16 if a timed step says it is >5% faster; the timing is kept in {cache_root() / 'precision.json'})"
           if train.bf16 == "auto" else "")
    print(f"device: {where}; precision: train.bf16={train.bf16}{how}", flush=True)
    return replace(config, train=train, simulation=simulation,
                   run=replace(config.run, output_dir=str(Path(config.run.output_dir).expanduser().resolve())))


def simulate_command(args: argparse.Namespace) -> int:
    if args.resume is not None:
        if args.config:
            raise ConfigError("--resume RUN_DIR takes the run's own config.yaml; drop --config")
        read_run_config(args.resume)  # a clear error when RUN_DIR is not a run folder
        args.config = str(args.resume / "config.yaml")
        args.overrides = [*args.overrides, "run.resume=true", f"run.output_dir={args.resume.resolve()}"]
    config = prepared_config(args)
    sites = load_sites(config.data)  # bad data fails here, before the run folder is touched or any engine starts
    heldout = load_heldout_sites(config.data)
    base = load_base(config.model.name, config.model.cache_dir)  # converts SmolLM2 once, before workers race
    check_pair_lengths(base.tokenizer, [*sites, *heldout], config.train.max_length)
    check_rank(base, config.lora)
    if config.run.resume:
        finished = _finished_run(config)
        if finished:
            print(finished)
            return 0
        from server.app import starting_point  # the checkpoint the ServerApp would continue, checked here first

        groups = sorted({aggregation_group(config, s.site_id, s.region) for s in sites})
        starting_point(Path(config.run.output_dir), config, base, groups)
    with run_lock(config.run.output_dir):
        return _simulate(config, sites, len(heldout))


def _finished_run(config: Config) -> str | None:
    """What to say when the run to resume has already finished (it is then left untouched), else None."""
    folder = Path(config.run.output_dir)
    marker = published(folder)
    done = latest_round(folder)
    if marker is None or (folder / FAILED).is_file() or done < config.federation.num_rounds:
        return None
    when = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(float(marker.get("published_at", 0))))
    return (f"{folder}: the run finished all {done} rounds (published {when}); nothing to resume, nothing "
            f"changed. More rounds: fed-netgpt simulate --resume {folder} federation.num_rounds={done + 1}")


def _simulate(config: Config, sites: list[SiteData], heldout: int) -> int:
    regions = sorted({s.region for s in sites})
    print(f"Simulating {len(sites)} edge sites in {len(regions)} regions ({', '.join(regions)}), "
          f"{heldout} more held out, {config.federation.num_rounds} rounds, model {config.model.name}",
          flush=True)
    folder = Path(config.run.output_dir)
    run_simulation_app(to_yaml(config), config.simulation, config.simulation.num_supernodes or len(sites),
                       folder)
    if (folder / FAILED).is_file():
        print(f"error: the run failed: {json.loads((folder / FAILED).read_text())['reason']}", file=sys.stderr)
        return 1
    done = folder / ("report.json" if config.run.report else "adapters")
    return 0 if done.exists() or (folder / "site_adapters").exists() else 1


def compare_command(args: argparse.Namespace) -> int:
    """Train every asked variant (one `simulate` process each, seed by seed), then evaluate them all with one
    base model on the same rows and write report.json, report.md and report.png to `run.output_dir`.
    With `run.resume=true` a run that finished earlier with the same config is evaluated again, not retrained
    (how `compare.seeds=3` adds a third seed to a two-seed comparison)."""
    config = prepared_config(args)
    load_sites(config.data)  # bad data fails before the folder is touched
    with run_lock(config.run.output_dir) as folder:
        return _compare(config, folder)


def _compare(config: Config, folder: Path) -> int:
    base = load_base(config.model.name, config.model.cache_dir, config.train.device)
    (folder / "config.yaml").write_text(to_yaml(config))
    jobs, seeds = jobs_for(config.compare), config.compare.seeds
    results: dict[str, list[dict]] = {name: [] for job in jobs for name, _ in job.served}
    if "base" in config.compare.variants:
        results = {"base": [evaluate_run(folder, config, load_pairs(config.data), base, variants=["base"])
                            ["variants"]["base"]], **results}
    curves: dict[str, list[tuple[int, float]]] = {}
    started = time.perf_counter()
    for seed in range(seeds):
        for number, job in enumerate(jobs, start=1):
            run_cfg = run_config(config, job.run, seed, job.epsilon)
            print(f"[compare] seed {seed + 1}/{seeds}, run {number}/{len(jobs)}: {job.name} -> "
                  f"{run_cfg.run.output_dir} ({duration(time.perf_counter() - started)} elapsed)", flush=True)
            run_dir = Path(run_cfg.run.output_dir)
            if config.run.resume and run_finished(run_dir, run_cfg):
                print(f"[compare] {run_dir.name} finished earlier with the same config: evaluated, not retrained",
                      flush=True)
            else:
                _simulate_in_subprocess(run_cfg)
            report = evaluate_run(run_dir, run_cfg, load_pairs(run_cfg.data), base,
                                  variants=[inside for _, inside in job.served])
            for name, inside in job.served:
                results[name].append({**report["variants"][inside], **_run_costs(run_dir, run_cfg)})
                if seed == 0 and inside != "personalized":  # the validation loss is of the federated adapters
                    curves[name] = mean_curve(validation_curves(run_dir))
        text = _write_comparison(folder, config, results, curves, seed + 1, time.perf_counter() - started)
    print(f"\n{text}\n\nReport: {folder}/report.md, report.json, report.png")
    return 0


def _write_comparison(folder: Path, config: Config, results: dict[str, list[dict]],
                      curves: dict[str, list[tuple[int, float]]], seeds_done: int, seconds: float) -> str:
    """report.json, report.md and report.png of the seeds done so far (rewritten after every seed)."""
    variants = {v: mean_over_seeds(r) for v, r in results.items() if r}
    report = {"variants": variants, "seeds": seeds_done, "wall_seconds": seconds}
    trade_off = privacy_utility(variants, config.compare.epsilons)
    if trade_off:
        report["privacy_utility"] = trade_off
        write_privacy_plot(folder / "privacy-utility.png", trade_off, variants.get("base"))
    text = write_report(folder, report, config.evaluation.examples_to_show, title="Comparison of variants")
    write_plot(folder / "report.png", variants, curves, "Validation loss by round (mean over groups)")
    return text


def _simulate_in_subprocess(config: Config) -> None:
    """`fed-netgpt simulate` of one variant in its own process (a fresh Ray, memory returned); its console goes to
    <run>.log. A failed run is a clear error naming the log."""
    folder = Path(config.run.output_dir)
    folder.mkdir(parents=True, exist_ok=True)
    requested = folder.with_suffix(".yaml")
    requested.write_text(to_yaml(config))
    with (folder.with_suffix(".log")).open("w") as log:
        done = subprocess.run([sys.executable, "-m", "fed_netgpt.cli", "simulate", "--config", str(requested)],
                              stdout=log, stderr=subprocess.STDOUT,
                              preexec_fn=dying_with_parent(signal.SIGTERM))  # the run ends with the comparison
    if done.returncode != 0:
        raise RunFolderError(f"the {folder.name} run failed (exit {done.returncode}); see {folder.with_suffix('.log')}")


def _run_costs(run_dir: Path, config: Config) -> dict[str, float]:
    """The federation's wall time (start to last round, model loading left out), the mean adapter bytes a
    round moved, down to the sites and up from them, and under DP the epsilon the worst site reached
    (metrics.jsonl)."""
    rows = round_summaries(run_dir)
    costs = {"wall_seconds": float(rows[-1]["seconds"])} if rows else {}
    moved = [row["bytes"] for row in rows if "bytes" in row]
    if moved:
        costs.update({f"{way}_bytes_per_round": sum(r[way] for r in moved) / len(moved)
                      for way in ("downlink", "uplink")})
    if config.privacy.mode != "none":
        costs["epsilon_max"] = privacy_report(config.privacy, site_records(run_dir), rows)["epsilon_max"]
    return costs


def data_build_command(args: argparse.Namespace) -> int:
    config = load_config(args.config, args.overrides)
    pairs = load_pairs(config.data)
    sites = load_sites(config.data)
    path = write_jsonl(pairs, args.out)
    print(f"wrote {len(pairs)} prompt pairs for {len(sites)} sites to {path}")
    return 0


def evaluate_command(args: argparse.Namespace) -> int:
    config = read_run_config(args.run)
    check_finished(args.run, config)
    pairs = read_jsonl(args.data) if args.data else load_pairs(config.data)
    if args.data and not any(p.split == "test" for p in pairs):
        pairs = [replace(p, split="test") for p in pairs]  # the file names no split: evaluate on all of it
    base = load_base(config.model.name, config.model.cache_dir, device="auto")
    report = evaluate_run(args.run, config, pairs, base)
    print(json.dumps(json_safe(report), indent=2, ensure_ascii=False))
    return 0


def _port(text: str) -> int:
    if not text.isdigit() or not 1 <= int(text) <= 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not a TCP port (1-65535)")
    return int(text)


def _token(text: str) -> str:
    """A bearer token as an HTTP header carries it: visible ASCII, no blanks (RFC 6750)."""
    if not text or not all("!" <= char <= "~" for char in text):
        raise argparse.ArgumentTypeError("a token is one word of visible ASCII characters, no blanks; got "
                                         f"{text!r}")
    return text


def _cloud_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--cloud-url", help="an OpenAI-compatible endpoint, e.g. http://127.0.0.1:8001/v1 (default: "
                        "a local serving.cloud model); its key comes from $OPENAI_API_KEY")
    parser.add_argument("--cloud-model", help="the cloud's model (default: the first it lists at GET /v1/models)")


def serving_settings(args: argparse.Namespace) -> ServingConfig:
    """serving.* from conf/base.yaml and the command's key=value overrides, then its flags."""
    settings = load_config(None, args.overrides).serving
    return replace(settings, cloud_url=args.cloud_url or settings.cloud_url,
                   cloud_model=args.cloud_model or settings.cloud_model,
                   log_prompts=getattr(args, "log_prompts", False) or settings.log_prompts)


def complete_command(args: argparse.Namespace) -> int:
    from fed_netgpt.serving.catalog import UnknownTarget
    from fed_netgpt.serving.cloud import CloudError, cloud_for
    from fed_netgpt.serving.edge import EdgeService, PromptTooLong
    from fed_netgpt.serving.pipeline import generate

    if not args.prompt.strip():
        raise ConfigError("the prompt is empty")
    settings = serving_settings(args)
    edge = EdgeService(settings, run=args.run)
    try:
        if not args.cloud:
            print(edge.complete(args.prompt, args.site, args.region or "").text)
            return 0
        result = generate(edge, cloud_for(settings, edge), args.prompt, args.site, args.region or "")
    except (UnknownTarget, PromptTooLong, CloudError) as err:
        raise RunFolderError(str(err.args[0])) from None
    finally:
        edge.close()
    print(f"completed at the edge ({result.adapter}, {result.edge_seconds:.2f} s): {result.completion}\n"
          f"cloud ({result.cloud_model}, {result.cloud_seconds:.2f} s, {result.uplink_bytes} bytes up): "
          f"{result.answer}")
    return 0


LOOPBACK = ("127.0.0.1", "localhost", "::1")


def serve_command(args: argparse.Namespace) -> int:
    import logging

    import uvicorn

    from fed_netgpt.serving.cloud import cloud_for
    from fed_netgpt.serving.edge import EdgeService
    from fed_netgpt.serving.http import create_app

    if args.token is None and os.environ.get("FED_NETGPT_TOKEN"):
        try:
            args.token = _token(os.environ["FED_NETGPT_TOKEN"])
        except argparse.ArgumentTypeError as err:
            raise ConfigError(f"$FED_NETGPT_TOKEN: {err}") from None
    args.token = args.token or ""
    if not args.token and args.host not in LOOPBACK:
        raise ConfigError(f"--host {args.host} opens the service to other machines: pass --token (or set "
                          "$FED_NETGPT_TOKEN) so that /v1 routes need it, or serve on 127.0.0.1")
    settings = serving_settings(args)
    edge = EdgeService(settings, run=args.run, model_name=args.model)
    cloud = cloud_for(settings, edge)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    catalog = edge.catalog
    print(f"serving {catalog.base_name} ({edge.precision_reason}) with {len(catalog.adapters)} adapters for "
          f"{len(catalog.sites)} sites in {len(catalog.regions)} regions; cloud: {settings.cloud_url or cloud.name}; "
          f"http://{args.host}:{args.port}/ {'(token required)' if args.token else ''}", flush=True)
    uvicorn.run(create_app(edge, cloud, settings, args.token), host=args.host, port=args.port, log_level="warning")
    edge.close()
    return 0


def deploy_credentials_command(args: argparse.Namespace) -> int:
    """Write the credentials and print the commands that use them (fed_netgpt/run/deployment.py)."""
    nodes = [parse_node(text) for text in args.node]
    hosts = [check_host(host) for host in args.host]
    address = args.superlink_address or f"{hosts[0] if hosts else '127.0.0.1'}:{DEFAULT_PORT}"
    host, _ = parse_address(address)
    if args.insecure:
        if args.out is not None:
            raise CredentialsError("--insecure writes no credentials: drop --out")
        print(render_commands(deployment_commands(None, address, nodes)))
        return 0
    if args.out is None:
        raise CredentialsError("--out DIR is required: the folder to write the credentials into")
    written = write_credentials(args.out, [*hosts, host], nodes)
    print(f"# wrote to {written.folder}: ca.crt, ca.key (keep it offline), superlink.crt, superlink.key"
          + (f", nodes/<name>.key and .pub for {', '.join(n.name for n in nodes)}" if nodes else "") + "\n")
    print(render_commands(deployment_commands(written, address, nodes)))
    return 0


def main_exit() -> None:
    code = main()
    # The interpreter's last garbage collections walk every object torch, transformers and peft created (1.2 s of
    # a 2-core machine's time at each exit); the process ends here, so they are skipped. Exit handlers still run.
    gc.freeze()
    sys.exit(code)


if __name__ == "__main__":
    main_exit()
