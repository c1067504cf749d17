"""report.png: location-fact accuracy per variant and region, and validation loss by round."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only: no display on servers, edge nodes or CI
import matplotlib.pyplot as plt  # noqa: E402

from fed_netgpt.evaluation.report import epsilon_labels  # noqa: E402
from fed_netgpt.run.folder import round_summaries  # noqa: E402


def validation_curves(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Per group (region, or global/site), the per-round validation loss the run's metrics.jsonl recorded."""
    curves: dict[str, list[tuple[int, float]]] = {}
    for row in round_summaries(run_dir):
        for key, value in row.get("evaluate", {}).items():
            if key.endswith("/eval_loss"):
                curves.setdefault(key.split("/")[0], []).append((int(row["round"]), float(value)))
    return curves


def mean_curve(curves: dict[str, list[tuple[int, float]]]) -> list[tuple[int, float]]:
    """The mean over groups, round by round (rounds every group reported)."""
    by_round: dict[int, list[float]] = {}
    for points in curves.values():
        for round_, value in points:
            by_round.setdefault(round_, []).append(value)
    return [(r, sum(v) / len(v)) for r, v in sorted(by_round.items()) if len(v) == len(curves)]


def write_plot(path: Path, variants: dict[str, dict[str, Any]], curves: dict[str, list[tuple[int, float]]],
               curve_title: str = "Validation loss by round") -> Path:
    """Left: fact accuracy per region (groups of bars) and variant (colours). Right: `curves`."""
    names = list(variants)
    regions = sorted({region for result in variants.values() for region in result.get("regions", {})})
    figure, (bars, lines) = plt.subplots(1, 2, figsize=(12, 4.2), gridspec_kw={"width_ratios": [3, 2]})
    width = 0.8 / max(len(names), 1)
    colors = {name: f"C{i % 10}" for i, name in enumerate(names)}  # a variant keeps its colour in both panels
    for i, name in enumerate(names):
        values = [100 * (variants[name].get("regions", {}).get(r, {}).get("fact_accuracy") or 0.0) for r in regions]
        positions = [k - 0.4 + width * (i + 0.5) for k in range(len(regions))]
        drawn = bars.bar(positions, values, width, label=name, color=colors[name])
        if len(names) <= 4:
            bars.bar_label(drawn, fmt="%.0f", fontsize=7)
    bars.set_xticks(range(len(regions)), regions)
    bars.set_ylim(0, 115)
    bars.set_ylabel("location-fact accuracy (%)")
    bars.set_title("Held-out intents: fact accuracy per region")
    bars.legend(loc="upper left", ncols=min(len(names), 4), fontsize=8)
    for label, points in curves.items():
        if points:
            lines.plot(*zip(*points), marker="o", label=label, color=colors.get(label))
    lines.set_xlabel("round")
    lines.xaxis.get_major_locator().set_params(integer=True)
    lines.set_ylabel("completion loss (validation split)")
    lines.set_yscale("log")
    lines.set_title(curve_title)
    if lines.lines:
        lines.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def write_privacy_plot(path: Path, trade_off: dict[str, dict[str, dict[str, Any]]],
                       base: dict[str, Any] | None = None) -> Path:
    """privacy-utility.png: location-fact accuracy (held-out intents) against epsilon, a line per variant, the
    epsilons in the order compared (the base model's accuracy, which spends no privacy, as a dashed line)."""
    labels = epsilon_labels(trade_off)
    figure, axis = plt.subplots(figsize=(6.4, 4.2))
    for i, (variant, row) in enumerate(trade_off.items()):
        points = [(labels.index(label), 100 * (result.get("fact_accuracy") or 0.0)) for label, result in row.items()]
        axis.plot(*zip(*points), marker="o", label=variant, color=f"C{i % 10}")
    if base is not None:
        axis.axhline(100 * (base.get("fact_accuracy") or 0.0), color="grey", linestyle="--", label="base")
    axis.set_xticks(range(len(labels)), ["∞" if label == "inf" else label for label in labels])
    axis.set_xlabel("epsilon (DP-SGD at each site, one prompt pair protected)")
    axis.set_ylim(0, 105)
    axis.set_ylabel("location-fact accuracy (%)")
    axis.set_title("Privacy-utility: held-out intents")
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path
