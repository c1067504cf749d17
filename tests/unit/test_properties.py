"""Property-based tests (hypothesis): random and truncated input to the JSONL loader, the config loader and the
update validator never escapes as an unhandled exception; each test counts the cases it ran."""

from __future__ import annotations

import json
import math
import tempfile
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fed_netgpt.config import Config, ConfigError, load_config, scalar_defaults
from fed_netgpt.data.schema import DataError, read_jsonl
from strategies.groups import GroupStrategy
from strategies.registry import make_strategy
from tests.messages import (  # noqa: F401 - server_identity is a fixture
    NODE_REGIONS,
    SHAPES,
    ConnectedNodesGrid,
    instruction,
    merged,
    server_identity,
    state_of,
)

pytestmark = pytest.mark.usefixtures("server_identity")
CASES = 200
GOOD = {"site_id": "lyon", "region": "france", "prompt": "Call me a taxi.",
        "completion": "I am in Lyon, France. Call me a taxi.", "facts": ["Lyon", "France"], "split": "test"}
VALID_FILE = ("\n".join(json.dumps({**GOOD, "site_id": f"site-{k}"}, ensure_ascii=False) for k in range(3)) + "\n"
              ).encode()
PROFILE = settings(max_examples=CASES, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def read_bytes(data: bytes) -> str:
    """read_jsonl on `data`: "ok" or "DataError"; anything else propagates and fails the property."""
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "d.jsonl"
        path.write_bytes(data)
        try:
            read_jsonl(path)
            return "ok"
        except DataError:
            return "DataError"


def test_random_and_truncated_jsonl_is_read_or_refused_with_a_data_error() -> None:
    seen: list[str] = []

    @PROFILE
    @given(st.one_of(st.binary(max_size=300), st.integers(0, len(VALID_FILE)).map(lambda k: VALID_FILE[:k]),
                     st.tuples(st.integers(0, len(VALID_FILE) - 1), st.binary(min_size=1, max_size=4))
                     .map(lambda cut: VALID_FILE[:cut[0]] + cut[1] + VALID_FILE[cut[0] + 1:])))
    def prop(data: bytes) -> None:
        seen.append(read_bytes(data))

    prop()
    assert len(seen) == CASES and {"ok", "DataError"} <= set(seen)


KEYS = sorted(scalar_defaults(load_config())) + ["lora.target_modules", "data.countries", "nosuch.key", "federation"]
VALUES = st.one_of(st.text(max_size=12), st.integers(-10**6, 10**6).map(str), st.floats().map(str),
                   st.sampled_from(["inf", "-inf", "nan", "[]", "[1,", "{a: 1}", "true", "''", "null", "[FR,XX]"]))


def test_random_overrides_are_applied_or_refused_with_a_config_error() -> None:
    outcomes: list[str] = []

    @PROFILE
    @given(st.lists(st.one_of(st.tuples(st.sampled_from(KEYS), VALUES).map(lambda kv: f"{kv[0]}={kv[1]}"),
                              st.text(max_size=20)), max_size=4))
    def prop(overrides: list[str]) -> None:
        try:
            load_config(overrides=overrides)
            outcomes.append("ok")
        except ConfigError:
            outcomes.append("ConfigError")

    prop()
    assert len(outcomes) == CASES and {"ok", "ConfigError"} <= set(outcomes)


ANY_FLOAT = st.floats(allow_nan=True, allow_infinity=True, width=32)


def arrays_of(shape: tuple[int, ...], values=ANY_FLOAT):
    return st.lists(values, min_size=int(np.prod(shape)), max_size=int(np.prod(shape))).map(
        lambda found: np.asarray(found, dtype=np.float32).reshape(shape))


COUNTS = st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(-5, 10**9))
LOSSES = st.floats(allow_nan=True, allow_infinity=True)
# A well-formed reply (the region's keys and shapes, finite values, any example count and loss), one with NaN,
# inf or huge values in its arrays, ...
WELL_FORMED, NON_FINITE = (st.fixed_dictionaries({
    "arrays": st.fixed_dictionaries({key: arrays_of(shape, values) for key, shape in SHAPES.items()}),
    "count": COUNTS, "loss": LOSSES}) for values in (st.floats(-10, 10, width=32), ANY_FLOAT))
# ... or anything: other keys, other shapes
MALFORMED = st.fixed_dictionaries({
    "arrays": st.dictionaries(st.sampled_from([*SHAPES, "lora_C.weight", "other"]),
                              st.sampled_from([(2, 3), (3, 2), (2, 2), (0,), (1, 2, 3)]).flatmap(arrays_of),
                              max_size=3),
    "count": COUNTS, "loss": LOSSES})
REPLY = st.one_of(WELL_FORMED, WELL_FORMED, NON_FINITE, MALFORMED)


def test_random_updates_never_break_aggregation_and_never_reach_an_adapter_unchecked() -> None:
    runs: list[int] = []

    @PROFILE
    @given(st.lists(REPLY, min_size=3, max_size=3))
    def prop(replies: list[dict]) -> None:
        strategy = GroupStrategy(lambda n: make_strategy(Config(), n), NODE_REGIONS, max_update_norm=100.0)
        strategy.configure_train(1, merged({"france": state_of(0.0), "japan": state_of(10.0)}), ConfigRecord({}),
                                 ConnectedNodesGrid(NODE_REGIONS))
        messages = []
        for node, reply in zip(NODE_REGIONS, replies):
            arrays = ArrayRecord({key: Array(array) for key, array in reply["arrays"].items()})
            metrics = MetricRecord({"num-examples": reply["count"], "train_loss": reply["loss"]})
            messages.append(Message(RecordDict({"arrays": arrays, "metrics": metrics}), reply_to=instruction(node)))
        arrays, metrics = strategy.aggregate_train(1, messages)
        result = {key: record.numpy() for key, record in arrays.items()}
        assert all(np.all(np.isfinite(value)) for value in result.values())  # a region's adapter stays finite
        assert {key.split("/", 1)[1]: value.shape for key, value in result.items()} == SHAPES
        assert all(math.isfinite(value) for value in dict(metrics).values())
        runs.append(sum(key.endswith("/num-examples") for key in dict(metrics)))  # regions that took an update

    prop()
    assert len(runs) == CASES and sum(runs) > CASES // 4  # many cases really aggregated
