"""The service's contract, fuzzed: requests generated from its own OpenAPI schema (schemathesis, on hypothesis),
valid and invalid, sent over real HTTP to a service on 127.0.0.1 that serves a run with a token and a cloud.

Each operation gets `CASES` requests of each kind (valid, invalid), derandomized so that a failure repeats. Held:
no 5xx; every status the schema declares, in the content type it declares; every answer, 2xx or 4xx, in its
declared shape (the errors in OpenAI's); invalid data refused; without the token, 401 whatever the body; and
/metrics counts every answer by status.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterator

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_schema_conformance,
    status_code_conformance,
)

from fed_netgpt.config import ServingConfig
from fed_netgpt.serving.cloud import LocalCloud
from fed_netgpt.serving.edge import EdgeService
from fed_netgpt.serving.http import create_app
from tests.serving_runs import Served, write_run

pytestmark = pytest.mark.integration
CASES = 40  # per operation and kind (GETs take no input: valid ones only), about 330 requests
SETTINGS = ServingConfig(precision="fp32", max_new_tokens=8, cloud_max_tokens=8, max_prompt_tokens=64,
                         max_body_bytes=16384)
TOKEN = "fuzz-secret"
SERVED = ("paris", "marseille", "tokyo", "yokohama")  # sites of the run (tests/serving_runs.py), models of chat
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance,
          negative_data_rejection]


@pytest.fixture(scope="module")
def service(tmp_path_factory, tiny_base) -> Iterator[Served]:
    run = tmp_path_factory.mktemp("fuzz") / "run"
    write_run(run, tiny_base)
    edge = EdgeService(SETTINGS, run=run)
    served = Served(create_app(edge, LocalCloud(edge, 8), SETTINGS, token=TOKEN))
    yield served
    served.stop()
    edge.close()


def fuzz(url: str, headers: dict[str, str], check) -> Counter:
    """Every operation of the schema, `CASES` valid and (where it takes input) `CASES` invalid requests each;
    `check(case, response)` on
    each answer. Returns how many answers each (route, status) got."""
    schema = schemathesis.openapi.from_url(f"{url}/openapi.json")
    # invalid data is refused with the statuses this service refuses with: 413 for what is too large, 404 for a
    # site or model it does not serve (schemathesis' list has no 413, and 5xx in it)
    schema.config.checks.negative_data_rejection.expected_statuses = ["400", "401", "404", "413", "415"]
    answered: Counter = Counter()
    for result in schema.get_all_operations():
        operation = result.ok()
        takes_input = bool(list(operation.body) or list(operation.query))  # invalid input needs some input
        for mode in (GenerationMode.POSITIVE, *([GenerationMode.NEGATIVE] if takes_input else [])):
            cases = operation.as_strategy(generation_mode=mode)
            if mode == GenerationMode.POSITIVE:  # most valid requests name what the run serves, so they decode
                cases = st.tuples(cases, st.sampled_from([*SERVED, None])).map(aimed_at)

            @settings(max_examples=CASES, deadline=None, derandomize=True, database=None,
                      phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
            @given(case=cases)
            def exercise(case) -> None:
                response = case.call(base_url=url, headers=headers, timeout=60)
                answered[(case.operation.path, response.status_code)] += 1
                check(case, response)

            exercise()
    return answered


def aimed_at(generated: tuple) -> object:
    """A valid request pointed at a site (and for chat, a model) the run serves, asking for no more tokens than the
    service gives; left as generated with None."""
    case, name = generated
    if name is not None and isinstance(case.body, dict):
        for key in ("max_tokens", "max_completion_tokens"):
            if isinstance(case.body.get(key), int) and case.body[key] > SETTINGS.max_new_tokens:
                case.body[key] = case.body[key] % SETTINGS.max_new_tokens + 1
        if case.operation.path in ("/v1/complete", "/v1/generate"):
            case.body["site_id"] = name
            case.body.pop("region", None)
        if case.operation.path == "/v1/chat/completions":
            case.body["model"] = name
    return case


def requests_by_status(url: str) -> Counter:
    """/metrics' request counter, by (route, status)."""
    counted: Counter = Counter()
    for route, status, value in re.findall(r'fed_netgpt_requests_total\{route="([^"]+)",status="(\d+)"\} (\S+)',
                                           httpx.get(f"{url}/metrics").text):
        counted[(route, int(status))] = int(float(value))
    return counted


def test_generated_requests_get_no_5xx_and_every_answer_is_the_one_the_schema_declares(service) -> None:
    # Prepare
    before = requests_by_status(service.url)

    # Execute
    answered = fuzz(service.url, {"Authorization": f"Bearer {TOKEN}"},
                    lambda case, response: case.validate_response(response, checks=CHECKS))

    # Assert: the fuzzer reached every route with valid and invalid data, and /metrics counted each answer
    statuses = Counter(status for _, status in answered.elements())
    assert sum(answered.values()) >= 6 * CASES and statuses[200] > 0 and statuses[400] > 0
    assert {path for path, _ in answered} == {"/healthz", "/v1/models", "/v1/complete", "/v1/generate",
                                              "/v1/cloud-only", "/v1/chat/completions"}
    after = requests_by_status(service.url)
    assert {key: after[key] - before[key] for key in answered} == dict(answered)


def test_without_the_token_every_v1_request_is_refused_before_its_body_is_read(service) -> None:
    def refused(case, response) -> None:
        if case.operation.path.startswith("/v1/"):
            assert response.status_code == 401, (case.body, response.text)
            assert response.json()["error"]["type"] == "authentication_error"

    answered = fuzz(service.url, {}, refused)
    assert sum(n for (path, status), n in answered.items() if path.startswith("/v1/") and status == 401) >= 5 * CASES
