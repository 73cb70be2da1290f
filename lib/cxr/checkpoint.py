"""Checkpoints: a directory (local or ``s3://``) holding ``model.safetensors`` and ``model.json``.

``model.json`` records everything scoring needs so it cannot drift from training: the backbone,
class names, the preprocessing spec, the decision threshold (chosen on validation), a softmax
temperature (calibration), and provenance (data fingerprint, metrics, versions, training config).
Loading reads JSON and safetensors only: nothing is ever unpickled.

An *ensemble* checkpoint is a directory whose ``model.json`` has ``"kind": "ensemble"`` and lists member
checkpoint subfolders (``members/<name>/``, each an ordinary checkpoint); its probability is the mean of the
members' calibrated probabilities, with its own threshold. All members share one preprocessing spec (enforced
when saving and loading). :func:`load_checkpoint` returns an object with the same interface either way.
"""

from __future__ import annotations

import hashlib
import json
import platform
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from . import storage
from .errors import CheckpointError
from .preprocess import TTA_CHOICES, PreprocessSpec

FORMAT = "cxr-checkpoint"
FORMAT_VERSION = 2  # 2: ``tta``. A checkpoint records the lowest version that reads it right (1 without TTA), so
# older code refuses a TTA checkpoint instead of scoring it without the augmentation its threshold assumes.
WEIGHTS_FILE = "model.safetensors"
META_FILE = "model.json"
DEFAULT_MODEL = "default"
ENSEMBLE = "ensemble"
CLASS_NAMES = ("non", "covid")
POSITIVE_CLASS = "covid"


