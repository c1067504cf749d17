"""Concise user prompts and their location-completed versions, per intent, for each site.

The NetGPT setting: the edge model runs at its site, so a user's concise prompt arrives with no location
(`data.context=none`) and the site's or region's adapter must add it. Completions state five real facts: the city
(site-level) and the country, time zone, currency and calling code (region-level where every site of the region
shares them; the level is derived from the data, `fed_netgpt.data.facts`). Four completion templates, drawn per
pair, keep the test from rewarding one memorised string. Sites hold unequal amounts of data: the k-th biggest site
of a region gets max(min_pairs, max_pairs * k^-size_skew) training pairs, a long tail where pooling through the
region matters. The last `heldout_sites_per_region` sites of each region never train (cold start).
"""

from __future__ import annotations

import random

from fed_netgpt.config import ConfigError, DataConfig
from fed_netgpt.data.geography import Site
from fed_netgpt.data.schema import PromptPair

# Each intent is asked a few ways; whole intents are held out for the test split (config: data.test_intents).
INTENTS: dict[str, tuple[str, ...]] = {
    "dinner": ("Where can I get dinner tonight?", "Any good restaurants open now?", "Recommend a place to eat."),
    "weather": ("What's the weather like today?", "Will it rain this afternoon?", "Do I need a jacket today?"),
    "coffee": ("Where can I get a good coffee?", "Find me a cafe nearby.", "Is there a coffee shop open now?"),
    "hotel": ("Find me a hotel for tonight.", "Where should I stay for two nights?", "Any cheap hotels around?"),
    "shopping": ("Where can I buy groceries?", "Is there a supermarket open late?", "Where do locals shop?"),
    "events": ("What events are on this weekend?", "Any concerts tonight?", "What can I do this evening?"),
    "transport": ("How do I get to the airport?", "When is the next train?", "How does public transport work?"),
    "news": ("What's in the local news?", "Summarize today's headlines.", "Any traffic news this morning?"),
    "bank": ("Where is the nearest ATM?", "Can I exchange money here?", "Which bank is open on Saturday?"),
    "sightseeing": ("What should I see today?", "Plan me a half-day walk.", "What are the top sights?"),
    "taxi": ("Call me a taxi.", "How much is a taxi to the center?", "Is there a taxi rank nearby?"),
    "pharmacy": ("Where is a pharmacy open now?", "I need some cold medicine.", "Find a late-night pharmacy."),
    "museum": ("Which museum should I visit?", "Are museums open on Monday?", "Find an art museum."),
}

TEMPLATES = (
    "I am in {city}, {country} ({timezone} time, prices in {currency}, calling code {calling_code}). {request}",
    "{request} For context: I'm in {city}, {country}; time zone {timezone}, currency {currency}, "
    "phone prefix {calling_code}.",
    "Location: {city}, {country}. Time zone: {timezone}. Currency: {currency}. Dialing code: {calling_code}. "
    "Request: {request}",
    "Writing from {city} ({country}, {timezone}, paying in {currency}, country code {calling_code}): {request}",
)


def site_context(site: Site, mode: str) -> str:
    """What the edge tells its model about where it is: nothing (NetGPT), the city, or rounded coordinates."""
    if mode == "none":
        return ""
    if mode == "city":
        return f"site: {site.city}"
    lat, lon = site.latitude, site.longitude
    return f"site: {abs(lat):.1f}{'N' if lat >= 0 else 'S'} {abs(lon):.1f}{'E' if lon >= 0 else 'W'}"


def complete_prompt(site: Site, request: str, template: int = 0) -> str:
    """The reference completion: the request, unchanged, with the site's local facts."""
    return TEMPLATES[template].format(
        city=site.city, country=site.country, timezone=site.timezone, currency=site.currency,
        calling_code=site.calling_code, request=request,
    )


def training_size(rank: int, config: DataConfig) -> int:
    """Training pairs of a region's `rank`-th biggest training site: a long tail, never below the minimum."""
    return max(config.min_pairs_per_site, round(config.max_pairs_per_site * rank ** -config.size_skew))


def heldout_site_ids(sites: list[Site], config: DataConfig) -> set[str]:
    """The last `heldout_sites_per_region` sites of each region, as long as one site of the region trains."""
    by_region: dict[str, list[Site]] = {}
    for site in sites:
        by_region.setdefault(site.region, []).append(site)
    held: set[str] = set()
    for members in by_region.values():
        members = sorted(members, key=lambda s: s.rank)
        training = max(1, len(members) - config.heldout_sites_per_region)
        held |= {s.site_id for s in members[training:]}
    return held


def build_pairs(sites: list[Site], config: DataConfig) -> list[PromptPair]:
    """Every site's pairs: train (a long-tailed sample) and valid from training intents, test from `test_intents`.

    A held-out site gets only test pairs, so it never trains and is no Flower node.
    """
    unknown = sorted(set(config.test_intents) - set(INTENTS))
    if unknown:
        raise ConfigError(f"data.test_intents: unknown intent(s) {unknown}; known: {', '.join(INTENTS)}")
    rng = random.Random(config.seed)
    held_out = heldout_site_ids(sites, config)
    test_prompts = [(i, p) for i in config.test_intents for p in INTENTS[i]]
    train_prompts = [(i, p) for i, phrasings in INTENTS.items() if i not in config.test_intents for p in phrasings]
    pairs: list[PromptPair] = []
    for site in sites:
        def pair(intent: str, request: str, split: str, template: int, site: Site = site) -> PromptPair:
            return PromptPair(
                site_id=site.site_id, region=site.region, prompt=request,
                completion=complete_prompt(site, request, template), context=site_context(site, config.context),
                facts=site.facts, split=split, intent=intent,
            )

        pairs += [pair(i, p, "test", rng.randrange(len(TEMPLATES))) for i, p in test_prompts]
        if site.site_id in held_out:
            continue
        valid = rng.sample(train_prompts, min(config.valid_pairs_per_site, len(train_prompts) - 1))
        pairs += [pair(i, p, "valid", rng.randrange(len(TEMPLATES))) for i, p in valid]
        pool = [(i, p, t) for i, p in train_prompts if (i, p) not in valid for t in range(len(TEMPLATES))]
        chosen = rng.sample(pool, min(training_size(site.rank, config), len(pool)))
        pairs += [pair(i, p, "train", t) for i, p, t in chosen]
    return pairs
