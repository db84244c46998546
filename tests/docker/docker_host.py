"""What the docker tier needs from the machine: a Docker CLI and daemon, the Flower images (or
stand-ins built here), the thin SuperLink image and a light app image.

Facts this relies on (measured on the project's machine kind):

* Debian's ``docker.io`` daemon runs with its defaults (with ``--iptables=false --bridge=none``
  containers cannot resolve each other). If no daemon answers, ``Daemon.start`` starts one (root
  only) and ``Daemon.stop`` stops it by PID and puts back the iptables tables, the ``docker0``
  bridge and ``net.ipv4.ip_forward`` as they were before.
* Docker Hub may be unreachable: the ``flwr/*`` images are then stand-ins with the official
  layout (tests/docker/standins/Dockerfile) on a Debian rootfs made by ``debootstrap
  --variant=minbase`` and ``docker import``; ``FROM flwr/superexec:<version>`` builds unchanged.
* BuildKit is needed (build secrets, bind mounts): a Docker CLI 23+ only has it through the buildx
  plugin, an older CLI (Debian's 20.10) has it built in. No ``# syntax=`` line (it would fetch a
  frontend image).
* pip inside a build needs the host's CA bundle where TLS is intercepted: given as the build
  secret ``pip_ca``.
* The app image with the pinned torch pulls ~2.9 GB of CUDA wheels. The light app image is the
  same docker/Dockerfile with ``CONSTRAINTS`` and ``FIND_LINKS`` pointing at a build context that
  holds a local CPU-only torch wheel and the constraints with torch pinned to it (the CUDA
  packages left out; torchvision resolves to the release made for that torch).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import ssl
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from server.ops.simulate import ProcessTracker, stage_app

ROOT = Path(__file__).resolve().parents[2]
STANDIN_DOCKERFILE = ROOT / "tests" / "docker" / "standins" / "Dockerfile"
STANDIN_BASE = "fedsmm-standin/debian:bookworm-minbase"
DEBIAN_MIRROR = "http://deb.debian.org/debian"
STANDIN_PACKAGES = "python3,python3-venv,ca-certificates,libsqlite3-0"
#: Constraint lines the light image drops: the CUDA build of torch and what only it needs.
CUDA_ONLY = re.compile(r"^(torch|torchvision|triton|nvidia-[\w-]+|cuda-[\w-]+)==", re.IGNORECASE)
_VERSION = re.compile(r"^(\d+)\.")
IP_FORWARD = Path("/proc/sys/net/ipv4/ip_forward")


class DockerUnavailable(RuntimeError):
    """No usable Docker here (the tier is skipped with this message)."""


def _run(cmd: list[str], timeout: float = 600, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kw)


def docker_cli() -> str:
    """A ``docker`` CLI on PATH that can use BuildKit (``DOCKER`` in the environment wins)."""
    if os.environ.get("DOCKER"):
        return os.environ["DOCKER"]
    seen = []
    for d in os.environ.get("PATH", "").split(os.pathsep):
        cand = Path(d) / "docker"
        if not (cand.is_file() and os.access(cand, os.X_OK)) or cand.resolve() in seen:
            continue
        seen.append(cand.resolve())
        version = _run([str(cand), "version", "--format", "{{.Client.Version}}"], timeout=30).stdout.strip()
        m = _VERSION.match(version)
        if m and (int(m.group(1)) < 23 or _run([str(cand), "buildx", "version"], timeout=30).returncode == 0):
            return str(cand)
    raise DockerUnavailable(f"no docker CLI with BuildKit on PATH (tried: {', '.join(map(str, seen)) or 'none'}); "
                            "install docker.io, or set DOCKER=/path/to/docker")


def ca_bundle() -> Path | None:
    """The CA bundle pip uses on this host (PIP_CERT, SSL_CERT_FILE, else OpenSSL's default)."""
    for value in (os.environ.get("PIP_CERT"), os.environ.get("SSL_CERT_FILE"), ssl.get_default_verify_paths().cafile):
        if value and Path(value).is_file():
            return Path(value)
    return None


class Daemon:
    """The Docker daemon the tier talks to: a running one (left alone) or one started here."""

    def __init__(self, cli: str, workdir: Path):
        self.cli = cli
        self.workdir = workdir
        self.proc: subprocess.Popen | None = None
        self._iptables_before: str | None = None
        self._bridge_before = False
        self._ip_forward_before: str | None = None

    def answers(self) -> bool:
        return _run([self.cli, "info", "--format", "{{.ServerVersion}}"], timeout=30).returncode == 0

    def start(self, timeout_s: float = 60) -> None:
        if self.answers():
            return
        dockerd = shutil.which("dockerd") or shutil.which("dockerd", path="/usr/sbin:/usr/local/sbin")
        if dockerd is None or os.geteuid() != 0:
            raise DockerUnavailable("no Docker daemon answers and none can be started here (needs dockerd and root)")
        self._iptables_before = _iptables_save()
        self._bridge_before = Path("/sys/class/net/docker0").exists()
        self._ip_forward_before = IP_FORWARD.read_text() if IP_FORWARD.exists() else None  # dockerd sets it to 1
        self.log = (self.workdir / "dockerd.log").open("w")
        self.proc = subprocess.Popen([dockerd], stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout_s
        while not self.answers():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise DockerUnavailable(f"dockerd did not come up: {(self.workdir / 'dockerd.log').read_text()[-1500:]}")
            time.sleep(1.0)

    def stop(self) -> list[str]:
        """Stop the daemon started here (by PID) and undo its network changes; returns problems."""
        if self.proc is None:
            return []
        problems = []
        tracker = ProcessTracker(self.proc.pid)  # dockerd, its containerd and any shim left
        tracker.sample()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=30)
                problems.append("dockerd ignored SIGTERM for 60 s (killed)")
        self.log.close()
        deadline = time.monotonic() + 30
        while tracker.alive() and time.monotonic() < deadline:
            time.sleep(0.5)
        if tracker.alive():
            problems.append(f"processes of dockerd left: {tracker.alive()} (killed)")
            tracker.signal_all(signal.SIGKILL)
        if self._iptables_before is not None:
            problems += _iptables_restore(self._iptables_before)
        if self._ip_forward_before is not None and IP_FORWARD.read_text() != self._ip_forward_before:
            IP_FORWARD.write_text(self._ip_forward_before)
        if not self._bridge_before and Path("/sys/class/net/docker0").exists():
            r = _run(["ip", "link", "delete", "docker0"], timeout=30)
            if r.returncode != 0:
                problems.append(f"ip link delete docker0: {r.stderr.strip()}")
        self.proc = None
        return problems


def _iptables_save() -> str | None:
    if shutil.which("iptables-save") is None:
        return None
    r = _run(["iptables-save"], timeout=30)
    return r.stdout if r.returncode == 0 else None


def _tables(dump: str) -> dict[str, str]:
    """iptables-save text -> table name -> its block (``*name`` ... ``COMMIT``)."""
    out, name, lines = {}, None, []
    for line in dump.splitlines():
        if line.startswith("*"):
            name, lines = line[1:], [line]
        elif name is not None:
            lines.append(line)
            if line == "COMMIT":
                out[name], name = "\n".join(lines), None
    return out


def _iptables_restore(before: str) -> list[str]:
    """Put every table back as it was; a table that did not exist before is emptied (its built-in
    chains kept, with policy ACCEPT). Returns problems."""
    after = _iptables_save()
    if after is None:
        return ["iptables-save failed after the daemon stopped"]
    old, new = _tables(before), _tables(after)
    blocks = []
    for name, block in new.items():
        if name in old:
            blocks.append(old[name])
        else:
            builtin = [ln.split()[0] + " ACCEPT [0:0]" for ln in block.splitlines()
                       if ln.startswith(":") and ln.split()[1] != "-"]
            blocks.append("\n".join([f"*{name}", *builtin, "COMMIT"]))
    r = subprocess.run(["iptables-restore"], input="\n".join(blocks) + "\n", capture_output=True, text=True,
                       timeout=30)
    if r.returncode != 0:
        return [f"iptables-restore: {r.stderr.strip()}"]
    left = _iptables_save()
    return [] if left is not None and _tables(left).keys() == new.keys() and all(
        _rules(_tables(left)[t]) == _rules(old.get(t, "")) for t in new) else ["iptables differ after restore"]


def _rules(block: str) -> list[str]:
    return [ln for ln in block.splitlines() if ln.startswith("-A ")]


# --------------------------------------------------------------------------------------------- #
# images
# --------------------------------------------------------------------------------------------- #
def image_exists(cli: str, tag: str) -> bool:
    return _run([cli, "image", "inspect", tag], timeout=60).returncode == 0


def build(cli: str, tag: str, dockerfile: Path, context: Path | str, *args: str, timeout: float = 1800) -> None:
    """``docker build`` with BuildKit and the host's CA bundle as the secret ``pip_ca``."""
    secret = ["--secret", f"id=pip_ca,src={ca_bundle()}"] if ca_bundle() else []
    cmd = [cli, "build", "--progress=plain", "-f", str(dockerfile), "-t", tag, *secret, *args, str(context)]
    r = _run(cmd, timeout=timeout, env={**os.environ, "DOCKER_BUILDKIT": "1"})
    if r.returncode != 0:
        raise RuntimeError(f"docker build {tag} failed:\n{(r.stdout + r.stderr)[-4000:]}")


def ensure_standin_base(cli: str) -> None:
    """The imported Debian rootfs of the stand-ins (debootstrap once; the image then stays)."""
    if image_exists(cli, STANDIN_BASE):
        return
    if shutil.which("debootstrap") is None or os.geteuid() != 0:
        raise DockerUnavailable(f"{STANDIN_BASE} is missing and debootstrap (as root) is not available to make it")
    tmp = Path(tempfile.mkdtemp(prefix="fedsmm-rootfs-"))
    rootfs = tmp / "rootfs"
    try:
        r = _run(["debootstrap", "--variant=minbase", f"--include={STANDIN_PACKAGES}", "bookworm", str(rootfs),
                  DEBIAN_MIRROR], timeout=1800)
        if r.returncode != 0:
            raise RuntimeError(f"debootstrap failed:\n{(r.stdout + r.stderr)[-3000:]}")
        tar = subprocess.Popen(["tar", "-C", str(rootfs), "-c", "."], stdout=subprocess.PIPE)
        imp = _run([cli, "import", "-", STANDIN_BASE], stdin=tar.stdout, timeout=900)
        tar.stdout.close()
        tar.wait(timeout=60)
        if imp.returncode != 0 or tar.returncode != 0:
            raise RuntimeError(f"docker import failed: {imp.stderr[-2000:]}")
    finally:
        # debootstrap mounts /proc (and more) inside the rootfs while it configures packages and
        # unmounts them when it exits; never delete a tree that still has a mount in it.
        mounts = [ln.split()[1] for ln in Path("/proc/self/mounts").read_text().splitlines()
                  if ln.split()[1].startswith(str(rootfs))]
        if mounts:
            raise RuntimeError(f"{tmp} left in place: still mounted inside it: {', '.join(mounts)}")
        shutil.rmtree(tmp, ignore_errors=True)


def ensure_flower_images(cli: str, version: str) -> str:
    """flwr/superlink, flwr/supernode and flwr/superexec at ``version``: the stock images if
    present (pulled), else stand-ins built now. Returns which ("stock" or "stand-in")."""
    tags = {t: f"flwr/{t}:{version}" for t in ("superlink", "supernode", "superexec")}
    labels = {t: _run([cli, "image", "inspect", "--format", "{{index .Config.Labels \"org.fedsmm.standin\"}}", tag],
                      timeout=60) for t, tag in tags.items()}
    if all(r.returncode == 0 and r.stdout.strip() != "true" for r in labels.values()):
        return "stock"
    ensure_standin_base(cli)
    for target, tag in tags.items():
        build(cli, tag, STANDIN_DOCKERFILE, ROOT, "--target", target, "--build-arg", f"FLWR_VERSION={version}",
              "--build-arg", f"BASE={STANDIN_BASE}")
    return "stand-in"


def build_superlink_image(cli: str, version: str) -> str:
    tag = f"fedsmm/superlink:{version}"
    with tempfile.TemporaryDirectory(prefix="fedsmm-empty-context-") as empty:
        build(cli, tag, ROOT / "docker" / "superlink.Dockerfile", empty, "--build-arg", f"FLWR_VERSION={version}")
    return tag


def cpu_torch_wheel() -> Path | None:
    """A CPU-only torch wheel for CPython 3.11 already on this machine (FEDSMM_TORCH_CPU_WHEEL, else
    pip's find-links folders), or None."""
    if os.environ.get("FEDSMM_TORCH_CPU_WHEEL"):
        return Path(os.environ["FEDSMM_TORCH_CPU_WHEEL"])
    dirs = os.environ.get("PIP_FIND_LINKS", "").split()
    r = _run([sys.executable, "-m", "pip", "config", "get", "global.find-links"], timeout=60)
    dirs += r.stdout.split() if r.returncode == 0 else []
    for d in dirs:
        for wheel in sorted(Path(d.removeprefix("file://")).glob("torch-*+cpu-cp311-*.whl")):
            return wheel
    return None


def light_app_context(dest: Path, wheel: Path) -> tuple[Path, list[str]]:
    """A build context for docker/Dockerfile with the CPU torch wheel; returns it and the build args."""
    ctx = stage_app(ROOT, dest)
    (ctx / "light" / "wheels").mkdir(parents=True)
    shutil.copy2(wheel, ctx / "light" / "wheels" / wheel.name)
    version = wheel.name.split("-")[1]  # torch-2.13.0+cpu-cp311-... -> 2.13.0+cpu
    lines = [ln for ln in (ROOT / "requirements" / "constraints.txt").read_text().splitlines()
             if not CUDA_ONLY.match(ln)]
    (ctx / "light" / "constraints.txt").write_text("\n".join([*lines, f"torch=={version}"]) + "\n")
    return ctx, ["--build-arg", "CONSTRAINTS=light/constraints.txt", "--build-arg", "FIND_LINKS=light/wheels"]
