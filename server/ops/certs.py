"""``smm certs --out DIR``: the credentials of a small Flower deployment with TLS and SuperNode
authentication, made with the ``cryptography`` package (no ``openssl``/``ssh-keygen`` needed).

Written into ``DIR``:

``ca.crt`` / ``ca.key``
    a self-signed certificate authority (ECDSA P-384). ``ca.crt`` goes to every SuperNode
    (``--root-certificates``) and to every ``flwr`` CLI connection (``root-certificates``);
    ``ca.key`` stays with the coordinator, offline if possible.
``server.pem`` / ``server.key``
    the SuperLink's TLS certificate, signed by the CA, with a subjectAltName for every name and IP
    of ``--hosts`` (the addresses SuperNodes and the CLI dial; gRPC/HTTPS check them):
    ``flower-superlink --ssl-ca-certfile ca.crt --ssl-certfile server.pem --ssl-keyfile server.key``.
``supernode-K`` / ``supernode-K.pub`` (K = 1..N)
    SuperNode authentication key pairs as Flower 1.42 loads them: an ECDSA key on a NIST curve
    (SECP384R1, like ``ssh-keygen -t ecdsa -b 384``), the private key in OpenSSH format
    (``flower-supernode --auth-supernode-private-key`` reads it with
    ``cryptography``'s ``load_ssh_private_key``), the public key as one OpenSSH line
    (``flwr supernode register`` reads it with ``load_ssh_public_key``). The private key goes to
    site K only; the coordinator registers the ``.pub``.

Private keys are created with mode 0600. Nothing is overwritten without ``--force`` (checked for
every file before anything is written).
"""

from __future__ import annotations

import argparse
import datetime as dt
import ipaddress
import os
import sys
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from server.ops.simulate import APP_DIR, FLOWER_ENV

__all__ = ["CertFiles", "parse_hosts", "make_ca", "make_server_cert", "make_supernode_key", "write_credentials",
           "next_steps", "main"]

DEFAULT_HOSTS = "localhost,127.0.0.1"


@dataclass(frozen=True)
class CertFiles:
    """Paths of everything ``write_credentials`` writes."""

    out: Path
    n_supernodes: int

    @property
    def ca_crt(self) -> Path:
        return self.out / "ca.crt"

    @property
    def ca_key(self) -> Path:
        return self.out / "ca.key"

    @property
    def server_pem(self) -> Path:
        return self.out / "server.pem"

    @property
    def server_key(self) -> Path:
        return self.out / "server.key"

    def supernode_key(self, k: int) -> Path:
        return self.out / f"supernode-{k}"

    def supernode_pub(self, k: int) -> Path:
        return self.out / f"supernode-{k}.pub"

    def all(self) -> list[Path]:
        paths = [self.ca_crt, self.ca_key, self.server_pem, self.server_key]
        for k in range(1, self.n_supernodes + 1):
            paths += [self.supernode_key(k), self.supernode_pub(k)]
        return paths


def parse_hosts(text: str) -> list[x509.GeneralName]:
    """``"localhost,127.0.0.1,link.example.org"`` -> subjectAltName entries (IP or DNS)."""
    names: list[x509.GeneralName] = []
    for item in (h.strip() for h in text.split(",")):
        if not item:
            continue
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(item)))
        except ValueError:
            if any(c in item for c in " /:@") or item.startswith(".") or item.endswith("."):
                raise ValueError(f"--hosts: {item!r} is neither an IP address nor a DNS name") from None
            names.append(x509.DNSName(item))
    if not names:
        raise ValueError("--hosts: give at least one host name or IP address")
    return names


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fedsmm"),
                      x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _validity(days: int) -> tuple[dt.datetime, dt.datetime]:
    now = dt.datetime.now(dt.timezone.utc)
    return now - dt.timedelta(minutes=5), now + dt.timedelta(days=days)  # 5 min: clock skew


def make_ca(days: int) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """A self-signed CA certificate (may sign server certificates only: path length 0)."""
    key = ec.generate_private_key(ec.SECP384R1())
    start, end = _validity(days)
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (x509.CertificateBuilder()
            .subject_name(_name("fedsmm deployment CA")).issuer_name(_name("fedsmm deployment CA"))
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(start).not_valid_after(end)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                         crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(ski, critical=False)
            .sign(key, hashes.SHA384()))
    return cert, key


def make_server_cert(ca_cert: x509.Certificate, ca_key: ec.EllipticCurvePrivateKey, sans: list[x509.GeneralName],
                     days: int) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """The SuperLink's certificate, signed by the CA, valid for the ``sans``."""
    key = ec.generate_private_key(ec.SECP384R1())
    start, end = _validity(days)
    first = sans[0].value
    cert = (x509.CertificateBuilder()
            .subject_name(_name(str(first))).issuer_name(ca_cert.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(start).not_valid_after(min(end, ca_cert.not_valid_after_utc))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=True, key_cert_sign=False,
                                         crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA384()))
    return cert, key


def make_supernode_key() -> tuple[bytes, bytes]:
    """(OpenSSH private key, OpenSSH public key line) of a new ECDSA P-384 key."""
    key = ec.generate_private_key(ec.SECP384R1())
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                serialization.NoEncryption())
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    return private, public + b"\n"


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _write(path: Path, data: bytes, private: bool) -> None:
    mode = 0o600 if private else 0o644
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        os.fchmod(fd, mode)  # an existing file (--force) keeps its old mode otherwise
        os.write(fd, data)
    finally:
        os.close(fd)


