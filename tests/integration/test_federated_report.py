"""The final report scored by the sites themselves (federated) equals the server's scoring of the same rows."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from tests.integration.test_simulate import TRAINING_SITES, fed_netgpt

pytestmark = pytest.mark.integration
NUMBERS = ("fact_accuracy", "region_fact_accuracy", "site_fact_accuracy", "fact_precision", "wrong_facts_per_row",
           "exact_match", "request_kept", "rouge_l", "num_examples", "num_facts", "loss", "worst_site_fact_accuracy")


def _same(a: float | None, b: float | None) -> bool:
    """Equal numbers; report.json writes NaN as null."""
    if a is None or b is None or math.isnan(a) or math.isnan(b):
        return a is b or (a is not None and b is not None and math.isnan(a) and math.isnan(b))
    return a == pytest.approx(b, rel=1e-4, abs=1e-6)


def test_sites_score_their_own_rows_and_the_sums_equal_the_servers_scoring(tmp_path: Path) -> None:
    # Prepare: one batch row at a time, so both ways run the very same forward passes
    out = tmp_path / "run"
    done = fed_netgpt("simulate", "preset=smoke", f"run.output_dir={out}", "federation.num_rounds=1",
                      "evaluation.federated=true", "evaluation.batch_size=1", "evaluation.max_examples_per_region=5",
                      "evaluation.max_new_tokens=6")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    by_sites = json.loads((out / "report.json").read_text())

    # Execute: the server scores the run folder itself, from its copy of the data
    central = fed_netgpt("evaluate", "--run", str(out))
    assert central.returncode == 0, central.stderr[-3000:]
    on_server = json.loads(central.stdout)

    # Assert
    assert by_sites["scored_by"] == "sites"
    assert by_sites["sites_scored"] == TRAINING_SITES and by_sites["sites_missing"] == []
    assert "test rows scored, examples shared" in done.stdout  # a simulated site shares its examples
    assert list(by_sites["variants"]) == list(on_server["variants"]) == ["base", "regional", "personalized"]
    for name, result in by_sites["variants"].items():
        expected = on_server["variants"][name]
        assert result["num_examples"] == 5 * 2  # 5 a region: 3 + 2 rows, shared out over its 2 sites
        for key in NUMBERS:
            assert _same(result[key], expected[key]), (name, key, result[key], expected[key])
        for site, numbers in expected["sites"].items():
            assert all(_same(result["sites"][site][k], numbers[k]) for k in NUMBERS if k in numbers), (name, site)
        assert sorted(map(json.dumps, result["examples"])) == sorted(map(json.dumps, expected["examples"]))
        # held-out sites are no node: the server scores them in both ways
        assert result["heldout_sites"]["examples"] == expected["heldout_sites"]["examples"]
