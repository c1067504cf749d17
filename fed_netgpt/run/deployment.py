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

from fed_netgpt.data.schema import ID_PATTERN

LOOPBACK_NAMES = ("127.0.0.1", "localhost", "::1")  # in every SuperLink certificate: SuperExec dials 127.0.0.1
DEFAULT_PORT = 8000  # flower-superlink's own default HTTP port
CONNECTION = "edge"  # the [superlink.<name>] connection `flwr` uses
LAB_CONNECTION = "lab"
CA_DAYS, SERVER_DAYS = 3650, 825  # 825 days: the longest server certificate some TLS clients accept
CURVE = ec.SECP384R1  # Flower's documented node key (ssh-keygen -t ecdsa -b 384); any NIST curve is accepted
_NODE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,62}$")
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
    name, equals, sites_text = text.partition("=")
    if not _NODE_NAME.match(name):
        raise CredentialsError(f"--node {text!r}: the name must be letters, digits, '-' or '_' (at most 63, "
                               "starting with a letter or digit): it names the node's key files")
    sites = tuple(part.strip() for part in sites_text.split(",") if part.strip())
    bad = [site for site in sites if not ID_PATTERN.fullmatch(site)]
    if bad or (equals and not sites):
        raise CredentialsError(f"--node {text!r}: site ids are letters, digits, '-' or '_' (the data contract's "
                               "site_id), comma-separated")
    return NodeSpec(name, sites)


def parse_address(text: str) -> tuple[str, int]:
    """`HOST:PORT` (an IPv6 host in brackets) -> (host, port)."""
    host, sep, port = text.rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise CredentialsError(f"--superlink-address {text!r}: expected HOST:PORT with a port from 1 to 65535")
    host = check_host(host, "--superlink-address")
    if host in ("0.0.0.0", "::"):
        raise CredentialsError(f"--superlink-address {text!r}: {host} is where a server listens, not an address "
                               "nodes can reach; give the server's name or IP address")
    return host, int(port)


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


def subject_alt_names(hosts: list[str]) -> list[str]:
    """The loopback names (SuperExec reaches the SuperLink on 127.0.0.1) and then `hosts`, each once."""
    names: list[str] = []
    for host in [*LOOPBACK_NAMES, *hosts]:
        checked = check_host(host)
        if checked not in names:
            names.append(checked)
    return names


def write_credentials(folder: Path, hosts: list[str], nodes: list[NodeSpec]) -> Credentials:
    """The CA, the SuperLink's certificate (valid for `hosts` and the loopback names) and a key pair per node,
    written into `folder`, which must be new or empty. Everything is checked before anything is written."""
    names = subject_alt_names(hosts)
    duplicates = sorted({node.name for node in nodes if [n.name for n in nodes].count(node.name) > 1})
    if duplicates:
        raise CredentialsError(f"--node {duplicates[0]!r} is given twice: each node needs a key of its own")
    folder = _fresh_folder(Path(folder))
    ca_key = ec.generate_private_key(CURVE())
    ca_cert = _ca_certificate(ca_key)
    _write(folder / "ca.key", _pem_private_key(ca_key), private=True)
    _write(folder / "ca.crt", ca_cert.public_bytes(serialization.Encoding.PEM))
    server_key = ec.generate_private_key(CURVE())
    server_cert = _superlink_certificate(server_key, ca_key, ca_cert, names)
    _write(folder / "superlink.key", _pem_private_key(server_key), private=True)
    _write(folder / "superlink.crt", server_cert.public_bytes(serialization.Encoding.PEM))
    (folder / "nodes").mkdir(mode=0o700)
    node_keys = {node.name: _write_node_keys(folder / "nodes", node.name) for node in nodes}
    return Credentials(folder, folder / "ca.crt", folder / "superlink.crt", folder / "superlink.key", node_keys)


def _fresh_folder(folder: Path) -> Path:
    """`folder`, created (0700: it holds the CA's key) unless it exists empty; never one with files in it."""
    if folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
        raise CredentialsError(f"--out {folder}: already exists and is not an empty folder; credentials are never "
                               "overwritten (choose a new folder)")
    try:
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as err:
        raise CredentialsError(f"--out {folder}: cannot create it ({err.strerror})") from None
    return folder.resolve()


def _write(path: Path, data: bytes, private: bool = False) -> None:
    """A new file (O_EXCL: never overwrite), 0600 for a private key from its creation on, else 0644."""
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600 if private else 0o644)
    with os.fdopen(descriptor, "wb") as file:
        file.write(data)


def _pem_private_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _write_node_keys(folder: Path, name: str) -> tuple[Path, Path]:
    """A node's EC key pair in OpenSSH format, as `ssh-keygen -t ecdsa -b 384 -C NAME` would write it."""
    key = ec.generate_private_key(CURVE())
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                serialization.NoEncryption())
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    _write(folder / f"{name}.key", private, private=True)
    _write(folder / f"{name}.pub", public + f" {name}\n".encode())
    return folder / f"{name}.key", folder / f"{name}.pub"


def _validity(days: int) -> tuple[datetime.datetime, datetime.datetime]:
    start = datetime.datetime.now(datetime.UTC) - datetime.timedelta(minutes=5)  # some clock skew
    return start, start + datetime.timedelta(days=days)


def _ca_certificate(key: ec.EllipticCurvePrivateKey) -> x509.Certificate:
    """A self-signed CA that may sign server certificates only (path length 0)."""
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fed-netgpt deployment CA")])
    start, end = _validity(CA_DAYS)
    return (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(start).not_valid_after(end)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                         crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA384()))


