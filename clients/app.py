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
from dataclasses import replace
from pathlib import Path

import torch
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.clientapp.mod import fixedclipping_mod

from fed_netgpt.adapters import adapter_name_for, attach_adapter, save_adapter, set_state
from fed_netgpt.config import Config, TrainConfig, from_yaml
from fed_netgpt.data.facts import facts_by_site
from fed_netgpt.data.sites import SiteData, load_sites
from fed_netgpt.evaluation import completion_loss, evaluate_site, site_sample
from fed_netgpt.faults import InjectedCrash, crashes, is_slow, poison_update, poisoned_sites
from fed_netgpt.models import BaseModel, load_base
from fed_netgpt.personalization import this_runs_adapter, train_personal_adapter, train_personal_adapters_grouped
from fed_netgpt.privacy import BudgetSpent, SiteAccountant, longer, train_grouped_private
from fed_netgpt.runs import site_adapter_dir
from fed_netgpt.training import train_adapter, train_grouped
from strategies.client_dp import CLIPPING_NORM, UNIT_WEIGHT
from strategies.records import (
    CONFIG_KEY,
    DP_HISTORIES_KEY,
    FINAL_REPORT_KEY,
    PACK_KEY,
    RUN_ID_KEY,
    SITE_ERROR_KEY,
    SITE_KEY,
    from_record,
    tallies_to_metrics,
    to_record,
)

ADAPTER = "local"
PRIVACY_STATE = "privacy"  # "privacy/<site>": a site's DP accountant history, in the node's state across rounds
app = ClientApp()


def message_config(msg: Message, record: str = "config") -> Config:
    config = from_yaml(str(msg.content[record][CONFIG_KEY]))
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
    return serving_site(config, context, msg.content["config"].get(SITE_KEY))


def serving_site(config: Config, context: Context, named: object) -> SiteData:
    sites = node_sites(config, context)
    if named is None and len(sites) == 1:
        return sites[0]
    matches = [s for s in sites if s.site_id == named]
    if not matches:
        raise ValueError(f"the message is for site {named!r}; this node serves {[s.site_id for s in sites]}")
    return matches[0]


def inject_faults(config: Config, server_round: int, site_id: str) -> None:
    """`faults.crash_probability`: this site's training fails this round (the server sees an error reply);
    `faults.slow_probability`: it stalls first (past `federation.timeout`, the server goes on without it)."""
    faults = config.faults
    if is_slow(faults.slow_probability, config.run.seed, server_round, site_id):
        print(f"[round {server_round}] site {site_id}: stalls {faults.slow_seconds:g}s (faults.slow_probability)",
              flush=True)
        time.sleep(faults.slow_seconds)
    if crashes(faults.crash_probability, config.run.seed, server_round, site_id):
        # the site and round are in its metrics.jsonl line: the failure summary counts one reason, not one a site
        raise InjectedCrash(f"injected crash (faults.crash_probability={faults.crash_probability})")


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


def prepared_model(msg: Message, config: Config) -> tuple[BaseModel, torch.nn.Module]:
    base = load_base(config.model.name, config.model.cache_dir, config.train.device)
    model = attach_adapter(base, ADAPTER, config.lora, seed=config.run.seed)
    set_state(model, ADAPTER, from_record(msg.content["arrays"]))
    return base, model


def owns_data(context: Context) -> bool:
    """A deployed node (or one given its own `data-path`) keeps data the server does not have."""
    return "partition-id" not in context.node_config or "data-path" in context.node_config


def personalized(config: Config) -> bool:
    return config.personalization.method == "ditto" and config.federation.adapters != "local"


