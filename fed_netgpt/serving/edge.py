"""The edge service: one base model, every adapter of a run, concurrent requests batched into one decode.

Requests from any thread are queued; one worker thread takes the first, waits up to `serving.max_wait_ms` for
more (up to `serving.max_batch`), and decodes them together, each row with its own site's or region's adapter.
Between batches (and every `serving.reload_seconds` when idle) it checks the run folder's `published.json`:
a newer finished run is loaded without a restart, and a run still training is never served half-written.
Only the worker thread touches the model.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from fed_netgpt.config import ConfigError, ServingConfig
from fed_netgpt.data.schema import DataError
from fed_netgpt.model.adapters import AdapterError
from fed_netgpt.model.base import load_private_base, resolve_device
from fed_netgpt.model.prompting import chat_prompt, chat_text
from fed_netgpt.run.folder import RunFolderError, published
from fed_netgpt.serving.catalog import Catalog, Target, UnknownTarget, read_states, run_catalog
from fed_netgpt.serving.engine import DecodeRow, Engine, Sampling
from fed_netgpt.serving.quantize import int8_supported, quantize_linears

log = logging.getLogger("fed_netgpt.serving")


class PromptTooLong(ValueError):
    """A prompt over `serving.max_prompt_tokens` (never cut silently)."""


@dataclass(frozen=True)
class Completion:
    text: str
    tokens: int  # new tokens decoded
    prompt_tokens: int
    seconds: float  # from submission to the last token (queueing included)
    adapter: str  # the adapter folder's name, or "base"
    cut: bool = False  # stopped by the token limit, not by its end-of-turn token
    region: str = ""  # the region of the site served ("" for base-model chat)


@dataclass
class _Job:
    target: Target
    prompt_ids: list[int]
    max_new_tokens: int
    sampling: Sampling
    on_text: Callable[[str], None] | None
    future: Future = field(default_factory=Future)
    submitted: float = field(default_factory=time.perf_counter)
    streamed: bool = False  # some of its text has reached the client

    def streamer(self) -> Callable[[str], None] | None:
        """`on_text`, noting that text went out."""
        if self.on_text is None:
            return None
        on_text = self.on_text

        def send(text: str) -> None:
            self.streamed = True
            on_text(text)

        return send


def choose_serving_precision(setting: str, device: torch.device) -> tuple[str, str]:
    """`serving.precision`: auto is int8 weights on a CPU whose torch runs the int8 kernel (decoding there is bound
    by memory bandwidth; `fed_netgpt.serving.quantize`), fp32 on a GPU. Returns the choice and a reason to log."""
    usable = device.type == "cpu" and int8_supported()
    if setting == "int8" and not usable:
        raise ConfigError(f"serving.precision=int8 runs on a CPU whose torch has the int8 weight kernel; this is "
                          f"{device.type}{'' if device.type != 'cpu' else ' without it'}: use fp32 or auto")
    if setting == "auto":
        chosen = "int8" if usable else "fp32"
        why = "CPU: int8 weights, decoding is bound by memory bandwidth" if usable else f"{device.type}"
        return chosen, f"serving.precision=auto -> {chosen} ({why})"
    return setting, f"serving.precision={setting}"


class EdgeService:
    """Edge completion (and base-model chat) for every site and region of a run, or the base model alone."""

    def __init__(self, settings: ServingConfig, run: Path | None = None, model_name: str = "smollm2-135m",
                 device: str = "auto", cache_dir: str = "") -> None:
        self.settings, self.run = settings, run
        if run is not None:
            catalog, config = run_catalog(run)
            model_name, cache_dir = config.model.name, config.model.cache_dir
        else:
            catalog = Catalog(base_name=model_name)
        self.catalog = catalog
        resolved = resolve_device(device)
        self.base = load_private_base(model_name, cache_dir, str(resolved))
        self.precision, self.precision_reason = choose_serving_precision(settings.precision, resolved)
        if self.precision == "int8":
            quantize_linears(self.base.model)
        self.engine = Engine(self.base, catalog.lora, read_states(catalog) if catalog.lora else (),
                             draft_tokens=settings.draft_tokens)
        self.tokenizer = self.base.tokenizer
        self.reloads = 0
        self.batch_sizes: list[int] = []  # recent batch sizes (for tests and /metrics)
        self._queue: queue.Queue[_Job | None] = queue.Queue()
        self._worker = threading.Thread(target=self._serve, name="edge-decoder", daemon=True)
        self._worker.start()

    # ---- requests (any thread) ---------------------------------------------------------------------------
    def complete(self, prompt: str, site_id: str = "", region: str = "", *, sampling: Sampling | None = None,
                 max_new_tokens: int | None = None, on_text: Callable[[str], None] | None = None) -> Completion:
        """The concise prompt completed with local context by the site's (or region's) adapter."""
        target = self.catalog.resolve(site_id, region)
        ids = self.encode(chat_prompt(self.tokenizer, target.context, prompt), prompt)
        return self._wait(_Job(target, ids, max_new_tokens or self.settings.max_new_tokens, sampling or Sampling(),
                               on_text))

    def chat(self, messages: Sequence[dict], *, max_new_tokens: int, sampling: Sampling | None = None,
             on_text: Callable[[str], None] | None = None) -> Completion:
        """A plain chat answer of the base model (how this service acts as another edge's cloud)."""
        text = chat_text(self.tokenizer, messages)
        ids = self.encode(text, " ".join(str(m.get("content", "")) for m in messages))
        target = Target(self.catalog.base_name, "", None)
        return self._wait(_Job(target, ids, max_new_tokens, sampling or Sampling(), on_text))

    def encode(self, text: str, user_text: str) -> list[int]:
        """The token ids of `text` (the user's words in the chat template); the limit applies to the user's words
        alone, checked first so an oversized prompt is refused before the whole template is tokenized."""
        user = len(self.tokenizer(user_text, add_special_tokens=False)["input_ids"])
        if user > self.settings.max_prompt_tokens:
            raise PromptTooLong(f"the prompt is {user} tokens; the limit is serving.max_prompt_tokens="
                                f"{self.settings.max_prompt_tokens}")
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def _wait(self, job: _Job) -> Completion:
        self._queue.put(job)
        return job.future.result()

    def close(self) -> None:
        self._queue.put(None)
        self._worker.join(timeout=30)
        self.engine.close()

    # ---- the worker thread ----------------------------------------------------------------------------
    def _serve(self) -> None:
        while True:
            try:
                first = self._queue.get(timeout=self.settings.reload_seconds)
            except queue.Empty:
                self._maybe_reload()
                continue
            if first is None:
                return
            batch = [first]
            deadline = time.perf_counter() + self.settings.max_wait_ms / 1000
            while len(batch) < self.settings.max_batch:
                try:
                    job = self._queue.get(timeout=max(0.0, deadline - time.perf_counter()))
                except queue.Empty:
                    break
                if job is None:
                    self._queue.put(None)
                    break
                batch.append(job)
            self._maybe_reload()
            self._decode(batch)

    def _decode(self, batch: list[_Job]) -> None:
        runnable = []
        for job in batch:
            try:
                slot = self.catalog.slot(job.target)
            except ValueError:  # a reload between the request and its batch removed this adapter
                job.future.set_exception(UnknownTarget(f"{job.target.name!r} is no longer served (the run changed)"))
                continue
            runnable.append((job, DecodeRow(job.prompt_ids, slot, job.max_new_tokens, job.sampling, job.streamer())))
        if not runnable:
            return
        self.batch_sizes = [*self.batch_sizes[-999:], len(runnable)]
        try:
            results = self.engine.generate_rows([row for _, row in runnable])
        except Exception as err:  # noqa: BLE001 - the pass failed: each request is tried alone, so only its own fails
            results = [self._alone(job, row, err) for job, row in runnable]
        done = time.perf_counter()
        for (job, _), result in zip(runnable, results):
            if isinstance(result, Exception):
                job.future.set_exception(result)
                continue
            decoded = self.tokenizer.decode(result, skip_special_tokens=True)
            text = decoded.strip()  # type: ignore[union-attr]  # one row's ids decode to a str, not a list
            adapter = job.target.adapter.name if job.target.adapter else "base"
            job.future.set_result(Completion(text, len(result), len(job.prompt_ids), done - job.submitted, adapter,
                                             cut=len(result) >= job.max_new_tokens, region=job.target.region))

    def _alone(self, job: _Job, row: DecodeRow, batch_error: Exception) -> list[int] | Exception:
        """A request of a failed batch, decoded alone; one that already streamed text keeps the batch's error
        (decoding it again would send its first words twice)."""
        if job.streamed:
            return batch_error
        try:
            return self.engine.generate_rows([row])[0]
        except Exception as err:  # noqa: BLE001 - this request's own failure
            return err

    def _maybe_reload(self) -> None:
        """Load the run folder again when a newer finished run was published there; keep serving the old one if
        the new one cannot be read (said once in the log)."""
        if self.run is None:
            return
        marker = published(self.run)
        if marker is None or marker == self.catalog.marker:
            return
        try:
            catalog, config = run_catalog(self.run)
            self.engine.load(config.lora, read_states(catalog))
        except (RunFolderError, AdapterError, DataError, ConfigError, OSError, ValueError) as err:
            log.warning("serving: not reloading %s (%s); still serving the run loaded before", self.run, err)
            self.catalog = replace(self.catalog, marker=marker)  # do not retry every batch
            return
        self.catalog = catalog
        self.reloads += 1
        log.info("serving: reloaded %s (run %s, %d adapters)", self.run, marker.get("run_id", "?"),
                 len(catalog.adapters))
