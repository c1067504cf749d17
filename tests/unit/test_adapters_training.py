"""fed_netgpt/model/adapters.py and the reference loop on the tiny random model: state I/O, training, peft
compatibility."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from unittest import mock

import numpy as np
import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from fed_netgpt.data.schema import DataError
from fed_netgpt.evaluation.scoring import completion_loss, generate_completions
from fed_netgpt.model.adapters import (
    AdapterError,
    attach_adapter,
    get_state,
    load_adapter,
    read_adapter,
    save_adapter,
    set_state,
)
from fed_netgpt.model.base import cache_root, tiny_random_folder
from fed_netgpt.model.prompting import chat_prompt, encode_pair
from fed_netgpt.training.batches import batches, collate
from fed_netgpt.training.engine import precision_for
from fed_netgpt.training.losses import token_losses
from fed_netgpt.training.reference import train_adapter
from tests.states import l2_distance

# 2 layers x (q, k, v, o) x (A, B); hidden 64, 4 heads of 16, 2 key/value heads -> k, v project to 32.
EXPECTED_SHAPES = {
    f"base_model.model.model.layers.{layer}.self_attn.{module}.lora_{ab}.weight": shape
    for layer in (0, 1)
    for module, out in (("q_proj", 64), ("k_proj", 32), ("v_proj", 32), ("o_proj", 64))
    for ab, shape in (("A", (8, 64)), ("B", (out, 8)))
}



def _snapshot(model, name: str) -> dict[str, np.ndarray]:
    """A copy of the adapter's state."""
    return {k: v.copy() for k, v in get_state(model, name).items()}