def site_accountant(config: Config, context: Context, site_id: str, sent: ConfigRecord) -> SiteAccountant | None:
    """Under `privacy.mode=sample_dp`, this site's accountant: its history is kept in the node's state across
    rounds, and after a restart continues from the server's record if that one is further. Its noise is planned
    over every private step of the run (federated and personal adapter)."""
    if config.privacy.mode != "sample_dp":
        return None
    steps = config.train.local_steps + (config.personalization.steps if personalized(config) else 0)
    saved = context.state.config_records.get(f"{PRIVACY_STATE}/{site_id}")
    kept = json.loads(str(saved["history"])) if saved else []
    recorded = json.loads(str(sent.get(DP_HISTORIES_KEY, "{}"))).get(site_id, [])
    return SiteAccountant(config.privacy, config.federation.num_rounds * steps, longer(kept, recorded))


@app.query()
def query(msg: Message, context: Context) -> Message:
    """Which sites this node serves, and the facts their rows state (levels are derived on the server)."""
    described = []
    for site in node_sites(message_config(msg), context):
        (_, facts), = facts_by_site(site.train + site.valid + site.test).values()
        described.append({"site-id": site.site_id, "region": site.region, "num-train": len(site.train),
                          "num-test": len(site.test), "facts": sorted(facts), "owns-data": owns_data(context)})
    return Message(RecordDict({"sites": ConfigRecord({"json": json.dumps(described)})}), reply_to=msg)


def clip_for_client_dp(msg: Message, context: Context, call_next):  # type: ignore[no-untyped-def]
    """Flower's `fixedclipping_mod` (the site's update clipped before it leaves) on the train messages of a
    client_dp run, which carry the clipping norm; the other runs' messages pass untouched."""
    if "config" in msg.content and CLIPPING_NORM in msg.content["config"]:
        return fixedclipping_mod(msg, context, call_next)
    return call_next(msg, context)


@app.train(mods=[clip_for_client_dp])
def train(msg: Message, context: Context) -> Message:
    if PACK_KEY in msg.content:
        return train_together(msg, context)
    config = message_config(msg)
    site = message_site(config, context, msg)
    sent = msg.content["config"]
    server_round = int(sent.get("server-round", 0))
    inject_faults(config, server_round, site.site_id)
    base, model = prepared_model(msg, config)
    train_config = replace(config.train, proximal_mu=float(sent.get("proximal-mu", config.train.proximal_mu)))
    ffa = config.federation.lora_aggregation == "ffa"
    accountant = site_accountant(config, context, site.site_id, sent)
    train = accountant.train if accountant else train_adapter
    try:
        result = train(model, ADAPTER, base.tokenizer, site.train, train_config, seed=server_round,
                       freeze_lora_a=ffa)
        metrics = {**result.metrics, "num-examples": result.num_examples}
        line = f"loss {result.metrics['train_loss']:.3f} -> {result.metrics['train_loss_last']:.3f}"
        if personalized(config):
            personal = train_personal_adapter(base, config, site.train, from_record(msg.content["arrays"]),
                                              personal_folder(config, context, site.site_id),
                                              str(sent[RUN_ID_KEY]), seed=server_round, train=train)
            metrics["personal_loss"] = personal.metrics["train_loss"]
            line += f", personal {personal.metrics['train_loss']:.3f} -> {personal.metrics['train_loss_last']:.3f}"
    finally:  # every private step taken is kept, even when a later one was refused
        if accountant:
            context.state[f"{PRIVACY_STATE}/{site.site_id}"] = ConfigRecord({"history": json.dumps(accountant.history)})
    if config.privacy.mode == "client_dp":
        metrics[UNIT_WEIGHT] = 1.0
    if accountant:
        metrics.update(accountant.spent())
        line += f", epsilon {metrics['epsilon']:.2f} after {int(metrics['dp_steps'])} DP steps"
    print(f"[round {server_round}] site {site.site_id} ({site.region}): {line}, "
          f"{result.metrics['train_seconds']:.1f}s on {torch.get_num_threads()} threads", flush=True)
    state = {key: result.state[key] for key in msg.content["arrays"]}  # in the order received (fixedclipping_mod)
    state = poison_if_compromised(config, site, server_round, state, from_record(msg.content["arrays"]))
    reply = to_record(state, config.federation.wire_dtype)
    return Message(RecordDict({"arrays": reply, "metrics": MetricRecord(metrics)}), reply_to=msg)


