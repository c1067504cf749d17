"""report.png: what personalization gained per region, and how each region's test loss fell by round."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only: no display on servers, edge nodes or CI
import matplotlib.pyplot as plt  # noqa: E402


def write_plot(folder: Path, regions: dict[str, dict[str, dict[str, Any]]]) -> Path:
    """Left: location-fact accuracy, base vs adapter, per region. Right: per-round test loss from metrics.jsonl."""
    names = list(regions)
    figure, (bars, curves) = plt.subplots(1, 2, figsize=(10, 4))
    width = 0.38
    for offset, which, color in ((-width / 2, "base", "#9e9e9e"), (width / 2, "adapter", "#1f77b4")):
        values = [100 * regions[name][which]["fact_accuracy"] for name in names]
        drawn = bars.bar([i + offset for i in range(len(names))], values, width, label=which, color=color)
        bars.bar_label(drawn, fmt="%.0f%%", fontsize=8)
    bars.set_xticks(range(len(names)), names)
    bars.set_ylim(0, 119)
    bars.set_ylabel("location-fact accuracy (%)")
    bars.set_title("Test split: base model vs regional adapter")
    bars.legend(loc="upper left", ncols=2)
    rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines() if line.strip()]
    for key in sorted({k for row in rows for k in row.get("evaluate", {}) if k.endswith("/eval_loss")}):
        points = [(row["round"], row["evaluate"][key]) for row in rows if key in row.get("evaluate", {})]
        curves.plot(*zip(*points), marker="o", label=key.split("/")[0])
    curves.set_xlabel("round")
    curves.xaxis.get_major_locator().set_params(integer=True)
    curves.set_ylabel("federated test loss")
    curves.set_yscale("log")
    curves.set_title("Completion loss on the sites' test splits")
    if curves.lines:
        curves.legend()
    figure.tight_layout()
    path = folder / "report.png"
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path
