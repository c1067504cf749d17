"""Every message between the ServerApp and the sites, defined once: what each one carries, typed, and its
conversion to and from Flower's records (`flwr.app`, the wire).

Both apps and the strategies import this module, and no message key is spelled anywhere else. It is, with the
command line, the one place in the library that touches Flower, and only its record types. The messages:

- **Discovery** (query): the server's `RunContext`; each node answers with a `SiteDescription` per site it serves.
- **Train**: a site's start adapter ("arrays") and the `RunContext` plus what Flower's strategies add (the round,
  FedProx's mu, client-level DP's clipping norm); the reply is the trained adapter and its metrics
  (`NUM_EXAMPLES` weighs it). Under `train.sites_per_pass` > 1 several sites of a node travel in one message:
  each site's records under "<site>/", `PACK` naming them and whose arrays each one trains from; a site refused
  in a pack answers with `SITE_ERROR`.
- **Evaluate**: the round's validation loss of the received adapter; after the last round, a `ReportRequest`
  asks a site for its part of the final report, and it answers with a `ReportReply` (tallies, and examples where
  the node shares them).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, ConfigRecordValues, ConfigScalar, MetricRecord, RecordDict

# The records of a message's content.
ARRAYS = "arrays"  # an adapter state (peft keys), or the group strategy's "<group>/<key>" arrays
CONFIG = "config"
METRICS = "metrics"
SITES = "sites"  # discovery's answer
EXAMPLES = "examples"  # a final report's generated examples, where the node shares them
PACK = "pack"  # a train message for several sites of a node: {"sites": [...], "arrays_of": [...]}
SITE_ERROR = "error"  # in a packed reply, "<site>/error": {"reason": ...}: that site did not train, the others did

# Keys of the config record.
CONFIG_KEY = "fed-netgpt-config"  # the resolved config (YAML), in every message
RUN_ID_KEY = "run-id"  # which run a message belongs to: a site adapter of another run is never continued
DP_HISTORIES_KEY = "dp-histories"  # {site: DP accountant history} recorded by the server: a resume continues it
SITE_KEY = "site-id"  # which of its node's sites a message is for (server/site_grid.py)
SERVER_ROUND = "server-round"  # set by Flower's strategies
PROXIMAL_MU = "proximal-mu"  # set by Flower's FedProx
CLIPPING_NORM = "clipping_norm"  # set by Flower's client-side DP wrapper, read by its fixedclipping_mod
FINAL_REPORT_KEY = "final-report"  # an evaluate message that asks a site for its part of the final report

# Keys of the metric records.
NUM_EXAMPLES = "num-examples"  # what a site's reply weighs in its group's mean
UNIT_WEIGHT = "unit-weight"  # 1 in every client_dp reply: equal weights, as the noise assumes


def to_record(state: Mapping[str, np.ndarray], dtype: str = "") -> ArrayRecord:
    """Arrays as they go on the wire: in their own dtype, or cast to `dtype` (`federation.wire_dtype`)."""
    return ArrayRecord({key: Array(np.ascontiguousarray(value, dtype=dtype or None)) for key, value in state.items()})


def from_record(record: ArrayRecord) -> dict[str, np.ndarray]:
    """The arrays of a record; float16 ones (16 bits on the wire) come back as float32 for the arithmetic."""
    arrays = {key: array.numpy() for key, array in record.items()}
    return {key: value.astype(np.float32) if value.dtype == np.float16 else value for key, value in arrays.items()}


def metric_record(metrics: Mapping[str, float]) -> MetricRecord:
    """Scalar metrics as a MetricRecord (Flower types its argument as a dict of every value type it takes)."""
    return MetricRecord(dict(metrics))


def scalar(value: ConfigRecordValues, key: str) -> ConfigScalar:
    """A record's value where one number or string belongs (a config or metric record's `key`)."""
    if isinstance(value, list):
        raise TypeError(f"record key {key!r}: expected a scalar, got a list")
    return value


def strings(value: ConfigRecordValues, key: str) -> list[str]:
    """A record's value where a list of strings belongs (a config record's `key`)."""
    if not isinstance(value, list):
        raise TypeError(f"record key {key!r}: expected a list, got a {type(value).__name__}")
    return [str(item) for item in value]


def _json(record: ConfigRecord, key: str, default: Any) -> Any:
    return json.loads(str(record[key])) if key in record else default


@dataclass(frozen=True)
class RunContext:
    """What the server puts in every message's config record: the resolved config, the run, and (sample_dp) how
    much each site has spent so far."""

    config_yaml: str
    run_id: str
    dp_histories: dict[str, list] | None = None  # None: not a sample_dp run

    def to_record(self) -> ConfigRecord:
        record = ConfigRecord({CONFIG_KEY: self.config_yaml, RUN_ID_KEY: self.run_id})
        if self.dp_histories is not None:
            record[DP_HISTORIES_KEY] = json.dumps(self.dp_histories)
        return record

    @classmethod
    def from_record(cls, record: ConfigRecord) -> RunContext:
        histories = _json(record, DP_HISTORIES_KEY, None)
        return cls(str(record[CONFIG_KEY]), str(record.get(RUN_ID_KEY, "")), histories)


@dataclass(frozen=True)
class SiteDescription:
    """What a node tells the server about a site it serves (discovery)."""

    site_id: str
    region: str
    facts: tuple[str, ...] = ()  # the distinct facts its rows state: the server derives fact levels from them
    owns_data: bool = False  # the node keeps data the server does not have (deployment)
    num_train: int = 0
    num_test: int = 0


def discovery_reply(sites: Sequence[SiteDescription]) -> RecordDict:
    described = [{"site-id": s.site_id, "region": s.region, "num-train": s.num_train, "num-test": s.num_test,
                  "facts": sorted(s.facts), "owns-data": s.owns_data} for s in sites]
    return RecordDict({SITES: ConfigRecord({"json": json.dumps(described)})})


def sites_of_discovery_reply(content: RecordDict) -> list[SiteDescription]:
    return [SiteDescription(site["site-id"], site["region"], tuple(site.get("facts", [])),
                            bool(site.get("owns-data", False)), int(site.get("num-train", 0)),
                            int(site.get("num-test", 0)))
            for site in json.loads(str(content[SITES]["json"]))]


@dataclass(frozen=True)
class TrainRequest:
    """A train message as a node reads it: the sites it is for (the empty name: the one site an unpacked message
    is for), each one's start adapter, and the config record (the run context and Flower's round keys)."""

    sites: tuple[str, ...]
    starts: tuple[dict[str, np.ndarray], ...]  # a start shared by several sites of a pack is one object
    config: ConfigRecord
    packed: bool

    @property
    def run(self) -> RunContext:
        return RunContext.from_record(self.config)

    @property
    def server_round(self) -> int:
        return int(scalar(self.config.get(SERVER_ROUND, 0), SERVER_ROUND))  # Flower sets an int

    def proximal_mu(self, default: float) -> float:
        return float(scalar(self.config.get(PROXIMAL_MU, default), PROXIMAL_MU))  # FedProx sets a float

    @classmethod
    def from_content(cls, content: RecordDict) -> TrainRequest:
        if PACK not in content:
            return cls(("",), (from_record(content.array_records[ARRAYS]),), content.config_records[CONFIG], False)
        pack = content.config_records[PACK]
        names = strings(pack["sites"], "sites")
        owners = strings(pack["arrays_of"], "arrays_of") if "arrays_of" in pack else names
        received = {owner: from_record(content.array_records[f"{owner}/{ARRAYS}"]) for owner in set(owners)}
        return cls(tuple(names), tuple(received[owner] for owner in owners),
                   content.config_records[f"{names[0]}/{CONFIG}"], True)


def pack_train_messages(contents: Sequence[tuple[str, RecordDict]],
                        digest: Callable[[ArrayRecord], str]) -> RecordDict:
    """One train message's content for several sites of a node: each site's records under "<site>/", an adapter
    that several of them start from only once (`digest` tells equal arrays apart; "arrays_of" names, for each
    site, the site whose arrays it trains from)."""
    packed, sites, owners = RecordDict(), [], []
    first_with: dict[str, str] = {}  # the arrays' digest -> the first site sent them
    for site, content in contents:
        sites.append(site)
        for key, record in content.items():
            if key == ARRAYS and isinstance(record, ArrayRecord):
                owner = first_with.setdefault(digest(record), site)
                owners.append(owner)
                if owner != site:
                    continue
            packed[f"{site}/{key}"] = record
    packed[PACK] = ConfigRecord({"sites": sites, "arrays_of": owners})
    return packed


@dataclass
class SiteTrainReply:
    """One site's answer to a train message: its adapter (in the order received) and metrics, or why it did not
    train (a pack's refused site)."""

    site_id: str
    state: Mapping[str, np.ndarray] | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    error: str = ""


def train_reply(replies: Sequence[SiteTrainReply], packed: bool, wire_dtype: str) -> RecordDict:
    """The node's reply content: the one site's records, or each site's under "<site>/" (packed)."""
    content = RecordDict()
    for reply in replies:
        prefix = f"{reply.site_id}/" if packed else ""
        if reply.error:
            content[f"{prefix}{SITE_ERROR}"] = ConfigRecord({"reason": reply.error})
            continue
        assert reply.state is not None  # a site that trained has a state
        content[f"{prefix}{ARRAYS}"] = to_record(reply.state, wire_dtype)
        content[f"{prefix}{METRICS}"] = metric_record(reply.metrics)
    return content


def site_part(content: RecordDict, site: str) -> RecordDict | str | None:
    """A site's records in a packed reply, the reason it gives for not training, or None: nothing for it."""
    records = {key.removeprefix(f"{site}/"): record for key, record in content.items() if key.startswith(f"{site}/")}
    if not records:
        return None
    if SITE_ERROR in records:  # this site was refused (its DP budget), its packmates trained
        return str(records[SITE_ERROR]["reason"])
    return RecordDict(records)


@dataclass(frozen=True)
class ReportRequest:
    """An evaluate message asking a site for its part of the final report: the variants to score, its share of
    its region's test sample (`evaluation.site_shares`), and what only the server knows (fact levels, the
    vocabulary of wrong facts)."""

    variants: tuple[str, ...]
    sample_offset: int
    max_examples: int | None
    fact_levels: dict[str, dict[str, str]]
    fact_vocabulary: tuple[str, ...]

    def to_record(self, run: ConfigRecord) -> ConfigRecord:
        return ConfigRecord({
            **dict(run), FINAL_REPORT_KEY: True, "variants": list(self.variants), "sample-offset": self.sample_offset,
            **({} if self.max_examples is None else {"max-examples": self.max_examples}),
            "fact-levels": json.dumps(self.fact_levels), "fact-vocabulary": json.dumps(sorted(self.fact_vocabulary)),
        })

    @classmethod
    def from_record(cls, record: ConfigRecord) -> ReportRequest | None:
        """The request an evaluate message's config holds; None for a round's plain evaluation."""
        if FINAL_REPORT_KEY not in record:
            return None
        limit = record.get("max-examples")
        return cls(tuple(strings(record["variants"], "variants")),
                   int(scalar(record["sample-offset"], "sample-offset")),
                   None if limit is None else int(scalar(limit, "max-examples")),
                   _json(record, "fact-levels", {}), tuple(_json(record, "fact-vocabulary", [])))


@dataclass(frozen=True)
class ReportReply:
    """A site's part of the final report: additive tallies per variant (numbers only), and its generated examples
    per variant where the node shares them."""

    tallies: dict[str, dict[str, float]]
    examples: dict[str, list[dict[str, Any]]] | None = None

    def to_content(self) -> RecordDict:
        content = RecordDict({METRICS: MetricRecord({f"{variant}/{key}": float(value)
                                                     for variant, counts in self.tallies.items()
                                                     for key, value in counts.items()})})
        if self.examples is not None:
            content[EXAMPLES] = ConfigRecord({"json": json.dumps(self.examples)})
        return content

    @classmethod
    def from_content(cls, content: RecordDict) -> ReportReply:
        tallies: dict[str, dict[str, float]] = {}
        for key, value in content.metric_records[METRICS].items():
            variant, _, name = key.partition("/")
            tallies.setdefault(variant, {})[name] = float(scalar(value, key))
        examples = json.loads(str(content[EXAMPLES]["json"])) if EXAMPLES in content else None
        return cls(tallies, examples)


def evaluate_reply(eval_loss: float | None, num_examples: int) -> RecordDict:
    """A round's evaluation by one site: its validation loss over `num_examples` rows (none: left out of the mean)."""
    metrics: dict[str, float] = {NUM_EXAMPLES: num_examples}
    if eval_loss is not None:
        metrics = {"eval_loss": eval_loss, **metrics}
    return RecordDict({METRICS: metric_record(metrics)})
