"""strategies/aggregation.py, LoRA side: pairing factors, the exact mean of B·A, SVD re-factorisation, FFA-LoRA."""

from __future__ import annotations

import numpy as np
import pytest

from strategies.aggregation import (
    lora_modules,
    product_mean,
    shared_factor_mismatch,
    svd_average,
    weighted_average,
)

Q = "base_model.model.model.layers.0.self_attn.q_proj"
V = "base_model.model.model.layers.0.self_attn.v_proj"


def adapter(b: np.ndarray, a: np.ndarray, prefix: str = Q) -> dict[str, np.ndarray]:
    """One module's adapter in peft's key layout."""
    return {f"{prefix}.lora_A.weight": np.asarray(a), f"{prefix}.lora_B.weight": np.asarray(b)}


def random_sites(rng: np.random.Generator, shared_a: bool = False, dtype=np.float64) -> list[dict[str, np.ndarray]]:
    """Three sites, r=2, a 6x5 update (B [6, 2], A [2, 5])."""
    a0 = rng.normal(size=(2, 5))
    return [
        adapter(rng.normal(size=(6, 2)).astype(dtype), (a0 if shared_a else rng.normal(size=(2, 5))).astype(dtype))
        for _ in range(3)
    ]


def best_rank_approximation(m: np.ndarray, rank: int) -> tuple[np.ndarray, np.ndarray]:
    """Eckart-Young by numpy's dense SVD, independent of the code under test: (approximation, singular values)."""
    u, s, vt = np.linalg.svd(m, full_matrices=False)
    return (u[:, :rank] * s[:rank]) @ vt[:rank], s


def test_lora_modules_pairs_a_and_b_by_module_prefix():
    # Prepare
    state = {**adapter(np.zeros((4, 2)), np.zeros((2, 3))), **adapter(np.zeros((4, 2)), np.zeros((2, 3)), prefix=V)}

    # Execute
    modules = lora_modules(state)

    # Assert
    assert modules == {
        Q: (f"{Q}.lora_A.weight", f"{Q}.lora_B.weight"),
        V: (f"{V}.lora_A.weight", f"{V}.lora_B.weight"),
    }


@pytest.mark.parametrize(
    ("bad_key", "message"),
    [
        (f"{V}.lora_A.weight", "has no lora_B partner"),
        (f"{V}.lora_B.weight", "has no lora_A partner"),
        ("base_model.model.lm_head.weight", "is not a LoRA factor"),
    ],
)
def test_lora_modules_rejects_an_unpaired_or_non_lora_key_by_name(bad_key, message):
    # Prepare
    state = {**adapter(np.zeros((4, 2)), np.zeros((2, 3))), bad_key: np.zeros((2, 3))}

    # Execute / Assert
    with pytest.raises(ValueError, match=f"key '{bad_key}' {message}"):
        lora_modules(state)


def test_product_mean_matches_hand_computed_matrix():
    # Prepare: site 0 B A = [[1],[2]] [[3, 4]] = [[3, 4], [6, 8]]; site 1 B A = [[0],[1]] [[1, -1]] = [[0, 0], [1, -1]]
    states = [adapter([[1.0], [2.0]], [[3.0, 4.0]]), adapter([[0.0], [1.0]], [[1.0, -1.0]])]

    # Execute
    means = product_mean(states, [1, 3])

    # Assert: (1 * [[3, 4], [6, 8]] + 3 * [[0, 0], [1, -1]]) / 4 = [[3, 4], [9, 5]] / 4
    assert list(means) == [Q]
    np.testing.assert_array_equal(means[Q], [[0.75, 1.0], [2.25, 1.25]])
    assert means[Q].dtype == np.float64


def test_fedavg_is_exact_when_a_is_shared():
    # Prepare: FFA-LoRA, every site holds the same A and trained only B
    states = random_sites(np.random.default_rng(0), shared_a=True)
    weights = [1.0, 2.0, 5.0]

    # Execute
    averaged = weighted_average(states, weights)

    # Assert: mean_i(B_i) A == mean_i(B_i A)
    fedavg_update = averaged[f"{Q}.lora_B.weight"] @ averaged[f"{Q}.lora_A.weight"]
    np.testing.assert_allclose(fedavg_update, product_mean(states, weights)[Q], rtol=0, atol=1e-12)


