"""Patch encoders by name: a registry, a site's own weights file, and an identity the server can check.

A site turns patches into features with an encoder it has the weights for; nothing is downloaded
(these machines have no route to model hubs, and a hospital should know exactly which weights ran).
Every encoder therefore comes with an identity written into each feature file and the site's
manifest: ``encoder_id`` (the architecture), ``weights_sha256`` (the file's checksum, ``"random"``
for explicitly random weights, ``"none"`` for the parameter-free null encoder) and
``feature_dim``. The server refuses sites whose identities differ, so features from different
weights are never mixed.

Encoders live in a registry, :data:`ENCODERS`: one entry per family, registered with
:func:`register` on a small builder function. The entry states what the rest of the pipeline
needs to know (feature width, input size, normalisation, where the network comes from:
torchvision, timm, TorchScript or none) and the builder only constructs the model and loads its
weights; :func:`build_encoder` does the rest (device, memory format, autocast, dry run, transform)
once for all of them. Adding an encoder is one entry, and the names accepted, the names listed in
an unknown-name error and :data:`ENCODER_NAMES` are all read from the same table, so they cannot
drift apart. Names understood by :func:`build_encoder` (the registry's order):

* ``resnet50_trunc``: torchvision ResNet-50 up to ``layer3`` + global average pooling -> 1024 dims,
  ImageNet normalisation. The CLAM standard; loads a torchvision ``resnet50`` state dict (the
  ``layer4``/``fc`` keys are ignored).
* ``timm:<name>``: any timm architecture, built with ``pretrained=False, num_classes=0`` (pooled
  features), normalised with the model's own mean/std, then the weights file loaded strictly.
* ``torchscript:<path>`` or a path ending in ``.pt``/``.ts``/``.torchscript``: a TorchScript
  module taking (B, 3, H, W) ImageNet-normalised floats and returning (B, D); D is found by a dry run.
* ``null``: no network, a 4x4 pooled thumbnail per patch (48 numbers). For read/tile throughput
  benchmarks only; its id ``null`` tells a server to refuse it.

Example
-------
>>> enc = build_encoder("resnet50_trunc", weights="resnet50.pth")       # doctest: +SKIP
>>> feats = enc.encode(patches)        # patches: (B, 224, 224, 3) uint8 -> (B, 1024) float32
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor, nn

from smm_model.contract.atomic import sha256_file

__all__ = ["EncoderError", "PatchEncoder", "PatchTransform", "build_encoder", "load_state_dict_file",
           "ResNet50Trunc", "NullEncoder", "NullTransform", "ENCODER_NAMES", "IMAGENET_MEAN", "IMAGENET_STD",
           "RANDOM_WEIGHTS", "NO_WEIGHTS", "ENCODERS", "EncoderSpec", "BuildRequest", "Built", "register",
           "resolve_encoder"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
#: ``weights_sha256`` of an encoder built with explicitly random weights / with no weights at all.
RANDOM_WEIGHTS = "random"
NO_WEIGHTS = "none"
#: Seed of random weights, so two runs with ``--random-weights`` (tests, benchmarks) agree.
RANDOM_WEIGHTS_SEED = 0
#: Side of the dry-run input used to find a TorchScript or timm model's feature width.
DRY_RUN_SIZE = 224
#: The null encoder's pooled grid (NULL_GRID x NULL_GRID x 3 features), computed from every
#: NULL_SUBSAMPLE-th pixel: its cost must not show in the read-throughput it is used to measure.
NULL_GRID = 4
NULL_SUBSAMPLE = 8
#: Suffixes taken as TorchScript files when given as an encoder name.
TORCHSCRIPT_SUFFIXES = (".pt", ".ts", ".torchscript")
SAFETENSORS_SUFFIX = ".safetensors"
#: Key prefixes that wrappers add to state dicts (DataParallel/DDP, torch.compile, Opacus).
STATE_DICT_PREFIXES = ("module.", "_orig_mod.", "_module.")
#: Containers that training scripts wrap a state dict in.
STATE_DICT_CONTAINER_KEYS = ("state_dict", "model_state_dict", "model")
#: Keys of torchvision's resnet50 that the truncated trunk does not have.
RESNET50_DROPPED_PREFIXES = ("layer4.", "fc.")


class EncoderError(ValueError):
    """An encoder cannot be built or run: unknown name, missing or mismatched weights, bad output."""


# ----------------------------------------------------------------------------------------------
# Models
# ----------------------------------------------------------------------------------------------

class ResNet50Trunc(nn.Module):
    """ResNet-50 through ``layer3`` + global average pooling: (B, 3, H, W) -> (B, 1024).

    The submodules keep torchvision's names, so a torchvision ``resnet50`` state dict loads
    once its ``layer4.*`` and ``fc.*`` keys are dropped.
    """

    feature_dim = 1024

    def __init__(self) -> None:
        super().__init__()
        from torchvision.models import resnet50

        base = resnet50(weights=None)  # never download: weights come from the site's file
        self.conv1, self.bn1, self.relu, self.maxpool = base.conv1, base.bn1, base.relu, base.maxpool
        self.layer1, self.layer2, self.layer3 = base.layer1, base.layer2, base.layer3
        self.pool = nn.AdaptiveAvgPool2d(1)

    def forward(self, x: Tensor) -> Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer3(self.layer2(self.layer1(x)))
        return torch.flatten(self.pool(x), 1)


class NullEncoder(nn.Module):
    """A 4x4 average-pooled thumbnail per patch: measures reading and tiling, not a network.

    The pooling happens in its transform (:class:`NullTransform`, numpy on every 8th pixel), so
    no torch kernel runs: torch's worker threads would otherwise spin after each batch and steal
    the CPU from the very reading the null encoder is used to measure.
    """

    feature_dim = NULL_GRID * NULL_GRID * 3

    def forward(self, x: Tensor) -> Tensor:
        return x.reshape(x.shape[0], -1)


class NullTransform:
    """uint8 patches (B, H, W, 3) -> (B, 3 * NULL_GRID * NULL_GRID) block means in [0, 1], channel-major."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def __call__(self, patches: np.ndarray) -> Tensor:
        arr = np.asarray(patches)
        if arr.ndim != 4 or arr.shape[-1] != 3 or arr.dtype != np.uint8:
            raise EncoderError(f"expected patches as a (B, H, W, 3) uint8 array; got {arr.shape} {arr.dtype}")
        a = arr[:, ::NULL_SUBSAMPLE, ::NULL_SUBSAMPLE].astype(np.float32)
        h, w = a.shape[1:3]
        rows = np.minimum((np.arange(NULL_GRID) * h) // NULL_GRID, h - 1)
        cols = np.minimum((np.arange(NULL_GRID) * w) // NULL_GRID, w - 1)
        sums = np.add.reduceat(np.add.reduceat(a, rows, axis=1), cols, axis=2)  # (B, G, G, 3)
        counts = np.outer(np.diff(np.append(rows, h)), np.diff(np.append(cols, w))).clip(min=1)
        means = sums / counts[None, :, :, None] / 255.0
        return torch.from_numpy(np.ascontiguousarray(means.transpose(0, 3, 1, 2))).to(self.device)


# ----------------------------------------------------------------------------------------------
# Transform and the encoder object
# ----------------------------------------------------------------------------------------------

class PatchTransform:
    """uint8 patches (B, H, W, 3) -> normalised float (B, 3, S, S) on the encoder's device.

    The uint8 array is moved first (4x less to copy than floats), then scaled, normalised and,
    when ``input_size`` is set and differs, resized (bilinear, anti-aliased). Permuting NHWC to
    NCHW gives channels-last strides for free; ``channels_last=False`` makes it contiguous NCHW.
    """

    def __init__(self, mean: tuple[float, ...] | None, std: tuple[float, ...] | None,
                 device: torch.device, input_size: int | None = None, channels_last: bool = True) -> None:
        self.device = device
        self.input_size = input_size
        self.channels_last = channels_last
        self.mean = None if mean is None else torch.tensor(mean, device=device).view(1, 3, 1, 1)
        self.std = None if std is None else torch.tensor(std, device=device).view(1, 3, 1, 1)

    def __call__(self, patches: np.ndarray) -> Tensor:
        arr = np.asarray(patches)
        if arr.ndim != 4 or arr.shape[-1] != 3 or arr.dtype != np.uint8:
            raise EncoderError(f"expected patches as a (B, H, W, 3) uint8 array; got {arr.shape} {arr.dtype}")
        x = torch.from_numpy(np.ascontiguousarray(arr)).to(self.device, non_blocking=True)
        x = x.permute(0, 3, 1, 2).float().div_(255.0)
        if self.input_size is not None and tuple(x.shape[-2:]) != (self.input_size, self.input_size):
            x = nn.functional.interpolate(x, size=(self.input_size, self.input_size), mode="bilinear",
                                          align_corners=False, antialias=True)
        if self.mean is not None and self.std is not None:
            x = x.sub_(self.mean).div_(self.std)  # in place: one pass less over a large batch
        fmt = torch.channels_last if self.channels_last else torch.contiguous_format
        return x.contiguous(memory_format=fmt)


@dataclass
class PatchEncoder:
    """A ready-to-run encoder and its identity (what feature files and the manifest record)."""

    model: nn.Module
    transform: Callable[[np.ndarray], Tensor]
    encoder_id: str
    weights_sha256: str
    feature_dim: int
    device: torch.device
    channels_last: bool = False
    autocast_dtype: torch.dtype | None = None

    @property
    def is_null(self) -> bool:
        return self.encoder_id == "null"

    def encode(self, patches: np.ndarray) -> np.ndarray:
        """(B, H, W, 3) uint8 -> (B, feature_dim) float32, under inference mode (and autocast on GPU)."""
        if len(patches) == 0:
            return np.zeros((0, self.feature_dim), dtype=np.float32)
        with torch.inference_mode():
            x = self.transform(patches)
            amp = (torch.autocast(device_type=self.device.type, dtype=self.autocast_dtype)
                   if self.autocast_dtype is not None else nullcontext())
            with amp:
                out = self.model(x)
            out = out.float().reshape(out.shape[0], -1).cpu().numpy()
        if out.shape != (len(patches), self.feature_dim):
            raise EncoderError(f"encoder {self.encoder_id} returned {out.shape}; expected "
                               f"({len(patches)}, {self.feature_dim})")
        if not np.isfinite(out).all():
            raise EncoderError(f"encoder {self.encoder_id} produced NaN/Inf features"
                               + (f" under {self.autocast_dtype} autocast" if self.autocast_dtype else ""))
        return out

    __call__ = encode


# ----------------------------------------------------------------------------------------------
# Weights
# ----------------------------------------------------------------------------------------------

def load_state_dict_file(path: str | Path) -> dict[str, Tensor]:
    """A state dict from a ``torch.save`` or ``.safetensors`` file, unwrapped, wrapper prefixes removed.

    ``torch.save`` files load with ``weights_only=True`` (no arbitrary code from a pickle).
    Accepts a bare state dict or one inside ``{"state_dict" | "model_state_dict" | "model": ...}``,
    and strips the ``module.``/``_orig_mod.``/``_module.`` prefixes that DDP, torch.compile and
    Opacus add. Model hubs ship ``.safetensors``; those are read with the safetensors library.
    """
    path = Path(path)
    if not path.is_file():
        raise EncoderError(f"{path}: weights file not found")
    try:
        if path.suffix.lower() == SAFETENSORS_SUFFIX:
            from safetensors.torch import load_file

            obj: Any = load_file(str(path), device="cpu")
        else:
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle errors, zip errors, unsupported globals: all mean "not a state dict"
        kind = ("safetensors file" if path.suffix.lower() == SAFETENSORS_SUFFIX
                else "PyTorch state dict saved with torch.save")
        raise EncoderError(f"{path}: not a {kind} ({type(e).__name__}: "
                           f"{str(e).splitlines()[0] if str(e) else ''})") from None
    for key in STATE_DICT_CONTAINER_KEYS:
        if isinstance(obj, Mapping) and isinstance(obj.get(key), Mapping):
            obj = obj[key]
            break
    if not isinstance(obj, Mapping) or not obj or not all(isinstance(v, Tensor) for v in obj.values()):
        raise EncoderError(f"{path}: expected a state dict (parameter name -> tensor); got "
                           f"{type(obj).__name__}")
    sd = {str(k): v for k, v in obj.items()}
    for prefix in STATE_DICT_PREFIXES:
        if all(k.startswith(prefix) for k in sd):
            sd = {k[len(prefix):]: v for k, v in sd.items()}
    return sd


def _load_strict(model: nn.Module, sd: Mapping[str, Tensor], path: Path, expected: str) -> None:
    """``load_state_dict(strict=True)`` with an error that lists what is missing or extra."""
    own = model.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    shape = [f"{k} {tuple(sd[k].shape)} vs {tuple(own[k].shape)}" for k in own
             if k in sd and tuple(sd[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or shape:
        parts = []
        for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", shape)):
            if keys:
                parts.append(f"{len(keys)} {label} (e.g. {', '.join(keys[:3])})")
        raise EncoderError(f"{path}: does not match {expected}: {'; '.join(parts)}")
    model.load_state_dict(sd, strict=True)


# ----------------------------------------------------------------------------------------------
# Helpers the factory and the builders share
# ----------------------------------------------------------------------------------------------

def _resolve_device(spec: str | torch.device) -> torch.device:
    if isinstance(spec, torch.device):
        dev = spec
    elif spec == "auto":
        dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        try:
            dev = torch.device(spec)
        except RuntimeError as e:
            raise EncoderError(f"device {spec!r}: {e}; expected auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise EncoderError(f"device {spec!r} requested but no CUDA device is available; use --device cpu")
    return dev


def _n_convs(model: nn.Module) -> int:
    return sum(isinstance(m, nn.Conv2d) for m in model.modules())


def _dry_run_dim(model: nn.Module, device: torch.device, size: int, what: str) -> int:
    with torch.inference_mode():
        out = model(torch.zeros(1, 3, size, size, device=device))
    if not isinstance(out, Tensor):
        raise EncoderError(f"{what}: expected the model to return a tensor of features; got "
                           f"{type(out).__name__}")
    if out.ndim < 2 or any(d != 1 for d in out.shape[2:]):
        raise EncoderError(f"{what}: expected (B, D) features from a (1, 3, {size}, {size}) input; "
                           f"got shape {tuple(out.shape)}")
    return int(out.shape[1])


def _random_init(ctor: Callable[[], nn.Module]) -> nn.Module:
    """Build with a fixed seed without disturbing the caller's random state."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(RANDOM_WEIGHTS_SEED)
        return ctor()


# ----------------------------------------------------------------------------------------------
# The registry
# ----------------------------------------------------------------------------------------------

#: How an entry's patches are turned into network input: ImageNet mean/std, the timm model's own
#: mean/std (ImageNet where its config has none), or the null encoder's pooled thumbnail.
Normalisation = Literal["imagenet", "model", "thumbnail"]
#: Where an entry's network comes from.
Source = Literal["torchvision", "timm", "torchscript", "none"]


@dataclass(frozen=True)
class BuildRequest:
    """What a builder is asked for: the full name, its argument, and the weights it may use.

    ``arg`` is what follows a family's prefix (``timm:vit_small_patch16_224`` -> the architecture,
    ``torchscript:enc.pt`` -> the path) and the whole name for a plain or suffix-matched entry.
    """

    name: str
    arg: str
    weights: Path | None
    random_weights: bool

    def need_weights(self) -> None:
        """Refuse unless a weights file is named or random weights were asked for explicitly."""
        if self.weights is None and not self.random_weights:
            raise EncoderError(f"encoder {self.name} needs a weights file (--weights FILE): nothing is "
                               "downloaded here. Pass --random-weights to run with random weights on "
                               "purpose (tests and benchmarks only; the features are meaningless)")

    def weights_sha256(self) -> str:
        return RANDOM_WEIGHTS if self.weights is None else sha256_file(self.weights)


@dataclass
class Built:
    """A builder's result: the model and its identity, plus what only the built model knows.

    ``mean``/``std`` are read when the entry's normalisation is ``"model"``, ``input_size`` when
    its input size is ``"model"``; ``None`` there means ImageNet statistics / patches as given.
    """

    model: nn.Module
    encoder_id: str
    weights_sha256: str
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    input_size: int | None = None


@dataclass(frozen=True)
class EncoderSpec:
    """One registry entry: everything about an encoder family except the code that builds it.

    ``name`` is a plain name (``resnet50_trunc``) or a family pattern (``timm:<name>``: every name
    starting with ``timm:``); ``suffixes`` also route bare file names here. ``feature_dim`` is
    the output width, ``None`` where it depends on the architecture or file and is found by a dry
    run. ``input_size`` is the side patches are resized to: ``None`` = as given, an int = always that
    side, ``"model"`` = the built model's fixed input size when it has one. ``channels_last`` is the
    default memory format, ``None`` = channels-last when the built model has more than one conv.
    """

    name: str
    source: Source
    feature_dim: int | None
    normalisation: Normalisation
    input_size: int | Literal["model"] | None
    channels_last: bool | None
    build: Callable[[BuildRequest], Built]
    suffixes: tuple[str, ...] = ()

    @property
    def prefix(self) -> str | None:
        """``"timm:"`` for the pattern ``timm:<name>``; ``None`` for a plain name."""
        return self.name.split("<", 1)[0] if "<" in self.name else None


#: The encoder registry, in the order names are listed in docs and errors.
ENCODERS: dict[str, EncoderSpec] = {}


def register(name: str, *, source: Source, feature_dim: int | None, normalisation: Normalisation,
             input_size: int | Literal["model"] | None, channels_last: bool | None,
             suffixes: tuple[str, ...] = ()
             ) -> Callable[[Callable[[BuildRequest], Built]], Callable[[BuildRequest], Built]]:
    """Register the decorated builder under ``name``: ``@register("name", source=..., ...)``."""

    def deco(build: Callable[[BuildRequest], Built]) -> Callable[[BuildRequest], Built]:
        if name in ENCODERS:
            raise ValueError(f"encoder {name!r} is registered twice")
        ENCODERS[name] = EncoderSpec(name=name, source=source, feature_dim=feature_dim,
                                     normalisation=normalisation, input_size=input_size,
                                     channels_last=channels_last, build=build, suffixes=suffixes)
        return build

    return deco


@register("resnet50_trunc", source="torchvision", feature_dim=ResNet50Trunc.feature_dim,
          normalisation="imagenet", input_size=None, channels_last=True)
def _build_resnet50_trunc(req: BuildRequest) -> Built:
    """CLAM's ResNet-50 to layer3 + pooling, from a torchvision resnet50 state dict."""
    req.need_weights()
    model = _random_init(ResNet50Trunc)
    if req.weights is not None:
        sd = load_state_dict_file(req.weights)
        sd = {k: v for k, v in sd.items() if not k.startswith(RESNET50_DROPPED_PREFIXES)}
        _load_strict(model, sd, req.weights, "a torchvision resnet50 state dict (conv1, bn1, "
                     "layer1-3; layer4/fc are ignored)")
    return Built(model, "resnet50_trunc", req.weights_sha256())


@register("timm:<name>", source="timm", feature_dim=None, normalisation="model", input_size="model",
          channels_last=None)
def _build_timm(req: BuildRequest) -> Built:
    """Any timm architecture, num_classes=0 (pooled features), the weights file loaded strictly."""
    arch = req.arg
    import timm

    if not timm.is_model(arch):
        close = timm.list_models(f"*{arch.split('_')[0]}*")[:8] if arch else []
        raise EncoderError(f"timm has no architecture {arch!r}"
                           + (f"; similar: {', '.join(close)}" if close else ""))
    req.need_weights()
    model = _random_init(lambda: timm.create_model(arch, pretrained=False, num_classes=0))
    cfg = dict(getattr(model, "pretrained_cfg", {}) or {})
    if req.weights is not None:
        sd = load_state_dict_file(req.weights)
        heads = cfg.get("classifier") or ()
        heads = (heads,) if isinstance(heads, str) else tuple(heads)
        own = model.state_dict()
        # num_classes=0 removes the classifier, so a full checkpoint's head keys are expected extras.
        sd = {k: v for k, v in sd.items() if k in own or not any(k.startswith(h + ".") for h in heads)}
        _load_strict(model, sd, req.weights, f"timm {arch} (num_classes=0)")
    size = (int(cfg.get("input_size", (3, DRY_RUN_SIZE, DRY_RUN_SIZE))[-1])
            if cfg.get("fixed_input_size") else None)
    return Built(model, f"timm:{arch}", req.weights_sha256(), mean=tuple(cfg.get("mean", IMAGENET_MEAN)),
                 std=tuple(cfg.get("std", IMAGENET_STD)), input_size=size)


@register("torchscript:<path>", source="torchscript", feature_dim=None, normalisation="imagenet",
          input_size=None, channels_last=False, suffixes=TORCHSCRIPT_SUFFIXES)
def _build_torchscript(req: BuildRequest) -> Built:
    """A TorchScript file, (B, 3, H, W) ImageNet-normalised -> (B, D); carries its own weights."""
    ts_path = Path(req.arg)
    if req.weights is not None or req.random_weights:
        raise EncoderError("a TorchScript file carries its own weights; drop --weights/--random-weights")
    if not ts_path.is_file():
        raise EncoderError(f"{ts_path}: TorchScript file not found")
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*jit.*deprecated.*")
            model = torch.jit.load(str(ts_path), map_location="cpu")
    except Exception as e:
        raise EncoderError(f"{ts_path}: not a TorchScript module saved with torch.jit.save "
                           f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
    return Built(model, f"torchscript:{ts_path.name}", sha256_file(ts_path))


@register("null", source="none", feature_dim=NullEncoder.feature_dim, normalisation="thumbnail",
          input_size=None, channels_last=False)
def _build_null(req: BuildRequest) -> Built:
    """No network: a 4x4 pooled thumbnail per patch, for read-throughput tests only."""
    if req.weights is not None:
        raise EncoderError("the null encoder has no weights; drop --weights")
    return Built(NullEncoder(), "null", NO_WEIGHTS)


#: The names registered in this module, family patterns included (errors read :data:`ENCODERS` itself).
ENCODER_NAMES = tuple(ENCODERS)


def resolve_encoder(name: str) -> tuple[EncoderSpec, str]:
    """The registry entry for ``name`` and the argument its builder gets.

    A plain name matches itself; a family pattern (``timm:<name>``) matches by prefix; a name ending
    in an entry's suffix (``enc.pt``) matches that entry. Unknown names raise :class:`EncoderError`
    listing the registered names.
    """
    spec = ENCODERS.get(name)
    if spec is not None and spec.prefix is None:
        return spec, name
    for spec in ENCODERS.values():
        if spec.prefix is not None and name.startswith(spec.prefix):
            return spec, name[len(spec.prefix):]
    suffix = Path(name).suffix.lower()
    for spec in ENCODERS.values():
        if suffix and suffix in spec.suffixes:
            return spec, name
    raise EncoderError(f"unknown encoder {name!r}; expected one of {', '.join(ENCODERS)}")


# ----------------------------------------------------------------------------------------------
# The factory
# ----------------------------------------------------------------------------------------------

def build_encoder(name: str, weights: str | Path | None = None, random_weights: bool = False,
                  device: str | torch.device = "auto", channels_last: bool | None = None,
                  input_size: int = DRY_RUN_SIZE) -> PatchEncoder:
    """Build a patch encoder by name (see :data:`ENCODERS` and the module docstring for the names).

    ``weights`` is a file the site holds; without it the factory refuses, unless
    ``random_weights=True`` says explicitly that random features are wanted (tests, benchmarks,
    plumbing checks), so a forgotten flag can never produce a site full of meaningless features.
    ``channels_last=None`` uses channels-last memory for convolutional networks (faster on CPU
    and on tensor cores) and not for transformers. ``input_size`` is the dry-run size for
    TorchScript models. On CUDA the forward runs under bf16 autocast (fp16 where bf16 is missing).
    """
    dev = _resolve_device(device)
    if weights is not None and random_weights:
        raise EncoderError("give either a weights file or random_weights=True, not both")
    spec, arg = resolve_encoder(name)
    built = spec.build(BuildRequest(name=name, arg=arg, weights=None if weights is None else Path(weights),
                                    random_weights=random_weights))

    if spec.normalisation == "model":
        mean, std = built.mean or IMAGENET_MEAN, built.std or IMAGENET_STD
    else:
        mean, std = IMAGENET_MEAN, IMAGENET_STD
    size = built.input_size if spec.input_size == "model" else spec.input_size
    convnet = _n_convs(built.model) > 1 if spec.channels_last is None else spec.channels_last

    model = built.model.eval().to(dev)
    use_cl = convnet if channels_last is None else bool(channels_last)
    if use_cl:
        model = model.to(memory_format=torch.channels_last)
    dim = spec.feature_dim
    if dim is None:
        dim = _dry_run_dim(model, dev, size or input_size, built.encoder_id)  # (1, 3, S, S) -> (1, D)
    amp = None
    if dev.type == "cuda":
        amp = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    transform: Callable[[np.ndarray], Tensor] = (
        NullTransform(dev) if spec.normalisation == "thumbnail"          # (B, H, W, 3) -> (B, 3 * G * G)
        else PatchTransform(mean, std, dev, input_size=size, channels_last=use_cl))  # -> (B, 3, S, S)
    return PatchEncoder(model=model, transform=transform, encoder_id=built.encoder_id,
                        weights_sha256=built.weights_sha256, feature_dim=int(dim), device=dev,
                        channels_last=use_cl, autocast_dtype=amp)
