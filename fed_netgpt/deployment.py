"""Credentials for a deployed federation, and the exact commands that use them (Flower 1.42).

The idea: one folder, made once on a trusted machine, holds everything a secured deployment needs, and one
function prints the commands that use it. A private CA (`ca.key`, `ca.crt`) signs the SuperLink's certificate
(`superlink.crt`, `superlink.key`, with a subjectAltName for every name or address nodes use to reach it);
SuperNodes (`--root-certificates`) and the `flwr` CLI (`root-certificates` in `$FLWR_HOME/config.toml`) trust
that CA alone, so traffic is TLS on the SuperLink's one HTTP port (Fleet, Control and Runtime APIs). Each node
gets an EC P-384 key pair in OpenSSH format (`nodes/<name>.key`, `nodes/<name>.pub`: what `ssh-keygen -t ecdsa
-b 384` writes): `flower-supernode --auth-supernode-private-key` loads the private key, `flwr supernode register`
takes the public one. A SuperLink started with `--enable-supernode-auth` lets no node register itself: only a
node whose public key was registered through the Control API can activate, and it signs every Fleet request.

Private keys are written 0600 and nothing is ever overwritten: an existing non-empty folder is refused.
`--insecure` commands (plain HTTP, any node may join) exist for a lab on one machine only.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import re
import shlex
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

LOOPBACK_NAMES = ("127.0.0.1", "localhost", "::1")  # in every SuperLink certificate: SuperExec dials 127.0.0.1
DEFAULT_PORT = 8000  # flower-superlink's own default HTTP port
CONNECTION = "edge"  # the [superlink.<name>] connection `flwr` uses
LAB_CONNECTION = "lab"
CA_DAYS, SERVER_DAYS = 3650, 825  # 825 days: the longest server certificate some TLS clients accept
CURVE = ec.SECP384R1  # Flower's documented node key (ssh-keygen -t ecdsa -b 384); any NIST curve is accepted
_NODE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,62}$")
_SITE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_DNS_LABEL = re.compile(r"^(?!-)[A-Za-z0-9-]{1,63}(?<!-)$")


class CredentialsError(ValueError):
    """Bad input for credentials or commands: the CLI prints it as one `error:` line."""


@dataclass(frozen=True)
class NodeSpec:
    """A SuperNode: its key's name and, when given, the sites it serves (else a placeholder is printed)."""

    name: str
    sites: tuple[str, ...] = ()


@dataclass(frozen=True)
class Credentials:
    """Where write_credentials put each file."""

    folder: Path
    ca_cert: Path
    superlink_cert: Path
    superlink_key: Path
    node_keys: dict[str, tuple[Path, Path]]  # name -> (private key, public key)


@dataclass(frozen=True)
class Commands:
    """The deployment, step by step: each command an argv (run it, or print it with `render_commands`)."""

    superlink: list[str]
    config_toml: str  # the connection block for $FLWR_HOME/config.toml
    register: dict[str, list[str]]  # node name -> `flwr supernode register ...` (empty when insecure)
    supernodes: dict[str, list[str]]
    run: list[str]
    insecure: bool


def parse_node(text: str) -> NodeSpec:
    """`NAME` or `NAME=SITE[,SITE...]` (one edge server may serve several sites)."""
    name, _, sites_text = text.partition("=")
    if not _NODE_NAME.match(name):
        raise CredentialsError(f"--node {text!r}: the name must be letters, digits, '-' or '_' (at most 63, "
                               "starting with a letter or digit): it names the node's key files")
    sites = tuple(part.strip() for part in sites_text.split(",") if part.strip())
    bad = [site for site in sites if not _SITE_ID.match(site)]
    if bad or (sites_text and not sites):
        raise CredentialsError(f"--node {text!r}: site ids are letters, digits, '.', '-' or '_', comma-separated")
    return NodeSpec(name, sites)


def parse_address(text: str) -> tuple[str, int]:
    """`HOST:PORT` (an IPv6 host in brackets) -> (host, port)."""
    host, sep, port = text.rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise CredentialsError(f"--superlink-address {text!r}: expected HOST:PORT with a port from 1 to 65535")
    return check_host(host, "--superlink-address"), int(port)


def check_host(host: str, flag: str = "--host") -> str:
    """An IP address or a DNS name (what a certificate's subjectAltName can carry)."""
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        pass
    labels = host.rstrip(".").split(".")
    if not host or len(host) > 253 or not all(_DNS_LABEL.match(label) for label in labels):
        raise CredentialsError(f"{flag} {host!r}: not an IP address or a DNS name")
    return host.rstrip(".").lower()
