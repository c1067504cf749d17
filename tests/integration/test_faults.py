"""Sites that crash (faults.crash_probability) in a real Flower simulation: the run finishes without them, or,
when a region never gets an update, fails loudly and its folder is refused."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fed_netgpt.run.faults import crashes, is_slow
from fed_netgpt.run.folder import round_summaries, site_records
from tests.integration.test_simulate import REGIONS, TRAINING_SITES, fed_netgpt

pytestmark = pytest.mark.integration


def test_a_run_with_30_percent_of_sites_crashing_completes_and_still_learns(tmp_path: Path) -> None:
    # Prepare: the smoke run, 4 rounds; which site-rounds crash follows from run.seed alone
    out = tmp_path / "crashing"
    rounds = 4
    expected = {(r, s) for r in range(1, rounds + 1) for s in TRAINING_SITES if crashes(0.3, 0, r, s)}
    assert 0 < len(expected) < rounds * len(TRAINING_SITES)
    # Execute
    done = fed_netgpt("simulate", "preset=smoke", f"federation.num_rounds={rounds}", "faults.crash_probability=0.3",
                      f"run.output_dir={out}")
    # Assert: every round ran, the crashed sites are recorded with their reason, every region has its adapter
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert [row["round"] for row in round_summaries(out)] == list(range(1, rounds + 1))
    crashed = {(r["round"], r["site_id"]) for r in site_records(out) if "injected crash" in r.get("error", "")}
    assert crashed == expected
    for region in REGIONS:
        assert (out / "adapters" / region / "adapter_model.safetensors").is_file()
        losses = [row["evaluate"][f"{region}/eval_loss"] for row in round_summaries(out)]
        assert losses[-1] < losses[0], (region, losses)  # the validation loss still falls
    report = json.loads((out / "report.json").read_text())
    assert report["failures"]["failed_or_rejected"] == len(expected)
    assert f"{len(expected)} of 16 site-rounds failed or were rejected" in done.stdout + done.stderr
    assert (out / "published.json").is_file()


def test_a_run_whose_regions_never_get_an_update_fails_and_is_refused(tmp_path: Path) -> None:
    out = tmp_path / "dead"
    done = fed_netgpt("simulate", "preset=smoke", "federation.num_rounds=1", "faults.crash_probability=1.0",
                      f"run.output_dir={out}")
    assert done.returncode == 1
    assert "the run failed: no valid update ever reached france, japan in 1 rounds" in done.stderr
    assert "4x InjectedCrash: injected crash (faults.crash_probability=1.0)" in done.stderr
    assert (out / "failed.json").is_file() and not (out / "published.json").exists()
    for command in (["complete", "--run", str(out), "--site", "paris", "Hi?"], ["evaluate", "--run", str(out)]):
        refused = fed_netgpt(*command)
        assert refused.returncode == 2 and "holds a failed run" in refused.stderr, refused.stderr[-2000:]
        assert "Traceback" not in refused.stderr


def test_poisoned_sites_drag_fedavg_while_the_median_keeps_learning(tmp_path: Path) -> None:
    # Prepare: 5 sites a region, one of them (20 %, rounded) sends its update sign-flipped x10 every round
    poisoned = ["faults.poison_fraction=0.2", "data.sites_per_region=5", "run.report=false"]
    losses = {}
    for robust in ("none", "median"):
        out = tmp_path / robust
        # Execute
        done = fed_netgpt("simulate", "preset=smoke", *poisoned, f"federation.robust={robust}", f"run.output_dir={out}")
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        # Assert: the poisoned sites are named in the log and in their metrics.jsonl records, one a region
        flagged = {r["site_id"]: r["region"] for r in site_records(out) if r.get("poisoned")}
        assert sorted(flagged.values()) == sorted(REGIONS), flagged
        assert f"send sign_flip-poisoned updates every round (federation.robust={robust})" in done.stderr
        losses[robust] = {region: [row["evaluate"][f"{region}/eval_loss"] for row in round_summaries(out)]
                          for region in REGIONS}
    for region in REGIONS:  # the median's validation loss falls, and ends below the poisoned mean's
        median, fedavg = losses["median"][region], losses["none"][region]
        assert median[-1] < median[0] and median[-1] < fedavg[-1], (region, losses)


def test_a_site_that_stalls_past_the_timeout_is_recorded_and_the_round_goes_on(tmp_path: Path) -> None:
    # Prepare: with run.seed=0 and probability 0.5, marseille alone stalls in round 1 (checked, not assumed)
    stalled = [s for s in TRAINING_SITES if is_slow(0.5, 0, 1, s)]
    assert stalled == ["marseille"]
    out = tmp_path / "slow"
    # Execute: marseille stalls 45 s; the round waits 30. The cold nodes' start (torch, the model) is not part of
    # those 30 s: discovery waits for it within federation.discovery_timeout (default 300 s). The simulation's end
    # waits for the stalled site, so the stall is kept short.
    done = fed_netgpt("simulate", "preset=smoke", "federation.num_rounds=1", "faults.slow_probability=0.5",
                      "faults.slow_seconds=45", "federation.timeout=30", "federation.fraction_evaluate=0",
                      "run.report=false", f"run.output_dir={out}")
    # Assert: the round completed with the other three; marseille's record says why it is missing
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    records = {r["site_id"]: r for r in site_records(out)}
    assert records["marseille"]["error"] == "no reply within federation.timeout"
    assert all("error" not in records[s] for s in ("paris", "tokyo", "yokohama"))
    (row,) = round_summaries(out)
    assert row["train"]["france/num-examples"] == 32  # paris alone (marseille's 11 pairs are missing)
