"""The HTTP service (FastAPI): edge completion, edge + cloud generation, an OpenAI-compatible chat endpoint.

As in vLLM's multi-LoRA serving, the OpenAI `model` field names the adapter: a site id or a region of the run
(the reply is that adapter's completion of the last user message), or the base model's name (plain chat with the
base model: how this service acts as another edge's cloud). `GET /v1/models` lists them.

Every malformed request gets a 4xx whose JSON body names the problem, in OpenAI's error shape
`{"error": {"message", "type", "param", "code"}}`; the worker and the service live on. Routes under /v1 need
`Authorization: Bearer <token>` when the service has a token; /, /healthz, /metrics and the OpenAPI docs do not.
Prompts are not logged unless `serving.log_prompts`.
"""

from __future__ import annotations

import hmac
import json
import logging
import queue
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from pydantic import BaseModel, ConfigDict, Field

from fed_netgpt.config import ServingConfig
from fed_netgpt.serving.catalog import UnknownTarget
from fed_netgpt.serving.cloud import Cloud, CloudError
from fed_netgpt.serving.edge import Completion, EdgeService, PromptTooLong
from fed_netgpt.serving.engine import Sampling
from fed_netgpt.serving.pipeline import cloud_only, generate

log = logging.getLogger("fed_netgpt.serving")
PLAYGROUND = Path(__file__).with_name("playground.html")


