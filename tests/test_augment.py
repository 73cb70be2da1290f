"""Tests for cxr.augment on generated images (numpy only, no torch, no Ray)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from cxr.augment import AugmentConfig, augment, forward_matrix, sample_params

S = 64
ZERO = AugmentConfig.identity()


def _image(seed: int = 0, size: int = S) -> np.ndarray:
    y, x = np.mgrid[0:size, 0:size] / size
    rng = np.random.default_rng(seed)
    img = 0.3 + 0.3 * np.sin(3 * x) * np.cos(2 * y) + 0.05 * rng.standard_normal((size, size))
    return np.clip(img, 0, 1).astype(np.float32)


def _marker(row: int, col: int) -> np.ndarray:
    img = np.full((S, S), 0.2, np.float32)
    img[row - 1 : row + 2, col - 1 : col + 2] = 1.0
    return img


def _centroid(img: np.ndarray) -> np.ndarray:
    w = np.clip(img - 0.5, 0, None)
    ys, xs = np.mgrid[0:S, 0:S]
    return np.array([(xs * w).sum(), (ys * w).sum()]) / w.sum()  # (x, y)


def _laplacian_var(img: np.ndarray) -> float:
    lap = img[1:-1, :-2] + img[1:-1, 2:] + img[:-2, 1:-1] + img[2:, 1:-1] - 4 * img[1:-1, 1:-1]
    return float(lap.var())


@pytest.mark.parametrize("config", [AugmentConfig(), AugmentConfig(degrade_p=1.0, rotate_deg=30, brightness=0.5)])
def test_shape_dtype_range(config):
    rng = np.random.default_rng(0)
    for seed in range(20):
        img = _image(seed)
        out = augment(img, rng, config)
        assert out.shape == img.shape and out.dtype == np.float32 and out.flags.c_contiguous
        assert np.isfinite(out).all() and out.min() >= 0 and out.max() <= 1
    assert augment(_image()[:, :50], rng, config).shape == (S, 50)  # non-square works too
    with pytest.raises(ValueError, match="2-D"):
        augment(np.zeros((S, S, 3), np.float32), rng, config)


def test_deterministic_per_seed():
    img, config = _image(), AugmentConfig(degrade_p=1.0)
    a = augment(img, np.random.default_rng(7), config)
    assert np.array_equal(a, augment(img, np.random.default_rng(7), config))
    assert not np.allclose(a, augment(img, np.random.default_rng(8), config))


def test_identity_config_returns_input():
    img = _image()
    assert np.allclose(augment(img, np.random.default_rng(0), ZERO), img, atol=1e-6)
    zero_magnitudes = AugmentConfig(
        0,
        0,
        (1, 1),
        0,
        0,
        0,
        degrade_p=1,
        downscale=(1, 1),
        blur_sigma=(0, 0),
        noise_std=(0, 0),
        jpeg_quality=(100, 100),
    )
    # with degrade_p=1 only the JPEG 8-bit round trip (quality 100) remains
    assert np.allclose(augment(img, np.random.default_rng(0), zero_magnitudes), img, atol=0.02)


def test_hflip_mirrors():
    img = _marker(20, 10)
    out = augment(img, np.random.default_rng(0), dataclasses.replace(ZERO, hflip_p=1.0))
    assert np.allclose(out, img[:, ::-1], atol=1e-6)
    assert np.allclose(_centroid(out), [S - 1 - 10, 20], atol=1e-3)


def test_rotation_moves_marker_counter_clockwise():
    img = _marker(S // 2, S // 2 + 20)  # right of the centre
    config = dataclasses.replace(ZERO, rotate_deg=60.0)
    centre = np.array([S / 2 - 0.5, S / 2 - 0.5])  # in pixel-index coordinates
    for seed in range(5):
        angle = sample_params(np.random.default_rng(seed), config)["angle"]
        out = augment(img, np.random.default_rng(seed), config)
        expected = centre + forward_matrix(angle, 1.0, False) @ (_centroid(img) - centre)
        assert np.allclose(_centroid(out), expected, atol=1.0), (angle, _centroid(out), expected)
    a = np.deg2rad(45)  # +45 degrees: right of centre -> up and right, as displayed
    assert np.allclose(forward_matrix(45, 1.0, False) @ [1, 0], [np.cos(a), -np.sin(a)])


def test_shift_scale_and_fill():
    img = _marker(S // 2, S // 2 + 10)
    img[0, :] = img[-1, :] = img[:, 0] = img[:, -1] = 0.4  # border ring -> fill value
    config = dataclasses.replace(ZERO, shift=0.25, scale=(1.5, 1.5))
    p = sample_params(np.random.default_rng(3), config)
    out = augment(img, np.random.default_rng(3), config)
    centre = np.array([S / 2 - 0.5, S / 2 - 0.5])
    expected = centre + p["shift"] * S + 1.5 * (_centroid(img) - centre)
    assert np.allclose(_centroid(out), expected, atol=1.0)
    shifted = augment(img, np.random.default_rng(0), dataclasses.replace(ZERO, shift=0.3, scale=(0.5, 0.5)))
    assert np.isclose(shifted[0, 0], 0.4, atol=1e-5) or np.isclose(shifted[-1, -1], 0.4, atol=1e-5)


def test_intensity_changes_mean_and_spread():
    img = _image()
    bright = augment(img, np.random.default_rng(1), dataclasses.replace(ZERO, brightness=0.3))
    assert not np.isclose(bright.mean(), img.mean(), atol=1e-3)
    contrast = augment(img, np.random.default_rng(1), dataclasses.replace(ZERO, contrast=0.5))
    assert not np.isclose(contrast.std(), img.std(), rtol=1e-3)
    assert np.isclose(contrast.mean(), img.mean(), atol=0.02)  # around the mean


@pytest.mark.parametrize(
    "name, override",
    [
        ("jpeg", dict(jpeg_quality=(30, 50))),
        ("downscale", dict(downscale=(0.25, 0.75))),
        ("blur", dict(blur_sigma=(1.0, 1.5))),
    ],
)
def test_degradations_remove_high_frequencies(name, override):
    # Fine low-contrast texture (a random +-0.04 pixel checkerboard) on a smooth film: the kind of detail
    # that carries a source's resolution / compression signature. (JPEG keeps a strong regular
    # checkerboard almost intact: it is one DCT basis pattern, so the texture is random.)
    yy, xx = np.mgrid[0:S, 0:S]
    texture = np.where(np.random.default_rng(0).random((S, S)) < 0.5, 0.04, -0.04)
    img = (0.5 + 0.2 * np.sin(xx / 9) + 0.1 * np.cos(yy / 13) + texture).astype(np.float32)
    off = dict(downscale=(1, 1), blur_sigma=(0, 0), noise_std=(0, 0), jpeg_quality=(100, 100))
    config = dataclasses.replace(ZERO, degrade_p=1.0, **{**off, **override})
    for seed in range(3):
        out = augment(img, np.random.default_rng(seed), config)
        assert _laplacian_var(out) < 0.5 * _laplacian_var(img)
        assert abs(out.mean() - img.mean()) < 0.01  # low frequencies kept


def test_noise_adds_variance():
    img = np.full((S, S), 0.5, np.float32)
    off = dict(downscale=(1, 1), blur_sigma=(0, 0), jpeg_quality=(100, 100))
    config = dataclasses.replace(ZERO, degrade_p=1.0, noise_std=(0.03, 0.03), **off)
    out = augment(img, np.random.default_rng(0), config)
    assert 0.025 < out.std() < 0.035


def test_config_roundtrip_and_validation():
    config = AugmentConfig(rotate_deg=5, jpeg_quality=(50, 90))
    d = config.to_dict()
    assert d["jpeg_quality"] == [50, 90] and AugmentConfig.from_dict({**d, "unknown": 1}) == config
    for bad in (
        dict(hflip_p=1.5),
        dict(scale=(1.1, 0.9)),
        dict(jpeg_quality=(0, 50)),
        dict(downscale=(0.5, 2)),
        dict(contrast=-0.1),
    ):
        with pytest.raises(ValueError):
            AugmentConfig(**bad)
