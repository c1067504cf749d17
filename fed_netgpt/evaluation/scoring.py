"""Evaluation of a run: every variant's completions on the same sampled rows, scored by `fed_netgpt.evaluation.metrics`.

Two test groups, reported apart: held-out intents at the training sites (requests no site trained on), and
held-out sites (sites that never trained: cold start with the region's adapter). A variant is one way to serve a
row: `base` (no adapter), the federated adapters (`regional`, `global` or `local`) and `personalized` (the site's
own adapter, else its region's). `runs.serving_adapter` decides which adapter serves a row; rows are batched per
adapter, so every variant sees exactly the same rows.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase

from fed_netgpt.config import Config
from fed_netgpt.data.facts import fact_levels, fact_vocabulary, levels_of
from fed_netgpt.data.schema import PromptPair
from fed_netgpt.data.sites import site_datasets
from fed_netgpt.evaluation.metrics import RowScore, add_tallies, score_row, summarize_tally, tally
from fed_netgpt.model.adapters import adapter_name_for, load_adapter, peft_model_of
from fed_netgpt.model.base import BaseModel
from fed_netgpt.model.prompting import chat_prompt, end_of_turn_id
from fed_netgpt.run.folder import RunFolderError, federated_variant, serving_adapter
from fed_netgpt.training.batches import collate, on_device
from fed_netgpt.training.losses import token_losses

GROUPS = ("heldout_intents", "heldout_sites")  # test rows of training sites | test rows of held-out sites


@torch.no_grad()
def batch_token_losses(
    model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, pairs: Sequence[PromptPair],
    batch_size: int = 16, max_length: int = 128,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Batch by batch, each completion token's cross-entropy and where completion tokens are ([rows, seq])."""
    device = next(model.parameters()).device
    for start in range(0, len(pairs), batch_size):
        batch = on_device(collate(tokenizer, pairs[start : start + batch_size], max_length), device)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        yield token_losses(logits, batch["labels"])


def completion_loss_sum(
    model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, pairs: Sequence[PromptPair],
    batch_size: int = 16, max_length: int = 128,
) -> tuple[float, int]:
    """Summed cross-entropy over completion tokens (the tokens training puts its loss on), and their count."""
    total, tokens = 0.0, 0
    for losses, counted in batch_token_losses(model, tokenizer, pairs, batch_size, max_length):
        total += float(losses[counted].sum())
        tokens += int(counted.sum())
    return total, tokens


def completion_loss(
    model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, pairs: Sequence[PromptPair],
    batch_size: int = 16, max_length: int = 128,
) -> float:
    """Mean cross-entropy per completion token."""
    total, tokens = completion_loss_sum(model, tokenizer, pairs, batch_size, max_length)
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
            generated = model.generate(  # type: ignore[operator]  # nn.Module does not declare a causal LM's generate
                **encoded, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=stop,
                pad_token_id=tokenizer.pad_token_id,
            )
            new_tokens = generated[:, encoded["input_ids"].shape[1] :]
            outputs += [text.strip() for text in tokenizer.batch_decode(new_tokens, skip_special_tokens=True)]
    finally:
        tokenizer.padding_side = padding_side
    return outputs


def site_sample(pairs: Sequence[PromptPair], limit: int | None, offset: int = 0) -> list[PromptPair]:
    """Up to `limit` of one site's test pairs (None: all), round-robin over its intents in sorted order starting
    at the `offset`-th: every intent before any gets a second row, and a region's sites (offsets 0, 1, ...)
    start on different intents, so even a small sample covers every site and every held-out intent."""
    cells: dict[str, list[PromptPair]] = {}
    for pair in pairs:
        cells.setdefault(pair.intent, []).append(pair)
    queues = [list(rows) for _, rows in sorted(cells.items())]
    if queues:
        start = offset % len(queues)
        queues = queues[start:] + queues[:start]
    limit = len(pairs) if limit is None else limit
    chosen: list[PromptPair] = []
    while len(chosen) < limit and any(queues):
        for queue in queues:
            if queue and len(chosen) < limit:
                chosen.append(queue.pop(0))
    return chosen


