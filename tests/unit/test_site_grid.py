"""server/site_grid.py and the ClientApp's site choice: a node serves several sites, messages address sites.

The transport is a double that delivers each message to a handler in this process, as a SuperLink would: it
assigns message ids and answers with real `Message(content, reply_to=...)` replies.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable

import numpy as np
import pytest
from flwr.app import ConfigRecord, Context, Error, Message, MessageType, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from clients.app import message_site, node_sites, train
from fed_netgpt.adapters import attach_adapter, get_state, read_adapter, set_state
from fed_netgpt.config import load_config, to_yaml
from fed_netgpt.data.sites import load_sites
from fed_netgpt.models import load_base
from fed_netgpt.training import train_adapter
from server.site_grid import SiteGrid, discover_sites
from strategies.records import CONFIG_KEY, RUN_ID_KEY, SITE_KEY, from_record, to_record
from tests.grids import UnusedTransportGrid


class DeliveringGrid(UnusedTransportGrid):
    """Transport double: `handler(message)` answers each message of connected nodes; nothing else is needed."""

    def __init__(self, node_ids: Iterable[int], handler: Callable[[Message], Message]) -> None:
        self.node_ids, self.handler, self.sent = list(node_ids), handler, []

    def get_node_ids(self) -> Iterable[int]:
        return list(self.node_ids)

    def send_and_receive(self, messages, *, timeout=None):
        replies = []
        for number, msg in enumerate(messages):
            msg.metadata.__dict__["_message_id"] = f"m{len(self.sent)}-{number}"
            self.sent.append(msg)
            replies.append(self.handler(msg))
        return replies


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
    sites, routes = discover_sites(DeliveringGrid([11, 12, 13], answer), expected_sites=3, min_nodes=0, timeout=5,
                                   message_config=ConfigRecord({}))

    # Assert
    assert routes == {1: (11, "lyon"), 2: (11, "paris"), 3: (12, "tokyo")}
    assert sites[3].site_id == "tokyo" and sites[3].facts == ("Tokyo",)
    assert "site paris is served by nodes 11 and 12; node 11 keeps it" in caplog.text


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
    model = attach_adapter(base, "site-grid-alone", config.lora)
    set_state(model, "site-grid-alone", start)
    paris = next(s for s in load_sites(config.data) if s.site_id == "paris")
    alone = train_adapter(model, "site-grid-alone", base.tokenizer, paris.train, config.train, seed=1).state

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
    assert grid.train_downlink == {"bytes_down_wire": 2 * 48, "bytes_down_unshared": 3 * 48}
    assert sorted(r.content["echo"]["site"] for r in replies) == ["lyon", "nice", "paris"]
