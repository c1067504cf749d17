"""The public contracts of ARCHITECTURE.md ("Contracts other tools rely on"), frozen in tests/contracts.json as they
were at commit f942d14: every config key, every command and option flag of `fed-netgpt`, every HTTP route of the
edge service. The current code must still have each frozen item; new items pass (extend, never rename).
The run folder and metrics.jsonl / report.json fields need a real run: tests/integration/test_contracts_run.py."""

from __future__ import annotations

import argparse
import dataclasses
import json
from collections.abc import Iterable
from pathlib import Path
from unittest.mock import MagicMock

import pytest

CONTRACTS = Path(__file__).resolve().parents[1] / "contracts.json"
RULE = ("contracts are extended, never renamed (ARCHITECTURE.md); a deliberate change needs a migration note in "
        "README and an update of tests/contracts.json")


def frozen(category: str):
    """One category of tests/contracts.json."""
    return json.loads(CONTRACTS.read_text(encoding="utf-8"))[category]


def assert_extended(what: str, frozen_items: Iterable[str], current_items: Iterable[str]) -> None:
    """Every frozen item is still among the current ones; the message names the first that is not."""
    current = set(current_items)
    missing = [item for item in frozen_items if item not in current]
    assert not missing, (f"{what}: {missing[0]!r} is gone" + (f" (and {len(missing) - 1} more)" if missing[1:] else "")
                         + f"; {RULE}")


def config_keys() -> list[str]:
    """Every dotted key of the typed config, nested sections walked; lists and dicts are keys of their own."""
    from fed_netgpt.config import Config

    keys: list[str] = []

    def walk(prefix: str, section) -> None:
        for f in dataclasses.fields(section):
            value = getattr(section, f.name)
            if dataclasses.is_dataclass(value):
                walk(f"{prefix}{f.name}.", value)
            else:
                keys.append(f"{prefix}{f.name}")

    walk("", Config())
    return sorted(keys)


def cli_commands() -> dict[str, list[str]]:
    """{"fed-netgpt <command> [<subcommand>]": its option flags and <positional>s}, from the argparse parser."""
    from fed_netgpt.cli import _parser

    commands: dict[str, list[str]] = {}

    def walk(name: str, parser: argparse.ArgumentParser) -> None:
        items = []
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for sub_name, sub_parser in action.choices.items():
                    walk(f"{name} {sub_name}", sub_parser)
            elif action.option_strings:
                items.extend(action.option_strings)
            else:
                items.append(f"<{action.metavar if isinstance(action.metavar, str) else action.dest}>")
        commands[name] = sorted(items)

    walk("fed-netgpt", _parser())
    return dict(sorted(commands.items()))


def flat_cli(commands: dict[str, list[str]]) -> list[str]:
    """Each command, then each of its flags as "<command> <flag>": a missing command is named before its flags."""
    return [entry for name, items in commands.items() for entry in (name, *(f"{name} {item}" for item in items))]


def http_routes() -> list[str]:
    """"METHOD /path" of every route of the edge service's FastAPI app (a mock edge service: no model is loaded,
    the routes do not touch it until a request comes)."""
    from fed_netgpt.config import ServingConfig
    from fed_netgpt.serving.http import create_app

    app = create_app(MagicMock(name="edge"), None, ServingConfig())
    return sorted({f"{method} {route.path}" for route in app.routes
                   for method in (getattr(route, "methods", None) or ["*"])})


def test_assert_extended_names_the_first_missing_item_and_lets_new_items_pass():
    # Prepare: the current code has every frozen item but one, and a new item
    frozen_items = ["a.b", "a.gone", "c", "d.gone"]
    current_items = ["c", "a.b", "brand.new"]

    # Execute
    with pytest.raises(AssertionError) as failure:
        assert_extended("config keys", frozen_items, current_items)
    assert_extended("config keys", ["a.b", "c"], current_items)  # only added items: passes

    # Assert
    message = str(failure.value)
    assert "config keys: 'a.gone' is gone (and 1 more)" in message
    assert RULE in message


def test_the_typed_config_still_has_every_frozen_key():
    # Prepare
    expected = frozen("config_keys")

    # Execute
    current = config_keys()

    # Assert
    assert_extended("config key", expected, current)


def test_the_command_line_still_has_every_frozen_command_and_flag():
    # Prepare
    expected = flat_cli(frozen("cli"))

    # Execute
    current = flat_cli(cli_commands())

    # Assert
    assert_extended("fed-netgpt command line", expected, current)


def test_the_edge_service_still_serves_every_frozen_route():
    # Prepare
    expected = frozen("routes")

    # Execute
    current = http_routes()

    # Assert
    assert_extended("HTTP route", expected, current)
