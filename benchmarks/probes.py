"""Odd input a new user tries, each tried as they would try it, and what came back:

    python benchmarks/probes.py [--out runs/probes]

CLEAR: refused, with one line that names the field, path or flag and the cause, nothing lost; CORRECT: the right
result; BAD: a traceback, a 5xx, a silent wrong result, or something lost. The cases are those a new user's probe
of the command line, the run folder, resume and the HTTP service turned up (see the tests beside each behaviour:
tests/integration/test_cli_errors.py, test_simulate.py, test_serving_http.py, test_serving_fuzz.py). Every command
is the real `fed-netgpt` on the tiny model; the service is `create_app` on a real uvicorn server, serving a run this
script trains. Prints a Markdown table; exits 1 if any case is BAD. About 4 minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import uvicorn

SMOKE = ["preset=smoke"]
PROMPT = "Where can I get dinner tonight?"
TOKEN = "probe-secret"
Verdict = tuple[str, str]  # CLEAR | CORRECT | BAD, and what showed it


def fed_netgpt(*args: str, env: dict | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fed_netgpt.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})


def clear(done: subprocess.CompletedProcess, needle: str) -> Verdict:
    """Refused in one line that says `needle`, without a traceback."""
    lines = [line for line in done.stderr.splitlines() if "error" in line.lower()]
    if done.returncode != 0 and "Traceback" not in done.stderr and len(lines) == 1 and needle in lines[0]:
        return "CLEAR", lines[0].strip()[:150]
    return "BAD", f"exit {done.returncode}: {done.stderr.strip()[-300:]}"


def correct(ok: bool, evidence: str) -> Verdict:
    return ("CORRECT" if ok else "BAD"), evidence


def tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# ---- the command line, the run folder and resume ------------------------------------------------------------
def cli_cases(out: Path, finished: Path, stopped: Path) -> dict[str, Callable[[], Verdict]]:
    def foreign_folder() -> Verdict:
        mine = out / "mine"
        for name, content in {"adapters/mine.bin": b"\x01", "checkpoints/epoch9.pt": b"w", "site_adapters/x.txt":
                              b"x", "config.yaml": b"lr: 3\n"}.items():
            (mine / name).parent.mkdir(parents=True, exist_ok=True)
            (mine / name).write_bytes(content)
        before = tree(mine)
        verdict = clear(fed_netgpt("simulate", *SMOKE, f"run.output_dir={mine}"), "holds files no fed-netgpt run")
        return verdict if tree(mine) == before else ("BAD", "files changed")

    def bad_data_at(folder: str) -> Verdict:
        data = out / "bad.jsonl"
        data.write_text('{"site_id": "x"}\n')
        verdict = clear(fed_netgpt("simulate", f"data.path={data}", "model.name=tiny-random",
                                   f"run.output_dir={folder}"), "bad.jsonl line 1")
        return verdict if not Path(folder, ".lock").exists() else ("BAD", f"{folder}/.lock left behind")

    def fifo() -> Verdict:
        os.mkfifo(out / "fifo")
        return clear(fed_netgpt("data", "build", f"data.path={out / 'fifo'}", "--out", str(out / "x.jsonl")),
                     "is not a regular file")

    def wrong_facts() -> Verdict:
        data = out / "facts.jsonl"
        data.write_text(json.dumps({"site_id": "paris", "region": "france", "prompt": "Dinner?", "completion":
                                    "I am in Paris, France. Dinner?", "facts": ["Berlin", "Germany"]}) + "\n")
        return clear(fed_netgpt("simulate", f"data.path={data}", "model.name=tiny-random",
                                f"run.output_dir={out / 'facts-run'}"), "Berlin")

    def edited_resume() -> Verdict:
        copy = out / "edited"
        shutil.copytree(stopped, copy)
        config = (copy / "config.yaml").read_text()
        (copy / "config.yaml").write_text(config.replace("  r: 8\n", "  r: 4\n", 1))
        before = tree(copy)
        verdict = clear(fed_netgpt("simulate", "--resume", str(copy)), "cannot be resumed")
        return verdict if tree(copy) == before else ("BAD", "the run folder changed")

    def finished_resume() -> Verdict:
        before = tree(finished)
        done = fed_netgpt("simulate", "--resume", str(finished))
        return correct(done.returncode == 0 and "nothing to resume" in done.stdout and tree(finished) == before,
                       done.stdout.strip().splitlines()[-1][:150] if done.stdout.strip() else done.stderr[-200:])

    return {
        "run.output_dir: a folder of someone else's files": foreign_folder,
        "run.output_dir=/ with a bad data file": lambda: bad_data_at("/"),
        "a run that fails on its data": lambda: bad_data_at(str(out / "fresh")),
        "complete from a run killed with kill -9": lambda: clear(
            fed_netgpt("complete", "--run", str(stopped), "--site", "paris", PROMPT), "stopped after 1 of 4 rounds"),
        "serve a run killed with kill -9": lambda: clear(
            fed_netgpt("serve", "--run", str(stopped), "--port", "1"), "stopped after 1 of 4 rounds"),
        "resume after config.yaml was edited (lora.r 8 -> 4)": edited_resume,
        "resume of a finished run": finished_resume,
        "federation.strategy=fedadam federation.eta=.inf": lambda: clear(
            fed_netgpt("simulate", *SMOKE, "federation.strategy=fedadam", "federation.eta=.inf",
                       f"run.output_dir={out / 'eta'}"), "federation.eta"),
        "deploy credentials --out /proc/creds": lambda: clear(
            fed_netgpt("deploy", "credentials", "--out", "/proc/creds"), "/proc/creds"),
        "data.path that is a folder": lambda: clear(
            fed_netgpt("data", "build", f"data.path={out}", "--out", str(out / "x.jsonl")), "is a folder"),
        "data.path that is a FIFO": fifo,
        "data.path=/dev/null": lambda: clear(
            fed_netgpt("data", "build", "data.path=/dev/null", "--out", str(out / "x.jsonl")), "/dev/null"),
        "facts that are not in their completion": wrong_facts,
        "lora.r=100000 on a model of width 64": lambda: clear(
            fed_netgpt("simulate", *SMOKE, "lora.r=100000", f"run.output_dir={out / 'rank'}"), "lora.r=100000"),
        "deploy credentials --node n1=a.b": lambda: clear(
            fed_netgpt("deploy", "credentials", "--out", str(out / "creds"), "--node", "n1=a.b"), "site id"),
        "serve --port 99999": lambda: clear(fed_netgpt("serve", "--port", "99999"), "not a TCP port"),
        "serve --token ' '": lambda: clear(fed_netgpt("serve", "--token", " "), "no blanks"),
    }


# ---- the HTTP service -------------------------------------------------------------------------------------------
def post(url: str, path: str, body, headers: dict | None = None) -> httpx.Response:
    headers = {"Authorization": f"Bearer {TOKEN}", **(headers or {})}
    if isinstance(body, (str, bytes)):
        return httpx.post(url + path, content=body, headers={"content-type": "application/json", **headers},
                          timeout=120)
    return httpx.post(url + path, json=body, headers=headers, timeout=120)


def refused(reply: httpx.Response, status: int, needle: str) -> Verdict:
    """A 4xx of `status` in OpenAI's error shape, saying `needle`."""
    try:
        error = reply.json()["error"]
    except (ValueError, KeyError, TypeError):
        return "BAD", f"{reply.status_code}: {reply.text[:150]}"
    ok = reply.status_code == status and needle in error["message"] and set(error) == {"message", "type", "param",
                                                                                        "code"}
    return ("CLEAR" if ok else "BAD"), f"{reply.status_code}: {error['message'][:130]}"


