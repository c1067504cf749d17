"""server/site_grid.py and the ClientApp's site choice: a node serves several sites, messages address sites.

The transport is a double that delivers each message to a handler in this process, as a SuperLink would: it
assigns message ids and answers with real `Message(content, reply_to=...)` replies.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable

import numpy as np
import pytest
from flwr.app import ConfigRecord, Context, Error, Message, MessageType, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from clients.app import message_site, node_sites, train
from fed_netgpt.config import FederationConfig, load_config, to_yaml
from fed_netgpt.data.sites import load_sites
from fed_netgpt.model.adapters import attach_adapter, get_state, read_adapter
from fed_netgpt.model.base import load_base
from fed_netgpt.protocol import CONFIG_KEY, RUN_ID_KEY, SITE_KEY, from_record, to_record
from fed_netgpt.training.engine import SiteJob, train_sites
from server.site_grid import QUERY_RETRY_SECONDS, DiscoveryError, SiteGrid, discover_sites
from tests.grids import UnusedTransportGrid


class DeliveringGrid(UnusedTransportGrid):
    """Transport double: `handler(message)` answers each message of connected nodes; nothing else is needed.
    Pushed messages (discovery's) are answered when pulled, and only once the handler has an answer (not None)."""

    def __init__(self, node_ids: Iterable[int], handler: Callable[[Message], Message | None]) -> None:
        self.node_ids, self.handler, self.sent = list(node_ids), handler, []
        self.unanswered: dict[str, Message] = {}  # pushed, not yet answered: message id -> message

    def get_node_ids(self) -> Iterable[int]:
        return list(self.node_ids)

    def send_and_receive(self, messages, *, timeout=None):
        replies = []
        for number, msg in enumerate(messages):
            msg.metadata.__dict__["_message_id"] = f"m{len(self.sent)}-{number}"
            self.sent.append(msg)
            replies.append(self.handler(msg))
        return replies

    def push_messages(self, messages):
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = f"p{len(self.sent)}"
            self.sent.append(msg)
            self.unanswered[msg.metadata.message_id] = msg
            yield msg.metadata.message_id

    def pull_messages(self, message_ids):
        replies = [self.handler(self.unanswered[i]) for i in message_ids if i in self.unanswered]
        for reply in filter(None, replies):
            del self.unanswered[reply.metadata.reply_to_message_id]
        return [reply for reply in replies if reply is not None]


@pytest.fixture(autouse=True)
def server_identity(monkeypatch):
    monkeypatch.setattr(TaskIdentity, "_task_id", 1)
    monkeypatch.setattr(TaskIdentity, "_run_id", 42)
    monkeypatch.setattr(TaskIdentity, "_node_id", 1)


def _echo_site(msg: Message) -> Message:
    """A node that answers with the site the message named, or fails for site 'tokyo'."""
    site = str(msg.content["config"][SITE_KEY])
    if site == "tokyo":
        return Message(Error(code=0, reason="tokyo crashed"), reply_to=msg)
    return Message(RecordDict({"echo": ConfigRecord({"site": site, "node": msg.metadata.dst_node_id})}), reply_to=msg)


ROUTES = {1: (11, "lyon"), 2: (11, "paris"), 3: (12, "tokyo"), 4: (13, "osaka")}


def test_site_grid_shows_sites_of_connected_nodes_and_routes_each_message_to_its_node():
    # Prepare: node 13 is gone; one shared ConfigRecord, as Flower's strategies send
    inner = DeliveringGrid([11, 12], _echo_site)
    grid = SiteGrid(inner, ROUTES)
    shared = ConfigRecord({"server-round": 1})
    messages = [Message(RecordDict({"config": shared}), dst_node_id=site, message_type=MessageType.TRAIN)
                for site in (1, 2, 3)]

    # Execute
    connected = grid.get_node_ids()
    replies = grid.send_and_receive(messages)

    # Assert: two messages to node 11, one to 12, each naming its site; the shared record is left as it was
    assert connected == [1, 2, 3]
    assert [(m.metadata.dst_node_id, m.content["config"][SITE_KEY]) for m in inner.sent] == [
        (11, "lyon"), (11, "paris"), (12, "tokyo")]
    assert SITE_KEY not in shared and all(m.metadata.message_type == MessageType.TRAIN for m in inner.sent)
    # each reply is its site's: src_node_id is the site's number, errors stay errors
    by_site = {r.metadata.src_node_id: r for r in replies}
    assert sorted(by_site) == [1, 2, 3]
    assert by_site[1].content["echo"]["site"] == "lyon" and by_site[2].content["echo"]["site"] == "paris"
    assert by_site[3].has_error() and by_site[3].error.reason == "tokyo crashed"


def _client_context(node_config: dict) -> Context:
    return Context(run_id=42, node_id=7, node_config=node_config, state=RecordDict(), run_config={})


def _config_message(config, site: str | None) -> Message:
    record = ConfigRecord({CONFIG_KEY: to_yaml(config), **({SITE_KEY: site} if site else {})})
    return Message(RecordDict({"config": record}), dst_node_id=7, message_type=MessageType.TRAIN)


def test_simulated_nodes_share_the_sites_out_so_any_number_of_nodes_covers_them_all():
    # Prepare: the 9 default training sites over 2 or 4 nodes
    config = load_config(overrides=["model.name=tiny-random"])
    sites = [s.site_id for s in load_sites(config.data)]

    for nodes in (1, 2, 4, 12):
        # Execute
        served = [[s.site_id for s in node_sites(config, _client_context({"partition-id": p, "num-partitions": nodes}))]
                  for p in range(nodes)]
        # Assert: every site exactly once, shares differ by at most one (a node beyond the sites serves none)
        assert sorted(site for share in served for site in share) == sorted(sites)
        assert max(map(len, served)) - min(map(len, served)) <= 1


def test_a_node_names_its_sites_and_a_message_picks_one_of_them():
    config = load_config(overrides=["model.name=tiny-random"])
    context = _client_context({"site-ids": "lyon, paris"})
    assert [s.site_id for s in node_sites(config, context)] == ["lyon", "paris"]
    assert message_site(config, context, _config_message(config, "paris")).site_id == "paris"
    with pytest.raises(ValueError, match=r"for site 'tokyo'; this node serves \['lyon', 'paris'\]"):
        message_site(config, context, _config_message(config, "tokyo"))
    with pytest.raises(ValueError, match="for site None"):  # two sites: a message must say which
        message_site(config, context, _config_message(config, None))
    single = _client_context({"site-id": "osaka"})
    assert message_site(config, single, _config_message(config, None)).site_id == "osaka"
    with pytest.raises(ValueError, match="'atlantis' is not a training site"):
        node_sites(config, _client_context({"site-ids": "lyon,atlantis"}))


@pytest.mark.parametrize(("node_config", "message"), [
    ({"site-id": "lyon", "region": "japan"}, "node_config region='japan': site 'lyon' is in region 'france'"),
    ({"site_id": "lyon"}, "node_config key 'site_id' is unknown; expected some of site-id, site-ids, region"),
    ({"region": "france"}, "node_config names no site: give site-id="),
    ({"site-ids": " , "}, "'no site' is not a training site|no site is not a training site"),
])
def test_a_node_config_that_cannot_name_the_nodes_sites_is_refused_clearly(node_config, message):
    config = load_config(overrides=["model.name=tiny-random"])
    with pytest.raises(ValueError, match=message):
        node_sites(config, _client_context(node_config))
    assert [s.site_id for s in node_sites(config, _client_context({"site-id": "lyon", "region": "france"}))] == [
        "lyon"]


def test_discover_sites_numbers_every_served_site_and_keeps_the_first_node_of_a_site_served_twice(caplog):
    # Prepare: node 11 serves lyon and paris, node 12 paris (again) and tokyo, node 13 nothing
    served = {11: ["lyon", "paris"], 12: ["paris", "tokyo"], 13: []}

    def answer(msg: Message) -> Message:
        sites = [{"site-id": s, "region": "x", "facts": [s.title()]} for s in served[msg.metadata.dst_node_id]]
        return Message(RecordDict({"sites": ConfigRecord({"json": json.dumps(sites)})}), reply_to=msg)

    # Execute
    sites, routes = discover_sites(DeliveringGrid([11, 12, 13], answer), expected_sites=3,
                                   federation=FederationConfig(), message_config=ConfigRecord({}))

    # Assert
    assert routes == {1: (11, "lyon"), 2: (11, "paris"), 3: (12, "tokyo")}
    assert sites[3].site_id == "tokyo" and sites[3].facts == ("Tokyo",)
    assert "site paris is served by nodes 11 and 12; node 11 keeps it" in caplog.text


class Clock:
    """Discovery's clock and sleep: time moves only while discovery sleeps."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


def _starting_nodes(clock: Clock, ready_at: dict[int, float], loading_replies: dict[int, int] | None = None):
    """Nodes that answer a query only once started (`ready_at` seconds; inf: never), the first
    `loading_replies[node]` queries with an error, as a node whose ClientApp is still loading; node n serves
    site "s<n>"."""
    errors_left = dict(loading_replies or {})

    def answer(msg: Message) -> Message | None:
        node = msg.metadata.dst_node_id
        if clock.now < ready_at[node]:
            return None
        if errors_left.get(node, 0) > 0:
            errors_left[node] -= 1
            return Message(Error(code=1, reason="LoadClientAppError: the ClientApp is still loading"), reply_to=msg)
        sites = [{"site-id": f"s{node}", "region": "x"}]
        return Message(RecordDict({"sites": ConfigRecord({"json": json.dumps(sites)})}), reply_to=msg)

    return answer


def _queries_to(grid: DeliveringGrid) -> dict[int, int]:
    return {node: sum(m.metadata.dst_node_id == node for m in grid.sent) for node in grid.node_ids}


def test_a_node_that_answers_only_its_second_query_is_asked_again_and_waited_for(caplog):
    # Prepare: node 11 answers at once; node 12 answers its first query with an error (its ClientApp still loading)
    clock = Clock()
    grid = DeliveringGrid([11, 12], _starting_nodes(clock, {11: 0, 12: 0}, loading_replies={12: 1}))

    # Execute
    sites, routes = discover_sites(grid, expected_sites=2, federation=FederationConfig(discovery_timeout=60),
                                   message_config=ConfigRecord({}), clock=clock, sleep=clock.sleep)

    # Assert: both sites served; node 12 was asked twice, the second time after the retry delay, node 11 once
    assert routes == {1: (11, "s11"), 2: (12, "s12")} and sites[2].site_id == "s12"
    assert _queries_to(grid) == {11: 1, 12: 2}
    assert QUERY_RETRY_SECONDS <= clock.now < QUERY_RETRY_SECONDS + 2
    assert ("node 12 could not say which sites it serves (LoadClientAppError: the ClientApp is still loading); "
            "asking it again") in caplog.text


def test_nodes_slower_to_start_than_the_round_timeout_are_waited_for_within_the_discovery_timeout():
    # Prepare: node 12 takes 100 s to start; a round's timeout is 30 s, discovery's 300 s
    clock = Clock()
    grid = DeliveringGrid([11, 12], _starting_nodes(clock, {11: 5, 12: 100}))
    federation = FederationConfig(timeout=30, discovery_timeout=300)

    # Execute
    _, routes = discover_sites(grid, expected_sites=2, federation=federation, message_config=ConfigRecord({}),
                               clock=clock, sleep=clock.sleep)

    # Assert: discovery went on past federation.timeout until node 12 answered; one query each, none piled up on a
    # node that is still starting
    assert routes == {1: (11, "s11"), 2: (12, "s12")}
    assert 100 <= clock.now < 102
    assert _queries_to(grid) == {11: 1, 12: 1}


def test_no_node_answering_ends_at_the_discovery_timeout_with_one_line_that_names_it():
    # Prepare: two connected nodes that never answer; a round's timeout (3600 s) far beyond discovery's (30 s)
    clock = Clock()
    grid = DeliveringGrid([11, 12], _starting_nodes(clock, {11: math.inf, 12: math.inf}))
    federation = FederationConfig(timeout=3600, discovery_timeout=30)

    # Execute
    with pytest.raises(DiscoveryError) as raised:
        discover_sites(grid, expected_sites=2, federation=federation, message_config=ConfigRecord({}),
                       clock=clock, sleep=clock.sleep)

    # Assert: it gave up at the discovery timeout, not the round's, with one line that says what to raise
    assert 30 <= clock.now < 32
    assert str(raised.value) == (
        "no node answered the discovery query within federation.discovery_timeout=30s (2 nodes connected): raise "
        "federation.discovery_timeout, or check the nodes' logs")


def test_nodes_that_keep_failing_are_named_in_the_error_and_asked_only_every_retry_delay():
    clock = Clock()
    grid = DeliveringGrid([11, 12], _starting_nodes(clock, {11: 0, 12: math.inf}, loading_replies={11: 1000}))
    with pytest.raises(DiscoveryError, match=r"\(2 nodes connected; node 11: LoadClientAppError: the ClientApp is "
                       r"still loading\): raise federation.discovery_timeout"):
        discover_sites(grid, expected_sites=2, federation=FederationConfig(discovery_timeout=30),
                       message_config=ConfigRecord({}), clock=clock, sleep=clock.sleep)
    assert _queries_to(grid) == {11: 4, 12: 1}  # at 0, 10, 20 and 30 s; node 12's one query still outstanding


def test_a_federation_no_node_answers_is_marked_failed_with_that_line(tmp_path, caplog):
    from fed_netgpt.run.folder import RunFolderError, check_finished, metrics_rows
    from server.app import run_federation

    # Prepare: two nodes connected that never answer, a short discovery timeout (real time) beside a round's
    config = load_config(overrides=["model.name=tiny-random", f"run.output_dir={tmp_path}",
                                    "federation.discovery_timeout=0.5", "federation.timeout=2"])
    grid = DeliveringGrid([11, 12], lambda msg: None)

    # Execute
    folder = run_federation(grid, config)

    # Assert: the run ends (no exception) with the folder marked failed by that one line, and nothing trained
    reason = json.loads((folder / "failed.json").read_text())["reason"]
    assert reason == ("no node answered the discovery query within federation.discovery_timeout=0.5s (2 nodes "
                      "connected): raise federation.discovery_timeout, or check the nodes' logs")
    assert f"the run failed: {reason}" in caplog.text
    assert not (folder / "adapters").exists() and not (folder / "checkpoints").exists()
    assert metrics_rows(folder / "metrics.jsonl") == []
    with pytest.raises(RunFolderError, match="holds a failed run"):
        check_finished(folder, config)


def test_sites_sharing_a_node_end_with_the_adapters_they_get_alone(tmp_path):
    # Prepare: one node serving lyon and paris (different data), the same starting adapter for both
    config = load_config(overrides=["model.name=tiny-random", "personalization.method=none", "train.local_steps=2",
                                    "train.bf16=false", f"run.output_dir={tmp_path}"])
    base = load_base(config.model.name)
    start = get_state(attach_adapter(base, "site-grid-start", config.lora, seed=3), "site-grid-start")
    context = _client_context({"site-ids": "lyon,paris"})

    def train_message(site: str) -> Message:
        record = ConfigRecord({CONFIG_KEY: to_yaml(config), SITE_KEY: site, "server-round": 1})
        return Message(RecordDict({"arrays": to_record(start), "config": record}), dst_node_id=7,
                       message_type=MessageType.TRAIN)

    # Execute: lyon then paris on the node; paris alone on a fresh adapter from the same start
    together = {site: from_record(train(train_message(site), context).content["arrays"]) for site in ("lyon", "paris")}
    paris = next(s for s in load_sites(config.data) if s.site_id == "paris")
    (alone,) = (r.state for r in train_sites(base, [SiteJob("paris", paris.train, start, seed=1)], config.lora,
                                              config.train))

    # Assert: paris trained after lyon on the same node is paris alone; lyon's adapter is another one
    assert together["paris"].keys() == alone.keys()
    for key in alone:
        np.testing.assert_array_equal(together["paris"][key], alone[key])
    assert any(not np.array_equal(together["lyon"][key], alone[key]) for key in alone)


def test_train_messages_travel_packed_per_node_and_come_back_as_each_sites_reply():
    # Prepare: node 11 serves lyon and paris, 12 tokyo, 13 osaka; two sites a pass; a pack answered by a node
    def answer(msg: Message) -> Message:
        if msg.metadata.message_type != MessageType.TRAIN:
            return _echo_site(msg)
        sites = list(msg.content["pack"]["sites"])
        if "tokyo" in sites:
            return Message(Error(code=0, reason="node 12 crashed"), reply_to=msg)
        content = RecordDict({f"{s}/echo": ConfigRecord({"site": s}) for s in sites if s not in ("osaka", "lyon")})
        content["lyon/error"] = ConfigRecord({"reason": "privacy budget spent: epsilon is 4.000"})  # lyon refused
        return Message(content, reply_to=msg)

    inner = DeliveringGrid([11, 12, 13], answer)
    grid = SiteGrid(inner, ROUTES, sites_per_pass=2)
    train = [Message(RecordDict({"config": ConfigRecord({"server-round": 1})}), dst_node_id=site,
                     message_type=MessageType.TRAIN) for site in (1, 2, 3, 4)]
    evaluate = Message(RecordDict({"config": ConfigRecord({})}), dst_node_id=2, message_type=MessageType.EVALUATE)

    # Execute
    replies = {(r.metadata.src_node_id, r.metadata.message_type): r for r in grid.send_and_receive([*train, evaluate])}

    # Assert: one pack a node for the train messages (lyon+paris together), the evaluate message alone
    wire = [(m.metadata.dst_node_id, m.metadata.message_type, list(m.content["pack"]["sites"])
             if "pack" in m.content else m.content["config"][SITE_KEY]) for m in inner.sent]
    assert wire == [(11, MessageType.EVALUATE, "paris"),
                    (11, MessageType.TRAIN, ["lyon", "paris"]), (12, MessageType.TRAIN, ["tokyo"]),
                    (13, MessageType.TRAIN, ["osaka"])]
    assert inner.sent[1].content["lyon/config"][SITE_KEY] == "lyon"
    # each site gets its own records back (or its own error); a failed node fails its sites; a site missing from a
    # reply fails
    assert replies[(1, MessageType.TRAIN)].error.reason == "privacy budget spent: epsilon is 4.000"
    assert replies[(2, MessageType.TRAIN)].content["echo"]["site"] == "paris"
    assert replies[(3, MessageType.TRAIN)].error.reason == "node 12 crashed"
    assert "holds nothing for site osaka" in replies[(4, MessageType.TRAIN)].error.reason
    assert replies[(2, MessageType.EVALUATE)].content["echo"]["site"] == "paris"


def test_a_packed_train_message_trains_each_site_as_it_would_alone(tmp_path):
    # Prepare: lyon and paris packed for one grouped pass, and paris sent alone, from the same start; Ditto's
    # personal adapters too, each run in its own folder
    def config_in(folder: str):
        return load_config(overrides=["model.name=tiny-random", "train.local_steps=2", "personalization.steps=2",
                                      "train.bf16=false", f"run.output_dir={tmp_path / folder}"])

    config = config_in("pack")
    base = load_base(config.model.name)
    start = get_state(attach_adapter(base, "site-grid-pack", config.lora, seed=4), "site-grid-pack")
    start = {k: v + 0.01 for k, v in start.items()}  # B != 0: both factors move from the first step
    context = _client_context({"site-ids": "lyon,paris"})
    record = {RUN_ID_KEY: "run-1", "server-round": 2}
    packed = RecordDict({"pack": ConfigRecord({"sites": ["lyon", "paris"], "arrays_of": ["lyon", "lyon"]})})
    packed["lyon/arrays"] = to_record(start)  # one adapter for both: paris's is lyon's (the server shares it)
    for site in ("lyon", "paris"):
        packed[f"{site}/config"] = ConfigRecord({CONFIG_KEY: to_yaml(config), **record, SITE_KEY: site})
    alone = RecordDict({"arrays": to_record(start), "config": ConfigRecord({
        CONFIG_KEY: to_yaml(config_in("alone")), **record, SITE_KEY: "paris"})})

    # Execute
    together = train(Message(packed, dst_node_id=7, message_type=MessageType.TRAIN), context)
    single = train(Message(alone, dst_node_id=7, message_type=MessageType.TRAIN), context)

    # Assert: paris's part of the pack is paris alone, up to float32 rounding (other padding, other sums)
    assert sorted(together.content) == ["lyon/arrays", "lyon/metrics", "paris/arrays", "paris/metrics"]
    grouped, expected = from_record(together.content["paris/arrays"]), from_record(single.content["arrays"])
    assert list(grouped) == list(expected)
    for key in expected:
        np.testing.assert_allclose(grouped[key], expected[key], rtol=0, atol=2e-6, err_msg=key)
    assert together.content["paris/metrics"]["num-examples"] == single.content["metrics"]["num-examples"]
    for key in ("train_loss", "personal_loss"):
        assert together.content["paris/metrics"][key] == pytest.approx(single.content["metrics"][key], rel=1e-5)
    # and paris's personal adapter, trained in a second grouped pass, is the one it trains alone
    (_, personal_pack), (_, personal_alone) = (read_adapter(tmp_path / run / "site_adapters" / "paris")
                                               for run in ("pack", "alone"))
    assert (tmp_path / "pack" / "site_adapters" / "lyon" / "adapter_model.safetensors").is_file()
    for key in personal_alone:
        np.testing.assert_allclose(personal_pack[key], personal_alone[key], rtol=0, atol=2e-6, err_msg=key)
    assert any(np.abs(personal_alone[key] - together_state).max() > 1e-4
               for key, together_state in from_record(together.content["paris/arrays"]).items())


def test_a_pack_carries_an_adapter_its_sites_share_once():
    # Prepare: node 11 serves lyon, paris and nice; lyon and nice start from one adapter, paris from another
    shared, other = {"w": np.ones((4, 3), np.float32)}, {"w": np.zeros((4, 3), np.float32)}
    routes = {1: (11, "lyon"), 2: (11, "paris"), 3: (11, "nice")}
    inner = DeliveringGrid([11], lambda msg: Message(RecordDict({f"{s}/echo": ConfigRecord({"site": s})
                                                                 for s in msg.content["pack"]["sites"]}), reply_to=msg))
    grid = SiteGrid(inner, routes, sites_per_pass=3)
    train = [Message(RecordDict({"arrays": to_record(state), "config": ConfigRecord({"server-round": 1})}),
                     dst_node_id=site, message_type=MessageType.TRAIN)
             for site, state in ((1, shared), (2, other), (3, dict(shared)))]  # equal content, another object

    # Execute
    replies = grid.send_and_receive(train)

    # Assert: one message, nice's adapter not in it but named as lyon's; the bytes say what sharing saved
    (wire,) = inner.sent
    assert sorted(key for key in wire.content if key.endswith("/arrays")) == ["lyon/arrays", "paris/arrays"]
    assert list(wire.content["pack"]["arrays_of"]) == ["lyon", "paris", "lyon"]
    assert grid.take_train_downlink() == {"bytes_down_wire": 2 * 48, "bytes_down_unshared": 3 * 48}
    assert grid.take_train_downlink() == {}  # handed over once
    assert sorted(r.content["echo"]["site"] for r in replies) == ["lyon", "nice", "paris"]
