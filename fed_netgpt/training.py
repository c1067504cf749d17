"""Local training at one edge site: LoRA on the shared frozen base, loss on completion tokens only."""

from __future__ import annotations

import contextlib
import functools
import itertools
import logging
import math
import random
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol, TypeVar

import numpy as np
import torch
import torch.utils.checkpoint
from peft import PeftModel
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from fed_netgpt.adapters import AdapterState, get_state
from fed_netgpt.config import LoraConfig, TrainConfig
from fed_netgpt.data.schema import PromptPair
from fed_netgpt.fused import cross_entropy_rows, fused_kernels
from fed_netgpt.grouped_lora import RowGradients, grouped_adapters
from fed_netgpt.models import cache_root
from fed_netgpt.precision import Precision, choose_precision, device_name, step_benchmark
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


Encoded = tuple[Sequence[int], Sequence[int]]  # a pair's token ids and labels (`encode_pair`)


def encode_pairs(tokenizer: PreTrainedTokenizerBase, pairs: Sequence[PromptPair], max_length: int) -> list[Encoded]:
    """Each pair's token ids and labels (`encode_pair`)."""
    return [encoded_pair(tokenizer, p, max_length) for p in pairs]


@functools.lru_cache(maxsize=1 << 15)
def encoded_pair(tokenizer: PreTrainedTokenizerBase, pair: PromptPair, max_length: int) -> Encoded:
    """`encode_pair`, kept for the next rounds: a site trains and is evaluated on the same pairs every round, and
    tokenizing them again took a sixth of a 128-site grouped call on the GPU machine. Kept as int32 arrays
    (32k pairs of ~100 tokens: ~30 MB)."""
    arrays = tuple(np.asarray(part, dtype=np.int32) for part in encode_pair(tokenizer, pair.context, pair.prompt,
                                                                           pair.completion, max_length))
    for array in arrays:
        array.flags.writeable = False  # shared by every later use
    return arrays  # type: ignore[return-value]


def pad_batch(encoded: Sequence[Encoded], pad: int) -> dict[str, torch.Tensor]:
    """`collate` of pairs already encoded (`encode_pair`'s ids and labels), padded on the right."""
    width = max(len(ids) for ids, _ in encoded)
    input_ids = np.full((len(encoded), width), pad, dtype=np.int64)
    labels = np.full((len(encoded), width), -100, dtype=np.int64)
    attention_mask = np.zeros((len(encoded), width), dtype=np.int64)
    for row, (ids, labs) in enumerate(encoded):
        input_ids[row, : len(ids)], labels[row, : len(labs)], attention_mask[row, : len(ids)] = ids, labs, 1
    return {"input_ids": torch.from_numpy(input_ids), "attention_mask": torch.from_numpy(attention_mask),
            "labels": torch.from_numpy(labels)}


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


def on_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {key: value.to(device) for key, value in batch.items()}


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


