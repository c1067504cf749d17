"""Local training at one edge site: LoRA on the shared frozen base, loss on completion tokens only."""

from __future__ import annotations

import contextlib
import logging
import random
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TypeVar

import torch
import torch.utils.checkpoint
from peft import PeftModel
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from fed_netgpt.adapters import AdapterState, get_state
from fed_netgpt.config import LoraConfig, TrainConfig
from fed_netgpt.data.schema import PromptPair
from fed_netgpt.grouped_lora import grouped_adapters
from fed_netgpt.models import cache_root
from fed_netgpt.precision import Precision, choose_precision, step_benchmark
from fed_netgpt.prompting import encode_pair

log = logging.getLogger(__name__)
Row = TypeVar("Row")


@dataclass(frozen=True)
class TrainResult:
    state: AdapterState
    num_examples: int
    metrics: dict[str, float]


def collate(
    tokenizer: PreTrainedTokenizerBase, pairs: Sequence[PromptPair], max_length: int
) -> dict[str, torch.Tensor]:
    """Right-padded input ids, attention mask and labels (-100 on prompt and padding)."""
    return pad_batch(encode_pairs(tokenizer, pairs, max_length), int(tokenizer.pad_token_id))


def encode_pairs(tokenizer: PreTrainedTokenizerBase, pairs: Sequence[PromptPair],
                 max_length: int) -> list[tuple[list[int], list[int]]]:
    """Each pair's token ids and labels (`encode_pair`)."""
    return [encode_pair(tokenizer, p.context, p.prompt, p.completion, max_length) for p in pairs]


def pad_batch(encoded: Sequence[tuple[list[int], list[int]]], pad: int) -> dict[str, torch.Tensor]:
    """`collate` of pairs already encoded (`encode_pair`'s ids and labels)."""
    width = max(len(ids) for ids, _ in encoded)
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
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # bf16 up to fp32; fp64 stays
    losses = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1),
                                               ignore_index=-100, reduction="none")
    return losses.view(labels.shape), (targets != -100)


def batches(pairs: Sequence[Row], batch_size: int, seed: int) -> Iterator[list[Row]]:
    """Endless shuffled batches of pairs (or of their encodings): each epoch visits every one once."""
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
_LOGGED: set[str] = set()


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
            row_sums, row_counts = row_loss_sums(model.get_base_model(), batch)
        loss = row_sums.sum() / row_counts.sum().clamp(min=1)
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


LOGITS_CHUNK_BYTES = 1 << 30  # fp32 logits held at once by `row_loss_sums` (SmolLM2: ~40 rows of 128 tokens)


def row_loss_sums(model: PreTrainedModel, batch: dict[str, torch.Tensor],
                  chunk_bytes: int = LOGITS_CHUNK_BYTES) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's summed next-token loss and its number of counted tokens (as a float), both [rows].

    The fp32 logits over the vocabulary are the biggest tensor of a LoRA step (32 sites x 8 rows x 256 tokens
    x 49,152 entries are 13 GB): they are computed a chunk of rows at a time, each chunk recomputed in the
    backward pass instead of kept, so only the final hidden states stay in memory.
    """
    hidden = model.get_decoder()(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                 use_cache=False).last_hidden_state
    head, labels = model.get_output_embeddings(), batch["labels"]
    rows, width = labels.shape
    chunk = max(1, chunk_bytes // max(1, width * head.out_features * 4))

    def sums(h: torch.Tensor, lab: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        losses, counted = token_losses(head(h), lab)
        return (losses * counted).sum(dim=1), counted.sum(dim=1).to(losses.dtype)  # a float count: exact division

    if chunk >= rows:
        return sums(hidden, labels)
    parts = [torch.utils.checkpoint.checkpoint(sums, hidden[i : i + chunk], labels[i : i + chunk],
                                               use_reentrant=False) for i in range(0, rows, chunk)]
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


def per_site_mean(row_sums: torch.Tensor, row_counts: torch.Tensor, index: torch.Tensor,
                  num_sites: int) -> torch.Tensor:
    """Each site's mean token loss over its own rows ([num_sites]); a site with no counted token gets 0."""
    sums = torch.zeros(num_sites, dtype=row_sums.dtype, device=row_sums.device).index_add(0, index, row_sums)
    counts = torch.zeros(num_sites, dtype=row_sums.dtype, device=row_sums.device).index_add(
        0, index, row_counts)
    return sums / counts.clamp(min=1)


def train_grouped(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    sites: Sequence[Sequence[PromptPair]],
    starts: Sequence[AdapterState],
    lora: LoraConfig,
    config: TrainConfig,
    seeds: Sequence[int],
    *,
    freeze_lora_a: bool = False,
    anchors: Sequence[AdapterState] | None = None,
) -> list[TrainResult]:
    """Train K sites' adapters together, one forward/backward a step over the shared frozen `model`, each row with
    its own site's adapter; site k ends where `train_adapter(..., seed=seeds[k])` from `starts[k]` would (with
    `anchor` = `anchors[k]`, default its start, for the proximal term).

    That equality holds because each site's loss is the mean over its own tokens and the objective their sum (a
    batch-wide mean would scale each site by its share of tokens), every site steps every step (AdamW's moments
    and bias correction stay per site), and nothing is clipped across sites. FedProx's term is per site too.
    """
    if not sites or len(sites) != len(starts) or len(sites) != len(seeds) or not all(sites):
        raise ValueError("train_grouped needs one non-empty pair list, start state and seed per site")
    device = next(model.parameters()).device
    precision = choose_precision(config.bf16, device)
    if precision.reason not in _LOGGED:
        _LOGGED.add(precision.reason)
        log.info("grouped training precision: %s", precision.reason)
    pad = int(tokenizer.pad_token_id)
    encoded = [encode_pairs(tokenizer, pairs, config.max_length)  # once: a step of 128 sites would otherwise
               for pairs in sites]                                # spend ~0.3 s tokenizing
    streams = [batches(rows, config.batch_size, seed=config.seed + seed) for rows, seed in zip(encoded, seeds)]
    with grouped_adapters(model, lora, len(sites)) as group:
        params = group.parameters(freeze_lora_a)
        group.load(anchors or starts)
        anchor = [p.detach().clone() for p in params] if config.proximal_mu > 0 else None
        group.load(starts)
        optimizer = torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=config.weight_decay)
        model.train()
        losses, started = [], time.perf_counter()
        for _ in range(config.local_steps):
            chosen = [next(stream) for stream in streams]
            index = torch.tensor([k for k, rows in enumerate(chosen) for _ in rows], device=device)
            batch = {k: v.to(device) for k, v in pad_batch([row for rows in chosen for row in rows], pad).items()}
            group.select(index)
            with autocast(precision.bf16, device):
                row_sums, row_counts = row_loss_sums(model, batch)
            site_loss = per_site_mean(row_sums, row_counts, index, len(sites))
            objective = site_loss.sum()
            if anchor:
                distance = torch.stack([(p - a).pow(2).sum() for p, a in zip(params, anchor)]).sum()
                objective = objective + (config.proximal_mu / 2) * distance
            objective.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(site_loss.detach().cpu())
        model.eval()
        elapsed = time.perf_counter() - started
        states = group.states()
    per_site = torch.stack(losses).T  # [sites, steps]
    return [TrainResult(state=states[k], num_examples=len(sites[k]), metrics={
        "train_loss": float(per_site[k].mean()), "train_loss_last": float(per_site[k, -1]),
        "train_seconds": elapsed / len(sites), "steps": float(config.local_steps), "bf16": float(precision.bf16),
        "group_size": float(len(sites))}) for k in range(len(sites))]
