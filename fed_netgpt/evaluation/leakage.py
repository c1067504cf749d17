"""Membership inference against a site's adapter: can someone holding the adapter tell which prompt pairs it was
trained on?

Canaries are prompt pairs from one distribution: the door code of a made-up place at the site, the code random
and only in the completion. Half of them go into the site's training data (members), half never do
(non-members), so nothing but training tells them apart. The attack is the loss threshold (Yeom et al., 2018):
a lower loss of the adapter on a canary's completion says "member". Its ROC AUC over all canaries is the
leakage: 0.5 the adapter reveals nothing about membership, 1.0 every member is told apart. An adapter that
memorises approaches 1; DP-SGD (privacy.mode=sample_dp) bounds what one pair can change, which pulls it back.

Random codes are not equally hard: which canaries land among the members moves the plain attack's AUC by
±0.05 at 64 + 64 canaries, whatever the training. The calibrated attack (Watson et al., 2022) thresholds how
much the adapter lowered a canary's loss below the base model's instead, which takes each canary's own
difficulty out. Measured on SmolLM2 it is steadier across splits under DP-SGD, but weaker on an adapter that
memorised (README), so both are reported.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence

import torch
from peft import PeftModel
from transformers import PreTrainedTokenizerBase

from fed_netgpt.data.schema import PromptPair
from fed_netgpt.evaluation.scoring import batch_token_losses

PLACES = ("garage", "gym", "studio", "storage unit", "office", "workshop", "cellar", "clinic", "library annex",
          "bike room", "rooftop", "boathouse", "greenhouse", "archive", "print shop", "bakery")
QUALIFIERS = ("north", "south", "east", "west", "old", "new", "upper", "lower", "blue", "red", "green", "grey",
              "small", "big", "inner", "outer")
LETTERS = "ABCDEFGHJKLMNPQRSTUVWXYZ"


def canaries(site_id: str, region: str, count: int, seed: int) -> list[PromptPair]:
    """`count` canary pairs of a site, each a different place with its own random code (in the completion only)."""
    rng = random.Random(seed)
    places = [f"{q} {p}" for q in QUALIFIERS for p in PLACES]
    if count > len(places):
        raise ValueError(f"at most {len(places)} canaries, asked for {count}")
    pairs = []
    for place in rng.sample(places, count):
        code = f"{rng.randrange(10_000):04d} {rng.choice(LETTERS)}{rng.choice(LETTERS)}"
        pairs.append(PromptPair(site_id=site_id, region=region, prompt=f"What is the door code of the {place}?",
                                completion=f"The door code of the {place} is {code}.", split="train",
                                intent="canary"))
    return pairs


def split_members(pairs: Sequence[PromptPair], seed: int) -> tuple[list[PromptPair], list[PromptPair]]:
    """A random half to train on (members) and the rest (non-members)."""
    order = list(pairs)
    random.Random(seed).shuffle(order)
    half = len(order) // 2
    return order[:half], order[half:]


def pair_losses(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, pairs: Sequence[PromptPair],
                batch_size: int = 16, max_length: int = 128) -> list[float]:
    """Each pair's mean cross-entropy over its own completion tokens (what the attacker thresholds)."""
    model.eval()
    losses: list[float] = []
    for tokens, counted in batch_token_losses(model, tokenizer, pairs, batch_size, max_length):
        losses += ((tokens * counted).sum(dim=1) / counted.sum(dim=1).clamp(min=1)).tolist()
    return losses


def roc_auc(member_scores: Sequence[float], nonmember_scores: Sequence[float]) -> float:
    """The chance that a random member scores above a random non-member, ties counted half (Mann-Whitney U):
    the area under the ROC curve of thresholding the score."""
    if not member_scores or not nonmember_scores:
        raise ValueError("roc_auc needs at least one member and one non-member score")
    wins = sum((m > n) + 0.5 * (m == n) for m in member_scores for n in nonmember_scores)
    return wins / (len(member_scores) * len(nonmember_scores))


def chance_auc_std(members: int, nonmembers: int) -> float:
    """The spread of the AUC when nothing leaks (members and non-members scored alike): how far from 0.5 a
    measured AUC must be to mean anything at these counts."""
    return math.sqrt((members + nonmembers + 1) / (12 * members * nonmembers))


def membership_auc(model: PeftModel, tokenizer: PreTrainedTokenizerBase, members: Sequence[PromptPair],
                   nonmembers: Sequence[PromptPair], max_length: int = 128) -> dict[str, float]:
    """The loss-threshold attack on `model`'s active adapter: its AUC (`auc`), the calibrated attack's
    (`calibrated_auc`: the drop from the base model's loss, the adapter disabled), and the mean loss of members
    and non-members."""
    losses = [pair_losses(model, tokenizer, pairs, max_length=max_length) for pairs in (members, nonmembers)]
    with model.disable_adapter():
        base = [pair_losses(model, tokenizer, pairs, max_length=max_length) for pairs in (members, nonmembers)]
    drops = [[b - x for x, b in zip(group, reference)] for group, reference in zip(losses, base)]
    return {"auc": roc_auc([-x for x in losses[0]], [-x for x in losses[1]]), "calibrated_auc": roc_auc(*drops),
            "member_loss": sum(losses[0]) / len(losses[0]), "nonmember_loss": sum(losses[1]) / len(losses[1])}
