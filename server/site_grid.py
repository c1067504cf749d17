"""Sites are not nodes: a node (a SuperNode, an edge server) may serve several sites.

Every strategy, the round loop and the final report address *sites*. `discover_sites` asks each node which
sites it serves and gives every site an id of its own; `SiteGrid` is the Grid those ids live in: a message to
a site goes to the site's node with the site named in its config (`protocol.SITE_KEY`), and the node's reply comes back
as the site's. So Flower's strategies sample, weigh and aggregate sites (`federation.fraction_train` is a
fraction of sites), whatever the number of nodes, and a node trains its sites one message at a time on its one
frozen base. With `train.sites_per_pass` > 1 the train messages for one node's sites travel packed, up to that
many in one message (each site's records under "<site>/"), and the node trains them in one grouped pass. Sites
of one aggregation group get the same adapter: a pack carries it once (`arrays_of` names, for each site, the site
whose arrays it trains from), so a node's downlink grows with its groups, not its sites.
"""

from __future__ import annotations

import hashlib
import logging
import math
import time
from collections.abc import Callable, Collection, Iterable, Mapping
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Error, Message, MessageType, RecordDict
from flwr.serverapp import Grid

from fed_netgpt.config import FederationConfig
from fed_netgpt.protocol import (
    CONFIG,
    SITE_KEY,
    SiteDescription,
    pack_train_messages,
    site_part,
    sites_of_discovery_reply,
)
from fed_netgpt.run.folder import short_reason
from strategies.groups import array_bytes

log = logging.getLogger("fed_netgpt.server")
Route = tuple[int, str]  # (node id, site id)
CLIENT_APP_RAISED_EXCEPTION = 2  # Flower's error code for a ClientApp that raised (flwr.common.constant.ErrorCode)


class SiteGrid:
    """The Grid seen by strategies: one id per site (`routes`: site id number -> its node and site id)."""

    def __init__(self, grid: Grid, routes: dict[int, Route], sites_per_pass: int = 1) -> None:
        self._grid = grid
        self.routes = dict(routes)
        self.sites_per_pass = sites_per_pass
        self._train_downlink: dict[str, int] = {}  # the round's packed train send: adapter bytes sent, and unshared

    def take_train_downlink(self) -> dict[str, int]:
        """The round's packed train send (adapter bytes on the wire, and what unpacked messages would have carried),
        handed over once; empty when nothing was packed."""
        downlink, self._train_downlink = self._train_downlink, {}
        return downlink

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
                outgoing.append((wire, [(_site_of(out), msg) for out, msg in chunk]))
                sent_bytes += array_bytes(wire)
                unshared_bytes += sum(array_bytes(out) for out, _ in chunk)
        if packs:
            self._train_downlink = {"bytes_down_wire": sent_bytes, "bytes_down_unshared": unshared_bytes}
        replies = self._grid.send_and_receive([wire for wire, _ in outgoing], timeout=timeout)
        sent = {wire.metadata.message_id: members for wire, members in outgoing}
        return [_unpacked(reply, site, original)
                for reply in replies for site, original in sent.get(reply.metadata.reply_to_message_id, [])]

    def _routed(self, msg: Message) -> Message:
        node, site_id = self.routes[msg.metadata.dst_node_id]
        content = RecordDict({key: ConfigRecord({**dict(record), SITE_KEY: site_id})
                              if key == CONFIG and isinstance(record, ConfigRecord) else record
                              for key, record in msg.content.items()})
        return Message(content, dst_node_id=node, message_type=msg.metadata.message_type,
                       group_id=msg.metadata.group_id, ttl=msg.metadata.ttl)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._grid, name)


def _site_of(routed: Message) -> str:
    return str(routed.content.config_records[CONFIG][SITE_KEY])


