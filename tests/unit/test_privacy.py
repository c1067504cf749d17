"""fed_netgpt/training/privacy.py: DP-SGD at a site. Accounting checked against Opacus's RDP analysis called directly,
Poisson sampling and the per-sequence loss against hand computations, and training on the tiny random model."""

from __future__ import annotations

import dataclasses
import math
import random

import numpy as np
import pytest
import torch
from opacus.accountants import RDPAccountant
from opacus.accountants import utils as opacus_utils
from opacus.accountants.analysis.rdp import compute_rdp, get_privacy_spent

import fed_netgpt.training.privacy as privacy_module
import fed_netgpt.training.reference as reference_module
from fed_netgpt.config import ConfigError, LoraConfig, PrivacyConfig, load_config
from fed_netgpt.data.schema import PromptPair
from fed_netgpt.evaluation.scoring import completion_loss
from fed_netgpt.model.adapters import attach_adapter, get_state, set_state
from fed_netgpt.training.engine import SiteJob, TrainResult, train_sites
from fed_netgpt.training.losses import sequence_losses
from fed_netgpt.training.privacy import (
    BudgetSpent,
    SiteAccountant,
    check_budget,
    epsilon_of,
    noise_multiplier_for,
    poisson_batch,
    privacy_report,
    sample_rate,
    with_steps,
)
from fed_netgpt.training.reference import REFERENCE_ADAPTER, train_adapter_private
from tests.states import assert_same_state, l2_distance

# Opacus's RDPAccountant.DEFAULT_ALPHAS, written out: the orders epsilon_of must use.
ORDERS = [1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64))
DELTA = 1e-5
# fp32 (exact, no precision benchmark), sample-level DP with a given noise multiplier.
DP = ["model.name=tiny-random", "train.bf16=false", "privacy.mode=sample_dp"]
PING = PromptPair(site_id="a", region="r", prompt="ping", completion="pong pong pong")




def _opacus_epsilon(history: list[tuple[float, float, int]], delta: float) -> float:
    """Epsilon straight from Opacus's analysis functions: RDP summed over the entries, then converted."""
    rdp = sum(compute_rdp(q=q, noise_multiplier=sigma, steps=steps, orders=ORDERS) for sigma, q, steps in history)
    epsilon, _ = get_privacy_spent(orders=ORDERS, rdp=rdp, delta=delta)
    return float(epsilon)


@pytest.fixture
def no_draws(monkeypatch) -> None:
    """Every Poisson draw comes out empty: each step is noise alone (and fast: no forward pass)."""
    monkeypatch.setattr(privacy_module, "poisson_batch", lambda num_pairs, rate, rng: [])
    monkeypatch.setattr(reference_module, "poisson_batch", lambda num_pairs, rate, rng: [])


# ---- accounting ------------------------------------------------------------------------------------


def test_default_orders_are_opacus_default_alphas():
    # Assert: the independent computation below uses the same orders as the accountant
    assert ORDERS == RDPAccountant.DEFAULT_ALPHAS


def test_epsilon_of_equals_opacus_analysis_called_directly():
    # Prepare
    history = [(1.0, 0.05, 100), (0.8, 0.1, 50)]

    # Execute
    epsilon = epsilon_of(history, DELTA)

    # Assert: both entries count (either alone gives less)
    assert epsilon == pytest.approx(_opacus_epsilon(history, DELTA), rel=1e-12)
    assert epsilon > max(_opacus_epsilon(history[:1], DELTA), _opacus_epsilon(history[1:], DELTA))


def test_epsilon_of_no_steps_is_zero():
    # Execute / Assert
    assert epsilon_of([], DELTA) == 0.0


def test_epsilon_of_a_known_value():
    # Execute: q=0.05, sigma=1, 200 steps (the RDP accountant's epsilon, also Opacus's tutorials' order)
    epsilon = epsilon_of([(1.0, 0.05, 200)], DELTA)

    # Assert
    assert epsilon == pytest.approx(5.37, abs=0.02)
    assert epsilon_of([(1.0, 0.05, 200)], 1e-3) < epsilon  # a larger delta buys a smaller epsilon


def test_epsilon_of_composes_and_reads_a_json_history():
    # Prepare: two halves of one run, as lists (a history read back from JSON)
    halves = [[1.0, 0.05, 100], [1.0, 0.05, 100]]

    # Execute / Assert: RDP adds up over entries, so two halves cost what the whole run costs
    assert epsilon_of(halves, DELTA) == pytest.approx(epsilon_of([(1.0, 0.05, 200)], DELTA), rel=1e-12)


