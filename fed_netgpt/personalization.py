"""Site-level personalization: Ditto (Li et al., ICML 2021) with LoRA adapters.

Besides the regional adapter it trains for the federation, each site keeps a personal adapter that never leaves
it. Each round the site takes `personalization.steps` steps on its own data with the objective
loss + (lambda/2)·||personal - regional||², the regional adapter being the one the server just sent. Why Ditto:
the personal adapter is a complete rank-r peft adapter (it serves alone, through the same code path as a regional
one); the proximal pull keeps a site with a handful of prompts near its region (it keeps the region's facts) while
a large site moves as far as its data asks; and it changes nothing in what the federation aggregates, so the
regional adapters of a personalized run equal those of a run without it.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path

from peft import PeftModel

from fed_netgpt.adapters import AdapterError, AdapterState, attach_adapter, publish_adapter, read_adapter, set_state
from fed_netgpt.config import Config, TrainConfig
from fed_netgpt.data.schema import PromptPair
from fed_netgpt.models import BaseModel
from fed_netgpt.privacy import SiteAccountant, train_grouped_private
from fed_netgpt.runs import is_adapter
from fed_netgpt.training import TrainResult, train_adapter, train_grouped, trainable_parameters

PERSONAL = "personal"
RUN_MARK = "run.json"  # beside a site adapter: which run trained it, so a new run never inherits a stale one


def train_personal_adapter(
    base: BaseModel, config: Config, pairs: Sequence[PromptPair], regional: AdapterState, folder: Path,
    run_id: str, seed: int, train: Callable[..., TrainResult] = train_adapter,
) -> TrainResult:
    """One round of Ditto's personal update at a site; the adapter is published to `folder` (peft format).
    `train` is `training.train_adapter`, or a site's `privacy.SiteAccountant.train` under DP."""
    model = attach_adapter(base, PERSONAL, config.lora, seed=config.run.seed)
    set_state(model, PERSONAL, regional)
    anchor = {name: p.detach().clone() for name, p in trainable_parameters(model).items()}
    set_state(model, PERSONAL, _own_adapter(folder, run_id) or regional)
    result = train(model, PERSONAL, base.tokenizer, pairs, ditto_settings(config), seed=seed, anchor=anchor)
    _publish(model, folder, run_id, result.state)
    return result


def train_personal_adapters_grouped(
    base: BaseModel, config: Config, sites: Sequence[Sequence[PromptPair]], regionals: Sequence[AdapterState],
    folders: Sequence[Path], run_id: str, seed: int, accountants: Sequence[SiteAccountant] | None = None,
) -> list[TrainResult]:
    """`train_personal_adapter` for several sites of a node in one grouped pass (`training.train_grouped`, or
    under DP-SGD `privacy.train_grouped_private` drawing on each site's accountant)."""
    starts = [_own_adapter(folder, run_id) or regional for folder, regional in zip(folders, regionals)]
    if accountants:
        results = train_grouped_private(base.model, base.tokenizer, sites, starts, config.lora,
                                        ditto_settings(config), accountants, anchors=regionals)
    else:
        results = train_grouped(base.model, base.tokenizer, sites, starts, config.lora, ditto_settings(config),
                                [seed] * len(sites), anchors=regionals)
    model = attach_adapter(base, PERSONAL, config.lora, seed=config.run.seed)  # its config goes with each file
    for folder, result in zip(folders, results):
        _publish(model, folder, run_id, result.state)
    return results


def ditto_settings(config: Config) -> TrainConfig:
    """The personal update's training: `personalization.steps` steps, pulled toward the regional adapter."""
    return replace(config.train, local_steps=config.personalization.steps,
                   proximal_mu=config.personalization.ditto_lambda)


def _publish(model: PeftModel, folder: Path, run_id: str, state: AdapterState) -> None:
    publish_adapter(model, PERSONAL, folder, state=state)
    (folder / RUN_MARK).write_text(json.dumps({"run_id": run_id}))


def _own_adapter(folder: Path, run_id: str) -> AdapterState | None:
    """The site adapter this run trained in earlier rounds, or None (first round, or another run's leftovers)."""
    mine = this_runs_adapter(folder, run_id)
    try:
        return None if mine is None else read_adapter(mine)[1]
    except (OSError, AdapterError):
        return None


def this_runs_adapter(folder: Path, run_id: str) -> Path | None:
    """`folder` when it holds a site adapter that run `run_id` trained, else None (none yet, or a stale one)."""
    try:
        mark = json.loads((folder / RUN_MARK).read_text())
    except (OSError, ValueError):
        return None
    return folder if isinstance(mark, dict) and mark.get("run_id") == run_id and is_adapter(folder) else None
