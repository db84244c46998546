"""Register every site of a compose file with its SuperLink (``flwr supernode register``).

    python docker/register_sites.py docker/compose.yaml fedsmm

With ``--enable-supernode-auth`` the SuperLink accepts only SuperNodes whose public key was
registered; this registers, for each ``supernode-<site>`` service of the compose file, the
``.pub`` beside the private key its secret names, under the site's name. CONNECTION is a
``[superlink.<name>]`` table of ``$FLWR_HOME/config.toml`` (default ``~/.flwr/config.toml``;
docker/README.md shows it). The SuperLink may still be starting: each registration is retried for
up to ``--wait`` seconds. The node ids go to stdout as one JSON object (site -> node id): keep
them (Flower shows the ``--name`` nowhere later). A key that is registered already fails (Flower
refuses a second registration); the other sites are still tried.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing
sys.path.insert(0, str(Path(__file__).resolve().parent))

from make_compose import KEY_PATH  # noqa: E402
from server.ops.flwr_cli import RegistrationError, executable, register_supernode  # noqa: E402

__all__ = ["site_keys", "register", "main"]

SUPERNODE_PREFIX = "supernode-"


def site_keys(compose_file: Path) -> dict[str, Path]:
    """site name -> its public key file, from a compose file written by make_compose.py."""
    try:
        doc = yaml.safe_load(compose_file.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as e:
        raise ValueError(f"{compose_file}: cannot read it as YAML ({e})") from None
    services, secrets = (doc or {}).get("services") or {}, (doc or {}).get("secrets") or {}
    keys: dict[str, Path] = {}
    for name, svc in services.items():
        if not name.startswith(SUPERNODE_PREFIX):
            continue
        source = next((s.get("source") for s in svc.get("secrets", []) if isinstance(s, dict)
                       and s.get("target") == KEY_PATH), None)
        if source is None or "file" not in secrets.get(source, {}):
            raise ValueError(f"{compose_file}: services.{name} has no secret mounted at {KEY_PATH} "
                             "with a file (was the file written by make_compose.py?)")
        key = Path(secrets[source]["file"])
        keys[name[len(SUPERNODE_PREFIX):]] = (key if key.is_absolute() else compose_file.parent / key)
    if not keys:
        raise ValueError(f"{compose_file}: no {SUPERNODE_PREFIX}<site> service")
    return {site: key.with_name(key.name + ".pub") for site, key in keys.items()}


def register(keys: dict[str, Path], connection: str, env: dict[str, str] | None = None,
             wait_s: float = 60.0) -> tuple[dict[str, int], dict[str, str]]:
    """(site -> node id, site -> error) after ``flwr supernode register`` of each key."""
    flwr_exe = executable("flwr")

    def flwr(*args: str, timeout: float = 120.0) -> subprocess.CompletedProcess:
        return subprocess.run([flwr_exe, *args], env=env, capture_output=True, text=True, timeout=timeout)

    done: dict[str, int] = {}
    failed: dict[str, str] = {}
    for site, pub in keys.items():
        if not pub.is_file():
            failed[site] = f"{pub}: no such public key file"
            continue
        try:
            done[site] = register_supernode(flwr, pub, connection, site, wait_s, every_s=2.0)
        except RegistrationError as e:
            failed[site] = str(e)
    return done, failed


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="register_sites.py", description=__doc__.split("\n\n")[0])
    ap.add_argument("compose_file", type=Path, help="the compose file make_compose.py wrote")
    ap.add_argument("connection", help="the SuperLink connection's name in $FLWR_HOME/config.toml")
    ap.add_argument("--wait", type=float, default=60.0, metavar="S",
                    help="retry each registration this long while the SuperLink starts (default 60)")
    args = ap.parse_args(argv)
    try:
        keys = site_keys(args.compose_file)
    except ValueError as e:
        print(f"register_sites.py: {e}", file=sys.stderr)
        return 2
    done, failed = register(keys, args.connection, wait_s=args.wait)
    print(json.dumps(done, indent=2))
    for site, err in failed.items():
        print(f"register_sites.py: {site} ({keys[site]}) not registered: {err}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
