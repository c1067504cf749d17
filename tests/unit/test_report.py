"""fed_netgpt/evaluation/report.py: report.json stays valid JSON, report.md holds the tables, cells by hand."""

from __future__ import annotations

import json
import math

import pytest

from fed_netgpt.evaluation.report import COLUMNS, cell, json_safe, privacy_utility_table, variant_table, write_report

# ---- cell ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "percent", "spread", "text"),
    [
        (0.5, True, None, "50.0%"),
        (0.12345, True, None, "12.3%"),
        (1.0, True, None, "100.0%"),
        (2.34567, False, None, "2.346"),
        (0, False, None, "0.000"),
        (0.5, True, 0.0456, "50.0% ± 4.6"),
        (2.5, False, 0.25, "2.500 ± 0.250"),
        (0.5, True, math.nan, "50.0%"),  # one seed with a value: no spread shown
        (math.nan, True, None, "–"),
        (math.nan, False, 0.1, "–"),
        (None, True, None, "–"),
    ],
)
def test_cell_formats_percent_plain_missing_and_spread(value, percent, spread, text):
    # Execute / Assert
    assert cell(value, percent, spread) == text


def test_json_safe_turns_nan_and_infinities_into_null_everywhere():
    # Execute
    safe = json_safe({"a": math.nan, "b": [1.0, math.inf, {"c": -math.inf}], "d": "nan", "e": 2, "f": None})

    # Assert
    assert safe == {"a": None, "b": [1.0, None, {"c": None}], "d": "nan", "e": 2, "f": None}


# ---- write_report ----------------------------------------------------------------------------------


def _example(site, region, prompt, completion):
    return {"site_id": site, "region": region, "prompt": prompt, "context": "", "reference": f"ref {prompt}",
            "completion": completion, "facts": [site]}


def _result(accuracy, examples, n=9, **extra):
    return {"fact_accuracy": accuracy, "region_fact_accuracy": 0.8, "site_fact_accuracy": math.nan,
            "fact_precision": 1.0, "wrong_facts_per_row": 0.25, "worst_site_fact_accuracy": accuracy,
            "request_kept": 1.0, "rouge_l": 0.5, "exact_match": 0.0, "loss": 2.5, "num_examples": n,
            "regions": {"france": {"fact_accuracy": accuracy}, "japan": {"fact_accuracy": math.nan}},
            "examples": examples, **extra}


def _report(with_heldout_sites: bool):
    heldout = {"heldout_sites": _result(0.1, [_example("toulouse", "france", "Hi?", "held-out completion")], n=3)}
    regional_extra = heldout if with_heldout_sites else {}
    return {"variants": {
        "base": _result(0.0, [_example("paris", "france", "Call me a taxi.", "base completion"),
                              _example("tokyo", "japan", "Find a museum.", "second base completion")]),
        "regional": _result(0.625, [_example("paris", "france", "Call me a taxi.", "regional completion")],
                            std={"fact_accuracy": 0.05, "loss": 0.125}, **regional_extra),
    }}


def _strict_json(text):
    def refuse(constant):
        raise ValueError(f"not strict JSON: {constant}")

    return json.loads(text, parse_constant=refuse)


def test_write_report_writes_strict_json_with_nan_as_null(tmp_path):
    # Prepare
    report = _report(with_heldout_sites=True)

    # Execute
    write_report(tmp_path, report, shown=1)

    # Assert
    loaded = _strict_json((tmp_path / "report.json").read_text())
    regional = loaded["variants"]["regional"]
    assert regional["site_fact_accuracy"] is None
    assert regional["regions"]["japan"]["fact_accuracy"] is None
    assert regional["heldout_sites"]["site_fact_accuracy"] is None
    assert regional["fact_accuracy"] == 0.625
    assert regional["std"] == {"fact_accuracy": 0.05, "loss": 0.125}
    assert loaded == json_safe(report)  # nothing else changed
    assert math.isnan(report["variants"]["regional"]["site_fact_accuracy"])  # the caller's dict is left alone


def test_report_md_has_a_row_per_variant_and_the_heldout_sites_table(tmp_path):
    # Prepare
    report = _report(with_heldout_sites=True)
    header = "| variant | n | " + " | ".join(title for _, title, _ in COLUMNS) + " |"

    # Execute
    text = write_report(tmp_path, report, shown=1, title="My report")

    # Assert
    md = (tmp_path / "report.md").read_text()
    assert md.startswith("# My report\n\n")
    assert text in md
    lines = md.splitlines()
    assert lines.count(header) == 2  # held-out intents and held-out sites
    assert ("| base | 9 | 0.0% | 80.0% | – | 100.0% | 0.250 | 0.0% | 100.0% | 50.0% | 0.0% | 2.500 |"
            in lines)
    assert ("| regional | 9 | 62.5% ± 5.0 | 80.0% | – | 100.0% | 0.250 | 62.5% | 100.0% | 50.0% | 0.0% "
            "| 2.500 ± 0.125 |" in lines)
    sites_table = md.split("Held-out sites")[1].split("Location-fact accuracy")[0]
    assert "| regional | 3 | 10.0% |" in sites_table
    assert "| base |" not in sites_table  # base has no held-out-sites result
    assert "| france | 0.0% | 62.5% |" in lines  # fact accuracy per region (rows) and variant (columns)
    assert "| japan | – | – |" in lines