def test_fedavg_is_not_the_mean_update_when_a_differs():
    # Prepare: B_0 A_0 = 0 (A_0 = 0) and B_1 A_1 = 0 (B_1 = 0), so the mean update is zero
    states = [adapter([[2.0], [2.0]], [[0.0, 0.0]]), adapter([[0.0], [0.0]], [[2.0, 2.0]])]

    # Execute
    averaged = weighted_average(states, [1, 1])
    target = product_mean(states, [1, 1])[Q]

    # Assert: FedAvg gives B = [[1], [1]], A = [[1, 1]], whose product is all ones: the cross terms B_0 A_1 / 4
    fedavg_update = averaged[f"{Q}.lora_B.weight"] @ averaged[f"{Q}.lora_A.weight"]
    np.testing.assert_array_equal(target, np.zeros((2, 2)))
    np.testing.assert_array_equal(fedavg_update, np.ones((2, 2)))


def test_shared_factor_mismatch_is_none_while_a_is_untouched():
    # Prepare: B trained everywhere, A as initialised
    initial = random_sites(np.random.default_rng(1), shared_a=True)[0]
    states = [{**initial, f"{Q}.lora_B.weight": initial[f"{Q}.lora_B.weight"] + i} for i in range(3)]

    # Execute / Assert
    assert shared_factor_mismatch(states, initial) is None


def test_shared_factor_mismatch_names_the_state_and_the_changed_tensor():
    # Prepare: site 2 let its A move by one float32 ulp (2**-23 at 1.0)
    initial = {
        **adapter(np.ones((4, 2), np.float32), np.ones((2, 3), np.float32)),
        **adapter(np.ones((4, 2), np.float32), np.ones((2, 3), np.float32), prefix=V),
    }
    moved = {**initial, f"{V}.lora_A.weight": initial[f"{V}.lora_A.weight"] + np.float32(2**-23)}
    states = [initial, dict(initial), moved]

    # Execute
    message = shared_factor_mismatch(states, initial)

    # Assert
    assert message == (
        f"state 2: tensor '{V}.lora_A.weight' differs from the shared initialisation (FFA-LoRA keeps A frozen)"
    )


def test_svd_average_is_the_best_rank_r_approximation_of_the_mean_update():
    # Prepare
    states = random_sites(np.random.default_rng(2))
    weights = [3.0, 1.0, 2.0]
    mean = product_mean(states, weights)[Q]
    expected, s = best_rank_approximation(mean, 2)

    # Execute
    factored, residuals = svd_average(states, weights, rank=2)

    # Assert: Eckart-Young, the residual is what the discarded singular values carry, and the split is balanced
    b, a = factored[f"{Q}.lora_B.weight"], factored[f"{Q}.lora_A.weight"]
    np.testing.assert_allclose(b @ a, expected, rtol=0, atol=1e-12)
    assert residuals == {Q: pytest.approx(np.sqrt(np.sum(s[2:] ** 2)) / np.linalg.norm(mean), rel=1e-12)}
    assert residuals[Q] > 0.1  # three independent rank-2 updates: truncation to rank 2 really discards something
    np.testing.assert_allclose(np.linalg.norm(mean - b @ a) / np.linalg.norm(mean), residuals[Q], rtol=1e-10)
    np.testing.assert_allclose(b.T @ b, np.diag(s[:2]), rtol=0, atol=1e-12)
    np.testing.assert_allclose(a @ a.T, np.diag(s[:2]), rtol=0, atol=1e-12)


def test_svd_average_keeps_keys_shapes_and_dtypes():
    # Prepare: two modules, float32 like a real adapter
    rng = np.random.default_rng(3)
    states = [
        {**s, **adapter(s[f"{Q}.lora_B.weight"][:4], s[f"{Q}.lora_A.weight"][:, :3], prefix=V)}
        for s in (random_sites(rng, dtype=np.float32))
    ]

    # Execute
    factored, residuals = svd_average(states, [1, 1, 1], rank=2)

    # Assert
    assert list(factored) == list(states[0])
    assert list(residuals) == [Q, V]
    for key, value in states[0].items():
        assert factored[key].shape == value.shape and factored[key].dtype == np.float32


