"""The edge site's ClientApp: tell the server who it is, train the received adapter, evaluate it.

The server sends the resolved config (YAML) in every message, so simulation and deployment behave the
same. A site is picked by `site-id` in node_config (deployment) or by `partition-id` (simulation);
`data-path` in node_config points a deployed node at its own JSONL, `adapter-dir` at the folder where it keeps
its personal adapter (default: the run folder's site_adapters/).
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fed_netgpt.adapters import attach_adapter, set_state
from fed_netgpt.config import Config, from_yaml
from fed_netgpt.data.sites import SiteData, load_sites
from fed_netgpt.evaluation import completion_loss
from fed_netgpt.models import BaseModel, load_base
from fed_netgpt.personalization import train_personal_adapter
from fed_netgpt.runs import site_adapter_dir
from fed_netgpt.training import train_adapter
from strategies.records import CONFIG_KEY, RUN_ID_KEY, from_record, to_record

ADAPTER = "local"
app = ClientApp()


def message_config(msg: Message) -> Config:
    config = from_yaml(str(msg.content["config"][CONFIG_KEY]))
    if config.simulation.torch_threads > 0:
        torch.set_num_threads(config.simulation.torch_threads)
    return config


def local_site(config: Config, context: Context) -> SiteData:
    """This node's site: by `site-id`, else the `partition-id`-th training site in sorted order."""
    node = context.node_config
    data = config.data
    if "data-path" in node:
        data = replace(data, path=str(node["data-path"]))
    sites = load_sites(data)
    if "site-id" in node:
        matches = [s for s in sites if s.site_id == node["site-id"]]
        if not matches:
            raise ValueError(f"node_config site-id={node['site-id']!r} is not a training site of the data")
        return matches[0]
    partition = int(node["partition-id"])
    if partition >= len(sites):
        raise ValueError(f"partition-id {partition} but the data has only {len(sites)} training sites")
    return sites[partition]


def personal_folder(config: Config, context: Context, site_id: str) -> Path:
    """Where this site keeps its own adapter: node_config `adapter-dir`, else the run folder's site_adapters/."""
    root = context.node_config.get("adapter-dir")
    return Path(str(root)) / site_id if root else site_adapter_dir(config.run.output_dir, site_id)


def prepared_model(msg: Message, config: Config) -> tuple[BaseModel, torch.nn.Module]:
    base = load_base(config.model.name, config.model.cache_dir)
    model = attach_adapter(base, ADAPTER, config.lora, seed=config.run.seed)
    set_state(model, ADAPTER, from_record(msg.content["arrays"]))
    return base, model


@app.query()
def query(msg: Message, context: Context) -> Message:
    site = local_site(message_config(msg), context)
    info = ConfigRecord({"site-id": site.site_id, "region": site.region,
                         "num-train": len(site.train), "num-test": len(site.test)})
    return Message(RecordDict({"site": info}), reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    config = message_config(msg)
    site = local_site(config, context)
    base, model = prepared_model(msg, config)
    sent = msg.content["config"]
    train_config = replace(config.train, proximal_mu=float(sent.get("proximal-mu", config.train.proximal_mu)))
    server_round = int(sent.get("server-round", 0))
    ffa = config.federation.lora_aggregation == "ffa"
    result = train_adapter(model, ADAPTER, base.tokenizer, site.train, train_config, seed=server_round,
                           freeze_lora_a=ffa)
    metrics = {**result.metrics, "num-examples": result.num_examples}
    line = f"loss {result.metrics['train_loss']:.3f} -> {result.metrics['train_loss_last']:.3f}"
    if config.personalization.method == "ditto" and config.federation.adapters != "local":
        personal = train_personal_adapter(base, config, site.train, from_record(msg.content["arrays"]),
                                          personal_folder(config, context, site.site_id), str(sent[RUN_ID_KEY]),
                                          seed=server_round)
        metrics["personal_loss"] = personal.metrics["train_loss"]
        line += f", personal {personal.metrics['train_loss']:.3f} -> {personal.metrics['train_loss_last']:.3f}"
    print(f"[round {server_round}] site {site.site_id} ({site.region}): {line}, "
          f"{result.metrics['train_seconds']:.1f}s on {torch.get_num_threads()} threads", flush=True)
    return Message(RecordDict({"arrays": to_record(result.state), "metrics": MetricRecord(metrics)}), reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Per-round validation loss of the received adapter on the site's validation split (never the test split)."""
    config = message_config(msg)
    site = local_site(config, context)
    if not site.valid:  # nothing kept for validation here: zero examples leave this site out of the mean
        return Message(RecordDict({"metrics": MetricRecord({"num-examples": 0})}), reply_to=msg)
    base, model = prepared_model(msg, config)
    loss = completion_loss(model, base.tokenizer, site.valid, config.evaluation.batch_size, config.train.max_length)
    metrics = MetricRecord({"eval_loss": loss, "num-examples": len(site.valid)})
    return Message(RecordDict({"metrics": metrics}), reply_to=msg)
