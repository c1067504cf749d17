"""Metrics of prompt completion (location-fact accuracy, ROUGE-L, loss) and the personalization report."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel
from transformers import PreTrainedTokenizerBase

from fed_netgpt.adapters import load_adapter
from fed_netgpt.config import Config
from fed_netgpt.data.schema import PromptPair
from fed_netgpt.models import BaseModel
from fed_netgpt.prompting import chat_prompt, end_of_turn_id
from fed_netgpt.runs import RunFolderError, adapter_dir, run_regions, serving_adapter
from fed_netgpt.training import collate


def fact_accuracy(text: str, facts: Sequence[str]) -> float:
    """Fraction of `facts` that appear in `text` (case-insensitive); 1.0 when there is nothing to check."""
    if not facts:
        return 1.0
    lowered = text.lower()
    return sum(fact.lower() in lowered for fact in facts) / len(facts)


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F1 over lower-cased whitespace tokens (longest common subsequence)."""
    pred, ref = prediction.lower().split(), reference.lower().split()
    if not pred or not ref:
        return float(pred == ref)
    previous = [0] * (len(ref) + 1)
    for p in pred:
        current = [0]
        for j, r in enumerate(ref, start=1):
            current.append(previous[j - 1] + 1 if p == r else max(previous[j], current[j - 1]))
        previous = current
    lcs = previous[-1]
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(pred), lcs / len(ref)
    return 2 * precision * recall / (precision + recall)


@torch.no_grad()
def completion_loss(
    model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, pairs: Sequence[PromptPair],
    batch_size: int = 16, max_length: int = 128,
) -> float:
    """Mean cross-entropy per completion token (the same tokens training puts its loss on)."""
    device = next(model.parameters()).device
    total, tokens = 0.0, 0
    for start in range(0, len(pairs), batch_size):
        batch = {k: v.to(device) for k, v in collate(tokenizer, pairs[start : start + batch_size], max_length).items()}
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        targets = batch["labels"][:, 1:]
        losses = torch.nn.functional.cross_entropy(
            logits[:, :-1].float().transpose(1, 2), targets, ignore_index=-100, reduction="sum"
        )
        total += float(losses)
        tokens += int((targets != -100).sum())
    return total / max(tokens, 1)


@torch.no_grad()
def generate_completions(
    model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, items: Sequence[tuple[str, str]],
    max_new_tokens: int = 48, batch_size: int = 16,
) -> list[str]:
    """Greedy completions of `(context, prompt)` items; each stops at the end-of-turn token."""
    device = next(model.parameters()).device
    stop = end_of_turn_id(tokenizer)
    outputs: list[str] = []
    padding_side = tokenizer.padding_side
    tokenizer.padding_side = "left"  # decoder-only generation continues from the last real token
    try:
        for start in range(0, len(items), batch_size):
            texts = [chat_prompt(tokenizer, context, prompt) for context, prompt in items[start : start + batch_size]]
            encoded = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
            generated = model.generate(
                **encoded, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=stop,
                pad_token_id=tokenizer.pad_token_id,
            )
            new_tokens = generated[:, encoded["input_ids"].shape[1] :]
            outputs += [text.strip() for text in tokenizer.batch_decode(new_tokens, skip_special_tokens=True)]
    finally:
        tokenizer.padding_side = padding_side
    return outputs


def evaluate_pairs(
    model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, pairs: Sequence[PromptPair],
    max_new_tokens: int, batch_size: int, max_length: int = 128,
) -> dict[str, Any]:
    """All metrics of one model on `pairs`, with the generated completions for inspection."""
    items = [(p.context, p.prompt) for p in pairs]
    generated = generate_completions(model, tokenizer, items, max_new_tokens, batch_size)
    loss = completion_loss(model, tokenizer, pairs, batch_size, max_length)
    return {
        "fact_accuracy": _mean([fact_accuracy(g, p.facts) for g, p in zip(generated, pairs)]),
        "rouge_l": _mean([rouge_l(g, p.completion) for g, p in zip(generated, pairs)]),
        "loss": loss,
        "perplexity": math.exp(min(loss, 50.0)),  # capped: a random model's loss would overflow exp
        "num_examples": len(pairs),
        "completions": generated,
    }


def evaluate_base_and_adapter(
    model: PeftModel, adapter_name: str, tokenizer: PreTrainedTokenizerBase, pairs: Sequence[PromptPair],
    max_new_tokens: int, batch_size: int, max_length: int = 128,
) -> dict[str, dict[str, Any]]:
    """The same pairs through the base model (adapters disabled) and through adapter `adapter_name`."""
    model.set_adapter(adapter_name)
    with model.disable_adapter():
        base = evaluate_pairs(model, tokenizer, pairs, max_new_tokens, batch_size, max_length)
    adapted = evaluate_pairs(model, tokenizer, pairs, max_new_tokens, batch_size, max_length)
    return {"base": base, "adapter": adapted}


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


