"""From config to per-site train/test splits; a site's partition id is its place among the sorted site ids."""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Hashable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from fed_netgpt.config import DataConfig
from fed_netgpt.data.geography import select_sites
from fed_netgpt.data.prompts import build_pairs
from fed_netgpt.data.schema import DataError, PromptPair, read_jsonl


@dataclass(frozen=True)
class SiteData:
    site_id: str
    region: str
    train: tuple[PromptPair, ...]
    test: tuple[PromptPair, ...]
    valid: tuple[PromptPair, ...] = ()

    @property
    def heldout(self) -> bool:
        """A site with no training pair never trains and is no node: its region's adapter serves it."""
        return not self.train


def load_pairs(config: DataConfig) -> list[PromptPair]:
    """The user's JSONL (`data.path`) as-is after validation, else pairs built from real geography."""
    return list(_cached(config)[0])


def load_sites(config: DataConfig) -> list[SiteData]:
    """The training sites (Flower nodes, in partition-id order) of `load_pairs(config)`; computed once."""
    return [site for site in _cached(config)[1] if not site.heldout]


def load_heldout_sites(config: DataConfig) -> list[SiteData]:
    """The sites that never train (every pair of theirs is a test pair): cold start for their region."""
    return [site for site in _cached(config)[1] if site.heldout]


_Loaded = tuple[tuple[PromptPair, ...], tuple[SiteData, ...]]
_LOADED: dict[Hashable, _Loaded] = {}  # process-wide on purpose: every site of a worker reads the same data once
_LOADED_MAX = 4


def _cached(config: DataConfig) -> _Loaded:
    """The pairs and sites of `config`, read once per process for each data config and JSONL file version."""
    key = (_frozen(dataclasses.asdict(config)), _file_version(config.path))
    if key not in _LOADED:
        if len(_LOADED) >= _LOADED_MAX:
            del _LOADED[next(iter(_LOADED))]  # the oldest
        pairs = _resolve_splits(config)
        _LOADED[key] = pairs, tuple(site_datasets(list(pairs)))
    return _LOADED[key]


def _frozen(value: Any) -> Hashable:
    """A config's fields as a hashable value (lists to tuples, dicts to sorted items)."""
    if isinstance(value, dict):
        return tuple(sorted((k, _frozen(v)) for k, v in value.items()))
    if isinstance(value, list | tuple):
        return tuple(_frozen(v) for v in value)
    return value


def _file_version(path: str) -> tuple[int, int] | None:
    """A JSONL rewritten in place is read again (its modification time and size change)."""
    try:
        stat = Path(path).stat() if path else None
    except OSError:
        return None  # read_jsonl names the missing file
    return (stat.st_mtime_ns, stat.st_size) if stat else None


def _resolve_splits(config: DataConfig) -> tuple[PromptPair, ...]:
    if config.path:
        pairs = read_jsonl(config.path)
    else:
        pairs = build_pairs(select_sites(config), config)
    return tuple(
        pair if pair.split else replace(pair, split=assign_split(pair, config.test_fraction, config.seed,
                                                                 config.valid_fraction))
        for pair in pairs
    )


def assign_split(pair: PromptPair, test_fraction: float, seed: int, valid_fraction: float = 0.0) -> str:
    """A stable per-pair draw: the same line lands in the same split on every machine.

    `test_fraction` of the lines go to test, `valid_fraction` of the others to valid, the rest to train.
    """
    digest = hashlib.sha256(f"{seed}|{pair.site_id}|{pair.prompt}|{pair.completion}".encode()).digest()
    draw = int.from_bytes(digest[:8], "big") / 2**64
    if draw < test_fraction:
        return "test"
    return "valid" if (draw - test_fraction) / (1 - test_fraction) < valid_fraction else "train"


def site_datasets(pairs: list[PromptPair]) -> list[SiteData]:
    """One `SiteData` per site in partition-id order: the sorted site ids, the numbering Flower Datasets'
    NaturalIdPartitioner gives a `site_id` column (a unit test holds the two equal; importing it here would cost
    every process, the simulation's and each Ray worker's, 1.3 s: `datasets`, then seaborn and scipy through
    `flwr_datasets`). Each site's pairs keep their input order."""
    regions: dict[str, str] = {}
    by_site: dict[str, list[PromptPair]] = {}
    for pair in pairs:
        if regions.setdefault(pair.site_id, pair.region) != pair.region:
            raise DataError(
                f"site {pair.site_id!r} appears in two regions: {regions[pair.site_id]!r} and {pair.region!r}"
            )
        by_site.setdefault(pair.site_id, []).append(pair)
    sites = []
    for site_id in sorted(by_site):
        split = {name: tuple(p for p in by_site[site_id] if p.split == name) for name in ("train", "valid", "test")}
        if not split["train"] and not split["test"]:
            raise DataError(f"site {site_id!r} has neither training nor test pairs (only 'valid' ones)")
        sites.append(SiteData(site_id=site_id, region=regions[site_id], **split))
    return sites
