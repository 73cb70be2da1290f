"""JPEG decode and preprocessing as torch operations on a device (nvJPEG on a CUDA GPU), batched.

The score job's predictor uses it for JPEGs on GPU actors (``score.device_jpeg_size`` picks which):

    decode_preprocess_jpegs(list of JPEG bytes, spec, device) -> ((N, S, S) float32 in [0, 1] on device, errors)

It matches ``preprocess(decode(bytes).image, spec)`` (decode.py + preprocess.py) within float tolerance
(tested on CPU: within 1e-5, grayscale and colour JPEGs): the same resize (bilinear with antialiasing, as
Pillow does it) and the same per-image percentile contrast stretch (linear interpolation, as
``np.percentile``). What a caller must route to the CPU path: EXIF-rotated JPEGs (the CUDA decoder does not
apply the orientation), other formats, and any file it cannot decode (reported in ``errors``, never raised).
nvJPEG's output may differ from libjpeg's by a grey level: to be checked on the GPU (benchmarks/gpu.py does).
torchvision marks its image decoders deprecated from 0.29 (superseded by TorchCodec); they still work and are
what this uses.
"""

from __future__ import annotations

import warnings

from .preprocess import PreprocessSpec, crop_box


def preprocess_tensor(image, spec: PreprocessSpec):
    """(H, W) float image in [0, 1] on any device -> (S, S) float32 in [0, 1]: ``preprocess`` in torch, no host sync."""
    import torch
    import torch.nn.functional as F

    size = spec.input_size
    x = image.float()
    if spec.crop is not None:
        top, bottom, left, right = crop_box(*x.shape, spec.crop)
        x = x[top:bottom, left:right]
    if tuple(x.shape) != (size, size):
        x = F.interpolate(x[None, None], size=(size, size), mode="bilinear", antialias=True, align_corners=False)[0, 0]
    if spec.equalize:  # mid-rank of each value, as preprocess.equalize
        flat = x.flatten()
        _, inverse, counts = torch.unique(flat, sorted=True, return_inverse=True, return_counts=True)
        mid_rank = torch.cumsum(counts, 0).to(x.dtype) - (counts.to(x.dtype) + 1) / 2
        x = (
            (mid_rank[inverse] / max(flat.numel() - 1, 1)).view(x.shape)
            if flat.numel() > 1
            else torch.full_like(x, 0.5)
        )
    elif spec.autocontrast is not None:
        q = torch.tensor([spec.autocontrast[0] / 100.0, spec.autocontrast[1] / 100.0], device=x.device, dtype=x.dtype)
        lo, hi = torch.quantile(x.flatten(), q)
        span = hi - lo
        x = torch.where(span > 1e-6, (x - lo) / span.clamp_min(1e-6), x)
    return x.clamp(0.0, 1.0)


def decode_preprocess_jpegs(datas: list[bytes], spec: PreprocessSpec, device: str = "cuda"):
    """Decode JPEG bytes on ``device`` (batched through nvJPEG on CUDA) and preprocess there.

    Returns ``(images, errors)``: ``images`` (N, S, S) float32 on ``device`` (zeros where decoding failed),
    ``errors`` one ``None`` or one-line reason per input."""
    import torch
    from torchvision.io import ImageReadMode, decode_jpeg

    size = spec.input_size
    out = torch.zeros((len(datas), size, size), dtype=torch.float32, device=device)
    errors: list[str | None] = [None] * len(datas)
    if not datas:
        return out, errors
    raw = [torch.frombuffer(bytearray(d), dtype=torch.uint8) if d else torch.zeros(0, dtype=torch.uint8) for d in datas]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        try:
            decoded = decode_jpeg(raw, mode=ImageReadMode.GRAY, device=device)
        except (RuntimeError, ValueError):  # one bad file fails the whole batch: decode one by one
            decoded = []
            for i, r in enumerate(raw):
                try:
                    decoded.append(decode_jpeg(r, mode=ImageReadMode.GRAY, device=device))
                except (RuntimeError, ValueError) as exc:
                    decoded.append(None)
                    errors[i] = "device JPEG decode failed: " + " ".join(str(exc).split())[:200]
    for i, img in enumerate(decoded):
        if img is not None:
            out[i] = preprocess_tensor(img[0].float() / 255.0, spec)
    return out, errors
