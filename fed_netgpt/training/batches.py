"""From prompt pairs to training batches: tokenized once, padded on the right, loss on completion tokens only."""

from __future__ import annotations

import functools
import random
from collections.abc import Iterator, Sequence
from typing import TypeVar

import numpy as np
import torch
from transformers import PreTrainedTokenizerBase

from fed_netgpt.data.schema import PromptPair
from fed_netgpt.model.prompting import encode_pair

Row = TypeVar("Row")
# A pair's token ids and labels: `encode_pair`'s lists, or `encoded_pair`'s cached int32 arrays.
Encoded = tuple[Sequence[int] | np.ndarray, Sequence[int] | np.ndarray]


def collate(
    tokenizer: PreTrainedTokenizerBase, pairs: Sequence[PromptPair], max_length: int
) -> dict[str, torch.Tensor]:
    """Right-padded input ids, attention mask and labels (-100 on prompt and padding)."""
    return pad_batch(encode_pairs(tokenizer, pairs, max_length), int(tokenizer.pad_token_id))


def encode_pairs(tokenizer: PreTrainedTokenizerBase, pairs: Sequence[PromptPair], max_length: int) -> list[Encoded]:
    """Each pair's token ids and labels (`encode_pair`)."""
    return [encoded_pair(tokenizer, p, max_length) for p in pairs]


@functools.lru_cache(maxsize=1 << 15)
def encoded_pair(tokenizer: PreTrainedTokenizerBase, pair: PromptPair, max_length: int) -> Encoded:
    """`encode_pair`, kept for the next rounds: a site trains and is evaluated on the same pairs every round, and
    tokenizing them again took a sixth of a 128-site grouped call on the GPU machine. Kept as int32 arrays
    (32k pairs of ~100 tokens: ~30 MB). A process-wide cache by design: it holds only what the tokenizer would
    give again, keyed on the tokenizer itself."""
    ids, labels = (np.asarray(part, dtype=np.int32) for part in encode_pair(tokenizer, pair.context, pair.prompt,
                                                                           pair.completion, max_length))
    for array in (ids, labels):
        array.flags.writeable = False  # shared by every later use
    return ids, labels


def pad_batch(encoded: Sequence[Encoded], pad: int) -> dict[str, torch.Tensor]:
    """`collate` of pairs already encoded (`encode_pair`'s ids and labels), padded on the right."""
    width = max(len(ids) for ids, _ in encoded)
    input_ids = np.full((len(encoded), width), pad, dtype=np.int64)
    labels = np.full((len(encoded), width), -100, dtype=np.int64)
    attention_mask = np.zeros((len(encoded), width), dtype=np.int64)
    for row, (ids, labs) in enumerate(encoded):
        input_ids[row, : len(ids)], labels[row, : len(labs)], attention_mask[row, : len(ids)] = ids, labs, 1
    return {"input_ids": torch.from_numpy(input_ids), "attention_mask": torch.from_numpy(attention_mask),
            "labels": torch.from_numpy(labels)}


def batches(pairs: Sequence[Row], batch_size: int, seed: int) -> Iterator[list[Row]]:
    """Endless shuffled batches of pairs (or of their encodings): each epoch visits every one once."""
    rng = random.Random(seed)
    order = list(range(len(pairs)))
    while True:
        rng.shuffle(order)
        for start in range(0, len(order), batch_size):
            yield [pairs[i] for i in order[start : start + batch_size]]


def on_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {key: value.to(device) for key, value in batch.items()}


class SiteRows(Sequence[Encoded]):
    """A site's pairs, each tokenized on first use (`encoded_pair`), so that in the first round a step's new rows
    are encoded while the GPU still runs the step before (128 sites' pairs take ~0.3 s to encode on a 2-core CPU)."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, pairs: Sequence[PromptPair], max_length: int) -> None:
        self.tokenizer, self.pairs, self.max_length = tokenizer, pairs, max_length

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, i: int) -> Encoded:  # type: ignore[override]  # ints only; Sequence also takes slices
        return encoded_pair(self.tokenizer, self.pairs[i], self.max_length)


def grouped_batch(chosen: Sequence[Sequence[Encoded]], pad: int,
                  device: torch.device) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """One grouped step's batch (on `device`, copied without waiting) and each row's site (on the host).

    Rows come site after site, every site's run filled up to the longest with empty rows (one pad token, no
    counted label): the grouped layers then take their reshaping path, and an empty row adds exactly nothing to
    any loss or gradient. Padding is on the right and no attention mask is passed: the causal mask alone keeps
    every real token from seeing the padding after it, and attention runs as plain causal attention (flash).
    """
    per = max(1, *(len(rows) for rows in chosen))  # a Poisson draw may take no row of any site
    empty = ([pad], [-100])
    rows = [row for site_rows in chosen for row in [*site_rows, *[empty] * (per - len(site_rows))]]
    batch = pad_batch(rows, pad)
    del batch["attention_mask"]
    index = torch.arange(len(chosen)).repeat_interleave(per)
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}, index
