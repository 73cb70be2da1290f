"""Grad-CAM and the focus score on hand-built models whose evidence we place ourselves (no Ray)."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from torch import nn

from cxr.explain import (
    LUNG_BOX,
    EnsembleCam,
    ExplainSummary,
    GradCam,
    LayerError,
    cam_for,
    corner_mask,
    focus_scores,
    gallery_html,
    heatmap_name,
    lung_box_in_input,
    lung_mask,
    overlay_caption,
    overlay_png,
    target_layer,
    versus_threshold,
)
from cxr.preprocess import LUNG_BOX as PREPROCESS_LUNG_BOX


class Window(nn.Module):
    """Keeps the activations inside one window of the image and zeroes the rest: what comes after it
    sees that window only."""

    def __init__(self, window: tuple[slice, slice]):
        super().__init__()
        self.window = window

    def forward(self, f):
        mask = torch.zeros_like(f)
        mask[:, :, self.window[0], self.window[1]] = 1
        return f * mask


class LooksAt(nn.Module):
    """features: conv + ReLU + Window; the covid logit is the mean of what the window lets through."""

    def __init__(self, window: tuple[slice, slice]):
        super().__init__()
        torch.manual_seed(0)
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), Window(window))
        with torch.no_grad():
            self.features[0].weight.abs_()
            self.features[0].bias.fill_(0.1)

    def forward(self, x):
        covid = self.features(x).mean(dim=(1, 2, 3))
        return torch.stack([torch.zeros_like(covid), covid], dim=1)


def _cam(model, size=64):
    x = torch.rand(3, 3, size, size)
    return GradCam(model, target_layer(model, "hand-built", "features.2"), class_index=1)(x)


def test_region_geometry_is_the_documented_one():
    lung = lung_mask(100, 200)
    assert lung.mean() == pytest.approx((LUNG_BOX[1] - LUNG_BOX[0]) * (LUNG_BOX[3] - LUNG_BOX[2]))
    assert lung[50, 100] and not lung[5, 100] and not lung[50, 10] and not lung[95, 100]
    assert corner_mask(100, 100).mean() == pytest.approx(0.16) and corner_mask(100, 100)[0, 99]
    assert focus_scores(np.ones((80, 80)))[0] == pytest.approx(0.525, abs=0.01)  # a constant map is uniform
    assert focus_scores(np.zeros((8, 8))) == (None, None)  # no evidence at all


def test_the_lung_box_follows_the_models_crop():
    # a model cropped to the lung box sees nothing else: its whole input is the lung region
    assert lung_box_in_input(PREPROCESS_LUNG_BOX) == pytest.approx((0.0, 1.0, 0.0, 1.0))
    assert focus_scores(np.ones((40, 40)), PREPROCESS_LUNG_BOX)[0] == pytest.approx(1.0)
    # a wider crop (top, bottom, left, right) = (0, 1, 0.1, 0.9): x 15-85% of the image is x 6.25-93.75% of the input
    x0, x1, y0, y1 = lung_box_in_input((0.0, 1.0, 0.1, 0.9))
    assert (x0, x1, y0, y1) == pytest.approx((0.0625, 0.9375, 0.10, 0.85))
    cam = np.zeros((100, 100))
    cam[:, :5] = 1.0  # evidence in the left 5% of the input: outside the lung box either way
    assert focus_scores(cam, (0.0, 1.0, 0.1, 0.9))[0] == 0.0
    assert lung_mask(100, 100, (0.0, 1.0, 0.1, 0.9)).mean() == pytest.approx(0.875 * 0.75, abs=0.01)  # whole pixels


def test_a_model_that_looks_at_a_corner_marker_gets_a_low_focus():
    cams = _cam(LooksAt((slice(0, 10), slice(54, 64))))  # top-right corner
    assert cams.shape == (3, 64, 64) and cams.max() <= 1.0
    for cam in cams:
        focus, corner = focus_scores(cam)
        assert focus < 0.1 and corner > 0.9
        y, x = np.unravel_index(cam.argmax(), cam.shape)
        assert y < 10 and x >= 54  # rows are y, columns x: not transposed


def test_a_model_that_looks_at_the_lungs_gets_a_high_focus():
    cams = _cam(LooksAt((slice(20, 44), slice(14, 50))))
    for cam in cams:
        focus, corner = focus_scores(cam)
        assert focus > 0.95 and corner < 0.02


def test_an_ensembles_map_is_the_mean_of_its_members_maps():
    corner, lungs = LooksAt((slice(0, 10), slice(54, 64))), LooksAt((slice(20, 44), slice(14, 50)))
    cams = [GradCam(m, target_layer(m, "hand-built", "features.2"), class_index=1) for m in (corner, lungs)]
    x = torch.rand(2, 3, 64, 64)
    both = EnsembleCam(cams)(x)
    assert both.shape == (2, 64, 64) and np.allclose(both, (cams[0](x) + cams[1](x)) / 2, atol=1e-6)
    focus = [focus_scores(c)[0] for c in (cams[0](x)[0], both[0], cams[1](x)[0])]
    assert focus[0] < 0.1 < focus[1] < 0.95 < focus[2]  # half its evidence in a corner: in between


def test_a_mirror_averaged_models_map_is_the_mean_of_the_image_and_its_mirror():
    from cxr.explain import MirrorCam

    corner = LooksAt((slice(0, 10), slice(54, 64)))  # evidence in the top-right corner only
    plain = GradCam(corner, target_layer(corner, "hand-built", "features.2"), class_index=1)
    x = torch.rand(2, 3, 64, 64)
    both = MirrorCam(plain)(x)
    # half in the corner it looks at, half in the opposite one (where the mirror image put it), as its logits
    assert np.allclose(both, (plain(x) + plain(x.flip(-1))[..., ::-1]) / 2, atol=1e-6)
    assert both[:, :10, 54:].sum() == pytest.approx(both[:, :10, :10].sum(), rel=0.2) and both[:, :10, :10].sum() > 0
    assert np.allclose(
        MirrorCam(plain)(x.flip(-1)), both[..., ::-1], atol=1e-6
    )  # the mirror image's map is this one mirrored


def test_cam_for_an_ensemble_checkpoint_hooks_each_members_own_layer(tiny_model, tmp_path):
    from cxr.checkpoint import ModelInfo, load_checkpoint, save_checkpoint, save_ensemble
    from cxr.models import create_model
    from cxr.preprocess import PreprocessSpec

    torch.manual_seed(1)
    other = save_checkpoint(
        create_model("efficientnet_b0"),
        ModelInfo("efficientnet_b0", PreprocessSpec(input_size=64), threshold=0.5),
        str(tmp_path / "effnet"),
    )
    assert other.backbone == "efficientnet_b0"
    ens = str(tmp_path / "ensemble")
    save_ensemble({"mnv2": tiny_model, "effnet": str(tmp_path / "effnet")}, ens, threshold=0.5)
    loaded = load_checkpoint(ens, optimize=False)
    cam = cam_for(loaded)
    assert isinstance(cam, EnsembleCam) and len(cam.cams) == 2
    hooked = [c.cam.target_layers[0] for c in cam.cams]
    assert hooked[0] is loaded.members[0].model.get_submodule("features.18")
    assert hooked[1] is loaded.members[1].model.get_submodule("features.8")
    x = torch.rand(3, 3, 64, 64)
    maps = cam(x)
    assert (
        maps.shape == (3, 64, 64)
        and np.isfinite(maps).all()
        and np.allclose(maps, (cam.cams[0](x) + cam.cams[1](x)) / 2, atol=1e-6)
    )
    # a layer one member lacks: a clear error naming it (the jobs exit 2 before any work)
    with pytest.raises(LayerError, match="efficientnet_b0 has no layer 'features.18'"):
        cam_for(load_checkpoint(ens, optimize=False), "features.18")
    assert isinstance(cam_for(load_checkpoint(tiny_model, optimize=False)), GradCam)  # one model: its own Grad-CAM
    mirrored = load_checkpoint(tiny_model, optimize=False)
    mirrored.info.tta = "hflip"
    assert type(cam_for(mirrored)).__name__ == "MirrorCam"  # a checkpoint with test-time flips: its maps averaged alike


def test_the_default_layer_comes_from_the_backbone_registry():
    from cxr.models import create_model

    m = create_model("mobilenet_v2")
    assert target_layer(m, "mobilenet_v2") is m.features[18]
    with pytest.raises(ValueError, match="no layer"):
        target_layer(m, "mobilenet_v2", "features.99")


def test_overlay_is_a_png_with_caption_strip_and_names_are_safe():
    from PIL import Image

    png = overlay_png(np.random.default_rng(0).random((64, 64)), np.eye(64), "p=0.9 focus=0.10", size=128)
    im = Image.open(io.BytesIO(png))
    assert im.format == "PNG" and im.size == (128, 150) and im.mode == "RGB"
    name = heatmap_name("s3://bucket/a dir/x ray (1).dcm")
    assert (
        name.endswith("_x_ray_1_.png") and "/" not in name and name != heatmap_name("s3://bucket/other/x ray (1).dcm")
    )


class LooksAwayFrom(LooksAt):
    """The covid logit falls with every activation: nothing in the image raises it."""

    def forward(self, x):
        return -super().forward(x)


def test_a_map_without_positive_evidence_is_zero_and_has_no_focus():
    cams = _cam(LooksAwayFrom((slice(None), slice(None))))
    assert np.all(cams == 0) and focus_scores(cams[0]) == (None, None)


def test_summaries_count_the_images_without_focus_and_the_limit():
    line = ExplainSummary("out", 6, 6, 0, 0, 0.53, 6, 1.0, no_focus=4, available=15).line()
    assert line.startswith(
        "explained 6 of 15 files (--limit 6; 0 unreadable): median focus 0.53 of 2, "
        "4 with no positive evidence (focus n/a), 0 with focus < 0.5; 6 heatmaps"
    )
    assert (
        ExplainSummary("out", 6, 6, 0, 1, 0.4, 6, 1.0, available=6)
        .line()
        .startswith("explained 6 of 6 images (0 unreadable): median focus 0.40, 1 with focus < 0.5;")
    )
    rows = [
        {
            "path": f"/d/{i}.png",
            "prob_covid": p,
            "prediction": "covid" if p >= 0.5401 else "non",
            "threshold": 0.5401,
            "focus": f,
            "outside_lungs": None if f is None else f < 0.5,
            "heatmap": f"heatmaps/{i}.png",
            "error": None,
        }
        for i, (p, f) in enumerate([(0.9, 0.6), (0.7, 0.46), (0.5399, None), (0.2, None), (0.1, None), (0.05, None)])
    ]
    html = gallery_html(rows, "t", "Explained 6 of 15 files (--limit 6).")
    assert (
        "6 images, median focus 0.53 of 2, 1 of 2 with focus &lt; 0.5, 4 with no positive evidence (focus n/a). "
        "Explained 6 of 15" in html
    )
    assert "<b>focus n/a (no positive evidence)</b>, 4 of these images" in html
    assert (
        "p=0.5399 &lt; 0.5401: non · focus n/a (no positive evidence)" in html
        and "p=0.9000 &gt;= 0.5401: covid · focus 0.60" in html
    )


def test_captions_put_the_probability_against_the_threshold():
    assert versus_threshold(0.9, 0.5, "covid") == "p=0.90 >= 0.50: covid"
    assert versus_threshold(np.float32(0.5399), np.float32(0.5401), "non") == "p=0.5399 < 0.5401: non"
    assert versus_threshold(0.54009, 0.5401, "non") == "p=0.54009 < 0.54010: non"  # as many decimals as tell them apart
    assert versus_threshold(0.5401, 0.5401, "covid") == "p=0.5401 >= 0.5401: covid"
    assert overlay_caption(0.54, 0.5401, "non", None) == "p=0.5400 < 0.5401: non, focus n/a (no positive evidence)"
    assert overlay_caption(0.97, 0.5, "covid", 0.634) == "p=0.97 >= 0.50: covid, focus 0.63"
