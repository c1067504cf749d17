"""report.png from the variants' numbers and metrics.jsonl; the curves read from metrics.jsonl."""

from __future__ import annotations

import json
from pathlib import Path

from fed_netgpt.evaluation.plots import mean_curve, validation_curves, write_plot, write_privacy_plot


def _metrics(tmp_path: Path) -> Path:
    rows = [{"round": r, "evaluate": {"france/eval_loss": 1.0 / r, "japan/eval_loss": 2.0 / r}} for r in (1, 2, 3)]
    rows.append({"round": 4, "evaluate": {"france/eval_loss": 0.5}})  # japan missed round 4
    rows.append({"round": 4, "site_id": "lyon", "evaluate": {"france/eval_loss": 9.0}})  # a per-site record
    (tmp_path / "metrics.jsonl").write_text("\n".join(json.dumps(row) for row in rows) + "\n")
    return tmp_path


def test_validation_curves_and_their_mean_over_groups(tmp_path: Path) -> None:
    # Execute
    curves = validation_curves(_metrics(tmp_path))

    # Assert: the mean keeps only rounds every group reported
    assert curves == {"france": [(1, 1.0), (2, 0.5), (3, 1 / 3), (4, 0.5)], "japan": [(1, 2.0), (2, 1.0), (3, 2 / 3)]}
    assert mean_curve(curves) == [(1, 1.5), (2, 0.75), (3, 0.5)]


def test_write_plot_draws_a_png_from_the_variants_and_the_curves(tmp_path: Path) -> None:
    # Prepare
    regions = {"france": {"fact_accuracy": 0.25}, "japan": {"fact_accuracy": 1.0}}
    variants = {"base": {"regions": regions}, "regional": {"regions": regions}}

    # Execute
    path = write_plot(tmp_path / "report.png", variants, validation_curves(_metrics(tmp_path)))

    # Assert
    assert path == tmp_path / "report.png"
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert path.stat().st_size > 10_000  # two panels with bars and lines, not an empty canvas


def test_write_privacy_plot_draws_a_line_per_variant_over_the_epsilons(tmp_path: Path) -> None:
    # Prepare
    trade_off = {"regional_dp": {"inf": {"fact_accuracy": 0.9}, "8": {"fact_accuracy": 0.4}},
                 "local_dp": {"8": {"fact_accuracy": 0.2}, "1": {"fact_accuracy": None}}}

    # Execute
    path = write_privacy_plot(tmp_path / "privacy-utility.png", trade_off, {"fact_accuracy": 0.0})

    # Assert
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert path.stat().st_size > 10_000