def _superlink_certificate(key: ec.EllipticCurvePrivateKey, ca_key: ec.EllipticCurvePrivateKey,
                           ca_cert: x509.Certificate, names: list[str]) -> x509.Certificate:
    """The SuperLink's TLS server certificate, signed by the CA, valid for every one of `names`."""
    alt_names: list[x509.GeneralName] = []
    for name in names:
        try:
            alt_names.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            alt_names.append(x509.DNSName(name))
    start, end = _validity(SERVER_DAYS)
    ca_key_id = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    return (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fed-netgpt SuperLink")]))
            .issuer_name(ca_cert.subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(start).not_valid_after(end)
            .add_extension(x509.SubjectAlternativeName(alt_names), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False, key_cert_sign=False,
                                         crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_key_id), critical=False)
            .sign(ca_key, hashes.SHA384()))


def deployment_commands(credentials: Credentials | None, address: str, nodes: list[NodeSpec], *,
                        database: str = "superlink-state.db") -> Commands:
    """Every command of the deployment at `address` (HOST:PORT, how nodes and `flwr` reach the SuperLink):
    with TLS and node authentication from `credentials`, or (None) the insecure lab commands."""
    host, port = parse_address(address)
    address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    any_address = "::" if ":" in host else "0.0.0.0"  # a loopback address serves this machine alone
    bind = host.replace("localhost", "127.0.0.1") if host in LOOPBACK_NAMES else any_address
    common = ["--disable-runtime-dependency-installation", "--host", bind, "--port", str(port),
              "--database", database]
    if credentials is None:
        return Commands(
            superlink=["flower-superlink", "--insecure", *common],
            config_toml=f'[superlink.{LAB_CONNECTION}]\naddress = "{address}"\ninsecure = true\n',
            register={},
            supernodes={node.name: ["flower-supernode", "--insecure", "--superlink", address,
                                    "--node-config", node_config(node)] for node in nodes},
            run=["flwr", "run", ".", LAB_CONNECTION, "--stream"], insecure=True)
    missing = [node.name for node in nodes if node.name not in credentials.node_keys]
    if missing:
        raise CredentialsError(f"no key for node {missing[0]!r} in {credentials.folder}")
    ca = str(credentials.ca_cert)
    return Commands(
        superlink=["flower-superlink", "--ssl-ca-certfile", ca, "--ssl-certfile", str(credentials.superlink_cert),
                   "--ssl-keyfile", str(credentials.superlink_key), "--enable-supernode-auth", *common],
        config_toml=f'[superlink.{CONNECTION}]\naddress = "{address}"\nroot-certificates = {_toml_string(ca)}\n',
        register={node.name: ["flwr", "supernode", "register", str(credentials.node_keys[node.name][1]), CONNECTION,
                              "--name", node.name] for node in nodes},
        supernodes={node.name: ["flower-supernode", "--superlink", address, "--root-certificates", ca,
                                "--auth-supernode-private-key", str(credentials.node_keys[node.name][0]),
                                "--node-config", node_config(node)] for node in nodes},
        run=["flwr", "run", ".", CONNECTION, "--stream"], insecure=False)


def node_config(node: NodeSpec) -> str:
    """The node's `--node-config`: the site it serves (`site-id`), or its sites (`site-ids`), or a placeholder."""
    if len(node.sites) > 1:
        return f"site-ids='{','.join(node.sites)}'"
    return f"site-id='{node.sites[0] if node.sites else '<site id>'}'"


def _toml_string(text: str) -> str:
    """A TOML literal string when it can be one (paths keep their backslashes), else a basic one."""
    if "'" not in text and "\n" not in text:
        return f"'{text}'"
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def render_commands(commands: Commands) -> str:
    """The commands as a shell walkthrough, each step with one comment line saying where it runs."""
    steps = []
    if commands.insecure:
        steps.append("# LAB ONLY (--insecure): no TLS and no node authentication: anyone who reaches the port joins "
                     "the federation and reads its traffic. Use it on one machine or a closed lab network, never "
                     "outside.\n# 1. the server")
    else:
        steps.append("# 1. the server: TLS on its one port (Fleet, Control and Runtime APIs); nodes cannot register "
                     "themselves")
    steps[0] += f"\n{shell_join(commands.superlink)}"
    steps.append("# 2. where you launch runs: a connection in $FLWR_HOME/config.toml (default ~/.flwr/config.toml)\n"
                 + commands.config_toml.rstrip())
    if commands.register:
        steps.append("# 3. register each node's public key through the SuperLink's Control API\n"
                     + "\n".join(shell_join(argv) for argv in commands.register.values()))
    steps.append(f"# {len(steps) + 1}. on each edge node"
                 + ("" if commands.insecure else ", with ca.crt and its own nodes/NAME.key copied there")
                 + "\n" + "\n".join(shell_join(argv) for argv in commands.supernodes.values()))
    steps.append(f"# {len(steps) + 1}. a run, from the project folder (--run-config \"key=value ...\" changes "
                 f"settings)\n{shell_join(commands.run)}")
    return "\n".join(steps)


def shell_join(argv: list[str]) -> str:
    """`shlex.join`, but a word holding single quotes and nothing a shell expands inside double quotes is
    double-quoted: `--node-config "site-id='paris'"`, as Flower's documentation writes it."""
    return " ".join(f'"{word}"' if "'" in word and not re.search(r'["$`\\!]', word) else shlex.quote(word)
                    for word in argv)