def test_sample_rate_is_the_expected_batch_over_the_pairs_capped_at_one():
    # Execute / Assert
    assert sample_rate(8, 16) == 0.5
    assert sample_rate(1, 1000) == 0.001
    assert sample_rate(8, 4) == 1.0


def test_a_given_noise_multiplier_is_used_as_is():
    # Prepare
    privacy = PrivacyConfig(mode="sample_dp", noise_multiplier=1.3)

    # Execute / Assert: no search, whatever the rate and steps
    assert noise_multiplier_for(privacy, 0.125, 36) == 1.3
    assert noise_multiplier_for(privacy, 1.0, 100000) == 1.3


@pytest.mark.filterwarnings("ignore:Optimal order is the largest alpha")
@pytest.mark.parametrize("target", [8.0, 1.0])
def test_a_derived_noise_multiplier_spends_just_under_the_target(target):
    # Prepare
    privacy = PrivacyConfig(mode="sample_dp", target_epsilon=target, delta=DELTA)

    # Execute
    sigma = noise_multiplier_for(privacy, 0.125, 36)

    # Assert: within the target after the planned steps, and not wastefully more noise than needed
    spent = epsilon_of([(sigma, 0.125, 36)], DELTA)
    assert 0.97 * target <= spent <= target
    assert _opacus_epsilon([(sigma, 0.125, 36)], DELTA) == pytest.approx(spent, rel=1e-12)


@pytest.mark.filterwarnings("ignore:Optimal order is the largest alpha")
def test_a_smaller_target_needs_more_noise():
    # Execute
    sigmas = [noise_multiplier_for(PrivacyConfig(mode="sample_dp", target_epsilon=t), 0.125, 36) for t in (8, 1)]

    # Assert
    assert 0 < sigmas[0] < sigmas[1]


@pytest.mark.filterwarnings("ignore:Optimal order is the largest alpha")
def test_the_noise_search_runs_once_a_process_for_each_budget_rate_and_plan(monkeypatch):
    # Prepare: count Opacus's searches; a budget no other test asks for
    calls = []
    search = opacus_utils.get_noise_multiplier
    monkeypatch.setattr(opacus_utils, "get_noise_multiplier", lambda **kw: calls.append(kw) or search(**kw))
    privacy = PrivacyConfig(mode="sample_dp", target_epsilon=7.25, delta=DELTA)

    # Execute: every round of every site asks again
    first, again = noise_multiplier_for(privacy, 0.125, 36), noise_multiplier_for(privacy, 0.125, 36)
    other_rate = noise_multiplier_for(privacy, 0.25, 36)

    # Assert
    assert first == again and other_rate != first and len(calls) == 2


def test_each_history_is_accounted_once_a_process(monkeypatch):
    # Prepare: count the accountant's conversions; histories no other test asks for
    calls = []
    convert = RDPAccountant.get_epsilon
    monkeypatch.setattr(RDPAccountant, "get_epsilon", lambda self, delta: calls.append(delta) or convert(self, delta))
    history = [(1.37, 0.125, 11)]

    # Execute: the same history asked again (as JSON gives it back, lists), then a longer one
    first, again = epsilon_of(history, DELTA), epsilon_of([[1.37, 0.125, 11]], DELTA)
    longer_run = epsilon_of(with_steps(history, 1.37, 0.125, 1), DELTA)

    # Assert
    assert first == again == pytest.approx(_opacus_epsilon(history, DELTA), rel=1e-12)
    assert longer_run > first and len(calls) == 2


def test_with_steps_merges_a_run_of_the_same_noise_and_rate():
    # Prepare
    history = [(1.0, 0.1, 5)]

    # Execute
    merged = with_steps(history, 1.0, 0.1, 3)

    # Assert
    assert merged == [(1.0, 0.1, 8)]
    assert history == [(1.0, 0.1, 5)]  # the input is not changed