def train_together(msg: Message, context: Context) -> Message:
    """Several sites of this node (a packed message, `train.sites_per_pass` > 1) trained in one grouped pass:
    one forward/backward a step for all of them, each row with its own site's adapter; each site's reply is what
    it would send alone (`training.train_grouped` equals the per-site loop), under "<site>/". Under sample_dp a
    site whose round would pass its budget replies with an error under "<site>/" and the others train."""
    packed = [str(name) for name in msg.content[PACK_KEY]["sites"]]  # type: ignore[union-attr]
    config = message_config(msg, f"{packed[0]}/config")
    sent = msg.content[f"{packed[0]}/config"]
    server_round = int(sent.get("server-round", 0))
    names = [name for name in packed if not crashes(config.faults.crash_probability, config.run.seed, server_round,
                                                         name)]  # a crashed site is missing from the reply
    if not names:
        raise InjectedCrash(f"injected crash of every packed site ({', '.join(packed)}) in round {server_round}")
    train_config = replace(config.train, proximal_mu=float(sent.get("proximal-mu", config.train.proximal_mu)))
    content = RecordDict()
    sites = [serving_site(config, context, name) for name in names]
    accountants = {name: site_accountant(config, context, name, sent) for name in names}
    refused = refused_sites(config, sites, accountants, train_config)
    for name, reason in refused.items():
        print(f"[round {server_round}] site {name}: {reason}", flush=True)
        content[f"{name}/{SITE_ERROR_KEY}"] = ConfigRecord({"reason": reason})
    sites = [site for site in sites if site.site_id not in refused]
    if not sites:
        return Message(content, reply_to=msg)
    names = [site.site_id for site in sites]
    private = [accountants[name] for name in names] if config.privacy.mode == "sample_dp" else None
    pack = msg.content[PACK_KEY]
    arrays_of = dict(zip(packed, pack["arrays_of"] if "arrays_of" in pack else packed))  # a shared adapter: once
    received = {key: from_record(msg.content[f"{key}/arrays"]) for key in {arrays_of[name] for name in names}}
    starts = [received[arrays_of[name]] for name in names]  # a shared adapter is one state: loaded once
    base = load_base(config.model.name, config.model.cache_dir, config.train.device)
    pairs, ffa = [site.train for site in sites], config.federation.lora_aggregation == "ffa"
    try:
        results = (train_grouped_private(base.model, base.tokenizer, pairs, starts, config.lora, train_config,
                                         private, freeze_lora_a=ffa) if private else
                   train_grouped(base.model, base.tokenizer, pairs, starts, config.lora, train_config,
                                 [server_round] * len(sites), freeze_lora_a=ffa))
        personal = train_personal_adapters_grouped(
            base, config, pairs, starts, [personal_folder(config, context, site.site_id) for site in sites],
            str(sent[RUN_ID_KEY]), server_round, accountants=private,
        ) if personalized(config) else []
    finally:  # every private step taken is kept
        for accountant, name in zip(private or [], names):
            context.state[f"{PRIVACY_STATE}/{name}"] = ConfigRecord({"history": json.dumps(accountant.history)})
    for k, (site, start, result) in enumerate(zip(sites, starts, results)):
        metrics = {**result.metrics, "num-examples": result.num_examples}
        line = f"loss {metrics['train_loss']:.3f} -> {metrics['train_loss_last']:.3f}"
        if personal:
            metrics["personal_loss"] = personal[k].metrics["train_loss"]
        if private:
            metrics.update(private[k].spent())
            line += f", epsilon {metrics['epsilon']:.2f} after {int(metrics['dp_steps'])} DP steps"
        state = poison_if_compromised(config, site, server_round, {key: result.state[key] for key in start}, start)
        content[f"{site.site_id}/arrays"] = to_record(state, config.federation.wire_dtype)
        content[f"{site.site_id}/metrics"] = MetricRecord(metrics)
        print(f"[round {server_round}] site {site.site_id} ({site.region}): {line}, trained with {len(sites) - 1} "
              "more site(s) in one pass", flush=True)
    return Message(content, reply_to=msg)