def token_mean_loss(model: PeftModel, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The batch's mean loss over its completion tokens, through the counted-positions output head."""
    row_sums, row_counts = row_loss_sums(model.get_base_model(), batch)
    return row_sums.sum() / row_counts.sum().clamp(min=1)


def precision_for(config: TrainConfig, model: PeftModel, batch: dict[str, torch.Tensor],
                  loss: Callable[..., torch.Tensor] | None = None, step: str = "step") -> Precision:
    """bf16 autocast or fp32 for this machine (`train.bf16`), decided once per process and kind of `step` (a
    DP-SGD step's per-pair gradients may favour another precision than a plain step's), and logged.

    "auto" is a one-off measurement of that step in both precisions, cached per processor (and thread count),
    model, batch size and kind of step.
    """
    device = next(model.parameters()).device
    name = f"{device_name(device)}|{model.name_or_path}|{config.batch_size}" + ("" if step == "step" else
                                                                              f"|{step}")
    key = (str(config.bf16), str(device), name)  # another model or batch size in this process: its own choice
    if key not in _CHOSEN:
        _CHOSEN[key] = choose_precision(config.bf16, device, benchmark=step_benchmark(model, batch, loss=loss),
                                        cache_key=name, cache_file=cache_root() / "precision.json")
        log.info("precision (%s): %s", step, _CHOSEN[key].reason)
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
    elapsed = time.perf_counter() - started
    metrics = {
        "train_loss": sum(losses) / len(losses),
        "train_loss_last": losses[-1],
        "train_seconds": elapsed,
        "steps": float(config.local_steps),
        "bf16": float(precision.bf16),
    }
    return TrainResult(state=get_state(model, adapter_name), num_examples=len(pairs), metrics=metrics)


LOGITS_CHUNK_BYTES = 1 << 30  # fp32 logits held at once by `row_loss_sums` (SmolLM2: ~5,400 positions)


def row_loss_sums(model: PreTrainedModel, batch: dict[str, torch.Tensor],
                  chunk_bytes: int = LOGITS_CHUNK_BYTES) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's summed next-token loss and its number of counted tokens (as a float), both [rows].

    Only the positions whose next token counts go through the output head: prompts and padding carry no loss,
    and on prompt pairs they are ~60 % of the positions. The fp32 logits over the vocabulary are still the
    biggest tensor of a LoRA step (at 49,152 entries, 4,096 counted positions take 0.8 GB), so they are
    computed a chunk of positions at a time (`head_losses`). A batch without "attention_mask" must be padded
    on the right: the causal mask alone then keeps real tokens from seeing the padding.
    """
    hidden = model.get_decoder()(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"),
                                 use_cache=False).last_hidden_state
    labels = batch["labels"]
    targets = torch.nn.functional.pad(labels[:, 1:], (0, 1), value=-100).flatten()
    positions = (targets != -100).nonzero().squeeze(1)  # on a GPU this waits for the forward pass
    chunk = max(1, chunk_bytes // (model.config.vocab_size * 4))
    losses = head_losses(model.get_output_embeddings(), hidden.flatten(0, 1)[positions], targets[positions],
                         chunk)
    rows = positions // labels.shape[1]
    zeros = losses.new_zeros(labels.shape[0])
    return zeros.index_add(0, rows, losses), zeros.index_add(0, rows, torch.ones_like(losses))


def head_losses(head: torch.nn.Module, hidden: torch.Tensor, targets: torch.Tensor, chunk: int) -> torch.Tensor:
    """Cross-entropy of `head(hidden)` ([positions, vocab] logits, log-softmax in at least fp32) against
    `targets`, `chunk` positions at a time. A frozen Linear head goes through `_FrozenHeadLosses`; a head with
    trainable weights (LoRA on lm_head) through autograd, each chunk recomputed in the backward pass."""
    if isinstance(head, torch.nn.Linear) and not any(p.requires_grad for p in head.parameters()):
        return _FrozenHeadLosses.apply(hidden, targets, head.weight, head.bias, chunk, hidden.requires_grad)

    def losses(h: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        logits = head(h)
        logp = torch.log_softmax(logits, dim=-1, dtype=torch.promote_types(logits.dtype, torch.float32))
        return -logp.gather(1, t[:, None]).squeeze(1)

    return torch.cat([torch.utils.checkpoint.checkpoint(losses, hidden[i : i + chunk], targets[i : i + chunk],
                                                        use_reentrant=False)
                      for i in chunk_starts(len(targets), chunk)])


def chunk_starts(positions: int, chunk: int) -> range:
    """Where each chunk of positions starts; one (empty) chunk when there are none (a DP-SGD draw of no pair)."""
    return range(0, max(positions, 1), chunk)


class _FrozenHeadLosses(torch.autograd.Function):
    """Cross-entropy through a frozen Linear head that computes d(loss)/d(hidden) in the forward pass.

    With the head frozen, that gradient is (softmax - one-hot) · W per position, all of which the forward pass
    already has: each chunk's logits are used once and dropped, never kept or recomputed for the backward
    pass, which only scales the stored [positions, hidden] gradient by each loss's incoming gradient.
    """

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, targets: torch.Tensor, weight: torch.Tensor,  # type: ignore[override]
                bias: torch.Tensor | None, chunk: int, needs_grad: bool) -> torch.Tensor:
        losses, grads = [], []
        for i in chunk_starts(len(targets), chunk):
            logits = torch.nn.functional.linear(hidden[i : i + chunk], weight, bias)
            chunk_losses, grad_logits = cross_entropy_rows(logits, targets[i : i + chunk], needs_grad)
            del logits
            losses.append(chunk_losses)
            if grad_logits is not None:
                grads.append((grad_logits.to(weight.dtype) @ weight).to(hidden.dtype))
        ctx.save_for_backward(torch.cat(grads) if needs_grad else hidden.new_empty(0))
        return torch.cat(losses)

    @staticmethod
    def backward(ctx, grad_losses: torch.Tensor):  # type: ignore[override]
        (grad,) = ctx.saved_tensors
        return grad * grad_losses[:, None].to(grad.dtype), None, None, None, None, None


def per_site_mean(row_sums: torch.Tensor, row_counts: torch.Tensor, index: torch.Tensor,
                  num_sites: int, empty: float = 0.0) -> torch.Tensor:
    """Each site's mean token loss over its own rows ([num_sites]); a site with no counted token gets `empty`."""
    sums = torch.zeros(num_sites, dtype=row_sums.dtype, device=row_sums.device).index_add(0, index, row_sums)
    counts = torch.zeros(num_sites, dtype=row_sums.dtype, device=row_sums.device).index_add(
        0, index, row_counts)
    return torch.where(counts > 0, sums / counts.clamp(min=1), empty)


class GroupedPrivacy(Protocol):
    """DP-SGD for a grouped pass (`privacy.GroupedDPSGD`): how each site draws its rows, and what turns the
    clipped per-row gradients into each site's noised gradient."""

    max_grad_norm: float

    def draws(self, sites: Sequence[Sequence[Row]]) -> list[Iterator[list[Row]]]: ...

    def privatize(self, clipped_sums: dict[torch.nn.Parameter, torch.Tensor]) -> None: ...


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
    private: GroupedPrivacy | None = None,
) -> list[TrainResult]:
    """Train K sites' adapters together, one forward/backward a step over the shared frozen `model`, each row with
    its own site's adapter; site k ends where `train_adapter(..., seed=seeds[k])` from `starts[k]` would (with
    `anchor` = `anchors[k]`, default its start, for the proximal term).

    That equality holds because each site's loss is the mean over its own tokens and the objective their sum (a
    batch-wide mean would scale each site by its share of tokens), every site steps every step (AdamW's moments
    and bias correction stay per site), and nothing is clipped across sites. FedProx's term is per site too.
    With `private`, each site trains under DP-SGD as `privacy.train_adapter_private` would train it alone: each
    pair's loss is the mean over its own tokens, the layers keep every pair's gradient, and `private` clips,
    sums per site and noises them; the proximal pull (data-independent) is added after.
    """
    if not sites or len(sites) != len(starts) or len(sites) != len(seeds) or not all(sites):
        raise ValueError("train_grouped needs one non-empty pair list, start state and seed per site")
    device = next(model.parameters()).device
    precision = choose_precision(config.bf16, device)
    if precision.reason not in _LOGGED:
        _LOGGED.add(precision.reason)
        log.info("grouped training precision: %s", precision.reason)
    pad = int(tokenizer.pad_token_id)
    encodings = [_Encodings(tokenizer, pairs, config.max_length) for pairs in sites]
    streams = private.draws(encodings) if private else [
        batches(rows, config.batch_size, seed=config.seed + seed) for rows, seed in zip(encodings, seeds)]
    fused = fused_kernels(model) if device.type == "cuda" and config.fused_kernels else contextlib.nullcontext()
    with grouped_adapters(model, lora, len(sites), fuse_shared_inputs=True) as group, fused:
        params = group.parameters(freeze_lora_a)
        anchor = None
        if config.proximal_mu > 0:
            group.load(anchors or starts)
            anchor = [p.detach().clone() for p in params]
        group.load(starts)
        optimizer = torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=config.weight_decay,
                                      fused=device.type == "cuda")  # one kernel for all K sites' factors
        model.train()
        losses, started = [], time.perf_counter()
        with group.per_row_gradients(params) if private else contextlib.nullcontext() as per_row:
            for _ in range(config.local_steps):
                batch, index = grouped_batch([next(stream) for stream in streams], pad, device)
                group.select(index)
                with autocast(precision.bf16, device):
                    row_sums, row_counts = row_loss_sums(model, batch)
                index = index.to(device, non_blocking=True)
                pull = (params, anchor, config.proximal_mu) if anchor else None
                site_loss = (_backward(row_sums, row_counts, index, len(sites), pull) if private is None else
                             _private_backward(row_sums, row_counts, index, len(sites), pull, private, per_row))
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                losses.append(site_loss.detach())  # kept on the device: no wait for the GPU between steps
        model.eval()
        loss_metrics = _loss_metrics(torch.stack(losses).T.cpu())
        elapsed = time.perf_counter() - started
        states = group.states()
    return [TrainResult(state=states[k], num_examples=len(sites[k]), metrics={
        **loss_metrics[k], "train_seconds": elapsed / len(sites), "steps": float(config.local_steps),
        "bf16": float(precision.bf16), "group_size": float(len(sites))}) for k in range(len(sites))]


