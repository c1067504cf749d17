"""DP-SGD in a grouped pass: each site's clipped, noised gradient as Opacus computes it when the site trains alone."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from peft import get_peft_model_state_dict

import fed_netgpt.training.privacy as privacy_module
from fed_netgpt.config import PrivacyConfig
from fed_netgpt.model.adapters import attach_adapter, get_state, set_state
from fed_netgpt.model.grouped_lora import grouped_adapters
from fed_netgpt.training.batches import collate
from fed_netgpt.training.engine import SiteJob, train_sites
from fed_netgpt.training.losses import row_loss_sums
from fed_netgpt.training.privacy import BudgetSpent, GroupedDPSGD, SiteAccountant, dp_seed
from fed_netgpt.training.reference import train_adapter_private


@pytest.fixture(scope="module")
def site_pairs(default_pairs):
    """Two sites of different data and sizes (5 and 3 pairs): the small one's run is padded with empty rows."""
    train = [p for p in default_pairs if p.split == "train"]
    return [[p for p in train if p.site_id == "paris"][:5], [p for p in train if p.site_id == "tokyo"][:3]]


def _random_state(like, seed):
    rng = np.random.default_rng(seed)
    return {k: rng.normal(0.0, 0.05, v.shape) for k, v in like.items()}


@pytest.mark.filterwarnings("ignore:Optimal order is the smallest alpha")  # epsilon at zero noise: infinite
@pytest.mark.parametrize("case", ["clipped", "unclipped", "fedprox", "ffa"])
def test_grouped_dp_sgd_equals_opacus_training_each_site_alone(base64, site_pairs, default_config, monkeypatch,
                                                               case):
    # Prepare: no noise (so the runs can be compared), q = 1 (every pair every step), 3 AdamW steps; a clipping
    # norm that clips every pair's gradient, or none
    monkeypatch.setattr(privacy_module, "noise_multiplier_for", lambda privacy, rate, steps: 0.0)
    lora = default_config.lora
    train = replace(default_config.train, batch_size=8, local_steps=3, bf16="false", learning_rate=1e-2,
                    proximal_mu=1.0 if case == "fedprox" else 0.0)
    privacy = PrivacyConfig(mode="sample_dp", max_grad_norm=1e6 if case == "unclipped" else 0.05)
    like = get_state(attach_adapter(base64, "shape", lora), "shape")
    starts = [_random_state(like, seed) for seed in (1, 2)]
    ffa = case == "ffa"

    # Execute: each site alone through Opacus, then both in one grouped pass
    model = attach_adapter(base64, f"alone-{case}", lora)
    alone = []
    for pairs, start in zip(site_pairs, starts):
        set_state(model, f"alone-{case}", start)
        train_adapter_private(model, f"alone-{case}", base64.tokenizer, pairs, train, SiteAccountant(privacy, 3, []),
                              freeze_lora_a=ffa)
        alone.append({k: v.detach().numpy().copy()
                      for k, v in get_peft_model_state_dict(model, adapter_name=f"alone-{case}").items()})
    accountants = [SiteAccountant(privacy, 3, []) for _ in site_pairs]
    together = train_sites(base64, [SiteJob(f"site{k}", pairs, start, accountant=accountant) for k, (pairs, start,
                                    accountant) in enumerate(zip(site_pairs, starts, accountants))],
                           lora, train, freeze_lora_a=ffa)

    # Assert: every site ends with the adapter Opacus gives it, which moved from its start
    for k, result in enumerate(together):
        for key in alone[k]:
            np.testing.assert_allclose(result.state[key], alone[k][key], rtol=0, atol=1e-9, err_msg=key)
        assert max(np.abs(alone[k][key] - starts[k][key]).max() for key in starts[k]) > 1e-3
        if ffa:
            assert all(np.array_equal(result.state[key], starts[k][key]) for key in starts[k] if ".lora_A." in key)
        assert result.metrics["dp_steps"] == 3.0 and result.metrics["sample_rate"] == 1.0
    assert [a.history for a in accountants] == [[(0.0, 1.0, 3)]] * 2


