"""The real SmolLM2-135M-Instruct: conversion from the wheel, learning the task, stock peft loading."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from fed_netgpt.adapters import attach_adapter, load_adapter, save_adapter
from fed_netgpt.config import load_config
from fed_netgpt.data.facts import fact_levels, fact_vocabulary
from fed_netgpt.data.sites import load_pairs, load_sites
from fed_netgpt.evaluation import generate_completions, run_variant, score_variant
from fed_netgpt.models import SMOLLM2, cache_root, load_base, smollm2_folder
from fed_netgpt.training import train_adapter

pytestmark = pytest.mark.slow


CONFIG = load_config(overrides=["data.countries=[FR]", "data.sites_per_region=2", "train.local_steps=20"])


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list]:
    """A France adapter trained on the pooled data of two French sites for 20 steps, saved in peft format;
    the sites' held-out-intent rows (no location in the prompt: data.context=none)."""
    base = load_base(SMOLLM2)
    sites = load_sites(CONFIG.data)
    model = attach_adapter(base, "slow-france", CONFIG.lora)
    train_adapter(model, "slow-france", base.tokenizer, [p for s in sites for p in s.train], CONFIG.train)
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
