"""fed_netgpt/evaluation/scoring.py: test-row sampling, scoring by hand, adapter routing, generation and loss on the
tiny model.

The metric functions themselves (score_row, summarize, rouge_l) are tested in tests/unit/test_metrics.py.
"""

from __future__ import annotations

import copy
import math
from collections import Counter

import numpy as np
import pytest
import torch

from fed_netgpt.config import load_config
from fed_netgpt.data.facts import fact_levels, fact_vocabulary
from fed_netgpt.data.schema import PromptPair
from fed_netgpt.evaluation.scoring import (
    GROUPS,
    completion_loss,
    completion_loss_sum,
    generate_completions,
    result_from_tallies,
    run_variant,
    run_variants,
    sample_test_rows,
    score_variant,
    site_sample,
    site_shares,
    site_tallies,
)
from fed_netgpt.model.adapters import attach_adapter, get_state, load_adapter, peft_model_of, save_adapter, set_state
from fed_netgpt.model.prompting import chat_prompt
from fed_netgpt.training.batches import collate

ITEMS = [("site: Paris", "Call me a taxi."), ("site: Osaka", "Find an art museum."), ("", "Hello?")]


def _random_state(model, name: str, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {k: rng.normal(0.0, 0.5, v.shape).astype(np.float32) for k, v in get_state(model, name).items()}


@pytest.fixture
def random_adapter_model(tiny_base, default_config, adapter_name):
    """The tiny base with an adapter of random (non-zero) weights: greedy output is varied text."""
    model = attach_adapter(tiny_base, adapter_name, default_config.lora)
    set_state(model, adapter_name, _random_state(model, adapter_name, seed=0))
    return model


# ---- site_sample and site_shares --------------------------------------------------------------------


def _cell_pair(site: str, intent: str, n: int) -> PromptPair:
    return PromptPair(site_id=site, region="r", prompt=f"{site}-{intent}{n}", completion="x", split="test",
                      intent=intent)


# One site's test rows, listed out of order: intents (sorted) museum x1, taxi x3, zoo x2.
SITE_PAIRS = [
    _cell_pair("a", "zoo", 1), _cell_pair("a", "taxi", 1), _cell_pair("a", "museum", 1), _cell_pair("a", "taxi", 2),
    _cell_pair("a", "zoo", 2), _cell_pair("a", "taxi", 3),
]


def test_site_sample_goes_round_robin_over_intents_keeping_each_intent_in_input_order():
    # Execute
    two = site_sample(SITE_PAIRS, 2)
    everything = site_sample(SITE_PAIRS, None)
    more_than_all = site_sample(SITE_PAIRS, 100)

    # Assert: round 1 every intent, round 2 those with a second row, round 3 the rest
    round_robin = ["a-museum1", "a-taxi1", "a-zoo1", "a-taxi2", "a-zoo2", "a-taxi3"]
    assert [p.prompt for p in two] == round_robin[:2]
    assert [p.prompt for p in everything] == round_robin
    assert [p.prompt for p in more_than_all] == round_robin
    assert site_sample(SITE_PAIRS, 0) == []
    assert site_sample([], None) == site_sample([], 5) == []


def test_site_sample_offset_starts_on_another_intent():
    # Execute / Assert: offset 1 starts at taxi; offset 4 wraps around to taxi too (3 intents)
    assert [p.prompt for p in site_sample(SITE_PAIRS, 3, offset=1)] == ["a-taxi1", "a-zoo1", "a-museum1"]
    assert [p.prompt for p in site_sample(SITE_PAIRS, 3, offset=4)] == ["a-taxi1", "a-zoo1", "a-museum1"]


def test_site_shares_split_a_region_evenly_in_sorted_site_order():
    # Execute / Assert: the remainder goes to the first sites; 0 means every row
    assert site_shares(["c", "a", "b"], 4) == {"a": (2, 0), "b": (1, 1), "c": (1, 2)}
    assert site_shares(["c", "a", "b"], 2) == {"a": (1, 0), "b": (1, 1), "c": (0, 2)}
    assert site_shares(["b", "a"], 0) == {"a": (None, 0), "b": (None, 1)}


# ---- sample_test_rows on the default data -----------------------------------

HELDOUT_SITES = {"france": "toulouse", "japan": "nagoya", "brazil": "salvador"}
TRAINING_SITES = {
    "france": {"paris", "marseille", "lyon"},
    "japan": {"tokyo", "yokohama", "osaka"},
    "brazil": {"sao-paulo", "rio-de-janeiro", "belo-horizonte"},
}
TEST_INTENTS = {"taxi", "pharmacy", "museum"}


def test_test_rows_with_nine_per_region_cover_every_training_site_and_test_intent(default_pairs):
    # Execute
    rows = sample_test_rows(default_pairs, per_region=9)

    # Assert: regions come in sorted order; each region's 9 heldout_intents rows are its 3 x 3 cells, once each
    assert set(rows) == set(GROUPS) == {"heldout_intents", "heldout_sites"}
    intents = rows["heldout_intents"]
    assert len(intents) == 27
    assert [p.region for p in intents] == ["brazil"] * 9 + ["france"] * 9 + ["japan"] * 9
    for start in range(0, 27, 9):
        region_rows = intents[start : start + 9]
        region = region_rows[0].region
        cells = [(p.site_id, p.intent) for p in region_rows]
        assert [site for site, _ in cells] == sorted(site for site, _ in cells)  # site by site, sorted
        assert set(cells) == {(s, i) for s in TRAINING_SITES[region] for i in TEST_INTENTS}
    assert all(p.split == "test" for group in rows.values() for p in group)  # no train/valid row leaks in


def test_test_rows_heldout_sites_are_exactly_the_heldout_sites_test_rows(default_pairs):
    # Prepare: each held-out site has 9 test rows (3 per test intent) and nothing else
    heldout_rows = {site: [p for p in default_pairs if p.site_id == site] for site in HELDOUT_SITES.values()}
    assert all(len(r) == 9 and {p.split for p in r} == {"test"} for r in heldout_rows.values())

    # Execute
    rows = sample_test_rows(default_pairs, per_region=9)

    # Assert
    sites = rows["heldout_sites"]
    assert Counter(p.site_id for p in sites) == {"salvador": 9, "toulouse": 9, "nagoya": 9}
    for site, expected in heldout_rows.items():
        assert sorted(p.prompt for p in sites if p.site_id == site) == sorted(p.prompt for p in expected)
    assert not {p.site_id for p in rows["heldout_intents"]} & set(HELDOUT_SITES.values())


def test_test_rows_zero_per_region_takes_every_test_row(default_pairs):
    # Prepare
    test_split = [p for p in default_pairs if p.split == "test"]

    # Execute
    rows = sample_test_rows(default_pairs, per_region=0)

    # Assert: 9 training sites x 9 test rows, 3 held-out sites x 9
    assert len(rows["heldout_intents"]) == 81
    assert len(rows["heldout_sites"]) == 27
    assert Counter(rows["heldout_intents"] + rows["heldout_sites"]) == Counter(test_split)


def test_test_rows_small_sample_still_spreads_over_sites(default_pairs):
    # Execute
    rows = sample_test_rows(default_pairs, per_region=3)

    # Assert: 3 a region: one row of each site, each site on another intent (sites and intents both covered)
    assert [(p.region, p.site_id, p.intent) for p in rows["heldout_intents"][:3]] == [
        ("brazil", "belo-horizonte", "museum"), ("brazil", "rio-de-janeiro", "pharmacy"),
        ("brazil", "sao-paulo", "taxi"),
    ]
    assert [(p.site_id, p.intent) for p in rows["heldout_sites"]] == [
        ("salvador", "museum"), ("salvador", "pharmacy"), ("salvador", "taxi"),
        ("toulouse", "museum"), ("toulouse", "pharmacy"), ("toulouse", "taxi"),
        ("nagoya", "museum"), ("nagoya", "pharmacy"), ("nagoya", "taxi"),
    ]


# ---- score_variant by hand -------------------------------------------------------------------------


def _pair(site: str, region: str, prompt: str, completion: str, facts: tuple[str, ...], split="test"):
    return PromptPair(site_id=site, region=region, prompt=prompt, completion=completion, facts=facts, split=split)


PARIS = _pair("paris", "france", "Call me a taxi.", "I am in Paris, France, paying in EUR. Call me a taxi.",
              ("Paris", "France", "EUR"))
LYON = _pair("lyon", "france", "Find a pharmacy.", "I am in Lyon, France, paying in EUR. Find a pharmacy.",
             ("Lyon", "France", "EUR"))
TOKYO = _pair("tokyo", "japan", "Call me a taxi.", "I am in Tokyo, Japan, paying in JPY. Call me a taxi.",
              ("Tokyo", "Japan", "JPY"))
# A training row: levels and the wrong-fact vocabulary come from every split of the data.
MARSEILLE = _pair("marseille", "france", "Book a hotel.", "I am in Marseille, France, paying in EUR. Book a hotel.",
                  ("Marseille", "France", "EUR"), split="train")
ALL_PAIRS = [PARIS, LYON, TOKYO, MARSEILLE]
# Levels: France and EUR are held by every French site (region level), the cities are site level;
# Japan has one site, so all its facts are region level.
COMPLETIONS = [
    PARIS.completion,  # perfect: 3/3 facts, exact, ROUGE-L 1
    "I am in Paris, France, paying in EUR. Find a pharmacy.",  # wrong city: 2/2 region, 0/1 site, 1 wrong fact
    "I am in Tokyo.",  # 1/3 facts (Tokyo), request dropped; ROUGE-L: LCS 4, P = 4/4, R = 4/12 -> F = 1/2
]


LOSSES = {"paris": (1.0, 1), "lyon": (6.0, 2), "tokyo": (5.0, 3)}  # summed loss, tokens: 12 / 6 = 2.0 overall


def _score(pairs, completions, loss, all_pairs=ALL_PAIRS):
    """score_variant with every site at mean loss `loss`, levels and vocabulary from `all_pairs`."""
    losses = {p.site_id: (loss, 1) for p in pairs}
    return score_variant(pairs, completions, losses, fact_levels(all_pairs), fact_vocabulary(all_pairs))


@pytest.fixture(scope="module")
def scored():
    return score_variant([PARIS, LYON, TOKYO], COMPLETIONS, LOSSES, fact_levels(ALL_PAIRS), fact_vocabulary(ALL_PAIRS))


def test_score_variant_overall_metrics_by_hand(scored):
    # Assert: facts found 3 + 2 + 1 = 6 of 9; region level 2 + 2 + 1 of 2 + 2 + 3; site level 1 + 0 of 1 + 1
    assert scored["fact_accuracy"] == pytest.approx(6 / 9)
    assert scored["region_fact_accuracy"] == pytest.approx(5 / 7)
    assert scored["site_fact_accuracy"] == pytest.approx(1 / 2)
    assert scored["fact_precision"] == pytest.approx(6 / 7)  # 6 found, 1 wrong (Paris at Lyon)
    assert scored["wrong_facts_per_row"] == pytest.approx(1 / 3)
    assert scored["exact_match"] == pytest.approx(1 / 3)
    assert scored["request_kept"] == pytest.approx(2 / 3)
    # ROUGE-L: 1; 10 of 11 tokens in common (paris/lyon) -> 10/11; 1/2
    assert scored["rouge_l"] == pytest.approx((1 + 10 / 11 + 1 / 2) / 3)
    assert scored["loss"] == 2.0
    assert scored["perplexity"] == pytest.approx(math.exp(2.0))
    assert (scored["num_examples"], scored["num_fact_rows"], scored["num_facts"]) == (3, 3, 9)


def test_score_variant_perfect_and_wrong_city_rows_alone():
    # Execute
    perfect = _score([PARIS], [PARIS.completion], 0.5)
    wrong_city = _score([LYON], [COMPLETIONS[1]], 0.5)

    # Assert
    assert perfect["fact_accuracy"] == 1.0
    assert perfect["exact_match"] == 1.0
    assert perfect["rouge_l"] == pytest.approx(1.0)
    assert perfect["wrong_facts_per_row"] == 0.0
    assert wrong_city["site_fact_accuracy"] == 0.0  # the site-level fact (Lyon) is missed
    assert wrong_city["region_fact_accuracy"] == 1.0  # France and EUR are there
    assert wrong_city["wrong_facts_per_row"] == 1.0  # Paris: a fact of another site
    assert wrong_city["fact_precision"] == pytest.approx(2 / 3)
    assert wrong_city["exact_match"] == 0.0


def test_score_variant_per_region_and_per_site_by_hand(scored):
    # Assert: sub-results in sorted order
    assert list(scored["regions"]) == ["france", "japan"]
    assert list(scored["sites"]) == ["lyon", "paris", "tokyo"]
    france, japan = scored["regions"]["france"], scored["regions"]["japan"]
    assert france["fact_accuracy"] == pytest.approx(5 / 6)
    assert france["site_fact_accuracy"] == pytest.approx(1 / 2)
    assert france["wrong_facts_per_row"] == pytest.approx(1 / 2)
    assert france["num_examples"] == 2
    assert japan["fact_accuracy"] == pytest.approx(1 / 3)
    assert math.isnan(japan["site_fact_accuracy"])  # a one-site region has no site-level fact
    assert scored["sites"]["lyon"]["fact_accuracy"] == pytest.approx(2 / 3)
    assert scored["sites"]["lyon"]["wrong_facts_per_row"] == 1.0
    assert scored["sites"]["paris"]["fact_accuracy"] == 1.0
    assert scored["sites"]["tokyo"]["fact_accuracy"] == pytest.approx(1 / 3)
    assert scored["worst_site_fact_accuracy"] == pytest.approx(1 / 3)
    # loss: summed over the tokens of each group
    assert france["loss"] == pytest.approx(7 / 3)
    assert japan["loss"] == pytest.approx(5 / 3)
    assert scored["sites"]["lyon"]["loss"] == pytest.approx(3.0)


def test_site_by_site_tallies_merge_to_the_pooled_result(scored):
    # Prepare: each site scores only its own row (federated evaluation), levels and vocabulary from the server
    levels, vocabulary = fact_levels(ALL_PAIRS), fact_vocabulary(ALL_PAIRS)
    tallies = {}
    for pair, completion in zip([PARIS, LYON, TOKYO], COMPLETIONS):
        tallies.update(site_tallies([pair], [completion], {pair.site_id: LOSSES[pair.site_id]}, levels, vocabulary))

    # Execute
    merged = result_from_tallies(tallies)

    # Assert: every number equals the pooled scoring; only the examples stay at the sites
    assert merged == {key: value for key, value in scored.items() if key != "examples"}
    assert tallies["lyon"] == {"region": "france", "num_examples": 1, "num_fact_rows": 1, "num_facts": 3, "found": 2,
                               "wrong_facts": 1, "region_facts": 2, "region_found": 2, "site_facts": 1,
                               "site_found": 0, "exact_match": 0, "request_kept": 1,
                               "rouge_l": pytest.approx(10 / 11), "loss_sum": 6.0, "loss_tokens": 2}


def test_score_variant_examples_follow_the_contract(scored):
    # Assert
    examples = scored["examples"]
    assert len(examples) == 3
    for example in examples:
        assert {"site_id", "region", "prompt", "reference", "completion", "facts"} <= set(example)
    assert examples[1] == {
        "site_id": "lyon", "region": "france", "prompt": "Find a pharmacy.", "context": "",
        "reference": LYON.completion, "completion": COMPLETIONS[1], "facts": ["Lyon", "France", "EUR"],
    }


def test_score_variant_worst_site_skips_sites_without_facts_and_perplexity_is_capped():
    # Prepare: a site whose rows carry no facts has fact_accuracy nan
    bare = _pair("nowhere", "x", "Hi.", "Hi.", ())

    # Execute
    only_bare = _score([bare], ["Hi."], 100.0, [bare, PARIS])
    mixed = _score([bare, PARIS], ["Hi.", "Paris"], 1.0, [bare, PARIS])

    # Assert
    assert math.isnan(only_bare["fact_accuracy"])
    assert math.isnan(only_bare["worst_site_fact_accuracy"])
    assert only_bare["exact_match"] == 1.0
    assert only_bare["perplexity"] == pytest.approx(math.exp(50.0))
    assert math.isnan(mixed["sites"]["nowhere"]["fact_accuracy"])
    assert mixed["worst_site_fact_accuracy"] == pytest.approx(1 / 3)  # paris alone: Paris of Paris, France, EUR


# ---- run_variants ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        ([], ["base", "regional", "personalized"]),
        (["personalization.method=none"], ["base", "regional"]),
        (["federation.adapters=global"], ["base", "global", "personalized"]),
        (["federation.adapters=local"], ["base", "local"]),
    ],
)
def test_run_variants_lists_what_a_run_serves(overrides, expected):
    # Execute / Assert
    assert run_variants(load_config(overrides=overrides)) == expected