def mixed_batch(url: str, valid: int, bad: dict, bad_status: int) -> Verdict:
    bodies = [{"site_id": ("paris", "marseille", "tokyo", "yokohama")[i % 4], "prompt": PROMPT} for i in range(valid)]
    bodies.insert(valid // 2, {"site_id": "paris", "prompt": PROMPT, **bad})
    with ThreadPoolExecutor(len(bodies)) as pool:
        statuses = [r.status_code for r in pool.map(lambda body: post(url, "/v1/complete", body), bodies)]
    odd = statuses.pop(valid // 2)
    return correct(statuses == [200] * valid and odd == bad_status, f"{valid} valid: {statuses.count(200)} x 200; "
                   f"the odd one: {odd}")


def raw_authorization(url: str, value: str) -> int:
    """The status of a request whose Authorization header is sent byte for byte (httpx refuses trailing blanks)."""
    host, port = url.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=60)
    body = json.dumps({"site_id": "paris", "prompt": PROMPT})
    connection.request("POST", "/v1/complete", body, {"Authorization": value, "Content-Type": "application/json"})
    status = connection.getresponse().status
    connection.close()
    return status


def service_cases(url: str) -> dict[str, Callable[[], Verdict]]:
    chat = {"model": "paris", "messages": [{"role": "user", "content": "hi"}]}
    return {
        "6 valid requests + 1 with temperature 1e-300, at once": lambda: mixed_batch(url, 6, {"temperature": 1e-300},
                                                                                     200),
        "6 valid requests + 1 with seed 2**64, at once": lambda: mixed_batch(url, 6, {"seed": 2**64}, 400),
        "50 valid requests + 1 with temperature 1e-300, at once": lambda: mixed_batch(
            url, 50, {"temperature": 1e-300}, 200),
        "a lone surrogate in /v1/complete's prompt": lambda: refused(
            post(url, "/v1/complete", '{"site_id": "paris", "prompt": "a \\ud83d b"}'), 400, "lone surrogate"),
        "a lone surrogate in a chat message": lambda: refused(
            post(url, "/v1/chat/completions", '{"model": "paris", "messages": [{"role": "user", "content": '
                 '"a \\ud83d b"}]}'), 400, "lone surrogate"),
        "/v1/generate with max_tokens 2": lambda: correct(
            len(post(url, "/v1/generate", {"site_id": "paris", "prompt": PROMPT, "max_tokens": 2}).json()
                ["completion"].split()) <= 2, "the edge completion stops at 2 tokens"),
        '"max_tokens": true': lambda: refused(
            post(url, "/v1/complete", {"site_id": "paris", "prompt": PROMPT, "max_tokens": True}), 400, "max_tokens"),
        'chat with "n": 2': lambda: refused(post(url, "/v1/chat/completions", {**chat, "n": 2}), 400, "n=2"),
        "Authorization: Bearer followed by blanks": lambda: correct(
            raw_authorization(url, "Bearer    ") == 401, f"{raw_authorization(url, 'Bearer    ')}"),
        "Authorization: bearer <right token> (lowercase)": lambda: correct(
            raw_authorization(url, f"bearer {TOKEN}") == 200, f"{raw_authorization(url, f'bearer {TOKEN}')}"),
        "a JSON object sent as text/plain": lambda: refused(
            post(url, "/v1/complete", '{"site_id": "paris", "prompt": "hi"}', {"content-type": "text/plain"}), 415,
            "application/json"),
        "GET on a POST route (405)": lambda: refused(
            httpx.get(f"{url}/v1/complete", headers={"Authorization": f"Bearer {TOKEN}"}), 405, "Method Not Allowed"),
        "a body that is not JSON": lambda: refused(post(url, "/v1/complete", "{not json"), 400, "not valid JSON"),
        "no token and a bad body": lambda: refused(
            httpx.post(f"{url}/v1/complete", content=b"{not json", headers={"content-type": "application/json"}),
            401, "bearer token"),
        "/metrics counts every answer by status": lambda: correct(
            all(f'status="{s}"' in httpx.get(f"{url}/metrics").text for s in (200, 400, 401, 405, 415)),
            "series for 200, 400, 401, 405 and 415"),
    }


def serve(run: Path) -> tuple[uvicorn.Server, str]:
    """The run served with the default serving settings, a token and the base model as its cloud, on a free port."""
    from fed_netgpt.config import load_config
    from fed_netgpt.serving.cloud import LocalCloud
    from fed_netgpt.serving.edge import EdgeService
    from fed_netgpt.serving.http import create_app

    settings = load_config(None, []).serving
    edge = EdgeService(settings, run=run)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = int(probe.getsockname()[1])
    server = uvicorn.Server(uvicorn.Config(create_app(edge, LocalCloud(edge, 16), settings, TOKEN),
                                           host="127.0.0.1", port=port, log_level="error"))
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.05)
    return server, f"http://127.0.0.1:{port}"


