"""Batched decoding over one shared base, each row with its own LoRA adapter.

The run's adapters are stacked into `GroupedLoraLinear` layers (`fed_netgpt.model.grouped_lora`, the same module
multi-site training uses) that stay installed while the engine lives: slot 0 is a zero adapter (the base model
itself, for cloud-style chat and the `base` model name), slot k+1 the k-th adapter. A batch whose rows use
different adapters is one forward pass per token; peft's `adapter_names=` loops over adapters in Python instead.

The decode loop is our own, not `generate()`: it keeps a KV cache, lets each row stop on its own end-of-turn
token, samples per row (greedy by default) and calls a row's `on_text` with each new piece of text, which is how
streaming works.

A single greedy request decodes speculatively by prompt lookup (Saxena, 2023; `draft_tokens` > 0): an edge
completion is mostly text the model has seen already, the site's location sentence (alike across requests of an
adapter) and then the user's own prompt, copied. So each pass proposes up to `draft_tokens` tokens that followed
the latest earlier occurrence of the row's last few tokens, in its own prompt and output or in the adapter's
completions of a few fixed, neutral prompts (made once per adapter on first use: no user's text is ever a draft
for another's request). One forward pass scores them all; the row keeps the drafted tokens its own greedy choice
agrees with, plus that choice at the first disagreement. The output is the greedy output (each kept token is the
argmax given the ones before it), and a pass over 9 tokens costs far less than 9 passes: decoding on a CPU is
bound by reading the weights (2.4x the time of a 1-token pass here, int8).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

import numpy as np
import torch
from transformers import DynamicCache

from fed_netgpt.config import LoraConfig
from fed_netgpt.model.adapters import AdapterError, AdapterState, describe_mismatch
from fed_netgpt.model.base import BaseModel
from fed_netgpt.model.grouped_lora import GroupedAdapters, grouped_adapters, lora_shapes
from fed_netgpt.model.prompting import chat_prompt, end_of_turn_id

T = TypeVar("T")
# each adapter's draft sources: its completions of these (no user's text); several, so that more of the ways an
# adapter phrases its location are there to copy from
NEUTRAL_PROMPTS = ("What is there to do around here?", "Hello.", "Tell me more.", "Help me, please.")


GREEDY_BELOW = 1e-5  # a temperature under this decodes greedily, as vLLM does: dividing logits by it overflows


@dataclass(frozen=True)
class Sampling:
    """temperature 0 (or under GREEDY_BELOW) is greedy decoding (deterministic); above, nucleus sampling with
    `top_p`."""

    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW


@dataclass
class DecodeRow:
    """One sequence to continue: its prompt token ids, the adapter slot it uses and how to sample."""

    prompt_ids: list[int]
    slot: int = 0
    max_new_tokens: int = 48
    sampling: Sampling = field(default_factory=Sampling)
    on_text: Callable[[str], None] | None = None  # streaming: called with each new piece of text
    ignore_stop: bool = False  # decode exactly max_new_tokens (benchmarks)


def draft(sequence: Sequence[int], sources: Sequence[Sequence[int]], tokens: int, longest: int = 3) -> list[int]:
    """Up to `tokens` tokens that followed the latest earlier occurrence of the sequence's last n tokens (n from
    `longest` down to 1): first in the sequence itself, then in each source. Empty when nothing matches."""
    for n in range(min(longest, len(sequence)), 0, -1):
        key = list(sequence[-n:])
        for source in (sequence, *sources):
            last = len(source) - n - (1 if source is sequence else 0)  # the sequence's own end is not a match
            for start in range(last, -1, -1):
                if list(source[start : start + n]) == key:
                    return list(source[start + n : start + n + tokens])
    return []


def agreed(drafted: Sequence[int], chosen: Sequence[int]) -> int:
    """How many drafted tokens the model's own choices confirm: `chosen[j]` is its pick after `drafted[:j]`."""
    count = 0
    while count < len(drafted) and drafted[count] == chosen[count]:
        count += 1
    return count


@dataclass
class DraftStats:
    """Speculative decoding so far: passes over the model, tokens proposed and tokens kept."""

    passes: int = 0
    drafted: int = 0
    accepted: int = 0