Pull = tuple[list[torch.nn.Parameter], list[torch.Tensor], float]  # FedProx / Ditto: (params, anchor, mu)


def _backward(row_sums: torch.Tensor, row_counts: torch.Tensor, index: torch.Tensor, num_sites: int,
              pull: Pull | None) -> torch.Tensor:
    """Gradients of the sum of each site's token-mean loss (plus each site's proximal term); the site losses."""
    site_loss = per_site_mean(row_sums, row_counts, index, num_sites)
    objective = site_loss.sum()
    if pull:
        params, anchor, mu = pull
        objective = objective + (mu / 2) * torch.stack([(p - a).pow(2).sum() for p, a in zip(params, anchor)]).sum()
    objective.backward()
    return site_loss


def _private_backward(row_sums: torch.Tensor, row_counts: torch.Tensor, index: torch.Tensor, num_sites: int,
                      pull: Pull | None, private: GroupedPrivacy, per_row: RowGradients) -> torch.Tensor:
    """DP-SGD gradients: each pair's own token-mean loss, its gradient kept by the layers, clipped, summed per
    site and noised by `private`; a proximal pull mu·(p - anchor) added after (it depends on no data). Each
    site's mean pair loss (nan where its draw was empty)."""
    pair_loss = row_sums / row_counts.clamp(min=1)
    pair_loss.sum().backward()
    private.privatize(per_row.clipped_sums(private.max_grad_norm, num_sites))
    if pull:
        params, anchor, mu = pull
        for p, a in zip(params, anchor):
            p.grad.add_(p.detach() - a, alpha=mu)  # type: ignore[union-attr]
    return per_site_mean(pair_loss.detach(), (row_counts > 0).to(pair_loss.dtype), index, num_sites, empty=math.nan)


