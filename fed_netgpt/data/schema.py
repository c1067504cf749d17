"""The prompt-pair JSONL contract (ARCHITECTURE.md): one object a line, validated where it enters."""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from fed_netgpt.evaluation.metrics import fact_present

REQUIRED = ("site_id", "region", "prompt", "completion")
ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*")
SPLITS = ("train", "valid", "test")


class DataError(ValueError):
    """A user mistake in prompt data; the message names the file, line and field."""


@dataclass(frozen=True)
class PromptPair:
    site_id: str
    region: str
    prompt: str
    completion: str
    context: str = ""
    facts: tuple[str, ...] = field(default_factory=tuple)
    split: str = ""  # "" -> decided by the config's rule
    intent: str = ""  # optional: what the request asks for; the test sample is balanced over sites x intents

    def to_json(self) -> dict[str, Any]:
        row = asdict(self)
        row["facts"] = list(self.facts)
        return {k: v for k, v in row.items() if v not in ("", [])}


def parse_pair(row: Any, where: str) -> PromptPair:
    """Validate one decoded JSON object; `where` ("file.jsonl line 3") prefixes every error."""
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(row).__name__}")
    for key in REQUIRED:
        if key not in row:
            raise DataError(f"{where}: missing required field {key!r}")
        if not isinstance(row[key], str) or not row[key].strip():
            raise DataError(f"{where}: field {key!r} must be a non-empty string, got {row[key]!r}")
    for key in ("site_id", "region"):
        if not ID_PATTERN.fullmatch(row[key]):
            raise DataError(f"{where}: field {key!r} must be letters, digits, '-' or '_' (it names folders "
                            f"and adapters), got {row[key]!r}")
    context = row.get("context", "")
    if not isinstance(context, str):
        raise DataError(f"{where}: field 'context' must be a string, got {context!r}")
    facts = row.get("facts", [])
    if not isinstance(facts, list) or not all(isinstance(f, str) and f for f in facts):
        raise DataError(f"{where}: field 'facts' must be a list of non-empty strings, got {facts!r}")
    for fact in facts:  # what scoring will look for in a completion must be in the reference one
        try:
            found = fact_present(row["completion"], fact)
        except ValueError:
            raise DataError(f"{where}: fact {fact!r} is blank") from None
        if not found:
            raise DataError(f"{where}: fact {fact!r} does not occur in the completion (as a whole word, case and "
                            "accents aside); facts are strings a correct completion contains")
    split = row.get("split", "")
    if split not in ("",) + SPLITS:
        raise DataError(f"{where}: field 'split' must be 'train', 'valid' or 'test', got {split!r}")
    intent = row.get("intent", "")
    if not isinstance(intent, str):
        raise DataError(f"{where}: field 'intent' must be a string, got {intent!r}")
    unknown = sorted(set(row) - set(PromptPair.__dataclass_fields__))
    if unknown:
        raise DataError(f"{where}: unknown field(s) {', '.join(map(repr, unknown))}")
    return PromptPair(
        site_id=row["site_id"], region=row["region"], prompt=row["prompt"], completion=row["completion"],
        context=context, facts=tuple(facts), split=split, intent=intent,
    )


class DuplicateKey(ValueError):
    """A JSON object that names a key twice (json.loads would silently keep the last value)."""


def _unique_keys(items: list[tuple[str, Any]]) -> dict[str, Any]:
    row: dict[str, Any] = {}
    for key, value in items:
        if key in row:
            raise DuplicateKey(key)
        row[key] = value
    return row


def read_jsonl(path: str | Path) -> list[PromptPair]:
    """Read and validate a prompt-pair JSONL; the first bad line stops it with its line number."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"data file not found: {path}")
    if not path.is_file():
        kind = "a folder" if path.is_dir() else "not a regular file (a device, FIFO or socket)"
        raise DataError(f"data file {path} is {kind}; data.path names a JSONL file")
    try:
        raw = path.open("rb")
    except OSError as err:
        raise DataError(f"data file {path} cannot be read ({err.strerror})") from None
    pairs = []
    with raw:
        for number, data in enumerate(raw, start=1):
            try:
                line = data.decode("utf-8")
            except UnicodeDecodeError as err:
                raise DataError(f"{path} line {number}: not UTF-8 text (byte {err.start}: {err.reason}); "
                                "JSONL files are UTF-8") from None
            if not line.strip():
                continue
            try:
                row = json.loads(line, object_pairs_hook=_unique_keys)
            except json.JSONDecodeError as err:
                raise DataError(f"{path} line {number}: not valid JSON ({err.msg})") from None
            except DuplicateKey as err:
                raise DataError(f"{path} line {number}: field {err.args[0]!r} is given twice") from None
            pairs.append(parse_pair(row, f"{path} line {number}"))
    if not pairs:
        raise DataError(f"{path}: no prompt pairs in the file")
    return pairs


def write_jsonl(pairs: Iterable[PromptPair], path: str | Path) -> Path:
    path = Path(path)
    if path.is_dir():
        raise DataError(f"{path} is a folder; --out names the JSONL file to write")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise DataError(f"cannot create {path.parent} ({err.strerror})") from None
    try:
        with path.open("w", encoding="utf-8") as out:
            for pair in pairs:
                out.write(json.dumps(pair.to_json(), ensure_ascii=False) + "\n")
    except OSError as err:
        raise DataError(f"cannot write {path} ({err.strerror})") from None
    return path