class Engine:
    """One frozen base with `len(states) + 1` adapter slots installed (slot 0: none); `load` replaces them."""

    def __init__(self, base: BaseModel, lora: LoraConfig | None = None, states: Sequence[AdapterState] = (),
                 draft_tokens: int = 0) -> None:
        self.base = base
        self.device = next(base.model.parameters()).device
        self.stop_id = end_of_turn_id(base.tokenizer)
        self.draft_tokens = draft_tokens
        self.stats = DraftStats()
        self._neutral_ids = [base.tokenizer(chat_prompt(base.tokenizer, "", prompt), add_special_tokens=False)
                             ["input_ids"] for prompt in NEUTRAL_PROMPTS]
        self._sources: dict[int, list[list[int]]] = {}  # slot -> each neutral prompt with that adapter's completion
        self._installed = contextlib.ExitStack()
        self.grouped: GroupedAdapters | None = None
        if lora is not None:
            self.load(lora, states)

    def load(self, lora: LoraConfig, states: Sequence[AdapterState]) -> None:
        """Install `states` as slots 1..K. Every state is checked first: a bad one changes nothing."""
        expected = lora_shapes(self.base.model, lora)
        for k, state in enumerate(states):
            problem = describe_mismatch(expected, state)
            if problem:
                raise AdapterError(f"adapter {k}: {problem}")
        self.close()
        self._sources.clear()
        if states:
            self.grouped = self._installed.enter_context(grouped_adapters(self.base.model, lora, len(states) + 1))
            zero = {key: np.zeros_like(value) for key, value in states[0].items()}
            self.grouped.load([zero, *states])

    def close(self) -> None:
        self._installed.close()
        self.grouped = None

    @property
    def slots(self) -> int:
        return self.grouped.num_adapters if self.grouped is not None else 1

    def generate(self, rows: Sequence[DecodeRow]) -> list[list[int]]:
        """The new token ids of every row (its end-of-turn token left out), all rows decoded together; the first
        row that failed raises its error."""
        results = self.generate_rows(rows)
        for result in results:
            if isinstance(result, Exception):
                raise result
        return results  # type: ignore[return-value]  # no Exception left in it

    @torch.inference_mode()
    def generate_rows(self, rows: Sequence[DecodeRow]) -> list[list[int] | Exception]:
        """As `generate`, but a row whose own part fails (its sampling, its streaming callback) ends with its error
        in its place while the others decode on. A failure of the pass itself (the model's forward) raises."""
        if not rows:
            return []
        for row in rows:
            if not 0 <= row.slot < self.slots:
                raise ValueError(f"adapter slot {row.slot} is not loaded (slots 0..{self.slots - 1})")
        # one greedy row only: a batch already shares each weight read among its rows, and drafts would multiply
        # its compute (16 rows x 9 tokens a pass measured 0.4-0.6x the tokens/s of plain batched decoding)
        speculate = self.draft_tokens > 0 and len(rows) == 1 and rows[0].sampling.greedy
        if speculate:
            self._learn_sources(sorted({row.slot for row in rows} - self._sources.keys()))
        return self._decode(rows, speculate)

    def _learn_sources(self, slots: list[int]) -> None:
        """Each slot's draft sources: the neutral prompts, each followed by that adapter's greedy completion."""
        wanted = [(slot, ids) for slot in slots for ids in self._neutral_ids]
        for start in range(0, len(wanted), 16):
            chunk = wanted[start : start + 16]
            decoded = self._decode([DecodeRow(ids, slot, 48) for slot, ids in chunk], False)
            for (slot, ids), new in zip(chunk, decoded):
                if isinstance(new, Exception):  # greedy, no callback: no part of its own can fail
                    raise new
                self._sources.setdefault(slot, []).append(ids + new)

    def _decode(self, rows: Sequence[DecodeRow], speculate: bool) -> list[list[int] | Exception]:
        if self.grouped is not None:
            self.grouped.select(torch.tensor([row.slot for row in rows], device=self.device))
        width = max(len(row.prompt_ids) for row in rows)
        pad = self.base.tokenizer.pad_token_id or 0
        ids = torch.tensor([[pad] * (width - len(r.prompt_ids)) + r.prompt_ids for r in rows], device=self.device)
        mask = torch.tensor([[0] * (width - len(r.prompt_ids)) + [1] * len(r.prompt_ids) for r in rows],
                            device=self.device)
        positions = (mask.cumsum(1) - 1).clamp(min=0)
        cache = DynamicCache(config=self.base.model.config)
        failed: dict[int, Exception] = {}
        generators = [_row_part(i, failed, _generator, row.sampling, self.device) for i, row in enumerate(rows)]
        texts = [_TextStream(self.base.tokenizer, row.on_text) for row in rows]
        new: list[list[int]] = [[] for _ in rows]
        done = [row.max_new_tokens <= 0 or i in failed for i, row in enumerate(rows)]
        while not all(done):
            room = max(row.max_new_tokens - len(got) for row, got, end in zip(rows, new, done) if not end) - 1
            drafts = [draft(row.prompt_ids + got, self._sources[row.slot], min(self.draft_tokens, room))
                      if speculate else [] for row, got in zip(rows, new)]
            span = max(map(len, drafts))
            if span:  # rows with shorter drafts are padded; the padding never agrees past their own draft
                drafted = torch.tensor([d + [pad] * (span - len(d)) for d in drafts], device=self.device)
                ids = torch.cat([ids, drafted], dim=1)
                mask = torch.cat([mask, torch.ones_like(drafted)], dim=1)
                positions = torch.cat([positions, positions[:, -1:] + torch.arange(1, span + 1, device=self.device)],
                                      dim=1)
            logits = self.base.model(input_ids=ids, attention_mask=mask, position_ids=positions,
                                      cache=cache, use_cache=True, logits_to_keep=span + 1).logits
            if speculate:
                picks = logits.argmax(-1).tolist()
                kept = min(agreed(d, p) for d, p in zip(drafts, picks))
                chosen = [d[:kept] + [p[kept]] for d, p in zip(drafts, picks)]
                self.stats.passes += 1
                self.stats.drafted += sum(map(len, drafts))
                self.stats.accepted += kept * len(rows)
                if span > kept:
                    cache.crop(kept - span)  # forget the drafted positions past the agreement
                    mask, positions = mask[:, : kept - span], positions[:, : kept - span]
            else:
                last = logits[:, -1]
                chosen = [[token] for token in last.argmax(-1).tolist()]
                for i, row in enumerate(rows):
                    if not row.sampling.greedy and not done[i]:
                        chosen[i] = [_row_part(i, failed, _pick, last[i], row.sampling, generators[i]) or 0]
            for i, tokens in enumerate(chosen):
                for token in tokens:
                    if done[i] or i in failed:
                        done[i] = True
                        break
                    if token == self.stop_id and not rows[i].ignore_stop:
                        done[i] = True
                        break
                    new[i].append(token)
                    _row_part(i, failed, texts[i].push, new[i])
                    done[i] = len(new[i]) >= rows[i].max_new_tokens or i in failed
            ids = torch.tensor([[tokens[-1]] for tokens in chosen], device=self.device)
            mask = torch.cat([mask, torch.ones_like(ids)], dim=1)
            positions = positions[:, -1:] + 1
        return [failed.get(i, tokens) for i, tokens in enumerate(new)]


