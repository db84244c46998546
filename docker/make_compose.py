"""Write the compose file of a fedsmm deployment: one SuperLink, its ServerApp SuperExec, and for
each site a SuperNode with its ClientApp SuperExec.

    python docker/make_compose.py --site site-1=/data/hospital-a --site site-2=/data/hospital-b \\
        --out docker/compose.yaml

What the file sets up (docker/README.md explains the commands around it):

* ``superlink`` (the thin ``fedsmm/superlink`` image: the stock one with a writable /app/state):
  TLS with the CA, certificate and key given as compose secrets, ``--enable-supernode-auth``
  (only registered SuperNode keys may join), SQLite state on the ``superlink-state`` volume,
  ``--isolation process`` (the ServerApp runs in ``superexec-serverapp``), its port published on
  the host for the ``flwr`` CLI and for SuperNodes on other machines.
* ``superexec-serverapp`` (the app image): runs each ServerApp; it dials the SuperLink over TLS
  (the certificate must name the host ``superlink``) and writes run folders to the ``runs`` volume.
* per site K: ``supernode-K`` (stock ``flwr/supernode``) with the CA and its own private key
  (``supernode-K``) as secrets and the node config ``site-dir`` (the data mount point),
  ``site-name``, ``log-file`` and ``privacy-ledger`` (both on the writable ``site-K-state``
  volume, because the data volume is read-only); ``superexec-clientapp-K`` (the app image) runs
  the site's ClientApps with ``site-K-data`` (a named volume bound to the site's folder on the
  host) mounted READ-ONLY and ``site-K-state``. A SuperNode's Runtime API (port 9094) stays on the
  compose network: it is not published.

With ``--superlink HOST:PORT`` (a site's own machine) only the sites' services are written; their
SuperNodes dial HOST:PORT, which the SuperLink's certificate must name.

Every Flower container gets ``server.ops.simulate.FLOWER_ENV`` (no telemetry, no update check,
no run-time dependency installation, the SuperExec's fast task poll). The secrets are files in
``--credentials`` (``docker/make_credentials.py`` writes them, owned by uid 49999: compose bind-
mounts secret files with their owner and mode, and Flower's images run as that uid).
"""

from __future__ import annotations

import argparse
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

from server.ops.certs import CertFiles  # noqa: E402
from server.ops.simulate import FLOWER_ENV  # noqa: E402

__all__ = ["Site", "flwr_version", "parse_site", "render", "main"]

CONSTRAINTS = ROOT / "requirements" / "constraints.txt"
SUPERLINK_PORT = 8000  # flower-superlink's single HTTPS port (Fleet, Control and Runtime APIs)
SUPERNODE_PORT = 9094  # flower-supernode's Runtime API (its SuperExec dials it)
# Paths inside the containers (Flower's images work in /app as user `app`).
CERT_DIR = "/app/certificates"
KEY_PATH = "/app/keys/supernode"
STATE_DIR = "/app/state"
RUNS_DIR = "/app/runs"
SITE_DATA_DIR = "/data/site"
SITE_STATE_DIR = "/app/site-state"
_NAME = re.compile(r"^[a-z0-9][a-z0-9-]{0,30}$")


@dataclass(frozen=True)
class Site:
    """One site: its name (used in service, volume and secret names, and as ``site-name``) and the
    absolute path of its data folder on the Docker host."""

    name: str
    data_dir: Path


def flwr_version(constraints: Path = CONSTRAINTS) -> str:
    """flwr's exact version in the constraints file: every image of one deployment must run it."""
    try:
        text = constraints.read_text(encoding="utf-8")
    except OSError as e:
        raise ValueError(f"{constraints}: cannot read it ({e.strerror})") from None
    found = re.search(r"^flwr==([0-9][^\s;#]*)", text, flags=re.MULTILINE)
    if not found:
        raise ValueError(f"{constraints}: no 'flwr==X.Y.Z' line (the deployment's Flower version)")
    return found.group(1)


