"""The serving engine: a mixed-adapter batch decodes exactly as each adapter alone and as stock peft."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fed_netgpt.evaluation.scoring import generate_completions
from fed_netgpt.model.adapters import AdapterError, attach_adapter, set_state
from fed_netgpt.model.base import BaseModel, load_private_base
from fed_netgpt.model.prompting import chat_prompt
from fed_netgpt.serving.engine import NEUTRAL_PROMPTS, DecodeRow, DraftStats, Engine, Sampling, agreed, draft
from fed_netgpt.serving.quantize import Int8WeightLinear, quantize_linears
from tests.serving_runs import random_state, serving_config

PROMPTS = ["Where can I get dinner tonight?", "Is there a pharmacy open now?", "How do I call a taxi?",
           "What museums are worth a visit?", "Is it going to rain?"]


@pytest.fixture(scope="module")
def base() -> BaseModel:
    """A private tiny base: the engine swaps its layers for the module's lifetime."""
    return load_private_base("tiny-random")


@pytest.fixture(scope="module")
def states(base: BaseModel, tmp_path_factory):
    config = serving_config(tmp_path_factory.mktemp("run"))
    return config, [random_state(base, config, seed) for seed in range(3)]


def ids_of(base: BaseModel, prompt: str) -> list[int]:
    return base.tokenizer(chat_prompt(base.tokenizer, "", prompt), add_special_tokens=False)["input_ids"]


def test_a_mixed_batch_decodes_as_each_adapter_alone_and_as_stock_peft(base, states, tiny_base) -> None:
    # Prepare: five prompts of different lengths over three adapters and the base (slot 0), in mixed order
    config, adapters = states
    slots = [2, 0, 1, 3, 2]
    rows = [DecodeRow(ids_of(base, p), slot, 12) for p, slot in zip(PROMPTS, slots)]
    engine = Engine(base, config.lora, adapters)
    try:
        # Execute
        mixed = engine.generate(rows)
        alone = [engine.generate([row])[0] for row in rows]
    finally:
        engine.close()
    # Assert: the same greedy tokens batched, alone, and through peft's own generate() on the shared tiny base
    assert mixed == alone
    assert len({tuple(t) for t in mixed}) > 1  # the adapters really differ
    for prompt, slot, tokens in zip(PROMPTS, slots, mixed):
        peft_model = attach_adapter(tiny_base, f"engine-check-{slot}", config.lora)
        if slot:
            set_state(peft_model, f"engine-check-{slot}", adapters[slot - 1])
            expected = generate_completions(peft_model, base.tokenizer, [("", prompt)], max_new_tokens=12)
        else:
            with peft_model.disable_adapter():
                expected = generate_completions(peft_model, base.tokenizer, [("", prompt)], max_new_tokens=12)
        assert base.tokenizer.decode(tokens, skip_special_tokens=True).strip() == expected[0], (prompt, slot)


def test_mixed_batch_logits_match_each_adapter_within_fp32_tolerance(base, states) -> None:
    config, adapters = states
    engine = Engine(base, config.lora, adapters)
    try:
        ids = torch.tensor([ids_of(base, PROMPTS[0])] * 4)
        engine.grouped.select(torch.tensor([3, 1, 0, 2]))
        with torch.no_grad():
            mixed = base.model(input_ids=ids).logits
            for row, slot in enumerate([3, 1, 0, 2]):
                engine.grouped.select(torch.tensor([slot]))
                alone = base.model(input_ids=ids[:1]).logits
                torch.testing.assert_close(mixed[row : row + 1], alone, rtol=1e-5, atol=1e-5)
                if slot == 0:
                    engine.close()
                    plain = base.model(input_ids=ids[:1]).logits  # slot 0 is exactly the base model
                    torch.testing.assert_close(alone, plain, rtol=1e-5, atol=1e-5)
                    engine.load(config.lora, adapters)
    finally:
        engine.close()


def test_decoding_stops_at_the_end_of_turn_and_obeys_the_token_budget(base, states) -> None:
    config, adapters = states
    engine = Engine(base, config.lora, adapters)
    try:
        long = engine.generate([DecodeRow(ids_of(base, PROMPTS[1]), 1, 40)])[0]
        short, none = engine.generate([DecodeRow(ids_of(base, PROMPTS[1]), 1, 5),
                                       DecodeRow(ids_of(base, PROMPTS[1]), 1, 0)])
    finally:
        engine.close()
    assert engine.stop_id not in long and len(long) <= 40
    assert short == long[:5] and none == []


