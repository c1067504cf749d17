"""Which facts a region can know: derived from the data, so a user's JSONL gets the split too.

A fact that appears in the rows of every site of its region (the country, its currency) is region-level: a
regional adapter can learn it. The rest (the city, a time zone only some sites share) is site-level: only a
site's own adapter can know it when the prompt arrives without location. A region of one site has only
region-level facts.
"""

from __future__ import annotations

from collections.abc import Sequence

from fed_netgpt.data.schema import PromptPair
from fed_netgpt.evaluation.metrics import normalize

REGION, SITE = "region", "site"


def fact_levels(pairs: Sequence[PromptPair]) -> dict[str, dict[str, str]]:
    """`{region: {normalized fact: "region" | "site"}}` over every split of `pairs`."""
    return levels_from_sites(facts_by_site(pairs))


def facts_by_site(pairs: Sequence[PromptPair]) -> dict[str, tuple[str, set[str]]]:
    """`{site_id: (region, its distinct facts)}`: what a site tells the server for a federated report (the
    facts of its rows, never the rows)."""
    sites: dict[str, tuple[str, set[str]]] = {}
    for pair in pairs:
        sites.setdefault(pair.site_id, (pair.region, set()))[1].update(pair.facts)
    return sites


def levels_from_sites(sites: dict[str, tuple[str, set[str]]]) -> dict[str, dict[str, str]]:
    """:func:`fact_levels` from each site's region and facts: region-level when every site of the region has it."""
    members: dict[str, set[str]] = {}
    holders: dict[tuple[str, str], set[str]] = {}
    for site_id, (region, facts) in sites.items():
        members.setdefault(region, set()).add(site_id)
        for fact in facts:
            holders.setdefault((region, normalize(fact)), set()).add(site_id)
    levels: dict[str, dict[str, str]] = {region: {} for region in members}
    for (region, fact), holding in holders.items():
        levels[region][fact] = REGION if holding == members[region] else SITE
    return levels


def levels_of(pair: PromptPair, levels: dict[str, dict[str, str]]) -> list[str]:
    """The level of each of `pair.facts`, in order."""
    return [levels[pair.region][normalize(fact)] for fact in pair.facts]


def fact_vocabulary(pairs: Sequence[PromptPair]) -> set[str]:
    """Every fact of the data: a completion that names one that is not its row's own states a wrong fact."""
    return {fact for pair in pairs for fact in pair.facts}
