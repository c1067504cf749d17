"""Sites are not nodes: a node (a SuperNode, an edge server) may serve several sites.

Every strategy, the round loop and the final report address *sites*. `discover_sites` asks each node which
sites it serves and gives every site an id of its own; `SiteGrid` is the Grid those ids live in: a message to
a site goes to the site's node with the site named in its config (`SITE_KEY`), and the node's reply comes back
as the site's. So Flower's strategies sample, weigh and aggregate sites (`federation.fraction_train` is a
fraction of sites), whatever the number of nodes, and a node trains its sites one message at a time on its one
frozen base. With `train.sites_per_pass` > 1 the train messages for one node's sites travel packed, up to that
many in one message (each site's records under "<site>/"), and the node trains them in one grouped pass. Sites
of one region get the same adapter: a pack carries it once (`arrays_of` names, for each site, the site whose
arrays it trains from), so a node's downlink grows with its regions, not its sites.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Iterable
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Error, Message, MessageType, RecordDict
from flwr.serverapp import Grid

from fed_netgpt.runs import short_reason
from server.federated_report import NodeSite
from strategies.records import PACK_KEY, SITE_ERROR_KEY, SITE_KEY
from strategies.regional import array_bytes

log = logging.getLogger("fed_netgpt.server")
Route = tuple[int, str]  # (node id, site id)
CLIENT_APP_RAISED_EXCEPTION = 2  # Flower's error code for a ClientApp that raised (flwr.common.constant.ErrorCode)


class SiteGrid:
    """The Grid seen by strategies: one id per site (`routes`: site id number -> its node and site id)."""

    def __init__(self, grid: Grid, routes: dict[int, Route], sites_per_pass: int = 1) -> None:
        self._grid = grid
        self.routes = dict(routes)
        self.sites_per_pass = sites_per_pass
        self.train_downlink: dict[str, int] = {}  # the last packed train send: adapter bytes sent, and unshared

    def get_node_ids(self) -> list[int]:
        """The sites whose node is connected."""
        connected = set(self._grid.get_node_ids())
        return [site for site, (node, _) in self.routes.items() if node in connected]

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> list[Message]:
        """Each message to its site's node, naming the site (train messages packed per node when asked); each
        reply returned as its site's."""
        outgoing: list[tuple[Message, list[tuple[str, Message]]]] = []  # on the wire, [(site packed, original)]
        packs: dict[int, list[tuple[Message, Message]]] = {}
        for msg in messages:
            routed = self._routed(msg)
            if self.sites_per_pass > 1 and msg.metadata.message_type == MessageType.TRAIN:
                packs.setdefault(routed.metadata.dst_node_id, []).append((routed, msg))
            else:
                outgoing.append((routed, [("", msg)]))
        sent_bytes = unshared_bytes = 0
        for node_messages in packs.values():
            for start in range(0, len(node_messages), self.sites_per_pass):
                chunk = node_messages[start : start + self.sites_per_pass]
                wire = _packed(chunk)
                outgoing.append((wire, [(str(out.content["config"][SITE_KEY]), msg) for out, msg in chunk]))
                sent_bytes += array_bytes(wire)
                unshared_bytes += sum(array_bytes(out) for out, _ in chunk)
        if packs:
            self.train_downlink = {"bytes_down_wire": sent_bytes, "bytes_down_unshared": unshared_bytes}
        replies = self._grid.send_and_receive([wire for wire, _ in outgoing], timeout=timeout)
        sent = {wire.metadata.message_id: members for wire, members in outgoing}
        return [_unpacked(reply, site, original)
                for reply in replies for site, original in sent.get(reply.metadata.reply_to_message_id, [])]

    def _routed(self, msg: Message) -> Message:
        node, site_id = self.routes[msg.metadata.dst_node_id]
        content = RecordDict({key: ConfigRecord({**dict(record), SITE_KEY: site_id}) if key == "config" else record
                              for key, record in msg.content.items()})
        return Message(content, dst_node_id=node, message_type=msg.metadata.message_type,
                       group_id=msg.metadata.group_id, ttl=msg.metadata.ttl)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._grid, name)


def _packed(chunk: list[tuple[Message, Message]]) -> Message:
    """One train message for several sites of a node: each site's records under "<site>/", an adapter that
    several of them start from only once (`arrays_of`: whose arrays each site trains from)."""
    first = chunk[0][0]
    content = RecordDict()
    sites, owners = [], []
    first_with: dict[str, str] = {}  # the arrays' content digest -> the first site sent them
    for routed, _ in chunk:
        site = str(routed.content["config"][SITE_KEY])
        sites.append(site)
        for key, record in routed.content.items():
            if key == "arrays":
                owner = first_with.setdefault(_digest(record), site)
                owners.append(owner)
                if owner != site:
                    continue
            content[f"{site}/{key}"] = record
    content[PACK_KEY] = ConfigRecord({"sites": sites, "arrays_of": owners})
    return Message(content, dst_node_id=first.metadata.dst_node_id, message_type=MessageType.TRAIN,
                   group_id=first.metadata.group_id, ttl=first.metadata.ttl)


