"""Fault injection for simulations: sites that crash at random, to show a federation finishes without them.

A crash is decided per (run seed, round, site) by a seeded generator, so a rerun crashes the same sites in the
same rounds, whichever node or process trains them.
"""

from __future__ import annotations

import hashlib

import numpy as np


class InjectedCrash(RuntimeError):
    """A site's training stopped on purpose (`faults.crash_probability`)."""


def crashes(probability: float, seed: int, server_round: int, site_id: str) -> bool:
    """Whether `site_id` crashes in `server_round` (probability `probability`, reproducible)."""
    if probability <= 0:
        return False
    digest = hashlib.sha256(f"{seed}/{server_round}/{site_id}".encode()).digest()
    return bool(np.random.default_rng(int.from_bytes(digest[:8], "little")).random() < probability)