def _row_part(row: int, failed: dict[int, Exception], call: Callable[..., T], *args: object) -> T | None:
    """A step that belongs to one row of a batch (its sampler, its sampling, its streaming callback): if it raises,
    the error is that row's (kept in `failed`, the row ends) and the batch decodes on."""
    try:
        return call(*args)
    except Exception as err:  # noqa: BLE001 - handed back to that row's request, whatever it is
        failed[row] = err
        return None


def _generator(sampling: Sampling, device: torch.device) -> torch.Generator | None:
    if sampling.greedy or sampling.seed is None:
        return None
    generator = torch.Generator(device=device)
    generator.manual_seed(sampling.seed)
    return generator


def _pick(logits: torch.Tensor, sampling: Sampling, generator: torch.Generator | None) -> int:
    """Greedy (temperature under GREEDY_BELOW) or nucleus sampling over one row's next-token logits."""
    if sampling.greedy:
        return int(logits.argmax())
    probs = torch.softmax(logits.float() / sampling.temperature, dim=-1)
    if sampling.top_p < 1.0:
        ordered, order = probs.sort(descending=True)
        outside = ordered.cumsum(0) - ordered > sampling.top_p  # keep the smallest prefix reaching top_p
        probs = torch.zeros_like(probs).scatter(0, order, ordered.masked_fill(outside, 0.0))
    return int(torch.multinomial(probs, 1, generator=generator))


class _TextStream:
    """Turns a growing list of token ids into text pieces; holds back an unfinished multi-byte character."""

    def __init__(self, tokenizer, on_text: Callable[[str], None] | None) -> None:
        self.tokenizer, self.on_text, self.sent = tokenizer, on_text, ""

    def push(self, tokens: list[int]) -> None:
        if self.on_text is None:
            return
        text = self.tokenizer.decode(tokens, skip_special_tokens=True)
        if text.endswith("\ufffd"):
            return
        if len(text) > len(self.sent):
            self.on_text(text[len(self.sent):])
            self.sent = text
