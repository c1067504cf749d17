"""Local training at one edge site: LoRA on the shared frozen base, loss on completion tokens only."""

from __future__ import annotations

import contextlib
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
from fed_netgpt.prompting import encode_pair


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
    """FedProx: squared distance of the trainable weights from the round's starting adapter."""
    terms = [(p - anchor[n]).pow(2).sum() for n, p in model.named_parameters() if n in anchor]
    return torch.stack(terms).sum()


def train_adapter(
    model: PeftModel,
    adapter_name: str,
    tokenizer: PreTrainedTokenizerBase,
    pairs: Sequence[PromptPair],
    config: TrainConfig,
    seed: int = 0,
) -> TrainResult:
    """Run `config.local_steps` AdamW steps on `pairs` with the active adapter; return its new state."""
    if not pairs:
        raise ValueError("train_adapter needs at least one training pair")
    model.set_adapter(adapter_name)  # train the adapter whose state is returned, whatever was active
    device = next(model.parameters()).device
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    anchor = {n: p.detach().clone() for n, p in params.items()} if config.proximal_mu > 0 else {}
    optimizer = torch.optim.AdamW(params.values(), lr=config.learning_rate, weight_decay=config.weight_decay)
    stream = batches(pairs, config.batch_size, seed=config.seed + seed)
    model.train()
    losses, started = [], time.perf_counter()
    for _ in range(config.local_steps):
        batch = {k: v.to(device) for k, v in collate(tokenizer, next(stream), config.max_length).items()}
        with autocast(config.bf16, device):
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
    }
    return TrainResult(state=get_state(model, adapter_name), num_examples=len(pairs), metrics=metrics)
