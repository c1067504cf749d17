"""fed_netgpt/evaluation/leakage.py: the canaries, the AUC, and an attack that does find a memorising adapter."""

from __future__ import annotations

from dataclasses import replace

import pytest

from fed_netgpt.config import load_config
from fed_netgpt.evaluation.leakage import canaries, chance_auc_std, membership_auc, roc_auc, split_members
from fed_netgpt.model.adapters import attach_adapter
from fed_netgpt.training.reference import train_adapter


@pytest.mark.parametrize(
    ("members", "nonmembers", "auc"),
    [
        ([3.0, 4.0], [1.0, 2.0], 1.0),  # every member above every non-member
        ([1.0, 2.0], [3.0, 4.0], 0.0),
        ([1.0, 1.0], [1.0, 1.0], 0.5),  # ties count half
        ([3.0, 1.0], [2.0, 0.0], 0.75),  # 3>2, 3>0, 1<2, 1>0
        ([2.0], [1.0, 2.0, 3.0], 0.5),  # win, tie, loss
    ],
)
def test_roc_auc_by_hand(members, nonmembers, auc):
    assert roc_auc(members, nonmembers) == pytest.approx(auc)
    assert roc_auc(nonmembers, members) == pytest.approx(1 - auc)


def test_roc_auc_needs_both_groups():
    with pytest.raises(ValueError, match="at least one member and one non-member"):
        roc_auc([], [1.0])


def test_chance_auc_std_matches_a_simulation_of_no_leakage():
    # Prepare: members and non-members scored from one distribution
    import random

    rng = random.Random(0)
    aucs = [roc_auc([rng.random() for _ in range(16)], [rng.random() for _ in range(16)]) for _ in range(2000)]
    mean = sum(aucs) / len(aucs)
    std = (sum((a - mean) ** 2 for a in aucs) / (len(aucs) - 1)) ** 0.5

    # Assert
    assert mean == pytest.approx(0.5, abs=0.01)
    assert std == pytest.approx(chance_auc_std(16, 16), rel=0.1)


def test_canaries_hide_their_secret_in_the_completion_and_repeat_by_seed():
    # Execute
    pairs = canaries("paris", "france", 64, seed=3)

    # Assert: distinct places and codes; the code never in the prompt; the same seed, the same canaries
    assert len({p.prompt for p in pairs}) == 64
    codes = [p.completion.rsplit(" is ", 1)[1] for p in pairs]
    assert len(set(codes)) > 60
    assert all(code.rstrip(".") not in p.prompt for code, p in zip(codes, pairs))
    assert all(p.site_id == "paris" and p.region == "france" and p.split == "train" for p in pairs)
    assert canaries("paris", "france", 64, seed=3) == pairs != canaries("paris", "france", 64, seed=4)
    with pytest.raises(ValueError, match="at most 256 canaries"):
        canaries("paris", "france", 257, seed=0)


def test_split_members_halves_without_overlap():
    pairs = canaries("paris", "france", 10, seed=0)
    members, nonmembers = split_members(pairs, seed=1)
    assert len(members) == len(nonmembers) == 5
    assert sorted(map(str, members + nonmembers)) == sorted(map(str, pairs))


def test_the_attack_finds_an_adapter_that_memorised_its_members(tiny_base):
    # Prepare: an adapter trained hard on the members only
    config = load_config(overrides=["model.name=tiny-random"])
    members, nonmembers = split_members(canaries("paris", "france", 16, seed=0), seed=0)
    model = attach_adapter(tiny_base, "memorised", config.lora, seed=0)
    untrained = membership_auc(model, tiny_base.tokenizer, members, nonmembers)

    # Execute
    train_adapter(model, "memorised", tiny_base.tokenizer, members,
                  replace(config.train, learning_rate=0.02, local_steps=60, batch_size=8))
    attack = membership_auc(model, tiny_base.tokenizer, members, nonmembers)
    model.delete_adapter("memorised")

    # Assert: before training nothing tells members apart (the canaries are alike; an adapter that changed
    # nothing lowers no loss, so the calibrated attack is at exactly 0.5); after, nearly all are, by both attacks
    assert abs(untrained["auc"] - 0.5) < 3 * chance_auc_std(8, 8)
    assert untrained["calibrated_auc"] == 0.5
    assert attack["auc"] >= 0.9 and attack["calibrated_auc"] >= 0.9
    assert attack["member_loss"] < attack["nonmember_loss"]