def test_with_steps_appends_a_new_noise_or_rate():
    # Execute / Assert
    assert with_steps([], 1.0, 0.1, 3) == [(1.0, 0.1, 3)]
    assert with_steps([(1.0, 0.1, 5)], 0.9, 0.1, 3) == [(1.0, 0.1, 5), (0.9, 0.1, 3)]
    assert with_steps([(1.0, 0.1, 5)], 1.0, 0.2, 3) == [(1.0, 0.1, 5), (1.0, 0.2, 3)]
    # only the last entry merges, as in Opacus
    assert with_steps([(1.0, 0.1, 5), (0.9, 0.1, 2)], 1.0, 0.1, 3) == [(1.0, 0.1, 5), (0.9, 0.1, 2), (1.0, 0.1, 3)]
    assert with_steps([[1.0, 0.1, 5]], 1.0, 0.1, 3) == [(1.0, 0.1, 8)]  # read back from JSON


def test_with_steps_matches_opacus_accountant_stepping():
    # Prepare: Opacus's accountant, one step at a time
    accountant = RDPAccountant()
    accountant.history = [(1.0, 0.1, 5)]
    history = [(1.0, 0.1, 5)]

    # Execute
    for noise, rate, steps in [(1.0, 0.1, 2), (0.5, 0.1, 3), (0.5, 0.2, 1), (0.5, 0.2, 4)]:
        for _ in range(steps):
            accountant.step(noise_multiplier=noise, sample_rate=rate)
        history = with_steps(history, noise, rate, steps)

    # Assert
    assert history == accountant.history == [(1.0, 0.1, 7), (0.5, 0.1, 3), (0.5, 0.2, 5)]


def test_check_budget_refuses_a_round_past_the_target_and_passes_one_up_to_it():
    # Prepare: the target is exactly epsilon after 200 steps; 100 are already spent
    target = epsilon_of([(1.0, 0.05, 200)], DELTA)
    privacy = PrivacyConfig(mode="sample_dp", target_epsilon=target, delta=DELTA)
    history = [(1.0, 0.05, 100)]

    # Execute / Assert
    check_budget(privacy, history, 1.0, 0.05, 100)  # lands on the target: allowed
    check_budget(privacy, history, 1.0, 0.05, 1)
    check_budget(privacy, [], 1.0, 0.05, 200)
    with pytest.raises(BudgetSpent, match=r"privacy\.target_epsilon"):
        check_budget(privacy, history, 1.0, 0.05, 101)
    with pytest.raises(BudgetSpent, match=r"privacy\.target_epsilon"):
        check_budget(privacy, history, 0.9, 0.05, 100)  # less noise costs more
    with pytest.raises(BudgetSpent, match=rf"epsilon is {epsilon_of(history, DELTA):.3f};"):  # already spent
        check_budget(privacy, history, 1.0, 0.05, 101)


def test_check_budget_never_refuses_without_a_target():
    # Prepare
    privacy = PrivacyConfig(mode="sample_dp", noise_multiplier=0.5)
    assert math.isinf(privacy.target_epsilon)

    # Execute / Assert: epsilon would be huge, yet no target means no refusal
    check_budget(privacy, [(0.5, 1.0, 10**6)], 0.5, 1.0, 10**6)


# ---- Poisson sampling ------------------------------------------------------------------------------


def test_poisson_batch_rate_zero_is_empty_rate_one_is_everyone():
    # Prepare
    rng = random.Random(0)

    # Execute / Assert
    assert poisson_batch(40, 0.0, rng) == []
    assert poisson_batch(40, 1.0, rng) == list(range(40))
    assert poisson_batch(0, 0.5, rng) == []


def test_poisson_batch_includes_each_pair_independently_with_the_rate():
    # Prepare
    rng = random.Random(7)
    draws, n, q = 2000, 40, 0.25

    # Execute
    batches = [poisson_batch(n, q, rng) for _ in range(draws)]

    # Assert: mean size q·n = 10; each index in about a quarter of the batches; sizes vary (not fixed-size)
    sizes = [len(b) for b in batches]
    assert sum(sizes) / draws == pytest.approx(10.0, rel=0.03)
    counts = np.bincount([i for b in batches for i in b], minlength=n)
    assert len(counts) == n
    assert all(0.2 <= c / draws <= 0.3 for c in counts), counts / draws
    assert len(set(sizes)) > 5 and 0 <= min(sizes) and max(sizes) <= n
    assert all(b == sorted(set(b)) for b in batches)  # indices, each at most once


def test_poisson_batch_same_seed_same_batches():
    # Execute
    first = [poisson_batch(40, 0.25, rng) for rng in [random.Random(3)] for _ in range(20)]
    second = [poisson_batch(40, 0.25, rng) for rng in [random.Random(3)] for _ in range(20)]
    other = [poisson_batch(40, 0.25, rng) for rng in [random.Random(4)] for _ in range(20)]

    # Assert
    assert first == second
    assert first != other


