"""Concise user prompts and their location-completed versions, per intent, for each site."""

from __future__ import annotations

from fed_netgpt.config import ConfigError
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


def site_context(site: Site) -> str:
    """What the edge knows about where the user is: only the site's name, the rest must be learned."""
    return f"site: {site.city}"


def complete_prompt(site: Site, prompt: str) -> str:
    """The reference completion: the prompt prefixed with the site's local facts."""
    return (
        f"I am in {site.city}, {site.country} ({site.timezone} time, prices in {site.currency}). {prompt}"
    )


def build_pairs(sites: list[Site], test_intents: list[str]) -> list[PromptPair]:
    """Every intent's phrasings for every site; `test_intents` form the test split."""
    unknown = sorted(set(test_intents) - set(INTENTS))
    if unknown:
        raise ConfigError(f"data.test_intents: unknown intent(s) {unknown}; known: {', '.join(INTENTS)}")
    return [
        PromptPair(
            site_id=site.site_id, region=site.region, prompt=prompt, completion=complete_prompt(site, prompt),
            context=site_context(site), facts=site.facts, split="test" if intent in test_intents else "train",
        )
        for site in sites
        for intent, phrasings in INTENTS.items()
        for prompt in phrasings
    ]
