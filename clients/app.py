"""The edge site's ClientApp: tell the server who it is, train the received adapter, evaluate it.

The server sends the resolved config (YAML) in every message, so simulation and deployment behave the
same. A node serves the sites named by `site-ids` or `site-id` in node_config (deployment), or a share of the
training sites by `partition-id` (simulation); each message names the site it is for (server/site_grid.py);
`data-path` in node_config points a deployed node at its own JSONL, `adapter-dir` at the folder where it keeps
its personal adapter (default: the run folder's site_adapters/). For the final report a site scores its own test
rows and sends back only the counts; `share-examples=true` in node_config lets its generated examples go too
(a simulated site shares them: its rows are the server's already).
"""

from __future__ import annotations

import json
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from flwr.app import ConfigRecord, Context, Message
from flwr.clientapp import ClientApp
from flwr.clientapp.mod import fixedclipping_mod
from peft import PeftModel

from fed_netgpt.config import Config, TrainConfig, from_yaml
from fed_netgpt.data.facts import facts_by_site
from fed_netgpt.data.sites import SiteData, load_sites
from fed_netgpt.evaluation.scoring import completion_loss, evaluate_site, site_sample
from fed_netgpt.model.adapters import AdapterState, adapter_name_for, attach_adapter, save_adapter, set_state
from fed_netgpt.model.base import BaseModel, load_base
from fed_netgpt.protocol import (
    ARRAYS,
    CLIPPING_NORM,
    CONFIG,
    NUM_EXAMPLES,
    SITE_KEY,
    UNIT_WEIGHT,
    ReportReply,
    ReportRequest,
    RunContext,
    SiteDescription,
    SiteTrainReply,
    TrainRequest,
    discovery_reply,
    evaluate_reply,
    from_record,
    train_reply,
)
from fed_netgpt.run.faults import InjectedCrash, crashes, is_slow, poison_update, poisoned_sites
from fed_netgpt.run.folder import site_adapter_dir
from fed_netgpt.training.engine import SiteJob, train_sites
from fed_netgpt.training.personalization import this_runs_adapter, train_personal_adapters
from fed_netgpt.training.privacy import BudgetSpent, SiteAccountant, longer

RECEIVED = "received"  # the peft adapter that holds the adapter a message brings (evaluation, the report)
PRIVACY_STATE = "privacy"  # "privacy/<site>": a site's DP accountant history, in the node's state across rounds
app = ClientApp()


def message_config(record: ConfigRecord) -> Config:
    """The run's config, as every message's config record carries it (`protocol.RunContext`)."""
    config = from_yaml(RunContext.from_record(record).config_yaml)
    if config.simulation.torch_threads > 0:
        torch.set_num_threads(config.simulation.torch_threads)
    return config


NODE_KEYS = ("site-id", "site-ids", "region", "data-path", "adapter-dir", "share-examples",
             "partition-id", "num-partitions")  # the last two: set by Flower's simulation


def node_sites(config: Config, context: Context) -> list[SiteData]:
    """The sites this node serves: node_config `site-ids` (several, comma-separated) or `site-id` (one), in
    `region` when that is given (a check against the data); in simulation, node `partition-id` of
    `num-partitions` serves every num-partitions-th training site from that one (sorted order), so any number of
    nodes covers every site."""
    node = context.node_config
    check_node_config(node)
    data = config.data
    if "data-path" in node:
        data = replace(data, path=str(node["data-path"]))
    sites = load_sites(data)
    if "partition-id" in node and "site-id" not in node and "site-ids" not in node:
        partitions = int(node.get("num-partitions", len(sites)))
        return sites[int(node["partition-id"]) :: max(1, partitions)]
    key = "site-ids" if "site-ids" in node else "site-id"
    wanted = [part.strip() for part in str(node[key]).split(",") if part.strip()]
    by_id = {s.site_id: s for s in sites}
    unknown = [site_id for site_id in wanted if site_id not in by_id]
    if unknown or not wanted:
        raise ValueError(f"node_config {key}={node[key]!r}: {', '.join(map(repr, unknown)) or 'no site'} "
                         "is not a training site of the data")
    elsewhere = [s for s in (by_id[site_id] for site_id in wanted) if "region" in node and s.region != node["region"]]
    if elsewhere:
        raise ValueError(f"node_config region={node['region']!r}: site {elsewhere[0].site_id!r} is in region "
                         f"{elsewhere[0].region!r} in the data")
    return [by_id[site_id] for site_id in wanted]


