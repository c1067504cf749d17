"""Metrics of edge prompt completion, as a paper would report them (pure functions: no torch, no model).

The task: a user's concise request ("Call me a taxi.") is completed by an edge LLM with the local facts
of its site, e.g. "I am in Lyon, France (Europe/Paris time, prices in EUR, calling code +33). Call me a
taxi." with facts ["Lyon", "France", "Europe/Paris", "EUR", "+33"]. Each fact has a level given by the
caller: "region" (shared by every site of a region: country, currency, time zone...) or "site" (city).

What is measured, and why each rule exists:

- **Fact recall** (found / facts, per level too). A fact counts when it appears as a *whole word*,
  case- and accent-insensitively (:func:`normalize`): a naive substring test finds "EUR" in "Europe/Paris"
  and "Japan" in "Japanese", and credits "Paris" for a completion that only names the "Europe/Paris" time
  zone. Facts are searched only in what the model *added*: the user's request is blanked out first, so a
  city the user typed ("What's on in Lyon tonight?") is not credited to the model.
- **Wrong facts**: distinct facts of *other* sites/regions that the completion mentions. Naming every city
  of a region gets full city recall; wrong facts (and fact precision) expose it.
- **Exact match**, **request kept** (the request survives verbatim), and **ROUGE-L** F1 from Google's
  ``rouge-score`` package with an accent-folding tokenizer.

:func:`summarize` micro-averages over rows (every fact weighs the same); a ratio with nothing to divide
by is ``nan``, never a made-up 0 or 1. It goes through additive counts (:func:`tally`), so a federated report
sums the sites' tallies and gets the numbers the pooled rows would give.
"""

from __future__ import annotations

import functools
import math
import re
import unicodedata
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = ["RowScore", "add_tallies", "fact_present", "normalize", "rouge_l", "score_row", "summarize",
           "summarize_tally", "tally"]

LEVELS = ("region", "site")

# Written where text is blanked out: neither a letter/digit (so word boundaries hold around it) nor
# whitespace (so a multi-word fact cannot match across a blanked span: "New <request> York").
_BLANK = "\x00"
_ALNUM = r"[^\W_]"  # a letter or a digit (Python's \w without the underscore), after normalize()


def normalize(text: str) -> str:
    """Fold `text` for comparison: NFKD, accents (combining marks) dropped, casefolded.

    Users and models spell "São Paulo" as "Sao Paulo" and "PARIS" as "Paris"; facts must match either way.

    Examples
    --------
    >>> normalize("São Paulo")
    'sao paulo'
    """
    decomposed = unicodedata.normalize("NFKD", text)
    return "".join(ch for ch in decomposed if not unicodedata.combining(ch)).casefold()


@functools.lru_cache(maxsize=8192)
def _pattern(phrase: str, strict: bool = True) -> re.Pattern[str]:
    """Regex of a normalized, non-empty `phrase` whose whitespace runs match any whitespace run.

    `strict`: the match may not touch a letter or digit on either side (whole-word facts: "+33" is not in
    "x+33"). Otherwise only an end of `phrase` that is a letter/digit may not touch one, so the request
    "Hi" is not blanked out of "this" but "tonight?" is blanked out of "tonight?I".
    """
    body = r"\s+".join(re.escape(part) for part in phrase.split())
    before = strict or re.match(_ALNUM, phrase.strip()[0]) is not None
    after = strict or re.match(_ALNUM, phrase.strip()[-1]) is not None
    return re.compile(f"{f'(?<!{_ALNUM})' if before else ''}{body}{f'(?!{_ALNUM})' if after else ''}")


def _blank(text: str, phrase: str, strict: bool = True) -> str:
    """`text` with every occurrence of `phrase` (both normalized) replaced by one blank marker."""
    if not phrase.strip():
        return text
    return _pattern(phrase, strict).sub(_BLANK, text)


def _checked(fact: str) -> str:
    """The normalized `fact`; a blank fact is a data error (it would match everywhere)."""
    folded = normalize(fact)
    if not folded.strip():
        raise ValueError(f"empty fact {fact!r}")
    return folded


def _present(text: str, fact: str, mask: Collection[str] = ()) -> bool:
    """:func:`fact_present` on already normalized strings (`fact` non-empty)."""
    pattern = _pattern(fact)
    covering = [m for m in mask if m.split() and m.split() != fact.split() and pattern.search(m)]
    for m in sorted(covering, key=lambda s: (-len(s), s)):
        text = _blank(text, m)
    return pattern.search(text) is not None