def parse_site(text: str) -> Site:
    """``NAME=/absolute/path`` -> Site; the error names what is wrong."""
    name, sep, path = text.partition("=")
    if not sep or not path:
        raise ValueError(f"--site {text!r}: expected NAME=/absolute/path/of/the/site/folder")
    if not _NAME.match(name):
        raise ValueError(f"--site {text!r}: the name must be 1-31 lowercase letters, digits or '-' "
                         "(it becomes a service, volume and secret name)")
    data_dir = Path(path).expanduser()
    if not data_dir.is_absolute():
        raise ValueError(f"--site {text!r}: the path must be absolute (it is bound into a container)")
    return Site(name, data_dir)


def _node_config(site: Site) -> str:
    """The SuperNode's ``--node-config`` (the keys client/app.py and client/local/round.py read)."""
    values = {"site-dir": SITE_DATA_DIR, "site-name": site.name,
              "log-file": f"{SITE_STATE_DIR}/fedsmm-client.log",
              "privacy-ledger": f"{SITE_STATE_DIR}/privacy/ledger.json"}
    return " ".join(f'{k}="{v}"' for k, v in values.items())


def _secret(source: str, target: str) -> dict[str, str]:
    return {"source": source, "target": target}


def render(sites: list[Site], credentials: str, app_image: str, version: str, port: int = SUPERLINK_PORT,
           check_data: bool = True, superlink: str | None = None) -> dict[str, Any]:
    """The compose document. ``credentials``: the folder of ``make_credentials.py``'s files, as the
    compose file should name it (relative paths are relative to the compose file). ``superlink``:
    ``HOST:PORT`` of a SuperLink that runs elsewhere (a site's own machine): then only the sites'
    services are written, and their SuperNodes dial that address."""
    if not sites:
        raise ValueError("give at least one --site NAME=/path")
    names = [s.name for s in sites]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ValueError(f"--site: each name once (repeated: {', '.join(dupes)})")
    if check_data:
        missing = [f"{s.name}={s.data_dir}" for s in sites if not (s.data_dir / "clinical.csv").is_file()]
        if missing:
            raise ValueError(f"--site: not a site folder (no clinical.csv): {', '.join(missing)}")
    if not 1 <= port <= 65535:
        raise ValueError(f"--port {port}: expected 1-65535")
    if superlink is not None and not re.match(r"^[A-Za-z0-9.\-\[\]:]+:\d{1,5}$", superlink):
        raise ValueError(f"--superlink {superlink!r}: expected HOST:PORT (a name the SuperLink's certificate lists)")
    env = dict(FLOWER_ENV)
    link = f"superlink:{SUPERLINK_PORT}"
    ca = f"{CERT_DIR}/ca.crt"
    files = CertFiles(Path(credentials), len(sites))
    secrets: dict[str, Any] = {"ca-crt": {"file": str(files.ca_crt)},
                               "server-pem": {"file": str(files.server_pem)},
                               "server-key": {"file": str(files.server_key)}}
    volumes: dict[str, Any] = {"superlink-state": {}, "runs": {}}
    services: dict[str, Any] = {
        "superlink": {
            "image": f"fedsmm/superlink:{version}",
            "command": ["--isolation", "process", "--host", "0.0.0.0", "--port", str(SUPERLINK_PORT),
                        "--ssl-ca-certfile", ca, "--ssl-certfile", f"{CERT_DIR}/server.pem",
                        "--ssl-keyfile", f"{CERT_DIR}/server.key", "--enable-supernode-auth",
                        "--database", f"{STATE_DIR}/state.db", "--disable-runtime-dependency-installation"],
            "environment": env,
            "ports": [f"{port}:{SUPERLINK_PORT}"],
            "volumes": [f"superlink-state:{STATE_DIR}"],
            "secrets": [_secret("ca-crt", ca), _secret("server-pem", f"{CERT_DIR}/server.pem"),
                        _secret("server-key", f"{CERT_DIR}/server.key")],
            "restart": "unless-stopped",
        },
        "superexec-serverapp": {
            "image": app_image,
            "command": ["--runtime-api-address", link, "--root-certificates", ca],
            "environment": env,
            "volumes": [f"runs:{RUNS_DIR}"],
            "secrets": [_secret("ca-crt", ca)],
            "depends_on": ["superlink"],
            "restart": "unless-stopped",
        },
    }
    if superlink is not None:  # the SuperLink and the ServerApp run on the coordinator's machine
        link, services, volumes = superlink, {}, {}
        secrets = {"ca-crt": secrets["ca-crt"]}
    for k, site in enumerate(sites, start=1):
        node, key = f"supernode-{site.name}", f"{site.name}-key"
        secrets[key] = {"file": str(files.supernode_key(k))}
        volumes[f"{site.name}-data"] = {"driver": "local", "driver_opts": {
            "type": "none", "o": "bind", "device": str(site.data_dir)}}
        volumes[f"{site.name}-state"] = {}
        services[node] = {
            "image": f"flwr/supernode:{version}",
            "command": ["--superlink", link, "--root-certificates", ca, "--auth-supernode-private-key", KEY_PATH,
                        "--isolation", "process", "--host", "0.0.0.0", "--port", str(SUPERNODE_PORT),
                        "--node-config", _node_config(site)],
            "environment": env,
            "secrets": [_secret("ca-crt", ca), _secret(key, KEY_PATH)],
            **({} if superlink else {"depends_on": ["superlink"]}),
            "restart": "unless-stopped",
        }
        services[f"superexec-clientapp-{site.name}"] = {
            "image": app_image,
            "command": ["--insecure", "--runtime-api-address", f"{node}:{SUPERNODE_PORT}"],
            "environment": env,
            "volumes": [{"type": "volume", "source": f"{site.name}-data", "target": SITE_DATA_DIR,
                         "read_only": True},
                        {"type": "volume", "source": f"{site.name}-state", "target": SITE_STATE_DIR}],
            "depends_on": [node],
            "restart": "unless-stopped",
        }
    return {"name": "fedsmm", "services": services, "volumes": volumes, "secrets": secrets}


