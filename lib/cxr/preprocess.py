"""One preprocessing function for training and scoring, driven by a spec stored in the checkpoint.

Two steps, split so that the heavy part runs where the data is decoded (Ray Data tasks, no torch)
and the cheap tensor part runs next to the model:

    decode.Decoded.image (2-D float [0,1], any size)
      -> preprocess(image, spec)         -> (S, S) float32 in [0, 1]     numpy + Pillow only
         (crop to a central box, squash-resize, then per-image intensity: percentile stretch or equalisation)
      -> to_model_input(batch, spec)     -> (N, C, S, S) float32 tensor  torch, normalised

Training augmentation lives in ``augment.py`` and is applied between the two steps, so that what
the model sees at scoring time is exactly ``preprocess`` of the decoded image.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np
from PIL import Image

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# A central box holding both lungs on a frontal chest X-ray, as (top, bottom, left, right) fractions: 10-85% of
# the height, 15-85% of the width (the audit's lung box). Outside it: side markers, text, rulers, collimation.
LUNG_BOX = (0.10, 0.85, 0.15, 0.85)


# Test-time augmentation a checkpoint records (applied by models.forward_tta): "hflip" averages the logits of
# each image and its mirror image.
TTA_CHOICES = ("none", "hflip")


def check_tta(tta: str) -> None:
    if tta not in TTA_CHOICES:
        raise ValueError(f"unknown test-time augmentation {tta!r}; choose from {', '.join(TTA_CHOICES)}")


@dataclass(frozen=True)
class PreprocessSpec:
    """How a decoded grayscale image becomes model input. Stored verbatim in ``model.json``."""

    input_size: int = 224
    # Fractions of the decoded image kept before resizing: (top, bottom, left, right), e.g. the central lung box
    # (0.10, 0.85, 0.15, 0.85). Cuts away the borders where side markers, text, rulers and collimation edges live,
    # which identify an image's source rather than its disease. None: the whole image.
    crop: tuple[float, float, float, float] | None = None
    # "squash": resize the whole image to a square (the Deep-COVID recipe; keeps every pixel in view).
    resize: str = "squash"
    # Percentile contrast stretch after resizing, per image: (low, high) percentiles mapped to 0 and 1.
    # Makes 8-, 12- and 16-bit sources and differently exposed films comparable. None: off.
    autocontrast: tuple[float, float] | None = (0.5, 99.5)
    # Histogram equalisation after resizing (instead of the percentile stretch): every image's grey levels are
    # spread uniformly over [0, 1], which erases the exposure and tone curve of its source.
    equalize: bool = False
    channels: int = 3
    mean: tuple[float, ...] = field(default=IMAGENET_MEAN)
    std: tuple[float, ...] = field(default=IMAGENET_STD)

    def __post_init__(self) -> None:
        if self.input_size < 16:
            raise ValueError(f"input_size must be >= 16, got {self.input_size}")
        if self.resize != "squash":
            raise ValueError(f"unknown resize mode {self.resize!r} (supported: 'squash')")
        if self.channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3, got {self.channels}")
        if len(self.mean) != self.channels or len(self.std) != self.channels:
            raise ValueError("mean and std need one value per channel")
        if self.crop is not None:
            if len(self.crop) != 4:
                raise ValueError(f"crop must be (top, bottom, left, right) fractions, got {self.crop}")
            top, bottom, left, right = self.crop
            if not (0 <= top < bottom <= 1 and 0 <= left < right <= 1) or min(bottom - top, right - left) < 0.2:
                raise ValueError(
                    f"crop must satisfy 0 <= top < bottom <= 1 and 0 <= left < right <= 1, "
                    f"keeping at least 20% of each side, got {self.crop}"
                )
        if self.autocontrast is not None:
            lo, hi = self.autocontrast
            if not 0 <= lo < hi <= 100:
                raise ValueError(
                    f"autocontrast percentiles must satisfy 0 <= low < high <= 100, got {self.autocontrast}"
                )

    def to_dict(self) -> dict:
        d = asdict(self)
        d["mean"], d["std"] = list(self.mean), list(self.std)
        d["autocontrast"] = list(self.autocontrast) if self.autocontrast is not None else None
        d["crop"] = list(self.crop) if self.crop is not None else None
        return d

    @classmethod
    def from_dict(cls, d: dict) -> PreprocessSpec:
        known = {k: d[k] for k in cls.__dataclass_fields__ if k in d}
        for key in ("mean", "std"):
            if key in known:
                known[key] = tuple(float(v) for v in known[key])
        for key in ("autocontrast", "crop"):  # missing from older model.json files: the defaults (off)
            if known.get(key) is not None:
                known[key] = tuple(float(v) for v in known[key])
        return cls(**known)


def parse_crop(text: str) -> tuple[float, float, float, float] | None:
    """A ``--crop`` argument: ``lung`` (:data:`LUNG_BOX`), ``none``, or ``top,bottom,left,right`` fractions."""
    if text.strip().lower() == "none":
        return None
    if text.strip().lower() == "lung":
        return LUNG_BOX
    try:
        box = tuple(float(v) for v in text.split(","))
    except ValueError:
        box = ()
    if len(box) != 4:
        raise ValueError(f"--crop must be lung, none or four fractions top,bottom,left,right, got {text!r}")
    return box


def crop_box(height: int, width: int, crop: tuple[float, float, float, float] | None) -> tuple[int, int, int, int]:
    """Pixel rows and columns ``(top, bottom, left, right)`` kept by ``crop`` (never empty)."""
    if crop is None:
        return 0, height, 0, width
    top, bottom = round(crop[0] * height), round(crop[1] * height)
    left, right = round(crop[2] * width), round(crop[3] * width)
    return top, max(bottom, top + 1), left, max(right, left + 1)


def equalize(img: np.ndarray) -> np.ndarray:
    """Histogram equalisation of a float image: each pixel becomes its value's mid-rank, scaled to [0, 1].

    Equal values get equal outputs (the mean of their ranks), so a flat image maps to 0.5."""
    flat = img.ravel()
    values, inverse, counts = np.unique(flat, return_inverse=True, return_counts=True)
    if flat.size < 2:
        return np.full(img.shape, 0.5, np.float32)
    mid_rank = np.cumsum(counts) - (counts + 1) / 2.0  # 0-based mean rank of each distinct value
    return (mid_rank[inverse] / (flat.size - 1)).reshape(img.shape).astype(np.float32)


def preprocess(image: np.ndarray, spec: PreprocessSpec) -> np.ndarray:
    """Decoded 2-D image in [0, 1] -> (S, S) float32 in [0, 1]. Deterministic; no torch."""
    if image.ndim != 2:
        raise ValueError(f"expected a 2-D grayscale image, got shape {image.shape}")
    size = spec.input_size
    img = np.asarray(image, dtype=np.float32)
    if spec.crop is not None:
        top, bottom, left, right = crop_box(*img.shape, spec.crop)
        img = img[top:bottom, left:right]
    if img.shape != (size, size):
        # Pillow's "F" mode resizes float data with proper antialiasing when shrinking.
        img = np.asarray(Image.fromarray(img).resize((size, size), Image.Resampling.BILINEAR), dtype=np.float32)
    if spec.equalize:
        img = equalize(img)
    elif spec.autocontrast is not None:
        lo, hi = np.percentile(img, spec.autocontrast)
        if hi - lo > 1e-6:
            img = (img - lo) / (hi - lo)
    return np.ascontiguousarray(np.clip(img, 0.0, 1.0), dtype=np.float32)


def as_float_tensor(batch):
    """An array or tensor as a float32 tensor: a tensor keeps its device, a writable float32 array is shared,
    a read-only one (Ray Data's batches are) is copied, as torch warns on those in every worker's log."""
    import torch

    if isinstance(batch, torch.Tensor):
        return batch.float()
    a = np.ascontiguousarray(batch, dtype=np.float32)
    return torch.from_numpy(a if a.flags.writeable else a.copy())


def to_model_input(batch, spec: PreprocessSpec):
    """(N, S, S) array or tensor in [0, 1] -> normalised (N, C, S, S) float32 tensor."""
    import torch

    x = as_float_tensor(batch)
    if x.ndim != 3:
        raise ValueError(f"expected (N, S, S), got shape {tuple(x.shape)}")
    x = x.unsqueeze(1).expand(-1, spec.channels, -1, -1)
    mean = torch.tensor(spec.mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    std = torch.tensor(spec.std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    return ((x - mean) / std).contiguous()