def test_svd_average_is_exact_when_the_mean_has_rank_r():
    # Prepare: A shared, so the mean update is mean(B) A, of rank 2
    states = random_sites(np.random.default_rng(4), shared_a=True)
    weights = [1.0, 1.0, 4.0]
    mean = product_mean(states, weights)[Q]

    # Execute
    factored, residuals = svd_average(states, weights, rank=2)

    # Assert
    np.testing.assert_allclose(factored[f"{Q}.lora_B.weight"] @ factored[f"{Q}.lora_A.weight"], mean, atol=1e-12)
    assert residuals[Q] == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize(("shared_a", "rank"), [(False, 5), (True, 3), (True, 5)])
def test_svd_average_with_rank_at_least_the_true_rank_is_exact(shared_a, rank):
    # Prepare: independent A's give a full-rank (5) 6x5 mean; a shared A gives rank 2
    states = random_sites(np.random.default_rng(5), shared_a=shared_a)
    mean = product_mean(states, [1, 2, 3])[Q]

    # Execute
    factored, residuals = svd_average(states, [1, 2, 3], rank=rank)

    # Assert
    b, a = factored[f"{Q}.lora_B.weight"], factored[f"{Q}.lora_A.weight"]
    assert b.shape == (6, rank) and a.shape == (rank, 5)
    np.testing.assert_allclose(b @ a, mean, rtol=0, atol=1e-12)
    assert residuals[Q] == pytest.approx(0.0, abs=1e-12)


def test_svd_average_accepts_sites_of_different_ranks():
    # Prepare: ranks 1, 2 and 3 for the same 6x5 update
    rng = np.random.default_rng(6)
    states = [adapter(rng.normal(size=(6, r)), rng.normal(size=(r, 5))) for r in (1, 2, 3)]
    mean = product_mean(states, [1, 1, 1])[Q]

    # Execute
    factored, _ = svd_average(states, [1, 1, 1], rank=2)

    # Assert
    np.testing.assert_allclose(
        factored[f"{Q}.lora_B.weight"] @ factored[f"{Q}.lora_A.weight"],
        best_rank_approximation(mean, 2)[0],
        rtol=0,
        atol=1e-12,
    )


def test_svd_average_of_a_zero_mean_has_zero_residual():
    # Prepare: the round-0 adapter, B = 0 at every site
    states = [adapter(np.zeros((6, 2)), np.ones((2, 5)))] * 2

    # Execute
    factored, residuals = svd_average(states, [1, 1], rank=2)

    # Assert: zero in both factors, which is also why svd_average is no way to aggregate untrained adapters
    assert residuals == {Q: 0.0}
    assert not factored[f"{Q}.lora_A.weight"].any() and not factored[f"{Q}.lora_B.weight"].any()


@pytest.mark.parametrize("aggregate", [product_mean, lambda states, weights: svd_average(states, weights, rank=1)])
@pytest.mark.parametrize(
    ("weights", "message"), [([1, -1], "weights must be >= 0 with a positive sum"), ([1], "need one weight per state")]
)
def test_weights_are_checked_like_weighted_average(aggregate, weights, message):
    # Prepare
    states = [adapter(np.ones((2, 1)), np.ones((1, 2)))] * 2

    # Execute / Assert
    with pytest.raises(ValueError, match=message):
        aggregate(states, weights)


def test_mismatched_keys_shapes_and_rank_are_named():
    # Prepare
    state = adapter(np.ones((2, 1)), np.ones((1, 2)))
    other_module = adapter(np.ones((2, 1)), np.ones((1, 2)), prefix=V)
    wider = adapter(np.ones((2, 1)), np.ones((1, 3)))
    bad_b = adapter(np.ones((2, 2)), np.ones((1, 2)))

    # Execute / Assert
    with pytest.raises(ValueError, match="state 1 has keys"):
        product_mean([state, other_module], [1, 1])
    with pytest.raises(ValueError, match=rf"state 1: tensors '{Q}.lora_A.weight' / .* give a 2x3 update, expected 2x2"):
        product_mean([state, wider], [1, 1])
    with pytest.raises(
        ValueError, match=rf"state 0: tensor '{Q}.lora_B.weight' has shape \(2, 2\), expected \[out, 1\]"
    ):
        product_mean([bad_b], [1])
    with pytest.raises(ValueError, match=r"rank 3 for .* exceeds min\(out, in\) = 2"):
        svd_average([state], [1], rank=3)
    with pytest.raises(ValueError, match="rank must be >= 1"):
        svd_average([state], [1], rank=0)
