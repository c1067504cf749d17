"""The ServerApp: learn each node's site and region, run the regional strategy, write the run folder."""

from __future__ import annotations

import logging
import random
import time
from pathlib import Path

from flwr.app import ArrayRecord, Context
from flwr.serverapp import Grid, ServerApp

from fed_netgpt.adapters import attach_adapter, get_state
from fed_netgpt.config import Config, load_config, overrides_from_run_config, to_yaml
from fed_netgpt.data.sites import load_pairs, load_sites
from fed_netgpt.evaluation import evaluate_run
from fed_netgpt.faults import poisoned_sites
from fed_netgpt.models import BaseModel, load_base
from fed_netgpt.plots import validation_curves, write_plot
from fed_netgpt.protocol import RunContext, from_record, to_record
from fed_netgpt.report import duration, write_report
from fed_netgpt.runs import (
    FAILED,
    RunFolderError,
    aggregation_group,
    append_metrics,
    checkpoint_optimizer,
    checkpoint_sampling,
    failure_summary,
    latest_checkpoint,
    mark_failed,
    never_updated,
    round_summaries,
    run_lock,
    save_adapters,
    save_checkpoint,
    site_records,
    start_run,
)
from fed_netgpt.training.privacy import privacy_report, recorded_histories
from server.federated_report import federated_report, scored_by_sites
from server.site_grid import DiscoveryError, SiteGrid, discover_sites
from strategies.aggregation import merge_regions, split_regions
from strategies.regional import RegionalStrategy
from strategies.registry import make_strategy

log = logging.getLogger("fed_netgpt.server")
app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """`flwr run .`: the config comes from conf/ plus the keys changed with --run-config; the run folder is locked
    as `fed-netgpt simulate` locks it (which holds the lock itself, around server_app_for)."""
    config = load_config(overrides=overrides_from_run_config(context.run_config))
    with run_lock(config.run.output_dir):
        run_federation(grid, config)


def server_app_for(config: Config) -> ServerApp:
    """A ServerApp bound to an already resolved config (what `fed-netgpt simulate` runs)."""
    bound = ServerApp()

    @bound.main()
    def _main(grid: Grid, context: Context) -> None:
        run_federation(grid, config)

    return bound


def run_federation(grid: Grid, config: Config) -> Path:
    _setup_logging()
    folder, run_id = start_run(config)
    log.info("run folder: %s\n%s", folder, to_yaml(config))
    private = config.privacy.mode == "sample_dp"  # each site is told how much it has spent (a resumed run's too)
    message_config = RunContext(to_yaml(config), run_id,
                                recorded_histories(site_records(folder)) if private else None).to_record()
    expected = len(load_sites(config.data))
    try:
        sites, routes = discover_sites(grid, expected, config.federation, message_config)
    except DiscoveryError as err:  # no node served a site: one line for the user, the folder marked failed
        mark_failed(folder, str(err))
        log.error("the run failed: %s; %s marks the folder", err, FAILED)
        return folder
    site_grid = SiteGrid(grid, routes, config.train.sites_per_pass)  # from here on messages go to sites
    site_groups = {number: aggregation_group(config, s.site_id, s.region) for number, s in sites.items()}
    base = load_base(config.model.name, config.model.cache_dir, config.train.device)
    regions = sorted(set(site_groups.values()))
    done, arrays = starting_point(folder, config, base, regions)
    strategy = RegionalStrategy(lambda num_sites: make_strategy(config, num_sites, done), site_groups,
                                config.federation.lora_aggregation, config.lora.r, config.federation.wire_dtype,
                                rounds_done=done, min_replies=config.federation.min_replies,
                                max_update_norm=config.federation.max_update_norm)
    poisoned = poisoned_sites(config.faults.poison_fraction, config.run.seed,
                              {s.site_id: s.region for s in sites.values()})
    if poisoned:
        log.warning("faults.poison_fraction=%g: %s send %s-poisoned updates every round (federation.robust=%s)",
                    config.faults.poison_fraction, ", ".join(sorted(poisoned)), config.faults.poison_kind,
                    config.federation.robust)
    random.seed(config.run.seed)  # Flower's strategies sample sites with Python's random: a run is reproducible
    if done:  # the server optimizer and the site sampling continue where the checkpoint left them
        strategy.restore_optimizer_states(checkpoint_optimizer(folder, done))
        sampling = checkpoint_sampling(folder, done)
        if sampling is not None:
            random.setstate(sampling)
    started = time.perf_counter()

    def end_of_round(server_round: int, round_arrays: ArrayRecord) -> None:
        if server_round == 0:
            return None
        server_round += done  # a resumed run numbers its rounds after the checkpoint's
        rows = [{"round": server_round, "seconds": round(time.perf_counter() - started, 1), **strategy.round_metrics,
                 **site_grid.train_downlink}]
        for number, record in strategy.site_replies.items():
            site = sites[number]
            rows.append({"round": server_round, "site_id": site.site_id, "region": site.region, **record,
                         **({"poisoned": True} if site.site_id in poisoned else {})})
        save_checkpoint(folder, server_round, from_record(round_arrays), strategy.optimizer_states(), rows,
                        random.getstate())
        append_metrics(folder, rows)  # after the checkpoint, which keeps them too (a crash between loses nothing)
        _log_round(server_round, config.federation.num_rounds, done + 1, time.perf_counter() - started, regions,
                   strategy.round_metrics)
        if private:  # the next round's messages: a node's own record may lag (two of its sites trained at once
            # in a simulation both rewrote its state), the server's does not
            message_config.update(RunContext(to_yaml(config), run_id,
                                             recorded_histories(site_records(folder))).to_record())
        return None

    if done < config.federation.num_rounds:
        arrays = from_record(strategy.start(
            grid=site_grid, initial_arrays=to_record(arrays), num_rounds=config.federation.num_rounds - done,
            timeout=config.federation.timeout, train_config=message_config, evaluate_config=message_config,
            evaluate_fn=end_of_round,
        ).arrays)
    states = split_regions(arrays)
    untrained = never_updated(folder, regions)
    if untrained:
        reason = (f"no valid update ever reached {', '.join(untrained)} in {config.federation.num_rounds} rounds "
                  f"(its sites failed or were rejected: {_reasons(folder)})")
        mark_failed(folder, reason)
        log.error("the run failed: %s; %s marks the folder", reason, FAILED)
    save_adapters(folder, base, config, states, publish=not untrained)
    failures = failure_summary(folder)
    if failures["failed_or_rejected"]:
        log.warning("%d of %d site-rounds failed or were rejected: %s", failures["failed_or_rejected"],
                    failures["site_rounds"], _reasons(folder))
    if not config.run.report or untrained:
        return folder
    if scored_by_sites(config, sites):
        report = federated_report(site_grid, config, folder, base, sites, site_groups, states, message_config)
    else:
        report = evaluate_run(folder, config, load_pairs(config.data), base)
    if config.privacy.mode != "none":
        report["privacy"] = privacy_report(config.privacy, site_records(folder), round_summaries(folder))
    report["failures"] = failures
    if poisoned:
        report["poisoned_sites"] = sorted(poisoned)
    publish_report(folder, config, report)
    return folder