def test_report_md_lists_the_first_examples_of_each_variant(tmp_path):
    # Execute
    write_report(tmp_path, _report(with_heldout_sites=True), shown=1)

    # Assert: one held-out-intent example and one held-out-site example a variant
    md = (tmp_path / "report.md").read_text()
    assert "## base\n\n- `paris` (france) 'Call me a taxi.'\n  - completion: base completion\n" \
           "  - reference: ref Call me a taxi.\n" in md
    assert "second base completion" not in md
    assert "- `toulouse` (france) 'Hi?'\n  - completion: held-out completion" in md


def test_report_md_without_heldout_sites_has_only_the_intents_table(tmp_path):
    # Execute
    text = write_report(tmp_path, _report(with_heldout_sites=False), shown=2)

    # Assert
    md = (tmp_path / "report.md").read_text()
    assert "Held-out sites" not in md and "Held-out sites" not in text
    assert md.count("| variant | n |") == 1
    assert "second base completion" in md  # shown=2


def test_variant_table_skips_variants_without_the_group():
    # Prepare
    variants = {"base": _result(0.0, []), "regional": _result(0.5, [], heldout_sites=_result(0.25, [], n=3))}

    # Execute
    table = variant_table(variants, "heldout_sites").splitlines()

    # Assert: header, separator, one row
    assert len(table) == 3
    assert table[1] == "|---|---|" + "---|" * len(COLUMNS)
    assert table[2].startswith("| regional | 3 | 25.0% | 80.0% | – |")


def test_a_federated_report_says_the_sites_scored_their_rows_and_which_did_not(tmp_path):
    # Prepare
    report = {**_report(with_heldout_sites=False), "scored_by": "sites", "sites_scored": ["paris", "tokyo"],
              "sites_missing": ["lyon"]}

    # Execute
    text = write_report(tmp_path, report, shown=1)

    # Assert
    assert "scored by the sites themselves: 2 sites sent counts, not rows; not scored: lyon." in text
    assert "scored by the sites" not in write_report(tmp_path, _report(with_heldout_sites=False), shown=1)


def test_privacy_utility_table_rows_per_variant_columns_per_epsilon_with_the_epsilon_reached():
    # Prepare: regional at three epsilons, local at one (the others missing)
    trade_off = {
        "regional_dp": {"inf": {"fact_accuracy": 0.9, "site_fact_accuracy": 0.5, "worst_site_fact_accuracy": 0.7},
                        "8": {"fact_accuracy": 0.4, "site_fact_accuracy": 0.1, "worst_site_fact_accuracy": 0.2,
                              "epsilon_max": 7.996},
                        "1": {"fact_accuracy": 0.0, "site_fact_accuracy": 0.0, "worst_site_fact_accuracy": 0.0,
                              "epsilon_max": 0.999}},
        "local_dp": {"8": {"fact_accuracy": 0.25, "site_fact_accuracy": math.nan, "worst_site_fact_accuracy": 0.0,
                           "epsilon_max": 8.0}},
    }

    # Execute
    lines = privacy_utility_table(trade_off).splitlines()

    # Assert
    assert lines[0] == "| variant | ε=inf | ε=8 | ε=1 |"
    assert lines[2] == ("| regional_dp | 90.0% / 50.0% / 70.0% | 40.0% / 10.0% / 20.0% (8.00) | "
                        "0.0% / 0.0% / 0.0% (1.00) |")
    assert lines[3] == "| local_dp | – | 25.0% / – / 0.0% (8.00) | – |"


def test_a_comparison_with_privacy_utility_variants_prints_their_table(tmp_path):
    # Prepare
    result = {"fact_accuracy": 0.5, "num_examples": 9, "regions": {}}
    report = {"variants": {"regional_dp@8": result},
              "privacy_utility": {"regional_dp": {"8": {**result, "epsilon_max": 8.0}}}}

    # Execute
    text = write_report(tmp_path, report, shown=0)

    # Assert
    assert "Privacy-utility" in text and "| regional_dp | 50.0% / – / – (8.00) |" in text
