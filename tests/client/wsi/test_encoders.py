"""Encoders: the registry and factory, weights files and checksums, timm and TorchScript models, memory format."""

import re
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import client.wsi.encoders as encoders
from client.wsi.encoders import (ENCODER_NAMES, ENCODERS, IMAGENET_MEAN, IMAGENET_STD, TORCHSCRIPT_SUFFIXES,
                                 Built, EncoderError, NullTransform, PatchTransform, ResNet50Trunc,
                                 build_encoder, load_state_dict_file, register, resolve_encoder)
from smm_model.contract.atomic import sha256_file

README = Path(__file__).resolve().parents[3] / "README.md"


def patches(n=2, size=64, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def resnet50_file(tmp_path_factory):
    """A full torchvision resnet50 state dict (with layer4 and fc), as a site would hold one."""
    from torchvision.models import resnet50

    torch.manual_seed(1)
    path = tmp_path_factory.mktemp("w") / "resnet50.pth"
    torch.save(resnet50(weights=None).state_dict(), path)
    return path


@pytest.fixture(scope="module")
def random_r50():
    return build_encoder("resnet50_trunc", random_weights=True, device="cpu")


def test_resnet50_trunc_random_weights_shape_and_identity(random_r50):
    enc = random_r50
    out = enc.encode(patches(3))
    assert out.shape == (3, 1024) and out.dtype == np.float32 and np.isfinite(out).all()
    assert (enc.encoder_id, enc.weights_sha256, enc.feature_dim) == ("resnet50_trunc", "random", 1024)
    assert enc.channels_last and not enc.model.training
    assert enc.encode(patches(0)).shape == (0, 1024)


def test_refuses_without_weights_and_with_both():
    with pytest.raises(EncoderError, match="needs a weights file.*--random-weights"):
        build_encoder("resnet50_trunc")
    with pytest.raises(EncoderError, match="needs a weights file"):
        build_encoder("timm:resnet18")
    with pytest.raises(EncoderError, match="not both"):
        build_encoder("resnet50_trunc", weights="w.pth", random_weights=True)
    with pytest.raises(EncoderError, match="unknown encoder"):
        build_encoder("resnet51", random_weights=True)
    with pytest.raises(EncoderError, match="no CUDA") if not torch.cuda.is_available() else pytest.raises(EncoderError):
        build_encoder("null", device="cuda" if not torch.cuda.is_available() else "nonsense")


def test_resnet50_trunc_loads_a_torchvision_state_dict(resnet50_file, tmp_path):
    enc = build_encoder("resnet50_trunc", weights=resnet50_file, device="cpu")
    assert enc.weights_sha256 == sha256_file(resnet50_file)
    # the same weights, truncated by hand: layer1-3 of the saved network, pooled
    ref = ResNet50Trunc()
    sd = torch.load(resnet50_file, weights_only=True)
    ref.load_state_dict({k: v for k, v in sd.items() if not k.startswith(("layer4.", "fc."))})
    x = patches(2)
    with torch.inference_mode():
        want = ref.eval()(enc.transform(x).contiguous()).numpy()
    np.testing.assert_allclose(enc.encode(x), want, rtol=1e-4, atol=1e-4)
    # wrapped and prefixed (DataParallel / training checkpoints) load the same
    wrapped = tmp_path / "ckpt.pt"
    torch.save({"state_dict": {f"module.{k}": v for k, v in sd.items()}, "epoch": 3}, wrapped)
    enc2 = build_encoder("resnet50_trunc", weights=wrapped, device="cpu")
    np.testing.assert_allclose(enc2.encode(x), want, rtol=1e-4, atol=1e-4)
    assert enc2.weights_sha256 == sha256_file(wrapped) != enc.weights_sha256


def test_mismatched_or_broken_weights_name_the_file(tmp_path):
    from torchvision.models import resnet18

    wrong = tmp_path / "resnet18.pth"
    torch.save(resnet18(weights=None).state_dict(), wrong)
    with pytest.raises(EncoderError, match=r"resnet18\.pth: does not match a torchvision resnet50.*wrong shape"):
        build_encoder("resnet50_trunc", weights=wrong)
    junk = tmp_path / "junk.pth"
    junk.write_text("not a checkpoint")
    with pytest.raises(EncoderError, match=r"junk\.pth: not a PyTorch state dict"):
        load_state_dict_file(junk)
    with pytest.raises(EncoderError, match="weights file not found"):
        build_encoder("resnet50_trunc", weights=tmp_path / "missing.pth")


def test_timm_encoder_by_name_with_a_weights_file(tmp_path):
    import timm

    torch.manual_seed(2)
    src = timm.create_model("resnet18", pretrained=False)          # with its 1000-class fc head
    path = tmp_path / "resnet18_timm.pth"
    torch.save(src.state_dict(), path)
    enc = build_encoder("timm:resnet18", weights=path, device="cpu")
    assert (enc.encoder_id, enc.feature_dim, enc.weights_sha256) == ("timm:resnet18", 512, sha256_file(path))
    x = patches(2)
    with torch.inference_mode():
        want = src.eval().forward_head(src.forward_features(enc.transform(x)), pre_logits=True).numpy()
    np.testing.assert_allclose(enc.encode(x), want, rtol=1e-4, atol=1e-4)
    # the same weights as a hub-style .safetensors file
    from safetensors.torch import save_file

    st = tmp_path / "model.safetensors"
    save_file(src.state_dict(), str(st))
    enc_st = build_encoder("timm:resnet18", weights=st, device="cpu")
    assert enc_st.weights_sha256 == sha256_file(st)
    np.testing.assert_allclose(enc_st.encode(x), want, rtol=1e-4, atol=1e-4)
    with pytest.raises(EncoderError, match="timm has no architecture 'resnet_nope'"):
        build_encoder("timm:resnet_nope", random_weights=True)


def test_timm_vit_resizes_to_its_fixed_input_size():
    enc = build_encoder("timm:vit_tiny_patch16_224", random_weights=True, device="cpu")
    assert enc.feature_dim == 192 and not enc.channels_last
    assert enc.encode(patches(2, size=112)).shape == (2, 192)        # resized to 224 inside the transform


@pytest.mark.filterwarnings("ignore:`torch.jit:FutureWarning")  # scripting is how sites still ship models
def test_torchscript_file(tmp_path):
    net = nn.Sequential(nn.Conv2d(3, 6, 3, stride=4), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    path = tmp_path / "tiny_encoder.pt"
    torch.jit.save(torch.jit.script(net), str(path))
    for name in (f"torchscript:{path}", str(path)):
        enc = build_encoder(name, device="cpu")
        assert (enc.encoder_id, enc.feature_dim, enc.weights_sha256) == (
            "torchscript:tiny_encoder.pt", 6, sha256_file(path))
        assert enc.encode(patches(3)).shape == (3, 6)
    bad = tmp_path / "spatial.pt"
    torch.jit.save(torch.jit.script(nn.Conv2d(3, 2, 3)), str(bad))
    with pytest.raises(EncoderError, match=r"expected \(B, D\) features"):
        build_encoder(f"torchscript:{bad}")
    with pytest.raises(EncoderError, match="carries its own weights"):
        build_encoder(str(path), random_weights=True)


def test_channels_last_matches_contiguous(random_r50):
    x = patches(2)
    a = random_r50                                    # convnet: channels-last by default
    b = build_encoder("resnet50_trunc", random_weights=True, device="cpu", channels_last=False)
    assert a.transform(x).is_contiguous(memory_format=torch.channels_last)
    assert b.transform(x).is_contiguous()
    np.testing.assert_allclose(a.encode(x), b.encode(x), rtol=1e-4, atol=1e-4)


def test_transform_normalises_with_imagenet_statistics(random_r50):
    enc = random_r50
    t = enc.transform(np.full((1, 4, 4, 3), 255, np.uint8))
    want = (1.0 - np.array(IMAGENET_MEAN)) / np.array(IMAGENET_STD)
    np.testing.assert_allclose(t[0, :, 0, 0].numpy(), want, rtol=1e-6)
    with pytest.raises(EncoderError, match=r"\(B, H, W, 3\) uint8"):
        enc.transform(np.zeros((1, 4, 4, 3), np.float32))


def test_null_encoder_is_a_pooled_thumbnail():
    enc = build_encoder("null", device="cpu")
    assert (enc.encoder_id, enc.weights_sha256, enc.feature_dim, enc.is_null) == ("null", "none", 48, True)
    x = np.zeros((1, 8, 8, 3), np.uint8)
    x[0, :, :, 0] = 255
    out = enc.encode(x).reshape(3, 4, 4)
    np.testing.assert_allclose(out[0], 1.0)
    np.testing.assert_allclose(out[1:], 0.0)
    odd = enc.encode(patches(2, size=10))                 # sizes that do not divide evenly still work
    assert odd.shape == (2, 48) and (odd >= 0).all() and (odd <= 1).all()
    with pytest.raises(EncoderError, match="no weights"):
        build_encoder("null", weights="w.pth")


# ----------------------------------------------------------------------------------------------
# The registry
# ----------------------------------------------------------------------------------------------

def _tiny_torchscript(tmp_path):
    net = nn.Sequential(nn.Conv2d(3, 6, 3, stride=4), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    path = tmp_path / "tiny_encoder.pt"
    torch.jit.save(torch.jit.script(net), str(path))
    return path


#: One concrete, download-free instance per registry entry: (name, build kwargs, expected width).
#: A new entry without an instance here fails test_every_registered_encoder_builds_at_its_declared_width.
REGISTRY_INSTANCES = {
    "resnet50_trunc": lambda tmp: ("resnet50_trunc", {"random_weights": True}, 1024),
    "timm:<name>": lambda tmp: ("timm:resnet18", {"random_weights": True}, 512),
    "torchscript:<path>": lambda tmp: (f"torchscript:{_tiny_torchscript(tmp)}", {}, 6),
    "null": lambda tmp: ("null", {}, 48),
}


@pytest.mark.filterwarnings("ignore:`torch.jit:FutureWarning")
def test_every_registered_encoder_builds_at_its_declared_width(tmp_path):
    assert sorted(REGISTRY_INSTANCES) == sorted(ENCODERS), "give each registry entry an instance above"
    x = patches(2, size=32)                                    # small: (2, 32, 32, 3) uint8
    for key, spec in ENCODERS.items():
        name, kwargs, width = REGISTRY_INSTANCES[key](tmp_path)
        assert resolve_encoder(name)[0] is spec
        enc = build_encoder(name, device="cpu", **kwargs)
        if spec.feature_dim is not None:                       # declared; else found by the dry run
            assert spec.feature_dim == width, key
        assert enc.feature_dim == width, key
        out = enc.encode(x)
        assert out.shape == (2, width) and out.dtype == np.float32 and np.isfinite(out).all(), key
        # the declared input handling is the one the transform applies
        if spec.normalisation == "thumbnail":
            assert isinstance(enc.transform, NullTransform), key
        else:
            assert isinstance(enc.transform, PatchTransform), key
            if spec.normalisation == "imagenet":
                np.testing.assert_allclose(enc.transform.mean.ravel().numpy(), IMAGENET_MEAN, rtol=1e-6)
                np.testing.assert_allclose(enc.transform.std.ravel().numpy(), IMAGENET_STD, rtol=1e-6)
            if spec.input_size is None or isinstance(spec.input_size, int):
                assert enc.transform.input_size == spec.input_size, key
        if spec.channels_last is not None:
            assert enc.channels_last == spec.channels_last, key


@pytest.mark.parametrize("name", ["resnet51", "", "NULL", "tim:resnet18", "torchscript", "weights.pth"])
def test_unknown_names_are_refused_listing_the_registered_ones(name):
    with pytest.raises(EncoderError) as e:
        build_encoder(name, random_weights=True, device="cpu")
    msg = str(e.value)
    assert msg == f"unknown encoder {name!r}; expected one of {', '.join(ENCODERS)}"
    assert all(known in msg for known in ENCODER_NAMES)


def test_names_resolve_to_their_family():
    assert ENCODER_NAMES == tuple(ENCODERS) == ("resnet50_trunc", "timm:<name>", "torchscript:<path>", "null")
    assert resolve_encoder("timm:vit_small_patch16_224") == (ENCODERS["timm:<name>"], "vit_small_patch16_224")
    assert resolve_encoder("torchscript:a/b.bin") == (ENCODERS["torchscript:<path>"], "a/b.bin")
    for sfx in TORCHSCRIPT_SUFFIXES:                           # bare paths by suffix, any case
        assert resolve_encoder(f"a/enc{sfx.upper()}") == (ENCODERS["torchscript:<path>"], f"a/enc{sfx.upper()}")
    assert resolve_encoder("timm:x.pt")[0] is ENCODERS["timm:<name>"]   # a prefix wins over a suffix
    assert resolve_encoder("null") == (ENCODERS["null"], "null")


def test_adding_an_encoder_is_one_entry(monkeypatch):
    monkeypatch.setattr(encoders, "ENCODERS", dict(ENCODERS))   # registrations vanish after the test

    @register("tiny_test", source="torchvision", feature_dim=8, normalisation="imagenet", input_size=16,
              channels_last=True)
    def _build(req):
        req.need_weights()
        torch.manual_seed(0)
        net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Conv2d(8, 8, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        return Built(net, "tiny_test", req.weights_sha256())

    enc = build_encoder("tiny_test", random_weights=True, device="cpu")
    assert (enc.encoder_id, enc.weights_sha256, enc.feature_dim, enc.channels_last) == ("tiny_test", "random", 8, True)
    assert enc.transform(patches(1, size=40)).shape == (1, 3, 16, 16)   # resized to the declared size
    assert enc.encode(patches(3, size=40)).shape == (3, 8)
    with pytest.raises(EncoderError, match="encoder tiny_test needs a weights file"):
        build_encoder("tiny_test", device="cpu")
    with pytest.raises(EncoderError, match=r"expected one of resnet50_trunc, .*, null, tiny_test$"):
        build_encoder("tiny_tset", device="cpu")
    with pytest.raises(ValueError, match="registered twice"):
        register("tiny_test", source="none", feature_dim=1, normalisation="imagenet", input_size=None,
                 channels_last=False)(_build)


def test_module_docstring_lists_the_registry():
    doc = encoders.__doc__
    assert re.findall(r"^\* ``([^`]+)``", doc, flags=re.M) == list(ENCODERS)
    assert all(f"``{sfx}``" in doc for sfx in TORCHSCRIPT_SUFFIXES)


def _readme_section(title):
    text = README.read_text(encoding="utf-8")
    m = re.search(rf"^#+ .*{re.escape(title)}\s*$(.*?)(?=^#+ )", text, flags=re.M | re.S | re.I)
    assert m, f"README.md has no section {title!r}"
    return m.group(1)


def test_readme_encoders_are_registered():
    """README's "Slides to features" names encoders only in examples, not as a list: each must resolve."""
    names = re.findall(r"--encoder\s+(\S+)", _readme_section("Slides to features"))
    assert names, "README's Slides to features section names no encoder"
    for name in names:
        spec, arg = resolve_encoder(name)
        assert spec.prefix is None or arg, name


def test_extract_cli_help_names_every_registered_encoder():
    from client.wsi.extract import DEFAULT_ENCODER, build_parser

    (action,) = [a for a in build_parser()._actions if "--encoder" in a.option_strings]
    for spec in ENCODERS.values():
        assert (spec.prefix or spec.name) in action.help, spec.name
    assert action.default == DEFAULT_ENCODER and resolve_encoder(DEFAULT_ENCODER)[0].prefix is None
