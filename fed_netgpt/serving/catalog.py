"""What a run folder serves: its adapters, its sites and regions, and which adapter serves whom.

`runs.serving_adapter` stays the one place that decides a site's adapter (its own personalized one, else its
region's); the catalog asks it once per site of the run's data when the run is loaded, and keeps the answers.
A site the run's data does not know is served by the region the request names (a new site: cold start).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from fed_netgpt.config import Config, LoraConfig
from fed_netgpt.data.schema import DataError
from fed_netgpt.data.sites import load_pairs
from fed_netgpt.model.adapters import AdapterError, lora_config_from_json, read_adapter
from fed_netgpt.run.folder import (
    RunFolderError,
    adapter_dir,
    check_finished,
    published,
    read_run_config,
    run_regions,
    serving_adapter,
    site_records,
)


class UnknownTarget(LookupError):
    """A request names a site, region or model the service does not serve; the message lists what it does."""


@dataclass(frozen=True)
class Target:
    """Whom a request is for: the adapter folder serving it (None: the base model) and the site's context."""

    name: str  # the site id, the region, or the base model's name
    region: str
    adapter: Path | None
    context: str = ""


@dataclass(frozen=True)
class Catalog:
    """A snapshot of a run folder: the adapter folders in slot order and every site's and region's target."""

    base_name: str
    run: Path | None = None
    lora: LoraConfig | None = None
    adapters: tuple[Path, ...] = ()
    sites: dict[str, Target] = field(default_factory=dict)
    regions: dict[str, Target] = field(default_factory=dict)
    marker: dict | None = None  # the run's published.json when it was read

    def slot(self, target: Target) -> int:
        """The engine slot of a target's adapter (0: the base model)."""
        return 0 if target.adapter is None else self.adapters.index(target.adapter) + 1

    def model_names(self) -> list[str]:
        """The names the OpenAI `model` field accepts: the base model, then regions, then sites."""
        return [self.base_name, *sorted(self.regions), *sorted(set(self.sites) - set(self.regions))]

    def resolve(self, site_id: str = "", region: str = "") -> Target:
        """The target of a request for `site_id` (and/or `region`); UnknownTarget says what is served instead."""
        site = self.sites.get(site_id) if site_id else None
        if site is not None:
            if region and region != site.region:
                raise UnknownTarget(f"site {site_id!r} is in region {site.region!r}, not {region!r}")
            return site
        if region in self.regions:
            known = self.regions[region]
            return Target(site_id or region, region, known.adapter, "")
        if region:
            served = ", ".join(sorted(self.regions)) or "none"
            raise UnknownTarget(f"region {region!r} has no adapter in the run; regions served: {served}")
        raise UnknownTarget(f"unknown site {site_id!r}; pass its region, or use a site of the run "
                            f"({', '.join(sorted(self.sites)[:8]) or 'none'}{', ...' if len(self.sites) > 8 else ''})")

    def model(self, name: str) -> Target:
        """The target an OpenAI `model` field names: the base model, a region, or a site."""
        if name == self.base_name:
            return Target(name, "", None, "")
        if name in self.sites:
            return self.sites[name]
        if name in self.regions:
            return self.regions[name]
        raise UnknownTarget(f"unknown model {name!r}; GET /v1/models lists the {len(self.model_names())} served")


def run_catalog(folder: Path) -> tuple[Catalog, Config]:
    """Read a finished run folder: its config, every region's adapter and every known site's target."""
    config = read_run_config(folder)
    check_finished(folder, config)
    marker = published(folder)
    regions = {region: adapter_dir(folder, region) for region in run_regions(folder)}
    try:
        pairs = load_pairs(config.data)
    except DataError as err:  # the run's JSONL moved: sites come from the run's metrics (no context then)
        print(f"serving: the run's data is not readable ({err}); sites are those metrics.jsonl names", flush=True)
        pairs = []
    known = {p.site_id: (p.region, p.context) for p in reversed(pairs)}  # reversed: a site's first pair wins
    for record in site_records(folder):
        known.setdefault(record["site_id"], (record.get("region", ""), ""))
    sites: dict[str, Target] = {}
    for site_id, (region, context) in sorted(known.items()):
        try:
            adapter = serving_adapter(folder, config, region, site_id)
        except RunFolderError:
            continue  # a region the run has no adapter for
        sites[site_id] = Target(site_id, region, adapter, context)
    targets = {name: Target(name, name, path, "") for name, path in regions.items()}
    if not targets and not any(t.adapter for t in sites.values()):
        raise RunFolderError(f"{folder} has no adapters to serve (adapters/ and site_adapters/ are empty)")
    used = {t.adapter for t in (*targets.values(), *sites.values()) if t.adapter is not None}
    return Catalog(config.model.name, folder, config.lora, tuple(sorted(used)), sites, targets, marker), config


def read_states(catalog: Catalog) -> list:
    """The adapter arrays in slot order; an adapter whose LoRA settings differ from the run's is an error."""
    states = []
    for folder in catalog.adapters:
        adapter_config, state = read_adapter(folder)
        lora = lora_config_from_json(adapter_config, f"{folder}/adapter_config.json")
        expected = catalog.lora
        if expected is not None and (lora.r, lora.alpha, sorted(lora.target_modules)) != (
                expected.r, expected.alpha, sorted(expected.target_modules)):
            raise AdapterError(f"{folder}: LoRA r={lora.r}, alpha={lora.alpha}, targets {lora.target_modules} differ "
                               f"from the run's lora settings")
        states.append(state)
    return states
