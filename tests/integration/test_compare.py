"""`fed-netgpt compare` end to end on the tiny model, and a run on a hand-written JSONL in another format."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.integration.test_simulate import fed_netgpt

pytestmark = pytest.mark.integration
CONTRACT = ("base", "local", "global", "regional", "personalized")


def test_compare_trains_every_variant_and_writes_one_report(tmp_path: Path) -> None:
    out = tmp_path / "compare"
    done = fed_netgpt("compare", "preset=smoke", f"run.output_dir={out}", "federation.num_rounds=1",
                      "evaluation.max_examples_per_region=6", timeout=1500)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    report = json.loads((out / "report.json").read_text())
    variants = report["variants"]
    assert list(variants) == ["base", "local", "global", "global_city", "regional", "personalized",
                              "regional_ffa", "regional_svd"]
    rows = None
    for name in CONTRACT:
        result = variants[name]
        for key in ("fact_accuracy", "region_fact_accuracy", "site_fact_accuracy"):
            assert 0.0 <= result[key] <= 1.0, (name, key)
        examples = [(e["site_id"], e["prompt"]) for e in result["examples"]]
        assert len(examples) == 12  # 2 regions x 2 training sites x 3 held-out intents: every cell once
        assert rows is None or examples == rows, name  # every variant on the very same rows
        rows = examples
        assert set(result["examples"][0]) >= {"site_id", "region", "prompt", "reference", "completion", "facts"}
    for name in ("local", "global", "regional", "regional_ffa", "regional_svd"):
        assert variants[name]["wall_seconds"] > 0
        assert variants[name]["uplink_bytes_per_round"] > 0
    assert variants["global_city"]["examples"][0]["context"].startswith("site: ")
    # a local run cannot serve a site that never trained: the held-out sites get the base model
    assert variants["local"]["heldout_sites"]["examples"] == variants["base"]["heldout_sites"]["examples"]
    for name in ("report.md", "report.png"):
        assert (out / name).is_file()
    assert "| regional_svd |" in (out / "report.md").read_text()

    # a second seed with run.resume=true evaluates the first seed's runs again instead of retraining them
    mtimes = {p: p.stat().st_mtime_ns for p in (out / "runs").glob("*-seed0/adapters/*/adapter_model.safetensors")}
    again = fed_netgpt("compare", "preset=smoke", f"run.output_dir={out}", "federation.num_rounds=1",
                       "evaluation.max_examples_per_region=6", "compare.seeds=2", "run.resume=true",
                       "compare.variants=[base,regional]", timeout=900)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "regional-seed0 finished earlier with the same config" in again.stdout
    assert mtimes and all(p.stat().st_mtime_ns == t for p, t in mtimes.items() if "regional-seed0" in str(p))
    assert (out / "runs" / "regional-seed1" / "adapters").is_dir()
    resumed = json.loads((out / "report.json").read_text())
    assert resumed["seeds"] == 2 and resumed["variants"]["regional"]["seeds"] == 2


HAND_WRITTEN = [  # a user's own format: facts first, request last, and one region with two sites
    {"site_id": "lyon", "region": "rhone", "prompt": p, "completion": f"[Lyon | Rhone | 69] {p}",
     "facts": ["Lyon", "Rhone", "69"], "split": s, "intent": i}
    for p, s, i in (("Find a bakery.", "train", "food"), ("Any bike rental?", "train", "bikes"),
                    ("Is the museum open?", "test", "museum"))
] + [
    {"site_id": "villeurbanne", "region": "rhone", "prompt": p, "completion": f"[Villeurbanne | Rhone | 69] {p}",
     "facts": ["Villeurbanne", "Rhone", "69"], "split": s, "intent": i}
    for p, s, i in (("Find a bakery.", "train", "food"), ("Where to swim?", "train", "swim"),
                    ("Is the museum open?", "test", "museum"))
]


def test_a_hand_written_jsonl_gets_region_and_site_facts_from_its_own_rows(tmp_path: Path) -> None:
    data = tmp_path / "mine.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in HAND_WRITTEN))
    out = tmp_path / "mine"
    done = fed_netgpt("simulate", "preset=smoke", f"data.path={data}", f"run.output_dir={out}",
                      "federation.num_rounds=1")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    base = json.loads((out / "report.json").read_text())["variants"]["base"]
    # 2 test rows x (Rhone, 69 region-level; the city site-level)
    assert base["num_examples"] == 2 and base["num_facts"] == 6
    assert sorted(p.name for p in (out / "site_adapters").iterdir()) == ["lyon", "villeurbanne"]