HEADER = ("# Generated by docker/make_compose.py; edit its arguments and rerun it rather than this file.\n"
          "# Site K's key pair is supernode-K (the K-th --site given). docker/README.md: how to run it.\n")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="make_compose.py", description=__doc__.split("\n\n")[0])
    ap.add_argument("--site", action="append", default=[], metavar="NAME=PATH", required=True,
                    help="a site's name and the absolute path of its data folder on the Docker host "
                         "(repeat per site; the K-th one uses the key pair supernode-K)")
    ap.add_argument("--credentials", default="credentials", metavar="DIR",
                    help="folder of make_credentials.py's files, relative to the compose file (default credentials)")
    ap.add_argument("--app-image", default=None, metavar="IMAGE",
                    help="the app image built from docker/Dockerfile (default fedsmm/app:<fedsmm version>)")
    ap.add_argument("--port", type=int, default=SUPERLINK_PORT, help="host port of the SuperLink (default 8000)")
    ap.add_argument("--superlink", default=None, metavar="HOST:PORT",
                    help="the SuperLink runs on another machine: write only the sites' services, dialing HOST:PORT")
    ap.add_argument("--no-data-check", action="store_true",
                    help="do not require each site folder to exist here (compose file made for another host)")
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "compose.yaml", metavar="FILE")
    args = ap.parse_args(argv)
    try:
        sites = [parse_site(s) for s in args.site]
        version = flwr_version()
        app_image = args.app_image or f"fedsmm/app:{_project_version()}"
        doc = render(sites, args.credentials, app_image, version, args.port, check_data=not args.no_data_check,
                     superlink=args.superlink)
    except ValueError as e:
        print(f"make_compose.py: {e}", file=sys.stderr)
        return 2
    args.out.write_text(HEADER + yaml.safe_dump(doc, sort_keys=False, width=120))
    print(f"{args.out}: {len(sites)} site(s) ({', '.join(s.name for s in sites)}), flwr {version}, image {app_image}")
    return 0


def _project_version() -> str:
    import tomllib
    return tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]["version"]


if __name__ == "__main__":
    sys.exit(main())
