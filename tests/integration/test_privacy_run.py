"""Both privacy modes through the real simulation: epsilon per site (sample_dp) or per region (client_dp),
recomputable from the run's own records, within budget across a resume."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from dp_accounting import dp_event, rdp
from opacus.accountants.analysis.rdp import compute_rdp, get_privacy_spent
from opacus.accountants.rdp import RDPAccountant

from fed_netgpt.run.folder import round_summaries, site_records
from tests.integration.test_simulate import TRAINING_SITES, fed_netgpt

pytestmark = pytest.mark.integration
TARGET = 4.0


def _recomputed(record: dict) -> float:
    """Epsilon from the record's own numbers, through Opacus's analysis functions called directly."""
    orders = RDPAccountant.DEFAULT_ALPHAS
    rdp = compute_rdp(q=record["sample_rate"], noise_multiplier=record["noise_multiplier"],
                      steps=int(record["dp_steps"]), orders=orders)
    return float(get_privacy_spent(orders=orders, rdp=rdp, delta=record["delta"])[0])


@pytest.mark.parametrize("grouped", [False, True], ids=["each-site-alone", "four-sites-in-one-pass"])
def test_sample_dp_reports_recomputable_epsilon_within_its_budget_across_a_resume(tmp_path: Path,
                                                                                 grouped: bool) -> None:
    # Prepare / Execute: one round planned at a budget of epsilon 4; the sites trained one by one (the default
    # engine: each a grouped pass of one), or all four on one node in one grouped pass
    out = tmp_path / "dp"
    packing = ["simulation.num_supernodes=1", "train.sites_per_pass=4"] if grouped else []
    done = fed_netgpt("simulate", "preset=smoke", f"run.output_dir={out}", "privacy.mode=sample_dp",
                      f"privacy.target_epsilon={TARGET}", "federation.num_rounds=1", *packing)
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
        assert record.get("group_size", 1) == (4 if grouped else 1)
    report = json.loads((out / "report.json").read_text())
    assert report["privacy"]["epsilon_max"] <= TARGET
    assert sorted(report["privacy"]["sites"]) == TRAINING_SITES and report["privacy"]["budget_spent"] == []
    assert "Differential privacy (sample_dp): epsilon" in done.stdout

    # Execute: resume for a second round, in a fresh process (the sites' in-memory state is gone)
    more = fed_netgpt("simulate", "preset=smoke", f"run.output_dir={out}", "privacy.mode=sample_dp",
                      f"privacy.target_epsilon={TARGET}", "run.resume=true", "federation.num_rounds=2", *packing)

    # Assert: the server handed back what each site spent; none trains past its budget, the run still ends
    assert more.returncode == 0, more.stdout[-3000:] + more.stderr[-3000:]
    second = [r for r in site_records(out) if r["round"] == 2]
    assert sorted(r["site_id"] for r in second) == TRAINING_SITES
    assert all("privacy budget spent" in r["error"] for r in second), second
    report = json.loads((out / "report.json").read_text())
    assert report["privacy"]["budget_spent"] == TRAINING_SITES
    assert report["privacy"]["epsilon_max"] <= TARGET


def test_client_dp_reports_each_regions_epsilon_recomputable_and_continues_it_across_a_resume(tmp_path: Path) -> None:
    # Prepare / Execute: one round at a given noise, then a resumed second round in a fresh process
    out = tmp_path / "client-dp"
    args = ("simulate", "preset=smoke", f"run.output_dir={out}", "privacy.mode=client_dp",
            "privacy.noise_multiplier=1.5", "privacy.max_grad_norm=0.5")
    first = fed_netgpt(*args, "federation.num_rounds=1", "run.report=false")
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    second = fed_netgpt(*args, "federation.num_rounds=2", "run.resume=true")
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]

    # Assert: each round's per-region epsilon is dp-accounting's for its releases so far (the resumed run went on
    # counting), with every site weighted alike
    rounds = round_summaries(out)
    assert [row["round"] for row in rounds] == [1, 2]
    for row in rounds:
        for region in ("france", "japan"):
            train = row["train"]
            accountant = rdp.RdpAccountant()
            accountant.compose(dp_event.GaussianDpEvent(train[f"{region}/client_noise_multiplier"]),
                               int(train[f"{region}/client_releases"]))
            assert train[f"{region}/client_releases"] == row["round"]
            assert train[f"{region}/client_epsilon"] == pytest.approx(accountant.get_epsilon(1e-5), rel=1e-9)
            assert train[f"{region}/client_sites_sampled"] == 2 and train[f"{region}/unit-weight"] == 1.0
    report = json.loads((out / "report.json").read_text())["privacy"]
    assert report["mode"] == "client_dp" and sorted(report["regions"]) == ["france", "japan"]
    assert report["epsilon_max"] == pytest.approx(rounds[-1]["train"]["france/client_epsilon"])
    assert "Differential privacy (client_dp): epsilon" in second.stdout and "the worst region" in second.stdout
