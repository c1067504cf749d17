"""The reference engines: peft's one-adapter loop (`train.engine=peft`) and Opacus's hooks and DPOptimizer
(`privacy.engine=opacus`), one site at a time.

They are what the grouped pass (`engine.py`) is held equal to in the float64 equivalence tests: code that stock
peft and Opacus run, written the way their documentation writes a training loop. A federation can still train with
them (`train_each_alone`), one site after another on the process's peft model.
"""

from __future__ import annotations

import itertools
import math
import random
import secrets
import time
import warnings
from collections.abc import Sequence

import torch
from opacus import GradSampleModule
from opacus.accountants import RDPAccountant
from opacus.optimizers import DPOptimizer
from peft import PeftModel
from transformers import PreTrainedTokenizerBase

from fed_netgpt.config import LoraConfig, TrainConfig
from fed_netgpt.data.schema import PromptPair
from fed_netgpt.model.adapters import attach_adapter, get_state, set_state
from fed_netgpt.model.base import BaseModel
from fed_netgpt.training.batches import batches, collate, on_device
from fed_netgpt.training.engine import SiteJob, TrainResult, autocast, precision_for
from fed_netgpt.training.losses import row_loss_sums, sequence_losses
from fed_netgpt.training.privacy import SiteAccountant, as_history, dp_seed, expected_batch, poisson_batch

REFERENCE_ADAPTER = "reference"  # the peft adapter the reference engines train each job's weights in


def train_each_alone(base: BaseModel, jobs: Sequence[SiteJob], lora: LoraConfig, config: TrainConfig, *,
                     freeze_lora_a: bool = False) -> list[TrainResult]:
    """`engine.train_sites` with the reference engines: each job in turn on one peft adapter, by peft's loop or,
    for a job with an accountant, Opacus's."""
    model = attach_adapter(base, REFERENCE_ADAPTER, lora)
    results = []
    for job in jobs:
        anchor = None
        if config.proximal_mu > 0 and job.anchor is not None:
            set_state(model, REFERENCE_ADAPTER, job.anchor)
            anchor = {n: p.detach().clone() for n, p in trainable_parameters(model).items()}
        set_state(model, REFERENCE_ADAPTER, job.start)
        if job.accountant is None:
            results.append(train_adapter(model, REFERENCE_ADAPTER, base.tokenizer, job.pairs, config, seed=job.seed,
                                         anchor=anchor, freeze_lora_a=freeze_lora_a))
        else:
            randomness = dp_seed(job.accountant.privacy, config.seed, job.name, job.seed, job.accountant.history)
            results.append(train_adapter_private(model, REFERENCE_ADAPTER, base.tokenizer, job.pairs, config,
                                                 job.accountant, anchor=anchor, freeze_lora_a=freeze_lora_a,
                                                 seed=randomness))
    return results


def proximal_term(model: PeftModel, anchor: dict[str, torch.Tensor]) -> torch.Tensor:
    """Squared distance of the trainable weights from `anchor`: the round's starting adapter (FedProx), or the
    received regional adapter (Ditto's personal objective)."""
    terms = [(p - anchor[n]).pow(2).sum() for n, p in model.named_parameters() if n in anchor]
    return torch.stack(terms).sum()


def trainable_parameters(model: PeftModel, freeze_lora_a: bool = False) -> dict[str, torch.nn.Parameter]:
    """The active adapter's trainable weights; `freeze_lora_a` (FFA-LoRA) leaves A at its shared start."""
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    return {n: p for n, p in params.items() if not (freeze_lora_a and ".lora_A." in n)}