# ---- the loss per sequence -------------------------------------------------------------------------


def _row_loss(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """One row by hand: logits at t predict labels at t+1; mean over the row's own labelled positions."""
    terms = []
    for t in range(labels.shape[0] - 1):
        target = int(labels[t + 1])
        if target == -100:
            continue
        row = [float(x) for x in logits[t]]
        log_sum = math.log(sum(math.exp(x) for x in row))
        terms.append(log_sum - row[target])
    return sum(terms) / len(terms) if terms else 0.0


def test_sequence_losses_is_each_rows_own_mean_over_shifted_labels():
    # Prepare: batch 2, length 4, vocab 5; row 0 has 2 labelled targets, row 1 has 1
    logits = torch.randn(2, 4, 5, generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([[-100, -100, 3, 1], [-100, 4, -100, -100]])

    # Execute
    losses = sequence_losses(logits, labels)

    # Assert
    assert losses.shape == (2,)
    expected = [_row_loss(logits[0], labels[0]), _row_loss(logits[1], labels[1])]
    assert losses.tolist() == pytest.approx(expected, rel=1e-5)
    # not a token mean over the whole batch (which would weigh row 0 twice as much as row 1)
    assert float(losses.mean()) != pytest.approx((2 * expected[0] + expected[1]) / 3, rel=1e-3)


def test_sequence_losses_hand_values():
    # Prepare: uniform logits: every token costs log 5; a perfect prediction at the shifted position costs ~0
    labels = torch.tensor([[-100, 2, 3, -100], [-100, -100, -100, -100]])
    uniform = torch.zeros(2, 4, 5)
    sharp = torch.zeros(2, 4, 5)
    sharp[0, 0, 2] = sharp[0, 1, 3] = 50.0  # position t predicts the label at t+1
    unshifted = torch.zeros(2, 4, 5)
    unshifted[0, 1, 2] = unshifted[0, 2, 3] = 50.0  # the right tokens, one position late

    # Execute / Assert
    assert sequence_losses(uniform, labels).tolist() == pytest.approx([math.log(5), 0.0])  # no tokens: 0, not nan
    assert sequence_losses(sharp, labels)[0] == pytest.approx(0.0, abs=1e-6)
    assert sequence_losses(unshifted, labels)[0] > 20


def test_sequence_losses_rows_are_independent():
    # Prepare
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 4, 5, generator=gen)
    labels = torch.tensor([[-100, -100, 3, 1], [-100, 4, -100, -100]])
    other_logits, other_labels = logits.clone(), labels.clone()
    other_logits[1] = torch.randn(4, 5, generator=gen) * 10
    other_labels[1] = torch.tensor([-100, 0, 1, 2])  # row 1 now has 3 labelled tokens

    # Execute
    before = sequence_losses(logits, labels)
    after = sequence_losses(other_logits, other_labels)

    # Assert: the privacy unit is one sequence; one row's loss depends on nothing of another row
    assert float(after[0]) == float(before[0])
    assert float(after[1]) != pytest.approx(float(before[1]))


def test_sequence_losses_gradient_of_a_row_touches_only_its_logits():
    # Prepare
    logits = torch.randn(2, 4, 5, generator=torch.Generator().manual_seed(2), requires_grad=True)
    labels = torch.tensor([[-100, -100, 3, 1], [-100, 4, -100, -100]])

    # Execute
    sequence_losses(logits, labels)[0].backward()

    # Assert: row 1's logits get no gradient, and neither does row 0's last position (it predicts nothing)
    assert torch.count_nonzero(logits.grad[1]) == 0
    assert torch.count_nonzero(logits.grad[0, 3]) == 0
    assert torch.count_nonzero(logits.grad[0, 1]) > 0 and torch.count_nonzero(logits.grad[0, 2]) > 0


# ---- DP-SGD on the tiny model ----------------------------------------------------------------------


def _hooks(model: torch.nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks) for m in model.modules())


def _train(base, model, adapter_name, pairs, train, site: SiteAccountant, seed: int = 0) -> TrainResult:
    """One site's private training through the engine (its privacy.engine), from the peft adapter's weights; the
    result is set back on the adapter, as a federation's site holds it."""
    (result,) = train_sites(base, [SiteJob("a", pairs, get_state(model, adapter_name), seed=seed, accountant=site)],
                            site_lora(model, adapter_name), train)
    set_state(model, adapter_name, result.state)
    return result