def site_shares(sites: Sequence[str], per_region: int) -> dict[str, tuple[int | None, int]]:
    """Each site's (row limit, intent offset) when a region of `sites` gives `per_region` test rows (0: all):
    shared out evenly, the first sites in sorted order taking the remainder. The server hands the same shares
    to sites that score their own rows, so both ways sample the very same rows."""
    ordered = sorted(sites)
    if not per_region:
        return {site: (None, k) for k, site in enumerate(ordered)}
    quotient, remainder = divmod(per_region, len(ordered))
    return {site: (quotient + (k < remainder), k) for k, site in enumerate(ordered)}


def sample_test_rows(pairs: Sequence[PromptPair], per_region: int) -> dict[str, list[PromptPair]]:
    """The sampled test rows of each group (`GROUPS`), `per_region` a region and group (0: all)."""
    heldout = {site.site_id for site in site_datasets(list(pairs)) if site.heldout}
    rows: dict[str, list[PromptPair]] = {group: [] for group in GROUPS}
    by_site: dict[tuple[str, str], dict[str, list[PromptPair]]] = {}
    for pair in pairs:
        if pair.split == "test":
            group = GROUPS[1] if pair.site_id in heldout else GROUPS[0]
            by_site.setdefault((group, pair.region), {}).setdefault(pair.site_id, []).append(pair)
    for (group, _), sites in sorted(by_site.items()):
        for site, (limit, offset) in site_shares(list(sites), per_region).items():
            rows[group] += site_sample(sites[site], limit, offset)
    return rows


def run_variant(
    base: BaseModel, config: Config, pairs: Sequence[PromptPair], adapters: Sequence[Path | None],
) -> tuple[list[str], dict[str, tuple[float, int]]]:
    """Greedy completions of `pairs`, row i served by adapter folder `adapters[i]` (None: the base model), and
    each site's summed completion loss and completion-token count."""
    completions: list[str] = [""] * len(pairs)
    losses: dict[str, tuple[float, int]] = {}
    ev = config.evaluation
    for folder in dict.fromkeys(adapters):
        indices = [i for i, a in enumerate(adapters) if a == folder]
        rows = [pairs[i] for i in indices]
        if folder is None:  # the base model: peft injects its layers in place, so they are switched off
            peft_model = peft_model_of(base)
            model = peft_model or base.model
            off = peft_model.disable_adapter() if peft_model is not None else contextlib.nullcontext()
        else:
            model, off = load_adapter(base, adapter_name_for(folder), folder), contextlib.nullcontext()
        with off:
            texts = generate_completions(model, base.tokenizer, [(p.context, p.prompt) for p in rows],
                                         ev.max_new_tokens, ev.batch_size)
            for site in dict.fromkeys(p.site_id for p in rows):
                total, tokens = losses.get(site, (0.0, 0))
                more, count = completion_loss_sum(model, base.tokenizer, [p for p in rows if p.site_id == site],
                                                  ev.batch_size, config.train.max_length)
                losses[site] = (total + more, tokens + count)
        for i, text in zip(indices, texts):
            completions[i] = text
    return completions, losses


def site_tallies(
    pairs: Sequence[PromptPair], completions: Sequence[str], losses: dict[str, tuple[float, int]],
    levels: dict[str, dict[str, str]], vocabulary: set[str],
) -> dict[str, dict[str, Any]]:
    """Per site: its region, the `metrics.tally` of its rows and its loss sums, all additive over sites.

    `levels` (`data.facts.fact_levels`) and `vocabulary` (every fact of the data: the others count as wrong
    facts) describe the whole data set, not only `pairs`.
    """
    scores: dict[str, tuple[str, list[RowScore]]] = {}
    for pair, text in zip(pairs, completions):
        score = score_row(text, pair.completion, pair.prompt, pair.facts, levels_of(pair, levels),
                          vocabulary - set(pair.facts))
        scores.setdefault(pair.site_id, (pair.region, []))[1].append(score)
    return {site: {"region": region, **tally(rows), "loss_sum": losses[site][0], "loss_tokens": losses[site][1]}
            for site, (region, rows) in sorted(scores.items())}


