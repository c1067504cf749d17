"""Deployment credentials: real certificates and keys, checked the way TLS clients and Flower read them."""

from __future__ import annotations

import ipaddress
import ssl
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_ssh_private_key, load_ssh_public_key
from flwr.supercore.primitives.asymmetric import public_key_to_bytes, uses_nist_ec_curve

from fed_netgpt.cli import main
from fed_netgpt.run.deployment import (
    CredentialsError,
    NodeSpec,
    deployment_commands,
    parse_node,
    render_commands,
    write_credentials,
)

NODES = [NodeSpec("paris", ("paris",)), NodeSpec("japan-edge", ("tokyo", "yokohama"))]


@pytest.fixture(scope="module")
def credentials(tmp_path_factory: pytest.TempPathFactory):
    return write_credentials(tmp_path_factory.mktemp("deploy") / "credentials", ["edge.example.org", "10.0.0.5"],
                             NODES)


def test_superlink_certificate_verifies_against_the_ca_for_every_name(credentials) -> None:
    ca = x509.load_pem_x509_certificate(credentials.ca_cert.read_bytes())
    cert = x509.load_pem_x509_certificate(credentials.superlink_cert.read_bytes())
    cert.verify_directly_issued_by(ca)  # raises if the CA did not sign it
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert names.get_values_for_type(x509.DNSName) == ["localhost", "edge.example.org"]
    assert names.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address(a) for a in ("127.0.0.1", "::1",
                                                                                            "10.0.0.5")]
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    # what the SuperLink (uvicorn) and its clients (httpx) do with these files
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(credentials.superlink_cert, credentials.superlink_key)
    ssl.create_default_context(cafile=str(credentials.ca_cert))


def test_node_keys_load_as_flower_loads_them(credentials) -> None:
    for node in NODES:
        private_path, public_path = credentials.node_keys[node.name]
        private = load_ssh_private_key(private_path.read_bytes(), None)  # flower-supernode --auth-supernode-...
        public = load_ssh_public_key(public_path.read_bytes())  # flwr supernode register
        assert isinstance(private, ec.EllipticCurvePrivateKey) and isinstance(public, ec.EllipticCurvePublicKey)
        assert uses_nist_ec_curve(public)
        assert public_key_to_bytes(private.public_key()) == public_key_to_bytes(public)  # the key the node signs with


def test_private_keys_are_readable_by_their_owner_only(credentials) -> None:
    private = [credentials.folder / "ca.key", credentials.superlink_key,
               *(keys[0] for keys in credentials.node_keys.values())]
    for path in private:
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    assert stat.S_IMODE(credentials.folder.stat().st_mode) == 0o700


def test_an_existing_folder_is_refused_and_left_as_it_was(credentials, tmp_path: Path) -> None:
    before = {p: p.read_bytes() for p in credentials.folder.rglob("*") if p.is_file()}
    with pytest.raises(CredentialsError, match="already exists"):
        write_credentials(credentials.folder, [], NODES)
    assert {p: p.read_bytes() for p in credentials.folder.rglob("*") if p.is_file()} == before
    (tmp_path / "empty").mkdir()
    assert write_credentials(tmp_path / "empty", [], []).folder == (tmp_path / "empty").resolve()


def test_commands_are_secured_unless_insecure_is_asked(credentials) -> None:
    secured = render_commands(deployment_commands(credentials, "edge.example.org:9000", NODES))
    assert "--insecure" not in secured and "insecure" not in secured
    for flag in ("--ssl-ca-certfile", "--ssl-certfile", "--ssl-keyfile", "--enable-supernode-auth",
                 "--disable-runtime-dependency-installation", "--root-certificates", "--auth-supernode-private-key"):
        assert flag in secured
    assert f"flwr supernode register {credentials.node_keys['paris'][1]} edge --name paris" in secured
    assert "--node-config \"site-ids='tokyo,yokohama'\"" in secured
    assert f"root-certificates = '{credentials.ca_cert}'" in secured
    assert "flwr run . edge --stream" in secured
    lab = render_commands(deployment_commands(None, "127.0.0.1:9000", NODES))
    assert "--insecure" in lab and "LAB ONLY" in lab and "supernode register" not in lab and "--ssl" not in lab


def test_cli_writes_credentials_and_prints_the_commands(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["deploy", "credentials", "--out", str(tmp_path / "c"), "--host", "edge.example.org",
                 "--node", "paris=paris", "--node", "spare"])
    printed = capsys.readouterr().out
    assert code == 0 and (tmp_path / "c" / "nodes" / "spare.pub").is_file()
    assert "--superlink edge.example.org:8000" in printed and "site-id='<site id>'" in printed
    assert "--insecure" not in printed


@pytest.mark.parametrize(("args", "message"), [
    (["--out", "{existing}"], "already exists and is not an empty folder"),
    (["--out", "{new}", "--node", "bad name"], "--node 'bad name': the name must be"),
    (["--out", "{new}", "--node", "a", "--node", "a"], "--node 'a' is given twice"),
    (["--out", "{new}", "--superlink-address", "edge.example.org"], "expected HOST:PORT"),
    (["--out", "{new}", "--superlink-address", "0.0.0.0:8000"], "not an address nodes can reach"),
    (["--out", "{new}", "--host", "bad_host!"], "not an IP address or a DNS name"),
    (["--insecure", "--out", "{new}"], "--insecure writes no credentials"),
    ([], "--out DIR is required"),
])
def test_bad_input_is_one_error_line_and_exit_2(args: list[str], message: str, tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "existing").mkdir()
    (tmp_path / "existing" / "ca.key").write_text("keep me")
    filled = [a.format(existing=tmp_path / "existing", new=tmp_path / "new") for a in args]
    assert main(["deploy", "credentials", *filled]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1
    assert not (tmp_path / "new").exists() and (tmp_path / "existing" / "ca.key").read_text() == "keep me"


def test_node_specs() -> None:
    assert parse_node("japan-edge=tokyo, yokohama") == NodeSpec("japan-edge", ("tokyo", "yokohama"))
    assert parse_node("spare") == NodeSpec("spare")
    for bad in ("", "-x", "a/b", "x=", "x=a b"):
        with pytest.raises(CredentialsError):
            parse_node(bad)
