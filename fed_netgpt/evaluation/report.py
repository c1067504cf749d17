"""The personalization report: report.json (every number, every completion), report.md and the console table."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

# (key in a variant's result, column title, percent?)
COLUMNS = (
    ("fact_accuracy", "facts", True),
    ("region_fact_accuracy", "region facts", True),
    ("site_fact_accuracy", "site facts", True),
    ("fact_precision", "fact precision", True),
    ("wrong_facts_per_row", "wrong facts/row", False),
    ("worst_site_fact_accuracy", "worst site", True),
    ("request_kept", "request kept", True),
    ("rouge_l", "ROUGE-L", True),
    ("exact_match", "exact", True),
    ("loss", "loss", False),
)


def duration(seconds: float) -> str:
    """`12m05s`: how progress lines show elapsed time and ETA."""
    return f"{int(seconds // 60)}m{int(seconds % 60):02d}s"


def cell(value: Any, percent: bool, spread: Any = None) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    text = f"{100 * value:.1f}%" if percent else f"{value:.3f}"
    if spread is not None and not math.isnan(spread):
        text += f" ± {100 * spread:.1f}" if percent else f" ± {spread:.3f}"
    return text


def variant_table(variants: dict[str, dict[str, Any]], group: str | None = None) -> str:
    """One row per variant, one column per metric; `group` picks a sub-result (e.g. held-out sites)."""
    lines = ["| variant | n | " + " | ".join(title for _, title, _ in COLUMNS) + " |",
             "|---|---|" + "---|" * len(COLUMNS)]
    for name, result in variants.items():
        result = result.get(group, {}) if group else result
        if not result:
            continue
        spread = result.get("std", {})
        cells = [cell(result.get(key), pct, spread.get(key)) for key, _, pct in COLUMNS]
        lines.append(f"| {name} | {int(result.get('num_examples', 0))} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def region_table(variants: dict[str, dict[str, Any]], group: str | None = None) -> str:
    """Fact accuracy per region (rows) and variant (columns)."""
    names = [n for n, r in variants.items() if (r.get(group) if group else r)]
    regions = sorted({region for n in names for region in _sub(variants[n], group).get("regions", {})})
    lines = ["| region | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for region in regions:
        values = [_sub(variants[n], group).get("regions", {}).get(region, {}).get("fact_accuracy") for n in names]
        lines.append(f"| {region} | " + " | ".join(cell(v, True) for v in values) + " |")
    return "\n".join(lines)


def epsilon_labels(trade_off: dict[str, dict[str, Any]]) -> list[str]:
    """The epsilons of a privacy-utility table, in the order compared."""
    return list(dict.fromkeys(label for row in trade_off.values() for label in row))


def privacy_utility_table(trade_off: dict[str, dict[str, dict[str, Any]]]) -> str:
    """Rows: privacy-utility variants; columns: epsilons."""
    labels = epsilon_labels(trade_off)
    lines = ["| variant | " + " | ".join(f"ε={label}" for label in labels) + " |", "|---|" + "---|" * len(labels)]
    for variant, row in trade_off.items():
        cells = []
        for label in labels:
            result = row.get(label)
            if result is None:
                cells.append("–")
                continue
            text = " / ".join(cell(result.get(key), True) for key in
                              ("fact_accuracy", "site_fact_accuracy", "worst_site_fact_accuracy"))
            reached = result.get("epsilon_max")
            cells.append(text + (f" ({reached:.2f})" if isinstance(reached, float) and math.isfinite(reached)
                                 else ""))
        lines.append(f"| {variant} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _sub(result: dict[str, Any], group: str | None) -> dict[str, Any]:
    return result.get(group, {}) if group else result


def summary_text(report: dict[str, Any]) -> str:
    """The tables a person reads first: held-out intents, held-out sites, fact accuracy per region."""
    variants = report["variants"]
    parts = ["Held-out intents at the training sites (requests no site trained on):", "", variant_table(variants)]
    if any("heldout_sites" in r for r in variants.values()):
        parts += ["", "Held-out sites (never trained; served by their region's adapter):", "",
                  variant_table(variants, "heldout_sites")]
    parts += ["", "Location-fact accuracy per region (held-out intents):", "", region_table(variants)]
    if report.get("privacy_utility"):
        parts += ["", "Privacy-utility: fact accuracy on held-out intents / site-level facts / worst site, by "
                  "epsilon (DP-SGD at each site; the epsilon the worst site reached in brackets):", "",
                  privacy_utility_table(report["privacy_utility"])]
    privacy = report.get("privacy")
    if privacy:
        worst = "the worst region" if "regions" in privacy else "the worst site"
        parts += ["", f"Differential privacy ({privacy['mode']}): epsilon {cell(privacy['epsilon_max'], False)} at "
                  f"delta {privacy['delta']:g} ({worst}) for {privacy['unit']}; it covers "
                  f"{privacy['covers']}." + (f" Budget spent before the end: {', '.join(privacy['budget_spent'])}."
                                               if privacy["budget_spent"] else "")]
    if report.get("scored_by") == "sites":
        missing = report.get("sites_missing", [])
        parts += ["", f"Held-out intents scored by the sites themselves: {len(report['sites_scored'])} sites sent "
                  f"counts, not rows" + (f"; not scored: {', '.join(missing)}" if missing else "") + "."]
    return "\n".join(parts)


def write_report(folder: Path, report: dict[str, Any], shown: int, title: str = "Personalization report") -> str:
    """report.json (NaN written as null) and report.md (the tables, `shown` examples per variant)."""
    write_atomically(folder / "report.json", json.dumps(json_safe(report), indent=2, ensure_ascii=False))
    text = summary_text(report)
    lines = [f"# {title}", "", text, "", "![report](report.png)", ""]
    for name, result in report["variants"].items():
        examples = result.get("examples", [])[:shown] + result.get("heldout_sites", {}).get("examples", [])[:shown]
        if examples:
            lines += [f"## {name}", ""]
            lines += [f"- `{ex['site_id']}` ({ex['region']}) {ex['prompt']!r}\n  - completion: {ex['completion']}\n"
                      f"  - reference: {ex['reference']}" for ex in examples]
            lines.append("")
    write_atomically(folder / "report.md", "\n".join(lines))
    return text


def json_safe(value: Any) -> Any:
    """NaN and infinities become null: report.json stays valid JSON for every tool."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [json_safe(v) for v in value]
    return value


def write_atomically(path: Path, text: str) -> None:
    """Write beside, then rename into place: a reader (or a crash) never sees half a file."""
    staging = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    staging.write_text(text)
    staging.rename(path)
