"""A Grid test double's base: the transport methods strategies and the site grid never call."""

from __future__ import annotations

from flwr.serverapp import Grid


class UnusedTransportGrid(Grid):
    """Implements Grid's abstract methods that configure_* and SiteGrid do not use, by raising."""

    def set_run(self, run) -> None:
        raise NotImplementedError

    @property
    def run(self):
        raise NotImplementedError

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None):
        raise NotImplementedError

    def push_messages(self, messages):
        raise NotImplementedError

    def pull_messages(self, message_ids):
        raise NotImplementedError

    def send_and_receive(self, messages, *, timeout=None):
        raise NotImplementedError
