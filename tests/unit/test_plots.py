"""report.png from the report's numbers and metrics.jsonl."""

from __future__ import annotations

import json
from pathlib import Path

from fed_netgpt.plots import write_plot


def test_write_plot_draws_a_png_from_the_report_and_the_metrics(tmp_path: Path) -> None:
    # Prepare
    rows = [{"round": r, "evaluate": {"france/eval_loss": 1.0 / r, "japan/eval_loss": 2.0 / r}} for r in (1, 2, 3)]
    (tmp_path / "metrics.jsonl").write_text("\n".join(json.dumps(row) for row in rows) + "\n")
    result = {"base": {"fact_accuracy": 0.25}, "adapter": {"fact_accuracy": 1.0}}
    regions = {"france": result, "japan": result}

    # Execute
    path = write_plot(tmp_path, regions)

    # Assert
    assert path == tmp_path / "report.png"
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert path.stat().st_size > 10_000  # two panels with bars and lines, not an empty canvas
