"""fed_netgpt/evaluation.py: metric functions by hand, generation and loss on the tiny random model."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch

from fed_netgpt.adapters import attach_adapter, get_state, set_state
from fed_netgpt.data.schema import PromptPair
from fed_netgpt.evaluation import completion_loss, fact_accuracy, generate_completions, rouge_l, spread_over_sites
from fed_netgpt.prompting import chat_prompt
from fed_netgpt.training import collate

ITEMS = [("site: Paris", "Call me a taxi."), ("site: Osaka", "Find an art museum."), ("", "Hello?")]


@pytest.fixture
def random_adapter_model(tiny_base, default_config, adapter_name):
    """The tiny base with an adapter of random (non-zero) weights: greedy output is varied text."""
    model = attach_adapter(tiny_base, adapter_name, default_config.lora)
    rng = np.random.default_rng(0)
    state = {k: rng.normal(0.0, 0.5, v.shape).astype(np.float32) for k, v in get_state(model, adapter_name).items()}
    set_state(model, adapter_name, state)
    return model


# ---- metrics by hand -------------------------------------------------------------------------


def test_fact_accuracy_counts_case_insensitive_matches():
    # Execute / Assert
    assert fact_accuracy("I am in PARIS, France.", ["Paris", "France", "EUR"]) == pytest.approx(2 / 3)
    assert fact_accuracy("nothing here", ["Paris", "France"]) == 0.0
    assert fact_accuracy("Europe/Paris, EUR", ("europe/paris", "eur")) == 1.0
    assert fact_accuracy("anything", []) == 1.0


@pytest.mark.parametrize(
    ("prediction", "reference", "expected"),
    [
        ("a b c d", "a c d e", 0.75),  # LCS a c d = 3, P = 3/4, R = 3/4
        ("a b", "a b c d", 2 * 1.0 * 0.5 / 1.5),  # LCS 2, P = 1, R = 1/2
        ("A B C", "c b a", 1 / 3),  # LCS 1 (case-insensitive), P = R = 1/3
        ("x y", "a b", 0.0),
        ("same words here", "same  words\there", 1.0),  # whitespace tokens
        ("", "", 1.0),
        ("", "a", 0.0),
        ("a", "", 0.0),
    ],
)
def test_rouge_l_matches_hand_computed_f1(prediction, reference, expected):
    # Execute / Assert
    assert rouge_l(prediction, reference) == pytest.approx(expected)


def test_spread_over_sites_takes_round_robin_in_site_order():
    # Prepare: sites a(3), b(1), c(2), listed out of order
    def pair(site, n):
        return PromptPair(site_id=site, region="r", prompt=f"{site}{n}", completion="x")

    pairs = [pair("c", 1), pair("a", 1), pair("a", 2), pair("b", 1), pair("c", 2), pair("a", 3)]

    # Execute
    four = spread_over_sites(pairs, 4)
    everything = spread_over_sites(pairs, 10)

    # Assert
    assert [p.prompt for p in four] == ["a1", "b1", "c1", "a2"]
    assert [p.prompt for p in everything] == ["a1", "b1", "c1", "a2", "c2", "a3"]
    assert spread_over_sites(pairs, 0) == []
    assert spread_over_sites([], 5) == []


# ---- generation and loss on the tiny model ---------------------------------------------------


def _greedy_tokens(model, tokenizer, item, max_new_tokens):
    """Reference: the item alone through `generate`, no padding, no end-of-turn stop."""
    encoded = tokenizer([chat_prompt(tokenizer, *item)], return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        ids = model.generate(
            **encoded,
            max_new_tokens=max_new_tokens,
            min_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
        )
    return ids[0, encoded["input_ids"].shape[1] :].tolist()


def test_generate_completions_one_string_per_item_within_max_new_tokens(tiny_base, random_adapter_model):
    # Prepare
    tokenizer = tiny_base.tokenizer
    reference = [_greedy_tokens(random_adapter_model, tokenizer, item, 8) for item in ITEMS]
    assert all(tokenizer.eos_token_id not in tokens for tokens in reference)

    # Execute: 3 items in batches of 2 (left padding inside, restored afterwards)
    long = generate_completions(random_adapter_model, tokenizer, ITEMS, max_new_tokens=8, batch_size=2)
    short = generate_completions(random_adapter_model, tokenizer, ITEMS, max_new_tokens=3, batch_size=2)

    # Assert: exactly the first max_new_tokens greedy tokens of each item, unaffected by batching
    assert len(long) == len(short) == len(ITEMS)
    assert long == [tokenizer.decode(tokens).strip() for tokens in reference]
    assert short == [tokenizer.decode(tokens[:3]).strip() for tokens in reference]
    assert all(text for text in long)
    assert tokenizer.padding_side == "right"


def test_generate_completions_stops_at_the_end_of_turn_token(tiny_base, random_adapter_model):
    # Prepare: find the greedy tokens, then declare the 4th of them the end-of-turn token
    tokenizer = tiny_base.tokenizer
    new = _greedy_tokens(random_adapter_model, tokenizer, ITEMS[0], 8)
    assert new[3] not in new[:3]
    stopping = copy.deepcopy(tokenizer)
    stopping.eos_token = tokenizer.convert_ids_to_tokens(new[3])

    # Execute
    text = generate_completions(random_adapter_model, stopping, ITEMS[:1], max_new_tokens=8)[0]

    # Assert: generation ended at the stop token (kept in the text or not, as decoding treats it)
    assert text in (tokenizer.decode(new[:3]).strip(), tokenizer.decode(new[:4]).strip())
    assert len(text) < len(tokenizer.decode(new).strip())


def test_completion_loss_is_near_uniform_on_a_random_model(tiny_base, default_config, adapter_name, default_pairs):
    # Prepare: a fresh adapter has B = 0, so this is the random base: loss ~ ln(vocab)
    model = attach_adapter(tiny_base, adapter_name, default_config.lora)
    pairs = default_pairs[:3]

    # Execute
    loss = completion_loss(model, tiny_base.tokenizer, pairs, batch_size=2)

    # Assert
    assert math.isfinite(loss) and loss > 0
    assert loss == pytest.approx(math.log(len(tiny_base.tokenizer)), abs=0.5)


def test_completion_loss_is_a_per_token_mean_independent_of_batching(tiny_base, random_adapter_model, default_pairs):
    # Prepare
    pairs = [default_pairs[0], default_pairs[50], default_pairs[100]]
    tokenizer = tiny_base.tokenizer

    # Execute
    one_by_one = completion_loss(random_adapter_model, tokenizer, pairs, batch_size=1)
    together = completion_loss(random_adapter_model, tokenizer, pairs, batch_size=3)
    single = completion_loss(random_adapter_model, tokenizer, pairs[:1], batch_size=1)
    with torch.no_grad():
        reference = random_adapter_model(**collate(tokenizer, pairs[:1], 128)).loss.item()

    # Assert: for one pair it is the model's own (shifted, masked) cross-entropy
    assert one_by_one == pytest.approx(together, rel=1e-5)
    assert single == pytest.approx(reference, rel=1e-5)
    assert math.isfinite(together) and together > 0
