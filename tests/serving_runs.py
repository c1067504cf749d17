"""Serving test helpers: run folders written without a federation (random regional and site adapters on the tiny
model, published the way a finished run publishes them), and FastAPI apps on real uvicorn servers."""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path

import numpy as np
import uvicorn

from fed_netgpt.config import Config, load_config
from fed_netgpt.model.adapters import AdapterState, attach_adapter, get_state, publish_adapter
from fed_netgpt.model.base import BaseModel
from fed_netgpt.run.folder import save_adapters, site_adapter_dir, start_run


def serving_config(folder: Path) -> Config:
    return load_config(overrides=["preset=smoke", f"run.output_dir={folder}"])


def random_state(base: BaseModel, config: Config, seed: int, scale: float = 0.5) -> AdapterState:
    """An adapter whose A and B are both random (a fresh one has B = 0 and changes nothing)."""
    like = get_state(attach_adapter(base, "serving-shape", config.lora), "serving-shape")
    rng = np.random.default_rng(seed)
    return {key: (scale * rng.standard_normal(value.shape)).astype(np.float32) for key, value in like.items()}


def write_run(folder: Path, base: BaseModel, seed: int = 0, site_adapters: tuple[str, ...] = ("paris",)) -> Config:
    """A finished run of conf/smoke.yaml (France and Japan, 2 sites each) with random adapters: one a region, and
    a personal one for each of `site_adapters`."""
    config = serving_config(folder)
    start_run(config)
    model = attach_adapter(base, "serving-export", config.lora)
    for k, site in enumerate(site_adapters):
        publish_adapter(model, "serving-export", site_adapter_dir(folder, site),
                        state=random_state(base, config, seed * 100 + 50 + k))
    save_adapters(folder, base, config, {region: random_state(base, config, seed * 100 + k)
                                         for k, region in enumerate(("france", "japan"))})
    return config


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Served:
    """A FastAPI app on a real uvicorn server in a thread, on a free 127.0.0.1 port."""

    def __init__(self, app) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started:
            assert time.time() < deadline, "uvicorn did not start"
            time.sleep(0.02)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