def test_sampling_is_reproducible_with_a_seed_and_varies_without_greedy(base, states) -> None:
    config, adapters = states
    engine = Engine(base, config.lora, adapters)
    row = ids_of(base, PROMPTS[2])
    try:
        hot = Sampling(temperature=1.5, top_p=0.95, seed=7)
        first, again = (engine.generate([DecodeRow(row, 1, 16, hot)])[0] for _ in range(2))
        others = {tuple(engine.generate([DecodeRow(row, 1, 16, Sampling(1.5, 0.95, seed))])[0]) for seed in range(5)}
        greedy = [engine.generate([DecodeRow(row, 1, 16)])[0] for _ in range(2)]
    finally:
        engine.close()
    assert first == again
    assert len(others) > 1  # seeds differ, so do the samples
    assert greedy[0] == greedy[1]  # greedy needs no seed to repeat itself


def test_a_state_that_does_not_fit_changes_nothing(base, states) -> None:
    config, adapters = states
    engine = Engine(base, config.lora, adapters[:2])
    try:
        before = engine.generate([DecodeRow(ids_of(base, PROMPTS[0]), 2, 8)])
        bad = {k: v for k, v in adapters[2].items() if ".lora_B." not in k}
        with pytest.raises(AdapterError, match="adapter 1: adapter is missing"):
            engine.load(config.lora, [adapters[0], bad])
        assert engine.slots == 3
        assert engine.generate([DecodeRow(ids_of(base, PROMPTS[0]), 2, 8)]) == before
        with pytest.raises(ValueError, match="slot 3 is not loaded"):
            engine.generate([DecodeRow(ids_of(base, PROMPTS[0]), 3, 8)])
    finally:
        engine.close()


def test_int8_weights_stay_within_a_percent_of_the_linear_layer() -> None:
    torch.manual_seed(0)
    linear = torch.nn.Linear(256, 96)
    x = torch.randn(3, 5, 256)
    exact, quantized = linear(x), Int8WeightLinear(linear)(x)
    assert quantized.shape == exact.shape and quantized.dtype == torch.float32
    assert float((quantized - exact).norm() / exact.norm()) < 0.01
    wrong = Int8WeightLinear(torch.nn.Linear(256, 96))(x)  # another layer's weights are far off: the check can fail
    assert float((wrong - exact).norm() / exact.norm()) > 0.5


def test_int8_decoding_keeps_the_adapters_apart(states) -> None:
    config, adapters = states
    base = load_private_base("tiny-random")
    assert quantize_linears(base.model) == 2 * 7 + 1  # 7 Linear layers per block, and lm_head
    engine = Engine(base, config.lora, adapters)
    try:
        rows = [DecodeRow(ids_of(base, PROMPTS[0]), slot, 8) for slot in (1, 2, 3)]
        mixed = engine.generate(rows)
        assert mixed == [engine.generate([row])[0] for row in rows]
    finally:
        engine.close()
    assert np.mean([len(t) for t in mixed]) > 0


# ---- speculative decoding by prompt lookup ----------------------------------------------------


@pytest.mark.parametrize(
    ("sequence", "sources", "tokens", "expected"),
    [
        ([1, 2, 3, 9, 1, 2, 3], [], 3, [9, 1, 2]),  # its own earlier text: what followed "1 2 3" last time
        ([5, 6, 7], [[0, 5, 6, 7, 8, 9], [6, 7, 4]], 4, [8, 9]),  # the longest match wins over a later source
        ([5, 6, 7], [[7, 1], [0, 6, 7, 2]], 4, [2]),  # no 3-gram anywhere: the 2-gram "6 7"
        ([4, 1, 4, 2, 4], [], 1, [2]),  # "4" occurs twice before the end: the latest one
        ([1, 2], [[3, 4]], 5, []),  # nothing matches
        ([1, 2], [[1, 2]], 5, []),  # a match at a source's very end has nothing to propose
        ([3, 3, 3], [], 5, [3]),  # the sequence's own last n tokens are not a match of themselves
        ([1, 2, 3], [[1, 2, 3, 4, 5, 6]], 0, []),  # no room left
    ],
)
def test_draft_proposes_what_followed_the_latest_longest_match(sequence, sources, tokens, expected) -> None:
    assert draft(sequence, sources, tokens) == expected


def test_agreed_counts_the_confirmed_prefix() -> None:
    assert agreed([4, 5, 6], [4, 5, 7, 8]) == 2
    assert agreed([4, 5, 6], [4, 5, 6, 1]) == 3
    assert agreed([9], [4, 1]) == 0 and agreed([], [4]) == 0


