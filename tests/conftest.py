"""Shared fixtures: one tiny random base model per session, the default config and its prompt pairs."""

from __future__ import annotations

import itertools
import random

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from fed_netgpt.config import Config, load_config
from fed_netgpt.data.geography import select_sites
from fed_netgpt.data.prompts import build_pairs
from fed_netgpt.data.schema import PromptPair
from fed_netgpt.model.base import BaseModel, cache_root, load_base, tiny_random_folder

_ADAPTER_NUMBERS = itertools.count()


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--order", default="file", help="file (default) | reverse | shuffle:SEED: run the collected "
                     "tests in another order, to show that none depends on what ran before it")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    order = config.getoption("--order")
    if order == "reverse":
        items.reverse()
    elif order.startswith("shuffle:"):
        random.Random(int(order.removeprefix("shuffle:"))).shuffle(items)
    elif order != "file":
        raise pytest.UsageError(f"--order must be file, reverse or shuffle:SEED; got {order!r}")


@pytest.fixture(autouse=True)
def _one_torch_thread_in_unit_tests(request: pytest.FixtureRequest):
    """Unit tests run torch on one thread: on a 2-core machine shared with other work, a second
    intra-op thread mostly spins waiting for the busy core (measured: ~30x slower training steps).
    Integration and slow tests keep torch's default."""
    if "unit" not in request.node.path.parts:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_base() -> BaseModel:
    """The process-wide tiny random LLaMA (2 layers, 64 wide, SmolLM2 tokenizer)."""
    return load_base("tiny-random")


@pytest.fixture(scope="module")
def base64() -> BaseModel:
    """A float64 copy of the tiny random LLaMA, apart from the session's shared base (one per test module)."""
    folder = tiny_random_folder(cache_root())
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float64).requires_grad_(False).eval()
    return BaseModel(model=model, tokenizer=AutoTokenizer.from_pretrained(folder), name="tiny-random-fp64")


@pytest.fixture(scope="session")
def default_config() -> Config:
    return load_config()


@pytest.fixture(scope="session")
def default_pairs(default_config: Config) -> list[PromptPair]:
    """Pairs built from the default geography (9 training + 3 held-out sites in France, Japan and Brazil)."""
    return build_pairs(select_sites(default_config.data), default_config.data)


@pytest.fixture(scope="session")
def paris_train_pairs(default_pairs: list[PromptPair]) -> list[PromptPair]:
    return [p for p in default_pairs if p.site_id == "paris" and p.split == "train"]


@pytest.fixture
def adapter_name(request: pytest.FixtureRequest) -> str:
    """A fresh adapter name per test: adapters live on the shared base for the whole session."""
    safe = "".join(ch if ch.isalnum() else "_" for ch in request.node.name)[:40]
    return f"t{next(_ADAPTER_NUMBERS)}_{safe}"