# ---- run_variant: adapter routing on the tiny model ------------------------------------------------


@pytest.fixture
def two_saved_adapters(tiny_base, default_config, adapter_name, tmp_path):
    """Two peft adapter folders of different random weights."""
    folders = []
    for seed in (1, 2):
        name = f"{adapter_name}_s{seed}"
        model = attach_adapter(tiny_base, name, default_config.lora)
        set_state(model, name, _random_state(model, name, seed))
        folders.append(save_adapter(model, name, tmp_path / "adapters" / f"region{seed}"))
    return folders


def test_run_variant_serves_each_row_with_its_own_adapter(tiny_base, default_pairs, two_saved_adapters,
                                                          adapter_name):
    # Prepare: 6 test rows, routed A, base, B, B, A, base (batch size 4: each adapter's rows in one batch)
    config = load_config(overrides=["model.name=tiny-random", "evaluation.max_new_tokens=6",
                                    "evaluation.batch_size=4"])
    first, second = two_saved_adapters
    rows = [p for p in default_pairs if p.split == "test"][::18]
    assert len(rows) == 6
    adapters = [first, None, second, second, first, None]
    tokenizer = tiny_base.tokenizer

    # Execute
    completions, losses = run_variant(tiny_base, config, rows, adapters)

    # Assert: every row gets what its adapter alone gives on that row alone
    alone = {}
    loss_sum, tokens = 0.0, 0
    for tag, folder in (("a", first), ("b", second)):
        model = load_adapter(tiny_base, f"{adapter_name}_ref_{tag}", folder)
        alone[folder] = [generate_completions(model, tokenizer, [(p.context, p.prompt)], 6)[0] for p in rows]
        own = [p for p, a in zip(rows, adapters) if a == folder]
        row_sum, row_tokens = completion_loss_sum(model, tokenizer, own)
        loss_sum, tokens = loss_sum + row_sum, tokens + row_tokens
    model = peft_model_of(tiny_base)
    with model.disable_adapter():
        alone[None] = [generate_completions(model, tokenizer, [(p.context, p.prompt)], 6)[0] for p in rows]
        row_sum, row_tokens = completion_loss_sum(model, tokenizer, [p for p, a in zip(rows, adapters) if a is None])
    loss_sum, tokens = loss_sum + row_sum, tokens + row_tokens

    assert completions == [alone[folder][i] for i, folder in enumerate(adapters)]
    for i in range(len(rows)):  # the three models disagree on every row, so a mix-up would show
        assert len({alone[first][i], alone[second][i], alone[None][i]}) == 3, i
    assert sum(s for s, _ in losses.values()) == pytest.approx(loss_sum, rel=1e-5)
    assert sum(n for _, n in losses.values()) == tokens
    assert set(losses) == {p.site_id for p in rows}