class ApiError(Exception):
    """A request the service refuses: HTTP status, OpenAI error type, message, and the offending field."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.param = status, message, kind, param


# ---- request bodies ---------------------------------------------------------------------------------------------
class _Decoding(BaseModel):
    max_tokens: int | None = Field(None, ge=1, description="new tokens at most (default: the service's setting)")
    temperature: float = Field(0.0, ge=0.0, le=2.0, description="0: greedy, deterministic")
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    seed: int | None = None

    def sampling(self) -> Sampling:
        return Sampling(self.temperature, self.top_p, self.seed)


class CompleteRequest(_Decoding):
    model_config = ConfigDict(extra="forbid")
    site_id: str = Field("", description="the site the user is at (a site of the run, or a new one with region)")
    region: str = Field("", description="the site's region: needed for a site the run does not know")
    prompt: str = Field(description="the user's concise prompt, without location")


class CloudOnlyRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    prompt: str
    location: str = Field("", description="raw location the user allows to be sent to the cloud ('' for none)")


class ChatMessage(BaseModel):
    role: Literal["system", "user", "assistant", "developer"]
    content: str | list[dict[str, Any]]

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(str(part.get("text", "")) for part in self.content if part.get("type") == "text")


class ChatRequest(_Decoding):
    model_config = ConfigDict(extra="ignore")  # OpenAI clients send fields this service has no use for
    model: str
    messages: list[ChatMessage] = Field(min_length=1)
    stream: bool = False
    max_completion_tokens: int | None = Field(None, ge=1)


# ---- the app ----------------------------------------------------------------------------------------------------
def create_app(edge: EdgeService, cloud: Cloud | None, settings: ServingConfig, token: str = "") -> FastAPI:
    app = FastAPI(title="fed-netgpt edge service", version="1", description=__doc__)
    registry = CollectorRegistry()
    requests = Counter("fed_netgpt_requests", "HTTP requests by route and status", ["route", "status"],
                       registry=registry)
    latency = Histogram("fed_netgpt_request_seconds", "request time by route", ["route"], registry=registry)
    tokens = Counter("fed_netgpt_generated_tokens", "tokens generated, by stage", ["stage"], registry=registry)
    batch_rows = Gauge("fed_netgpt_last_batch_rows", "rows of the last decoded batch", registry=registry)
    batch_rows.set_function(lambda: edge.batch_sizes[-1] if edge.batch_sizes else 0)
    Gauge("fed_netgpt_adapters", "adapters loaded", registry=registry).set_function(
        lambda: len(edge.catalog.adapters))
    Gauge("fed_netgpt_reloads", "run folder reloads since start", registry=registry).set_function(lambda: edge.reloads)
    stats = edge.engine.stats  # speculative decoding: how much of what was drafted the model confirmed
    Gauge("fed_netgpt_draft_tokens_proposed", "prompt-lookup tokens drafted since start",
          registry=registry).set_function(lambda: stats.drafted)
    Gauge("fed_netgpt_draft_tokens_accepted", "drafted tokens the model confirmed since start",
          registry=registry).set_function(lambda: stats.accepted)
    Gauge("fed_netgpt_decode_passes", "speculative decoding passes over the model since start",
          registry=registry).set_function(lambda: stats.passes)
    app.add_middleware(_BodyLimit, limit=settings.max_body_bytes)

    @app.middleware("http")
    async def record(request: Request, call_next):
        started = time.perf_counter()
        response = await call_next(request)
        route = request.scope.get("route")
        name = getattr(route, "path", "unmatched")
        requests.labels(name, str(response.status_code)).inc()
        latency.labels(name).observe(time.perf_counter() - started)
        log.info("%s %s -> %d in %.3f s", request.method, name, response.status_code, time.perf_counter() - started)
        return response

    @app.exception_handler(ApiError)
    async def api_error(_: Request, err: ApiError) -> JSONResponse:
        return _error(err.status, err.message, err.kind, err.param)

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, err: RequestValidationError) -> JSONResponse:
        first: dict[str, Any] = err.errors()[0] if err.errors() else {"loc": (), "msg": "invalid request"}
        if first.get("type") == "json_invalid":
            return _error(400, f"the body is not valid JSON ({first.get('ctx', {}).get('error', 'decode error')})")
        where = ".".join(str(part) for part in first.get("loc", ()) if part != "body")
        return _error(400, f"{where or 'body'}: {first.get('msg')}", param=where or None)

    def authorized(request: Request) -> None:
        if not token:
            return
        given = request.headers.get("authorization", "")
        if not (given.startswith("Bearer ") and hmac.compare_digest(given[7:].encode(), token.encode())):
            raise ApiError(401, "missing or wrong bearer token (Authorization: Bearer <token>)",
                           "authentication_error")

    guarded = [Depends(authorized)]

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def playground() -> HTMLResponse:
        return HTMLResponse(PLAYGROUND.read_text(encoding="utf-8"))

    @app.get("/healthz")
    def healthz() -> dict:
        catalog = edge.catalog
        return {"status": "ok", "model": catalog.base_name, "run": str(catalog.run) if catalog.run else None,
                "run_id": (catalog.marker or {}).get("run_id"), "adapters": len(catalog.adapters),
                "regions": len(catalog.regions), "sites": len(catalog.sites), "precision": edge.precision_reason,
                "cloud": cloud.name if cloud else None, "reloads": edge.reloads}

    @app.get("/metrics", include_in_schema=False)
    def metrics() -> Response:
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models", dependencies=guarded)
    def models() -> dict:
        catalog = edge.catalog
        data = [{"id": catalog.base_name, "object": "model", "owned_by": "fed-netgpt", "kind": "base"}]
        data += [{"id": name, "object": "model", "owned_by": "fed-netgpt", "kind": "region", "region": name}
                 for name in sorted(catalog.regions)]
        data += [{"id": name, "object": "model", "owned_by": "fed-netgpt", "kind": "site", "region": site.region}
                 for name, site in sorted(catalog.sites.items()) if name not in catalog.regions]
        return {"object": "list", "data": data}

    @app.post("/v1/complete", dependencies=guarded)
    def complete(body: CompleteRequest) -> dict:
        """Edge only: the concise prompt completed with the site's local context."""
        done = _edge_call(lambda: edge.complete(_prompt(body.prompt), body.site_id, body.region,
                                                sampling=body.sampling(),
                                                max_new_tokens=_limit(body.max_tokens, settings.max_new_tokens)))
        tokens.labels("edge").inc(done.tokens)
        _log_texts(settings, body.prompt, done.text)
        return {"completion": done.text, "site_id": body.site_id, "region": done.region, "adapter": done.adapter,
                "seconds": done.seconds, "usage": _usage(done)}

    @app.post("/v1/generate", dependencies=guarded)
    def generate_route(body: CompleteRequest) -> dict:
        """Edge + cloud: the completed prompt and the cloud's answer, each stage's time, the bytes sent uplink."""
        if cloud is None:
            raise ApiError(503, "this service has no cloud (start it with --cloud-url, or a local serving.cloud)",
                           "service_unavailable")
        prompt = _prompt(body.prompt)
        _limit(body.max_tokens, settings.max_new_tokens)
        result = _edge_call(lambda: generate(edge, cloud, prompt, body.site_id, body.region, body.sampling()))
        _log_texts(settings, body.prompt, result.completion)
        return {**result.to_json(), "site_id": body.site_id}

    @app.post("/v1/cloud-only", dependencies=guarded)
    def cloud_only_route(body: CloudOnlyRequest) -> dict:
        """The baseline: the raw prompt (and the raw location, if given) straight to the cloud."""
        if cloud is None:
            raise ApiError(503, "this service has no cloud", "service_unavailable")
        return _edge_call(lambda: cloud_only(cloud, _prompt(body.prompt), body.location)).to_json()

    @app.post("/v1/chat/completions", dependencies=guarded)
    def chat(body: ChatRequest):
        """OpenAI chat completions; `model` is the base model (plain chat) or a site / region (its adapter's
        completion of the last user message)."""
        target = _edge_call(lambda: edge.catalog.model(body.model))
        users = [m.text() for m in body.messages if m.role == "user"]
        if not users or not users[-1].strip():
            raise ApiError(400, "messages: the last user message is missing or empty", param="messages")
        wanted = body.max_completion_tokens or body.max_tokens
        if target.adapter is None and body.model == edge.catalog.base_name:
            limit = _limit(wanted, settings.cloud_max_tokens)
            messages = [{"role": m.role if m.role != "developer" else "system", "content": m.text()}
                        for m in body.messages]

            def run(on_text):
                return edge.chat(messages, max_new_tokens=limit, sampling=body.sampling(), on_text=on_text)
        else:
            limit = _limit(wanted, settings.max_new_tokens)

            def run(on_text):
                return edge.complete(users[-1], target.name if target.name in edge.catalog.sites else "",
                                     target.region, sampling=body.sampling(), max_new_tokens=limit, on_text=on_text)
        if body.stream:  # refuse a too-long prompt with a 413 now, not inside the stream
            _edge_call(lambda: edge.encode(users[-1], " ".join(m.text() for m in body.messages)))
            return StreamingResponse(_sse(run, body.model, tokens), media_type="text/event-stream")
        done = _edge_call(lambda: run(None))
        tokens.labels("chat").inc(done.tokens)
        return _chat_response(body.model, done)

    return app