def site_lora(model, adapter_name):
    peft = model.peft_config[adapter_name]
    return LoraConfig(r=peft.r, alpha=peft.lora_alpha, dropout=peft.lora_dropout,
                      target_modules=sorted(peft.target_modules))


@pytest.mark.parametrize("engine", ["grouped", "opacus"])
def test_private_training_learns_and_reports_what_it_spent(tiny_base, adapter_name, engine):
    # Prepare: a learnable task (one pair, repeated); a previous round at another noise and rate
    config = load_config(overrides=[*DP, "privacy.noise_multiplier=0.5", f"privacy.engine={engine}"])
    train = dataclasses.replace(config.train, local_steps=10, batch_size=8, learning_rate=3e-2)
    attach_adapter(tiny_base, REFERENCE_ADAPTER, config.lora)  # Opacus's engine trains in this one: there already
    model = attach_adapter(tiny_base, adapter_name, config.lora)
    pairs = [PING] * 16
    start = get_state(model, adapter_name)
    hooks, modules = _hooks(model), [type(m) for m in model.modules()]
    loss_before = completion_loss(model, tiny_base.tokenizer, pairs)
    history = [(1.0, 0.1, 5)]

    # Execute
    site = SiteAccountant(config.privacy, planned_steps=10, history=history)
    result = _train(tiny_base, model, adapter_name, pairs, train, site)
    new_history = site.history
    loss_after = completion_loss(model, tiny_base.tokenizer, pairs)

    # Assert: every LoRA tensor moved, B off its zero start (Opacus issue 820: LoRA weights not updating)
    assert any(".lora_A." in k for k in start) and any(".lora_B." in k for k in start)
    for key in start:
        assert not np.array_equal(result.state[key], start[key]), key
    assert all(np.any(v != 0) for k, v in result.state.items() if ".lora_B." in k)
    assert_same_state(result.state, get_state(model, adapter_name))
    # it learned from the data (measured over 8 runs: 10.953 -> 10.22..10.25; noise alone: -> 10.69..10.92)
    assert loss_after < loss_before - 0.5, (loss_before, loss_after)
    # accounting: the old entry kept, this round appended
    assert history == [(1.0, 0.1, 5)]
    assert new_history == [(1.0, 0.1, 5), (0.5, 0.5, 10)]
    metrics = result.metrics
    assert metrics["epsilon"] == pytest.approx(epsilon_of(new_history, DELTA), rel=1e-12)
    assert metrics["epsilon"] == pytest.approx(_opacus_epsilon(new_history, DELTA), rel=1e-9)
    assert metrics["delta"] == DELTA
    assert metrics["noise_multiplier"] == 0.5
    assert metrics["sample_rate"] == 0.5  # 8 of 16
    assert metrics["dp_steps"] == 15.0  # cumulative over the site's history: 5 before + 10 now
    assert metrics["steps"] == 10.0
    assert math.isfinite(metrics["train_loss"]) and metrics["train_loss_last"] < metrics["train_loss"] + 1
    assert result.num_examples == 16
    # neither engine leaves anything behind on the shared model (Opacus's hooks, the grouped layers)
    assert _hooks(model) == hooks and modules == [type(m) for m in model.modules()]
    assert not any(hasattr(p, "grad_sample") for p in model.parameters())
    assert not any(module.training for module in tiny_base.model.modules())  # the shared base left in eval mode


def test_the_round_merges_into_a_history_of_the_same_noise_and_rate(tiny_base, adapter_name, no_draws):
    # Prepare
    config = load_config(overrides=[*DP, "privacy.noise_multiplier=0.5"])
    train = dataclasses.replace(config.train, local_steps=2, batch_size=8)
    model = attach_adapter(tiny_base, adapter_name, config.lora)

    # Execute
    site = SiteAccountant(config.privacy, planned_steps=2, history=[[0.5, 0.5, 4]])
    result = train_adapter_private(model, adapter_name, tiny_base.tokenizer, [PING] * 16, train, site)
    history = site.history

    # Assert
    assert history == [(0.5, 0.5, 6)]
    assert result.metrics["dp_steps"] == 6.0
    assert result.metrics["epsilon"] == pytest.approx(_opacus_epsilon([(0.5, 0.5, 6)], DELTA), rel=1e-9)