def test_run_variant_base_rows_equal_a_no_op_adapter(tiny_base, default_pairs, adapter_name):
    # Prepare: a fresh adapter has B = 0: exactly the base model's output
    config = load_config(overrides=["model.name=tiny-random", "evaluation.max_new_tokens=6"])
    rows = [p for p in default_pairs if p.split == "test"][:3]
    fresh = attach_adapter(tiny_base, adapter_name, config.lora)
    expected = generate_completions(fresh, tiny_base.tokenizer, [(p.context, p.prompt) for p in rows], 6)
    expected_loss = completion_loss(fresh, tiny_base.tokenizer, rows)

    # Execute
    completions, losses = run_variant(tiny_base, config, rows, [None] * 3)

    # Assert
    assert completions == expected
    loss = sum(s for s, _ in losses.values()) / sum(n for _, n in losses.values())
    assert loss == pytest.approx(expected_loss, rel=1e-5)


def test_run_variant_serves_an_adapter_from_a_folder_with_a_dot_in_its_path(tiny_base, default_config, default_pairs,
                                                                           adapter_name, tmp_path):
    # Prepare: e.g. run.output_dir=runs/lr0.01, or a home folder /home/first.last (cli resolves output_dir)
    config = load_config(overrides=["model.name=tiny-random", "evaluation.max_new_tokens=2"])
    model = attach_adapter(tiny_base, adapter_name, default_config.lora)
    folder = save_adapter(model, adapter_name, tmp_path / "lr0.01" / "adapters" / "france")
    rows = [p for p in default_pairs if p.split == "test"][:1]

    # Execute
    completions, _ = run_variant(tiny_base, config, rows, [folder])

    # Assert
    assert len(completions) == 1


