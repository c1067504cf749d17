"""Batched decoding over one shared base, each row with its own LoRA adapter.

The run's adapters are stacked into `GroupedLoraLinear` layers (`fed_netgpt.grouped_lora`, the same module
multi-site training uses) that stay installed while the engine lives: slot 0 is a zero adapter (the base model
itself, for cloud-style chat and the `base` model name), slot k+1 the k-th adapter. A batch whose rows use
different adapters is one forward pass per token; peft's `adapter_names=` loops over adapters in Python instead.

The decode loop is our own, not `generate()`: it keeps a KV cache, computes logits for the last position only,
lets each row stop on its own end-of-turn token, samples per row (greedy by default) and calls a row's
`on_text` with each new piece of text, which is how streaming works.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from transformers import DynamicCache

from fed_netgpt.adapters import AdapterError, AdapterState, describe_mismatch
from fed_netgpt.config import LoraConfig
from fed_netgpt.grouped_lora import GroupedAdapters, grouped_adapters, lora_shapes
from fed_netgpt.models import BaseModel
from fed_netgpt.prompting import end_of_turn_id


@dataclass(frozen=True)
class Sampling:
    """temperature 0 is greedy decoding (deterministic); above 0, nucleus sampling with `top_p`."""

    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None


@dataclass
class DecodeRow:
    """One sequence to continue: its prompt token ids, the adapter slot it uses and how to sample."""

    prompt_ids: list[int]
    slot: int = 0
    max_new_tokens: int = 48
    sampling: Sampling = field(default_factory=Sampling)
    on_text: Callable[[str], None] | None = None  # streaming: called with each new piece of text
    ignore_stop: bool = False  # decode exactly max_new_tokens (benchmarks)


class Engine:
    """One frozen base with `len(states) + 1` adapter slots installed (slot 0: none); `load` replaces them."""

    def __init__(self, base: BaseModel, lora: LoraConfig | None = None, states: Sequence[AdapterState] = ()) -> None:
        self.base = base
        self.device = next(base.model.parameters()).device
        self.stop_id = end_of_turn_id(base.tokenizer)
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

    @torch.inference_mode()
    def generate(self, rows: Sequence[DecodeRow]) -> list[list[int]]:
        """The new token ids of every row (its end-of-turn token left out), all rows decoded together."""
        if not rows:
            return []
        for row in rows:
            if not 0 <= row.slot < self.slots:
                raise ValueError(f"adapter slot {row.slot} is not loaded (slots 0..{self.slots - 1})")
        if self.grouped is not None:
            self.grouped.select(torch.tensor([row.slot for row in rows], device=self.device))
        width = max(len(row.prompt_ids) for row in rows)
        pad = self.base.tokenizer.pad_token_id or 0
        ids = torch.tensor([[pad] * (width - len(r.prompt_ids)) + r.prompt_ids for r in rows], device=self.device)
        mask = torch.tensor([[0] * (width - len(r.prompt_ids)) + [1] * len(r.prompt_ids) for r in rows],
                            device=self.device)
        positions = (mask.cumsum(1) - 1).clamp(min=0)
        cache = DynamicCache(config=self.base.model.config)
        generators = [_generator(row.sampling, self.device) for row in rows]
        texts = [_TextStream(self.base.tokenizer, row.on_text) for row in rows]
        new: list[list[int]] = [[] for _ in rows]
        done = [row.max_new_tokens <= 0 for row in rows]
        budget = max(row.max_new_tokens for row in rows)
        for _ in range(budget):
            if all(done):
                break
            logits = self.base.model(input_ids=ids, attention_mask=mask, position_ids=positions,
                                      cache=cache, use_cache=True, logits_to_keep=1).logits[:, -1]
            if all(row.sampling.temperature <= 0 for row in rows):
                chosen = logits.argmax(-1).tolist()
            else:
                chosen = [_pick(logits[i], row.sampling, generators[i]) for i, row in enumerate(rows)]
            for i, token in enumerate(chosen):
                if done[i]:
                    continue
                if token == self.stop_id and not rows[i].ignore_stop:
                    done[i] = True
                    continue
                new[i].append(token)
                texts[i].push(new[i])
                done[i] = len(new[i]) >= rows[i].max_new_tokens
            ids = torch.tensor([[token] for token in chosen], device=self.device)
            mask = torch.cat([mask, torch.ones_like(ids)], dim=1)
            positions = positions[:, -1:] + 1
        return new


def _generator(sampling: Sampling, device: torch.device) -> torch.Generator | None:
    if sampling.temperature <= 0 or sampling.seed is None:
        return None
    generator = torch.Generator(device=device)
    generator.manual_seed(sampling.seed)
    return generator


def _pick(logits: torch.Tensor, sampling: Sampling, generator: torch.Generator | None) -> int:
    """Greedy (temperature 0) or nucleus sampling over one row's next-token logits."""
    if sampling.temperature <= 0:
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
