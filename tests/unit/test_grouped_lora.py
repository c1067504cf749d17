"""fed_netgpt/model/grouped_lora.py and the engine's grouped pass: many adapters in one pass equal each alone."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from peft import get_peft_model_state_dict

from fed_netgpt.model.adapters import AdapterError, attach_adapter, get_state, set_state
from fed_netgpt.model.grouped_lora import grouped_adapters
from fed_netgpt.training.batches import collate
from fed_netgpt.training.engine import SiteJob, _loss_metrics, train_sites
from fed_netgpt.training.losses import row_loss_sums, token_losses
from fed_netgpt.training.reference import train_adapter


@pytest.fixture(scope="module")
def site_pairs(default_pairs):
    """Three sites of different data; the last has fewer pairs (3) than a batch (4) holds."""
    train = [p for p in default_pairs if p.split == "train"]
    return [[p for p in train if p.site_id == s] for s in ("paris", "tokyo")] + [
        [p for p in train if p.site_id == "lyon"][:3]]


def _random_state(like: dict[str, np.ndarray], seed: int) -> dict[str, np.ndarray]:
    """A start with B != 0, so both factors get gradients from the first step."""
    rng = np.random.default_rng(seed)
    return {k: rng.normal(0.0, 0.05, v.shape) for k, v in like.items()}


def _one_by_one(base, lora, train, sites, starts, seeds, name, freeze_lora_a=False):
    model = attach_adapter(base, name, lora)
    states = []
    for pairs, start, seed in zip(sites, starts, seeds):
        set_state(model, name, start)
        train_adapter(model, name, base.tokenizer, pairs, train, seed=seed, freeze_lora_a=freeze_lora_a)
        states.append({k: v.detach().numpy().copy()  # float64, not get_state's float32
                       for k, v in get_peft_model_state_dict(model, adapter_name=name).items()})
    return model, states


@pytest.mark.parametrize("case", ["adamw", "fedprox", "ffa", "weight-decay"])
def test_grouped_training_equals_each_site_trained_alone_in_float64(base64, site_pairs, default_config, case):
    # Prepare: three sites from different random starts, 3 AdamW steps of 4 rows each (the small site: 3 rows)
    lora = default_config.lora
    train = replace(default_config.train, batch_size=4, local_steps=3, bf16="false", learning_rate=1e-2,
                    proximal_mu=1.0 if case == "fedprox" else 0.0,
                    weight_decay=0.1 if case == "weight-decay" else 0.0)
    like = get_state(attach_adapter(base64, "shape", lora), "shape")
    starts = [_random_state(like, seed) for seed in (1, 2, 3)]
    seeds = [5, 6, 7]
    ffa = case == "ffa"
    # Execute
    model, alone = _one_by_one(base64, lora, train, site_pairs, starts, seeds, f"alone-{case}", ffa)
    together = train_sites(base64, [SiteJob(f"site{k}", pairs, start, seed=seed)
                                    for k, (pairs, start, seed) in enumerate(zip(site_pairs, starts, seeds))],
                           lora, train, freeze_lora_a=ffa)
    # Assert: every site's adapter is the one it gets alone (most weights agree to 1e-14; LLaMA's RMSNorm runs in
    # float32 even in a float64 model, and Adam's g / (sqrt(v) + eps) magnifies that rounding where a gradient is
    # near zero, up to 1e-10; float32 master weights would miss by 6e-8)
    for k, result in enumerate(together):
        assert result.state.keys() == alone[k].keys()
        for key in alone[k]:
            np.testing.assert_allclose(result.state[key], alone[k][key], rtol=0, atol=1e-9, err_msg=key)
        moved = max(np.abs(alone[k][key] - starts[k][key]).max() for key in starts[k] if ".lora_B." in key)
        assert moved > 1e-3
        if ffa:
            assert all(np.array_equal(result.state[key], starts[k][key]) for key in starts[k] if ".lora_A." in key)
    assert [r.num_examples for r in together] == [len(p) for p in site_pairs]
    # the peft model on the same base is back as it was: its adapter still answers
    assert type(model.get_base_model().model.layers[0].self_attn.q_proj).__name__ == "Linear"
    assert hasattr(model.get_base_model().model.layers[0].self_attn.q_proj, "lora_A")


def test_a_batch_wide_mean_would_not_equal_per_site_training(base64, site_pairs, default_config):
    """The per-site mean is what makes grouped training exact: a batch-wide token mean gives other gradients."""
    # Prepare: one grouped batch of two sites whose rows carry different numbers of completion tokens
    lora = default_config.lora
    like = get_state(attach_adapter(base64, "shape", lora), "shape")
    pairs = site_pairs[0][:2] + site_pairs[2][:1]
    batch = collate(base64.tokenizer, pairs, 128)
    index = torch.tensor([0, 0, 1])
    with grouped_adapters(base64.model, lora, 2) as group:
        group.load([_random_state(like, 1), _random_state(like, 2)])
        group.select(index)
        # Execute: gradient of site 1's factors under each objective
        grads = []
        for per_site in (True, False):
            sums, counts = row_loss_sums(base64.model, batch)
            if per_site:
                loss = sum(sums[index == k].sum() / counts[index == k].sum() for k in (0, 1))
            else:
                loss = sums.sum() / counts.sum()
            layer = next(iter(group.layers.values()))
            (grad,) = torch.autograd.grad(loss, layer.lora_B)
            grads.append(grad[1])
    # Assert: the batch-wide mean scales site 1 by its share of the tokens (to the float32 rounding of RMSNorm)
    share = counts[2].item() / counts.sum().item()
    torch.testing.assert_close(grads[1], grads[0] * share, rtol=1e-6, atol=1e-7 * float(grads[1].abs().max()))
    assert share < 0.6


def test_mixed_rows_use_their_own_adapter_and_a_slice_is_a_normal_peft_adapter(base64, site_pairs, default_config):
    # Prepare: three adapters, rows in mixed order (the gathering path), and the same adapters in peft
    lora = default_config.lora
    like = get_state(attach_adapter(base64, "shape", lora), "shape")
    states = [_random_state(like, seed) for seed in (11, 12, 13)]
    pairs = [site_pairs[0][0], site_pairs[1][0], site_pairs[0][1], site_pairs[2][0]]
    order = [2, 0, 1, 2]
    batch = collate(base64.tokenizer, pairs, 128)
    # Execute
    with grouped_adapters(base64.model, lora, 3) as group:
        group.load(states)
        group.select(torch.tensor(order))
        assert not group.selection.blocks
        with torch.no_grad():
            mixed = base64.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        exported = group.states()
        group.load(states[::-1])  # the exported arrays are copies: loading other states leaves them as they were
    model = attach_adapter(base64, "slice", lora)
    alone = []
    for row, k in enumerate(order):
        set_state(model, "slice", exported[k])
        with torch.no_grad():
            alone.append(model(input_ids=batch["input_ids"][row : row + 1],
                               attention_mask=batch["attention_mask"][row : row + 1]).logits[0])
    # Assert: each row's logits are its own adapter's, and the exported slices are the states loaded
    mask = batch["attention_mask"].bool()
    for row in range(len(order)):
        torch.testing.assert_close(mixed[row][mask[row]], alone[row][mask[row]], rtol=1e-10, atol=1e-10)
    for k in range(3):
        assert all(np.array_equal(exported[k][key], states[k][key]) for key in states[k])


def test_a_state_given_for_several_adapters_lands_in_each_of_their_slots(base64, default_config):
    # Prepare: four adapters from two state objects (the first given three times) and a copy of the second
    lora = default_config.lora
    like = get_state(attach_adapter(base64, "shape", lora), "shape")
    shared, other = _random_state(like, 21), _random_state(like, 22)
    given = [shared, other, shared, shared]

    # Execute
    with grouped_adapters(base64.model, lora, 4) as group:
        group.load(given)
        exported = group.states()

    # Assert: adapter k holds given[k]
    for k, state in enumerate(given):
        assert all(np.array_equal(exported[k][key], state[key]) for key in state), k
    assert not np.array_equal(exported[0][next(iter(shared))], exported[1][next(iter(shared))])


def test_equal_blocks_take_the_reshaping_path_with_the_same_result(base64, site_pairs, default_config):
    # Prepare: two adapters, two rows each, in adapter order
    lora = default_config.lora
    like = get_state(attach_adapter(base64, "shape", lora), "shape")
    batch = collate(base64.tokenizer, site_pairs[0][:2] + site_pairs[1][:2], 128)
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    with grouped_adapters(base64.model, lora, 2) as group, torch.no_grad():
        group.load([_random_state(like, 21), _random_state(like, 22)])
        # Execute
        group.select(torch.tensor([0, 0, 1, 1]))
        blocks = group.selection.blocks
        by_blocks = base64.model(**inputs).logits
        group.selection.blocks = False
        gathered = base64.model(**inputs).logits
    # Assert
    assert blocks
    torch.testing.assert_close(by_blocks, gathered, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("head", ["frozen", "lora"])
def test_head_losses_in_chunks_equal_cross_entropy_over_full_logits(base64, site_pairs, default_config, head):
    # Prepare: one adapter, 4 rows; the reference is autograd through the model's own full logits. A frozen head
    # takes the fused path (its gradient computed in the forward pass), LoRA on lm_head the autograd path
    lora = default_config.lora
    if head == "lora":
        lora = replace(lora, target_modules=[*lora.target_modules, "lm_head"])
    like = {k: v for k, v in get_state(attach_adapter(base64, f"shape-{head}", lora), f"shape-{head}").items()
            if ".lora_" in k}  # peft adds the tied lm_head's own weight to the state
    batch = collate(base64.tokenizer, site_pairs[0][:4], 128)
    vocab = base64.model.get_output_embeddings().out_features
    results = []
    with grouped_adapters(base64.model, lora, 1) as group:
        group.load([_random_state(like, 31)])
        group.select(torch.zeros(4, dtype=torch.long))
        factors = group.parameters()
        logits = base64.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        losses, counted = token_losses(logits, batch["labels"])
        reference = ((losses * counted).sum(dim=1), counted.sum(dim=1).to(losses.dtype))
        for sums, counts in [reference] + [row_loss_sums(base64.model, batch, chunk_bytes=budget)
                                           for budget in (1 << 40, 16 * vocab * 4)]:  # one chunk; 16 positions
            # Execute
            grads = torch.autograd.grad((sums * torch.arange(1.0, 5.0, dtype=sums.dtype)).sum() / counts.sum(),
                                        factors)
            results.append((sums.detach(), counts, grads))
    # Assert: the same row sums and counts, and the same gradients for every factor (rows weighted unequally)
    for sums, counts, grads in results[1:]:
        torch.testing.assert_close(sums, results[0][0], rtol=1e-12, atol=1e-12)
        assert torch.equal(counts, results[0][1])
        for grad, expected in zip(grads, results[0][2]):
            torch.testing.assert_close(grad, expected, rtol=1e-10, atol=1e-14)
    assert any(float(g.abs().max()) > 0 for g in results[0][2])


def test_grouped_adapters_refuse_a_state_that_does_not_fit(base64, default_config):
    like = get_state(attach_adapter(base64, "shape", default_config.lora), "shape")
    key = next(k for k in like if ".lora_A." in k)
    with grouped_adapters(base64.model, default_config.lora, 2) as group:
        with pytest.raises(AdapterError, match="adapter 1: adapter is missing 1 tensor.*lora_A.weight"):
            group.load([like, {k: v for k, v in like.items() if k != key}])
        with pytest.raises(AdapterError, match="adapter 0: .*NaN or infinite"):
            group.load([{k: v * np.nan for k, v in like.items()}, like])
        with pytest.raises(ValueError, match="2 grouped adapters, 1 states given"):
            group.load([like])


def test_rows_of_one_adapter_take_the_plain_matmul_path_with_the_same_result(base64, site_pairs, default_config):
    # Prepare: three adapters loaded, every row on adapter 1
    lora = default_config.lora
    like = get_state(attach_adapter(base64, "shape", lora), "shape")
    batch = collate(base64.tokenizer, site_pairs[0][:3], 128)
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    with grouped_adapters(base64.model, lora, 3) as group, torch.no_grad():
        group.load([_random_state(like, seed) for seed in (31, 32, 33)])
        # Execute
        group.select(torch.tensor([1, 1, 1]))
        single = group.selection.single
        plain = base64.model(**inputs).logits
        group.selection.single = None
        gathered = base64.model(**inputs).logits
        group.select(torch.tensor([1, 2, 1]))
        mixed_single = group.selection.single
    # Assert
    assert (single, mixed_single) == (1, None)
    torch.testing.assert_close(plain, gathered, rtol=1e-12, atol=1e-12)
    assert not torch.allclose(plain[0], base64.model(**inputs).logits[0])  # the adapter really acts


@pytest.mark.parametrize("targets", [["q_proj", "k_proj", "v_proj", "o_proj"],
                                     ["v_proj", "k_proj", "gate_proj", "up_proj"]])
def test_projections_of_one_input_run_as_one_with_the_same_outputs_and_gradients(base64, site_pairs, default_config,
                                                                               targets):
    # Prepare: two adapters, two rows each in adapter order; q/k/v (or k/v with gate/up) under LoRA
    lora = replace(default_config.lora, target_modules=targets)
    name = f"shape-{'-'.join(targets)}"
    states = [_random_state(get_state(attach_adapter(base64, name, lora), name), seed) for seed in (31, 32)]
    batch = collate(base64.tokenizer, site_pairs[0][:2] + site_pairs[1][:2], 128)
    batch.pop("attention_mask")
    results = {}

    # Execute: the same step with the shared-input projections fused and not
    for fuse in (False, True):
        with grouped_adapters(base64.model, lora, 2, fuse_shared_inputs=fuse) as group:
            group.load(states)
            group.select(torch.tensor([0, 0, 1, 1]))
            sums, counts = row_loss_sums(base64.model, batch)
            (sums / counts).sum().backward()
            results[fuse] = (sums.detach(), {k: p.grad.clone() for k, p in group.factors().items()})
            kinds = {type(m).__name__ for m in base64.model.modules()}
            with torch.no_grad():  # rows in any order: each layer alone, as before
                group.select(torch.tensor([1, 0, 1, 0]))
                mixed = row_loss_sums(base64.model, batch)[0]
            results[fuse] += (mixed,)
        assert ("_SharedInputMember" in kinds) == fuse

    # Assert: the same losses and the same gradient of every factor, to float64 rounding
    (plain, plain_grads, plain_mixed), (fused, fused_grads, fused_mixed) = results[False], results[True]
    torch.testing.assert_close(fused, plain, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(fused_mixed, plain_mixed, rtol=1e-12, atol=1e-12)
    for key, grad in plain_grads.items():
        assert grad.abs().max() > 0, key
        torch.testing.assert_close(fused_grads[key], grad, rtol=1e-10, atol=1e-12, msg=key)
    assert "_SharedInputMember" not in {type(m).__name__ for m in base64.model.modules()}  # restored


def test_each_sites_loss_metrics_skip_the_steps_it_took_no_row_in():
    # Prepare: four sites x three steps; nan where a DP draw took no row of the site
    nan = float("nan")
    losses = torch.tensor([[1.0, 2.0, 3.0], [nan, 4.0, nan], [nan, nan, nan], [1.0, nan, 5.0]])

    # Execute
    metrics = _loss_metrics(losses)

    # Assert: mean over the steps taken, the last step taken; nan only where nothing was taken
    assert [m["train_loss"] for m in metrics[:2]] == [2.0, 4.0] and metrics[3]["train_loss"] == 3.0
    assert [m["train_loss_last"] for m in (metrics[0], metrics[1], metrics[3])] == [3.0, 4.0, 5.0]
    assert all(np.isnan(v) for v in metrics[2].values())