def result_from_tallies(tallies: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """A variant's metrics overall, per region and per site, with its worst site, from per-site tallies: the
    same whether the rows were scored in one place or each site scored its own (federated)."""
    def summary(group: list[dict[str, Any]]) -> dict[str, Any]:
        loss = sum(t["loss_sum"] for t in group) / max(sum(t["loss_tokens"] for t in group), 1)
        return {**summarize_tally(add_tallies(group)), "loss": loss, "perplexity": math.exp(min(loss, 50.0))}

    regions: dict[str, list[dict[str, Any]]] = {}
    for counts in tallies.values():
        regions.setdefault(counts["region"], []).append(counts)
    result = summary(list(tallies.values()))
    result["regions"] = {region: summary(group) for region, group in sorted(regions.items())}
    result["sites"] = {site: summary([counts]) for site, counts in sorted(tallies.items())}
    site_accuracies = [s["fact_accuracy"] for s in result["sites"].values() if not math.isnan(s["fact_accuracy"])]
    result["worst_site_fact_accuracy"] = min(site_accuracies) if site_accuracies else math.nan
    return result


def examples_of(pairs: Sequence[PromptPair], completions: Sequence[str]) -> list[dict[str, Any]]:
    """The report's examples: every evaluated row with the completion a variant generated."""
    return [{"site_id": p.site_id, "region": p.region, "prompt": p.prompt, "context": p.context,
             "reference": p.completion, "completion": text, "facts": list(p.facts)}
            for p, text in zip(pairs, completions)]


def score_variant(
    pairs: Sequence[PromptPair], completions: Sequence[str], losses: dict[str, tuple[float, int]],
    levels: dict[str, dict[str, str]], vocabulary: set[str],
) -> dict[str, Any]:
    """Every metric of one variant on `pairs`, overall, per region and per site, with its examples."""
    tallies = site_tallies(pairs, completions, losses, levels, vocabulary)
    return {**result_from_tallies(tallies), "examples": examples_of(pairs, completions)}


def evaluate_site(
    base: BaseModel, config: Config, rows: Sequence[PromptPair], adapters: dict[str, Path | None],
    levels: dict[str, dict[str, str]], vocabulary: set[str],
) -> dict[str, tuple[dict[str, Any], list[dict[str, Any]]]]:
    """A site's part of a federated report: per variant (served by `adapters[variant]`), the tally of its own
    test rows and its examples. Only the tallies need to leave the site; variants served by the same adapter
    share one generation."""
    done: dict[Path | None, tuple[list[str], dict[str, tuple[float, int]]]] = {}
    results = {}
    for variant, folder in adapters.items():
        if folder not in done:
            done[folder] = run_variant(base, config, rows, [folder] * len(rows))
        completions, losses = done[folder]
        (counts,) = site_tallies(rows, completions, losses, levels, vocabulary).values()
        results[variant] = (counts, examples_of(rows, completions))
    return results


def run_variants(config: Config) -> list[str]:
    """The variants a finished run folder can serve: base, its federated adapters, and personalized."""
    variants = ["base", federated_variant(config)]
    if config.federation.adapters != "local" and config.personalization.method != "none":
        variants.append("personalized")
    return variants


def evaluate_run(folder: Path, config: Config, pairs: Sequence[PromptPair], base: BaseModel,
                 variants: Sequence[str] | None = None,
                 facts: tuple[dict[str, dict[str, str]], set[str]] | None = None) -> dict[str, Any]:
    """report.json's content: per variant, every metric on held-out intents, and on held-out sites apart.

    `facts` (levels, vocabulary) describe the whole data when `pairs` is only part of it (a federated report
    scores the held-out sites here and the training sites where they are); by default they come from `pairs`.
    """
    rows = sample_test_rows(pairs, config.evaluation.max_examples_per_region)
    if not any(rows.values()):
        raise RunFolderError(f"{folder}: the data has no test pairs to evaluate")
    levels, vocabulary = facts or (fact_levels(pairs), fact_vocabulary(pairs))
    report: dict[str, Any] = {"variants": {}}
    for variant in variants or run_variants(config):
        result: dict[str, Any] = {}
        for group in GROUPS:
            if not rows[group]:
                continue
            adapters = [serving_adapter(folder, config, p.region, p.site_id, variant) for p in rows[group]]
            completions, losses = run_variant(base, config, rows[group], adapters)
            scored = score_variant(rows[group], completions, losses, levels, vocabulary)
            if group == GROUPS[0]:
                result.update(scored)
            else:
                result[group] = scored
        report["variants"][variant] = result
    return report
