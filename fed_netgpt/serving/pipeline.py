"""NetGPT end to end: the edge completes a concise prompt with local context, the cloud answers the completed one.

The cloud-only baseline sends the raw prompt (plus whatever raw location the user allows) straight to the cloud:
the comparison the paper makes. Both report each stage's time and the bytes sent uplink (the UTF-8 text the
cloud receives as the user message; the HTTP and JSON framing around it is the same for both).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

from fed_netgpt.serving.cloud import Cloud
from fed_netgpt.serving.edge import EdgeService
from fed_netgpt.serving.engine import Sampling


@dataclass(frozen=True)
class Generation:
    completion: str  # what the cloud received: the edge's completed prompt (cloud-only: the raw prompt)
    answer: str  # the cloud's answer
    adapter: str  # the edge adapter that completed the prompt ("" for cloud-only)
    region: str  # the region of the site ("" for cloud-only)
    edge_seconds: float
    cloud_seconds: float
    uplink_bytes: int
    cloud_input_tokens: int
    cloud_model: str

    def to_json(self) -> dict:
        return asdict(self)


def generate(edge: EdgeService, cloud: Cloud, prompt: str, site_id: str = "", region: str = "",
             sampling: Sampling | None = None, max_new_tokens: int | None = None) -> Generation:
    """Edge completion for the site (or region; at most `max_new_tokens`, else the service's setting), then the
    cloud's answer to the completed prompt."""
    started = time.perf_counter()
    completed = edge.complete(prompt, site_id, region, sampling=sampling, max_new_tokens=max_new_tokens)
    edge_seconds = time.perf_counter() - started
    reply = cloud.answer(completed.text)
    return Generation(completed.text, reply.text, completed.adapter, completed.region, edge_seconds, reply.seconds,
                      len(completed.text.encode()), reply.input_tokens, reply.model)


def cloud_only(cloud: Cloud, prompt: str, location: str = "") -> Generation:
    """The baseline: the raw prompt, prefixed by the raw location when the user allows one, straight to the cloud."""
    sent = f"I am in {location}. {prompt}" if location else prompt
    reply = cloud.answer(sent)
    return Generation(sent, reply.text, "", "", 0.0, reply.seconds, len(sent.encode()), reply.input_tokens, reply.model)