@pytest.mark.filterwarnings("ignore:Optimal order is the smallest alpha")  # epsilon at zero noise: infinite
@pytest.mark.parametrize("anchored", [False, True])
def test_a_site_trains_the_same_adapter_with_either_engine(base64, site_pairs, default_config, monkeypatch, anchored):
    # Prepare: no noise, q = 1, a proximal pull toward the start (FedProx) or toward another adapter given by
    # parameter name, as Ditto's personal update gives it
    monkeypatch.setattr(privacy_module, "noise_multiplier_for", lambda privacy, rate, steps: 0.0)
    lora, pairs = default_config.lora, site_pairs[0]
    train = replace(default_config.train, batch_size=8, local_steps=3, bf16="false", learning_rate=1e-2,
                    proximal_mu=3.0)
    like = get_state(attach_adapter(base64, "shape", lora), "shape")
    # float32 values (a float64 base): the engines' adapter states are float32, as on the wire
    start, pulled_to = ({k: v.astype(np.float32) for k, v in _random_state(like, seed).items()} for seed in (1, 2))
    ends, histories = {}, {}

    # Execute: one site's job (the per-site path of a federation) with each engine
    for engine in ("opacus", "grouped"):
        accountant = SiteAccountant(PrivacyConfig(mode="sample_dp", max_grad_norm=0.05, engine=engine), 3, [])
        job = SiteJob("paris", pairs, start, anchor=pulled_to if anchored else None, accountant=accountant)
        (result,) = train_sites(base64, [job], lora, train)
        ends[engine], histories[engine] = result.state, accountant.history

    # Assert: the same adapter, moved from its start, and the same accounting
    for key in start:
        np.testing.assert_allclose(ends["grouped"][key], ends["opacus"][key], rtol=0, atol=1e-7, err_msg=key)
    assert max(np.abs(ends["grouped"][key] - start[key]).max() for key in start) > 1e-3
    assert histories["grouped"] == histories["opacus"] == [(0.0, 1.0, 3)]


def test_clipping_the_batch_instead_of_each_pair_would_not_equal_opacus(base64, site_pairs, default_config):
    # Prepare: one site's per-row gradients at a clipping norm below every pair's gradient norm
    lora = default_config.lora
    start = _random_state(get_state(attach_adapter(base64, "shape", lora), "shape"), 1)
    batch = collate(base64.tokenizer, site_pairs[0], default_config.train.max_length)
    with grouped_adapters(base64.model, lora, 1) as group:
        group.load([start])
        group.select(torch.zeros(len(site_pairs[0]), dtype=torch.long))
        params = group.parameters()
        with group.per_row_gradients(params) as rows:
            sums, counts = row_loss_sums(base64.model, {k: v for k, v in batch.items() if k != "attention_mask"})
            (sums / counts).sum().backward()
            per_row = dict(rows.grads)
            norms = rows.row_norms()
            clipped = rows.clipped_sums(0.05, 1)

    # Assert: each row was scaled to norm 0.05 on its own (norms differ, so one batch-wide factor cannot do it)
    assert (norms > 0.05).all() and norms.max() / norms.min() > 1.2
    factor = 0.05 / (norms + 1e-6)
    for p, g in per_row.items():
        torch.testing.assert_close(clipped[p][0], torch.einsum("n,n...->...", factor, g))
        batch_wide = g.sum(0) * (0.05 * len(norms) / norms.sum())
        assert not torch.allclose(clipped[p][0], batch_wide)


def test_each_site_gets_noise_of_its_own_std_over_its_expected_batch():
    # Prepare: zero clipped sums for two sites, noise multipliers 1 and 3, expected batches 4 and 2
    private = GroupedDPSGD(0.5, plans=[(1.0, 0.5), (3.0, 1.0)], sizes=[8, 2])
    param = torch.nn.Parameter(torch.zeros(2, 200, 50))

    # Execute
    private.privatize({param: torch.zeros(2, 200, 50)})

    # Assert: site k's gradient is N(0, (sigma_k * C)^2) / expected_k, independently drawn
    assert private.expected == [4, 2]
    assert param.grad[0].std().item() == pytest.approx(1.0 * 0.5 / 4, rel=0.05)
    assert param.grad[1].std().item() == pytest.approx(3.0 * 0.5 / 2, rel=0.05)
    assert abs(param.grad[0].mean().item()) < 0.01
    assert not torch.equal(param.grad[0] * 4 / 0.5, param.grad[1] * 2 / 1.5)