def _loss_metrics(losses: torch.Tensor) -> list[dict[str, float]]:
    """Each site's mean and last loss over the steps that had rows of it, from its row of `losses` [sites, steps]
    (under DP-SGD a draw may take none: nan), for all sites at once (a loop of tensor ops a site took ~15 ms at
    128 sites)."""
    taken = ~losses.isnan()
    mean = losses.nan_to_num().sum(1) / taken.sum(1)  # nan where a site took no row at all
    last_taken = (taken * torch.arange(1, losses.shape[1] + 1)).argmax(1)
    last = losses.gather(1, last_taken[:, None])[:, 0]
    return [{"train_loss": m, "train_loss_last": v} for m, v in zip(mean.tolist(), last.tolist())]


class _Encodings(Sequence[Encoded]):
    """A site's pairs, each tokenized on first use (`encoded_pair`), so that in the first round a step's new rows
    are encoded while the GPU still runs the step before (128 sites' pairs take ~0.3 s to encode on a 2-core CPU)."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, pairs: Sequence[PromptPair], max_length: int) -> None:
        self.tokenizer, self.pairs, self.max_length = tokenizer, pairs, max_length

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, i):  # type: ignore[no-untyped-def,override]
        return encoded_pair(self.tokenizer, self.pairs[i], self.max_length)


def grouped_batch(chosen: Sequence[Sequence[Encoded]], pad: int,
                  device: torch.device) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """One grouped step's batch (on `device`, copied without waiting) and each row's site (on the host).

    Rows come site after site, every site's run filled up to the longest with empty rows (one pad token, no
    counted label): the grouped layers then take their reshaping path, and an empty row adds exactly nothing to
    any loss or gradient. Padding is on the right and no attention mask is passed: the causal mask alone keeps
    every real token from seeing the padding after it, and attention runs as plain causal attention (flash).
    """
    per = max(1, *(len(rows) for rows in chosen))  # a Poisson draw may take no row of any site
    empty = ([pad], [-100])
    rows = [row for site_rows in chosen for row in [*site_rows, *[empty] * (per - len(site_rows))]]
    batch = pad_batch(rows, pad)
    del batch["attention_mask"]
    index = torch.arange(len(chosen)).repeat_interleave(per)
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}, index
