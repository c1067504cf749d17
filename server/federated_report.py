"""The final report scored where the data is: each site evaluates its own test rows, the server adds up counts.

In deployment the server does not hold the sites' rows (a node may train on its own `data-path`), so it cannot
generate and score their completions. Instead each site scores its own held-out-intent rows with every variant and
replies with additive tallies (`fed_netgpt.evaluation.metrics.tally`); summed over sites they give exactly the
numbers the pooled rows would (`fed_netgpt.evaluation.scoring.result_from_tallies`). Two things need every site: a
fact's level (region-level when every site of the region states it) and the vocabulary of wrong facts. Each site
reported its distinct facts when it was discovered; the server derives both and sends them back with the final
adapters. Held-out sites are no node, so the server scores them itself when it has their rows (the built-in data).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from flwr.app import ConfigRecord, Message, MessageType, RecordDict

from fed_netgpt.config import Config
from fed_netgpt.data.facts import facts_by_site, levels_from_sites
from fed_netgpt.data.schema import DataError, PromptPair
from fed_netgpt.data.sites import load_heldout_sites
from fed_netgpt.evaluation.scoring import GROUPS, evaluate_run, result_from_tallies, run_variants, site_shares
from fed_netgpt.model.adapters import AdapterState
from fed_netgpt.model.base import BaseModel
from fed_netgpt.protocol import ARRAYS, CONFIG, ReportReply, ReportRequest, SiteDescription, to_record
from server.site_grid import SiteGrid

log = logging.getLogger("fed_netgpt.server")


def scored_by_sites(config: Config, nodes: dict[int, SiteDescription]) -> bool:
    """`evaluation.federated`: true, false, or auto (as soon as one node keeps data the server does not have)."""
    if config.evaluation.federated == "auto":
        return any(site.owns_data for site in nodes.values())
    return config.evaluation.federated == "true"


def federated_report(grid: SiteGrid, config: Config, folder: Path, base: BaseModel, nodes: dict[int, SiteDescription],
                     groups: dict[int, str], states: dict[str, AdapterState],
                     message_config: ConfigRecord) -> dict[str, Any]:
    """report.json's content from the sites' own scoring (training sites) and the server's (held-out sites)."""
    heldout = _heldout_rows(config)
    known = {s.site_id: (s.region, set(s.facts)) for s in nodes.values()} | facts_by_site(heldout)
    levels = levels_from_sites(known)
    vocabulary = {fact for _, facts in known.values() for fact in facts}
    variants = run_variants(config)
    shares: dict[str, tuple[int | None, int]] = {}
    for region in {s.region for s in nodes.values()}:
        sites = [s.site_id for s in nodes.values() if s.region == region]
        shares |= site_shares(sites, config.evaluation.max_examples_per_region)
    replies = grid.send_and_receive(
        [_request(node, site, groups[node], states, message_config, variants, levels, vocabulary,
                  shares[site.site_id]) for node, site in nodes.items()],
        timeout=config.federation.timeout,
    )
    tallies: dict[str, dict[str, dict[str, Any]]] = {variant: {} for variant in variants}
    examples: dict[str, list[dict[str, Any]]] = {variant: [] for variant in variants}
    for reply in replies:
        site = nodes[reply.metadata.src_node_id]
        if reply.has_error():
            log.warning("final report: site %s did not score its rows: %s", site.site_id, reply.error.reason)
            continue
        answer = ReportReply.from_content(reply.content)
        for variant, counts in answer.tallies.items():
            tallies[variant][site.site_id] = {"region": site.region, **counts}
        for variant, rows in (answer.examples or {}).items():
            examples[variant] += rows
    scored = sorted(tallies[variants[0]])
    missing = sorted({s.site_id for s in nodes.values()} - set(scored))
    report: dict[str, Any] = {"variants": {}, "scored_by": "sites", "sites_scored": scored, "sites_missing": missing}
    for variant in variants:
        result = result_from_tallies(tallies[variant]) if tallies[variant] else {}
        report["variants"][variant] = {**result, "examples": sorted(examples[variant], key=_order)}
    if heldout:
        on_server = evaluate_run(folder, config, heldout, base, variants, facts=(levels, vocabulary))
        for variant in variants:
            report["variants"][variant][GROUPS[1]] = on_server["variants"][variant][GROUPS[1]]
    log.info("final report: %d sites scored their own rows, %d did not%s", len(scored), len(missing),
             f" ({', '.join(missing)})" if missing else "")
    return report


def _request(node: int, site: SiteDescription, group: str, states: dict[str, AdapterState],
             message_config: ConfigRecord, variants: list[str], levels: dict[str, dict[str, str]], vocabulary: set[str],
             share: tuple[int | None, int]) -> Message:
    """The evaluate message asking one site for its part of the report, with its group's final adapter and its
    share of the region's test sample (`evaluation.site_shares`: row limit, absent for all, and intent offset)."""
    limit, offset = share
    request = ReportRequest(tuple(variants), offset, limit, {site.region: levels.get(site.region, {})},
                            tuple(vocabulary))
    content = RecordDict({ARRAYS: to_record(states[group]), CONFIG: request.to_record(message_config)})
    return Message(content, dst_node_id=node, message_type=MessageType.EVALUATE)


def _heldout_rows(config: Config) -> list[PromptPair]:
    """The held-out sites' rows where the server has them (the built-in data, or a `data.path` it can read)."""
    if config.data.path and not Path(config.data.path).is_file():
        log.info("final report: %s is not on the server; held-out sites are not scored", config.data.path)
        return []
    try:
        return [pair for site in load_heldout_sites(config.data) for pair in site.test]
    except DataError as err:
        log.warning("final report: held-out sites are not scored: %s", err)
        return []


def _order(example: dict[str, Any]) -> tuple[str, str]:
    return example["region"], example["site_id"]
