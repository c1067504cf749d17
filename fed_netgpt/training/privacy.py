"""Sample-level differential privacy at a site (`privacy.mode=sample_dp`): DP-SGD on the LoRA weights by Opacus's
rules and accountant, where the privacy unit is one prompt pair (one sequence). The training itself is the
engine's (`engine.train_sites`, a job with a `SiteAccountant`); this module holds the accounting and the noise.

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
  batched matmuls a layer; `opacus`, Opacus's `GradSampleModule` hooks and `DPOptimizer` (`reference.py`). A
  float64 test holds the first equal to the second. The hooks add per-layer kernels from Python: on a GPU, where
  a step is bound by launches, they cost ~2x a plain step against the grouped layer's ~1.2x. Hook mode, not ghost
  clipping: LoRA's per-pair gradients are r x width per layer (a few MB a batch), so ghost clipping has little
  memory to save here.
- **A proximal pull survives.** FedProx's and Ditto's term depends on no data, so its gradient is added to the
  privatised gradient (post-processing costs no privacy); Opacus alone would overwrite `p.grad` and drop it.
- **Fresh randomness.** Draws and noise come from the operating system, never from a seed the server knows
  (it could regenerate the noise and subtract it); `privacy.reproducible` seeds them per site for experiments.
- **Cumulative accounting.** The RDP accountant's history [(noise_multiplier, q, steps), ...] is the site's
  state across rounds, so epsilon covers the whole run; a round that would take it past `target_epsilon` is
  refused before any step.
"""

from __future__ import annotations

import functools
import hashlib
import math
import random
import secrets
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TypeVar

import torch

from fed_netgpt.config import PrivacyConfig, TrainConfig

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
    a 2-core CPU, and every site asks again every round (a node packing 128 sites asked 384 times a round).
    Opacus is imported here and in `_rdp_epsilon`, where it is used: at import it loads its engine and scipy.stats,
    0.6 s of every process's start, runs without DP included."""
    from opacus.accountants.utils import get_noise_multiplier

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
    from opacus.accountants import RDPAccountant

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


class SiteAccountant:
    """One site's DP-SGD across a run: every private training of the site (its federated adapter, its personal
    adapter) draws on the same accountant, so epsilon covers all that the site's data shaped."""

    def __init__(self, privacy: PrivacyConfig, planned_steps: int, history: History) -> None:
        self.privacy, self.planned_steps = privacy, planned_steps
        self.history = as_history(history)

    def plan(self, num_pairs: int, config: TrainConfig) -> tuple[float, float]:
        """(noise multiplier, sample rate) of the site's next round; `BudgetSpent` if it would pass the target."""
        return plan_round(self.privacy, self.history, num_pairs, config, self.planned_steps)

    def spent(self) -> dict[str, float]:
        """epsilon, delta, the cumulative step count so far, and the latest steps' noise and sample rate."""
        return privacy_spent(self.history, self.privacy.delta).metrics()


def dp_seed(privacy: PrivacyConfig, train_seed: int, site: str, seed: int, history: History) -> int | None:
    """The seed of one private training's randomness (its Poisson draws and its noise), or None: the operating
    system's randomness, the default. Under `privacy.reproducible` it comes from `train.seed`, the site, the
    training's seed (the round) and the steps the site has taken, so a site draws the same batches and noise
    whichever node trains it, alone or packed, and its federated and personal passes draw apart. Whoever knows
    train.seed can then regenerate the noise and remove it: that mode is for experiments, never for real users."""
    if not privacy.reproducible:
        return None
    steps = sum(n for _, _, n in as_history(history))
    digest = hashlib.sha256(f"{train_seed}/{site}/{seed}/{steps}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1  # 63 bits: what torch.Generator.manual_seed takes


class GroupedDPSGD:
    """DP-SGD for the sites of one grouped pass (`engine.train_sites` with accountants), each site as Opacus
    would train it alone: Poisson sampling at its own rate, each pair's gradient clipped to `max_grad_norm`, the
    site's clipped sum plus N(0, (its noise multiplier x max_grad_norm)^2) per number, divided by its expected
    batch size. Opacus cannot hook the grouped layer, so the layer keeps each pair's gradient
    (`grouped_lora.RowGradients`) and this applies Opacus's rules; a test holds the result equal to Opacus's own
    DPOptimizer on the same pairs. Each site draws from its own random streams (`seeds`; None: the operating
    system's randomness for its draws, a generator seeded from it for its noise), so what a site draws never
    depends on the sites packed with it."""

    def __init__(self, max_grad_norm: float, plans: Sequence[tuple[float, float]], sizes: Sequence[int],
                 seeds: Sequence[int | None] | None = None) -> None:
        self.max_grad_norm = max_grad_norm
        self.plans = list(plans)
        self.seeds = list(seeds or [None] * len(self.plans))
        self.noise_std = [noise * max_grad_norm for noise, _ in plans]
        self.expected = [expected_batch(rate, n) for (_, rate), n in zip(plans, sizes)]
        self.generators: list[torch.Generator] = []
        self._tensors: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}

    def draws(self, sites: Sequence[Sequence[Row]]) -> list[Iterator[list[Row]]]:
        """Each site's endless Poisson-sampled batches, from its own stream."""
        def draw(rows: Sequence[Row], rate: float, rng: random.Random) -> Iterator[list[Row]]:
            while True:
                yield [rows[i] for i in poisson_batch(len(rows), rate, rng)]
        return [draw(rows, rate, random.SystemRandom() if seed is None else random.Random(seed))
                for rows, (_, rate), seed in zip(sites, self.plans, self.seeds)]

    def privatize(self, clipped_sums: dict[torch.nn.Parameter, torch.Tensor]) -> None:
        """Set each stacked factor's `.grad`: site k's slice is its clipped sum, noised and averaged. Site k's
        noise for all factors is one draw from its own generator, laid out factor after factor."""
        sums = list(clipped_sums.values())
        if not sums:
            return
        first = sums[0]
        sizes = [total[0].numel() for total in sums]
        noise = torch.empty(len(self.plans), sum(sizes), dtype=first.dtype, device=first.device)
        for row, generator in zip(noise, self._generators(first.device)):
            row.normal_(generator=generator)
        offset = 0
        for (param, total), size in zip(clipped_sums.items(), sizes):
            std, expected = self._per_site(total)
            param.grad = torch.addcmul(total, noise[:, offset : offset + size].view(total.shape), std).div_(expected)
            offset += size

    def _generators(self, device: torch.device) -> list[torch.Generator]:
        if not self.generators or self.generators[0].device != device:
            self.generators = [torch.Generator(device=device).manual_seed(
                secrets.randbits(63) if seed is None else seed) for seed in self.seeds]
        return self.generators

    def _per_site(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Each site's noise std and expected batch size as [K, 1, ...] tensors on `like`'s device, made once (a
        copy to the GPU for each of 240 factors a step cost more than the noise itself)."""
        key = (like.device, like.dtype, like.dim())
        if key not in self._tensors:
            shape = (-1, *[1] * (like.dim() - 1))
            std, expected = (torch.tensor(values, dtype=like.dtype, device=like.device).view(shape)
                             for values in (self.noise_std, self.expected))
            self._tensors[key] = (std, expected)
        return self._tensors[key]


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