def token_mean_loss(model: PeftModel, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The batch's mean loss over its completion tokens, through the counted-positions output head."""
    base = model.get_base_model()
    row_sums, row_counts = row_loss_sums(base, batch)  # type: ignore[arg-type]  # peft's nn.Module: a PreTrainedModel
    return row_sums.sum() / row_counts.sum().clamp(min=1)


def train_adapter(
    model: PeftModel,
    adapter_name: str,
    tokenizer: PreTrainedTokenizerBase,
    pairs: Sequence[PromptPair],
    config: TrainConfig,
    seed: int = 0,
    *,
    anchor: dict[str, torch.Tensor] | None = None,
    freeze_lora_a: bool = False,
) -> TrainResult:
    """Run `config.local_steps` AdamW steps on `pairs` with adapter `adapter_name`; return its new state.

    With `config.proximal_mu > 0` the loss gains (mu/2)·||w - anchor||², the anchor being the adapter's
    starting weights unless given (parameter names as in `model.named_parameters()`).
    """
    if not pairs:
        raise ValueError("train_adapter needs at least one training pair")
    model.set_adapter(adapter_name)  # train the adapter whose state is returned, whatever was active
    device = next(model.parameters()).device
    params = trainable_parameters(model, freeze_lora_a)
    if config.proximal_mu > 0 and anchor is None:
        anchor = {n: p.detach().clone() for n, p in params.items()}
    anchor = anchor if config.proximal_mu > 0 else None
    optimizer = torch.optim.AdamW(params.values(), lr=config.learning_rate, weight_decay=config.weight_decay)
    stream = batches(pairs, config.batch_size, seed=config.seed + seed)
    first = next(stream)  # decides the precision (a one-off timing per machine) before the clock starts
    precision = precision_for(config, model, on_device(collate(tokenizer, first, config.max_length), device),
                              loss=token_mean_loss)
    model.train()
    losses, started = [], time.perf_counter()
    for chosen in itertools.islice(itertools.chain([first], stream), config.local_steps):
        batch = on_device(collate(tokenizer, chosen, config.max_length), device)
        with autocast(precision.bf16, device):
            loss = token_mean_loss(model, batch)
        objective = loss + (config.proximal_mu / 2) * proximal_term(model, anchor) if anchor else loss
        objective.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    model.eval()
    metrics = {
        "train_loss": sum(losses) / len(losses),
        "train_loss_last": losses[-1],
        "train_seconds": time.perf_counter() - started,
        "steps": float(config.local_steps),
        "bf16": float(precision.bf16),
    }
    return TrainResult(state=get_state(model, adapter_name), num_examples=len(pairs), metrics=metrics)


def train_adapter_private(
    model: PeftModel,
    adapter_name: str,
    tokenizer: PreTrainedTokenizerBase,
    pairs: Sequence[PromptPair],
    config: TrainConfig,
    accountant: SiteAccountant,
    *,
    anchor: dict[str, torch.Tensor] | None = None,
    freeze_lora_a: bool = False,
    seed: int | None = None,
) -> TrainResult:
    """`train_adapter` under DP-SGD with Opacus's hooks and DPOptimizer: `config.local_steps` Poisson-sampled
    steps on `pairs`, drawing on `accountant` (whose history grows by them). Raises `BudgetSpent` (and changes
    nothing) when the round would exceed `privacy.target_epsilon`. The batches and the noise come from the
    operating system's randomness unless `seed` is given (`privacy.dp_seed`)."""
    if not pairs:
        raise ValueError("train_adapter_private needs at least one training pair")
    privacy = accountant.privacy
    noise, rate = accountant.plan(len(pairs), config)
    model.set_adapter(adapter_name)
    device = next(model.parameters()).device
    params = trainable_parameters(model, freeze_lora_a)
    if config.proximal_mu > 0 and anchor is None:
        anchor = {n: p.detach().clone() for n, p in params.items()}
    anchor = anchor if config.proximal_mu > 0 else None
    opacus_accountant = RDPAccountant()
    opacus_accountant.history = as_history(accountant.history)
    optimizer = DPOptimizer(
        torch.optim.AdamW(params.values(), lr=config.learning_rate, weight_decay=config.weight_decay),
        noise_multiplier=noise, max_grad_norm=privacy.max_grad_norm,
        expected_batch_size=expected_batch(rate, len(pairs)), loss_reduction="mean",
        generator=torch.Generator(device=device).manual_seed(secrets.randbits(63) if seed is None else seed),
    )
    optimizer.attach_step_hook(opacus_accountant.get_optimizer_hook_fn(sample_rate=rate))
    per_pair = GradSampleModule(model, batch_first=True, loss_reduction="sum")

    def pair_loss_sum(_: PeftModel, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        logits = per_pair(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        return sequence_losses(logits, batch["labels"]).sum()

    # timed with the per-pair gradients (on a CPU without AMX they made bf16 far slower than fp32), then the
    # timing passes' per-pair gradients are dropped
    first = on_device(collate(tokenizer, pairs[: config.batch_size], config.max_length), device)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Full backward hook is firing", UserWarning)
        precision = precision_for(config, model, first, loss=pair_loss_sum, kind="dp-sgd")
    per_pair.zero_grad(set_to_none=True)
    rng = random.SystemRandom() if seed is None else random.Random(seed)
    model.train()
    losses, started = [], time.perf_counter()
    try:
        for _ in range(config.local_steps):
            chosen = [pairs[i] for i in poisson_batch(len(pairs), rate, rng)]
            if chosen:
                batch = on_device(collate(tokenizer, chosen, config.max_length), device)
                with autocast(precision.bf16, device):
                    logits = per_pair(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
                per_sequence = sequence_losses(logits, batch["labels"])
                with warnings.catch_warnings():  # Opacus' hooks on the first LoRA layer, whose input is frozen
                    warnings.filterwarnings("ignore", "Full backward hook is firing", UserWarning)
                    per_sequence.sum().backward()
                losses.append(float(per_sequence.mean().detach()))
            else:  # nobody drawn: the step is noise alone, and it is counted
                for p in optimizer.params:
                    p.grad_sample = torch.zeros((0, *p.shape), dtype=p.dtype, device=p.device)
            if optimizer.pre_step():
                if anchor is not None:  # data-independent: added after privatisation
                    with torch.enable_grad():
                        pull = torch.autograd.grad((config.proximal_mu / 2) * proximal_term(model, anchor),
                                                   list(params.values()), allow_unused=True)
                    for p, g in zip(params.values(), pull):
                        if g is not None:
                            p.grad = g if p.grad is None else p.grad + g
                optimizer.original_optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    finally:
        per_pair._close()
        model.eval()
    accountant.history = as_history(opacus_accountant.history)
    metrics = {
        "train_loss": sum(losses) / len(losses) if losses else math.nan,
        "train_loss_last": losses[-1] if losses else math.nan,
        "train_seconds": time.perf_counter() - started,
        "steps": float(config.local_steps),
        "bf16": float(precision.bf16),
        **accountant.spent(),
    }
    return TrainResult(state=get_state(model, adapter_name), num_examples=len(pairs), metrics=metrics)