def test_a_site_past_its_budget_is_refused_before_any_step(base64, site_pairs, default_config):
    # Prepare: a site past epsilon 1 already, and a fresh one
    lora = default_config.lora
    train = replace(default_config.train, batch_size=2, local_steps=5, bf16="false")
    privacy = PrivacyConfig(mode="sample_dp", noise_multiplier=0.8, target_epsilon=1.0)
    spent = SiteAccountant(privacy, 5, [(0.8, 0.4, 40)])
    fresh = SiteAccountant(privacy, 5, [])
    starts = [get_state(attach_adapter(base64, "shape", lora), "shape")] * 2

    # Execute / Assert: refused by name of the budget; nothing spent by either site
    with pytest.raises(BudgetSpent, match="privacy budget spent"):
        spent.plan(len(site_pairs[0]), train)
    with pytest.raises(BudgetSpent):
        train_sites(base64, [SiteJob("fresh", site_pairs[0], starts[0], accountant=fresh),
                             SiteJob("spent", site_pairs[1], starts[1], accountant=spent)], lora, train)
    assert fresh.history == [] and spent.history == [(0.8, 0.4, 40)]


@pytest.mark.filterwarnings("ignore:Optimal order is the largest alpha")
def test_under_privacy_reproducible_a_site_draws_the_same_batches_and_noise_however_it_is_packed(
        base64, site_pairs, default_config):
    # Prepare: real noise and Poisson draws (q = 2/5 and 2/3), seeded per site; each site's own start
    lora = default_config.lora
    train = replace(default_config.train, batch_size=2, local_steps=3, bf16="false", learning_rate=1e-2)
    privacy = PrivacyConfig(mode="sample_dp", noise_multiplier=1.0, max_grad_norm=0.05, reproducible=True)
    like = get_state(attach_adapter(base64, "shape", lora), "shape")
    starts = [_random_state(like, seed) for seed in (1, 2)]

    def jobs(names, accountants):
        return [SiteJob(name, pairs, start, seed=4, accountant=accountant)
                for name, pairs, start, accountant in zip(names, site_pairs, starts, accountants)]

    # Execute: both sites in one pass, then each alone, then the pack again under fresh randomness
    together = train_sites(base64, jobs(["paris", "tokyo"], [SiteAccountant(privacy, 3, []) for _ in starts]),
                           lora, train)
    alone = [train_sites(base64, [job], lora, train)[0]
             for job in jobs(["paris", "tokyo"], [SiteAccountant(privacy, 3, []) for _ in starts])]
    renamed = train_sites(base64, jobs(["lyon", "tokyo"], [SiteAccountant(privacy, 3, []) for _ in starts]),
                          lora, train)
    fresh = replace(privacy, reproducible=False)
    unseeded = [train_sites(base64, jobs(["paris", "tokyo"], [SiteAccountant(fresh, 3, []) for _ in starts]),
                            lora, train)[0] for _ in range(2)]

    # Assert: packed or alone, each site ends in the same place; another site's seed (a renamed site) and the
    # operating system's randomness do not
    for k in range(2):
        for key in starts[k]:
            np.testing.assert_allclose(together[k].state[key], alone[k].state[key], rtol=0, atol=1e-9, err_msg=key)
    assert max(np.abs(together[0].state[key] - starts[0][key]).max() for key in starts[0]) > 1e-3
    assert max(np.abs(renamed[0].state[key] - together[0].state[key]).max() for key in starts[0]) > 1e-3
    assert max(np.abs(renamed[1].state[key] - together[1].state[key]).max() for key in starts[1]) < 1e-9
    assert max(np.abs(unseeded[0].state[key] - unseeded[1].state[key]).max() for key in starts[0]) > 1e-3


def test_a_sites_dp_seed_names_the_seed_the_site_the_round_and_its_steps_so_far():
    # Prepare
    seeded = PrivacyConfig(mode="sample_dp", noise_multiplier=1.0, reproducible=True)

    # Execute
    base = dp_seed(seeded, 0, "paris", 1, [])
    others = [dp_seed(seeded, 1, "paris", 1, []), dp_seed(seeded, 0, "lyon", 1, []),
              dp_seed(seeded, 0, "paris", 2, []), dp_seed(seeded, 0, "paris", 1, [(1.0, 0.5, 6)])]

    # Assert: one seed for one (train.seed, site, round, steps taken), another as soon as one differs; none at all
    # (the operating system's randomness) unless asked for
    assert base == dp_seed(seeded, 0, "paris", 1, []) and 0 <= base < 2**63
    assert len({base, *others}) == 5
    assert dp_seed(replace(seeded, reproducible=False), 0, "paris", 1, []) is None