def _three_steps_at_a_tiny_rate(tiny_base, adapter_name, engine):
    """3 DP steps at q = 1/1000 (batch 1 of 1000 pairs); returns the result, the history and the start state."""
    config = load_config(overrides=[*DP, "privacy.noise_multiplier=1.0", f"privacy.engine={engine}"])
    train = dataclasses.replace(config.train, local_steps=3, batch_size=1, learning_rate=1e-2)
    model = attach_adapter(tiny_base, adapter_name, config.lora)
    start = get_state(model, adapter_name)
    site = SiteAccountant(config.privacy, planned_steps=3, history=[])
    result = _train(tiny_base, model, adapter_name, [PING] * 1000, train, site)
    return result, site.history, start


@pytest.mark.parametrize("engine", ["grouped", "opacus"])
def test_empty_poisson_draws_still_step_and_count(tiny_base, adapter_name, no_draws, engine):
    # Prepare / Execute: q = 1/1000; every draw is empty (the fixture)
    result, history, start = _three_steps_at_a_tiny_rate(tiny_base, adapter_name, engine)

    # Assert: three noise-only steps taken, and each counted at the true sample rate
    assert result.metrics["dp_steps"] == 3.0
    assert result.metrics["sample_rate"] == 0.001
    assert history == [(1.0, 0.001, 3)]
    assert result.metrics["epsilon"] == pytest.approx(_opacus_epsilon([(1.0, 0.001, 3)], DELTA), rel=1e-9)
    assert math.isnan(result.metrics["train_loss"])  # no pair was ever drawn
    assert l2_distance(result.state, start) > 0
    for key in start:
        assert not np.array_equal(result.state[key], start[key]), key


@pytest.mark.parametrize("engine", ["grouped", "opacus"])
def test_the_real_draw_at_a_tiny_rate_counts_every_step(tiny_base, adapter_name, engine):
    # Prepare / Execute: q = 1/1000 without the fixture: most draws hold 0 or 1 pair
    result, history, start = _three_steps_at_a_tiny_rate(tiny_base, adapter_name, engine)

    # Assert
    assert result.metrics["dp_steps"] == 3.0
    assert history == [(1.0, 0.001, 3)]
    assert l2_distance(result.state, start) > 0


def test_the_noise_is_fresh_not_reproducible_from_a_seed(tiny_base, adapter_name, no_draws):
    # Prepare: the same start, config and global seeds twice
    config = load_config(overrides=[*DP, "privacy.noise_multiplier=1.0"])
    train = dataclasses.replace(config.train, local_steps=2, batch_size=4)
    model = attach_adapter(tiny_base, adapter_name, config.lora)
    start = get_state(model, adapter_name)
    states = []

    # Execute
    for _ in range(2):
        set_state(model, adapter_name, start)
        torch.manual_seed(0)
        random.seed(0)
        result = train_adapter_private(model, adapter_name, tiny_base.tokenizer, [PING] * 8, train,
                                       SiteAccountant(config.privacy, 2, []))
        states.append(result.state)

    # Assert: whoever knows the seeds cannot regenerate (and subtract) the noise
    assert l2_distance(states[0], start) > 0 and l2_distance(states[1], start) > 0
    assert l2_distance(states[0], states[1]) > 0


def test_freeze_lora_a_leaves_a_at_its_start_under_dp(tiny_base, adapter_name, no_draws):
    # Prepare
    config = load_config(overrides=[*DP, "privacy.noise_multiplier=1.0"])
    train = dataclasses.replace(config.train, local_steps=2, batch_size=4)
    model = attach_adapter(tiny_base, adapter_name, config.lora)
    start = get_state(model, adapter_name)

    # Execute
    result = train_adapter_private(model, adapter_name, tiny_base.tokenizer, [PING] * 8, train,
                                   SiteAccountant(config.privacy, 2, []), freeze_lora_a=True)

    # Assert
    for key in start:
        moved = not np.array_equal(result.state[key], start[key])
        assert moved == (".lora_B." in key), key