# ---- helpers ----------------------------------------------------------------------------------------------------
def _error(status: int, message: str, kind: str = "invalid_request_error", param: str | None = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": status}}, status)


def _prompt(text: str) -> str:
    if not text.strip():
        raise ApiError(400, "prompt is empty", param="prompt")
    return text


def _limit(asked: int | None, limit: int) -> int:
    if asked is not None and asked > limit:
        raise ApiError(400, f"max_tokens={asked} is above this service's limit of {limit}", param="max_tokens")
    return asked or limit


def _edge_call(call):
    """Run a service call, turning the user's mistakes and an unreachable cloud into API errors."""
    try:
        return call()
    except UnknownTarget as err:
        raise ApiError(404, str(err.args[0]), "not_found_error", "model") from None
    except PromptTooLong as err:
        raise ApiError(413, str(err), param="prompt") from None
    except CloudError as err:
        raise ApiError(502, str(err), "cloud_error") from None


def _usage(done: Completion) -> dict:
    return {"prompt_tokens": done.prompt_tokens, "completion_tokens": done.tokens,
            "total_tokens": done.prompt_tokens + done.tokens}


def _log_texts(settings: ServingConfig, prompt: str, completion: str) -> None:
    if settings.log_prompts:
        log.info("prompt %r -> %r", prompt, completion)


def _chat_response(model: str, done: Completion) -> dict:
    return {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
            "model": model, "usage": _usage(done),
            "choices": [{"index": 0, "message": {"role": "assistant", "content": done.text},
                         "finish_reason": "length" if done.cut else "stop"}]}


def _sse(run, model: str, tokens: Counter) -> Iterator[str]:
    """Server-sent events in OpenAI's chunk format: the role, each new piece of text, the finish, [DONE]."""
    pieces: queue.Queue = queue.Queue()
    ident, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())

    def chunk(delta: dict, finish: str | None = None) -> str:
        body = {"id": ident, "object": "chat.completion.chunk", "created": created, "model": model,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
        return f"data: {json.dumps(body)}\n\n"

    def work() -> None:
        try:
            pieces.put(("done", run(lambda text: pieces.put(("text", text)))))
        except Exception as err:  # noqa: BLE001 - reported to the client inside the stream
            pieces.put(("error", err))

    threading.Thread(target=work, daemon=True).start()
    yield chunk({"role": "assistant", "content": ""})
    while True:
        kind, value = pieces.get()
        if kind == "text":
            yield chunk({"content": value})
        elif kind == "error":
            yield f"data: {json.dumps({'error': {'message': str(value), 'type': 'server_error'}})}\n\n"
            break
        else:
            tokens.labels("chat").inc(value.tokens)
            yield chunk({}, "length" if value.cut else "stop")
            break
    yield "data: [DONE]\n\n"


class _BodyLimit:
    """Refuse bodies above `limit` bytes with 413: by Content-Length, or while reading a chunked body (then the
    app sees a disconnect and whatever it would answer is dropped)."""

    def __init__(self, app, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = dict(scope.get("headers", [])).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.limit:
            await self._refuse(send)
            return
        seen, refused = 0, False

        async def limited():
            nonlocal seen, refused
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.limit and not refused:
                refused = True
                await self._refuse(send)
                return {"type": "http.disconnect"}
            return message

        async def unless_refused(message) -> None:
            if not refused:
                await send(message)

        await self.app(scope, limited, unless_refused)

    async def _refuse(self, send) -> None:
        response = _error(413, f"request body is larger than serving.max_body_bytes={self.limit}")
        await send({"type": "http.response.start", "status": 413, "headers": response.raw_headers})
        await send({"type": "http.response.body", "body": response.body})
