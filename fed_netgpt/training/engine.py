"""The one site-training engine: a site's training is data (`SiteJob`), and `train_sites` trains a list of them as
one grouped pass of K >= 1 sites over the shared frozen base.

Every way a site trains goes through here: a round's federated update (plain, FedProx, FFA-LoRA), sample-level
DP-SGD (a job with an accountant), Ditto's personal pass (a job pulled toward its regional adapter), one site alone
(K = 1) or a node's pack. The grouped pass gives each row its own site's adapter (`grouped_lora`), and site k ends
where training it alone would: each site's loss is the mean over its own tokens and the objective their sum, every
site steps every step (AdamW's moments and bias correction stay per site), and nothing is clipped across sites.

peft's one-adapter loop and Opacus's hooks (`reference.py`) remain as reference engines behind `train.engine=peft`
and `privacy.engine=opacus`; the float64 equivalence tests hold the grouped pass equal to them. Precision is
decided here, in `precision_for`, by timing the step that will run (plain or DP-SGD).
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from fed_netgpt.config import LoraConfig, TrainConfig
from fed_netgpt.data.schema import PromptPair
from fed_netgpt.model.adapters import AdapterState
from fed_netgpt.model.base import BaseModel, cache_root
from fed_netgpt.model.fused import fused_kernels
from fed_netgpt.model.grouped_lora import GroupedAdapters, RowGradients, grouped_adapters
from fed_netgpt.model.precision import Precision, choose_precision, device_name, step_benchmark
from fed_netgpt.training.batches import SiteRows, batches, grouped_batch
from fed_netgpt.training.losses import per_site_mean, row_loss_sums
from fed_netgpt.training.privacy import GroupedDPSGD, SiteAccountant, dp_seed, with_steps

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainResult:
    state: AdapterState
    num_examples: int
    metrics: dict[str, float]


@dataclass(frozen=True)
class SiteJob:
    """One site's training in a pass: what it trains on, where it starts, what pulls it back, its seed, and its
    DP accountant (none: plain training). The pass's step plan (steps, batch, learning rate, proximal weight) is
    the `TrainConfig` that `train_sites` is given."""

    name: str  # the site id: the log, and the seed of its DP randomness under privacy.reproducible
    pairs: Sequence[PromptPair]
    start: AdapterState
    anchor: AdapterState | None = None  # the proximal term's target (mu > 0); None: the start (FedProx)
    seed: int = 0  # this training's seed (the round): batches are shuffled with config.seed + seed
    accountant: SiteAccountant | None = None  # DP-SGD drawing on (and adding to) the site's budget


def train_sites(base: BaseModel, jobs: Sequence[SiteJob], lora: LoraConfig, config: TrainConfig, *,
                freeze_lora_a: bool = False) -> list[TrainResult]:
    """Train every job's adapter, `config.local_steps` AdamW steps each; results in the jobs' order.

    With `config.proximal_mu > 0` each site's loss gains (mu/2)·||w - anchor||². Under DP-SGD (jobs with an
    accountant: all of them or none) each site draws Poisson batches at its own rate, each pair's gradient is
    clipped and the site's sum noised (`privacy.GroupedDPSGD`), the accountant's history grows by the steps, and
    `privacy.BudgetSpent` is raised before any step if a site's round would pass its target (check each with
    `SiteAccountant.plan` first). `freeze_lora_a` (FFA-LoRA) leaves every A at its start.
    """
    if not jobs or not all(job.pairs for job in jobs):
        raise ValueError("train_sites needs at least one job, and training pairs for every job")
    private = [job.accountant is not None for job in jobs]
    if any(private) and not all(private):
        raise ValueError("a pass trains every site under DP-SGD or none: give every job an accountant or none")
    reference = (jobs[0].accountant.privacy.engine == "opacus" if jobs[0].accountant is not None
                 else config.engine == "peft")
    if reference:
        from fed_netgpt.training.reference import train_each_alone  # peft and Opacus: imported where used

        return train_each_alone(base, jobs, lora, config, freeze_lora_a=freeze_lora_a)
    return _train_grouped(base.model, base.tokenizer, jobs, lora, config, freeze_lora_a)


def _train_grouped(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, jobs: Sequence[SiteJob],
                   lora: LoraConfig, config: TrainConfig, freeze_lora_a: bool) -> list[TrainResult]:
    device = next(model.parameters()).device
    pad = int(tokenizer.pad_token_id)
    rows = [SiteRows(tokenizer, job.pairs, config.max_length) for job in jobs]
    private = _grouped_privacy(jobs, config)
    streams = private.draws(rows) if private else [batches(site_rows, config.batch_size, seed=config.seed + job.seed)
                                                   for site_rows, job in zip(rows, jobs)]
    fused = fused_kernels(model) if device.type == "cuda" and config.fused_kernels else contextlib.nullcontext()
    with grouped_adapters(model, lora, len(jobs), fuse_shared_inputs=True) as group, fused:
        params = group.parameters(freeze_lora_a)
        with group.per_row_gradients(params) if private else contextlib.nullcontext() as per_row:
            precision = precision_for(config, model, *_grouped_benchmark(model, group, rows, config, pad, per_row),
                                      kind=f"grouped{'-dp' if private else ''}-{len(jobs)}")
            if per_row is not None:
                per_row.clear()
            anchor = None
            if config.proximal_mu > 0:
                group.load([job.start if job.anchor is None else job.anchor for job in jobs])
                anchor = [p.detach().clone() for p in params]
            group.load([job.start for job in jobs])
            optimizer = torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=config.weight_decay,
                                          fused=device.type == "cuda")  # one kernel for all K sites' factors
            model.train()
            losses, started = [], time.perf_counter()
            for _ in range(config.local_steps):
                batch, index = grouped_batch([next(stream) for stream in streams], pad, device)
                group.select(index)
                with autocast(precision.bf16, device):
                    row_sums, row_counts = row_loss_sums(model, batch)
                index = index.to(device, non_blocking=True)
                pull = (params, anchor, config.proximal_mu) if anchor else None
                if private is None:
                    site_loss = _backward(row_sums, row_counts, index, len(jobs), pull)
                else:
                    assert per_row is not None  # per_row_gradients is entered above whenever private is set
                    site_loss = _private_backward(row_sums, row_counts, index, len(jobs), pull, private, per_row)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                losses.append(site_loss.detach())  # kept on the device: no wait for the GPU between steps
        loss_metrics = _loss_metrics(torch.stack(losses).T.cpu())
        elapsed = time.perf_counter() - started
        states = group.states()
    model.eval()  # the shared base, its own layers back in place, as evaluation and serving expect it
    results = [TrainResult(state=states[k], num_examples=len(job.pairs), metrics={
        **loss_metrics[k], "train_seconds": elapsed / len(jobs), "steps": float(config.local_steps),
        "bf16": float(precision.bf16), "group_size": float(len(jobs))}) for k, job in enumerate(jobs)]
    if private:
        for job, (noise, rate), result in zip(jobs, private.plans, results):
            accountant = job.accountant
            assert accountant is not None  # every job of a private pass has one (checked in train_sites)
            accountant.history = with_steps(accountant.history, noise, rate, config.local_steps)
            result.metrics.update(accountant.spent())
    return results


def _grouped_privacy(jobs: Sequence[SiteJob], config: TrainConfig) -> GroupedDPSGD | None:
    """The pass's DP-SGD (None without accountants): each site's noise and rate from its accountant's plan (which
    refuses a round past the budget), its randomness from the operating system or, under privacy.reproducible,
    from its own seed (so a site draws the same batches and noise however it is packed)."""
    accountants = [job.accountant for job in jobs if job.accountant is not None]
    if not accountants:
        return None
    plans = [accountant.plan(len(job.pairs), config) for accountant, job in zip(accountants, jobs)]
    seeds = [dp_seed(accountant.privacy, config.seed, job.name, job.seed, accountant.history)
             for accountant, job in zip(accountants, jobs)]
    return GroupedDPSGD(accountants[0].privacy.max_grad_norm, plans, [len(job.pairs) for job in jobs], seeds)


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
                      pull: Pull | None, private: GroupedDPSGD, per_row: RowGradients) -> torch.Tensor:
    """DP-SGD gradients: each pair's own token-mean loss, its gradient kept by the layers, clipped, summed per
    site and noised by `private`; a proximal pull mu·(p - anchor) added after (it depends on no data). Each
    site's mean pair loss (nan where its draw was empty)."""
    pair_loss = row_sums / row_counts.clamp(min=1)
    pair_loss.sum().backward()
    private.privatize(per_row.clipped_sums(private.max_grad_norm, num_sites))
    if pull:
        params, anchor, mu = pull
        for p, a in zip(params, anchor):
            assert p.grad is not None  # privatize set every trained factor's gradient
            p.grad.add_(p.detach() - a, alpha=mu)
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


