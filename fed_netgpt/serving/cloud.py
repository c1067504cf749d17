"""The cloud half of NetGPT: a large model answers the prompt the edge completed.

Two backends behind one `answer(prompt)`: a local transformers model (the embedded SmolLM2 by default, any local
folder; served by an `EdgeService` with no adapters, or the edge's own base when it is the same model), and any
OpenAI-compatible chat-completions endpoint (vLLM, llama.cpp's server, Ollama, a hosted API, another
`fed-netgpt serve`) through the official `openai` client, with its timeout and retries. A cloud that cannot be
reached is a `CloudError` that says where and why.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Protocol

from fed_netgpt.config import ServingConfig
from fed_netgpt.serving.edge import EdgeService


class CloudError(RuntimeError):
    """The cloud did not answer: unreachable, timed out, refused the key or the request."""


@dataclass(frozen=True)
class CloudAnswer:
    text: str
    input_tokens: int  # as the cloud counted them (its usage), else the local tokenizer's count
    seconds: float
    model: str


class Cloud(Protocol):
    @property
    def name(self) -> str: ...

    def answer(self, prompt: str) -> CloudAnswer: ...


class LocalCloud:
    """A local model answers: plain chat with the base model, no adapter."""

    def __init__(self, service: EdgeService, max_tokens: int) -> None:
        self.service, self.max_tokens = service, max_tokens
        self.name = service.catalog.base_name

    def answer(self, prompt: str) -> CloudAnswer:
        started = time.perf_counter()
        reply = self.service.chat([{"role": "user", "content": prompt}], max_new_tokens=self.max_tokens)
        return CloudAnswer(reply.text, reply.prompt_tokens, time.perf_counter() - started, self.name)


class OpenAICloud:
    """Any OpenAI-compatible chat-completions endpoint; the key comes from $OPENAI_API_KEY (the client reads it)."""

    def __init__(self, url: str, model: str, *, max_tokens: int, timeout: float, retries: int) -> None:
        from openai import OpenAI

        self.url, self.max_tokens = url, max_tokens
        self.client = OpenAI(base_url=url, api_key=os.environ.get("OPENAI_API_KEY") or "none", timeout=timeout,
                             max_retries=retries)
        self._model = model

    @property
    def name(self) -> str:
        """The cloud's model: as given, else the first it lists (asked once, when first needed)."""
        if not self._model:
            models = self._call(lambda: list(self.client.models.list()))
            if not models:
                raise CloudError(f"the cloud at {self.url} lists no model at GET /models; pass --cloud-model")
            self._model = models[0].id
        return self._model

    def answer(self, prompt: str) -> CloudAnswer:
        started = time.perf_counter()
        reply = self._call(lambda: self.client.chat.completions.create(
            model=self.name, messages=[{"role": "user", "content": prompt}], max_tokens=self.max_tokens,
            temperature=0))
        usage = getattr(reply, "usage", None)
        text = (reply.choices[0].message.content or "").strip() if reply.choices else ""
        tokens = int(usage.prompt_tokens) if usage and usage.prompt_tokens is not None else -1
        return CloudAnswer(text, tokens, time.perf_counter() - started, self.name)

    def _call(self, request):
        import openai

        try:
            return request()
        except openai.APITimeoutError:
            raise CloudError(f"the cloud at {self.url} did not answer within {self.client.timeout} s "
                             f"({self.client.max_retries} retries)") from None
        except openai.APIConnectionError as err:
            raise CloudError(f"the cloud at {self.url} is unreachable ({err.__cause__ or err}); "
                             f"is it running? ({self.client.max_retries} retries)") from None
        except openai.APIStatusError as err:
            raise CloudError(f"the cloud at {self.url} answered {err.status_code}: {_message(err)}") from None


def _message(err) -> str:
    body = getattr(err, "body", None)
    if isinstance(body, dict):
        inner = body.get("error", body)
        if isinstance(inner, dict) and inner.get("message"):
            return str(inner["message"])
    return str(err)


def cloud_for(settings: ServingConfig, edge: EdgeService | None = None, device: str = "auto") -> Cloud:
    """The cloud the settings name: `serving.cloud_url` if set, else a local model: the edge's own base model when
    it serves no run (it is the cloud) or is the same model (one copy serves both), else `serving.cloud`."""
    if settings.cloud_url:
        return OpenAICloud(settings.cloud_url, settings.cloud_model, max_tokens=settings.cloud_max_tokens,
                           timeout=settings.cloud_timeout, retries=settings.cloud_retries)
    if edge is not None and (edge.catalog.run is None or edge.catalog.base_name == settings.cloud):
        return LocalCloud(edge, settings.cloud_max_tokens)
    return LocalCloud(EdgeService(settings, model_name=settings.cloud, device=device), settings.cloud_max_tokens)