def check_node_config(node: dict) -> None:
    """A SuperNode's --node-config names its sites with known keys (a typo would silently serve nothing)."""
    unknown = sorted(set(node) - set(NODE_KEYS))
    if unknown:
        raise ValueError(f"node_config key {unknown[0]!r} is unknown; expected some of {', '.join(NODE_KEYS[:6])}")
    if not {"site-id", "site-ids", "partition-id"} & set(node):
        raise ValueError("node_config names no site: give site-id='...' (or site-ids='a,b'), e.g. "
                         "--node-config \"site-id='lyon' region='france'\"")


def message_site(config: Config, context: Context, msg: Message) -> SiteData:
    """The site a message is for: the one it names (`site-id`), which must be this node's; a node serving one
    site may be sent messages that name none."""
    return serving_site(config, context, msg.content.config_records[CONFIG].get(SITE_KEY))


def serving_site(config: Config, context: Context, named: object) -> SiteData:
    sites = node_sites(config, context)
    if named is None and len(sites) == 1:
        return sites[0]
    matches = [s for s in sites if s.site_id == named]
    if not matches:
        raise ValueError(f"the message is for site {named!r}; this node serves {[s.site_id for s in sites]}")
    return matches[0]


def stalls(config: Config, server_round: int, site_ids: list[str]) -> None:
    """`faults.slow_probability`: a site stalls before training (past `federation.timeout`, the server goes on
    without it); a pack waits for its slowest site."""
    faults = config.faults
    slow = [site for site in site_ids if is_slow(faults.slow_probability, config.run.seed, server_round, site)]
    if slow:
        print(f"[round {server_round}] site {', '.join(slow)}: stalls {faults.slow_seconds:g}s "
              "(faults.slow_probability)", flush=True)
        time.sleep(faults.slow_seconds)


def poison_if_compromised(config: Config, site: SiteData, server_round: int, state: dict,
                           start: dict) -> dict:
    """`faults.poison_fraction`: a compromised site sends a poisoned update instead of `state` (simulation: the
    node's data names every site of the region, which decides who is compromised)."""
    faults = config.faults
    if faults.poison_fraction <= 0:
        return state
    regions = {s.site_id: s.region for s in load_sites(config.data)}
    if site.site_id not in poisoned_sites(faults.poison_fraction, config.run.seed, regions):
        return state
    print(f"[round {server_round}] site {site.site_id} ({site.region}): sends a poisoned update "
          f"({faults.poison_kind} x{faults.poison_scale:g})", flush=True)
    return poison_update(state, start, faults.poison_kind, faults.poison_scale, config.run.seed, server_round,
                         site.site_id)


def personal_folder(config: Config, context: Context, site_id: str) -> Path:
    """Where this site keeps its own adapter: node_config `adapter-dir`, else the run folder's site_adapters/."""
    root = context.node_config.get("adapter-dir")
    return Path(str(root)) / site_id if root else site_adapter_dir(config.run.output_dir, site_id)


def prepared_model(msg: Message, config: Config) -> tuple[BaseModel, PeftModel]:
    base = load_base(config.model.name, config.model.cache_dir, config.train.device)
    model = attach_adapter(base, RECEIVED, config.lora, seed=config.run.seed)
    set_state(model, RECEIVED, from_record(msg.content.array_records[ARRAYS]))
    return base, model


def owns_data(context: Context) -> bool:
    """A deployed node (or one given its own `data-path`) keeps data the server does not have."""
    return "partition-id" not in context.node_config or "data-path" in context.node_config


def personalized(config: Config) -> bool:
    return config.personalization.method == "ditto" and config.federation.adapters != "local"


@dataclass(frozen=True)
class RoundPlan:
    """What a train message asks of this node's sites this round, worked out once: the federated pass's step plan,
    whether Ditto's personal pass follows, and the private steps the run plans in all (what DP noise is sized for)."""

    server_round: int
    train: TrainConfig
    personalized: bool
    private_steps: TrainConfig  # the round's private steps at a site, federated and personal: its budget check
    planned_dp_steps: int
    run_id: str

    @classmethod
    def of(cls, config: Config, request: TrainRequest) -> RoundPlan:
        personal = personalized(config)
        train = replace(config.train, proximal_mu=request.proximal_mu(config.train.proximal_mu))
        round_steps = train.local_steps + (config.personalization.steps if personal else 0)
        return cls(server_round=request.server_round, train=train, personalized=personal,
                   private_steps=replace(train, local_steps=round_steps),
                   planned_dp_steps=config.federation.num_rounds * round_steps, run_id=request.run.run_id)


