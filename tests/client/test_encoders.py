"""Encoders: the factory, weights files and checksums, timm and TorchScript models, memory format."""

import numpy as np
import pytest
import torch
from torch import nn

from client.wsi.encoders import (IMAGENET_MEAN, IMAGENET_STD, EncoderError, ResNet50Trunc, build_encoder,
                             load_state_dict_file)
from client.site.folder import file_sha256


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
    assert enc.weights_sha256 == file_sha256(resnet50_file)
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
    assert enc2.weights_sha256 == file_sha256(wrapped) != enc.weights_sha256


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
    assert (enc.encoder_id, enc.feature_dim, enc.weights_sha256) == ("timm:resnet18", 512, file_sha256(path))
    x = patches(2)
    with torch.inference_mode():
        want = src.eval().forward_head(src.forward_features(enc.transform(x)), pre_logits=True).numpy()
    np.testing.assert_allclose(enc.encode(x), want, rtol=1e-4, atol=1e-4)
    # the same weights as a hub-style .safetensors file
    from safetensors.torch import save_file

    st = tmp_path / "model.safetensors"
    save_file(src.state_dict(), str(st))
    enc_st = build_encoder("timm:resnet18", weights=st, device="cpu")
    assert enc_st.weights_sha256 == file_sha256(st)
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
            "torchscript:tiny_encoder.pt", 6, file_sha256(path))
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
