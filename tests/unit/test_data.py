"""fed_netgpt/data: real geography, prompt pairs, the JSONL contract and per-site splits."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from fed_netgpt.config import ConfigError, DataConfig
from fed_netgpt.data.geography import select_sites, slug
from fed_netgpt.data.prompts import INTENTS, build_pairs, complete_prompt
from fed_netgpt.data.schema import DataError, PromptPair, parse_pair, read_jsonl, write_jsonl
from fed_netgpt.data.sites import assign_split, load_pairs, site_datasets

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
    assert by_id["paris"].facts == ("Paris", "France", "Europe/Paris", "EUR")
    assert by_id["paris"].country_code == "FR"
    assert by_id["tokyo"].facts == ("Tokyo", "Japan", "Asia/Tokyo", "JPY")
    assert by_id["sao-paulo"].city == "São Paulo"
    assert by_id["sao-paulo"].currency == "BRL"


def test_sites_per_region_limits_each_region():
    # Execute
    sites = select_sites(DataConfig(countries=["FR", "jp"], sites_per_region=2))

    # Assert: lower-case codes work too
    assert [(s.region, s.site_id) for s in sites] == [
        ("france", "paris"),
        ("france", "marseille"),
        ("japan", "tokyo"),
        ("japan", "yokohama"),
    ]


def test_region_by_continent_gives_one_city_per_country():
    # Execute
    sites = select_sites(DataConfig(region_by="continent", continents=["EU", "AS", "SA"], sites_per_region=4))

    # Assert
    assert sorted({s.region for s in sites}) == ["asia", "europe", "south-america"]
    for region in ("europe", "asia", "south-america"):
        codes = [s.country_code for s in sites if s.region == region]
        assert len(codes) == 4
        assert len(set(codes)) == 4, f"{region} repeats a country: {codes}"
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
    assert sites[1].facts == ("Paris", "France", "Europe/Paris", "EUR")


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


def test_slug_is_ascii_lowercase_with_dashes():
    # Execute / Assert
    assert slug("São Paulo") == "sao-paulo"
    assert slug("  Rio de Janeiro! ") == "rio-de-janeiro"


# ---- prompt pairs ----------------------------------------------------------------------------


def test_build_pairs_holds_out_exactly_the_test_intents(default_config):
    # Prepare
    sites = select_sites(replace(default_config.data, countries=["FR"], sites_per_region=2))
    test_intents = ["taxi", "museum"]

    # Execute
    pairs = build_pairs(sites, test_intents)

    # Assert
    held_out = {prompt for intent in test_intents for prompt in INTENTS[intent]}
    assert len(pairs) == 2 * sum(len(v) for v in INTENTS.values())
    for site in sites:
        mine = [p for p in pairs if p.site_id == site.site_id]
        assert {p.prompt for p in mine if p.split == "test"} == held_out
        assert len([p for p in mine if p.split == "test"]) == len(held_out) == 6
        assert not held_out & {p.prompt for p in mine if p.split == "train"}


def test_build_pairs_completions_contain_every_fact_and_the_prompt(default_pairs):
    # Execute / Assert
    for pair in default_pairs:
        assert pair.facts and all(fact in pair.completion for fact in pair.facts)
        assert pair.completion.endswith(pair.prompt)
        assert pair.context == f"site: {pair.facts[0]}"


def test_complete_prompt_reads_as_specified(default_config):
    # Prepare
    paris = select_sites(default_config.data)[0]

    # Execute
    text = complete_prompt(paris, "Call me a taxi.")

    # Assert
    assert text == "I am in Paris, France (Europe/Paris time, prices in EUR). Call me a taxi."


def test_build_pairs_rejects_unknown_test_intent(default_config):
    # Prepare
    sites = select_sites(default_config.data)[:1]

    # Execute / Assert
    with pytest.raises(ConfigError, match=r"unknown intent\(s\) \['karaoke'\]"):
        build_pairs(sites, ["taxi", "karaoke"])


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
        ({"split": "validation"}, "field 'split' must be 'train' or 'test', got 'validation'"),
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


def test_write_jsonl_read_jsonl_round_trip(tmp_path, default_pairs):
    # Prepare
    sao_paulo = next(p for p in default_pairs if p.site_id == "sao-paulo")
    pairs = default_pairs[:5] + [sao_paulo, PromptPair("x", "r", "p", "c")]

    # Execute
    path = write_jsonl(pairs, tmp_path / "sub" / "pairs.jsonl")

    # Assert
    assert read_jsonl(path) == pairs
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
    ]

    # Execute
    sites = site_datasets(pairs)

    # Assert
    assert [s.site_id for s in sites] == ["lyon", "paris", "tokyo"]
    assert [s.region for s in sites] == ["france", "france", "japan"]
    assert [(len(s.train), len(s.test)) for s in sites] == [(2, 1), (2, 0), (1, 1)]
    assert [p.prompt for p in sites[0].train] == ["a", "b"]
    assert sites[0].test == (_pair("lyon", "france", "c", "test"),)
    assert sites[1].train[1].facts == ()
    assert isinstance(sites[2].train[0].facts, tuple)


def test_site_datasets_rejects_a_site_without_training_pairs():
    # Prepare
    pairs = [_pair("lyon", "france", "a", "train"), _pair("nice", "france", "a", "test")]

    # Execute / Assert
    with pytest.raises(DataError, match="site 'nice' has no training pairs"):
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

    # Assert: 13 intents x 3 phrasings, 3 intents held out
    assert len(sites) == 12
    assert [s.site_id for s in sites] == sorted(s.site_id for s in sites)
    assert all((len(s.train), len(s.test)) == (30, 9) for s in sites)


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


def test_load_pairs_keeps_given_splits_and_assigns_missing_ones(tmp_path):
    # Prepare
    rows = [{**GOOD, "prompt": f"p{i}", "split": "test"} for i in range(3)]
    rows += [{**GOOD, "prompt": f"q{i}"} for i in range(50)]
    path = _write_lines(tmp_path / "mine.jsonl", rows)

    # Execute
    pairs = load_pairs(DataConfig(path=str(path), test_fraction=0.5, seed=3))

    # Assert
    assert [p.split for p in pairs[:3]] == ["test"] * 3
    assert [p.split for p in pairs[3:]] == [assign_split(replace(p, split=""), 0.5, 3) for p in pairs[3:]]
    assert {p.split for p in pairs[3:]} == {"train", "test"}


@pytest.mark.parametrize("field, value", [("region", "europe/west"), ("site_id", "../etc"), ("region", "a.b")])
def test_ids_that_cannot_name_a_folder_or_adapter_are_rejected(field, value):
    row = {"site_id": "lyon", "region": "france", "prompt": "Hi?", "completion": "I am in Lyon. Hi?", field: value}
    with pytest.raises(DataError, match=f"x.jsonl line 4: field '{field}' must be letters, digits"):
        parse_pair(row, "x.jsonl line 4")
