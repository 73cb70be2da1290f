"""Training augmentation of preprocessed images (numpy + Pillow only: runs in Ray Data tasks, no torch).

Input and output: 2-D float32 in [0, 1], e.g. the (S, S) output of :func:`cxr.preprocess.preprocess`.
Deterministic given the ``np.random.Generator``. Three stages, in this order:

1. geometry, one bilinear affine warp (Pillow, mode "F"): rotation (positive = counter-clockwise as
   displayed), scale and flip about the image centre, then shift. Uncovered corners are filled with the
   mean of the image's outermost pixel ring, not black: X-ray borders are usually dark or uniform, and a
   black wedge on a bright film would be a new artificial cue.
2. intensity: contrast around the image mean, then additive brightness; clipped to [0, 1].
3. degradations, each with probability ``degrade_p``, in a random order: downscale-and-upscale, Gaussian
   blur, additive Gaussian noise, JPEG re-encode. They blur away image-source signatures (resolution,
   sharpness, compression, noise): every COVID image of COVID-Xray-5k comes from other sources than the
   non-COVID ones (see the data README), and a model must not learn the source.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from io import BytesIO

import numpy as np
from PIL import Image

_PAIRS = ("scale", "downscale", "blur_sigma", "noise_std", "jpeg_quality")
DEGRADATIONS = ("downscale", "blur", "noise", "jpeg")


@dataclass(frozen=True)
class AugmentConfig:
    rotate_deg: float = 10.0  # uniform in [-r, r]
    shift: float = 0.08  # fraction of size, x and y, uniform in [-s, s]
    scale: tuple[float, float] = (0.9, 1.1)
    hflip_p: float = 0.5
    brightness: float = 0.15  # additive, uniform [-b, b]
    contrast: float = 0.2  # multiplicative around the mean, uniform [1-c, 1+c]
    degrade_p: float = 0.5  # probability of applying each degradation below
    downscale: tuple[float, float] = (0.25, 0.75)  # downscale factor, then upscale back (bilinear)
    blur_sigma: tuple[float, float] = (0.0, 1.5)  # Gaussian blur, pixels
    noise_std: tuple[float, float] = (0.0, 0.03)  # additive Gaussian noise
    jpeg_quality: tuple[int, int] = (30, 95)  # JPEG re-encode quality, inclusive range

    def __post_init__(self) -> None:
        for name in _PAIRS:
            lo, hi = getattr(self, name)
            if not 0 <= lo <= hi:
                raise ValueError(f"{name} must be a (low, high) pair with 0 <= low <= high, got {(lo, hi)}")
        if not (0 <= self.hflip_p <= 1 and 0 <= self.degrade_p <= 1):
            raise ValueError("hflip_p and degrade_p must be probabilities in [0, 1]")
        if min(self.rotate_deg, self.shift, self.brightness, self.contrast) < 0 or self.contrast > 1:
            raise ValueError("rotate_deg, shift, brightness must be >= 0 and contrast in [0, 1]")
        if self.scale[0] <= 0 or self.downscale[0] <= 0 or self.downscale[1] > 1:
            raise ValueError("scale must be > 0 and downscale factors in (0, 1]")
        if not 1 <= self.jpeg_quality[0] <= self.jpeg_quality[1] <= 100:
            raise ValueError(f"jpeg_quality must lie in [1, 100], got {self.jpeg_quality}")

    @classmethod
    def identity(cls) -> AugmentConfig:
        """A config that changes nothing (validation / scoring path)."""
        return cls(0.0, 0.0, (1.0, 1.0), 0.0, 0.0, 0.0, 0.0)

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict) -> AugmentConfig:
        known = {f.name: d[f.name] for f in fields(cls) if f.name in d}
        known.update({k: tuple(known[k]) for k in _PAIRS if k in known})
        return cls(**known)


def sample_params(rng: np.random.Generator, config: AugmentConfig) -> dict:
    """Draw every random choice of one :func:`augment` call (a fixed number of draws, fixed order)."""
    c = config
    order, on = rng.permutation(len(DEGRADATIONS)), rng.random(len(DEGRADATIONS)) < c.degrade_p
    return {
        "angle": rng.uniform(-c.rotate_deg, c.rotate_deg),
        "scale": rng.uniform(*c.scale),
        "shift": rng.uniform(-c.shift, c.shift, 2),
        "flip": bool(rng.random() < c.hflip_p),
        "contrast": rng.uniform(1 - c.contrast, 1 + c.contrast),
        "brightness": rng.uniform(-c.brightness, c.brightness),
        "degradations": [DEGRADATIONS[i] for i in order if on[i]],
        "downscale": rng.uniform(*c.downscale),
        "blur_sigma": rng.uniform(*c.blur_sigma),
        "noise_std": rng.uniform(*c.noise_std),
        "jpeg_quality": int(rng.integers(c.jpeg_quality[0], c.jpeg_quality[1] + 1)),
    }


def forward_matrix(angle: float, scale: float, flip: bool) -> np.ndarray:
    """2x2 map of offsets from the centre, input -> output, in (x right, y down) pixel coordinates."""
    t = np.deg2rad(angle)
    rot = np.array([[np.cos(t), np.sin(t)], [-np.sin(t), np.cos(t)]])  # counter-clockwise as displayed
    return scale * rot @ np.diag([-1.0 if flip else 1.0, 1.0])


def _warp(img: np.ndarray, p: dict) -> np.ndarray:
    h, w = img.shape
    centre = np.array([w / 2, h / 2])  # Pillow's pixel centres lie at i + 0.5
    inv = np.linalg.inv(forward_matrix(p["angle"], p["scale"], p["flip"]))
    offset = centre - inv @ (centre + p["shift"] * np.array([w, h]))  # output -> input
    border = float(np.concatenate([img[0], img[-1], img[1:-1, 0], img[1:-1, -1]]).mean())
    out = Image.fromarray(img).transform(
        (w, h),
        Image.Transform.AFFINE,
        (*inv[0], offset[0], *inv[1], offset[1]),
        resample=Image.Resampling.BILINEAR,
        fillcolor=border,
    )
    return np.asarray(out, dtype=np.float32)


def _blur(img: np.ndarray, sigma: float) -> np.ndarray:
    # Separable numpy Gaussian: Pillow's GaussianBlur rejects mode "F", and an 8-bit round trip would quantise.
    r = min(int(np.ceil(3 * sigma)), min(img.shape) - 1)
    if sigma < 0.05 or r < 1:
        return img
    k = np.exp(-0.5 * (np.arange(-r, r + 1) / sigma) ** 2).astype(np.float32)
    k /= k.sum()
    h, w = img.shape
    pad = np.pad(img, r, mode="reflect")
    tmp = sum(k[i] * pad[i : i + h] for i in range(2 * r + 1))  # rows, then columns
    return sum(k[i] * tmp[:, i : i + w] for i in range(2 * r + 1))


def _degrade(img: np.ndarray, name: str, p: dict, rng: np.random.Generator) -> np.ndarray:
    h, w = img.shape
    if name == "downscale":
        small = (max(1, round(w * p["downscale"])), max(1, round(h * p["downscale"])))
        im = Image.fromarray(img).resize(small, Image.Resampling.BILINEAR).resize((w, h), Image.Resampling.BILINEAR)
        return np.asarray(im, dtype=np.float32)
    if name == "blur":
        return _blur(img, p["blur_sigma"])
    if name == "noise":
        return img + rng.standard_normal(img.shape, dtype=np.float32) * np.float32(p["noise_std"])
    buf = BytesIO()  # jpeg
    Image.fromarray((np.clip(img, 0, 1) * 255 + 0.5).astype(np.uint8)).save(buf, "JPEG", quality=p["jpeg_quality"])
    return np.asarray(Image.open(buf), dtype=np.float32) / 255


def augment(image: np.ndarray, rng: np.random.Generator, config: AugmentConfig = AugmentConfig()) -> np.ndarray:
    """One random augmentation of a 2-D float image in [0, 1]; same shape, float32, in [0, 1]."""
    if image.ndim != 2:
        raise ValueError(f"expected a 2-D grayscale image, got shape {image.shape}")
    p = sample_params(rng, config)
    img = np.asarray(image, dtype=np.float32)
    if p["flip"] or p["angle"] != 0 or p["scale"] != 1 or p["shift"].any():
        img = _warp(img, p)
    if p["contrast"] != 1 or p["brightness"] != 0:
        mean = img.mean(dtype=np.float64)
        img = np.clip((img - mean) * np.float32(p["contrast"]) + np.float32(mean + p["brightness"]), 0, 1)
    for name in p["degradations"]:
        img = _degrade(img, name, p, rng)
    return np.ascontiguousarray(np.clip(img, 0, 1), dtype=np.float32)
