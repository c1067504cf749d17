"""The edge service's request and response bodies: what the OpenAPI schema at /openapi.json is made from.

Requests are checked here, field by field, before they reach a batch: counts and numbers are JSON's (`true` is no
count, nor "2"), text must be Unicode (JSON can carry half a surrogate pair), sampling values stay where the
decoder works, and OpenAI chat fields this service cannot honour are refused, never silently ignored. Responses
are declared too, errors included (OpenAI's shape), so that a client, or a fuzzer, can hold every answer to the
schema.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, model_validator
from pydantic_core import PydanticCustomError

from fed_netgpt.serving.engine import Sampling


# ---- request bodies ---------------------------------------------------------------------------------------------
def _unicode(text: str) -> str:
    """Text a tokenizer can read: JSON may carry half of a surrogate pair ("\\ud83d"), which is no character."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        raise ValueError(f"not valid Unicode text: a lone surrogate (\\u{ord(text[err.start]):04x}) at character "
                         f"{err.start}; send the whole pair or the character itself") from None
    return text


Text = Annotated[str, AfterValidator(_unicode)]


def _count(value: Any) -> Any:
    """JSON's integers, as JSON Schema counts them (2 and 2.0); never `true` or "2", which lax parsing would take."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise PydanticCustomError("int_type", "Input should be a valid integer")
    return value


JSON_INTEGER = BeforeValidator(_count)  # placed after a Field's bounds, which then reach the schema as minimum/maximum
# OpenAI chat fields this service cannot honour, with the values that ask for nothing: anything else is refused
# rather than silently ignored
NOT_HONOURED: dict[str, tuple[Any, ...]] = {
    "n": (None, 1), "stop": (None, "", []), "logprobs": (None, False), "top_logprobs": (None, 0),
    "presence_penalty": (None, 0), "frequency_penalty": (None, 0), "logit_bias": (None, {}), "tools": (None, []),
    "tool_choice": (None, "none"), "response_format": (None, {"type": "text"})}


class _Decoding(BaseModel):
    max_tokens: Annotated[int, Field(ge=1), JSON_INTEGER] | None = Field(
        None, description="new tokens at most (default: the service's setting); /v1/generate: of the edge's completion")
    temperature: float = Field(0.0, ge=0.0, le=2.0, strict=True,
                               description="0 (or under 1e-5): greedy, deterministic")
    top_p: float = Field(1.0, gt=0.0, le=1.0, strict=True)
    seed: Annotated[int, Field(ge=0, le=2**64 - 1), JSON_INTEGER] | None = Field(
        None, description="makes sampling repeatable")

    def sampling(self) -> Sampling:
        return Sampling(self.temperature, self.top_p, self.seed)


class CompleteRequest(_Decoding):
    model_config = ConfigDict(extra="forbid")
    site_id: Text = Field("", description="the site the user is at (a site of the run, or a new one with region)")
    region: Text = Field("", description="the site's region: needed for a site the run does not know")
    prompt: Text = Field(description="the user's concise prompt, without location")


class CloudOnlyRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    prompt: Text
    location: Text = Field("", description="raw location the user allows to be sent to the cloud ('' for none)")


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="allow")  # image_url and the like: not text, left out
    type: Text
    text: Text = ""


class ChatMessage(BaseModel):
    role: Literal["system", "user", "assistant", "developer"]
    content: Text | list[ContentPart]

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content if part.type == "text")


class ChatRequest(_Decoding):
    model_config = ConfigDict(extra="ignore")  # OpenAI clients send fields this service has no use for
    model: Text
    messages: list[ChatMessage] = Field(min_length=1)
    stream: bool = Field(False, strict=True)
    max_completion_tokens: Annotated[int, Field(ge=1), JSON_INTEGER] | None = None

    @model_validator(mode="before")
    @classmethod
    def _refuse_what_is_not_honoured(cls, body: Any) -> Any:
        for key, neutral in NOT_HONOURED.items():
            if isinstance(body, dict) and key in body and not _asks_nothing(body[key], neutral):
                raise PydanticCustomError("not_honoured", "{value}: not supported by this service (it answers with "
                                          "one choice, without stop sequences, log-probabilities, penalties or "
                                          "tools); leave {param} out",
                                          {"param": key, "value": f"{key}={json.dumps(body[key])[:60]}"})
        return body


def _asks_nothing(value: Any, neutral: tuple) -> bool:
    """`value` is one of the `neutral` values (True is not 1 here, nor False 0)."""
    return any(value == v and isinstance(value, bool) == isinstance(v, bool) for v in neutral)


# ---- response bodies --------------------------------------------------------------------------------------------
class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompleteResponse(BaseModel):
    completion: str = Field(description="the prompt completed with the site's local context")
    site_id: str
    region: str
    adapter: str = Field(description="the adapter that completed it: a site, a region, or base")
    seconds: float
    usage: Usage


class GenerationResponse(BaseModel):
    """fed_netgpt.serving.pipeline.Generation: what the cloud received and answered, each stage's time and bytes."""

    completion: str
    answer: str
    adapter: str
    region: str
    edge_seconds: float
    cloud_seconds: float
    uplink_bytes: int
    cloud_input_tokens: int
    cloud_model: str


class GenerateResponse(GenerationResponse):
    site_id: str


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    owned_by: str
    kind: Literal["base", "region", "site"]
    region: str | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ChatChoiceMessage(BaseModel):
    role: Literal["assistant"]
    content: str


class ChatChoice(BaseModel):
    index: int
    message: ChatChoiceMessage
    finish_reason: Literal["stop", "length"]


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    usage: Usage
    choices: list[ChatChoice]


class Health(BaseModel):
    status: Literal["ok"]
    model: str
    run: str | None
    run_id: str | None
    adapters: int
    regions: int
    sites: int
    precision: str
    cloud: str | None
    reloads: int


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: int


class ErrorBody(BaseModel):
    """OpenAI's error shape: every 4xx and 5xx of the service."""

    error: ErrorDetail


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """The OpenAPI `responses` of a route's errors, each in `ErrorBody`'s shape."""
    return {status: {"model": ErrorBody} for status in statuses}
