"""The HTTP service (FastAPI): edge completion, edge + cloud generation, an OpenAI-compatible chat endpoint.

As in vLLM's multi-LoRA serving, the OpenAI `model` field names the adapter: a site id or a region of the run
(the reply is that adapter's completion of the last user message), or the base model's name (plain chat with the
base model: how this service acts as another edge's cloud). `GET /v1/models` lists them.

Every malformed request gets a 4xx whose JSON body names the problem, in OpenAI's error shape
`{"error": {"message", "type", "param", "code"}}`, and everything about a request that can fail is checked before
it joins a batch; a request that still fails inside one fails alone (fed_netgpt/serving/edge.py), and an error of
the service itself is a 500 in the same shape, logged and counted in /metrics. Routes under /v1 need
`Authorization: Bearer <token>` when the service has a token, checked before the body is read; /, /healthz,
/metrics and the OpenAPI docs do not. Prompts are not logged unless `serving.log_prompts`.
"""

from __future__ import annotations

import hmac
import json
import logging
import queue
import threading
import time
import uuid
from collections.abc import Callable, Iterator, MutableMapping, Sequence
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from starlette.exceptions import HTTPException
from starlette.routing import Match

from fed_netgpt.config import ServingConfig
from fed_netgpt.serving.api import (
    ChatCompletion,
    ChatRequest,
    CloudOnlyRequest,
    CompleteRequest,
    CompleteResponse,
    GenerateResponse,
    GenerationResponse,
    Health,
    ModelList,
    error_responses,
)
from fed_netgpt.serving.catalog import UnknownTarget
from fed_netgpt.serving.cloud import Cloud, CloudError
from fed_netgpt.serving.edge import Completion, EdgeService, PromptTooLong
from fed_netgpt.serving.pipeline import cloud_only, generate

log = logging.getLogger("fed_netgpt.serving")
REQUEST_ERRORS = (400, 401, 404, 413, 415, 500)  # what a /v1 request with a body may be answered
STREAM_EVENT = {  # one server-sent event of a streamed chat: its data is a chat.completion.chunk as JSON, or [DONE]
    "type": "object", "required": ["data"], "properties": {"data": {"type": "string"}, "event": {"type": "string"}}}
FASTAPI_UNPARSED_BODY = "There was an error parsing the body"  # FastAPI's 400 for a body json.loads cannot read
CLOUD_ERRORS = (*REQUEST_ERRORS, 502, 503)  # ... and with a cloud behind it: unreachable, or none
PLAYGROUND = Path(__file__).with_name("playground.html")


