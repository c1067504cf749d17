"""The playground page (GET /) in a real headless Chromium, driven over the Chrome DevTools Protocol.

Two real services on loopback: a "cloud" (the tiny random base model alone) and an "edge" serving a tiny federated
run with a bearer token, whose cloud is the first one. The page asks both /v1/generate and /v1/cloud-only.
Set FED_NETGPT_SCREENSHOT=<path.png> to keep a screenshot of the finished page (docs/playground.png).
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.serving_runs import free_port, write_run

pytestmark = pytest.mark.integration
CHROMIUM = shutil.which("chromium")
TOKEN = "playground-test-token"
PROMPT = "Where can I eat something near the station?"


def wait_for_health(url: str, process: subprocess.Popen, log: Path, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, f"{url} exited with {process.returncode}: {log.read_text()[-3000:]}"
        try:
            with urllib.request.urlopen(f"{url}/healthz", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise AssertionError(f"{url}/healthz did not answer within {timeout} s")


def stop(process: subprocess.Popen, group: bool = False) -> None:
    if process.poll() is not None:
        return
    for sig in (signal.SIGTERM, signal.SIGKILL):
        if group:
            os.killpg(process.pid, sig)
        else:
            process.send_signal(sig)
        try:
            process.wait(timeout=10)
            return
        except subprocess.TimeoutExpired:
            continue


def serve(log: Path, *args: str) -> subprocess.Popen:
    with log.open("w") as out:  # a file, not a pipe: a service's request log never blocks it
        return subprocess.Popen([sys.executable, "-m", "fed_netgpt.cli", "serve", *args], stdout=out,
                                stderr=subprocess.STDOUT)


@pytest.fixture(scope="module")
def services(tmp_path_factory: pytest.TempPathFactory, tiny_base) -> Iterator[tuple[str, Path]]:
    """The edge's base URL and its run folder (France and Japan, tiny random adapters, no federation)."""
    cloud_port, edge_port = free_port(), free_port()
    folder = tmp_path_factory.mktemp("playground")
    run, logs = folder / "run", (folder / "cloud.log", folder / "edge.log")
    write_run(run, tiny_base)
    processes = [serve(logs[0], "--model", "tiny-random", "--port", str(cloud_port))]
    try:
        processes.append(serve(logs[1], "--run", str(run), "--port", str(edge_port), "--token", TOKEN,
                               "--cloud-url", f"http://127.0.0.1:{cloud_port}/v1"))
        wait_for_health(f"http://127.0.0.1:{cloud_port}", processes[0], logs[0])
        wait_for_health(f"http://127.0.0.1:{edge_port}", processes[1], logs[1])
        yield f"http://127.0.0.1:{edge_port}", run
    finally:
        for process in processes:
            stop(process)


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A headless Chromium; yields its DevTools HTTP address."""
    if CHROMIUM is None:
        pytest.skip("chromium is not installed (apt-get install -y chromium)")
    profile = tmp_path_factory.mktemp("chromium-profile")
    process = subprocess.Popen([CHROMIUM, "--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run",
                                "--window-size=1200,900", "--remote-debugging-port=0", f"--user-data-dir={profile}",
                                "about:blank"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                               start_new_session=True)
    found: list[str] = []
    ready = threading.Event()

    def drain() -> None:  # reads stderr to its end so that Chromium never blocks on a full pipe
        for line in process.stderr:
            match = re.search(r"DevTools listening on ws://([^/\s]+)/", line)
            if match and not found:
                found.append(match.group(1))
                ready.set()
        ready.set()

    threading.Thread(target=drain, daemon=True).start()
    try:
        assert ready.wait(60) and found, "chromium did not print its DevTools address"
        yield f"http://{found[0]}"
    finally:
        stop(process, group=True)


class Page:
    """One browser tab over its DevTools websocket: commands by id, events skipped."""

    def __init__(self, socket) -> None:
        self.socket, self.ids = socket, 0

    def send(self, method: str, **params) -> dict:
        self.ids += 1
        self.socket.send(json.dumps({"id": self.ids, "method": method, "params": params}))
        while True:
            message = json.loads(self.socket.recv(timeout=30))
            if message.get("id") == self.ids:
                assert "error" not in message, f"{method}: {message['error']}"
                return message["result"]

    def js(self, expression: str):
        result = self.send("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        assert "exceptionDetails" not in result, result["exceptionDetails"]
        return result["result"].get("value")

    def wait_for(self, expression: str, timeout: float = 120):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = self.js(expression)
            if value:
                return value
            time.sleep(0.2)
        raise AssertionError(f"not true within {timeout} s: {expression}; page: {self.js('document.body.innerText')}")

    def type_into(self, element_id: str, text: str) -> None:
        """Empty the input, focus it and type as a keyboard would (input events included)."""
        self.js(f"(() => {{ const e = document.getElementById({element_id!r}); e.value = ''; e.focus(); }})()")
        self.send("Input.insertText", text=text)

    def text(self, element_id: str) -> str:
        return self.js(f"document.getElementById({element_id!r}).textContent")


@pytest.fixture
def page(browser: str, services: tuple[str, Path]) -> Iterator[Page]:
    """A new tab (so a new sessionStorage) on the edge's playground."""
    from websockets.sync.client import connect

    with urllib.request.urlopen(urllib.request.Request(f"{browser}/json/new?about:blank", method="PUT"),
                                timeout=10) as response:
        target = json.load(response)
    try:
        with connect(target["webSocketDebuggerUrl"], max_size=None, open_timeout=10) as socket:
            tab = Page(socket)
            tab.send("Page.enable")
            tab.send("Page.navigate", url=f"{services[0]}/")
            tab.wait_for("document.readyState === 'complete' && !!document.getElementById('run')", timeout=30)
            yield tab
    finally:
        with urllib.request.urlopen(f"{browser}/json/close/{target['id']}", timeout=10):
            pass