@pytest.mark.filterwarnings("ignore:Optimal order is the largest alpha")
def test_budget_across_rounds_then_refusal_changes_nothing(tiny_base, adapter_name):
    # Prepare: the noise derived for 3 rounds x 4 steps at q = 2/8 to end at epsilon 2
    config = load_config(overrides=[*DP, "privacy.target_epsilon=2", "privacy.noise_multiplier=0"])
    train = dataclasses.replace(config.train, local_steps=4, batch_size=2, learning_rate=1e-2)
    model = attach_adapter(tiny_base, adapter_name, config.lora)
    pairs = [PING] * 8
    site = SiteAccountant(config.privacy, planned_steps=12, history=[])
    epsilons, noises = [], []

    # Execute
    for _ in range(3):
        result = train_adapter_private(model, adapter_name, tiny_base.tokenizer, pairs, train, site)
        epsilons.append(result.metrics["epsilon"])
        noises.append(result.metrics["noise_multiplier"])
    before = get_state(model, adapter_name)
    kept = list(site.history)
    with pytest.raises(BudgetSpent, match=r"privacy\.target_epsilon=2"):
        train_adapter_private(model, adapter_name, tiny_base.tokenizer, pairs, train, site)
    history = site.history

    # Assert: one noise for the whole run, epsilon grows to just under the target
    sigma = noise_multiplier_for(config.privacy, 0.25, 12)
    assert noises == [sigma] * 3
    assert history == kept == [(sigma, 0.25, 12)]
    assert epsilons[0] < epsilons[1] < epsilons[2] <= 2.0
    assert epsilons[2] >= 0.97 * 2.0
    assert epsilons == pytest.approx([_opacus_epsilon([(sigma, 0.25, 4 * k)], DELTA) for k in (1, 2, 3)])
    assert_same_state(get_state(model, adapter_name), before)  # the refused round took no step


@pytest.mark.filterwarnings("ignore:Optimal order is the smallest alpha")
def test_a_proximal_term_survives_dp(tiny_base, adapter_name):
    # Prepare: same data and start; only mu differs; nearly no noise
    config = load_config(overrides=[*DP, "privacy.noise_multiplier=0.01"])
    pairs = [PING] * 8
    distances = {}

    # Execute
    for mu in (0.0, 10.0):
        name = f"{adapter_name}_mu{int(mu)}"
        model = attach_adapter(tiny_base, name, config.lora)
        start = get_state(model, name)
        train = dataclasses.replace(config.train, local_steps=5, batch_size=4, learning_rate=3e-2, proximal_mu=mu)
        result = train_adapter_private(model, name, tiny_base.tokenizer, pairs, train,
                                       SiteAccountant(config.privacy, 5, []))
        distances[mu] = l2_distance(result.state, start)

    # Assert (measured: 6.6 free, 1.7 pulled)
    assert 0 < distances[10.0] < 0.5 * distances[0.0], distances


def test_no_pairs_is_an_error(tiny_base, adapter_name):
    # Prepare
    config = load_config(overrides=[*DP, "privacy.noise_multiplier=1.0"])
    model = attach_adapter(tiny_base, adapter_name, config.lora)

    # Execute / Assert
    with pytest.raises(ValueError, match="at least one training pair"):
        train_adapter_private(model, adapter_name, tiny_base.tokenizer, [], config.train,
                              SiteAccountant(config.privacy, 1, []))


# ---- the site's accountant and the report ----------------------------------------------------------


def test_site_accountant_accumulates_every_training_of_the_site(tiny_base, adapter_name, no_draws):
    # Prepare
    config = load_config(overrides=[*DP, "privacy.noise_multiplier=1.0"])
    train = dataclasses.replace(config.train, local_steps=2, batch_size=4)
    model = attach_adapter(tiny_base, adapter_name, config.lora)
    given = [(2.0, 0.1, 3)]
    site = SiteAccountant(config.privacy, planned_steps=6, history=given)

    # Execute: two trainings of the site at q = 4/8 and one at q = 4/16
    _train(tiny_base, model, adapter_name, [PING] * 8, train, site, seed=0)
    _train(tiny_base, model, adapter_name, [PING] * 8, train, site, seed=1)
    result = _train(tiny_base, model, adapter_name, [PING] * 16, train, site, seed=2)

    # Assert
    expected = [(2.0, 0.1, 3), (1.0, 0.5, 4), (1.0, 0.25, 2)]
    assert site.history == expected
    assert given == [(2.0, 0.1, 3)]
    spent = site.spent()
    assert spent["epsilon"] == pytest.approx(_opacus_epsilon(expected, DELTA), rel=1e-9)
    assert spent["epsilon"] == pytest.approx(result.metrics["epsilon"], rel=1e-12)
    assert spent["delta"] == DELTA
    assert spent["dp_steps"] == 9.0


