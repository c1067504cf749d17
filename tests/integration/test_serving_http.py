"""Real HTTP on 127.0.0.1: one service as the cloud (base model, OpenAI-compatible), one as the edge pointing at it,
called with the official `openai` client and with plain HTTP; bad input, auth, limits and a cloud that is down."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from openai import OpenAI

from fed_netgpt.config import ServingConfig
from fed_netgpt.serving.cloud import LocalCloud, OpenAICloud
from fed_netgpt.serving.edge import EdgeService
from fed_netgpt.serving.http import create_app
from tests.serving_runs import Served, free_port, write_run

pytestmark = pytest.mark.integration
SETTINGS = ServingConfig(precision="fp32", max_new_tokens=8, cloud_max_tokens=8, max_prompt_tokens=32,
                         max_body_bytes=4096, cloud_retries=0, cloud_timeout=30.0)
TOKEN = "edge-secret"
PROMPT = "Where can I get dinner tonight?"


@pytest.fixture(scope="module")
def services(tmp_path_factory, tiny_base) -> Iterator[dict]:
    run = tmp_path_factory.mktemp("serve") / "run"
    write_run(run, tiny_base)
    cloud_service = EdgeService(SETTINGS, model_name="tiny-random")
    cloud = Served(create_app(cloud_service, LocalCloud(cloud_service, 8), SETTINGS))
    edge_service = EdgeService(SETTINGS, run=run)
    remote = OpenAICloud(f"{cloud.url}/v1", "", max_tokens=8, timeout=30, retries=0)
    edge = Served(create_app(edge_service, remote, SETTINGS, token=TOKEN))
    down = OpenAICloud(f"http://127.0.0.1:{free_port()}/v1", "tiny-random", max_tokens=8, timeout=5, retries=0)
    orphan = Served(create_app(edge_service, down, SETTINGS, token=TOKEN))
    yield {"edge": edge, "cloud": cloud, "orphan": orphan, "edge_service": edge_service,
           "cloud_service": cloud_service}
    for served in (orphan, edge, cloud):
        served.stop()
    edge_service.close()
    cloud_service.close()


def post(url: str, path: str, body, token: str | None = TOKEN, **kwargs) -> httpx.Response:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    if isinstance(body, (bytes, str)):
        return httpx.post(url + path, content=body, headers={**headers, "content-type": "application/json"},
                          timeout=60, **kwargs)
    return httpx.post(url + path, json=body, headers=headers, timeout=60, **kwargs)


def test_the_edge_completes_and_the_cloud_answers_over_plain_http(services) -> None:
    edge, edge_service, cloud_service = services["edge"], services["edge_service"], services["cloud_service"]
    reply = post(edge.url, "/v1/generate", {"site_id": "paris", "prompt": PROMPT})
    assert reply.status_code == 200, reply.text
    body = reply.json()
    expected = edge_service.complete(PROMPT, "paris").text  # the edge's own completion, by its site adapter
    assert body["completion"] == expected and body["adapter"] == "paris" and body["region"] == "france"
    # the answer is the cloud's own answer to the completed prompt, and it went over HTTP
    assert body["answer"] == cloud_service.chat([{"role": "user", "content": expected}], max_new_tokens=8).text
    assert body["cloud_model"] == "tiny-random" and body["uplink_bytes"] == len(expected.encode())
    assert body["cloud_input_tokens"] > 0 and body["edge_seconds"] > 0 and body["cloud_seconds"] > 0
    only = post(edge.url, "/v1/complete", {"site_id": "kyoto", "region": "japan", "prompt": PROMPT}).json()
    assert only["completion"] == edge_service.complete(PROMPT, "", "japan").text and only["adapter"] == "japan"
    baseline = post(edge.url, "/v1/cloud-only", {"prompt": PROMPT, "location": "Kyoto, Japan"}).json()
    assert baseline["completion"] == f"I am in Kyoto, Japan. {PROMPT}" and baseline["adapter"] == ""


def test_the_official_openai_client_lists_adapters_chats_and_streams(services) -> None:
    edge, edge_service = services["edge"], services["edge_service"]
    client = OpenAI(base_url=f"{edge.url}/v1", api_key=TOKEN, max_retries=0)
    names = [model.id for model in client.models.list()]
    assert names[:3] == ["tiny-random", "france", "japan"] and {"paris", "tokyo"} <= set(names)
    messages = [{"role": "user", "content": PROMPT}]
    chat = client.chat.completions.create(model="tokyo", messages=messages, max_tokens=8)
    assert chat.choices[0].message.content == edge_service.complete(PROMPT, "tokyo").text
    assert chat.usage.completion_tokens > 0 and chat.model == "tokyo"
    pieces = [chunk.choices[0].delta.content or "" for chunk in
              client.chat.completions.create(model="tokyo", messages=messages, max_tokens=8, stream=True)]
    assert "".join(pieces).strip() == chat.choices[0].message.content and len(pieces) > 2
    base = client.chat.completions.create(model="tiny-random", messages=messages, max_tokens=8)
    assert base.choices[0].message.content == edge_service.chat(messages, max_new_tokens=8).text


BAD_REQUESTS = [
    ("/v1/complete", {"site_id": "atlantis", "prompt": PROMPT}, 404, "unknown site 'atlantis'"),
    ("/v1/complete", {"site_id": "x", "region": "mars", "prompt": PROMPT}, 404, "region 'mars' has no adapter"),
    ("/v1/complete", {"site_id": "paris", "prompt": "   "}, 400, "prompt is empty"),
    ("/v1/complete", {"site_id": "paris"}, 400, "prompt: Field required"),
    ("/v1/complete", {"site_id": 7, "prompt": PROMPT}, 400, "site_id: Input should be a valid string"),
    ("/v1/complete", {"site_id": "paris", "prompt": PROMPT, "color": "red"}, 400, "color: Extra inputs"),
    ("/v1/complete", {"site_id": "paris", "prompt": "word " * 40}, 413, "limit is serving.max_prompt_tokens=32"),
    ("/v1/complete", {"site_id": "paris", "prompt": PROMPT, "max_tokens": 500}, 400, "above this service's limit"),
    ("/v1/complete", {"site_id": "paris", "prompt": PROMPT, "temperature": -1}, 400, "temperature"),
    ("/v1/complete", "{not json", 400, "not valid JSON"),
    ("/v1/complete", "[1, 2]", 400, "Input should be a valid dictionary"),
    ("/v1/complete", {"site_id": "paris", "prompt": "x" * 5000}, 413, "larger than serving.max_body_bytes=4096"),
    ("/v1/generate", {"site_id": "paris", "region": "japan", "prompt": PROMPT}, 404, "is in region 'france'"),
    ("/v1/chat/completions", {"model": "nope", "messages": [{"role": "user", "content": "hi"}]}, 404,
     "unknown model 'nope'"),
    ("/v1/chat/completions", {"model": "paris", "messages": []}, 400, "messages"),
    ("/v1/chat/completions", {"model": "paris", "messages": [{"role": "robot", "content": "hi"}]}, 400, "role"),
    ("/v1/chat/completions", {"model": "paris", "messages": [{"role": "system", "content": "hi"}]}, 400,
     "last user message is missing"),
    ("/v1/cloud-only", {"prompt": ""}, 400, "prompt is empty"),
    ("/v1/chat/completions", {"model": "paris", "stream": True, "messages": [{"role": "user", "content": "w " * 60}]},
     413, "serving.max_prompt_tokens=32"),
    # values that once broke decoding or were taken for something else
    ("/v1/complete", '{"site_id": "paris", "prompt": "a \\ud83d b"}', 400, "prompt: not valid Unicode text: a lone "
     "surrogate (\\ud83d) at character 2"),
    ("/v1/chat/completions", '{"model": "paris", "messages": [{"role": "user", "content": "\\udc00"}]}', 400,
     "not valid Unicode text"),
    ("/v1/chat/completions", '{"model": "paris", "messages": [{"role": "user", "content": [{"type": "text", '
     '"text": "\\ud83d"}]}]}', 400, "not valid Unicode text"),
    ("/v1/complete", {"site_id": "paris", "prompt": PROMPT, "seed": 2**64}, 400, "seed: Input should be less than"),
    ("/v1/complete", {"site_id": "paris", "prompt": PROMPT, "seed": -1}, 400, "seed: Input should be greater than"),
    ("/v1/complete", {"site_id": "paris", "prompt": PROMPT, "max_tokens": True}, 400,
     "max_tokens: Input should be a valid integer"),
    ("/v1/complete", {"site_id": "paris", "prompt": PROMPT, "max_tokens": 2.5}, 400, "max_tokens: Input should be"),
    ("/v1/complete", {"site_id": "paris", "prompt": PROMPT, "temperature": True}, 400, "temperature: Input should"),
    ("/v1/complete", '{"site_id": "paris", "prompt": "hi", "top_p": NaN}', 400, "top_p"),
    ("/v1/chat/completions", {"model": "paris", "n": 2, "messages": [{"role": "user", "content": "hi"}]}, 400,
     "n=2: not supported by this service"),
    ("/v1/chat/completions", {"model": "paris", "n": True, "messages": [{"role": "user", "content": "hi"}]}, 400,
     "n=true: not supported"),
    ("/v1/chat/completions", {"model": "paris", "stop": ["."], "messages": [{"role": "user", "content": "hi"}]}, 400,
     'stop=["."]: not supported'),
    ("/v1/chat/completions", {"model": "paris", "logprobs": True, "messages": [{"role": "user", "content": "hi"}]},
     400, "logprobs=true: not supported"),
    ("/v1/chat/completions", {"model": "paris", "stream": "yes", "messages": [{"role": "user", "content": "hi"}]},
     400, "stream: Input should be a valid boolean"),
    ("/v1/complete", b'{"site_id": "paris", "prompt": "\xff"}', 400, "not JSON text in UTF-8"),
]


@pytest.mark.parametrize(("path", "body", "status", "message"), BAD_REQUESTS)
def test_every_malformed_request_gets_a_4xx_naming_the_problem(services, path, body, status, message) -> None:
    reply = post(services["edge"].url, path, body)
    assert reply.status_code == status, reply.text
    assert message in reply.json()["error"]["message"]
    error = reply.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["code"] == status


def test_chat_fields_that_ask_for_nothing_are_accepted(services) -> None:
    neutral = {"n": 1, "stop": None, "logprobs": False, "presence_penalty": 0.0, "frequency_penalty": 0,
               "response_format": {"type": "text"}, "user": "someone", "temperature": 0}
    reply = post(services["edge"].url, "/v1/chat/completions",
                 {"model": "paris", "messages": [{"role": "user", "content": PROMPT}], **neutral})
    assert reply.status_code == 200, reply.text


def test_auth_limits_and_metrics_and_the_service_keeps_serving(services) -> None:
    edge = services["edge"]
    good = {"site_id": "paris", "prompt": PROMPT}
    for token in (None, "wrong", TOKEN + "x"):
        reply = post(edge.url, "/v1/complete", good, token=token)
        assert reply.status_code == 401 and "bearer token" in reply.json()["error"]["message"]
    assert httpx.get(f"{edge.url}/v1/models").status_code == 401
    chunked = httpx.post(f"{edge.url}/v1/complete", content=iter([b'{"prompt": "', b"y" * 5000, b'"}']),
                         headers={"Authorization": f"Bearer {TOKEN}", "content-type": "application/json"})
    assert chunked.status_code == 413  # no Content-Length: counted while reading
    health = httpx.get(f"{edge.url}/healthz").json()
    assert health["status"] == "ok" and health["adapters"] == 3 and health["regions"] == 2
    assert post(edge.url, "/v1/complete", good).status_code == 200
    metrics = httpx.get(f"{edge.url}/metrics").text
    assert 'fed_netgpt_requests_total{route="/v1/complete",status="401"}' in metrics
    assert "fed_netgpt_adapters 3.0" in metrics
    passes = next(float(line.split()[1]) for line in metrics.splitlines()
                  if line.startswith("fed_netgpt_decode_passes"))
    assert passes > 0  # greedy requests decode with drafts (serving.draft_tokens, on by default)
    assert "fed_netgpt_draft_tokens_accepted" in metrics and "fed_netgpt_draft_tokens_proposed" in metrics


def test_a_cloud_that_is_down_is_a_clear_502_and_the_edge_still_completes(services) -> None:
    orphan = services["orphan"]
    reply = post(orphan.url, "/v1/generate", {"site_id": "paris", "prompt": PROMPT})
    assert reply.status_code == 502 and "is unreachable" in reply.json()["error"]["message"]
    assert post(orphan.url, "/v1/complete", {"site_id": "paris", "prompt": PROMPT}).status_code == 200


def test_the_openapi_docs_and_the_playground_are_served(services) -> None:
    edge = services["edge"]
    spec = httpx.get(f"{edge.url}/openapi.json").json()
    assert {"/v1/complete", "/v1/generate", "/v1/chat/completions", "/v1/models", "/healthz"} <= set(spec["paths"])
    page = httpx.get(f"{edge.url}/")
    assert page.status_code == 200 and "fed-netgpt" in page.text


def test_serve_refuses_an_open_host_without_a_token(tmp_path: Path) -> None:
    from fed_netgpt.cli import main

    assert main(["serve", "--host", "0.0.0.0", "--model", "tiny-random"]) == 2


@pytest.mark.parametrize(("flags", "env", "message"), [
    (["--port", "99999"], {}, "argument --port: '99999' is not a TCP port (1-65535)"),
    (["--port", "0"], {}, "'0' is not a TCP port"),
    (["--token", " "], {}, "argument --token: a token is one word of visible ASCII characters, no blanks; got ' '"),
    (["--token", "two words"], {}, "no blanks; got 'two words'"),
    ([], {"FED_NETGPT_TOKEN": " \t"}, "error: $FED_NETGPT_TOKEN: a token is one word of visible ASCII characters"),
])
def test_serve_refuses_a_port_or_token_it_could_not_honour(capsys, monkeypatch, flags, env, message) -> None:
    from fed_netgpt.cli import main

    for name, value in env.items():
        monkeypatch.setenv(name, value)
    try:
        code = main(["serve", "--model", "tiny-random", *flags])
    except SystemExit as refused:  # argparse's refusal of a flag: usage, the message, exit 2
        code = refused.code
    assert code == 2 and message in capsys.readouterr().err



def test_the_token_is_checked_before_the_body_and_read_as_rfc_7235_reads_it(services) -> None:
    url = services["edge"].url
    good = {"site_id": "paris", "prompt": PROMPT}
    # no token: a body too large, a body that is no JSON, a body of the wrong type all get the 401 first
    for body in ({"site_id": "paris", "prompt": "x" * 5000}, "{not json", "[1]"):
        assert post(url, "/v1/complete", body, token=None).status_code == 401
    assert httpx.post(f"{url}/v1/complete", content=b"x", headers={"content-type": "text/plain"}).status_code == 401
    # the scheme is case-insensitive; blanks are no token
    for header, status in ((f"bearer {TOKEN}", 200), (f"BEARER {TOKEN}", 200), ("Bearer", 401),
                           (f"Basic {TOKEN}", 401), (TOKEN, 401)):
        reply = httpx.post(f"{url}/v1/complete", json=good, headers={"Authorization": header}, timeout=60)
        assert reply.status_code == status, (header, reply.text)


def test_a_body_that_is_not_json_and_routes_and_methods_that_do_not_exist_are_refused_in_openais_shape(services):
    url, auth = services["edge"].url, {"Authorization": f"Bearer {TOKEN}"}
    body = b'{"site_id": "paris", "prompt": "hi"}'
    for kind in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x"):
        reply = httpx.post(f"{url}/v1/complete", content=body, headers={**auth, "content-type": kind})
        assert reply.status_code == 415 and "Content-Type: application/json" in reply.json()["error"]["message"]
    bare = httpx.post(f"{url}/v1/complete", content=body, headers=auth, timeout=60)
    assert bare.status_code == 415 and "no Content-Type" in bare.json()["error"]["message"]
    missing = httpx.get(f"{url}/v1/nothing", headers=auth)
    assert missing.status_code == 404 and missing.json()["error"]["type"] == "not_found_error"
    wrong = httpx.get(f"{url}/v1/complete", headers=auth)
    assert wrong.status_code == 405 and wrong.json()["error"]["message"] == "Method Not Allowed"


def test_generate_honours_max_tokens(services) -> None:
    edge, edge_service = services["edge"], services["edge_service"]
    short = post(edge.url, "/v1/generate", {"site_id": "paris", "prompt": PROMPT, "max_tokens": 2}).json()
    assert short["completion"] == edge_service.complete(PROMPT, "paris", max_new_tokens=2).text
    assert len(edge_service.tokenizer(short["completion"], add_special_tokens=False)["input_ids"]) <= 3
    full = post(edge.url, "/v1/generate", {"site_id": "paris", "prompt": PROMPT}).json()
    assert len(full["completion"]) > len(short["completion"])


class BrokenCloud:
    """A cloud client with a bug of its own (not a CloudError): the service must answer 500, count it, live on."""

    name = "broken"

    def answer(self, prompt: str):
        raise KeyError("choices")


def test_a_failure_of_the_service_itself_is_a_500_in_openais_shape_counted_in_metrics(services) -> None:
    broken = Served(create_app(services["edge_service"], BrokenCloud(), SETTINGS))
    try:
        reply = post(broken.url, "/v1/cloud-only", {"prompt": PROMPT}, token=None)
        assert reply.status_code == 500 and reply.json()["error"]["type"] == "server_error"
        assert "KeyError" in reply.json()["error"]["message"]
        assert post(broken.url, "/v1/complete", {"site_id": "paris", "prompt": PROMPT}, token=None).status_code == 200
        metrics = httpx.get(f"{broken.url}/metrics").text
    finally:
        broken.stop()
    assert 'fed_netgpt_requests_total{route="/v1/cloud-only",status="500"} 1.0' in metrics
    assert 'fed_netgpt_requests_total{route="/v1/complete",status="200"} 1.0' in metrics


@pytest.mark.parametrize(("valid", "bad", "bad_status"), [
    (6, {"temperature": 1e-300}, 200),  # once: a NaN in the batch's sampling, 500 for all 7
    (6, {"seed": 18446744073709551616}, 400),  # once: an overflow inside the batch, 500 for 4 of the 6
    (50, {"temperature": 1e-300}, 200),
])
def test_a_bad_request_among_concurrent_ones_fails_alone(services, valid, bad, bad_status) -> None:
    edge, edge_service = services["edge"], services["edge_service"]
    sites = ["paris", "marseille", "tokyo", "yokohama"]
    expected = {site: edge_service.complete(PROMPT, site).text for site in sites}
    bodies = [{"site_id": sites[i % 4], "prompt": PROMPT} for i in range(valid)]
    bodies.insert(valid // 2, {"site_id": "paris", "prompt": PROMPT, **bad})
    batches_before = len(edge_service.batch_sizes)
    with ThreadPoolExecutor(len(bodies)) as pool:
        replies = list(pool.map(lambda body: post(edge.url, "/v1/complete", body), bodies))
    bad_reply = replies.pop(valid // 2)
    assert bad_reply.status_code == bad_status, bad_reply.text
    assert [r.status_code for r in replies] == [200] * valid
    assert [r.json()["completion"] for r in replies] == [expected[body["site_id"]] for body in bodies if body.keys()
                                                          == {"site_id", "prompt"}]
    if bad_status == 200:  # a temperature under 1e-5 is greedy decoding
        assert bad_reply.json()["completion"] == expected["paris"]
    assert max(edge_service.batch_sizes[batches_before:]) > 1  # they were batched together