class ApiError(Exception):
    """A request the service refuses: HTTP status, OpenAI error type, message, and the offending field."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.param = status, message, kind, param


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
    app.openapi = _openapi(app)  # type: ignore[method-assign]  # FastAPI's documented way to change the schema
    app.add_middleware(_BodyLimit, limit=settings.max_body_bytes)
    app.add_middleware(_Door, token=token)  # outside the body limit: who asks is checked before what they send

    @app.middleware("http")
    async def record(request: Request, call_next):
        """Every answer counted and timed by route and status, the service's own errors (500) included."""
        started = time.perf_counter()
        try:
            response = await call_next(request)
        except Exception as err:  # noqa: BLE001 - a bug of the service: logged whole, answered in the API's shape
            log.exception("%s %s failed", request.method, request.url.path)
            response = _error(500, f"the service failed on this request ({type(err).__name__}: {err}); it is "
                              "logged, and other requests are not affected", "server_error")
        name = _route_name(app, request.scope)
        requests.labels(name, str(response.status_code)).inc()
        latency.labels(name).observe(time.perf_counter() - started)
        log.info("%s %s -> %d in %.3f s", request.method, name, response.status_code, time.perf_counter() - started)
        return response

    @app.exception_handler(ApiError)
    async def api_error(_: Request, err: ApiError) -> JSONResponse:
        return _error(err.status, err.message, err.kind, err.param)

    @app.exception_handler(HTTPException)
    async def http_error(_: Request, err: HTTPException) -> JSONResponse:
        """Starlette's own refusals (no such route, method not allowed, a body it cannot parse)."""
        kind = "not_found_error" if err.status_code == 404 else "invalid_request_error"
        why = " (it is not JSON text in UTF-8)" if err.detail == FASTAPI_UNPARSED_BODY else ""
        return _error(err.status_code, f"{err.detail}{why}", kind)

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, err: RequestValidationError) -> JSONResponse:
        # the deepest problem: a union's members each report one ("content" is text or a list of parts)
        first: dict[str, Any] = max(err.errors(), key=lambda e: len(e.get("loc", ())), default={"msg": "invalid"})
        if first.get("type") == "json_invalid":
            return _error(400, f"the body is not valid JSON ({first.get('ctx', {}).get('error', 'decode error')})")
        message = str(first.get("msg", "")).removeprefix("Value error, ")
        param = first.get("ctx", {}).get("param") or _field(first.get("loc", ()))
        if first.get("type") == "not_honoured":
            return _error(400, message, param=param)
        return _error(400, f"{param or 'body'}: {message}", param=param or None)

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def playground() -> HTMLResponse:
        return HTMLResponse(PLAYGROUND.read_text(encoding="utf-8"))

    @app.get("/healthz", response_model=Health)
    def healthz() -> dict:
        catalog = edge.catalog
        return {"status": "ok", "model": catalog.base_name, "run": str(catalog.run) if catalog.run else None,
                "run_id": (catalog.marker or {}).get("run_id"), "adapters": len(catalog.adapters),
                "regions": len(catalog.regions), "sites": len(catalog.sites), "precision": edge.precision_reason,
                "cloud": cloud.name if cloud else None, "reloads": edge.reloads}

    @app.get("/metrics", include_in_schema=False)
    def metrics() -> Response:
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models", response_model=ModelList, responses=error_responses(401, 500))
    def models() -> dict:
        catalog = edge.catalog
        data = [{"id": catalog.base_name, "object": "model", "owned_by": "fed-netgpt", "kind": "base"}]
        data += [{"id": name, "object": "model", "owned_by": "fed-netgpt", "kind": "region", "region": name}
                 for name in sorted(catalog.regions)]
        data += [{"id": name, "object": "model", "owned_by": "fed-netgpt", "kind": "site", "region": site.region}
                 for name, site in sorted(catalog.sites.items()) if name not in catalog.regions]
        return {"object": "list", "data": data}

    @app.post("/v1/complete", response_model=CompleteResponse, responses=error_responses(*REQUEST_ERRORS))
    def complete(body: CompleteRequest) -> dict:
        """Edge only: the concise prompt completed with the site's local context."""
        done = _edge_call(lambda: edge.complete(_prompt(body.prompt), body.site_id, body.region,
                                                sampling=body.sampling(),
                                                max_new_tokens=_limit(body.max_tokens, settings.max_new_tokens)))
        tokens.labels("edge").inc(done.tokens)
        _log_texts(settings, body.prompt, done.text)
        return {"completion": done.text, "site_id": body.site_id, "region": done.region, "adapter": done.adapter,
                "seconds": done.seconds, "usage": _usage(done)}

    @app.post("/v1/generate", response_model=GenerateResponse, responses=error_responses(*CLOUD_ERRORS))
    def generate_route(body: CompleteRequest) -> dict:
        """Edge + cloud: the completed prompt and the cloud's answer, each stage's time, the bytes sent uplink."""
        if cloud is None:
            raise ApiError(503, "this service has no cloud (start it with --cloud-url, or a local serving.cloud)",
                           "service_unavailable")
        prompt, limit = _prompt(body.prompt), _limit(body.max_tokens, settings.max_new_tokens)
        result = _edge_call(lambda: generate(edge, cloud, prompt, body.site_id, body.region, body.sampling(), limit))
        _log_texts(settings, body.prompt, result.completion)
        return {**result.to_json(), "site_id": body.site_id}

    @app.post("/v1/cloud-only", response_model=GenerationResponse, responses=error_responses(*CLOUD_ERRORS))
    def cloud_only_route(body: CloudOnlyRequest) -> dict:
        """The baseline: the raw prompt (and the raw location, if given) straight to the cloud."""
        if cloud is None:
            raise ApiError(503, "this service has no cloud", "service_unavailable")
        return _edge_call(lambda: cloud_only(cloud, _prompt(body.prompt), body.location)).to_json()

    @app.post("/v1/chat/completions", response_model=ChatCompletion,
              responses={200: {"content": {"text/event-stream": {"schema": STREAM_EVENT}}},
                         **error_responses(*REQUEST_ERRORS)})
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