def test_privacy_report_takes_each_sites_last_epsilon_and_lists_spent_budgets():
    # Prepare
    privacy = PrivacyConfig(mode="sample_dp", target_epsilon=4.0, delta=DELTA)
    records = [
        {"site_id": "lyon", "epsilon": 1.0, "noise_multiplier": 1.1, "sample_rate": 0.5, "dp_steps": 4.0},
        {"site_id": "paris", "epsilon": 2.5, "noise_multiplier": 1.1, "sample_rate": 0.25, "dp_steps": 4.0},
        {"site_id": "lyon", "epsilon": 3.0, "noise_multiplier": 1.1, "sample_rate": 0.5, "dp_steps": 8.0},
        {"site_id": "nice", "error": "BudgetSpent: privacy budget spent: epsilon is 3.990; ..."},
        {"site_id": "lille", "train_loss": 1.0},
    ]

    # Execute
    report = privacy_report(privacy, records)

    # Assert
    assert report["sites"] == {
        "lyon": {"epsilon": 3.0, "noise_multiplier": 1.1, "sample_rate": 0.5, "dp_steps": 8.0},
        "paris": {"epsilon": 2.5, "noise_multiplier": 1.1, "sample_rate": 0.25, "dp_steps": 4.0},
    }
    assert report["epsilon_max"] == 3.0
    assert report["budget_spent"] == ["nice"]
    assert (report["mode"], report["delta"], report["target_epsilon"]) == ("sample_dp", DELTA, 4.0)
    assert math.isnan(privacy_report(privacy, [])["epsilon_max"])


# ---- config validation -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["privacy.mode=sample_dp"], r"exactly one of privacy\.noise_multiplier .* and privacy\.target_epsilon"),
        (["privacy.mode=sample_dp", "privacy.noise_multiplier=1.0", "privacy.target_epsilon=8"],
         r"exactly one of privacy\.noise_multiplier"),
        (["privacy.delta=0"], r"privacy\.delta must be within \(0, 1\)"),
        (["privacy.delta=1"], r"privacy\.delta must be within \(0, 1\)"),
        (["privacy.mode=sample_dp", "privacy.target_epsilon=0"], r"privacy\.target_epsilon must be > 0"),
        (["privacy.mode=sample_dp", "privacy.target_epsilon=-1"], r"privacy\.target_epsilon must be > 0"),
        (["privacy.mode=sample_dp", "privacy.noise_multiplier=-0.5"], r"privacy\.noise_multiplier must be >= 0"),
        (["privacy.mode=sample_dp", "privacy.noise_multiplier=1.0", "privacy.max_grad_norm=0"],
         r"privacy\.max_grad_norm must be > 0"),
        (["privacy.mode=user_dp"], r"privacy\.mode must be one of none, sample_dp"),
    ],
)
def test_invalid_privacy_settings_are_refused_naming_the_key(overrides, message):
    # Execute / Assert
    with pytest.raises(ConfigError, match=message):
        load_config(overrides=["model.name=tiny-random", *overrides])


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        ([], ("none", math.inf, 0.0, 1e-5, 1.0)),
        (["privacy.mode=sample_dp", "privacy.noise_multiplier=1.1"], ("sample_dp", math.inf, 1.1, 1e-5, 1.0)),
        (["privacy.mode=sample_dp", "privacy.target_epsilon=8", "privacy.delta=1e-6", "privacy.max_grad_norm=0.5"],
         ("sample_dp", 8.0, 0.0, 1e-6, 0.5)),
    ],
)
def test_valid_privacy_settings_load(overrides, expected):
    # Execute
    privacy = load_config(overrides=["model.name=tiny-random", *overrides]).privacy

    # Assert
    assert (privacy.mode, privacy.target_epsilon, privacy.noise_multiplier, privacy.delta,
            privacy.max_grad_norm) == expected


def test_a_target_no_noise_can_reach_is_refused_with_the_setting_named():
    # Prepare: epsilon 1e-4 with every pair in each of 10,000 steps
    unreachable = PrivacyConfig(mode="sample_dp", target_epsilon=1e-4)

    # Execute / Assert
    with pytest.raises(BudgetSpent, match=r"privacy\.target_epsilon=0\.0001 cannot be reached"):
        noise_multiplier_for(unreachable, 1.0, 10_000)