def _random_state(like: dict[str, np.ndarray], seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {k: rng.normal(0.0, 0.1, v.shape).astype(np.float32) for k, v in like.items()}


@pytest.fixture
def fast_train(default_config):
    """fp32 (exact and reproducible), small batches; tests change steps, lr and mu."""
    return replace(default_config.train, batch_size=2, bf16=False, learning_rate=1e-2)


# ---- state I/O -------------------------------------------------------------------------------


def test_fresh_adapter_has_lora_shapes_zero_b_and_seeded_a(tiny_base, default_config, adapter_name):
    # Execute
    first = get_state(attach_adapter(tiny_base, adapter_name, default_config.lora, seed=0), adapter_name)
    second = get_state(attach_adapter(tiny_base, adapter_name + "_2", default_config.lora, seed=0), adapter_name + "_2")

    # Assert
    assert {k: v.shape for k, v in first.items()} == EXPECTED_SHAPES
    assert all(v.dtype == np.float32 for v in first.values())
    for key, value in first.items():
        if ".lora_B." in key:
            assert not value.any(), key  # peft starts B at zero: the adapter is a no-op at first
        else:
            assert np.abs(value).sum() > 0, key
        np.testing.assert_array_equal(value, second[key])  # every region starts from the same adapter


def test_attach_adapter_twice_returns_the_existing_adapter(tiny_base, default_config, adapter_name):
    # Prepare
    model = attach_adapter(tiny_base, adapter_name, default_config.lora)
    state = _random_state(get_state(model, adapter_name), seed=1)
    set_state(model, adapter_name, state)

    # Execute
    again = attach_adapter(tiny_base, adapter_name, default_config.lora, seed=123)

    # Assert
    assert again is model
    assert again.active_adapter == adapter_name
    np.testing.assert_array_equal(get_state(again, adapter_name)[next(iter(state))], next(iter(state.values())))


def test_get_state_set_state_round_trip(tiny_base, default_config, adapter_name):
    # Prepare
    model = attach_adapter(tiny_base, adapter_name, default_config.lora)
    state = _random_state(get_state(model, adapter_name), seed=2)

    # Execute
    set_state(model, adapter_name, state)
    restored = get_state(model, adapter_name)

    # Assert
    assert restored.keys() == state.keys()
    for key, value in state.items():
        np.testing.assert_array_equal(restored[key], value)


def test_get_state_is_a_snapshot_not_a_view_of_the_weights(tiny_base, default_config, adapter_name):
    # Prepare
    model = attach_adapter(tiny_base, adapter_name, default_config.lora)
    state = get_state(model, adapter_name)
    copied = {k: v.copy() for k, v in state.items()}

    # Execute: any later change of the adapter, e.g. an optimizer step
    set_state(model, adapter_name, _random_state(state, seed=9))

    # Assert
    for key, value in copied.items():
        np.testing.assert_array_equal(state[key], value)


def _broken(state: dict[str, np.ndarray], how: str) -> dict[str, np.ndarray]:
    broken = {k: v.copy() for k, v in state.items()}
    key = sorted(broken)[0]
    if how == "missing":
        del broken[key]
    elif how == "extra":
        broken["base_model.model.lm_head.lora_A.weight"] = np.zeros((8, 64), dtype=np.float32)
    elif how == "shape":
        broken[key] = np.zeros((4, 64), dtype=np.float32)
    elif how == "nan":
        broken[key][0, 0] = np.nan
    elif how == "inf":
        broken[key][1, 2] = np.inf
    return broken


@pytest.mark.parametrize(
    ("how", "pattern"),
    [
        ("missing", "adapter is missing 1 tensor"),
        ("extra", "adapter has 1 unexpected tensor"),
        ("shape", r"has shape \(4, 64\), expected \(8, 64\)"),
        ("nan", "holds NaN or infinite values"),
        ("inf", "holds NaN or infinite values"),
    ],
)
def test_set_state_rejects_a_bad_state_and_changes_nothing(tiny_base, default_config, adapter_name, how, pattern):
    # Prepare
    model = attach_adapter(tiny_base, adapter_name, default_config.lora)
    good = _random_state(get_state(model, adapter_name), seed=3)
    set_state(model, adapter_name, good)
    bad = _broken(_random_state(good, seed=4), how)

    # Execute / Assert
    with pytest.raises(AdapterError, match=pattern):
        set_state(model, adapter_name, bad)
    after = get_state(model, adapter_name)
    for key, value in good.items():
        np.testing.assert_array_equal(after[key], value)


# ---- collate ---------------------------------------------------------------------------------


def test_collate_masks_prompts_and_ends_each_row_with_end_of_turn(tiny_base, paris_train_pairs):
    # Prepare
    tokenizer = tiny_base.tokenizer
    pairs = [paris_train_pairs[0], paris_train_pairs[5], paris_train_pairs[20]]
    eos = tokenizer.eos_token_id

    # Execute
    batch = collate(tokenizer, pairs, max_length=128)

    # Assert
    lengths = []
    for row, pair in enumerate(pairs):
        prompt_ids = tokenizer(chat_prompt(tokenizer, pair.context, pair.prompt), add_special_tokens=False)["input_ids"]
        completion_ids = tokenizer(pair.completion, add_special_tokens=False)["input_ids"] + [eos]
        n = len(prompt_ids) + len(completion_ids)
        lengths.append(n)
        labels, ids, mask = batch["labels"][row], batch["input_ids"][row], batch["attention_mask"][row]
        assert ids[:n].tolist() == prompt_ids + completion_ids
        assert (labels[: len(prompt_ids)] == -100).all()
        assert labels[len(prompt_ids) : n].tolist() == completion_ids
        assert mask[:n].sum() == n and mask[n:].sum() == 0
        assert (labels[n:] == -100).all() and (ids[n:] == tokenizer.pad_token_id).all()
        kept = labels[labels != -100]
        assert kept[-1].item() == eos
    assert batch["input_ids"].shape == batch["labels"].shape == (3, max(lengths))
    assert batch["input_ids"].dtype == torch.long


def test_a_pair_is_tokenized_once_and_kept_for_the_next_rounds(tiny_base, paris_train_pairs):
    # Prepare: pairs no other test has encoded, and a count of the tokenizations
    pairs = [replace(p, prompt=f"{p.prompt} (kept)") for p in paris_train_pairs[:3]]
    calls = []

    def counted(*args):
        calls.append(args)
        return encode_pair(*args)

    # Execute
    with mock.patch("fed_netgpt.training.batches.encode_pair", side_effect=counted):
        first = collate(tiny_base.tokenizer, pairs, max_length=128)
        again = collate(tiny_base.tokenizer, pairs, max_length=128)
        collate(tiny_base.tokenizer, pairs[:1], max_length=256)

    # Assert: each pair once, and once more under another max_length; the same batch both times
    assert len(calls) == 4
    assert all(torch.equal(first[key], again[key]) for key in first)


def test_a_pair_longer_than_max_length_is_a_clear_error(tiny_base, paris_train_pairs):
    # Prepare
    tokenizer = tiny_base.tokenizer
    pair = paris_train_pairs[0]
    full = collate(tokenizer, [pair], max_length=10_000)["input_ids"].shape[1]

    # Execute / Assert: a cut would silently drop the end-of-turn label
    assert collate(tokenizer, [pair], max_length=full)["input_ids"].shape == (1, full)
    with pytest.raises(DataError, match=f"is {full} tokens .* more than train.max_length={full - 5}"):
        collate(tokenizer, [pair], max_length=full - 5)


def test_batches_visit_every_pair_once_per_epoch():
    # Prepare
    pairs = list(range(7))

    # Execute
    stream = batches(pairs, batch_size=3, seed=5)
    epoch = [next(stream) for _ in range(3)]
    again = batches(pairs, batch_size=3, seed=5)

    # Assert
    assert [len(b) for b in epoch] == [3, 3, 1]
    assert sorted(x for b in epoch for x in b) == pairs
    assert [next(again) for _ in range(3)] == epoch


# ---- training --------------------------------------------------------------------------------


def test_train_adapter_three_steps_changes_only_the_active_adapter(
    tiny_base, default_config, adapter_name, paris_train_pairs
):
    # Prepare: the default (bf16 autocast) training config, 3 steps
    other = attach_adapter(tiny_base, adapter_name + "_other", default_config.lora)
    set_state(other, adapter_name + "_other", _random_state(get_state(other, adapter_name + "_other"), seed=5))
    other_before = _snapshot(other, adapter_name + "_other")
    model = attach_adapter(tiny_base, adapter_name, default_config.lora)  # now the active adapter
    before = _snapshot(model, adapter_name)
    config = replace(default_config.train, local_steps=3, batch_size=4)

    # Execute
    result = train_adapter(model, adapter_name, tiny_base.tokenizer, paris_train_pairs[:6], config)

    # Assert
    after = get_state(model, adapter_name)
    assert l2_distance(before, after) > 0
    assert all(np.abs(v).sum() > 0 for k, v in after.items() if ".lora_B." in k)  # B left zero
    for key, value in after.items():
        np.testing.assert_array_equal(result.state[key], value)
    for key, value in get_state(other, adapter_name + "_other").items():
        np.testing.assert_array_equal(value, other_before[key])
    assert result.num_examples == 6
    assert result.metrics["steps"] == 3.0
    assert set(result.metrics) == {"train_loss", "train_loss_last", "train_seconds", "steps", "bf16"}
    first = collate(tiny_base.tokenizer, paris_train_pairs[:4], config.max_length)
    assert result.metrics["bf16"] == float(precision_for(config, model, first).bf16)  # the process's one choice
    assert math.isfinite(result.metrics["train_loss"]) and result.metrics["train_loss"] > 0
    assert not model.training  # left in eval mode


def test_train_adapter_lowers_loss_on_its_training_pairs(
    tiny_base, default_config, adapter_name, paris_train_pairs, fast_train
):
    # Prepare
    model = attach_adapter(tiny_base, adapter_name, default_config.lora)
    pairs = paris_train_pairs[:4]
    before = completion_loss(model, tiny_base.tokenizer, pairs)

    # Execute
    result = train_adapter(model, adapter_name, tiny_base.tokenizer, pairs, replace(fast_train, local_steps=20))
    after = completion_loss(model, tiny_base.tokenizer, pairs)

    # Assert
    assert after < before - 0.1
    assert result.metrics["train_loss_last"] < before


def test_train_adapter_is_reproducible_with_the_same_seed(
    tiny_base, default_config, adapter_name, paris_train_pairs, fast_train
):
    # Prepare
    config = replace(fast_train, local_steps=3)

    # Execute: train_adapter trains the active adapter, so attach (activate) right before each run
    first = attach_adapter(tiny_base, adapter_name + "_a", default_config.lora)
    a = train_adapter(first, adapter_name + "_a", tiny_base.tokenizer, paris_train_pairs, config, seed=7)
    second = attach_adapter(tiny_base, adapter_name + "_b", default_config.lora)
    b = train_adapter(second, adapter_name + "_b", tiny_base.tokenizer, paris_train_pairs, config, seed=7)

    # Assert
    assert a.metrics["train_loss"] == b.metrics["train_loss"]
    assert a.state is not b.state
    for key in a.state:
        np.testing.assert_array_equal(a.state[key], b.state[key])


def test_proximal_term_keeps_weights_closer_to_the_start(
    tiny_base, default_config, adapter_name, paris_train_pairs, fast_train
):
    # Prepare: identical (seeded) starts, identical batches; only mu differs
    start = _snapshot(attach_adapter(tiny_base, adapter_name + "_mu10", default_config.lora), adapter_name + "_mu10")

    # Execute
    results = {}
    for mu in (0.0, 10.0):
        name = f"{adapter_name}_mu{mu:g}"
        model = attach_adapter(tiny_base, name, default_config.lora)
        config = replace(fast_train, local_steps=8, proximal_mu=mu)
        results[mu] = train_adapter(model, name, tiny_base.tokenizer, paris_train_pairs, config)
    free, pulled = results[0.0], results[10.0]

    # Assert
    assert math.isfinite(pulled.metrics["train_loss"])
    assert math.isfinite(free.metrics["train_loss"])
    assert 0 < l2_distance(start, pulled.state) < 0.8 * l2_distance(start, free.state)


def test_ffa_training_leaves_lora_a_at_its_start_and_moves_b(tiny_base, default_config, adapter_name,
                                                             paris_train_pairs):
    # Prepare
    model = attach_adapter(tiny_base, adapter_name, default_config.lora)
    before = get_state(model, adapter_name)
    config = replace(default_config.train, local_steps=2, batch_size=2)

    # Execute
    result = train_adapter(model, adapter_name, tiny_base.tokenizer, paris_train_pairs[:4], config, freeze_lora_a=True)

    # Assert
    for key, value in result.state.items():
        if ".lora_A." in key:
            np.testing.assert_array_equal(value, before[key])
        else:
            assert np.abs(value - before[key]).max() > 0, key


def test_train_adapter_needs_pairs(tiny_base, default_config, adapter_name):
    # Prepare
    model = attach_adapter(tiny_base, adapter_name, default_config.lora)

    # Execute / Assert
    with pytest.raises(ValueError, match="at least one training pair"):
        train_adapter(model, adapter_name, tiny_base.tokenizer, [], default_config.train)


# ---- save / load, peft compatibility ---------------------------------------------------------


@pytest.fixture
def trained_adapter_folder(tiny_base, default_config, adapter_name, paris_train_pairs, fast_train, tmp_path):
    """An adapter trained a few steps (B != 0), saved with save_adapter."""
    model = attach_adapter(tiny_base, adapter_name, default_config.lora)
    result = train_adapter(
        model,
        adapter_name,
        tiny_base.tokenizer,
        paris_train_pairs,
        replace(fast_train, local_steps=4, learning_rate=5e-2),
    )
    return save_adapter(model, adapter_name, tmp_path / "adapter"), result.state


def test_save_adapter_writes_peft_files(trained_adapter_folder):
    # Prepare
    folder, state = trained_adapter_folder

    # Execute
    config, loaded = read_adapter(folder)

    # Assert
    assert sorted(p.name for p in folder.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    assert json.loads((folder / "adapter_config.json").read_text())["peft_type"] == "LORA"
    assert config["r"] == 8 and config["lora_alpha"] == 16
    assert sorted(config["target_modules"]) == ["k_proj", "o_proj", "q_proj", "v_proj"]
    assert loaded.keys() == state.keys()
    for key, value in state.items():
        np.testing.assert_array_equal(loaded[key], value)


def test_stock_peft_loads_the_adapter_like_load_adapter(tiny_base, trained_adapter_folder, adapter_name):
    # Prepare
    folder, _ = trained_adapter_folder
    tokenizer = tiny_base.tokenizer
    fresh = AutoModelForCausalLM.from_pretrained(tiny_random_folder(cache_root()), dtype=torch.float32)
    stock = PeftModel.from_pretrained(fresh, str(folder))
    stock.eval()
    ours = load_adapter(tiny_base, adapter_name + "_loaded", folder)
    encoded = tokenizer(
        [chat_prompt(tokenizer, "site: Paris", "Call me a taxi.")], return_tensors="pt", add_special_tokens=False
    )
    items = [("site: Paris", "Call me a taxi."), ("site: Lyon", "Find an art museum.")]

    # Execute
    with torch.no_grad():
        stock_logits = stock(**encoded).logits
        our_logits = ours(**encoded).logits
        with ours.disable_adapter():
            base_logits = ours(**encoded).logits
    stock_text = generate_completions(stock, tokenizer, items, max_new_tokens=6)
    our_text = generate_completions(ours, tokenizer, items, max_new_tokens=6)

    # Assert
    assert ours.active_adapter == adapter_name + "_loaded"
    torch.testing.assert_close(stock_logits, our_logits, atol=1e-5, rtol=0)
    assert (our_logits - base_logits).abs().max() > 1e-3  # the trained adapter does change the output
    assert stock_text == our_text


def test_read_adapter_names_the_missing_file(tmp_path):
    # Prepare
    (tmp_path / "adapter_config.json").write_text("{}")

    # Execute / Assert
    with pytest.raises(AdapterError, match="adapter_model.safetensors is missing"):
        read_adapter(tmp_path)


def test_load_adapter_of_another_shape_names_the_folder(tiny_base, default_config, adapter_name, tmp_path):
    # Prepare: a saved rank-8 adapter whose tensors were cut to rank 4
    model = attach_adapter(tiny_base, adapter_name, default_config.lora)
    state = get_state(model, adapter_name)
    cut = {k: (v[:4] if ".lora_A." in k else v[:, :4]) for k, v in state.items()}
    folder = save_adapter(model, adapter_name, tmp_path / "cut", state=cut)

    # Execute / Assert
    with pytest.raises(AdapterError, match=f"{folder}: tensor .* has shape"):
        load_adapter(tiny_base, adapter_name + "_cut", folder)


def test_token_losses_score_each_next_token_where_the_labels_count():
    # Prepare: 2 rows of 4 positions over a 5-token vocabulary; row 0 counts positions 2..3, row 1 only 3
    torch.manual_seed(0)
    logits = torch.randn(2, 4, 5)
    labels = torch.tensor([[-100, -100, 3, 1], [-100, -100, -100, 4]])

    # Execute
    losses, counted = token_losses(logits, labels)

    # Assert: position t predicts token t + 1; the last position predicts nothing
    expected = torch.zeros(2, 4)
    for row, col in [(0, 1), (0, 2), (1, 2)]:
        expected[row, col] = -torch.log_softmax(logits[row, col], dim=-1)[labels[row, col + 1]]
    assert counted.tolist() == [[False, True, True, False], [False, False, True, False]]
    torch.testing.assert_close(losses * counted, expected)