def test_the_page_shows_the_edge_completion_beside_the_cloud_only_answer(page: Page, services) -> None:
    run = services[1]
    regions = sorted(p.name for p in (run / "adapters").iterdir() if p.is_dir())
    assert regions == ["france", "japan"]
    page.type_into("token", TOKEN)
    page.type_into("prompt", PROMPT)  # leaving the token field fires its change: the sites load with the token
    page.wait_for("document.querySelector('#site option[data-kind=site]') !== null", timeout=30)
    options = page.js("[...document.getElementById('site').options].map(o => [o.dataset.kind, o.value, o.text])")
    assert {value for kind, value, _ in options if kind == "region"} >= set(regions)
    assert ["site", "paris", "paris (france)"] in options
    page.js("(() => { const s = document.getElementById('site'); s.value = 'paris';"
            " s.dispatchEvent(new Event('change', {bubbles: true})); })()")
    page.js("document.getElementById('run').click()")
    assert page.wait_for("['done', 'error'].includes(document.body.dataset.state) && document.body.dataset.state"
                         ) == "done", page.text("error")
    assert page.text("error") == ""
    assert page.text("completion").strip()
    assert page.text("raw-sent") == PROMPT
    assert "edge" in page.text("edge-stats") and "uplink" in page.text("edge-stats")
    assert "uplink" in page.text("cloud-stats")
    assert page.js("sessionStorage.getItem('fed-netgpt-token')") == TOKEN
    shot = base64.b64decode(page.send("Page.captureScreenshot", format="png", captureBeyondViewport=True)["data"])
    assert shot.startswith(b"\x89PNG")
    if os.environ.get("FED_NETGPT_SCREENSHOT"):
        target = Path(os.environ["FED_NETGPT_SCREENSHOT"])
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(shot)


def test_without_the_token_the_page_says_the_bearer_token_is_missing(page: Page) -> None:
    assert page.js("document.getElementById('token').value") == ""  # a new tab: nothing in its sessionStorage
    page.wait_for("document.getElementById('error').textContent !== ''", timeout=30)  # GET /v1/models: 401
    page.js("document.getElementById('run').click()")
    assert page.wait_for("['done', 'error'].includes(document.body.dataset.state) && document.body.dataset.state"
                         ) == "error"
    assert "bearer token" in page.text("error")
    assert page.text("completion") == "" and page.text("raw-sent") == ""
