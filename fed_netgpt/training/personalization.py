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
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

from peft import PeftModel

from fed_netgpt.config import Config, TrainConfig
from fed_netgpt.model.adapters import AdapterError, AdapterState, attach_adapter, publish_adapter, read_adapter
from fed_netgpt.model.base import BaseModel
from fed_netgpt.run.folder import is_adapter
from fed_netgpt.training.engine import SiteJob, TrainResult, train_sites

PERSONAL = "personal"
RUN_MARK = "run.json"  # beside a site adapter: which run trained it, so a new run never inherits a stale one


def personal_job(federated: SiteJob, folder: Path, run_id: str) -> SiteJob:
    """Ditto's personal pass of a site, from the job of its federated update: it starts from the site's own adapter
    (the regional one it was sent, the first time) and is pulled toward that regional adapter; it draws on the same
    DP accountant, so epsilon covers both."""
    return replace(federated, start=_own_adapter(folder, run_id) or federated.start, anchor=federated.start)


def train_personal_adapters(base: BaseModel, config: Config, federated: Sequence[SiteJob], folders: Sequence[Path],
                            run_id: str) -> list[TrainResult]:
    """One round of Ditto's personal update for each site of `federated` (one grouped pass); each adapter is
    published to its folder (peft format) with the run's mark."""
    jobs = [personal_job(job, folder, run_id) for job, folder in zip(federated, folders)]
    results = train_sites(base, jobs, config.lora, ditto_settings(config))
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
