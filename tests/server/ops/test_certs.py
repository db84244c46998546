"""``smm certs``: the files load the way Flower 1.42 loads them, the server certificate verifies
against the CA and names the hosts, private keys are 0600, nothing is overwritten silently."""

from __future__ import annotations

import ipaddress
import stat

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_ssh_private_key, load_ssh_public_key
from cryptography.x509.verification import PolicyBuilder, Store

from server.ops.certs import main, parse_hosts, write_credentials


@pytest.fixture(scope="module")
def creds(tmp_path_factory):
    out = tmp_path_factory.mktemp("certs") / "creds"
    return write_credentials(out, n_supernodes=2, hosts="localhost,127.0.0.1,link.example.org,::1", days=30)


def test_files_and_modes(creds):
    names = sorted(p.name for p in creds.out.iterdir())
    assert names == ["ca.crt", "ca.key", "server.key", "server.pem", "supernode-1", "supernode-1.pub",
                     "supernode-2", "supernode-2.pub"]
    for p in (creds.ca_key, creds.server_key, creds.supernode_key(1), creds.supernode_key(2)):
        assert stat.S_IMODE(p.stat().st_mode) == 0o600, p
    assert stat.S_IMODE(creds.ca_crt.stat().st_mode) == 0o644


def test_server_certificate_verifies_against_the_ca_with_sans(creds):
    ca = x509.load_pem_x509_certificate(creds.ca_crt.read_bytes())
    server = x509.load_pem_x509_certificate(creds.server_pem.read_bytes())
    sans = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert set(sans.get_values_for_type(x509.DNSName)) == {"localhost", "link.example.org"}
    assert set(sans.get_values_for_type(x509.IPAddress)) == {ipaddress.ip_address("127.0.0.1"),
                                                            ipaddress.ip_address("::1")}
    store = Store([ca])
    for subject in (x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                    x509.DNSName("link.example.org")):
        chain = PolicyBuilder().store(store).build_server_verifier(subject).verify(server, [])
        assert chain[-1] == ca
    with pytest.raises(Exception):
        PolicyBuilder().store(store).build_server_verifier(x509.DNSName("other.example.org")).verify(server, [])
    # the server key matches the certificate; the CA is a CA, the server certificate is not
    key = serialization.load_pem_private_key(creds.server_key.read_bytes(), None)
    assert key.public_key() == server.public_key()
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert not server.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    serialization.load_pem_private_key(creds.ca_key.read_bytes(), None)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # typer/click, imported with flwr
def test_supernode_keys_load_as_flower_loads_them(creds):
    # flower_supernode._try_setup_client_authentication / cli.supernode.register.try_load_public_key
    from flwr.supercore.primitives.asymmetric import uses_nist_ec_curve

    for k in (1, 2):
        priv = load_ssh_private_key(creds.supernode_key(k).read_bytes(), None)
        pub = load_ssh_public_key(creds.supernode_pub(k).read_bytes())
        assert isinstance(priv, ec.EllipticCurvePrivateKey) and isinstance(pub, ec.EllipticCurvePublicKey)
        assert isinstance(priv.curve, ec.SECP384R1) and uses_nist_ec_curve(pub)
        assert priv.public_key() == pub
        assert creds.supernode_key(k).read_bytes().startswith(b"-----BEGIN OPENSSH PRIVATE KEY-----")
        assert creds.supernode_pub(k).read_text().startswith("ecdsa-sha2-nistp384 ")
    assert creds.supernode_pub(1).read_bytes() != creds.supernode_pub(2).read_bytes()


def test_refuses_to_overwrite_without_force(tmp_path, capsys):
    out = tmp_path / "c"
    assert main(["--out", str(out), "--supernodes", "1"]) == 0
    printed = capsys.readouterr().out
    assert "--enable-supernode-auth" in printed and "flwr supernode register" in printed
    assert "--auth-supernode-private-key" in printed and f'root-certificates = "{out.resolve()}/ca.crt"' in printed
    before = (out / "ca.crt").read_bytes()
    assert main(["--out", str(out), "--supernodes", "1"]) == 2
    assert "--force" in capsys.readouterr().err
    assert (out / "ca.crt").read_bytes() == before
    # one existing file blocks everything, even with more supernodes asked for
    assert main(["--out", str(out), "--supernodes", "2"]) == 2
    assert not (out / "supernode-2").exists()
    assert main(["--out", str(out), "--supernodes", "2", "--force"]) == 0
    assert (out / "ca.crt").read_bytes() != before and (out / "supernode-2").exists()


def test_bad_arguments(tmp_path, capsys):
    with pytest.raises(ValueError):
        parse_hosts(" , ")
    with pytest.raises(ValueError):
        parse_hosts("http://x")
    assert main(["--out", str(tmp_path / "x"), "--days", "0"]) == 2
    assert main(["--out", str(tmp_path / "x"), "--supernodes", "-1"]) == 2
    assert not (tmp_path / "x").exists()


def test_registered_as_smm_command():
    from smm_model.cli import COMMANDS

    assert COMMANDS["certs"][0] == "server.ops.certs:main"