def _digest(record: ArrayRecord) -> str:
    digest = hashlib.blake2b(digest_size=16)
    for key, array in record.items():
        digest.update(f"{key}|{array.dtype}|{array.shape}|".encode())
        digest.update(array.data)
    return digest.hexdigest()


def _unpacked(reply: Message, site: str, original: Message) -> Message:
    """A site's reply: the node's whole reply, or (`site` packed) the records under "<site>/"; a failed node's
    error is each of its sites' error."""
    if reply.has_error():
        return Message(reply.error, reply_to=original)
    if not site:
        return Message(reply.content, reply_to=original)
    records = {key.removeprefix(f"{site}/"): record for key, record in reply.content.items()
               if key.startswith(f"{site}/")}
    if not records:
        return Message(Error(code=0, reason=f"the node's reply holds nothing for site {site}"), reply_to=original)
    if SITE_ERROR_KEY in records:  # this site was refused (its DP budget), its packmates trained
        reason = str(records[SITE_ERROR_KEY]["reason"])  # type: ignore[index]
        return Message(Error(code=CLIENT_APP_RAISED_EXCEPTION, reason=reason), reply_to=original)
    return Message(RecordDict(records), reply_to=original)


def discover_sites(grid: Grid, expected_sites: int, min_nodes: int, timeout: float,
                   message_config: ConfigRecord) -> tuple[dict[int, NodeSite], dict[int, Route]]:
    """Ask every node which sites it serves (a query message), as nodes connect, until the sites served number
    `expected_sites` (or `min_nodes` nodes answered, when set) or `timeout` seconds pass. Returns each site's
    description and route, by site number (1, 2, ... in site-id order)."""
    started, answered = time.monotonic(), {}
    served: dict[str, tuple[int, NodeSite]] = {}
    while True:
        new = [node for node in grid.get_node_ids() if node not in answered]
        for node, sites in _query(grid, new, message_config, timeout).items():
            answered[node] = sites
            for site in sites:
                if site.site_id in served:
                    log.warning("discover_sites: site %s is served by nodes %d and %d; node %d keeps it",
                                site.site_id, served[site.site_id][0], node, served[site.site_id][0])
                    continue
                served[site.site_id] = (node, site)
        enough = len(answered) >= min_nodes if min_nodes else len(served) >= expected_sites
        waited = time.monotonic() - started
        if enough or waited > timeout:
            if not enough:
                log.warning("discover_sites: %d of %d sites on %d nodes after %.0fs; going on with them",
                            len(served), expected_sites, len(answered), waited)
            break
        if int(waited) % 10 == 0:
            log.info("discover_sites: %d of %d sites served by %d nodes, waiting (federation.min_nodes sets a "
                     "number of nodes instead)", len(served), expected_sites, len(answered))
        time.sleep(1.0)
    if not served:
        raise RuntimeError("no node serves a site; nothing to train")
    numbered = {number: served[site_id] for number, site_id in enumerate(sorted(served), start=1)}
    return ({number: site for number, (_, site) in numbered.items()},
            {number: (node, site.site_id) for number, (node, site) in numbered.items()})


def _query(grid: Grid, nodes: list[int], message_config: ConfigRecord, timeout: float) -> dict[int, list[NodeSite]]:
    """The sites each of `nodes` serves; a node that does not answer is asked no more (it serves none)."""
    if not nodes:
        return {}
    messages = [Message(RecordDict({"config": message_config}), dst_node_id=node, message_type=MessageType.QUERY)
                for node in nodes]
    answers: dict[int, list[NodeSite]] = {node: [] for node in nodes}
    for reply in grid.send_and_receive(messages, timeout=timeout):
        node = reply.metadata.src_node_id
        if reply.has_error():
            log.warning("discover_sites: node %d serves no site, it failed to say which: %s", node,
                        short_reason(reply.error.reason))
            continue
        for site in json.loads(str(reply.content["sites"]["json"])):
            answers[node].append(NodeSite(site["site-id"], site["region"], tuple(site.get("facts", [])),
                                          bool(site.get("owns-data", False))))
            log.info("discover_sites: node %d serves site %s in region %s", node, site["site-id"], site["region"])
        if not answers[node]:
            log.info("discover_sites: node %d serves no site", node)
    return answers
