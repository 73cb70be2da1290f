"""Tests for cxr.preprocess: the one preprocessing function shared by training and scoring."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from cxr.decode import decode
from cxr.preprocess import IMAGENET_MEAN, IMAGENET_STD, PreprocessSpec, crop_box, equalize, preprocess, to_model_input
from support.images import png_bytes, xray_like


def _check(out: np.ndarray, size: int) -> None:
    assert out.shape == (size, size)
    assert out.dtype == np.float32
    assert out.flags["C_CONTIGUOUS"]
    assert np.isfinite(out).all()
    assert out.min() >= 0.0 and out.max() <= 1.0


def test_output_shape_dtype_range():
    rng = np.random.default_rng(0)
    img = rng.random((48, 48)) * 0.5 + 0.2  # float64 in, not the output size
    out = preprocess(img, PreprocessSpec(input_size=32))
    _check(out, 32)
    assert out.min() == 0.0 and out.max() == 1.0  # stretched by autocontrast


def test_same_size_input_passes_through_without_autocontrast():
    rng = np.random.default_rng(1)
    img = rng.random((32, 32)).astype(np.float32)
    out = preprocess(img, PreprocessSpec(input_size=32, autocontrast=None))
    _check(out, 32)
    np.testing.assert_array_equal(out, img)


def test_non_square_input_is_squashed():
    # Left half dark, right half bright, on a wide image: squashing keeps the split in the middle.
    img = np.zeros((40, 100), dtype=np.float32)
    img[:, 50:] = 1.0
    out = preprocess(img, PreprocessSpec(input_size=32, autocontrast=None))
    _check(out, 32)
    assert np.allclose(out[:, :14], 0.0) and np.allclose(out[:, 18:], 1.0)
    assert np.allclose(out, out[0:1, :])  # every row the same: nothing cropped or padded vertically
    tall = preprocess(img.T.copy(), PreprocessSpec(input_size=32, autocontrast=None))
    np.testing.assert_allclose(tall, out.T, atol=1e-6)


def test_autocontrast_maps_percentiles_to_0_and_1():
    rng = np.random.default_rng(2)
    img = (0.3 + 0.2 * rng.random((64, 64))).astype(np.float32)  # a dull image in [0.3, 0.5]
    out = preprocess(img, PreprocessSpec(input_size=64))
    lo, hi = np.percentile(img, (0.5, 99.5))
    np.testing.assert_allclose(out, np.clip((img - lo) / (hi - lo), 0, 1), atol=1e-5)
    assert np.percentile(out, 0.5) == pytest.approx(0.0, abs=1e-3)
    assert np.percentile(out, 99.5) == pytest.approx(1.0, abs=1e-3)
    assert (out == 0).mean() == pytest.approx(0.005, abs=0.002)  # below the low percentile: clipped
    assert (out == 1).mean() == pytest.approx(0.005, abs=0.002)

    custom = preprocess(img, PreprocessSpec(input_size=64, autocontrast=(10, 90)))
    assert np.percentile(custom, 10) == pytest.approx(0.0, abs=1e-3)
    assert np.percentile(custom, 90) == pytest.approx(1.0, abs=1e-3)

    off = preprocess(img, PreprocessSpec(input_size=64, autocontrast=None))
    np.testing.assert_array_equal(off, img)


@pytest.mark.parametrize("value", [0.0, 0.42, 1.0])
def test_constant_image_no_nan(value):
    img = np.full((50, 70), value, dtype=np.float32)
    out = preprocess(img, PreprocessSpec(input_size=32))
    _check(out, 32)
    np.testing.assert_allclose(out, value, atol=1e-6)


def test_rejects_non_2d():
    with pytest.raises(ValueError, match="2-D"):
        preprocess(np.zeros((3, 32, 32), np.float32), PreprocessSpec(input_size=32))


def test_deterministic():
    img = xray_like(90, 120, seed=4).astype(np.float32) / 255
    spec = PreprocessSpec(input_size=48)
    np.testing.assert_array_equal(preprocess(img, spec), preprocess(img.copy(), spec))


# ------------------------------------------------------------------ spec


@pytest.mark.parametrize(
    "spec",
    [
        PreprocessSpec(),
        PreprocessSpec(input_size=64, autocontrast=None),
        PreprocessSpec(input_size=320, autocontrast=(1, 99)),
        PreprocessSpec(input_size=32, channels=1, mean=(0.5,), std=(0.25,)),
        PreprocessSpec(input_size=64, crop=(0.1, 0.85, 0.15, 0.85), equalize=True),
    ],
)
def test_spec_dict_round_trip(spec):
    d = spec.to_dict()
    assert isinstance(d["mean"], list) and isinstance(d["std"], list)
    assert d["autocontrast"] is None or isinstance(d["autocontrast"], list)
    back = PreprocessSpec.from_dict(json.loads(json.dumps(d)))  # as it comes back from model.json
    assert back == spec
    assert isinstance(back.mean, tuple) and isinstance(back.std, tuple)
    assert back.autocontrast is None or isinstance(back.autocontrast, tuple)
    assert hash(back) == hash(spec)


def test_spec_defaults_and_unknown_keys():
    spec = PreprocessSpec()
    assert spec.to_dict() == {
        "input_size": 224,
        "crop": None,
        "resize": "squash",
        "autocontrast": [0.5, 99.5],
        "equalize": False,
        "channels": 3,
        "mean": list(IMAGENET_MEAN),
        "std": list(IMAGENET_STD),
    }
    # Missing keys take the defaults; keys from a newer writer are ignored.
    assert PreprocessSpec.from_dict({"input_size": 96, "future_option": 1}) == PreprocessSpec(input_size=96)
    # Integers in JSON become floats.
    assert PreprocessSpec.from_dict({"autocontrast": [1, 99]}).autocontrast == (1.0, 99.0)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"input_size": 8}, "input_size"),
        ({"resize": "crop"}, "resize"),
        ({"channels": 2, "mean": (0.5, 0.5), "std": (0.2, 0.2)}, "channels"),
        ({"mean": (0.5,)}, "mean and std"),
        ({"std": (0.2, 0.2, 0.2, 0.2)}, "mean and std"),
        ({"channels": 1}, "mean and std"),
        ({"autocontrast": (99.5, 0.5)}, "autocontrast"),
        ({"autocontrast": (5, 5)}, "autocontrast"),
        ({"autocontrast": (-1, 50)}, "autocontrast"),
        ({"autocontrast": (1, 101)}, "autocontrast"),
        ({"crop": (0.1, 0.9, 0.2)}, "crop"),
        ({"crop": (0.5, 0.4, 0.0, 1.0)}, "crop"),
        ({"crop": (0.0, 1.0, 0.45, 0.55)}, "crop"),
        ({"crop": (-0.1, 1.0, 0.0, 1.0)}, "crop"),
    ],
)
def test_spec_validation(kwargs, message):
    with pytest.raises(ValueError, match=message):
        PreprocessSpec(**kwargs)
    with pytest.raises(ValueError, match=message):
        PreprocessSpec.from_dict({k: list(v) if isinstance(v, tuple) else v for k, v in kwargs.items()})


# ------------------------------------------------------------------ model input


def test_to_model_input_normalises_per_channel():
    spec = PreprocessSpec(input_size=32)
    batch = np.stack([np.full((32, 32), 0.25, np.float32), np.full((32, 32), 0.75, np.float32)])
    x = to_model_input(batch, spec)
    assert isinstance(x, torch.Tensor)
    assert x.shape == (2, 3, 32, 32) and x.dtype == torch.float32 and x.is_contiguous()
    for n, v in enumerate((0.25, 0.75)):
        for c in range(3):
            expected = (v - IMAGENET_MEAN[c]) / IMAGENET_STD[c]
            assert torch.allclose(x[n, c], torch.tensor(expected, dtype=torch.float32), atol=1e-6), (n, c)
    # 0.485 / 0.229 etc. spelled out, so a typo in the constants would show.
    assert x[0, 0, 0, 0].item() == pytest.approx((0.25 - 0.485) / 0.229, abs=1e-6)
    assert x[0, 1, 0, 0].item() == pytest.approx((0.25 - 0.456) / 0.224, abs=1e-6)
    assert x[0, 2, 0, 0].item() == pytest.approx((0.25 - 0.406) / 0.225, abs=1e-6)


def test_to_model_input_accepts_tensor_and_single_channel():
    spec = PreprocessSpec(input_size=16, channels=1, mean=(0.5,), std=(0.25,))
    batch = torch.linspace(0, 1, 3 * 16 * 16).reshape(3, 16, 16)
    x = to_model_input(batch, spec)
    assert x.shape == (3, 1, 16, 16)
    torch.testing.assert_close(x[:, 0], (batch - 0.5) / 0.25)
    with pytest.raises(ValueError, match=r"\(N, S, S\)"):
        to_model_input(np.zeros((16, 16), np.float32), spec)


def test_to_model_input_takes_read_only_arrays_without_a_warning():
    # Ray Data hands out read-only arrays; torch warns once per process on them (hence a fresh process here).
    code = (
        "import warnings, numpy as np\n"
        "from cxr.preprocess import PreprocessSpec, to_model_input\n"
        "a = np.linspace(0, 1, 2 * 16 * 16, dtype=np.float32).reshape(2, 16, 16)\n"
        "a.flags.writeable = False\n"
        "warnings.simplefilter('error')\n"
        "x = to_model_input(a, PreprocessSpec(input_size=16))\n"
        "assert x.shape == (2, 3, 16, 16) and abs(float(x[1, 0, 15, 15]) - (1 - 0.485) / 0.229) < 1e-5\n"
        "from cxr.checkpoint import load_checkpoint\n"  # and the model's own entry point (scoring, explain)
        "b = np.zeros((1, 128, 128), np.float32)\n"
        "b.flags.writeable = False\n"
        "assert load_checkpoint('default').predict_proba(b).shape == (1,)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "lib")}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]


def test_8_and_16_bit_sources_preprocess_alike():
    arr = xray_like(90, 120, seed=5, blob=True)
    d8 = decode(png_bytes(arr), "a.png")
    d16 = decode(png_bytes(arr.astype(np.uint16) * 257, "I;16"), "a16.png")
    assert d8.ok and d16.ok
    spec = PreprocessSpec(input_size=48)
    p8, p16 = preprocess(d8.image, spec), preprocess(d16.image, spec)
    _check(p8, 48)
    np.testing.assert_allclose(p16, p8, atol=1e-4)
    # Also when the 16-bit film uses only part of its range (a 12-bit detector): autocontrast equalises it.
    d12 = decode(png_bytes(arr.astype(np.uint16) * 16, "I;16"), "a12.png")
    np.testing.assert_allclose(preprocess(d12.image, spec), p8, atol=1e-4)
    assert not np.allclose(preprocess(d12.image, PreprocessSpec(input_size=48, autocontrast=None)), p8, atol=1e-2)


# ------------------------------------------------------------------ crop and equalisation


def test_crop_keeps_only_the_box_before_resizing():
    img = np.zeros((200, 100), np.float32)
    img[:20] = 1.0  # a bright band along the top (a text strip)
    img[:, 90:] = 0.6  # and one along the right edge (a side marker)
    img[40:150, 30:70] = np.linspace(0.2, 0.4, 40, dtype=np.float32)  # the "lungs"
    spec = PreprocessSpec(input_size=32, autocontrast=None, crop=(0.15, 0.85, 0.15, 0.85))
    out = preprocess(img, spec)
    assert out.shape == (32, 32)
    assert out.max() <= 0.4 + 1e-6  # neither border band survives
    whole = preprocess(img, PreprocessSpec(input_size=32, autocontrast=None))
    assert whole.max() == pytest.approx(1.0)
    # crop_box rounds the fractions to pixels and never yields an empty box
    assert crop_box(200, 100, (0.15, 0.85, 0.15, 0.85)) == (30, 170, 15, 85)
    assert crop_box(200, 100, None) == (0, 200, 0, 100)
    assert crop_box(2, 2, (0.0, 0.2, 0.0, 0.2)) == (0, 1, 0, 1)


def test_equalize_spreads_grey_levels_uniformly_and_ignores_the_tone_curve():
    rng = np.random.default_rng(0)
    img = rng.random((64, 64)).astype(np.float32) ** 3  # dark, skewed histogram
    spec = PreprocessSpec(input_size=64, equalize=True)
    out = preprocess(img, spec)
    assert out.min() == 0.0 and out.max() == 1.0
    np.testing.assert_allclose(np.sort(out.ravel()), np.linspace(0, 1, out.size), atol=1e-6)  # uniform
    # any monotonic change of exposure (another source's tone curve) gives the same model input
    # (to within a few ranks: float32 rounding merges a few neighbouring values into ties)
    np.testing.assert_allclose(preprocess(np.sqrt(img), spec), out, atol=2e-3)
    np.testing.assert_allclose(preprocess(0.2 + 0.5 * img, spec), out, atol=2e-3)
    # with the percentile stretch instead, the tone curve shows through
    assert (
        np.abs(
            preprocess(np.sqrt(img), PreprocessSpec(input_size=64)) - preprocess(img, PreprocessSpec(input_size=64))
        ).max()
        > 0.2
    )


def test_equalize_gives_equal_values_equal_outputs():
    img = np.zeros((10, 10), np.float32)
    img[:5] = 0.3  # two values, 50 pixels each
    out = equalize(img)
    np.testing.assert_allclose(np.unique(out), [24.5 / 99, 74.5 / 99], rtol=1e-6)
    assert np.all(out[5:] == out[5, 0]) and np.all(out[:5] == out[0, 0])
    assert np.all(equalize(np.full((4, 4), 0.7, np.float32)) == 0.5)