# ---- generation and loss on the tiny model ---------------------------------------------------------


def _greedy_tokens(model, tokenizer, item, max_new_tokens):
    """Reference: the item alone through `generate`, no padding, no end-of-turn stop."""
    encoded = tokenizer([chat_prompt(tokenizer, *item)], return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        ids = model.generate(
            **encoded,
            max_new_tokens=max_new_tokens,
            min_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
        )
    return ids[0, encoded["input_ids"].shape[1] :].tolist()


def test_generate_completions_one_string_per_item_within_max_new_tokens(tiny_base, random_adapter_model):
    # Prepare
    tokenizer = tiny_base.tokenizer
    reference = [_greedy_tokens(random_adapter_model, tokenizer, item, 8) for item in ITEMS]
    assert all(tokenizer.eos_token_id not in tokens for tokens in reference)

    # Execute: 3 items in batches of 2 (left padding inside, restored afterwards)
    long = generate_completions(random_adapter_model, tokenizer, ITEMS, max_new_tokens=8, batch_size=2)
    short = generate_completions(random_adapter_model, tokenizer, ITEMS, max_new_tokens=3, batch_size=2)

    # Assert: exactly the first max_new_tokens greedy tokens of each item, unaffected by batching
    assert len(long) == len(short) == len(ITEMS)
    assert long == [tokenizer.decode(tokens).strip() for tokens in reference]
    assert short == [tokenizer.decode(tokens[:3]).strip() for tokens in reference]
    assert all(text for text in long)
    assert tokenizer.padding_side == "right"


def test_generate_completions_stops_at_the_end_of_turn_token(tiny_base, random_adapter_model):
    # Prepare: find the greedy tokens, then declare the 4th of them the end-of-turn token
    tokenizer = tiny_base.tokenizer
    new = _greedy_tokens(random_adapter_model, tokenizer, ITEMS[0], 8)
    assert new[3] not in new[:3]
    stopping = copy.deepcopy(tokenizer)
    stopping.eos_token = tokenizer.convert_ids_to_tokens(new[3])

    # Execute
    text = generate_completions(random_adapter_model, stopping, ITEMS[:1], max_new_tokens=8)[0]

    # Assert: generation ended at the stop token (kept in the text or not, as decoding treats it)
    assert text in (tokenizer.decode(new[:3]).strip(), tokenizer.decode(new[:4]).strip())
    assert len(text) < len(tokenizer.decode(new).strip())


def test_completion_loss_is_near_uniform_on_a_random_model(tiny_base, default_config, adapter_name, default_pairs):
    # Prepare: a fresh adapter has B = 0, so this is the random base: loss ~ ln(vocab)
    model = attach_adapter(tiny_base, adapter_name, default_config.lora)
    pairs = default_pairs[:3]

    # Execute
    loss = completion_loss(model, tiny_base.tokenizer, pairs, batch_size=2)

    # Assert
    assert math.isfinite(loss) and loss > 0
    assert loss == pytest.approx(math.log(len(tiny_base.tokenizer)), abs=0.5)


def test_completion_loss_is_a_per_token_mean_independent_of_batching(tiny_base, random_adapter_model, default_pairs):
    # Prepare
    pairs = [default_pairs[0], default_pairs[50], default_pairs[100]]
    tokenizer = tiny_base.tokenizer

    # Execute
    one_by_one = completion_loss(random_adapter_model, tokenizer, pairs, batch_size=1)
    together = completion_loss(random_adapter_model, tokenizer, pairs, batch_size=3)
    single = completion_loss(random_adapter_model, tokenizer, pairs[:1], batch_size=1)
    with torch.no_grad():
        reference = random_adapter_model(**collate(tokenizer, pairs[:1], 128)).loss.item()

    # Assert: for one pair it is the model's own (shifted, masked) cross-entropy
    assert one_by_one == pytest.approx(together, rel=1e-5)
    assert single == pytest.approx(reference, rel=1e-5)
    assert math.isfinite(together) and together > 0


def test_completion_loss_sum_counts_completion_tokens_and_matches_the_mean(tiny_base, random_adapter_model,
                                                                          default_pairs):
    # Prepare: each pair's labels are its completion's tokens plus the end-of-turn token
    pairs = [default_pairs[0], default_pairs[50], default_pairs[100]]
    tokenizer = tiny_base.tokenizer
    expected_tokens = sum(len(tokenizer(p.completion, add_special_tokens=False)["input_ids"]) + 1 for p in pairs)

    # Execute
    total, tokens = completion_loss_sum(random_adapter_model, tokenizer, pairs, batch_size=2)
    parts = [completion_loss_sum(random_adapter_model, tokenizer, [p], batch_size=1) for p in pairs]
    mean = completion_loss(random_adapter_model, tokenizer, pairs, batch_size=2)

    # Assert
    assert tokens == expected_tokens
    assert tokens == sum(n for _, n in parts)
    assert total == pytest.approx(sum(s for s, _ in parts), rel=1e-5)
    assert mean == pytest.approx(total / tokens, rel=1e-6)
    assert completion_loss_sum(random_adapter_model, tokenizer, []) == (0.0, 0)
    assert completion_loss(random_adapter_model, tokenizer, []) == 0.0