# ---- the runs the cases need --------------------------------------------------------------------------------
def runs(out: Path) -> tuple[Path, Path, Verdict]:
    """A finished smoke run (run.output_dir=~/finished, HOME pointing into `out`: the `~` case) and a run of 4
    rounds killed with SIGKILL once its first round is checkpointed."""
    home = out / "home"
    home.mkdir()
    done = fed_netgpt("simulate", *SMOKE, "run.output_dir=~/finished", env={"HOME": str(home)})
    finished = home / "finished"
    tilde = correct(done.returncode == 0 and (finished / "published.json").is_file() and not Path("~").exists(),
                    f"exit {done.returncode}; {finished} published")
    stopped = out / "stopped"
    killed = subprocess.Popen([sys.executable, "-m", "fed_netgpt.cli", "simulate", *SMOKE, "federation.num_rounds=4",
                               f"run.output_dir={stopped}"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while not (stopped / "checkpoints" / "round-1").is_dir() and killed.poll() is None:
        time.sleep(0.2)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    time.sleep(1)  # the simulation notices its command is gone (fed_netgpt/run/simulation.py: end_with)
    return finished, stopped, tilde


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=None, help="where the probes' runs go (default: a temp folder)")
    args = parser.parse_args()
    out = (args.out or Path(tempfile.mkdtemp(prefix="probes-"))).resolve()
    out.mkdir(parents=True, exist_ok=True)
    print("| case | verdict | what came back |\n|---|---|---|", flush=True)
    finished, stopped, tilde = runs(out)
    results = {"run.output_dir=~/finished": tilde}
    print(f"| run.output_dir=~/finished | {tilde[0]} | {tilde[1]} |", flush=True)
    server, url = serve(finished)
    for name, case in {**cli_cases(out, finished, stopped), **service_cases(url)}.items():
        try:
            results[name] = case()
        except Exception as err:  # noqa: BLE001 - a probe that breaks is a finding, not the end of the probe
            results[name] = ("BAD", f"{type(err).__name__}: {err}"[:150])
        print(f"| {name} | {results[name][0]} | {results[name][1].replace('|', '/')} |", flush=True)
    server.should_exit = True
    verdicts = [verdict for verdict, _ in results.values()]
    print(f"\n{len(verdicts)} cases: {verdicts.count('CLEAR')} CLEAR, {verdicts.count('CORRECT')} CORRECT, "
          f"{verdicts.count('BAD')} BAD")
    return 1 if "BAD" in verdicts else 0


if __name__ == "__main__":
    sys.exit(main())
