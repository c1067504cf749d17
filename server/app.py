"""The ServerApp: learn each node's site and region, run the group strategy, write the run folder."""

from __future__ import annotations

import gc
import logging
import random
import time
from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fed_netgpt.config import Config, load_config, overrides_from_run_config, to_yaml
from fed_netgpt.data.sites import load_pairs, load_sites
from fed_netgpt.evaluation.plots import validation_curves, write_plot
from fed_netgpt.evaluation.report import duration, write_report
from fed_netgpt.evaluation.scoring import evaluate_run
from fed_netgpt.model.adapters import AdapterState, attach_adapter, describe_mismatch, get_state
from fed_netgpt.model.base import BaseModel, load_base
from fed_netgpt.protocol import RunContext, from_record, to_record
from fed_netgpt.run.faults import poisoned_sites
from fed_netgpt.run.folder import (
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
from fed_netgpt.run.simulation import LAUNCHER, RESOLVED_CONFIG, end_with
from fed_netgpt.training.privacy import privacy_report, recorded_histories
from server.federated_report import federated_report, scored_by_sites
from server.site_grid import DiscoveryError, SiteGrid, discover_sites
from strategies.aggregation import merge_groups, split_groups
from strategies.groups import GroupStrategy, RoundOutcome
from strategies.registry import make_strategy

log = logging.getLogger("fed_netgpt.server")
app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """`flwr run .`: the config comes from conf/ plus the keys changed with --run-config; the run folder is locked
    as `fed-netgpt simulate` locks it."""
    config = load_config(overrides=overrides_from_run_config(context.run_config))
    with run_lock(config.run.output_dir):
        run_federation(grid, config)


simulation_app = ServerApp()


@simulation_app.main()
def simulation_main(grid: Grid, context: Context) -> None:
    """`fed-netgpt simulate`: the config is the resolved file the command wrote (run_config `resolved-config`);
    the command holds the run folder's lock, and the run ends when the command does."""
    end_with(str(context.run_config[LAUNCHER]))
    config = load_config(str(context.run_config[RESOLVED_CONFIG]))
    _flower_logs_to(Path(config.run.output_dir) / "flower.log")
    try:
        run_federation(grid, config)
    finally:
        gc.freeze()  # the process ends after Flower's teardown: its exit skips collecting torch's objects (~1 s)


def run_federation(grid: Grid, config: Config) -> Path:
    """One federated run on `grid` with `config`; returns its run folder."""
    _keep_flowers_threads_off_the_sampling_generator()
    return Federation(grid, config).run()


def _keep_flowers_threads_off_the_sampling_generator() -> None:
    """Flower's strategies sample sites with Python's global `random`, which the federation seeds (and its
    checkpoints carry) so that a run, and a resumed run, sample the same sites. Under `flwr run` the ServerApp's
    process also runs Flower's heartbeat and retry threads, which draw jitter from that same generator at times
    of their own: the sampled sites then depend on timing. Process-wide on purpose, and only this: those modules
    get generators of their own."""
    import importlib

    for name in ("flwr.supercore.heartbeat", "flwr.supercore.retry.retry_invoker",
                 "flwr.supercore.inflatable.inflatable_utils"):
        module = importlib.import_module(name)
        if getattr(module, "random", None) is random:
            module.random = random.Random()  # type: ignore[attr-defined]  # a Random has the module's functions


class Federation:
    """A federated run on the server, phase by phase: `discover` the sites the nodes serve, `start` (or resume
    from the last checkpoint), run the rounds, each closed by `end_of_round` with what the strategy hands over,
    and `finish` (the adapters, a failure marked, the report)."""

    def __init__(self, grid: Grid, config: Config) -> None:
        _setup_logging()
        self.grid, self.config = grid, config
        self.folder, self.run_id = start_run(config)
        log.info("run folder: %s (its config.yaml holds the resolved config)", self.folder)
        self.private = config.privacy.mode == "sample_dp"  # sites are told what they spent (a resumed run's too)
        self.message_config = self._run_context().to_record()
        self.started = time.perf_counter()

    def run(self) -> Path:
        if self.discover():
            self.start()
            self.finish(self.rounds())
        return self.folder

    def _run_context(self) -> RunContext:
        histories = recorded_histories(site_records(self.folder)) if self.private else None
        return RunContext(to_yaml(self.config), self.run_id, histories)

    def discover(self) -> bool:
        """Which node serves which site; False (the folder marked failed, one line logged) when none serves one."""
        try:
            self.sites, routes = discover_sites(self.grid, len(load_sites(self.config.data)), self.config.federation,
                                                self.message_config)
        except DiscoveryError as err:
            self._fail(str(err))
            return False
        self.site_grid = SiteGrid(self.grid, routes, self.config.train.sites_per_pass)  # from here on: sites
        self.site_groups = {number: aggregation_group(self.config, s.site_id, s.region)
                            for number, s in self.sites.items()}
        self.groups = sorted(set(self.site_groups.values()))
        self.poisoned = poisoned_sites(self.config.faults.poison_fraction, self.config.run.seed,
                                       {s.site_id: s.region for s in self.sites.values()})
        if self.poisoned:
            faults = self.config.faults
            log.warning("faults.poison_fraction=%g: %s send %s-poisoned updates every round (federation.robust=%s)",
                        faults.poison_fraction, ", ".join(sorted(self.poisoned)), faults.poison_kind,
                        self.config.federation.robust)
        return True

    def start(self) -> None:
        """Each group's starting adapter and the strategy: fresh, or continued from the latest checkpoint (the
        server optimizer and the site sampling too)."""
        config = self.config
        self.base = load_base(config.model.name, config.model.cache_dir, config.train.device)
        self.done, self.arrays = starting_point(self.folder, config, self.base, self.groups)
        done = self.done
        self.strategy = GroupStrategy(lambda num_sites: make_strategy(config, num_sites, done), self.site_groups,
                                      config.federation.lora_aggregation, config.lora.r,
                                      config.federation.wire_dtype, rounds_done=done,
                                      min_replies=config.federation.min_replies,
                                      max_update_norm=config.federation.max_update_norm)
        random.seed(config.run.seed)  # Flower's strategies sample sites with Python's random: a run is reproducible
        if done:
            self.strategy.restore_optimizer_states(checkpoint_optimizer(self.folder, done))
            sampling = checkpoint_sampling(self.folder, done)
            if sampling is not None:
                random.setstate(sampling)

    def rounds(self) -> dict[str, AdapterState]:
        """The rounds still to run, on Flower's own round loop; each group's adapter after the last."""
        num_rounds = self.config.federation.num_rounds
        if self.done < num_rounds:
            result = self.strategy.start(
                grid=self.site_grid,  # type: ignore[arg-type]  # a Grid proxy, duck-typed (server/site_grid.py)
                initial_arrays=to_record(self.arrays), num_rounds=num_rounds - self.done,
                timeout=self.config.federation.timeout, train_config=self.message_config,
                evaluate_config=self.message_config, evaluate_fn=self.strategy.round_end(self.end_of_round))
            self.arrays = from_record(result.arrays)
        return split_groups(self.arrays)

    def end_of_round(self, outcome: RoundOutcome) -> None:
        """Checkpoint the round, then append its summary and each site's record to metrics.jsonl (a crash between
        loses nothing: the checkpoint keeps them too), and say how it went."""
        server_round = outcome.server_round
        elapsed = time.perf_counter() - self.started
        rows = [{"round": server_round, "seconds": round(elapsed, 1), **outcome.summary,
                 **self.site_grid.take_train_downlink()}]
        for number, record in outcome.sites.items():
            site = self.sites[number]
            rows.append({"round": server_round, "site_id": site.site_id, "region": site.region, **record,
                         **({"poisoned": True} if site.site_id in self.poisoned else {})})
        save_checkpoint(self.folder, server_round, from_record(outcome.arrays), self.strategy.optimizer_states(),
                        rows, random.getstate())
        append_metrics(self.folder, rows)
        _log_round(server_round, self.config.federation.num_rounds, self.done + 1, elapsed, self.groups,
                   outcome.summary)
        if self.private:  # the next round's messages: a node's own record may lag (two of its sites trained at
            # once in a simulation both rewrote its state), the server's does not
            self.message_config.update(self._run_context().to_record())

    def finish(self, states: dict[str, AdapterState]) -> None:
        """Write the groups' adapters (published unless a group never got a valid update: then the run failed),
        and the report."""
        config, folder = self.config, self.folder
        untrained = never_updated(folder, self.groups)
        if untrained:
            self._fail(f"no valid update ever reached {', '.join(untrained)} in {config.federation.num_rounds} "
                       f"rounds (its sites failed or were rejected: {_reasons(folder)})")
        save_adapters(folder, self.base, config, states, publish=not untrained)
        failures = failure_summary(folder)
        if failures["failed_or_rejected"]:
            log.warning("%d of %d site-rounds failed or were rejected: %s", failures["failed_or_rejected"],
                        failures["site_rounds"], _reasons(folder))
        if not config.run.report or untrained:
            return
        if scored_by_sites(config, self.sites):
            report = federated_report(self.site_grid, config, folder, self.base, self.sites, self.site_groups,
                                      states, self.message_config)
        else:
            report = evaluate_run(folder, config, load_pairs(config.data), self.base)
        if config.privacy.mode != "none":
            report["privacy"] = privacy_report(config.privacy, site_records(folder), round_summaries(folder))
        report["failures"] = failures
        if self.poisoned:
            report["poisoned_sites"] = sorted(self.poisoned)
        publish_report(folder, config, report)

    def _fail(self, reason: str) -> None:
        mark_failed(self.folder, reason)
        log.error("the run failed: %s; %s marks the folder", reason, FAILED)


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


def starting_point(folder: Path, config: Config, base: BaseModel, groups: list[str]) -> tuple[int, dict]:
    """Rounds already done and every group's adapter to start from: fresh, or the latest checkpoint, refused
    (naming the first difference) when it does not hold these groups in the shape this config's adapter has:
    a config.yaml edited to another model or rank cannot continue it, and non-finite values would only spread."""
    initial = get_state(attach_adapter(base, "initial", config.lora, seed=config.run.seed), "initial")
    checkpoint = latest_checkpoint(folder) if config.run.resume else None
    if checkpoint is None:
        return 0, merge_groups({group: initial for group in groups})
    done, arrays = checkpoint
    saved = split_groups(arrays)
    where = f"{folder}/checkpoints/round-{done}"
    if sorted(saved) != groups:
        raise RunFolderError(f"{where} holds groups {sorted(saved)}, but the nodes serve {groups}")
    shapes = {key: tuple(value.shape) for key, value in initial.items()}
    for group, state in saved.items():
        mismatch = describe_mismatch(shapes, state)
        if mismatch:
            raise RunFolderError(
                f"{where}: group {group}: {mismatch} (for model.name={config.model.name}, lora.r={config.lora.r}, "
                f"lora.target_modules={list(config.lora.target_modules)}); the run's config.yaml no longer "
                "describes its checkpoints, so the run cannot be resumed")
    log.info("resuming after round %d from %s", done, where)
    return done, arrays


def _log_round(server_round: int, num_rounds: int, first: int, elapsed: float, groups: list[str],
               metrics: dict) -> None:
    """One progress line a round: rounds done, elapsed, ETA, and each group's train and validation loss."""
    train, evaluate = metrics.get("train", {}), metrics.get("evaluate", {})
    parts = []
    for group in groups:
        part = f"{group}: train {train.get(f'{group}/train_loss', float('nan')):.3f}"
        if f"{group}/personal_loss" in train:
            part += f", site adapters {train[f'{group}/personal_loss']:.3f}"
        if f"{group}/eval_loss" in evaluate:
            part += f", valid {evaluate[f'{group}/eval_loss']:.3f}"
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


def _flower_logs_to(path: Path) -> None:
    """Flower's INFO logs (strategy trees, per-round metric dumps) go to the run's flower.log; the console (the
    log stream `fed-netgpt simulate` prints) keeps Flower's warnings and fed-netgpt's own progress lines."""
    flower = logging.getLogger("flwr")
    for handler in flower.handlers:
        handler.setLevel(logging.WARNING)
    flower.propagate = False  # the simulation process's root handler would print every record again
    path.parent.mkdir(parents=True, exist_ok=True)
    file_handler = logging.FileHandler(path)
    file_handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    flower.addHandler(file_handler)
