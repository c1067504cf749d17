"""Flower messages and a node grid for strategy tests: small adapter states, replies as nodes send them."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from tests.grids import UnusedTransportGrid

NODE_REGIONS = {11: "france", 12: "france", 21: "japan"}
SHAPES = {"lora_A.weight": (2, 3), "lora_B.weight": (3, 2)}


class ConnectedNodesGrid(UnusedTransportGrid):
    """Transport double: only `get_node_ids` is needed by configure_*; nothing is sent anywhere."""

    def __init__(self, node_ids: Iterable[int]) -> None:
        self.node_ids = list(node_ids)

    def get_node_ids(self) -> Iterable[int]:
        return list(self.node_ids)


@pytest.fixture
def server_identity(monkeypatch):
    """Instructions carry the sender's identity; the ServerApp runtime sets it (here: the SuperLink node).
    Use it with `pytestmark = pytest.mark.usefixtures("server_identity")`."""
    monkeypatch.setattr(TaskIdentity, "_task_id", 1)
    monkeypatch.setattr(TaskIdentity, "_run_id", 42)
    monkeypatch.setattr(TaskIdentity, "_node_id", 1)


def state_of(value: float, shapes: dict[str, tuple[int, ...]] = SHAPES) -> dict[str, np.ndarray]:
    return {key: np.full(shape, value, dtype=np.float32) for key, shape in shapes.items()}


def record(state: dict[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({key: Array(np.ascontiguousarray(v)) for key, v in state.items()})


def merged(states: dict[str, dict[str, np.ndarray]]) -> ArrayRecord:
    return record({f"{region}/{key}": v for region, state in states.items() for key, v in state.items()})


def numpy_of(arrays: ArrayRecord) -> dict[str, np.ndarray]:
    return {key: array.numpy() for key, array in arrays.items()}


def instruction(node: int) -> Message:
    return Message(RecordDict({}), dst_node_id=node, message_type=MessageType.TRAIN)


def reply(node: int, state: dict[str, np.ndarray], num_examples: int, loss: float) -> Message:
    content = RecordDict(
        {"arrays": record(state), "metrics": MetricRecord({"train_loss": loss, "num-examples": num_examples})}
    )
    return Message(content, reply_to=instruction(node))


def round_outcome(strategy, server_round: int = 1):
    """What `strategy` hands over at the end of the round in progress (`GroupStrategy.round_end`)."""
    received = []
    strategy.round_end(received.append)(server_round, ArrayRecord())
    return received[0]