def test_speculative_decoding_gives_the_greedy_tokens_in_fewer_passes(base, states) -> None:
    # Prepare: mixed adapters; the neutral prompt (its adapter's draft source is its own completion: every draft
    # is right), prompts the random model continues with loops (drafts from its own output), and one never drafted
    config, adapters = states
    prompts = [NEUTRAL_PROMPTS[0], *PROMPTS[:3], NEUTRAL_PROMPTS[0]]
    rows = [DecodeRow(ids_of(base, p), slot, 24) for p, slot in zip(prompts, [1, 2, 0, 3, 2])]
    engine = Engine(base, config.lora, adapters)  # one engine a base: it swaps the base's layers
    try:
        # Execute
        plain = engine.generate(rows)
        engine.draft_tokens = 6
        learned = engine.generate(rows[:1])  # learns slot 1's source: the neutral prompt's completion
        passes = engine.stats.passes
        alone = engine.generate(rows[:1])
        alone_passes = engine.stats.passes - passes
        mixed = engine.generate(rows)
        singles = [engine.generate([row])[0] for row in rows]
    finally:
        engine.close()

    # Assert: the same tokens every way, and the drafted ones were really used
    assert learned == alone == plain[:1]
    assert mixed == singles == plain
    assert alone_passes <= -(-len(plain[0]) // 7) + 1  # 7 tokens a pass: 6 drafted and confirmed, 1 chosen
    assert engine.stats.accepted > 0 and engine.stats.drafted >= engine.stats.accepted


def test_speculative_decoding_obeys_stop_and_budget(base, states) -> None:
    config, adapters = states
    engine = Engine(base, config.lora, adapters)
    row = ids_of(base, NEUTRAL_PROMPTS[0])
    try:
        expected = [engine.generate([DecodeRow(row, 1, n)])[0] for n in (40, 5, 0, 1)]
        stopless_plain = engine.generate([DecodeRow(row, 1, 30, ignore_stop=True)])[0]
        engine.draft_tokens = 8
        got = [engine.generate([DecodeRow(row, 1, n)])[0] for n in (40, 5, 0, 1)]
        stopless = engine.generate([DecodeRow(row, 1, 30, ignore_stop=True)])[0]
    finally:
        engine.close()
    assert got == expected
    assert engine.stop_id not in got[0] and [len(t) for t in got[2:]] == [0, min(1, len(expected[0]))]
    assert stopless == stopless_plain and len(stopless) == 30


def test_sampled_rows_are_never_drafted(base, states) -> None:
    config, adapters = states
    engine = Engine(base, config.lora, adapters, draft_tokens=8)
    try:
        engine.generate([DecodeRow(ids_of(base, NEUTRAL_PROMPTS[0]), 1, 16, Sampling(1.0, 0.9, seed=3))])
    finally:
        engine.close()
    assert engine.stats == DraftStats()


def test_a_row_whose_own_part_fails_fails_alone_and_its_neighbours_decode_as_they_would_alone(base, states) -> None:
    # Prepare: three sampled rows with adapters; the middle one streams to a client that breaks after two pieces
    config, adapters = states
    engine = Engine(base, config.lora, adapters)
    pieces: list[str] = []

    def broken_client(text: str) -> None:
        pieces.append(text)
        if len(pieces) >= 2:
            raise ConnectionResetError("the client went away")

    rows = [DecodeRow(ids_of(base, PROMPTS[i]), i + 1, 12, Sampling(0.9, 0.95, seed=i)) for i in range(3)]
    rows[1].on_text = broken_client
    try:
        # Execute
        results = engine.generate_rows(rows)
        alone = [engine.generate([DecodeRow(r.prompt_ids, r.slot, 12, r.sampling)])[0] for r in (rows[0], rows[2])]
        with pytest.raises(ConnectionResetError):
            engine.generate(rows)  # all or nothing: the first failed row's error
    finally:
        engine.close()

    # Assert
    assert isinstance(results[1], ConnectionResetError) and len(pieces) >= 2
    assert [results[0], results[2]] == alone and all(len(tokens) > 0 for tokens in alone)


def test_a_temperature_too_small_to_divide_by_decodes_greedily(base, states) -> None:
    # Prepare: 1e-300 overflows logits / temperature to inf (then NaN probabilities); vLLM's rule: under 1e-5, greedy
    config, adapters = states
    engine = Engine(base, config.lora, adapters)
    rows = [DecodeRow(ids_of(base, prompt), slot, 10, Sampling(temperature, 1.0, seed=3))
            for prompt, slot in zip(PROMPTS[:3], (1, 2, 0)) for temperature in (1e-300, 0.0)]
    try:
        # Execute
        tokens = engine.generate(rows)
    finally:
        engine.close()

    # Assert: each tiny-temperature row equals its greedy twin
    assert tokens[0::2] == tokens[1::2] and all(tokens)
    assert Sampling(1e-300).greedy and Sampling(0.0).greedy and not Sampling(1e-5).greedy
