"""fed_netgpt/evaluation/metrics.py: every pitfall of a naive substring metric, expected values computed by hand."""

from __future__ import annotations

import math

import pytest
from rouge_score import rouge_scorer

from fed_netgpt.evaluation.metrics import RowScore, fact_present, normalize, rouge_l, score_row, summarize

REQUEST = "Call me a taxi."
LYON_REFERENCE = "I am in Lyon, France (Europe/Paris time, prices in EUR, calling code +33). Call me a taxi."
LYON_FACTS = ["Lyon", "France", "Europe/Paris", "EUR", "+33"]
LYON_LEVELS = ["site", "region", "region", "region", "region"]
# Facts of other rows: the other French sites and a German site.
FOREIGN = ["Paris", "Marseille", "Toulouse", "Berlin", "Germany", "Europe/Berlin", "+49"]


def row(region_facts=0, region_found=0, site_facts=0, site_found=0, wrong_facts=0, exact_match=False,
        request_kept=False, rouge=0.0) -> RowScore:
    """A RowScore built by hand, for summarize()."""
    return RowScore(region_facts, region_found, site_facts, site_found, wrong_facts, exact_match, request_kept,
                    rouge)


# ---- normalize / fact_present ---------------------------------------------------------------------


def test_normalize_drops_accents_and_case():
    # Execute / Assert
    assert normalize("São Paulo") == "sao paulo"
    assert normalize("ZÜRICH") == "zurich"
    assert normalize("Straße") == "strasse"


def test_eur_is_not_found_inside_europe_paris():
    # Prepare: a naive `"eur" in text.lower()` is True here
    text = "I am in Lyon (Europe/Paris time)."

    # Execute / Assert
    assert "eur" in text.lower()
    assert not fact_present(text, "EUR")
    assert fact_present("Prices in EUR.", "EUR")


def test_japan_is_not_found_in_japanese():
    # Execute / Assert
    assert not fact_present("I love Japanese food.", "Japan")
    assert fact_present("I live in Japan.", "Japan")


@pytest.mark.parametrize("text", ["Paris, France", "I am in (Paris).", "Paris", "near Paris!"])
def test_fact_found_next_to_punctuation(text):
    # Execute / Assert
    assert fact_present(text, "Paris")


def test_fact_not_found_inside_a_longer_word():
    # Execute / Assert
    assert not fact_present("A Parisian café.", "Paris")


def test_calling_code_is_matched_as_a_whole_word():
    # Execute / Assert
    assert fact_present("calling code +33.", "+33")
    assert fact_present("(+33)", "+33")
    assert not fact_present("call +331 234 567", "+33")
    assert not fact_present("code x+33", "+33")


def test_accents_are_ignored_both_ways():
    # Execute / Assert
    assert fact_present("I am in Sao Paulo, Brazil.", "São Paulo")
    assert fact_present("I am in São Paulo, Brazil.", "Sao Paulo")
    assert fact_present("I am in SÃO PAULO.", "são paulo")


def test_case_and_whitespace_are_ignored():
    # Execute / Assert
    assert fact_present("i am in LYON.", "Lyon")
    assert fact_present("I am in lyon.", "LYON")
    assert fact_present("I am in Sao\n  Paulo.", "Sao Paulo")


def test_paris_inside_a_masked_time_zone_does_not_count():
    # Prepare: a naive search finds "paris" in "europe/paris"
    text = "I am in Lyon (Europe/Paris time)."

    # Execute / Assert
    assert fact_present(text, "Paris")  # unmasked: "/" is a word boundary
    assert not fact_present(text, "Paris", mask=["Europe/Paris"])
    assert fact_present("I am in Paris (Europe/Paris time).", "Paris", mask=["Europe/Paris"])


def test_mask_equal_to_the_fact_is_not_blanked():
    # Execute / Assert
    assert fact_present("I am in Paris.", "Paris", mask=["Paris", " PARIS ", "Europe/Paris"])


def test_blank_fact_is_an_error():
    # Execute / Assert
    with pytest.raises(ValueError, match="empty fact"):
        fact_present("anything", "  ")


