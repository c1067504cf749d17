"""Sample-level differential privacy at a site (`privacy.mode=sample_dp`): DP-SGD on the LoRA weights, with
Opacus, where the privacy unit is one prompt pair (one sequence).

What each piece is for:

- **Poisson sampling.** Each step takes every pair of the site independently with probability
  q = batch_size / n: the sampling that the RDP accountant's amplification assumes (a shuffled fixed-size batch
  is not). An empty draw still takes a step (noise only) and is still counted.
- **A loss per sequence.** Each pair's loss is the mean over its own completion tokens and the step sums them; a
  token mean over the whole batch would make one pair's weight depend on the others' lengths.
- **Per-pair gradients, clipped and noised by Opacus's rules.** Each pair's gradient of the trainable LoRA
  weights only is clipped to `max_grad_norm`; the clipped sum gets N(0, (noise_multiplier x max_grad_norm)^2)
  and is divided by the expected batch size. Two engines make the per-pair gradients (`privacy.engine`):
  `grouped` (default), the grouped LoRA layer (`GroupedDPSGD`; a site alone is a grouped pass of one), two
  batched matmuls a layer; `opacus`, Opacus's `GradSampleModule` hooks and `DPOptimizer`. A float64 test holds
  the first equal to the second. The hooks add per-layer kernels from Python: on a GPU, where a step is bound
  by launches, they cost ~2x a plain step against the grouped layer's ~1.2x. Hook mode, not ghost clipping:
  LoRA's per-pair gradients are r x width per layer (a few MB a batch), so ghost clipping has little memory to
  save here.
- **A proximal pull survives.** FedProx's and Ditto's term depends on no data, so its gradient is added to the
  privatised gradient (post-processing costs no privacy); Opacus alone would overwrite `p.grad` and drop it.
- **Cumulative accounting.** The RDP accountant's history [(noise_multiplier, q, steps), ...] is the site's
  state across rounds, so epsilon covers the whole run; a round that would take it past `target_epsilon` is
  refused before any step.
"""

from __future__ import annotations

import functools
import math
import random
import secrets
import time
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TypeVar

import torch
from opacus import GradSampleModule
from opacus.accountants import RDPAccountant
from opacus.accountants.utils import get_noise_multiplier
from opacus.optimizers import DPOptimizer
from peft import PeftModel
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from fed_netgpt.adapters import AdapterState, get_state, lora_config_from_json, set_state, state_of_parameters
from fed_netgpt.config import LoraConfig, PrivacyConfig, TrainConfig
from fed_netgpt.data.schema import PromptPair
from fed_netgpt.training import (
    TrainResult,
    autocast,
    collate,
    on_device,
    precision_for,
    proximal_term,
    token_losses,
    train_grouped,
    trainable_parameters,
)

Row = TypeVar("Row")
History = list[tuple[float, float, int]]  # the RDP accountant's [(noise_multiplier, sample_rate, steps)]


class BudgetSpent(RuntimeError):
    """A round would take the site past `privacy.target_epsilon`: the site does not train."""


@dataclass(frozen=True)
class PrivacySpent:
    """Where a site stands: enough to recompute epsilon with any RDP accountant."""

    epsilon: float
    delta: float
    noise_multiplier: float
    sample_rate: float
    dp_steps: int

    def metrics(self) -> dict[str, float]:
        return {"epsilon": self.epsilon, "delta": self.delta, "noise_multiplier": self.noise_multiplier,
                "sample_rate": self.sample_rate, "dp_steps": float(self.dp_steps)}


def sample_rate(batch_size: int, num_pairs: int) -> float:
    """q: the chance that a step includes a given pair (the expected batch is `batch_size` pairs)."""
    return min(1.0, batch_size / num_pairs)


def expected_batch(rate: float, num_pairs: int) -> int:
    """The pairs a Poisson draw holds on average: what DP-SGD divides the noised sum by (Opacus's rule)."""
    return round(rate * num_pairs)


def noise_multiplier_for(privacy: PrivacyConfig, rate: float, planned_steps: int) -> float:
    """`privacy.noise_multiplier` when set, else the smallest one that keeps epsilon within `target_epsilon`
    after `planned_steps` steps at sample rate `rate` (Opacus's binary search over its RDP accountant)."""
    if privacy.noise_multiplier > 0:
        return privacy.noise_multiplier
    return _searched_noise(privacy.target_epsilon, privacy.delta, rate, planned_steps)


