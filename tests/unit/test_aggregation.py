"""strategies/aggregation.py: FedAvg math, grouping, and the group-prefixed flat record."""

from __future__ import annotations

import numpy as np
import pytest

from strategies.aggregation import group_by, merge_groups, split_groups, weighted_average


def test_weighted_average_of_arrays_matches_hand_computed_mean():
    # Prepare
    states = [{"a": np.array([1.0, 2.0], dtype=np.float32)}, {"a": np.array([3.0, 6.0], dtype=np.float32)}]

    # Execute
    averaged = weighted_average(states, [1, 3])

    # Assert: (1*[1,2] + 3*[3,6]) / 4 = [10/4, 20/4]
    np.testing.assert_array_equal(averaged["a"], np.array([2.5, 5.0], dtype=np.float32))
    assert averaged["a"].dtype == np.float32


def test_weighted_average_of_float_scalars_returns_python_floats():
    # Prepare
    states = [{"loss": 2.0, "acc": 0.5}, {"loss": 4.0, "acc": 1.0}]

    # Execute
    averaged = weighted_average(states, [1.0, 3.0])

    # Assert: loss (2 + 12) / 4 = 3.5, acc (0.5 + 3) / 4 = 0.875
    assert averaged == {"loss": pytest.approx(3.5), "acc": pytest.approx(0.875)}
    assert all(type(v) is float for v in averaged.values())


def test_weighted_average_mixes_arrays_and_keeps_each_dtype():
    # Prepare
    states = [
        {"w": np.array([[1.0, 0.0]], dtype=np.float32), "b": np.array([1.0], dtype=np.float64)},
        {"w": np.array([[0.0, 1.0]], dtype=np.float32), "b": np.array([0.0], dtype=np.float64)},
    ]

    # Execute
    averaged = weighted_average(states, [1, 1])

    # Assert
    np.testing.assert_array_equal(averaged["w"], [[0.5, 0.5]])
    assert averaged["w"].dtype == np.float32 and averaged["w"].shape == (1, 2)
    np.testing.assert_array_equal(averaged["b"], [0.5])
    assert averaged["b"].dtype == np.float64


def test_weighted_average_does_not_modify_its_inputs():
    # Prepare
    first, second = np.array([1.0, 2.0], dtype=np.float32), np.array([3.0, 6.0], dtype=np.float32)

    # Execute
    weighted_average([{"a": first}, {"a": second}], [1, 3])

    # Assert
    np.testing.assert_array_equal(first, [1.0, 2.0])
    np.testing.assert_array_equal(second, [3.0, 6.0])


def test_weighted_average_single_state_is_identity():
    # Prepare
    state = {"a": np.array([0.1, -7.0], dtype=np.float32)}

    # Execute
    averaged = weighted_average([state], [5])

    # Assert
    np.testing.assert_array_equal(averaged["a"], state["a"])


def test_weighted_average_ignores_a_zero_weight_when_the_sum_is_positive():
    # Prepare
    states = [{"a": np.array([1.0])}, {"a": np.array([100.0])}]

    # Execute
    averaged = weighted_average(states, [2, 0])

    # Assert
    np.testing.assert_array_equal(averaged["a"], [1.0])


def test_weighted_average_rejects_mismatched_keys():
    # Prepare
    states = [{"a": np.zeros(2), "b": np.zeros(1)}, {"a": np.zeros(2), "c": np.zeros(1)}]

    # Execute / Assert: the message names the keys not shared
    with pytest.raises(ValueError, match=r"state 1 has keys \['b', 'c'\]"):
        weighted_average(states, [1, 1])


@pytest.mark.parametrize("weights", [[0, 0], [1, -1], [-2, -3], [0.0, -0.0]])
def test_weighted_average_rejects_zero_sum_or_negative_weights(weights):
    # Prepare
    states = [{"a": np.ones(2)}, {"a": np.ones(2)}]

    # Execute / Assert
    with pytest.raises(ValueError, match="weights must be >= 0 with a positive sum"):
        weighted_average(states, weights)


@pytest.mark.parametrize(("num_states", "num_weights"), [(2, 1), (1, 2), (0, 0)])
def test_weighted_average_rejects_length_mismatch_or_nothing(num_states, num_weights):
    # Prepare
    states = [{"a": np.ones(1)}] * num_states

    # Execute / Assert
    with pytest.raises(ValueError, match="need one weight per state"):
        weighted_average(states, [1.0] * num_weights)


def test_group_by_keeps_first_appearance_order_and_item_order():
    # Prepare
    items = ["m1", "m2", "m3", "m4", "m5"]
    keys = ["jp", "fr", "jp", "br", "fr"]

    # Execute
    groups = group_by(items, keys)

    # Assert
    assert list(groups) == ["jp", "fr", "br"]
    assert groups == {"jp": ["m1", "m3"], "fr": ["m2", "m5"], "br": ["m4"]}


def test_group_by_empty_and_length_mismatch():
    # Execute / Assert
    assert group_by([], []) == {}
    with pytest.raises(ValueError, match="need one key per item"):
        group_by([1, 2], ["a"])


def test_merge_groups_prefixes_every_key_with_its_group():
    # Prepare
    groups = {"france": {"w": 1, "b": 2}, "japan": {"w": 3}}

    # Execute
    merged = merge_groups(groups)

    # Assert
    assert merged == {"france/w": 1, "france/b": 2, "japan/w": 3}


def test_split_groups_inverts_merge_groups_with_slashes_in_keys():
    # Prepare: peft keys contain dots; a key may even contain the separator after the group
    groups = {
        "france": {"base_model.model.q_proj.lora_A.weight": np.arange(4.0), "x/y": np.ones(1)},
        "south-america": {"base_model.model.q_proj.lora_A.weight": np.zeros(4)},
    }

    # Execute
    restored = split_groups(merge_groups(groups))

    # Assert
    assert restored.keys() == groups.keys()
    for group, state in groups.items():
        assert restored[group].keys() == state.keys()
        for key, value in state.items():
            np.testing.assert_array_equal(restored[group][key], value)


@pytest.mark.parametrize("bad_key", ["no_group_prefix", "france/"])
def test_split_groups_rejects_a_key_without_group_prefix(bad_key):
    # Prepare
    merged = {"france/w": 1, bad_key: 2}

    # Execute / Assert
    with pytest.raises(ValueError, match=f"key '{bad_key}' has no group prefix"):
        split_groups(merged)