def autocast(enabled: bool, device: torch.device) -> contextlib.AbstractContextManager:
    """bf16 autocast where asked: fp32 master weights, bf16 matmuls (AMX on CPU, tensor cores on GPU)."""
    if not enabled:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


# The precision chosen for each kind of step in this process: kept for the process's life by design (a choice is
# one timing per machine, cached on disk as well; training the next round must not time it again).
PRECISION_CHOSEN: dict[tuple[str, str, str], Precision] = {}


def precision_for(config: TrainConfig, model: torch.nn.Module, batch: dict[str, torch.Tensor],
                  loss: Callable[..., torch.Tensor] | None = None, kind: str = "step") -> Precision:
    """bf16 autocast or fp32 for this machine (`train.bf16`), decided once per process and kind of step, and logged.

    "auto" is a one-off measurement of that very step (`loss(model, batch)` forward and backward) in both
    precisions, cached per processor (and thread count), model, batch size and kind of step: a DP-SGD step's
    per-pair gradients, or a pack of many sites, may favour another precision than one site's plain step.
    """
    device = next(model.parameters()).device
    name = f"{device_name(device)}|{getattr(model, 'name_or_path', '')}|{config.batch_size}" + (
        "" if kind == "step" else f"|{kind}")
    key = (str(config.bf16), str(device), name)  # another model or batch size in this process: its own choice
    if key not in PRECISION_CHOSEN:
        PRECISION_CHOSEN[key] = choose_precision(config.bf16, device, benchmark=step_benchmark(model, batch, loss=loss),
                                                 cache_key=name, cache_file=cache_root() / "precision.json")
        log.info("precision (%s): %s", kind, PRECISION_CHOSEN[key].reason)
    return PRECISION_CHOSEN[key]


def _grouped_benchmark(model: PreTrainedModel, group: GroupedAdapters, rows: Sequence[SiteRows], config: TrainConfig,
                       pad: int, per_row: RowGradients | None
                       ) -> tuple[dict[str, torch.Tensor], Callable[..., torch.Tensor]]:
    """The batch and loss that `precision_for` times: the pass's own step on each site's first `batch_size` pairs
    (no draw from the sites' random streams, so timing or not, training sees the same batches). Under DP-SGD the
    per-pair gradients the timing kept are dropped after each pass."""
    device = next(model.parameters()).device
    batch, index = grouped_batch([[site_rows[i] for i in range(min(len(site_rows), config.batch_size))]
                                  for site_rows in rows], pad, device)
    group.select(index)
    index = index.to(device)

    def loss(m: PreTrainedModel, b: dict[str, torch.Tensor]) -> torch.Tensor:
        if per_row is not None:
            per_row.clear()
        sums, counts = row_loss_sums(m, b)
        if per_row is not None:
            return (sums / counts.clamp(min=1)).sum()
        return per_site_mean(sums, counts, index, len(rows)).sum()

    return batch, loss
