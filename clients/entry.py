"""The ClientApp Flower loads for `fed-netgpt simulate`: light to import; the site's handlers are imported with the
first message, in the process that handles it (a Ray worker).

Flower's simulation process loads the ClientApp only to check that it can, at the same time as the ServerApp and
before it starts Ray: the handlers' modules (torch, transformers, peft, the project) imported there held Ray back.
"""

from __future__ import annotations

import importlib

from flwr.app import Context, Message
from flwr.clientapp import ClientApp


class DeferredClientApp(ClientApp):
    """Hands each message to the ClientApp at `target` ("module:attribute"), imported with the first one."""

    def __init__(self, target: str) -> None:
        super().__init__()
        self.target = target

    def __call__(self, message: Message, context: Context) -> Message:
        module, name = self.target.split(":")
        return getattr(importlib.import_module(module), name)(message, context)


app = DeferredClientApp("clients.app:app")