def site_accountant(config: Config, context: Context, site_id: str, run: RunContext,
                    plan: RoundPlan) -> SiteAccountant | None:
    """Under `privacy.mode=sample_dp`, this site's accountant: its history is kept in the node's state across
    rounds, and after a restart continues from the server's record if that one is further. Its noise is planned
    over every private step of the run (federated and personal adapter)."""
    if config.privacy.mode != "sample_dp":
        return None
    saved = context.state.config_records.get(f"{PRIVACY_STATE}/{site_id}")
    kept = json.loads(str(saved["history"])) if saved else []
    recorded = (run.dp_histories or {}).get(site_id, [])
    return SiteAccountant(config.privacy, plan.planned_dp_steps, longer(kept, recorded))


@app.query()
def query(msg: Message, context: Context) -> Message:
    """Which sites this node serves, and the facts their rows state (levels are derived on the server)."""
    described = []
    for site in node_sites(message_config(msg.content.config_records[CONFIG]), context):
        (_, facts), = facts_by_site(site.train + site.valid + site.test).values()
        described.append(SiteDescription(site.site_id, site.region, tuple(sorted(facts)), owns_data(context),
                                         len(site.train), len(site.test)))
    return Message(discovery_reply(described), reply_to=msg)


def clip_for_client_dp(msg: Message, context: Context, call_next: Callable[[Message, Context], Message]) -> Message:
    """Flower's `fixedclipping_mod` (the site's update clipped before it leaves) on the train messages of a
    client_dp run, which carry the clipping norm; the other runs' messages pass untouched."""
    if CONFIG in msg.content.config_records and CLIPPING_NORM in msg.content.config_records[CONFIG]:
        return fixedclipping_mod(msg, context, call_next)
    return call_next(msg, context)


@dataclass(frozen=True)
class SiteUpdate:
    """One site's part of a train message: the site and the adapter it starts from (arrays in the order received:
    `fixedclipping_mod` pairs them with the reply's by position)."""

    site: SiteData
    start: AdapterState


@app.train(mods=[clip_for_client_dp])
def train(msg: Message, context: Context) -> Message:
    """Train the sites a message is for (one, or a node's pack under `train.sites_per_pass` > 1) in one grouped pass:
    each site's reply is what it would send alone. A site whose round would pass its DP budget is refused (a pack's
    other sites train); a crashed site is missing from a pack's reply."""
    request = TrainRequest.from_content(msg.content)
    config = message_config(request.config)
    plan = RoundPlan.of(config, request)
    updates = [SiteUpdate(message_site(config, context, msg) if not request.packed else
                          serving_site(config, context, name), start)
               for name, start in zip(request.sites, request.starts)]
    stalls(config, plan.server_round, [u.site.site_id for u in updates])
    survivors = [u for u in updates if not crashes(config.faults.crash_probability, config.run.seed, plan.server_round,
                                                   u.site.site_id)]
    if not survivors:  # the site, or every packed site, crashed: the node's reply is an error (one site's names
        # no site: it is in the site's metrics.jsonl line, and the failure summary counts one reason, not one a site)
        raise InjectedCrash(f"injected crash of every packed site ({', '.join(request.sites)}) in round "
                            f"{plan.server_round}" if request.packed else
                            f"injected crash (faults.crash_probability={config.faults.crash_probability})")
    accountants = {u.site.site_id: site_accountant(config, context, u.site.site_id, request.run, plan)
                   for u in survivors}
    refused = refused_sites(config, survivors, accountants, plan)
    if refused and not request.packed:
        raise BudgetSpent(next(iter(refused.values())))
    replies = [SiteTrainReply(name, error=reason) for name, reason in refused.items()]
    trained = [u for u in survivors if u.site.site_id not in refused]
    if trained:
        replies += train_updates(config, context, plan, trained, accountants)
    return Message(train_reply(replies, request.packed, config.federation.wire_dtype), reply_to=msg)