def _reasons(folder: Path) -> str:
    reasons = failure_summary(folder)["reasons"]
    return "; ".join(f"{count}x {reason}" for reason, count in list(reasons.items())[:3]) or "no site replied"


def publish_report(folder: Path, config: Config, report: dict) -> None:
    """Write report.json, report.md and report.png; print the tables and a few examples."""
    shown = config.evaluation.examples_to_show
    text = write_report(folder, report, shown)
    write_plot(folder / "report.png", report["variants"], validation_curves(folder))
    print(f"\n{text}\n")
    for name, result in report["variants"].items():
        for ex in result.get("examples", [])[:shown]:
            print(f"[{name}] {ex['site_id']} ({ex['region']}): {ex['prompt']!r}\n  -> {ex['completion']}")
    print(f"\nRun folder: {folder}  (report.md, report.png, adapters/, site_adapters/, metrics.jsonl)")


def starting_point(folder: Path, config: Config, base: BaseModel, regions: list[str]) -> tuple[int, dict]:
    """Rounds already done and every region's adapter to start from: fresh, or the latest checkpoint."""
    checkpoint = latest_checkpoint(folder) if config.run.resume else None
    if checkpoint is None:
        initial = get_state(attach_adapter(base, "initial", config.lora, seed=config.run.seed), "initial")
        return 0, merge_regions({region: initial for region in regions})
    done, arrays = checkpoint
    saved = sorted(split_regions(arrays))
    if saved != regions:
        raise RunFolderError(f"{folder}/checkpoints/round-{done} holds regions {saved}, but the nodes serve {regions}")
    log.info("resuming after round %d from %s/checkpoints/round-%d", done, folder, done)
    return done, arrays


def _log_round(server_round: int, num_rounds: int, first: int, elapsed: float, regions: list[str],
               metrics: dict) -> None:
    """One progress line a round: rounds done, elapsed, ETA, and each group's train and validation loss."""
    train, evaluate = metrics.get("train", {}), metrics.get("evaluate", {})
    parts = []
    for region in regions:
        part = f"{region}: train {train.get(f'{region}/train_loss', float('nan')):.3f}"
        if f"{region}/personal_loss" in train:
            part += f", site adapters {train[f'{region}/personal_loss']:.3f}"
        if f"{region}/eval_loss" in evaluate:
            part += f", valid {evaluate[f'{region}/eval_loss']:.3f}"
        parts.append(part)
    done = server_round - first + 1
    eta = elapsed / done * (num_rounds - server_round)
    progress = f"[round {server_round}/{num_rounds} | {duration(elapsed)} elapsed, ETA {duration(eta)}]"
    print(progress, " | ".join(parts), flush=True)



def _setup_logging() -> None:
    if not log.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        for name in ("fed_netgpt", "strategies"):
            logging.getLogger(name).addHandler(handler)
            logging.getLogger(name).setLevel(logging.INFO)
