"""Fault injection for simulations: sites that crash or stall at random, and poisoned sites that send bad updates,
to show a federation finishes without the first two and survives the third (with `federation.robust`).

Every draw is seeded by the run seed (and the round and site where it varies), so a rerun injects the same faults
whichever node or process trains the site.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping

import numpy as np

from fed_netgpt.config import POISON_KINDS
from fed_netgpt.model.adapters import l2_norm


class InjectedCrash(RuntimeError):
    """A site's training stopped on purpose (`faults.crash_probability`)."""


def _generator(*parts: object) -> np.random.Generator:
    digest = hashlib.sha256("/".join(map(str, parts)).encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "little"))


def drawn(probability: float, seed: int, fault: str, server_round: int, site_id: str) -> bool:
    """Whether `fault` strikes `site_id` in `server_round` (probability `probability`, reproducible); each fault
    draws from its own stream (crashes from the first one, unnamed, so earlier runs crash the same sites)."""
    if probability <= 0:
        return False
    stream = (fault,) if fault else ()
    return bool(_generator(seed, *stream, server_round, site_id).random() < probability)


def crashes(probability: float, seed: int, server_round: int, site_id: str) -> bool:
    """Whether `site_id` crashes in `server_round` (`faults.crash_probability`)."""
    return drawn(probability, seed, "", server_round, site_id)


def is_slow(probability: float, seed: int, server_round: int, site_id: str) -> bool:
    """Whether `site_id` stalls before training in `server_round` (`faults.slow_probability`)."""
    return drawn(probability, seed, "slow", server_round, site_id)


def poisoned_count(fraction: float, num_sites: int) -> int:
    """How many of a region's `num_sites` sites are poisoned: `fraction` x sites rounded to the nearest whole site,
    halves up (20 % of 10 -> 2, of 4 -> 1, of 2 -> 0), never all of them."""
    return min(int(np.floor(fraction * num_sites + 0.5)), max(num_sites - 1, 0))


def poisoned_sites(fraction: float, seed: int, site_regions: Mapping[str, str]) -> set[str]:
    """The sites (`site_regions`: site id -> region) compromised for the whole run: per region a seeded draw of
    `poisoned_count` of its sites, the same whatever order the sites come in."""
    by_region: dict[str, list[str]] = {}
    for site_id, region in site_regions.items():
        by_region.setdefault(region, []).append(site_id)
    chosen: set[str] = set()
    for region, sites in sorted(by_region.items()):
        ordered = sorted(sites)
        count = poisoned_count(fraction, len(ordered))
        order = _generator(seed, "poison", region, *ordered).permutation(len(ordered))
        chosen.update(ordered[i] for i in order[:count])
    return chosen


def poison_update(state: Mapping[str, np.ndarray], start: Mapping[str, np.ndarray], kind: str, scale: float,
                  seed: int, server_round: int, site_id: str) -> dict[str, np.ndarray]:
    """What a compromised site sends instead of its trained `state` (received as `start`), with d = state - start:
    `scale`: start + scale·d (an update boosted to dominate the mean); `sign_flip`: start - scale·d (pushed the
    other way); `random`: start + Gaussian noise of norm scale·|d| (no signal at all). Same keys and dtypes."""
    if kind not in POISON_KINDS:
        raise ValueError(f"poison kind must be one of {', '.join(POISON_KINDS)}; got {kind!r}")
    deltas = {key: np.asarray(state[key], np.float64) - np.asarray(start[key], np.float64) for key in start}
    if kind == "random":
        rng = _generator(seed, "poison", server_round, site_id)
        noise = {key: rng.standard_normal(d.shape) for key, d in deltas.items()}
        deltas = {key: n * (scale * l2_norm(deltas) / (l2_norm(noise) or 1.0)) for key, n in noise.items()}
    else:
        factor = scale if kind == "scale" else -scale
        deltas = {key: factor * d for key, d in deltas.items()}
    return {key: (np.asarray(start[key], np.float64) + deltas[key]).astype(np.asarray(state[key]).dtype)
            for key in start}