# ---- score_row ------------------------------------------------------------------------------------


def test_reference_completion_scores_perfectly():
    # Execute
    score = score_row(LYON_REFERENCE, LYON_REFERENCE, REQUEST, LYON_FACTS, LYON_LEVELS, FOREIGN)

    # Assert: "Paris" inside "Europe/Paris" is neither a found city nor a wrong one
    assert score == RowScore(region_facts=4, region_found=4, site_facts=1, site_found=1, wrong_facts=0,
                             exact_match=True, request_kept=True, rouge_l=1.0)
    assert (score.facts, score.found) == (5, 5)


def test_paris_counts_when_it_stands_alone_but_not_inside_europe_paris():
    # Prepare: a Paris row; its time zone Europe/Paris contains its city
    facts, levels = ["Paris", "France", "Europe/Paris"], ["site", "region", "region"]

    # Execute
    zone_only = score_row("I am in France (Europe/Paris time). Call me a taxi.", "", REQUEST, facts, levels, [])
    both = score_row("I am in Paris, France (Europe/Paris time). Call me a taxi.", "", REQUEST, facts, levels, [])

    # Assert
    assert (zone_only.site_found, zone_only.region_found) == (0, 2)
    assert (both.site_found, both.region_found) == (1, 2)


def test_fact_copied_from_the_request_does_not_count():
    # Prepare
    request = "What's on in Lyon tonight?"

    # Execute
    echoed = score_row(request, "", request, ["Lyon"], ["site"], [])
    echoed_other_case = score_row("  what's on in LYON\ntonight?", "", request, ["Lyon"], ["site"], [])
    added = score_row("I am in Lyon, France. What's on in Lyon tonight?", "", request, ["Lyon"], ["site"], [])

    # Assert
    assert echoed.site_found == 0
    assert echoed_other_case.site_found == 0
    assert added.site_found == 1


def test_short_request_is_not_blanked_out_of_words():
    # Prepare: "hi" is inside "chicago"; blanking it there would hide the city
    completion = "I am in Chicago. Hi"

    # Execute
    score = score_row(completion, "", "Hi", ["Chicago"], ["site"], [])

    # Assert
    assert score.site_found == 1


def test_foreign_fact_in_the_request_is_not_wrong():
    # Execute
    score = score_row("I am in Paris. Book a train to Lyon.", "", "Book a train to Lyon.", ["Paris"], ["site"],
                      ["Lyon"])

    # Assert
    assert score.wrong_facts == 0


def test_naming_every_city_gets_full_recall_but_wrong_facts():
    # Prepare
    completion = ("I am in Paris, Lyon, Marseille or Toulouse, France (Europe/Paris time, prices in EUR, "
                  "calling code +33). Call me a taxi.")

    # Execute
    score = score_row(completion, LYON_REFERENCE, REQUEST, LYON_FACTS, LYON_LEVELS, FOREIGN)
    summary = summarize([score])
    reference_summary = summarize([score_row(LYON_REFERENCE, LYON_REFERENCE, REQUEST, LYON_FACTS, LYON_LEVELS,
                                             FOREIGN)])

    # Assert: Paris, Marseille, Toulouse are wrong; precision 5 / (5 + 3). The reference, whose only
    # "Paris" is inside its own "Europe/Paris", has the same recall and precision 5 / (5 + 0).
    assert (score.site_found, score.region_found, score.wrong_facts) == (1, 4, 3)
    assert summary["fact_accuracy"] == 1.0
    assert summary["site_fact_accuracy"] == 1.0
    assert summary["fact_precision"] == pytest.approx(0.625)
    assert summary["wrong_facts_per_row"] == 3.0
    assert reference_summary["fact_accuracy"] == 1.0
    assert reference_summary["fact_precision"] == 1.0
    assert reference_summary["wrong_facts_per_row"] == 0.0


