"""The run-folder and metrics contracts of ARCHITECTURE.md, frozen in tests/contracts.json as they were at commit
f942d14: a finished smoke run (conf/smoke.yaml, through `fed-netgpt simulate`) must still write every frozen file
and every frozen field of metrics.jsonl and report.json; new ones pass (extend, never rename).

Region names, site ids and round numbers are placeholders: adapters/<region>/..., checkpoints/round-<n>/...,
"<region>/train_loss". Hidden files (a run's .lock) are not part of the contract."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from tests.unit.test_contracts import assert_extended, frozen

pytestmark = pytest.mark.integration
ROUND = re.compile(r"round-\d+")


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def run_names(folder: Path) -> tuple[set[str], set[str]]:
    """The run's region names and site ids, from its per-site records and its report."""
    sites = [row for row in _rows(folder / "metrics.jsonl") if "site_id" in row]
    regions = {row["region"] for row in sites if "region" in row}
    site_ids = {row["site_id"] for row in sites}
    report = json.loads((folder / "report.json").read_text(encoding="utf-8"))
    for variant in report.get("variants", {}).values():
        for results in (variant, variant.get("heldout_sites") or {}):
            regions.update(results.get("regions") or {})
            site_ids.update(results.get("sites") or {})
    return regions, site_ids


def _pattern(parts: tuple[str, ...], regions: set[str], site_ids: set[str]) -> str:
    def one(part: str) -> str:
        if part in regions:
            return "<region>"
        if part in site_ids:
            return "<site>"
        return "round-<n>" if ROUND.fullmatch(part) else part

    return "/".join(one(part) for part in parts)


def run_folder_patterns(folder: Path) -> list[str]:
    """Every file of a finished run folder as a path pattern (adapters/<region>/adapter_config.json, ...)."""
    regions, site_ids = run_names(folder)
    files = (path.relative_to(folder).parts for path in folder.rglob("*") if path.is_file())
    return sorted({_pattern(parts, regions, site_ids) for parts in files
                   if not any(part.startswith(".") for part in parts)})


def metrics_fields(folder: Path) -> dict[str, list[str]]:
    """The keys of metrics.jsonl's records and of report.json, by kind of record:
    round_summary (top level) and round_summary/<sub-dict> (its nested keys: train, evaluate, bytes, ...),
    site_record, report (top level), report/variants (the variant names) and report/variant (the keys every
    variant's entry has)."""
    regions, site_ids = run_names(folder)
    rows = _rows(folder / "metrics.jsonl")
    summaries = [row for row in rows if "round" in row and "site_id" not in row]
    fields: dict[str, set[str]] = {"round_summary": set(), "site_record": set()}
    for row in summaries:
        fields["round_summary"].update(row)
        for key, value in row.items():
            if isinstance(value, dict):
                fields.setdefault(f"round_summary/{key}", set()).update(
                    _pattern(tuple(str(nested).split("/")), regions, site_ids) for nested in value)
    for row in rows:
        if "site_id" in row:
            fields["site_record"].update(row)
    report = json.loads((folder / "report.json").read_text(encoding="utf-8"))
    variants = report.get("variants", {})
    fields["report"] = set(report)
    fields["report/variants"] = set(variants)
    fields["report/variant"] = set.intersection(*(set(entry) for entry in variants.values())) if variants else set()
    return {kind: sorted(keys) for kind, keys in sorted(fields.items())}


def test_a_finished_run_still_writes_every_frozen_file(run_dir: Path):  # noqa: F811 - the imported fixture
    # Prepare
    expected = frozen("run_folder")

    # Execute
    current = run_folder_patterns(run_dir)

    # Assert
    assert_extended("run folder file", expected, current)


@pytest.mark.parametrize("kind", sorted(frozen("metrics_fields")))
def test_metrics_and_report_still_carry_every_frozen_field(run_dir: Path, kind: str):  # noqa: F811
    # Prepare
    expected = frozen("metrics_fields")[kind]

    # Execute
    current = metrics_fields(run_dir).get(kind, [])

    # Assert
    assert_extended(f"{kind} field", expected, current)
