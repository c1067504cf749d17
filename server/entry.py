"""The ServerApp Flower loads for `fed-netgpt simulate`: light to import; the federation is imported when it runs.

Flower's simulation process imports the ServerApp (on its own thread) and the ClientApp (to check that it loads)
at the same time, and starts Ray only after both: the federation's modules (torch, transformers, peft, the
project) imported there held Ray back for ~6 s of a 2-core machine's time. Deferred, they are imported while Ray
and its workers start.
"""

from __future__ import annotations

import importlib

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp


class DeferredServerApp(ServerApp):
    """Runs the ServerApp at `target` ("module:attribute"), importing its module when it is first run."""

    def __init__(self, target: str) -> None:
        super().__init__()
        self.target = target

    def __call__(self, grid: Grid, context: Context) -> None:
        module, name = self.target.split(":")
        getattr(importlib.import_module(module), name)(grid, context)


simulation_app = DeferredServerApp("server.app:simulation_app")