@functools.lru_cache(maxsize=4096)
def _searched_noise(target_epsilon: float, delta: float, rate: float, planned_steps: int) -> float:
    """Opacus's search for the noise multiplier, once a process for each budget, rate and plan: it takes ~1 s on
    a 2-core CPU, and every site asks again every round (a node packing 128 sites asked 384 times a round)."""
    try:
        return float(get_noise_multiplier(target_epsilon=target_epsilon, target_delta=delta, sample_rate=rate,
                                          steps=planned_steps, accountant="rdp"))
    except ValueError as err:  # Opacus: "The privacy budget is too low."
        raise BudgetSpent(f"privacy.target_epsilon={target_epsilon} cannot be reached at sample rate "
                          f"{rate:.3g} over {planned_steps} steps ({err})") from None


def as_history(entries: Sequence[Sequence[float]]) -> History:
    """A history as (noise_multiplier, sample_rate, steps) tuples: JSON gives back lists, Opacus keeps tuples."""
    return [(float(noise), float(rate), int(steps)) for noise, rate, steps in entries]


def epsilon_of(history: History, delta: float) -> float:
    """Epsilon after the steps of `history` (RDP accountant, converted at `delta`); 0 before any step."""
    if not history:
        return 0.0
    return _rdp_epsilon(tuple(as_history(history)), delta)


@functools.lru_cache(maxsize=4096)
def _rdp_epsilon(history: tuple[tuple[float, float, int], ...], delta: float) -> float:
    """Opacus's RDP accountant, once a process for each history and delta: it takes ~0.1 s on a 2-core CPU, and a
    packed round's budget check asks for each site's next epsilon three times (refusal, federated pass, Ditto)."""
    accountant = RDPAccountant()
    accountant.history = list(history)
    return float(accountant.get_epsilon(delta=delta))


def privacy_spent(history: History, delta: float) -> PrivacySpent:
    """Where a history stands: its epsilon at `delta`, its steps, and the noise and rate of its latest steps."""
    noise, rate, _ = history[-1] if history else (0.0, 0.0, 0)
    return PrivacySpent(epsilon_of(history, delta), delta, noise, rate, sum(steps for _, _, steps in history))


def with_steps(history: History, noise: float, rate: float, steps: int) -> History:
    """`history` after `steps` more steps at (noise, rate), merged as Opacus's accountant merges them."""
    history = as_history(history)
    if history and history[-1][:2] == (noise, rate):
        return history[:-1] + [(noise, rate, history[-1][2] + steps)]
    return history + [(noise, rate, steps)]


def check_budget(privacy: PrivacyConfig, history: History, noise: float, rate: float, steps: int) -> None:
    """Refuse a round whose steps would take epsilon past `target_epsilon` (none set: `inf`, never refused)."""
    if math.isinf(privacy.target_epsilon):
        return
    after = epsilon_of(with_steps(history, noise, rate, steps), privacy.delta)
    if after > privacy.target_epsilon * (1 + 1e-9):
        spent = epsilon_of(history, privacy.delta)
        raise BudgetSpent(f"privacy budget spent: epsilon is {spent:.3f}; {steps} more steps would make it "
                          f"{after:.3f} > privacy.target_epsilon={privacy.target_epsilon}")


def plan_round(privacy: PrivacyConfig, history: History, num_pairs: int, config: TrainConfig,
               planned_steps: int) -> tuple[float, float]:
    """A site's (noise multiplier, sample rate) for its next `config.local_steps` private steps; `BudgetSpent`
    when they would take it past `privacy.target_epsilon`."""
    rate = sample_rate(config.batch_size, num_pairs)
    noise = noise_multiplier_for(privacy, rate, planned_steps)
    check_budget(privacy, history, noise, rate, config.local_steps)
    return noise, rate


def poisson_batch(num_pairs: int, rate: float, rng: random.Random) -> list[int]:
    """The indices of one Poisson-sampled batch: each pair in with probability `rate`, independently."""
    return [i for i in range(num_pairs) if rng.random() < rate]