def fact_present(text: str, fact: str, mask: Sequence[str] = ()) -> bool:
    """Whether `fact` appears in `text` as a whole word, case- and accent-insensitively.

    Neither side of the match may touch a letter or digit, so "EUR" is not found in "Europe/Paris" nor
    "Japan" in "Japanese", while "Paris" is found in "Paris," and "(Paris)", and "+33" in "code +33." but not
    in "+331". Whitespace runs inside `fact` match any whitespace run.

    Strings of `mask` that contain `fact` as a whole word (other than `fact` itself) are blanked out of
    `text` first: with "Europe/Paris" in `mask`, the "Paris" inside "Europe/Paris" does not count.

    Raises
    ------
    ValueError
        If `fact` is empty or only whitespace (it would match anywhere).
    """
    return _present(normalize(text), _checked(fact), [normalize(m) for m in mask])


@dataclass(frozen=True)
class RowScore:
    """Scores of one completion (see :func:`score_row`); :func:`summarize` aggregates them."""

    region_facts: int
    region_found: int
    site_facts: int
    site_found: int
    wrong_facts: int
    exact_match: bool
    request_kept: bool
    rouge_l: float

    def __post_init__(self) -> None:
        for level in LEVELS:
            facts, found = getattr(self, f"{level}_facts"), getattr(self, f"{level}_found")
            if not 0 <= found <= facts:
                raise ValueError(f"{level}_found={found} must be within 0..{level}_facts={facts}")
        if self.wrong_facts < 0:
            raise ValueError(f"wrong_facts={self.wrong_facts} must be >= 0")

    @property
    def facts(self) -> int:
        """Facts of the row, both levels."""
        return self.region_facts + self.site_facts

    @property
    def found(self) -> int:
        """Facts of the row found in the completion, both levels."""
        return self.region_found + self.site_found


def carries_local_facts(score: RowScore) -> bool:
    """Whether a text scored by :func:`score_row` names at least one of its row's local facts (the user's city,
    country, time zone, currency or calling code) outside the request: how NetGPT's cloud answer shows that the
    cloud knew where the user is."""
    return score.region_found + score.site_found > 0


def _collapse(text: str) -> str:
    """`text` with whitespace runs made single spaces, stripped."""
    return " ".join(text.split())


def score_row(
    completion: str, reference: str, request: str, facts: Sequence[str], levels: Sequence[str],
    foreign_facts: Collection[str],
) -> RowScore:
    """Score one `completion` of the user's `request` against its `reference` and the row's `facts`.

    Parameters
    ----------
    completion, reference
        The model's text and the expected one.
    request
        The user's concise request. Every occurrence of it (normalized, any whitespace, not inside a word)
        is blanked out of the completion before facts are searched: a fact the user typed is not a fact the
        model added.
    facts, levels
        The row's facts and, for each, its level "region" or "site". Each fact is searched with the row's
        other facts as mask (see :func:`fact_present`).
    foreign_facts
        Facts of other rows (another site's city, another region's currency). Those equal to one of the
        row's own facts (after normalize) are ignored; the others mentioned in the completion, outside the
        request and the row's own facts, are counted once each, longest first, each found one blanked so
        "Europe/Paris" is not also counted as "Paris".

    Raises
    ------
    ValueError
        If `facts` and `levels` differ in length, a level is not "region" or "site", or a fact is empty.
    """
    if len(facts) != len(levels):
        raise ValueError(f"{len(facts)} facts but {len(levels)} levels")
    for i, level in enumerate(levels):
        if level not in LEVELS:
            raise ValueError(f"levels[{i}]={level!r} (fact {facts[i]!r}): expected 'region' or 'site'")
    own = [_checked(fact) for fact in facts]

    text = _blank(normalize(completion), normalize(request), strict=False)

    facts_at = dict.fromkeys(LEVELS, 0)
    found_at = dict.fromkeys(LEVELS, 0)
    for i, (fact, level) in enumerate(zip(own, levels)):
        facts_at[level] += 1
        found_at[level] += _present(text, fact, own[:i] + own[i + 1 :])

    rest = text
    for fact in sorted(set(own), key=lambda s: (-len(s), s)):
        rest = _blank(rest, fact)
    wrong = 0
    for fact in sorted({_checked(f) for f in foreign_facts} - set(own), key=lambda s: (-len(s), s)):
        if _pattern(fact).search(rest):
            wrong += 1
            rest = _blank(rest, fact)

    return RowScore(
        region_facts=facts_at["region"], region_found=found_at["region"],
        site_facts=facts_at["site"], site_found=found_at["site"],
        wrong_facts=wrong,
        exact_match=_collapse(completion) == _collapse(reference),
        request_kept=_collapse(request) in _collapse(completion),
        rouge_l=rouge_l(completion, reference),
    )


