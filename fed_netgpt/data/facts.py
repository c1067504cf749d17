"""Which facts a region can know: derived from the data, so a user's JSONL gets the split too.

A fact that appears in the rows of every site of its region (the country, its currency) is region-level: a
regional adapter can learn it. The rest (the city, a time zone only some sites share) is site-level: only a
site's own adapter can know it when the prompt arrives without location. A region of one site has only
region-level facts.
"""

from __future__ import annotations

from collections.abc import Sequence

from fed_netgpt.data.schema import PromptPair
from fed_netgpt.metrics import normalize

REGION, SITE = "region", "site"


def fact_levels(pairs: Sequence[PromptPair]) -> dict[str, dict[str, str]]:
    """`{region: {normalized fact: "region" | "site"}}` over every split of `pairs`."""
    sites: dict[str, set[str]] = {}
    holders: dict[tuple[str, str], set[str]] = {}
    for pair in pairs:
        sites.setdefault(pair.region, set()).add(pair.site_id)
        for fact in pair.facts:
            holders.setdefault((pair.region, normalize(fact)), set()).add(pair.site_id)
    levels: dict[str, dict[str, str]] = {region: {} for region in sites}
    for (region, fact), holding in holders.items():
        levels[region][fact] = REGION if holding == sites[region] else SITE
    return levels


def levels_of(pair: PromptPair, levels: dict[str, dict[str, str]]) -> list[str]:
    """The level of each of `pair.facts`, in order."""
    return [levels[pair.region][normalize(fact)] for fact in pair.facts]


def fact_vocabulary(pairs: Sequence[PromptPair]) -> set[str]:
    """Every fact of the data: a completion that names one that is not its row's own states a wrong fact."""
    return {fact for pair in pairs for fact in pair.facts}