def sequence_losses(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Each row's mean cross-entropy over its own completion tokens (labels != -100), shape [batch]."""
    tokens, counted = token_losses(logits, labels)
    mask = counted.float()
    return (tokens * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)


def train_adapter_private(
    model: PeftModel,
    adapter_name: str,
    tokenizer: PreTrainedTokenizerBase,
    pairs: Sequence[PromptPair],
    config: TrainConfig,
    privacy: PrivacyConfig,
    history: History,
    planned_steps: int,
    *,
    anchor: dict[str, torch.Tensor] | None = None,
    freeze_lora_a: bool = False,
) -> tuple[TrainResult, History]:
    """`training.train_adapter` under DP-SGD: `config.local_steps` Poisson-sampled steps on `pairs`.

    `history` is the site's accountant history before this round; the one returned includes it. Raises
    `BudgetSpent` (and changes nothing) when the round would exceed `privacy.target_epsilon`. The batches and
    the noise come from the operating system's randomness, never from a seed: whoever knew the seed (the
    server sends it) could regenerate the noise and subtract it.
    """
    if not pairs:
        raise ValueError("train_adapter_private needs at least one training pair")
    noise, rate = plan_round(privacy, history, len(pairs), config, planned_steps)
    model.set_adapter(adapter_name)
    device = next(model.parameters()).device
    params = trainable_parameters(model, freeze_lora_a)
    if config.proximal_mu > 0 and anchor is None:
        anchor = {n: p.detach().clone() for n, p in params.items()}
    anchor = anchor if config.proximal_mu > 0 else None
    accountant = RDPAccountant()
    accountant.history = as_history(history)
    optimizer = DPOptimizer(
        torch.optim.AdamW(params.values(), lr=config.learning_rate, weight_decay=config.weight_decay),
        noise_multiplier=noise, max_grad_norm=privacy.max_grad_norm,
        expected_batch_size=expected_batch(rate, len(pairs)), loss_reduction="mean",
        generator=torch.Generator(device=device).manual_seed(secrets.randbits(63)),
    )
    optimizer.attach_step_hook(accountant.get_optimizer_hook_fn(sample_rate=rate))
    per_pair = GradSampleModule(model, batch_first=True, loss_reduction="sum")

    def pair_loss_sum(_: PeftModel, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        logits = per_pair(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        return sequence_losses(logits, batch["labels"]).sum()

    # timed with the per-pair gradients (on a CPU without AMX they made bf16 far slower than fp32), then the
    # timing passes' per-pair gradients are dropped
    first = on_device(collate(tokenizer, pairs[: config.batch_size], config.max_length), device)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Full backward hook is firing", UserWarning)
        precision = precision_for(config, model, first, loss=pair_loss_sum, step="dp-sgd")
    per_pair.zero_grad(set_to_none=True)
    rng = random.SystemRandom()
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
                            p.grad = p.grad + g
                optimizer.original_optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    finally:
        per_pair._close()
        model.eval()
    history = as_history(accountant.history)
    spent = privacy_spent(history, privacy.delta)
    metrics = {
        "train_loss": sum(losses) / len(losses) if losses else math.nan,
        "train_loss_last": losses[-1] if losses else math.nan,
        "train_seconds": time.perf_counter() - started,
        "steps": float(config.local_steps),
        "bf16": float(precision.bf16),
        **spent.metrics(),
    }
    result = TrainResult(state=get_state(model, adapter_name), num_examples=len(pairs), metrics=metrics)
    return result, history


class SiteAccountant:
    """One site's DP-SGD across a run: every private training of the site (its federated adapter, its personal
    adapter) draws on the same accountant, so epsilon covers all that the site's data shaped."""

    def __init__(self, privacy: PrivacyConfig, planned_steps: int, history: History) -> None:
        self.privacy, self.planned_steps = privacy, planned_steps
        self.history = as_history(history)

    def train(self, model: PeftModel, adapter_name: str, tokenizer: PreTrainedTokenizerBase,
              pairs: Sequence[PromptPair], config: TrainConfig, seed: int = 0, *,
              anchor: dict[str, torch.Tensor] | None = None, freeze_lora_a: bool = False) -> TrainResult:
        """`training.train_adapter`'s signature, under DP-SGD (`seed` is not used: DP randomness must not be
        predictable); the history grows with every step taken.

        `privacy.engine=grouped` trains the adapter as a grouped pass of one site (`train_grouped_private`, tested
        equal to Opacus's DPOptimizer; on a GPU ~1.2x a plain step against ~2x with Opacus's hooks, whose per-layer
        Python launches bind the step); `opacus` trains it with Opacus's hooks (`train_adapter_private`)."""
        if self.privacy.engine == "opacus":
            result, self.history = train_adapter_private(model, adapter_name, tokenizer, pairs, config, self.privacy,
                                                         self.history, self.planned_steps, anchor=anchor,
                                                         freeze_lora_a=freeze_lora_a)
            return result
        if not pairs:
            raise ValueError("a private training needs at least one training pair")
        lora = lora_config_from_json(model.peft_config[adapter_name].to_dict(), f"adapter {adapter_name!r}")
        anchors = None if anchor is None else [state_of_parameters(anchor, adapter_name)]
        (result,) = train_grouped_private(model.get_base_model(), tokenizer, [pairs], [get_state(model, adapter_name)],
                                          lora, config, [self], anchors=anchors, freeze_lora_a=freeze_lora_a)
        set_state(model, adapter_name, result.state)
        model.eval()  # as train_adapter leaves it
        return result

    def plan(self, num_pairs: int, config: TrainConfig) -> tuple[float, float]:
        """(noise multiplier, sample rate) of the site's next round; `BudgetSpent` if it would pass the target."""
        return plan_round(self.privacy, self.history, num_pairs, config, self.planned_steps)

    def spent(self) -> dict[str, float]:
        """epsilon, delta, the cumulative step count so far, and the latest steps' noise and sample rate."""
        return privacy_spent(self.history, self.privacy.delta).metrics()


class GroupedDPSGD:
    """DP-SGD for the sites of one grouped pass (`training.train_grouped(private=...)`), each site as
    `train_adapter_private` trains it alone: Poisson sampling at its own rate, each pair's gradient clipped to
    `max_grad_norm`, the site's clipped sum plus N(0, (its noise multiplier x max_grad_norm)^2) per number,
    divided by its expected batch size. Opacus cannot hook the grouped layer, so the layer keeps each pair's
    gradient (`grouped_lora.RowGradients`) and this applies Opacus's rules; a test holds the result equal to
    Opacus's own DPOptimizer on the same pairs."""

    def __init__(self, max_grad_norm: float, plans: Sequence[tuple[float, float]], sizes: Sequence[int]) -> None:
        self.max_grad_norm = max_grad_norm
        self.plans = list(plans)
        self.rng = random.SystemRandom()
        self.noise_std = [noise * max_grad_norm for noise, _ in plans]
        self.expected = [expected_batch(rate, n) for (_, rate), n in zip(plans, sizes)]
        self.generator: torch.Generator | None = None
        self._tensors: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}

    def draws(self, sites: Sequence[Sequence[Row]]) -> list[Iterator[list[Row]]]:
        """Each site's endless Poisson-sampled batches (the operating system's randomness, never a seed)."""
        def draw(rows: Sequence[Row], rate: float) -> Iterator[list[Row]]:
            while True:
                yield [rows[i] for i in poisson_batch(len(rows), rate, self.rng)]
        return [draw(rows, rate) for rows, (_, rate) in zip(sites, self.plans)]

    def privatize(self, clipped_sums: dict[torch.nn.Parameter, torch.Tensor]) -> None:
        """Set each stacked factor's `.grad`: site k's slice is its clipped sum, noised and averaged."""
        for param, total in clipped_sums.items():
            std, expected = self._per_site(total)
            param.grad = torch.addcmul(total, torch.randn(total.shape, generator=self.generator, dtype=total.dtype,
                                                          device=total.device), std).div_(expected)

    def _per_site(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Each site's noise std and expected batch size as [K, 1, ...] tensors on `like`'s device, made once (a
        copy to the GPU for each of 240 factors a step cost more than the noise itself)."""
        key = (like.device, like.dtype, like.dim())
        if key not in self._tensors:
            if self.generator is None or self.generator.device != like.device:
                self.generator = torch.Generator(device=like.device).manual_seed(secrets.randbits(63))
            shape = (-1, *[1] * (like.dim() - 1))
            self._tensors[key] = tuple(torch.tensor(values, dtype=like.dtype, device=like.device).view(shape)
                                       for values in (self.noise_std, self.expected))  # type: ignore[assignment]
        return self._tensors[key]


def train_grouped_private(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase,
                          sites: Sequence[Sequence[PromptPair]], starts: Sequence[AdapterState], lora: LoraConfig,
                          config: TrainConfig, accountants: Sequence[SiteAccountant], *,
                          anchors: Sequence[AdapterState] | None = None,
                          freeze_lora_a: bool = False) -> list[TrainResult]:
    """`training.train_grouped` under DP-SGD, each site drawing on its own accountant (whose history grows by
    the round's steps). Raises `BudgetSpent` before any step if a site's round would pass the target: check
    each site with `SiteAccountant.plan` first and leave the refused ones out."""
    plans = [accountant.plan(len(pairs), config) for accountant, pairs in zip(accountants, sites)]
    private = GroupedDPSGD(accountants[0].privacy.max_grad_norm, plans, [len(pairs) for pairs in sites])
    results = train_grouped(model, tokenizer, sites, starts, lora, config, [0] * len(sites),
                            freeze_lora_a=freeze_lora_a, anchors=anchors, private=private)
    for accountant, (noise, rate), result in zip(accountants, plans, results):
        accountant.history = with_steps(accountant.history, noise, rate, config.local_steps)
        result.metrics.update(accountant.spent())
    return results


def recorded_histories(site_records: Sequence[dict]) -> dict[str, History]:
    """Each site's accountant history as metrics.jsonl recorded it (its noise and sample rate are fixed for a
    run, so its last record's cumulative steps say it all): what a resumed run hands back to the sites, whose
    in-memory state did not survive the restart."""
    latest = {r["site_id"]: r for r in site_records if "dp_steps" in r}
    return {site: [(float(r["noise_multiplier"]), float(r["sample_rate"]), int(r["dp_steps"]))]
            for site, r in latest.items()}


def longer(first: History, second: History) -> History:
    """The history with more steps: a site keeps counting from whichever record of its spending is further."""
    return max(first, second, key=lambda history: sum(steps for _, _, steps in history))


def privacy_report(privacy: PrivacyConfig, site_records: Sequence[dict], rounds: Sequence[dict] = ()) -> dict:
    """report.json's `privacy`: what is protected, and each site's (sample_dp) or region's (client_dp, from the
    round summaries) epsilon at its last release."""
    if privacy.mode == "client_dp":
        return _client_privacy_report(privacy, rounds)
    latest = {r["site_id"]: r for r in site_records if "epsilon" in r}
    spent = sorted({r["site_id"] for r in site_records if "privacy budget spent" in str(r.get("error", ""))})
    sites = {site: {key: r[key] for key in ("epsilon", "noise_multiplier", "sample_rate", "dp_steps") if key in r}
             for site, r in sorted(latest.items())}
    return {
        "mode": privacy.mode,
        "unit": "one prompt pair of a site (one training sequence)",
        "covers": "everything the site's data trained: the updates it sent and its personal adapter",
        "delta": privacy.delta, "max_grad_norm": privacy.max_grad_norm, "target_epsilon": privacy.target_epsilon,
        "epsilon_max": max((s["epsilon"] for s in sites.values()), default=math.nan),
        "sites": sites, "budget_spent": spent,
    }


def _client_privacy_report(privacy: PrivacyConfig, rounds: Sequence[dict]) -> dict:
    regions: dict[str, dict[str, float]] = {}
    for row in rounds:
        for key, value in row.get("train", {}).items():
            region, _, name = key.rpartition("/")
            if name.startswith("client_"):
                regions.setdefault(region, {})[name.removeprefix("client_")] = value
    return {
        "mode": privacy.mode,
        "unit": "one site's whole data (everything it sends in the run)",
        "covers": "the federated adapters the server releases; a site's personal adapter never leaves it and is "
                  "not covered",
        "delta": privacy.delta, "max_grad_norm": privacy.max_grad_norm, "target_epsilon": privacy.target_epsilon,
        "epsilon_max": max((r["epsilon"] for r in regions.values() if "epsilon" in r), default=math.nan),
        "regions": dict(sorted(regions.items())), "budget_spent": [],
    }
