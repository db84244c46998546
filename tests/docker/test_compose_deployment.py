"""The docker tier: the compose deployment of docker/ runs the real fedsmm app for two rounds.

Builds what is missing (stand-ins for the flwr/* images when the stock ones are not there, the
thin SuperLink image, a light app image from docker/Dockerfile: see docker_host), writes
credentials (owned by uid 49999) and a compose file for two synthetic sites (features only),
brings it up under a project name of its own, registers both SuperNodes, submits a staged copy of
the app with ``flwr run`` over TLS, polls until the run ends, and checks: the run completed, both
rounds were aggregated over both sites, the ServerApp wrote to the ``runs`` volume, each site's
log went to its state volume and its data volume cannot be written. Then it removes the
project's containers, networks and volumes (and checks that none is left), and, if it started
the Docker daemon, stops it by PID and undoes its iptables rules and bridge.

Run: ``make test-docker`` (as root where no daemon runs; ~10 min on 2 cores with a cold build
cache, most of it the app image's pip install).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "docker"))

import dev_tools  # noqa: E402
import docker_host as dh  # noqa: E402
import make_compose  # noqa: E402
import make_credentials  # noqa: E402
import register_sites  # noqa: E402
from server.ops.flwr_cli import cli_json, executable, wait_for_run  # noqa: E402
from server.ops.simulate import flwr_env, free_port, stage_app, write_run_config  # noqa: E402
from sim_cohort import SMALL, write_features_cohort  # noqa: E402

pytestmark = [pytest.mark.docker, pytest.mark.timeout(3600)]

APP_TAG = "fedsmm/app:docker-tier"
CONN = "docker-tier"
SITES = ("site-1", "site-2")
RUN_DIR = f"{make_compose.RUNS_DIR}/docker-tier"
OVERRIDES = [o.replace("federation.min_nodes=3", f"federation.min_nodes={len(SITES)}") for o in SMALL]


def test_compose_two_rounds(tmp_path):
    t_start = time.monotonic()
    timings: dict[str, float] = {}
    try:
        cli = dh.docker_cli()
    except dh.DockerUnavailable as e:
        pytest.skip(str(e))
    daemon = dh.Daemon(cli, tmp_path)
    try:
        daemon.start()
    except dh.DockerUnavailable as e:
        pytest.skip(str(e))
    wheel = dh.cpu_torch_wheel()
    project = f"fedsmm-tier-{os.getpid()}"
    compose_file = tmp_path / "compose.yaml"
    compose = [str(dev_tools.compose()), "-f", str(compose_file), "-p", project]

    def dc(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
        return subprocess.run([*compose, *args], capture_output=True, text=True, timeout=timeout)

    leftovers: list[str] = []
    try:
        print(f"\ndocker tier: CLI {cli}, torch wheel {wheel.name if wheel else None}")
        if wheel is None:
            pytest.skip("no CPU-only torch wheel for CPython 3.11 here (set FEDSMM_TORCH_CPU_WHEEL): the full app "
                        "image would pull ~2.9 GB of CUDA wheels")
        # -- images ----------------------------------------------------------------------------
        version = make_compose.flwr_version()
        t0 = time.monotonic()
        print(f"docker tier: flwr/* images: {dh.ensure_flower_images(cli, version)}")
        dh.build_superlink_image(cli, version)
        timings["flower_images_s"] = time.monotonic() - t0
        t0 = time.monotonic()
        ctx, build_args = dh.light_app_context(tmp_path / "app-context", wheel)
        dh.build(cli, APP_TAG, ROOT / "docker" / "Dockerfile", ctx, *build_args,
                 "--build-arg", f"FLWR_VERSION={version}")
        timings["app_image_s"] = time.monotonic() - t0

        # -- sites, credentials, compose file ---------------------------------------------------
        cohort = write_features_cohort(tmp_path / "cohort", sites=len(SITES), patients=20)
        site_dirs = sorted(p for p in cohort.iterdir() if (p / "clinical.csv").is_file())
        for d in site_dirs:  # the site's files are 0600: readable in the container as uid 49999 only
            for p in [d, *d.rglob("*")]:
                os.chown(p, make_credentials.FLWR_UID, make_credentials.FLWR_UID)
        creds = tmp_path / "credentials"
        assert make_credentials.main(["--out", str(creds), "--supernodes", str(len(SITES))]) == 0
        port = free_port()
        assert make_compose.main([*(a for s, d in zip(SITES, site_dirs) for a in ("--site", f"{s}={d}")),
                                  "--app-image", APP_TAG, "--port", str(port), "--out", str(compose_file)]) == 0

        # -- up, register, run --------------------------------------------------------------------
        t0 = time.monotonic()
        r = dc("up", "-d")
        assert r.returncode == 0, r.stderr[-3000:]
        cli_home = tmp_path / "flwr-home"
        cli_home.mkdir()
        (cli_home / "config.toml").write_text(f'[superlink]\ndefault = "{CONN}"\n\n[superlink.{CONN}]\n'
                                              f'address = "127.0.0.1:{port}"\nroot-certificates = "{creds / "ca.crt"}"\n')
        env = flwr_env(cli_home)
        node_ids, failed = register_sites.register(register_sites.site_keys(compose_file), CONN, env=env, wait_s=120)
        assert not failed and sorted(node_ids) == sorted(SITES), (failed, dc("logs", "superlink").stdout[-3000:])
        timings["up_and_registered_s"] = time.monotonic() - t0

        def flwr(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
            return subprocess.run([executable("flwr"), *args], env=env, cwd=str(tmp_path), capture_output=True,
                                  text=True, timeout=timeout)

        app = stage_app(ROOT, tmp_path / "app")
        run_config = write_run_config(tmp_path / "run-config.toml", {
            "config-path": "configs/demo.yaml", "overrides": "; ".join(OVERRIDES), "run-dir": RUN_DIR,
            "resume": False})
        t0 = time.monotonic()
        r = flwr("run", str(app), CONN, "--run-config", str(run_config), "--format", "json", timeout=300)
        out = cli_json(r.stdout) if r.returncode == 0 else {}
        assert out.get("success") and out.get("run-id") is not None, (r.stdout + r.stderr)[-3000:]
        run_id = str(out["run-id"])
        status = wait_for_run(flwr, CONN, run_id, 900)
        timings["run_s"] = time.monotonic() - t0
        if status != "finished:completed":
            logs = dc("logs", "--tail", "80").stdout
            pytest.fail(f"run {run_id} status {status!r}\n{logs[-6000:]}")

        # -- what the run left where --------------------------------------------------------------
        r = dc("exec", "-T", "superexec-serverapp", "cat", f"{RUN_DIR}/rounds.jsonl")
        assert r.returncode == 0, r.stderr
        rounds = [json.loads(line) for line in r.stdout.splitlines()]
        assert [rd["round"] for rd in rounds] == [0, 1, 2]
        for rd in rounds[1:]:
            assert rd["status"] == "aggregated"
            assert len(rd["train"]["per_site"]) == len(SITES)
            assert all(m["num-examples"] > 0 for m in rd["train"]["per_site"].values())
            assert len(rd["val"]["per_site"]) == len(SITES)
        for site in SITES:
            svc = f"superexec-clientapp-{site}"
            log = dc("exec", "-T", svc, "cat", f"{make_compose.SITE_STATE_DIR}/fedsmm-client.log")
            assert log.returncode == 0 and log.stdout.strip(), (site, log.stderr)
            ro = dc("exec", "-T", svc, "touch", f"{make_compose.SITE_DATA_DIR}/written-by-the-app")
            assert ro.returncode != 0 and "Read-only file system" in ro.stderr, (site, ro.stdout + ro.stderr)
    finally:
        timings["total_s"] = time.monotonic() - t_start
        print("\ndocker tier timings: " + json.dumps({k: round(v, 1) for k, v in timings.items()}))
        if compose_file.exists():
            r = dc("down", "--volumes", "--remove-orphans", "--timeout", "20")
            if r.returncode != 0:
                leftovers.append(f"compose down: {r.stderr[-1000:]}")
            label = f"label=com.docker.compose.project={project}"
            for kind in ("container", "network", "volume"):
                extra = ["-a"] if kind == "container" else []
                ls = subprocess.run([cli, kind, "ls", *extra, "-q", "--filter", label], capture_output=True,
                                    text=True, timeout=60)
                if ls.stdout.strip():
                    leftovers.append(f"{kind}s left: {ls.stdout.split()}")
        leftovers += daemon.stop()
    assert leftovers == [], leftovers
