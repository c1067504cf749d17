"""The real SmolLM2-135M-Instruct: conversion from the wheel, learning the task, stock peft loading."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from fed_netgpt.config import load_config
from fed_netgpt.data.facts import fact_levels, fact_vocabulary
from fed_netgpt.data.sites import load_pairs, load_sites
from fed_netgpt.evaluation.scoring import generate_completions, run_variant, score_variant
from fed_netgpt.model.adapters import attach_adapter, get_state, load_adapter, save_adapter, set_state
from fed_netgpt.model.base import SMOLLM2, cache_root, load_base, smollm2_folder
from fed_netgpt.training.engine import SiteJob, train_sites

pytestmark = pytest.mark.slow


CONFIG_OVERRIDES = ["data.countries=[FR]", "data.sites_per_region=2", "train.local_steps=20"]
CONFIG = load_config(overrides=CONFIG_OVERRIDES)


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list]:
    """A France adapter trained on the pooled data of two French sites for 20 steps, saved in peft format;
    the sites' held-out-intent rows (no location in the prompt: data.context=none)."""
    base = load_base(SMOLLM2)
    sites = load_sites(CONFIG.data)
    model = attach_adapter(base, "slow-france", CONFIG.lora)
    job = SiteJob("france", [p for s in sites for p in s.train], get_state(model, "slow-france"))
    (result,) = train_sites(base, [job], CONFIG.lora, CONFIG.train)
    set_state(model, "slow-france", result.state)
    folder = save_adapter(model, "slow-france", tmp_path_factory.mktemp("adapter") / "france")
    return folder, [p for s in sites for p in s.test]


def test_the_embedded_model_is_the_real_pretrained_smollm2() -> None:
    base = load_base(SMOLLM2)
    assert sum(p.numel() for p in base.model.parameters()) == 134_515_008
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    ids = base.tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                             return_dict=True)
    with torch.no_grad():
        out = base.model.generate(**ids, max_new_tokens=20, do_sample=False)
    assert "Paris" in base.tokenizer.decode(out[0, ids["input_ids"].shape[1] :])


def test_twenty_local_steps_learn_the_regions_facts_on_held_out_intents(trained: tuple[Path, list]) -> None:
    folder, test = trained
    base = load_base(SMOLLM2)
    pairs = load_pairs(CONFIG.data)
    result, before = (score_variant(test, *run_variant(base, CONFIG, test, [served] * len(test)),
                                    fact_levels(pairs), fact_vocabulary(pairs)) for served in (folder, None))
    loss, base_loss = result["loss"], before["loss"]
    # France, Europe/Paris, EUR, +33 with no location in the prompt; recorded 0.89: 16 of 18 rows complete, the
    # request "Where is a pharmacy open now?" comes back bare
    assert result["region_fact_accuracy"] >= 0.85
    assert before["region_fact_accuracy"] <= 0.2  # the base model cannot know where the user is
    assert result["request_kept"] >= 0.85
    assert loss < base_loss / 3


def test_stock_peft_loads_the_adapter_and_completes_identically(trained: tuple[Path, list]) -> None:
    folder, test = trained
    base = load_base(SMOLLM2)
    ours = generate_completions(load_adapter(base, "slow-ours", folder), base.tokenizer,
                                [(p.context, p.prompt) for p in test[:4]])
    fresh = AutoModelForCausalLM.from_pretrained(smollm2_folder(cache_root()), dtype=torch.float32)
    stock = PeftModel.from_pretrained(fresh, str(folder)).eval()
    theirs = generate_completions(stock, base.tokenizer, [(p.context, p.prompt) for p in test[:4]])
    assert theirs == ours
    assert sum(p.facts[1] in text for p, text in zip(test, theirs)) >= 3  # the country: a region-level fact


def test_over_http_the_edge_adds_the_regions_facts_and_a_cloud_instance_answers(
        trained: tuple[Path, list], tmp_path: Path) -> None:
    """NetGPT end to end on real weights: an edge service (int8 on a CPU, as `serve` runs by default) serving the
    trained France adapter, pointing at a second service that is the cloud (the base SmolLM2), both on real HTTP."""
    import shutil

    import httpx

    from fed_netgpt.config import ServingConfig
    from fed_netgpt.run.folder import start_run
    from fed_netgpt.serving.cloud import LocalCloud, OpenAICloud
    from fed_netgpt.serving.edge import EdgeService
    from fed_netgpt.serving.http import create_app
    from tests.serving_runs import Served

    folder, test = trained
    run = tmp_path / "run"
    start_run(load_config(overrides=[*CONFIG_OVERRIDES, f"run.output_dir={run}"]))
    shutil.copytree(folder, run / "adapters" / "france")
    settings = ServingConfig(cloud_max_tokens=48)
    cloud_service = EdgeService(settings, model_name=SMOLLM2)
    cloud = Served(create_app(cloud_service, LocalCloud(cloud_service, 48), settings))
    edge_service = EdgeService(settings, run=run)
    edge = Served(create_app(edge_service, OpenAICloud(f"{cloud.url}/v1", "", max_tokens=48, timeout=120, retries=0),
                             settings))
    try:
        rows = test[:6]
        replies = [httpx.post(f"{edge.url}/v1/generate", json={"site_id": p.site_id, "prompt": p.prompt},
                              timeout=300).json() for p in rows]
        own = [cloud_service.chat([{"role": "user", "content": r["completion"]}], max_new_tokens=48).text
               for r in replies]
    finally:
        edge.stop()
        cloud.stop()
        edge_service.close()
        cloud_service.close()
    assert all(r["cloud_model"] == SMOLLM2 and r["answer"].strip() for r in replies), replies
    # the completed prompt names the country (a region-level fact the adapter learned; the prompt has none) ...
    assert sum(p.facts[1] in r["completion"] for p, r in zip(rows, replies)) >= 5, replies
    # ... and the answer is the cloud instance's own answer to it, over HTTP (whether a 135M cloud uses the
    # location is another matter: benchmarks/serving.py measures it)
    assert [r["answer"] for r in replies] == own
