"""Write the credentials of a Docker deployment (``smm certs``' files) and hand them to uid 49999.

    sudo python docker/make_credentials.py --out docker/credentials --supernodes 2 --hosts link.example.org

The files are those of ``server.ops.certs.write_credentials``: ``ca.crt``/``ca.key``,
``server.pem``/``server.key`` and ``supernode-K``/``supernode-K.pub``. Two Docker specifics:

* the SuperLink's certificate also names ``superlink`` (and ``localhost``, ``127.0.0.1``): the
  ServerApp SuperExec and the SuperNodes of the compose file dial ``superlink:8000``; ``--hosts``
  adds the names or IPs SuperNodes on other machines and the coordinator's ``flwr`` CLI use;
* every file is then owned by uid:gid 49999:49999: compose bind-mounts secret files with their
  owner and mode, Flower's images run as user ``app`` (uid 49999), and the private keys are mode
  0600. Changing the owner needs root; ``--no-chown`` skips it (then the containers cannot read
  the private keys: for writing the files on one machine and copying them on).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

from server.ops.certs import CertFiles, write_credentials  # noqa: E402

__all__ = ["FLWR_UID", "COMPOSE_HOSTS", "hosts_with_compose", "hand_to_flower", "main"]

#: The uid and gid of user ``app`` in Flower's images (framework/docker/base: ``useradd --uid 49999``).
FLWR_UID = 49999
#: Names the compose network reaches the SuperLink by (always in the certificate).
COMPOSE_HOSTS = ("superlink", "localhost", "127.0.0.1")


def hosts_with_compose(extra: str) -> str:
    """``--hosts`` for ``write_credentials``: the compose names first, then ``extra`` (no repeats)."""
    names = list(COMPOSE_HOSTS)
    for h in (h.strip() for h in extra.split(",")):
        if h and h not in names:
            names.append(h)
    return ",".join(names)


def hand_to_flower(files: CertFiles) -> None:
    """chown every file (and the folder) to 49999:49999; PermissionError says how to fix it."""
    for path in [files.out, *files.all()]:
        try:
            os.chown(path, FLWR_UID, FLWR_UID)
        except PermissionError:
            raise PermissionError(f"{path}: cannot change the owner to {FLWR_UID}:{FLWR_UID} (needs root: rerun "
                                  "with sudo, or pass --no-chown and chown the folder before compose up)") from None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="make_credentials.py", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True, metavar="DIR", help="folder for the files (created)")
    ap.add_argument("--supernodes", type=int, required=True, metavar="N", help="one key pair per site")
    ap.add_argument("--hosts", default="", metavar="H1,H2",
                    help="extra DNS names / IPs of the SuperLink's host (besides superlink, localhost, 127.0.0.1)")
    ap.add_argument("--days", type=int, default=365, metavar="D", help="validity in days (default 365)")
    ap.add_argument("--force", action="store_true", help="overwrite existing files")
    ap.add_argument("--no-chown", action="store_true", help="leave the files owned by the current user")
    args = ap.parse_args(argv)
    try:
        files = write_credentials(args.out, args.supernodes, hosts_with_compose(args.hosts), args.days, args.force)
        if not args.no_chown:
            hand_to_flower(files)
    except (ValueError, FileExistsError, PermissionError) as e:
        print(f"make_credentials.py: {e}", file=sys.stderr)
        return 2
    owner = "current user" if args.no_chown else f"uid {FLWR_UID}"
    print(f"{args.out}: CA, SuperLink certificate ({hosts_with_compose(args.hosts)}) and {args.supernodes} "
          f"SuperNode key pair(s), owned by {owner}; keep ca.key offline, give site K only ca.crt and supernode-K")
    return 0


if __name__ == "__main__":
    sys.exit(main())