def _packed(chunk: list[tuple[Message, Message]]) -> Message:
    """One train message for several sites of a node (`protocol.pack_train_messages`)."""
    first = chunk[0][0]
    content = pack_train_messages([(_site_of(routed), routed.content) for routed, _ in chunk], _digest)
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
    part = site_part(reply.content, site)
    if part is None:
        return Message(Error(code=0, reason=f"the node's reply holds nothing for site {site}"), reply_to=original)
    if isinstance(part, str):  # this site was refused (its DP budget), its packmates trained
        return Message(Error(code=CLIENT_APP_RAISED_EXCEPTION, reason=part), reply_to=original)
    return Message(part, reply_to=original)


class DiscoveryError(RuntimeError):
    """No node served a site within `federation.discovery_timeout`; the message is one line that says what to raise
    or check (the ServerApp marks the run failed with it)."""


QUERY_RETRY_SECONDS = 10.0  # a node whose query came back with an error (still loading, unavailable) is asked again
POLL_SECONDS = 1.0  # how often discovery pulls answers and looks for nodes that connected since
PROGRESS_SECONDS = 10.0  # how often a discovery still waiting says so


def discover_sites(grid: Grid, expected_sites: int, federation: FederationConfig, message_config: ConfigRecord, *,
                   clock: Callable[[], float] = time.monotonic, sleep: Callable[[float], None] = time.sleep,
                   ) -> tuple[dict[int, SiteDescription], dict[int, Route]]:
    """Ask every node which sites it serves (a query message), as nodes connect, until the sites served number
    `expected_sites` (or `federation.min_nodes` nodes answered, when set) or `federation.discovery_timeout` seconds
    pass. A node's query stays outstanding until it answers, however long the node takes to start; one that answers
    with an error is asked again. Returns each site's description and route, by site number (1, 2, ... in site-id
    order); no site served at the end is a `DiscoveryError`."""
    limit = federation.discovery_timeout
    deadline = clock() + limit
    next_progress = clock() + PROGRESS_SECONDS
    answered: dict[int, list[SiteDescription]] = {}
    pending: dict[str, int] = {}  # an outstanding query's message id -> its node
    failed: dict[int, tuple[float, str]] = {}  # a node -> when its last query came back with an error, and why
    served: dict[str, tuple[int, SiteDescription]] = {}
    while True:
        connected = list(grid.get_node_ids())
        ask = nodes_to_ask(connected, answered, pending.values(), {n: at for n, (at, _) in failed.items()}, clock())
        pending.update(_send_queries(grid, ask, message_config))
        for node, reply in _pull_answers(grid, pending):
            if reply.has_error():
                reason = short_reason(str(reply.error.reason))
                if failed.get(node, (0.0, ""))[1] != reason:
                    log.warning("discover_sites: node %d could not say which sites it serves (%s); asking it again "
                                "until federation.discovery_timeout", node, reason)
                failed[node] = (clock(), reason)
                continue
            failed.pop(node, None)
            answered[node] = _sites_in(reply, node)
            _add_served(served, node, answered[node])
        if discovery_done(len(served), len(answered), expected_sites, federation.min_nodes):
            break
        if clock() >= deadline:
            if served:
                log.warning("discover_sites: %d of %d sites on %d nodes within federation.discovery_timeout=%gs; "
                            "going on with them (%s)", len(served), expected_sites, len(answered), limit,
                            _unanswered(connected, answered, failed))
            break
        if clock() >= next_progress:
            next_progress += PROGRESS_SECONDS
            log.info("discover_sites: %d of %d sites served by %d nodes, %d nodes still to answer; waiting up to %.0fs "
                     "more (federation.discovery_timeout; federation.min_nodes sets a number of nodes instead)",
                     len(served), expected_sites, len(answered), sum(n not in answered for n in connected),
                     deadline - clock())
        sleep(POLL_SECONDS)
    if not served:
        raise DiscoveryError(no_site_reason(limit, connected, answered, failed))
    numbered = {number: served[site_id] for number, site_id in enumerate(sorted(served), start=1)}
    return ({number: site for number, (_, site) in numbered.items()},
            {number: (node, site.site_id) for number, (node, site) in numbered.items()})