class _Tokenizer:
    """rouge-score tokenizer: :func:`normalize`, then runs of letters/digits ("Paris," -> "paris")."""

    _TOKEN = re.compile(f"{_ALNUM}+")

    def tokenize(self, text: str) -> list[str]:
        return self._TOKEN.findall(normalize(text))


_TOKENIZER = _Tokenizer()


@functools.cache
def _scorer() -> Any:
    """The one ROUGE-L scorer, built on first use (importing rouge-score pulls in nltk: ~1 s)."""
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False, tokenizer=_TOKENIZER)


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F1 of `prediction` against `reference`, by Google's ``rouge-score`` package.

    The maintained implementation keeps numbers comparable with other papers; its tokenizer is swapped for
    one that folds case and accents and splits on anything but letters/digits, so "Paris," == "Paris" and
    "São" == "Sao" (rouge-score's default drops non-ASCII letters). No stemming. Both texts without tokens
    give 1.0, one of them 0.0.
    """
    pred, ref = _TOKENIZER.tokenize(prediction), _TOKENIZER.tokenize(reference)
    if not pred or not ref:
        return float(not pred and not ref)
    return float(_scorer().score(reference, prediction)["rougeL"].fmeasure)


def _ratio(numerator: float, denominator: float) -> float:
    """numerator / denominator, or nan when there is nothing to divide by."""
    return numerator / denominator if denominator else math.nan


TALLY_KEYS = ("num_examples", "num_fact_rows", "num_facts", "found", "wrong_facts", "region_facts",
              "region_found", "site_facts", "site_found", "exact_match", "request_kept", "rouge_l")


def tally(scores: Sequence[RowScore]) -> dict[str, float]:
    """Additive sums of rows' scores (`TALLY_KEYS`). Sites' tallies added key by key summarize exactly as their
    rows together: what a site sends for a federated report instead of its rows."""
    with_facts = [s for s in scores if s.facts]
    return {
        "num_examples": len(scores),
        "num_fact_rows": len(with_facts),
        "num_facts": sum(s.facts for s in with_facts),
        "found": sum(s.found for s in with_facts),
        "wrong_facts": sum(s.wrong_facts for s in with_facts),
        **{f"{level}_{part}": sum(getattr(s, f"{level}_{part}") for s in scores)
           for level in LEVELS for part in ("facts", "found")},
        "exact_match": sum(s.exact_match for s in scores),
        "request_kept": sum(s.request_kept for s in scores),
        "rouge_l": sum(s.rouge_l for s in scores),
    }


def add_tallies(tallies: Sequence[dict[str, float]]) -> dict[str, float]:
    """The tally of several groups of rows (sites, regions) from theirs."""
    return {key: sum(t[key] for t in tallies) for key in TALLY_KEYS}


def summarize(scores: Sequence[RowScore]) -> dict[str, float]:
    """Micro-averaged metrics of many rows, for a results table (:func:`summarize_tally` of their tally)."""
    return summarize_tally(tally(scores))


def summarize_tally(counts: dict[str, float]) -> dict[str, float]:
    """The metrics of a :func:`tally`.

    Fact metrics are micro averages (every fact weighs the same, whatever its row): ``fact_accuracy`` =
    found / facts summed over rows, ``region_fact_accuracy`` and ``site_fact_accuracy`` the same per level,
    ``fact_precision`` = found / (found + wrong facts) and ``wrong_facts_per_row`` over rows with facts; rows
    without facts are left out of them. ``exact_match``, ``request_kept`` and ``rouge_l`` are means over all
    rows. ``num_examples``, ``num_fact_rows`` and ``num_facts`` are counts. A ratio with a zero denominator
    is ``nan``.
    """
    rows, found, wrong = counts["num_examples"], counts["found"], counts["wrong_facts"]
    return {
        "fact_accuracy": _ratio(found, counts["num_facts"]),
        "region_fact_accuracy": _ratio(counts["region_found"], counts["region_facts"]),
        "site_fact_accuracy": _ratio(counts["site_found"], counts["site_facts"]),
        "fact_precision": _ratio(found, found + wrong),
        "wrong_facts_per_row": _ratio(wrong, counts["num_fact_rows"]),
        "exact_match": _ratio(counts["exact_match"], rows),
        "request_kept": _ratio(counts["request_kept"], rows),
        "rouge_l": _ratio(counts["rouge_l"], rows),
        "num_examples": rows,
        "num_fact_rows": counts["num_fact_rows"],
        "num_facts": counts["num_facts"],
    }
