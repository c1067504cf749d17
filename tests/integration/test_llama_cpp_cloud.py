"""The edge service against a real third-party OpenAI-compatible cloud: llama-cpp-python's server serving the
embedded SmolLM2 GGUF on 127.0.0.1, reached over HTTP through `OpenAICloud`, with the model name it lists."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from fed_netgpt.config import ServingConfig
from fed_netgpt.model.base import smollm2_gguf
from fed_netgpt.serving.cloud import OpenAICloud
from fed_netgpt.serving.edge import EdgeService
from fed_netgpt.serving.http import create_app
from tests.serving_runs import Served, free_port, write_run

pytestmark = [
    pytest.mark.integration,
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None,
                       reason="llama-cpp-python[server] is not installed (make test-all installs it)"),
]
SETTINGS = ServingConfig(precision="fp32", max_new_tokens=8, cloud_max_tokens=24)
ALIAS = "smollm2"
START_SECONDS = 120.0


class LlamaCppServer:
    """`python -m llama_cpp.server` on a free 127.0.0.1 port, its output in a log file."""

    def __init__(self, model: Path, log: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/v1"
        self.log = log
        # one thread for decoding and for the prompt: the default of one prompt thread per core spins on a busy
        # 2-core machine (measured: a 17-token prompt took 0.13 s on 1 thread, 0.35 to 7 s on 2)
        command = [sys.executable, "-m", "llama_cpp.server", "--model", str(model), "--model_alias", ALIAS,
                   "--host", "127.0.0.1", "--port", str(self.port), "--n_ctx", "2048",
                   "--n_threads", "1", "--n_threads_batch", "1"]
        with log.open("wb") as out:
            self.process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)

    def tail(self) -> str:
        return self.log.read_text(encoding="utf-8", errors="replace")[-3000:]

    def wait_ready(self) -> list[str]:
        """Poll GET /v1/models until it answers; the model ids it lists."""
        deadline = time.monotonic() + START_SECONDS
        while True:
            if self.process.poll() is not None:
                pytest.fail(f"llama_cpp.server exited with {self.process.returncode}:\n{self.tail()}")
            try:
                reply = httpx.get(f"{self.url}/models", timeout=5)
                if reply.status_code == 200:
                    return [model["id"] for model in reply.json()["data"]]
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"llama_cpp.server did not answer GET /v1/models within {START_SECONDS:.0f} s:\n"
                            f"{self.tail()}")
            time.sleep(0.5)

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=15)


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[LlamaCppServer, list[str]]]:
    server = LlamaCppServer(smollm2_gguf(), tmp_path_factory.mktemp("llama") / "server.log")
    try:
        yield server, server.wait_ready()
    finally:
        server.stop()


@pytest.fixture(scope="module")
def edge(llama, tmp_path_factory, tiny_base) -> Iterator[Served]:
    server, _ = llama
    run = tmp_path_factory.mktemp("serve") / "run"
    write_run(run, tiny_base)
    service = EdgeService(SETTINGS, run=run)
    cloud = OpenAICloud(server.url, "", max_tokens=24, timeout=60, retries=0)  # "": the model llama.cpp lists
    served = Served(create_app(service, cloud, SETTINGS))
    try:
        yield served
    finally:
        served.stop()
        service.close()


def test_llama_cpp_lists_the_gguf_under_its_alias(llama) -> None:
    _, models = llama
    assert models == [ALIAS]


def test_the_edge_completes_and_llama_cpp_answers(llama, edge) -> None:
    _, models = llama
    reply = httpx.post(f"{edge.url}/v1/generate", json={"site_id": "paris", "prompt": "What is the capital of France?"},
                       timeout=120)
    assert reply.status_code == 200, reply.text
    body = reply.json()
    assert body["cloud_model"] == models[0] and body["adapter"] == "paris" and body["region"] == "france"
    assert isinstance(body["answer"], str) and body["answer"].strip()
    assert body["cloud_input_tokens"] > 0  # llama.cpp's own usage count
    assert body["uplink_bytes"] == len(body["completion"].encode()) and body["cloud_seconds"] > 0


def test_the_real_smollm2_behind_llama_cpp_knows_the_capital_of_france(llama, edge) -> None:
    _, models = llama
    reply = httpx.post(f"{edge.url}/v1/cloud-only",
                       json={"prompt": "What is the capital of France? Answer in one word."}, timeout=120)
    assert reply.status_code == 200, reply.text
    body = reply.json()
    assert body["cloud_model"] == models[0] and body["cloud_input_tokens"] > 0
    assert "Paris" in body["answer"], body["answer"]