def train_updates(config: Config, context: Context, plan: RoundPlan, updates: list[SiteUpdate],
                  accountants: dict[str, SiteAccountant | None]) -> list[SiteTrainReply]:
    """The round's training of `updates` (their federated pass, then Ditto's personal pass) as one grouped pass
    each; every site's metrics and the state it sends."""
    base = load_base(config.model.name, config.model.cache_dir, config.train.device)
    jobs = [SiteJob(u.site.site_id, u.site.train, u.start, seed=plan.server_round,
                    accountant=accountants[u.site.site_id]) for u in updates]
    ffa = config.federation.lora_aggregation == "ffa"
    try:
        results = train_sites(base, jobs, config.lora, plan.train, freeze_lora_a=ffa)
        personal = train_personal_adapters(
            base, config, jobs, [personal_folder(config, context, u.site.site_id) for u in updates], plan.run_id,
        ) if plan.personalized else []
    finally:  # every private step taken is kept, even when a later one was refused
        for job in jobs:
            if job.accountant:
                history = json.dumps(job.accountant.history)
                context.state[f"{PRIVACY_STATE}/{job.name}"] = ConfigRecord({"history": history})
    replies = []
    for k, (update, job, result) in enumerate(zip(updates, jobs, results)):
        metrics = {**result.metrics, NUM_EXAMPLES: float(result.num_examples)}
        line = f"loss {metrics['train_loss']:.3f} -> {metrics['train_loss_last']:.3f}"
        if personal:
            own = personal[k].metrics
            metrics["personal_loss"] = own["train_loss"]
            line += f", personal {own['train_loss']:.3f} -> {own['train_loss_last']:.3f}"
        if job.accountant:
            metrics.update(job.accountant.spent())
            line += f", epsilon {metrics['epsilon']:.2f} after {int(metrics['dp_steps'])} DP steps"
        if config.privacy.mode == "client_dp":
            metrics[UNIT_WEIGHT] = 1.0
        together = f", with {len(updates) - 1} more site(s) in one pass" if len(updates) > 1 else ""
        print(f"[round {plan.server_round}] site {update.site.site_id} ({update.site.region}): {line}, "
              f"{result.metrics['train_seconds']:.1f}s on {torch.get_num_threads()} threads{together}", flush=True)
        state = {key: result.state[key] for key in update.start}  # in the order received (fixedclipping_mod)
        state = poison_if_compromised(config, update.site, plan.server_round, state, update.start)
        replies.append(SiteTrainReply(update.site.site_id, state, metrics))
    return replies


def refused_sites(config: Config, updates: list[SiteUpdate], accountants: dict[str, SiteAccountant | None],
                  plan: RoundPlan) -> dict[str, str]:
    """The sites whose round (federated and personal steps) would pass their DP budget, with the reason."""
    refused = {}
    for update in updates:
        accountant = accountants[update.site.site_id]
        try:
            if accountant is not None:
                accountant.plan(len(update.site.train), plan.private_steps)
        except BudgetSpent as err:
            refused[update.site.site_id] = str(err)
            print(f"[round {plan.server_round}] site {update.site.site_id}: {err}", flush=True)
    return refused


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Per-round validation loss of the received adapter on the site's validation split (never the test split);
    after the last round, the site's part of the final report."""
    sent = msg.content.config_records[CONFIG]
    config = message_config(sent)
    site = message_site(config, context, msg)
    request = ReportRequest.from_record(sent)
    if request is not None:
        return final_report(msg, config, context, site, request)
    if not site.valid:  # nothing kept for validation here: zero examples leave this site out of the mean
        return Message(evaluate_reply(None, 0), reply_to=msg)
    base, model = prepared_model(msg, config)
    loss = completion_loss(model, base.tokenizer, site.valid, config.evaluation.batch_size, config.train.max_length)
    return Message(evaluate_reply(loss, len(site.valid)), reply_to=msg)


def final_report(msg: Message, config: Config, context: Context, site: SiteData, request: ReportRequest) -> Message:
    """Score this site's own test rows with every variant the server asks for: base, the final federated adapter
    (sent in the message) and the site's personal adapter (kept here; the federated one if it has none). Only the
    tallies leave the site, its examples too where the node shares them."""
    rows = site_sample(site.test, request.max_examples, request.sample_offset)
    base, model = prepared_model(msg, config)
    run_id = RunContext.from_record(msg.content.config_records[CONFIG]).run_id
    with tempfile.TemporaryDirectory() as tmp:
        federated = save_adapter(model, RECEIVED, Path(tmp) / "federated")
        personal = this_runs_adapter(personal_folder(config, context, site.site_id), run_id)
        served = {"base": None, "personalized": personal or federated}
        adapters = {v: served.get(v, federated) for v in request.variants}
        results = evaluate_site(base, config, rows, adapters, request.fact_levels, set(request.fact_vocabulary))
        model.delete_adapter(adapter_name_for(federated))  # a temporary folder: its adapter goes with it
    share = str(context.node_config.get("share-examples", "partition-id" in context.node_config)).lower() == "true"
    reply = ReportReply({variant: {k: v for k, v in counts.items() if k != "region"}
                         for variant, (counts, _) in results.items()},
                        {v: ex for v, (_, ex) in results.items()} if share else None)
    print(f"[report] site {site.site_id} ({site.region}): {len(rows)} test rows scored, examples "
          f"{'shared' if share else 'kept at the site'}", flush=True)
    return Message(reply.to_content(), reply_to=msg)