def test_foreign_time_zone_is_counted_once_not_also_as_its_city():
    # Prepare: a Berlin row whose completion names the French time zone
    facts, levels = ["Berlin", "Germany", "Europe/Berlin"], ["site", "region", "region"]

    # Execute
    score = score_row("I am in Berlin (Europe/Paris time).", "", REQUEST, facts, levels,
                      ["Paris", "Europe/Paris", "France"])

    # Assert: one wrong fact, not two
    assert score.wrong_facts == 1


def test_foreign_facts_equal_to_own_facts_are_ignored():
    # Execute
    score = score_row(LYON_REFERENCE, LYON_REFERENCE, REQUEST, LYON_FACTS, LYON_LEVELS,
                      ["LYON", "eur", "Europe/Paris", "+33", "Germany"])

    # Assert
    assert score.wrong_facts == 0


def test_region_and_site_levels_are_counted_apart():
    # Prepare: the region facts are all there, the city is missing
    completion = "I am in France (Europe/Paris time, prices in EUR, calling code +33). Call me a taxi."

    # Execute
    score = score_row(completion, LYON_REFERENCE, REQUEST, LYON_FACTS, LYON_LEVELS, FOREIGN)

    # Assert
    assert (score.region_facts, score.region_found, score.site_facts, score.site_found) == (4, 4, 1, 0)


def test_exact_match_collapses_whitespace_but_keeps_case():
    # Execute
    spaced = score_row("I am in Lyon,  France\n(Europe/Paris time, prices in EUR, calling code +33). Call me a taxi. ",
                       LYON_REFERENCE, REQUEST, [], [], [])
    lowered = score_row(LYON_REFERENCE.lower(), LYON_REFERENCE, REQUEST, [], [], [])

    # Assert
    assert spaced.exact_match
    assert not lowered.exact_match


@pytest.mark.parametrize(
    ("completion", "kept"),
    [
        ("I am in Lyon. Call me a  taxi.", True),
        ("I am in Lyon. Call me\na taxi. Thanks.", True),
        ("I am in Lyon. Please call a taxi for me.", False),  # paraphrased
        ("I am in Lyon. call me a taxi.", False),  # case changed
    ],
)
def test_request_kept(completion, kept):
    # Execute
    score = score_row(completion, LYON_REFERENCE, REQUEST, [], [], [])

    # Assert
    assert score.request_kept is kept


def test_bad_levels_are_errors():
    # Execute / Assert
    with pytest.raises(ValueError, match="'city'"):
        score_row("x", "x", "x", ["Lyon", "France"], ["city", "region"], [])
    with pytest.raises(ValueError, match="2 facts but 1 levels"):
        score_row("x", "x", "x", ["Lyon", "France"], ["site"], [])


# ---- rouge_l --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("prediction", "reference", "expected"),
    [
        ("I am in Paris, France.", "I am in Paris France", 1.0),  # punctuation attached: same tokens
        ("São Paulo is big", "Sao Paulo is large", 0.75),  # LCS 3 of 4 and 4
        ("call me a taxi", "please call me a taxi now", 0.8),  # P = 4/4, R = 4/6, F = 2PR/(P+R)
        ("taxi a me call", "call me a taxi", 0.25),  # LCS 1 of 4 and 4
        ("", "", 1.0),
        ("...", "", 1.0),  # no tokens on either side
        ("Paris", "", 0.0),
        ("", "Paris", 0.0),
    ],
)
def test_rouge_l_by_hand(prediction, reference, expected):
    # Execute / Assert
    assert rouge_l(prediction, reference) == pytest.approx(expected)


@pytest.mark.parametrize(
    ("prediction", "reference"),
    [
        ("i am in lyon call me a taxi", "i am in lyon france call me a taxi"),
        ("find an art museum near me", "i am in osaka find an art museum"),
        ("the cat sat on the mat", "the mat sat on the cat"),
    ],
)
def test_rouge_l_equals_rouge_score_default_on_plain_text(prediction, reference):
    # Prepare
    default = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)

    # Execute / Assert
    assert rouge_l(prediction, reference) == pytest.approx(default.score(reference, prediction)["rougeL"].fmeasure)


