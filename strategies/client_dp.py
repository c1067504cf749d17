"""Client-level DP per aggregation group (`privacy.mode=client_dp`): Flower's own central-DP wrapper around each
group's strategy, with Flower's RDP accountant.

What is protected is a site's whole data: each site clips its update (its change of the adapter, A and B
together) to `privacy.max_grad_norm` before sending it (Flower's `fixedclipping_mod`, on the train handler
only), and the server adds N(0, (noise_multiplier x max_grad_norm / sites sampled)^2) to the group's mean.
That sensitivity holds only for the plain mean of the clipped updates, so every site weighs the same (the key
`unit-weight`, 1 from every site) and the inner strategy must aggregate as FedAvg does (fedavg or fedprox).
Rounds are composed without sampling amplification (Flower supports no other for fixed clipping), so epsilon
grows with the rounds whatever `federation.fraction_train`; its population is the group's sites.

The noise is per coordinate while the signal is at most `max_grad_norm` in norm: with a handful of sites a
group it buries the update; client-level DP pays off with hundreds of sites a group.
"""

from __future__ import annotations

import math

from flwr.serverapp import GaussianPrivacyEvent, NeighboringRelation, RdpAccountant, SamplingMethod
from flwr.serverapp import PrivacyConfig as AccountingConfig
from flwr.serverapp.strategy import DifferentialPrivacyClientSideFixedClipping, Strategy

from fed_netgpt.config import PrivacyConfig


def sites_sampled(num_sites: int, fraction_train: float) -> int:
    """How many of a group's sites FedAvg samples a round (its own rule, at least one)."""
    return max(int(num_sites * fraction_train), 1)


def accountant_for(privacy: PrivacyConfig, num_sites: int) -> RdpAccountant:
    """Flower's RDP accountant of one group: add-or-remove one site, no sampling amplification."""
    limit = privacy.target_epsilon if math.isfinite(privacy.target_epsilon) else None
    return RdpAccountant(AccountingConfig(target_delta=privacy.delta, population_size=num_sites,
                                          neighboring_relation=NeighboringRelation.ADD_OR_REMOVE_ONE,
                                          sampling_method=SamplingMethod.NO_AMPLIFICATION, max_epsilon=limit))


def epsilon_after(privacy: PrivacyConfig, noise_multiplier: float, rounds: int, num_sites: int = 1) -> float:
    """A group's epsilon after `rounds` noisy means at `noise_multiplier` (the same accountant as the run's)."""
    accountant = accountant_for(privacy, num_sites)
    accountant.compose(GaussianPrivacyEvent(noise_multiplier, num_sites, num_sites), count=rounds)
    return accountant.get_epsilon(privacy.delta)


def client_noise_multiplier(privacy: PrivacyConfig, rounds: int) -> float:
    """`privacy.noise_multiplier` when set, else the smallest (to 0.1%) that ends `rounds` rounds within
    `privacy.target_epsilon` (bisection over the accountant, which is monotone in the noise)."""
    if privacy.noise_multiplier > 0:
        return privacy.noise_multiplier
    low, high = 1e-3, 1.0
    while epsilon_after(privacy, high, rounds) > privacy.target_epsilon:
        low, high = high, high * 2
    while high - low > 1e-3 * high:
        middle = (low + high) / 2
        low, high = (middle, high) if epsilon_after(privacy, middle, rounds) > privacy.target_epsilon else (low, middle)
    return high


def sample_shortfall(strategy: Strategy, connected: int) -> str | None:
    """Why a client_dp group cannot release a mean this round, or None: with fewer of its sites connected the
    inner strategy samples fewer than the noise is sized for (Flower's wrapper refuses that round)."""
    if not isinstance(strategy, DifferentialPrivacyClientSideFixedClipping):
        return None
    fraction = strategy.strategy.fraction_train  # type: ignore[attr-defined]  # typed Strategy; a FedAvg (registry.py)
    sampled = sites_sampled(connected, fraction)
    if sampled == strategy.num_sampled_clients:
        return None
    return (f"{connected} of its sites are connected, {sampled} would be sampled, and its client_dp noise is sized "
            f"for {strategy.num_sampled_clients}")


def with_client_dp(strategy: Strategy, privacy: PrivacyConfig, num_sites: int, fraction_train: float,
                   num_rounds: int, rounds_done: int = 0) -> DifferentialPrivacyClientSideFixedClipping:
    """`strategy` (one group's, over `num_sites` sites) behind Flower's client-side fixed-clipping wrapper; a
    resumed run's accountant starts with the rounds already released."""
    noise = client_noise_multiplier(privacy, num_rounds)
    accountant = accountant_for(privacy, num_sites)
    sampled = sites_sampled(num_sites, fraction_train)
    if rounds_done:
        accountant.compose(GaussianPrivacyEvent(noise, sampled, num_sites), count=rounds_done)
    return DifferentialPrivacyClientSideFixedClipping(strategy, noise, privacy.max_grad_norm, sampled,
                                                      accountant=accountant)