METRICS = ("fact_accuracy", "rouge_l", "loss", "perplexity")


def report_table(regions: dict[str, dict[str, dict[str, Any]]]) -> str:
    """A Markdown table: per region, base vs adapter on every metric."""
    header = "| region | n | " + " | ".join(f"{m} base | {m} adapter" for m in METRICS) + " |"
    lines = [header, "|" + "---|" * (2 + 2 * len(METRICS))]
    for region, result in regions.items():
        cells = [region, str(result["adapter"]["num_examples"])]
        for metric in METRICS:
            cells += [_fmt(metric, result["base"][metric]), _fmt(metric, result["adapter"][metric])]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _fmt(metric: str, value: float) -> str:
    return f"{value:.1%}" if metric in ("fact_accuracy", "rouge_l") else f"{value:.3f}"


def report_json(regions: dict[str, dict[str, dict[str, Any]]], completions: dict[str, list[dict]]) -> dict:
    """What report.json holds and `fed-netgpt evaluate` prints: every metric and every completion."""
    summary = {
        region: {which: {m: result[which][m] for m in METRICS + ("num_examples",)} for which in ("base", "adapter")}
        for region, result in regions.items()
    }
    return {"regions": summary, "completions": completions}


def write_report(
    folder: Path, regions: dict[str, dict[str, dict[str, Any]]], completions: dict[str, list[dict]], shown: int
) -> str:
    """report.json (every number and completion) and report.md (the table, `shown` examples a region)."""
    table = report_table(regions)
    (folder / "report.json").write_text(json.dumps(report_json(regions, completions), indent=2))
    intro = "Test split (held-out intents), base model vs regional adapter."
    lines = ["# Personalization report", "", intro, "", table, "", "![report](report.png)", ""]
    for region, rows in completions.items():
        lines += [f"## {region}", ""]
        for ex in rows[:shown]:
            lines += [f"- site `{ex['site_id']}`, prompt: {ex['prompt']}", f"  - base: {ex['base']}",
                      f"  - adapter: {ex['adapter']}", f"  - reference: {ex['reference']}"]
        lines.append("")
    (folder / "report.md").write_text("\n".join(lines))
    return table


def spread_over_sites(pairs: Sequence[PromptPair], limit: int) -> list[PromptPair]:
    """Up to `limit` pairs taken round-robin over sites, so every site of a region is represented."""
    by_site: dict[str, list[PromptPair]] = {}
    for pair in pairs:
        by_site.setdefault(pair.site_id, []).append(pair)
    queues = [list(v) for _, v in sorted(by_site.items())]
    chosen: list[PromptPair] = []
    while len(chosen) < limit and any(queues):
        for queue in queues:
            if queue and len(chosen) < limit:
                chosen.append(queue.pop(0))
    return chosen


def evaluate_run(
    folder: Path, config: Config, pairs: Sequence[PromptPair], base: BaseModel
) -> tuple[dict[str, dict[str, dict[str, Any]]], dict[str, list[dict]]]:
    """Base vs adapter on each region's test split; in global mode every region uses adapters/global.

    Returns the metrics per region and, per region, every evaluated pair with both completions.
    """
    available = run_regions(folder)
    test_by_region: dict[str, list[PromptPair]] = {}
    for pair in pairs:
        if pair.split == "test":
            test_by_region.setdefault(pair.region, []).append(pair)
    results, completions = {}, {}
    ev = config.evaluation
    for region, test in sorted(test_by_region.items()):
        adapter_region = serving_adapter(config, region)
        if adapter_region not in available:
            continue
        model = load_adapter(base, f"eval-{adapter_region}", adapter_dir(folder, adapter_region))
        chosen = spread_over_sites(test, ev.max_examples_per_region)
        result = evaluate_base_and_adapter(model, f"eval-{adapter_region}", base.tokenizer, chosen,
                                           ev.max_new_tokens, ev.batch_size, config.train.max_length)
        results[region] = result
        completions[region] = [
            {"site_id": p.site_id, "prompt": p.prompt, "reference": p.completion, "facts": list(p.facts),
             "base": base_text, "adapter": adapter_text}
            for p, base_text, adapter_text in zip(chosen, result["base"]["completions"],
                                                  result["adapter"]["completions"])
        ]
    if not results:
        raise RunFolderError(f"{folder}: no adapter in adapters/ matches a region of the test data")
    return results, completions