# ---- summarize ------------------------------------------------------------------------------------


def test_micro_average_is_not_macro():
    # Prepare: row A finds 5 of 5 facts, row B 0 of 1
    rows = [row(region_facts=4, region_found=4, site_facts=1, site_found=1), row(site_facts=1)]
    macro = (5 / 5 + 0 / 1) / 2

    # Execute
    summary = summarize(rows)

    # Assert
    assert summary["fact_accuracy"] == pytest.approx(5 / 6)
    assert summary["fact_accuracy"] != pytest.approx(macro)


def test_levels_and_precision_are_summed_over_rows():
    # Prepare: A region 4/4, site 0/1, 3 wrong; B region 2/4, site 1/1, 1 wrong
    rows = [row(4, 4, 1, 0, wrong_facts=3), row(4, 2, 1, 1, wrong_facts=1)]

    # Execute
    summary = summarize(rows)

    # Assert
    assert summary["region_fact_accuracy"] == pytest.approx(6 / 8)
    assert summary["site_fact_accuracy"] == pytest.approx(1 / 2)
    assert summary["fact_accuracy"] == pytest.approx(7 / 10)
    assert summary["fact_precision"] == pytest.approx(7 / 11)
    assert summary["wrong_facts_per_row"] == pytest.approx(2.0)
    assert summary["num_facts"] == 10


def test_rows_without_facts_leave_fact_metrics_alone():
    # Prepare
    with_facts = [row(4, 4, 1, 1, wrong_facts=3, exact_match=True, rouge=1.0), row(site_facts=1, wrong_facts=1)]
    fact_less = row(exact_match=True, request_kept=True, rouge=0.5)

    # Execute
    only = summarize([fact_less])
    before, after = summarize(with_facts), summarize([*with_facts, fact_less])

    # Assert: no facts -> nan, not 0 or 1
    for key in ("fact_accuracy", "region_fact_accuracy", "site_fact_accuracy", "fact_precision",
                "wrong_facts_per_row"):
        assert math.isnan(only[key]), key
        assert after[key] == pytest.approx(before[key]), key
    assert (only["exact_match"], only["request_kept"], only["rouge_l"]) == (1.0, 1.0, 0.5)
    assert (after["num_examples"], after["num_fact_rows"], after["num_facts"]) == (3, 2, 6)
    assert after["fact_accuracy"] == pytest.approx(5 / 6)
    assert after["fact_precision"] == pytest.approx(5 / 9)
    assert after["wrong_facts_per_row"] == pytest.approx(2.0)
    assert after["exact_match"] == pytest.approx(2 / 3)
    assert after["rouge_l"] == pytest.approx(1.5 / 3)


def test_zero_denominators_are_nan():
    # Execute
    empty = summarize([])
    nothing_said = summarize([row(site_facts=1)])  # a fact, none found, none wrong

    # Assert
    assert all(math.isnan(v) for k, v in empty.items() if not k.startswith("num_"))
    assert (empty["num_examples"], empty["num_fact_rows"], empty["num_facts"]) == (0, 0, 0)
    assert math.isnan(nothing_said["fact_precision"])
    assert math.isnan(nothing_said["region_fact_accuracy"])
    assert nothing_said["fact_accuracy"] == 0.0


@pytest.mark.parametrize(("answer", "carries"), [
    ("Lyon has many bistros near the Saône.", True),
    ("In France, dinner is served late.", True),
    ("Prices are in EUR.", True),
    ("Lyonnaise cuisine is famous.", False),  # a fact inside another word
    ("European and Frenchified dishes.", False),  # EUR and France inside other words
    ("Call me a taxi. Sure!", False),  # nothing but the request
    ("Paris has many bistros.", False),  # another site's city
])
def test_a_cloud_answer_carries_local_facts_only_when_it_names_one_of_its_own(answer, carries):
    from fed_netgpt.evaluation.metrics import carries_local_facts

    score = score_row(answer, "", REQUEST, LYON_FACTS, LYON_LEVELS, FOREIGN)
    assert carries_local_facts(score) is carries