def refused_sites(config: Config, sites: list[SiteData], accountants: dict[str, SiteAccountant | None],
                  train: TrainConfig) -> dict[str, str]:
    """The sites whose round (federated and personal steps) would pass their DP budget, with the reason."""
    round_steps = replace(train, local_steps=train.local_steps + (
        config.personalization.steps if personalized(config) else 0))
    refused = {}
    for site in sites:
        accountant = accountants[site.site_id]
        try:
            if accountant is not None:
                accountant.plan(len(site.train), round_steps)
        except BudgetSpent as err:
            refused[site.site_id] = str(err)
    return refused


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Per-round validation loss of the received adapter on the site's validation split (never the test split);
    after the last round, the site's part of the final report."""
    config = message_config(msg)
    site = message_site(config, context, msg)
    if FINAL_REPORT_KEY in msg.content["config"]:
        return final_report(msg, config, context, site)
    if not site.valid:  # nothing kept for validation here: zero examples leave this site out of the mean
        return Message(RecordDict({"metrics": MetricRecord({"num-examples": 0})}), reply_to=msg)
    base, model = prepared_model(msg, config)
    loss = completion_loss(model, base.tokenizer, site.valid, config.evaluation.batch_size, config.train.max_length)
    metrics = MetricRecord({"eval_loss": loss, "num-examples": len(site.valid)})
    return Message(RecordDict({"metrics": metrics}), reply_to=msg)


def final_report(msg: Message, config: Config, context: Context, site: SiteData) -> Message:
    """Score this site's own test rows with every variant the server asks for: base, the final federated adapter
    (sent in the message) and the site's personal adapter (kept here; the federated one if it has none). Only the
    tallies leave the site, its examples too where the node shares them."""
    sent = msg.content["config"]
    limit = int(sent["max-examples"]) if "max-examples" in sent else None  # type: ignore[arg-type]
    rows = site_sample(site.test, limit, int(sent["sample-offset"]))  # type: ignore[arg-type]
    levels = json.loads(str(sent["fact-levels"]))
    vocabulary = set(json.loads(str(sent["fact-vocabulary"])))
    base, model = prepared_model(msg, config)
    with tempfile.TemporaryDirectory() as tmp:
        federated = save_adapter(model, ADAPTER, Path(tmp) / "federated")
        personal = this_runs_adapter(personal_folder(config, context, site.site_id), str(sent[RUN_ID_KEY]))
        served = {"base": None, "personalized": personal or federated}
        adapters = {v: served.get(v, federated) for v in sent["variants"]}  # type: ignore[union-attr]
        results = evaluate_site(base, config, rows, adapters, levels, vocabulary)
        model.delete_adapter(adapter_name_for(federated))  # a temporary folder: its adapter goes with it
    content = RecordDict({"metrics": MetricRecord(tallies_to_metrics(
        {variant: {k: v for k, v in counts.items() if k != "region"} for variant, (counts, _) in results.items()}))})
    share = str(context.node_config.get("share-examples", "partition-id" in context.node_config)).lower() == "true"
    if share:
        content["examples"] = ConfigRecord({"json": json.dumps({v: ex for v, (_, ex) in results.items()})})
    print(f"[report] site {site.site_id} ({site.region}): {len(rows)} test rows scored, examples "
          f"{'shared' if share else 'kept at the site'}", flush=True)
    return Message(content, reply_to=msg)