@dataclass
class ModelInfo:
    backbone: str
    preprocess: PreprocessSpec = field(default_factory=PreprocessSpec)
    class_names: tuple[str, ...] = CLASS_NAMES
    positive_class: str = POSITIVE_CLASS
    threshold: float = 0.5
    temperature: float = 1.0
    provenance: dict = field(default_factory=dict)
    weights_sha256: str = ""
    kind: str = "model"  # or "ensemble": ``members`` are checkpoint subfolders, ``backbone`` is "ensemble"
    members: tuple[str, ...] = ()
    tta: str = "none"  # test-time augmentation (models.TTA_CHOICES): "hflip" averages the logits of the mirror image

    @property
    def positive_index(self) -> int:
        return self.class_names.index(self.positive_class)

    @property
    def model_id(self) -> str:
        return f"{self.backbone}@{self.weights_sha256[:12]}"

    def to_dict(self) -> dict:
        kind = {"kind": ENSEMBLE, "members": list(self.members)} if self.kind == ENSEMBLE else {}
        return {
            "format": FORMAT,
            "format_version": 1 if self.tta == "none" else 2,
            **kind,
            "backbone": self.backbone,
            "num_classes": len(self.class_names),
            "class_names": list(self.class_names),
            "positive_class": self.positive_class,
            "preprocess": self.preprocess.to_dict(),
            "threshold": float(self.threshold),
            "temperature": float(self.temperature),
            "tta": self.tta,
            "weights_sha256": self.weights_sha256,
            "provenance": self.provenance,
        }

    @classmethod
    def from_dict(cls, d: dict) -> ModelInfo:
        if not isinstance(d, dict):
            raise CheckpointError(f"invalid model.json: expected an object, got {type(d).__name__}")
        if d.get("format") != FORMAT:
            raise CheckpointError(f"not a {FORMAT} model.json (format={d.get('format')!r})")
        try:
            version = int(d.get("format_version") or 0)
        except (TypeError, ValueError) as exc:
            raise CheckpointError(f"invalid model.json: format_version {d.get('format_version')!r}") from exc
        if version > FORMAT_VERSION:
            raise CheckpointError(
                f"checkpoint format_version {version} is newer than this code supports ({FORMAT_VERSION})"
            )
        try:
            info = cls(
                backbone=d["backbone"],
                preprocess=PreprocessSpec.from_dict(d["preprocess"]),
                class_names=tuple(d["class_names"]),
                positive_class=d["positive_class"],
                threshold=float(d["threshold"]),
                temperature=float(d.get("temperature", 1.0)),
                provenance=d.get("provenance", {}),
                weights_sha256=d.get("weights_sha256", ""),
                kind=d.get("kind", "model"),
                members=tuple(d.get("members", ())),
                tta=str(d.get("tta", "none")),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise CheckpointError(f"invalid model.json: {exc}") from exc
        if info.positive_class not in info.class_names:
            raise CheckpointError(f"positive_class {info.positive_class!r} not in class_names {info.class_names}")
        if not 0.0 <= info.threshold <= 1.0 or not 0.0 < info.temperature < float("inf"):  # also rejects NaN
            raise CheckpointError("threshold must be in [0, 1] and temperature > 0")
        if info.tta not in TTA_CHOICES:
            raise CheckpointError(
                f"unknown test-time augmentation tta={info.tta!r} (this code knows {', '.join(TTA_CHOICES)})"
            )
        if info.kind not in ("model", ENSEMBLE):
            raise CheckpointError(f"unknown checkpoint kind {info.kind!r}")
        if info.kind == ENSEMBLE:
            if not info.members or not all(isinstance(m, str) and m for m in info.members):
                raise CheckpointError("an ensemble model.json needs a non-empty list of member folders")
            if any(m.startswith("/") or ".." in m.split("/") or "://" in m for m in info.members):
                raise CheckpointError("ensemble members must be relative subfolders of the ensemble checkpoint")
        return info


def default_model_path() -> str:
    return str(Path(__file__).parent / "assets" / "models" / "default")


def resolve(uri: str) -> str:
    """``default`` names the model shipped with the package; anything else is a directory URI."""
    return default_model_path() if uri == DEFAULT_MODEL else uri


def versions() -> dict:
    import torch
    import torchvision

    from . import __version__

    out = {
        "cxr": __version__,
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "python": platform.python_version(),
    }
    try:
        import ray

        out["ray"] = ray.__version__
    except ImportError:
        pass
    return out


def save_checkpoint(model, info: ModelInfo, uri: str) -> ModelInfo:
    """Write ``model``'s weights and ``info`` to the directory ``uri``; returns info with the weights hash."""
    from safetensors.torch import save

    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    blob = save(state)
    info.weights_sha256 = hashlib.sha256(blob).hexdigest()
    info.provenance.setdefault("created_at", datetime.now(UTC).isoformat(timespec="seconds"))
    info.provenance.setdefault("versions", versions())
    storage.write_bytes(storage.join(uri, WEIGHTS_FILE), blob)
    storage.write_bytes(storage.join(uri, META_FILE), json.dumps(info.to_dict(), indent=2, sort_keys=False).encode())
    return info


def load_info(uri: str, settings: storage.S3Settings | None = None) -> ModelInfo:
    """Read and validate ``model.json`` only (cheap; used by drivers before starting work)."""
    uri = resolve(uri)
    try:
        raw = storage.read_bytes(storage.join(uri, META_FILE), settings)
    except (FileNotFoundError, OSError) as exc:
        raise CheckpointError(f"cannot read {storage.join(uri, META_FILE)}: {storage.describe_error(exc)}") from exc
    try:
        return ModelInfo.from_dict(json.loads(raw))
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{storage.join(uri, META_FILE)} is not valid JSON: {exc}") from exc


def optimize_for_inference(model, device: str = "cpu"):
    """Fold batch norms into convolutions (torch.fx) and use channels-last memory: 1.4-2.8x faster on
    CPU for the five backbones, same outputs within float tolerance. Models that torch.fx cannot trace
    (some timm models) are returned unfused."""
    import torch

    model = model.eval().to(device)
    try:
        from torch.fx.experimental.optimization import fuse

        model = fuse(model)
    except Exception:  # noqa: BLE001 - tracing is an optimisation, never a requirement
        pass
    return model.to(memory_format=torch.channels_last)


PRECISIONS = ("auto", "fp32", "bf16", "fp16")


def autocast_dtype(device: str, precision: str = "auto"):
    """The autocast dtype for inference on ``device``, or None for plain float32.

    ``auto``: bfloat16 on a CUDA GPU that supports it, else float16 there; float32 on CPU (where
    bfloat16 is slower without AMX and changes results for nothing). ``fp32``/``bf16``/``fp16`` force
    one (``bf16`` on CPU is how the tests exercise the mixed-precision path)."""
    import torch

    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    kind = torch.device(device).type
    if precision == "auto":
        if kind != "cuda":
            return None
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


class LoadedModel:
    """A checkpoint ready for inference: the one place that turns preprocessed images into probabilities.

    On a CUDA device: autocast to bfloat16 (float16 where unsupported), channels-last, the (N, S, S)
    batch copied once from pinned memory without blocking and expanded/normalised on the device."""

    def __init__(self, model, info: ModelInfo, device: str = "cpu", optimize: bool = True, precision: str = "auto"):
        import torch

        self.amp_dtype = autocast_dtype(device, precision)
        self.model = optimize_for_inference(model, device) if optimize else model.eval().to(device)
        if self.amp_dtype is not None:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.info = info
        self.device = device
        self._cuda = torch.device(device).type == "cuda"
        if self._cuda:
            torch.backends.cudnn.benchmark = True

    def logits(self, images):
        """(N, S, S) preprocessed images (array, or tensor on any device) -> (N, num_classes) float32 logits tensor
        (no grad), with the checkpoint's test-time augmentation (``info.tta``)."""
        import torch

        from .models import forward_tta
        from .preprocess import as_float_tensor, to_model_input

        x = as_float_tensor(images)
        if self._cuda and x.device.type == "cpu":  # one channel travels, not three: expand and normalise on the GPU
            x = x.pin_memory().to(self.device, non_blocking=True)
        x = to_model_input(x, self.info.preprocess).to(self.device, memory_format=torch.channels_last)
        with (
            torch.inference_mode(),
            torch.autocast(
                torch.device(self.device).type,
                dtype=self.amp_dtype or torch.float32,
                enabled=self.amp_dtype is not None,
            ),
        ):
            return forward_tta(self.model, x, self.info.tta)

    def predict_proba(self, images) -> np.ndarray:
        """Calibrated probability of the positive class, float32 (N,); ``images`` as for :meth:`logits`."""
        import torch

        logits = self.logits(images) / self.info.temperature
        return torch.softmax(logits, dim=1)[:, self.info.positive_index].cpu().numpy().astype(np.float32)


class LoadedEnsemble:
    """An ensemble checkpoint ready for inference: the same interface as :class:`LoadedModel`.

    ``predict_proba`` is the mean of the members' calibrated probabilities (each member applies its own
    temperature); the ensemble's threshold is its own, chosen on validation."""

    def __init__(self, members: list[LoadedModel], info: ModelInfo):
        self.members = members
        self.info = info
        self.device = members[0].device

    def member_probas(self, images: np.ndarray) -> np.ndarray:
        """(num_members, N) calibrated probabilities of the positive class."""
        return np.stack([m.predict_proba(images) for m in self.members])

    def predict_proba(self, images: np.ndarray) -> np.ndarray:
        return self.member_probas(images).mean(axis=0).astype(np.float32)

    def logits(self, images: np.ndarray):
        """(N, 2) log-probabilities of the mean probability (softmax of them gives it back)."""
        import torch

        p = torch.as_tensor(self.predict_proba(images), dtype=torch.float64).clamp(1e-12, 1 - 1e-12)
        cols = [None, None]
        cols[self.info.positive_index], cols[1 - self.info.positive_index] = p.log(), (1 - p).log()
        return torch.stack(cols, dim=1).float()


def ensemble_hash(member_infos: list[ModelInfo]) -> str:
    """The ensemble's identity: a hash over its members' weight hashes, in order."""
    return hashlib.sha256("\n".join(m.weights_sha256 for m in member_infos).encode()).hexdigest()


def save_ensemble(
    members: dict[str, str],
    uri: str,
    threshold: float,
    provenance: dict | None = None,
    settings: storage.S3Settings | None = None,
) -> ModelInfo:
    """Write an ensemble checkpoint at ``uri``: each of ``members`` (name -> checkpoint URI) is copied to
    ``members/<name>/``. Refuses members with different preprocessing specs or class names."""
    if not members:
        raise CheckpointError("an ensemble needs at least one member")
    infos, rel = [], []
    for name, src in members.items():
        info = load_info(src, settings)
        if info.kind == ENSEMBLE:
            raise CheckpointError(f"member {name} is itself an ensemble")
        if infos and (
            info.preprocess != infos[0].preprocess
            or info.class_names != infos[0].class_names
            or info.positive_class != infos[0].positive_class
        ):
            raise CheckpointError(
                f"ensemble members must share one preprocessing spec and class names: {name} has "
                f"{info.preprocess.to_dict()} {info.class_names}, {rel[0]} has {infos[0].preprocess.to_dict()} "
                f"{infos[0].class_names}"
            )
        for f in (WEIGHTS_FILE, META_FILE):
            storage.write_bytes(
                storage.join(uri, "members", name, f),
                storage.read_bytes(storage.join(resolve(src), f), settings),
                settings,
            )
        infos.append(info)
        rel.append(f"members/{name}")
    ens = ModelInfo(
        ENSEMBLE,
        infos[0].preprocess,
        infos[0].class_names,
        infos[0].positive_class,
        threshold=float(threshold),
        provenance=dict(provenance or {}),
        weights_sha256=ensemble_hash(infos),
        kind=ENSEMBLE,
        members=tuple(rel),
    )
    ens.provenance.setdefault("created_at", datetime.now(UTC).isoformat(timespec="seconds"))
    ens.provenance.setdefault("versions", versions())
    storage.write_bytes(storage.join(uri, META_FILE), json.dumps(ens.to_dict(), indent=2).encode(), settings)
    return ens


def load_checkpoint(
    uri: str,
    device: str = "cpu",
    optimize: bool = True,
    settings: storage.S3Settings | None = None,
    precision: str = "auto",
) -> LoadedModel | LoadedEnsemble:
    """``settings``: S3 endpoint/region captured on the driver (default: this process's environment);
    ``precision``: see :func:`autocast_dtype` (``auto``: mixed precision on CUDA, float32 on CPU).

    Every failure of the checkpoint is a :class:`CheckpointError` naming the model (what jobs turn into exit
    code 4); a bad argument stays a ValueError."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    try:
        return _load_checkpoint(uri, device, optimize, settings, precision)
    except CheckpointError:
        raise
    except Exception as exc:
        raise CheckpointError(f"cannot load model {uri}: {storage.describe_error(exc)}") from exc


def _load_checkpoint(
    uri: str, device: str, optimize: bool, settings: storage.S3Settings | None, precision: str
) -> LoadedModel | LoadedEnsemble:
    from safetensors.torch import load

    from .models import create_model

    info = load_info(uri, settings)
    uri = resolve(uri)
    if info.kind == ENSEMBLE:
        members = [load_checkpoint(storage.join(uri, m), device, optimize, settings, precision) for m in info.members]
        if any(isinstance(m, LoadedEnsemble) for m in members):
            raise CheckpointError(f"{uri}: ensemble members must be single models")
        if any(m.info.preprocess != info.preprocess or m.info.class_names != info.class_names for m in members):
            raise CheckpointError(
                f"{uri}: ensemble members do not share the ensemble's preprocessing spec and class names"
            )
        digest = ensemble_hash([m.info for m in members])
        if info.weights_sha256 and digest != info.weights_sha256:
            raise CheckpointError(f"{uri}: members do not match the hash in model.json (corrupted or replaced)")
        info.weights_sha256 = digest
        return LoadedEnsemble(members, info)
    try:
        blob = storage.read_bytes(storage.join(uri, WEIGHTS_FILE), settings)
    except (FileNotFoundError, OSError) as exc:
        raise CheckpointError(f"cannot read {storage.join(uri, WEIGHTS_FILE)}: {storage.describe_error(exc)}") from exc
    digest = hashlib.sha256(blob).hexdigest()
    if info.weights_sha256 and digest != info.weights_sha256:
        raise CheckpointError(
            f"{storage.join(uri, WEIGHTS_FILE)} does not match the hash in model.json (corrupted or replaced)"
        )
    info.weights_sha256 = digest
    try:
        model = create_model(info.backbone, weights="none", num_classes=len(info.class_names))
        model.load_state_dict(load(blob), strict=True)
    except Exception as exc:
        raise CheckpointError(f"weights in {uri} do not fit backbone {info.backbone}: {exc}") from exc
    return LoadedModel(model, info, device, optimize, precision)