def _openapi(app: FastAPI) -> Callable[[], dict[str, Any]]:
    """FastAPI's schema without the 422 it documents for every body: this service answers a bad body with 400 in
    OpenAI's shape, as each route's `responses` says."""
    def schema() -> dict[str, Any]:
        if app.openapi_schema is None:
            document = get_openapi(title=app.title, version=app.version, description=app.description,
                                   routes=app.routes)
            for operations in document["paths"].values():
                for operation in operations.values():
                    operation["responses"].pop("422", None)
            for name in ("HTTPValidationError", "ValidationError"):
                document.get("components", {}).get("schemas", {}).pop(name, None)
            app.openapi_schema = document
        return app.openapi_schema

    return schema


def _field(loc: Sequence[Any]) -> str:
    """A validation error's location as the field's path ("messages.0.content"), without pydantic's names for the
    members of a union ("function-after[...]", "list[ContentPart]")."""
    return ".".join(str(part) for part in loc if part != "body" and "[" not in str(part))


def _route_name(app: FastAPI, scope: MutableMapping[str, Any]) -> str:
    """The route's path template ("/v1/complete"), also for requests refused before routing (401, 413, 415)."""
    route = scope.get("route") or next((r for r in app.routes if r.matches(scope)[0] == Match.FULL), None)
    return str(getattr(route, "path", "unmatched"))


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


class _Door:
    """What is checked before a /v1 request's body is read: its bearer token (when the service has one; the scheme
    is case-insensitive, RFC 7235) and that the body it sends is JSON."""

    def __init__(self, app, token: str) -> None:
        self.app, self.token = app, token.encode()

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or not scope["path"].startswith("/v1/"):
            await self.app(scope, receive, send)
            return
        headers = {name.lower(): value for name, value in scope.get("headers", [])}
        refusal = self._unauthorized(headers.get(b"authorization", b"")) or _not_json(
            scope["method"], headers.get(b"content-type", b""))
        if refusal is None:
            await self.app(scope, receive, send)
            return
        await send({"type": "http.response.start", "status": refusal.status_code, "headers": refusal.raw_headers})
        await send({"type": "http.response.body", "body": refusal.body})

    def _unauthorized(self, given: bytes) -> JSONResponse | None:
        if not self.token:
            return None
        scheme, _, credentials = given.partition(b" ")
        if scheme.lower() == b"bearer" and hmac.compare_digest(credentials.strip(), self.token):
            return None
        return _error(401, "missing or wrong bearer token (Authorization: Bearer <token>)", "authentication_error")


def _not_json(method: str, content_type: bytes) -> JSONResponse | None:
    """A POST whose Content-Type is not JSON (FastAPI would read its body as bytes and say it is no object)."""
    kind = content_type.split(b";")[0].strip().lower()
    if method != "POST" or kind == b"application/json" or kind.endswith(b"+json"):
        return None
    said = f"Content-Type {kind.decode('latin-1')!r}" if kind else "no Content-Type"
    return _error(415, f"{said}: the body must be JSON, sent as Content-Type: application/json (curl: -H "
                  "'Content-Type: application/json')")