def write_credentials(out: Path, n_supernodes: int = 3, hosts: str = DEFAULT_HOSTS, days: int = 365,
                      force: bool = False) -> CertFiles:
    """Create every file (see the module docstring); raises FileExistsError before writing anything
    if one exists and not ``force``, ValueError on bad arguments."""
    if n_supernodes < 0:
        raise ValueError("--supernodes must be 0 or more")
    if days < 1:
        raise ValueError("--days must be at least 1")
    sans = parse_hosts(hosts)
    files = CertFiles(out, n_supernodes)
    existing = [str(p) for p in files.all() if p.exists() or p.is_symlink()]
    if existing and not force:
        raise FileExistsError(f"already there (use --force to overwrite): {', '.join(existing)}")
    out.mkdir(parents=True, exist_ok=True)
    ca_cert, ca_key = make_ca(days)
    server_cert, server_key = make_server_cert(ca_cert, ca_key, sans, days)
    _write(files.ca_key, _pem_key(ca_key), private=True)
    _write(files.ca_crt, ca_cert.public_bytes(serialization.Encoding.PEM), private=False)
    _write(files.server_key, _pem_key(server_key), private=True)
    _write(files.server_pem, server_cert.public_bytes(serialization.Encoding.PEM), private=False)
    for k in range(1, n_supernodes + 1):
        private, public = make_supernode_key()
        _write(files.supernode_key(k), private, private=True)
        _write(files.supernode_pub(k), public, private=False)
    return files


def next_steps(files: CertFiles, hosts: str, port: int = 8000) -> str:
    """The exact commands that use these files (printed by ``smm certs``)."""
    d = files.out.resolve()
    host = str(parse_hosts(hosts)[0].value)
    link = f"{host}:{port}"
    lines = [
        f"Credentials written to {d}:",
        f"  ca.crt (public: give to every site)   ca.key (secret: keep offline)",
        f"  server.pem + server.key (SuperLink TLS, valid for: {hosts})",
    ]
    if files.n_supernodes:
        lines.append(f"  supernode-1..{files.n_supernodes} (secret: one per site) + .pub (register them)")
    lines += [
        "",
        "1. Coordinator: start the SuperLink (TLS, persistent state, only registered SuperNodes):",
        f"   flower-superlink --ssl-ca-certfile {d}/ca.crt --ssl-certfile {d}/server.pem \\",
        f"       --ssl-keyfile {d}/server.key --enable-supernode-auth --host 0.0.0.0 --port {port} \\",
        f"       --database {d.parent / 'superlink-state.db'} --disable-runtime-dependency-installation",
        "",
        "2. Coordinator: a CLI connection in $FLWR_HOME/config.toml (default ~/.flwr/config.toml):",
        "   [superlink]",
        '   default = "fedsmm"',
        "",
        "   [superlink.fedsmm]",
        f'   address = "{link}"',
        f'   root-certificates = "{d}/ca.crt"',
        "",
        "3. Coordinator: register each site's public key (Flower shows the --name nowhere later: keep",
        "   the node id each command prints beside the site's name; the run's report names sites by",
        "   their site-name node config):",
    ]
    lines += [f"   flwr supernode register {d}/supernode-{k}.pub fedsmm --name site-{k}"
              for k in range(1, files.n_supernodes + 1)] or ["   flwr supernode register <site>.pub fedsmm"]
    lines += [
        "",
        "4. Site K (with ca.crt and its own supernode-K only, at absolute paths on the site's machine):",
        f"   export {' '.join(f'{k}={v}' for k, v in FLOWER_ENV.items() if k.startswith('FLWR_'))}",
        "   flower-supernode --root-certificates /abs/path/ca.crt \\",
        f"       --auth-supernode-private-key /abs/path/supernode-K --superlink {link} --port 9094 \\",
        "       --node-config 'site-dir=\"/abs/path/to/site_folder\" site-name=\"hospital-k\"'",
        "",
        "5. Coordinator: run from the fedsmm repository (flwr run reads the app from the folder it is given) and check:",
        f"   cd {APP_DIR} && flwr run . fedsmm --run-config run-config.toml --stream",
        "   flwr ls fedsmm --format json   # flwr run exits 0 even when the run failed: read its status here",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """``smm certs --out DIR [--supernodes N] [--hosts H1,H2] [--days D] [--force]``."""
    ap = argparse.ArgumentParser(prog="smm certs", description="Create a CA, a SuperLink TLS certificate and "
                                 "SuperNode authentication keys for a test or small Flower deployment.")
    ap.add_argument("--out", type=Path, required=True, metavar="DIR", help="folder for the files (created)")
    ap.add_argument("--supernodes", type=int, default=3, metavar="N", help="SuperNode key pairs to create (default 3)")
    ap.add_argument("--hosts", default=DEFAULT_HOSTS, metavar="H1,H2",
                    help="comma-separated DNS names and IPs the SuperLink is reached at; they become the "
                         f"certificate's subjectAltNames (default {DEFAULT_HOSTS})")
    ap.add_argument("--days", type=int, default=365, metavar="D", help="validity in days (default 365)")
    ap.add_argument("--port", type=int, default=8000, metavar="P",
                    help="SuperLink port used in the printed commands only (default 8000, as flower-superlink)")
    ap.add_argument("--force", action="store_true", help="overwrite existing files")
    args = ap.parse_args(argv)
    try:
        files = write_credentials(args.out, args.supernodes, args.hosts, args.days, args.force)
    except (ValueError, FileExistsError) as e:
        print(f"smm certs: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"smm certs: cannot write to {args.out}: {e}", file=sys.stderr)
        return 1
    print(next_steps(files, args.hosts, args.port))
    return 0


if __name__ == "__main__":
    sys.exit(main())
