"""Local training at one edge site: LoRA on the shared frozen base, loss on completion tokens only."""

from __future__ import annotations

import contextlib
import logging
import random
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from peft import PeftModel
from transformers import PreTrainedTokenizerBase

from fed_netgpt.adapters import AdapterState, get_state
from fed_netgpt.config import TrainConfig
from fed_netgpt.data.schema import PromptPair
from fed_netgpt.models import cache_root
from fed_netgpt.precision import Precision, choose_precision, step_benchmark
from fed_netgpt.prompting import encode_pair

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainResult:
    state: AdapterState
    num_examples: int
    metrics: dict[str, float]


def collate(
    tokenizer: PreTrainedTokenizerBase, pairs: Sequence[PromptPair], max_length: int
) -> dict[str, torch.Tensor]:
    """Right-padded input ids, attention mask and labels (-100 on prompt and padding)."""
    encoded = [encode_pair(tokenizer, p.context, p.prompt, p.completion, max_length) for p in pairs]
    width = max(len(ids) for ids, _ in encoded)
    pad = int(tokenizer.pad_token_id)
    input_ids = torch.full((len(encoded), width), pad, dtype=torch.long)
    labels = torch.full((len(encoded), width), -100, dtype=torch.long)
    attention_mask = torch.zeros((len(encoded), width), dtype=torch.long)
    for row, (ids, labs) in enumerate(encoded):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        labels[row, : len(labs)] = torch.tensor(labs)
        attention_mask[row, : len(ids)] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def token_losses(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each position's cross-entropy for the next token, and where it counts (labels != -100), both [batch, seq].
    The labels are shifted instead of the logits: a contiguous [rows x vocab] view, no copy of the logits (at
    SmolLM2's 49,152-token vocabulary, slicing and transposing them cost 4x the time on the CPU)."""
    targets = torch.nn.functional.pad(labels[:, 1:], (0, 1), value=-100)
    losses = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1),
                                               ignore_index=-100, reduction="none")
    return losses.view(labels.shape), (targets != -100)


def batches(pairs: Sequence[PromptPair], batch_size: int, seed: int) -> Iterator[list[PromptPair]]:
    """Endless shuffled batches: each epoch visits every pair once."""
    rng = random.Random(seed)
    order = list(range(len(pairs)))
    while True:
        rng.shuffle(order)
        for start in range(0, len(order), batch_size):
            yield [pairs[i] for i in order[start : start + batch_size]]


def autocast(enabled: bool, device: torch.device) -> contextlib.AbstractContextManager:
    """bf16 autocast where asked: fp32 master weights, bf16 matmuls (AMX on CPU, tensor cores on GPU)."""
    if not enabled:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def proximal_term(model: PeftModel, anchor: dict[str, torch.Tensor]) -> torch.Tensor:
    """Squared distance of the trainable weights from `anchor`: the round's starting adapter (FedProx), or the
    received regional adapter (Ditto's personal objective)."""
    terms = [(p - anchor[n]).pow(2).sum() for n, p in model.named_parameters() if n in anchor]
    return torch.stack(terms).sum()


def trainable_parameters(model: PeftModel, freeze_lora_a: bool = False) -> dict[str, torch.nn.Parameter]:
    """The active adapter's trainable weights; `freeze_lora_a` (FFA-LoRA) leaves A at its shared start."""
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    return {n: p for n, p in params.items() if not (freeze_lora_a and ".lora_A." in n)}


_CHOSEN: dict[tuple[str, str], Precision] = {}


def precision_for(config: TrainConfig, model: PeftModel, batch: dict[str, torch.Tensor]) -> Precision:
    """bf16 autocast or fp32 for this machine (`train.bf16`), decided once per process and logged.

    On a GPU the choice is a one-off measurement of this model's step, cached per GPU, model and batch size.
    """
    device = next(model.parameters()).device
    key = (str(config.bf16), str(device))
    if key not in _CHOSEN:
        gpu = device.type == "cuda"
        name = f"{torch.cuda.get_device_name(device)}|{model.name_or_path}|{config.batch_size}" if gpu else ""
        _CHOSEN[key] = choose_precision(config.bf16, device, benchmark=step_benchmark(model, batch) if gpu else None,
                                        cache_key=name, cache_file=cache_root() / "precision.json")
        log.info("precision: %s", _CHOSEN[key].reason)
    return _CHOSEN[key]


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
    model.train()
    losses, started, precision = [], time.perf_counter(), None
    for _ in range(config.local_steps):
        batch = {k: v.to(device) for k, v in collate(tokenizer, next(stream), config.max_length).items()}
        precision = precision or precision_for(config, model, batch)
        with autocast(precision.bf16, device):
            loss = model(**batch).loss
        objective = loss + (config.proximal_mu / 2) * proximal_term(model, anchor) if anchor else loss
        objective.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    model.eval()
    elapsed = time.perf_counter() - started
    metrics = {
        "train_loss": sum(losses) / len(losses),
        "train_loss_last": losses[-1],
        "train_seconds": elapsed,
        "steps": float(config.local_steps),
        "bf16": float(bool(precision and precision.bf16)),
    }
    return TrainResult(state=get_state(model, adapter_name), num_examples=len(pairs), metrics=metrics)
