"""`privacy.mode=sample_dp` through the real simulation: epsilon per site, recomputable, within budget across a
resume."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from opacus.accountants.analysis.rdp import compute_rdp, get_privacy_spent
from opacus.accountants.rdp import RDPAccountant

from fed_netgpt.runs import site_records
from tests.integration.test_simulate import TRAINING_SITES, fed_netgpt

pytestmark = pytest.mark.integration
TARGET = 4.0


def _recomputed(record: dict) -> float:
    """Epsilon from the record's own numbers, through Opacus's analysis functions called directly."""
    orders = RDPAccountant.DEFAULT_ALPHAS
    rdp = compute_rdp(q=record["sample_rate"], noise_multiplier=record["noise_multiplier"],
                      steps=int(record["dp_steps"]), orders=orders)
    return float(get_privacy_spent(orders=orders, rdp=rdp, delta=record["delta"])[0])


def test_sample_dp_reports_recomputable_epsilon_within_its_budget_across_a_resume(tmp_path: Path) -> None:
    # Prepare / Execute: one round planned at a budget of epsilon 4
    out = tmp_path / "dp"
    done = fed_netgpt("simulate", "preset=smoke", f"run.output_dir={out}", "privacy.mode=sample_dp",
                      f"privacy.target_epsilon={TARGET}", "federation.num_rounds=1")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    # Assert: every site's line carries what recomputes its epsilon; the budget is used, never exceeded
    records = site_records(out)
    assert sorted(r["site_id"] for r in records) == TRAINING_SITES and {r["round"] for r in records} == {1}
    for record in records:
        assert record["epsilon"] == pytest.approx(_recomputed(record), rel=1e-9)
        assert record["epsilon"] <= TARGET
        assert record["epsilon"] >= 0.95 * TARGET  # the noise was planned to spend the budget over the run
        assert record["dp_steps"] == 2 + 4  # smoke: 2 local + 4 Ditto steps a round
        assert record["delta"] == 1e-5
    report = json.loads((out / "report.json").read_text())
    assert report["privacy"]["epsilon_max"] <= TARGET
    assert sorted(report["privacy"]["sites"]) == TRAINING_SITES and report["privacy"]["budget_spent"] == []
    assert "Differential privacy (sample_dp): epsilon" in done.stdout

    # Execute: resume for a second round, in a fresh process (the sites' in-memory state is gone)
    more = fed_netgpt("simulate", "preset=smoke", f"run.output_dir={out}", "privacy.mode=sample_dp",
                      f"privacy.target_epsilon={TARGET}", "run.resume=true", "federation.num_rounds=2")

    # Assert: the server handed back what each site spent; none trains past its budget, the run still ends
    assert more.returncode == 0, more.stdout[-3000:] + more.stderr[-3000:]
    second = [r for r in site_records(out) if r["round"] == 2]
    assert sorted(r["site_id"] for r in second) == TRAINING_SITES
    assert all("privacy budget spent" in r["error"] for r in second), second
    report = json.loads((out / "report.json").read_text())
    assert report["privacy"]["budget_spent"] == TRAINING_SITES
    assert report["privacy"]["epsilon_max"] <= TARGET
