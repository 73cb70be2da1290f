"""cxr.device_decode on CPU: the torch decode + preprocess path gives what decode.py + preprocess.py give."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cxr.checkpoint import default_model_path
from cxr.decode import decode
from cxr.device_decode import decode_preprocess_jpegs, preprocess_tensor
from cxr.preprocess import PreprocessSpec, preprocess
from support.images import jpeg_bytes, xray_like

SAMPLES = Path(default_model_path()).parents[1] / "samples"


def _rgb_jpeg() -> bytes:
    rgb = np.stack([xray_like(80, 100, seed=s) for s in (2, 5, 6)], axis=-1)
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, "JPEG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def jpegs() -> list[bytes]:
    real = [p.read_bytes() for p in sorted(SAMPLES.rglob("*.jpeg"))]  # real X-rays, stored as RGB JPEG
    assert len(real) == 3
    generated = [
        jpeg_bytes(xray_like(90, 120, seed=3)),
        jpeg_bytes(xray_like(300, 260, seed=4)),
        jpeg_bytes(xray_like(40, 30, seed=5)),
    ]
    return real + generated + [_rgb_jpeg()]


@pytest.mark.parametrize(
    "spec",
    [
        PreprocessSpec(input_size=64),
        PreprocessSpec(input_size=224),
        PreprocessSpec(input_size=64, autocontrast=None),
        PreprocessSpec(input_size=64, crop=(0.1, 0.85, 0.15, 0.85), equalize=True),
    ],
    ids=["64px", "224px", "no-autocontrast", "crop-equalize"],
)
def test_matches_the_numpy_path(jpegs, spec):
    images, errors = decode_preprocess_jpegs(jpegs, spec, device="cpu")
    assert errors == [None] * len(jpegs)
    assert images.shape == (len(jpegs), spec.input_size, spec.input_size) and images.dtype == torch.float32
    # equalisation outputs ranks: values within float error of each other may swap places (a rank or two)
    atol = 3 / (spec.input_size**2 - 1) if spec.equalize else 1e-5
    for got, data in zip(images.numpy(), jpegs):
        want = preprocess(decode(data).image, spec)
        assert want.std() > 0.05  # real content, not a constant image
        np.testing.assert_allclose(got, want, atol=atol)


def test_bad_files_are_errors_and_the_rest_still_decode(jpegs):
    spec = PreprocessSpec(input_size=32)
    inputs = [jpegs[3], b"not a jpeg at all", b"", b"\xff\xd8\xff" + b"0" * 40, jpegs[4]]
    images, errors = decode_preprocess_jpegs(inputs, spec, device="cpu")
    assert errors[0] is None and errors[4] is None
    assert all(e and e.startswith("device JPEG decode failed") and "\n" not in e for e in errors[1:4])
    assert torch.count_nonzero(images[1:4]) == 0
    np.testing.assert_allclose(images[4].numpy(), preprocess(decode(jpegs[4]).image, spec), atol=1e-5)
    assert decode_preprocess_jpegs([], spec, device="cpu")[0].shape == (0, 32, 32)


def test_preprocess_tensor_matches_preprocess_on_float_images():
    rng = np.random.default_rng(0)
    spec = PreprocessSpec(input_size=48)
    for shape in [(100, 70), (48, 48), (20, 30)]:
        image = rng.random(shape, dtype=np.float32) ** 2
        np.testing.assert_allclose(
            preprocess_tensor(torch.from_numpy(image), spec).numpy(), preprocess(image, spec), atol=1e-5
        )
    flat = np.full((50, 50), 0.3, np.float32)  # a constant image: no stretch (no division by zero)
    np.testing.assert_allclose(
        preprocess_tensor(torch.from_numpy(flat), spec).numpy(), preprocess(flat, spec), atol=1e-6
    )