def nodes_to_ask(connected: Iterable[int], answered: Collection[int], pending: Iterable[int],
                 failed_at: Mapping[int, float], now: float, retry_after: float = QUERY_RETRY_SECONDS) -> list[int]:
    """The connected nodes to send a discovery query now: not answered yet, no query of theirs outstanding, and
    none that came back with an error less than `retry_after` seconds ago."""
    waiting = set(pending)
    return [node for node in connected if node not in answered and node not in waiting
            and now - failed_at.get(node, -math.inf) >= retry_after]


def discovery_done(served_sites: int, answered_nodes: int, expected_sites: int, min_nodes: int) -> bool:
    """Enough to start: `min_nodes` nodes answered when set, else every expected site is served."""
    return answered_nodes >= min_nodes if min_nodes else served_sites >= expected_sites


def no_site_reason(limit: float, connected: Collection[int], answered: Collection[int],
                   failed: Mapping[int, tuple[float, str]]) -> str:
    """The one line that ends a federation in which no node served a site: what happened and what to change."""
    key = f"federation.discovery_timeout={limit:g}s"
    if not connected:
        return f"no node connected within {key}: start the nodes (SuperNodes), or raise federation.discovery_timeout"
    if answered:
        return (f"the {len(answered)} nodes that answered within {key} serve no site: check their node-config "
                "(site-id or site-ids)")
    errors = "".join(f"; node {node}: {reason}" for node, (_, reason) in sorted(failed.items())[:2])
    return (f"no node answered the discovery query within {key} ({len(connected)} nodes connected{errors}): raise "
            "federation.discovery_timeout, or check the nodes' logs")


def _unanswered(connected: Iterable[int], answered: Collection[int], failed: Mapping[int, tuple[float, str]]) -> str:
    """Which connected nodes never said which sites they serve, and the last error of those that failed to."""
    silent = [node for node in connected if node not in answered]
    errors = "".join(f"; node {node}: {reason}" for node, (_, reason) in sorted(failed.items())[:2])
    return f"no answer from nodes {silent}{errors}" if silent else "every connected node answered"


def _send_queries(grid: Grid, nodes: list[int], message_config: ConfigRecord) -> dict[str, int]:
    """A query to each of `nodes`; its message id -> the node (a query the grid did not take is asked again)."""
    if not nodes:
        return {}
    messages = [Message(RecordDict({CONFIG: message_config}), dst_node_id=node, message_type=MessageType.QUERY)
                for node in nodes]
    sent = {message_id for message_id in grid.push_messages(messages) if message_id}
    return {msg.metadata.message_id: node for msg, node in zip(messages, nodes, strict=True)
            if msg.metadata.message_id in sent}


def _pull_answers(grid: Grid, pending: dict[str, int]) -> list[tuple[int, Message]]:
    """The replies to outstanding queries that have arrived, each with its node (removed from `pending`)."""
    if not pending:
        return []
    replies = grid.pull_messages(list(pending))
    return [(pending.pop(reply.metadata.reply_to_message_id), reply) for reply in replies
            if reply.metadata.reply_to_message_id in pending]


def _sites_in(reply: Message, node: int) -> list[SiteDescription]:
    """The sites a node's answer names."""
    sites = sites_of_discovery_reply(reply.content)
    for site in sites:
        log.info("discover_sites: node %d serves site %s in region %s", node, site.site_id, site.region)
    if not sites:
        log.info("discover_sites: node %d serves no site", node)
    return sites


def _add_served(served: dict[str, tuple[int, SiteDescription]], node: int, sites: list[SiteDescription]) -> None:
    """Each of a node's sites, unless an earlier node serves it already (that node keeps it)."""
    for site in sites:
        if site.site_id in served:
            log.warning("discover_sites: site %s is served by nodes %d and %d; node %d keeps it",
                        site.site_id, served[site.site_id][0], node, served[site.site_id][0])
            continue
        served[site.site_id] = (node, site)
