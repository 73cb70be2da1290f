"""Grad-CAM heatmaps and a focus score: is the model looking at the lungs?

    paths -> decoded_dataset (score.py: read, decode, the checkpoint's own preprocessing)
          -> .map_batches(Explainer)  actor pool: the score row (same Predictor as scoring) + Grad-CAM
                                      of the positive class (the ``grad-cam`` package) + focus score,
                                      and an overlay PNG per image where asked
          -> explanations.parquet, heatmaps/*.png, gallery.html

Grad-CAM (Selvaraju et al. 2017) weights the last convolutional block's activations (``cam_layer`` of
the backbone in models.py) by the spatially pooled gradients of the COVID-19 logit, keeps the positive
part and upsamples it to the model's input. It always explains the *positive* class, whatever the
prediction: "which pixels raise the COVID-19 score". An ensemble checkpoint's map is the mean of its members'
maps (:class:`EnsembleCam`), each at the member's own layer.

**Focus score.** The map lives in the model's input frame: the whole image squashed to a square
(``resize="squash"``), so fractions of the input are fractions of the original image. The *lung
region* is the central box ``x in [0.15, 0.85] x y in [0.10, 0.85]`` of the image (``LUNG_BOX``; 52.5%
of the area): in a frontal chest X-ray it holds both lung fields and the heart, while the strips
outside it hold the shoulders, neck, abdomen, the film's borders, the corners, and where burnt-in text
and side markers ("L", "R", "PORTABLE", hospital labels) sit. ``focus`` = share of the CAM mass inside
the box (the CAM minus its minimum, so a constant map counts as uniform). A uniform map gives 0.525;
``focus < 0.5`` means the evidence sits mostly outside the lungs (``outside_lungs``). A model whose
preprocessing crops (``PreprocessSpec.crop``) sees only part of the image: the box is then mapped into its
input frame, and a model cropped to the lung box itself has focus 1 by construction. ``corner_share``
is the share in the four 20% x 20% corner squares (16% of the area; uniform: 0.16). A map with no
positive evidence at all (Grad-CAM keeps only the positive part of the gradient-weighted activations; where they
are negative everywhere, nothing in the image raises the COVID-19 score, typical of an image the model finds
clearly negative) is zero: its focus is null, "n/a", and summaries count such images apart.
"""

from __future__ import annotations

import hashlib
import json
import logging
import posixpath
import re
import time
from dataclasses import asdict, dataclass
from io import BytesIO

import numpy as np
import pyarrow as pa

from . import storage
from .errors import UsageError
from .preprocess import LUNG_BOX as _LUNG_TBLR

log = logging.getLogger(__name__)

LUNG_BOX = (_LUNG_TBLR[2], _LUNG_TBLR[3], _LUNG_TBLR[0], _LUNG_TBLR[1])  # x0, x1, y0, y1 as fractions of width / height
CORNER = 0.20
FOCUS_THRESHOLD = 0.5  # below: most CAM mass outside the lung box (uniform map: 0.525)
HEATMAP_DIR = "heatmaps"
EXPLAIN_COLUMNS = [
    ("focus", pa.float32()),
    ("corner_share", pa.float32()),
    ("outside_lungs", pa.bool_()),
    ("heatmap", pa.string()),
]


class LayerError(UsageError):
    """The model has no module of the name given for Grad-CAM (``--layer``): a bad command line, exit code 2."""


# --------------------------------------------------------------------------- Grad-CAM and focus (pure)


def lung_box_in_input(crop: tuple[float, float, float, float] | None = None) -> tuple[float, float, float, float]:
    """The lung box (x0, x1, y0, y1) in the model input's frame, which shows the ``crop`` box
    (top, bottom, left, right, as in PreprocessSpec) of the original image; the whole input when inside it."""
    if crop is None:
        return LUNG_BOX
    top, bottom, left, right = crop
    x0, x1, y0, y1 = LUNG_BOX
    fx = lambda v: min(1.0, max(0.0, (v - left) / (right - left)))  # noqa: E731
    fy = lambda v: min(1.0, max(0.0, (v - top) / (bottom - top)))  # noqa: E731
    return fx(x0), fx(x1), fy(y0), fy(y1)


def lung_mask(h: int, w: int, crop: tuple[float, float, float, float] | None = None) -> np.ndarray:
    x0, x1, y0, y1 = lung_box_in_input(crop)
    m = np.zeros((h, w), bool)
    m[int(round(y0 * h)) : int(round(y1 * h)), int(round(x0 * w)) : int(round(x1 * w))] = True
    return m


def corner_mask(h: int, w: int) -> np.ndarray:
    m = np.zeros((h, w), bool)
    ch, cw = max(1, int(round(CORNER * h))), max(1, int(round(CORNER * w)))
    for ys in (slice(0, ch), slice(h - ch, h)):
        for xs in (slice(0, cw), slice(w - cw, w)):
            m[ys, xs] = True
    return m


def focus_scores(
    cam: np.ndarray, crop: tuple[float, float, float, float] | None = None
) -> tuple[float | None, float | None]:
    """(focus, corner_share) of one 2-D CAM: the shares of its mass in the lung box and in the corners
    (of the model's input; ``crop``: the checkpoint's PreprocessSpec.crop)."""
    cam = np.asarray(cam, dtype=np.float64)
    if not np.isfinite(cam).all() or cam.max() <= 1e-12:
        return None, None
    cam = cam - cam.min()
    if cam.sum() <= 1e-12:  # constant and positive: uniform
        cam = np.ones_like(cam)
    total = cam.sum()
    h, w = cam.shape
    return float(cam[lung_mask(h, w, crop)].sum() / total), float(cam[corner_mask(h, w)].sum() / total)


def target_layer(model, backbone: str, layer: str | None = None):
    """The module Grad-CAM hooks: ``layer`` if given, else the backbone's ``cam_layer``, else the last Conv2d."""
    import torch

    from .models import BACKBONES

    name = layer or (BACKBONES[backbone].cam_layer if backbone in BACKBONES else None)
    if name:
        try:
            return model.get_submodule(name)
        except AttributeError as exc:
            raise ValueError(f"model {backbone} has no layer {name!r}") from exc
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    if not convs:
        raise ValueError(f"model {backbone} has no Conv2d layer for Grad-CAM; pass a layer name")
    return convs[-1]


class GradCam:
    """Grad-CAM of one class for a torch classifier, via the ``grad-cam`` package (pytorch_grad_cam)."""

    def __init__(self, model, layer_module, class_index: int):
        from pytorch_grad_cam import GradCAM
        from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

        self.cam = GradCAM(model=model, target_layers=[layer_module])
        self.target = ClassifierOutputTarget(class_index)

    def __call__(self, x) -> np.ndarray:
        """(N, C, S, S) normalised input tensor -> (N, S, S) float32 maps in [0, 1] (per-image max 1)."""
        x = x.detach().clone().requires_grad_(True)  # parameters are frozen: the graph hangs on the input
        maps = self.cam(input_tensor=x, targets=[self.target] * x.shape[0])
        return np.asarray(maps, dtype=np.float32)


class EnsembleCam:
    """Grad-CAM of an ensemble checkpoint: the mean of its members' maps, each taken at the member's own layer
    (members may be different backbones) and scaled to a per-image maximum of 1 before averaging, so every member
    weighs the same, as in the ensemble's mean probability. A member with no positive evidence adds zeros."""

    def __init__(self, cams: list[GradCam]):
        self.cams = cams

    def __call__(self, x) -> np.ndarray:
        return np.mean([cam(x) for cam in self.cams], axis=0).astype(np.float32)


class MirrorCam:
    """Grad-CAM of a checkpoint with test-time augmentation ``hflip``: the mean of the image's map and the mirror
    image's map mirrored back, as its logits are the mean over the two."""

    def __init__(self, cam: GradCam):
        self.cam = cam

    def __call__(self, x) -> np.ndarray:
        return ((self.cam(x) + self.cam(x.flip(-1))[..., ::-1]) / 2).astype(np.float32)


def cam_for(loaded, layer: str | None = None) -> GradCam | MirrorCam | EnsembleCam:
    """The Grad-CAM of a loaded checkpoint (``load_checkpoint(..., optimize=False)``: unfused, so layer names are
    those of models.py): one model's, or the mean over an ensemble's members. ``layer`` names the hooked module
    (in every member of an ensemble); a model without it raises :class:`LayerError`."""
    from .checkpoint import LoadedEnsemble

    cams = []
    for member in loaded.members if isinstance(loaded, LoadedEnsemble) else [loaded]:
        model = member.model.eval()
        for p in model.parameters():
            p.requires_grad_(False)  # gradients flow to the activations only
        for m in model.modules():  # in-place activations would overwrite the hooked tensors
            if hasattr(m, "inplace"):
                m.inplace = False
        try:
            module = target_layer(model, member.info.backbone, layer)
        except ValueError as exc:
            raise LayerError(f"--layer {layer}: {exc}" if layer else str(exc)) from exc
        cam = GradCam(model, module, member.info.positive_index)
        cams.append(MirrorCam(cam) if member.info.tta == "hflip" else cam)
    return cams[0] if len(cams) == 1 else EnsembleCam(cams)


def check_model(model_uri: str, layer: str | None, settings: storage.S3Settings):
    """Fail early, on the driver: the checkpoint loads (CheckpointError) and has the Grad-CAM layer (LayerError).
    Returns its ModelInfo."""
    from .checkpoint import load_checkpoint

    loaded = load_checkpoint(model_uri, optimize=False, settings=settings)
    cam_for(loaded, layer)
    return loaded.info


# --------------------------------------------------------------------------- overlays

NO_EVIDENCE = "no positive evidence"  # what a null focus means (a zero Grad-CAM map), in captions and summaries


def versus_threshold(prob: float, threshold: float, prediction: str | None) -> str:
    """``p=0.5399 < 0.5401: non``: the probability against the threshold, each to as many decimals as it takes
    to tell them apart (at least 2), and the prediction."""
    p, t = float(prob), float(threshold)
    digits = next(d for d in range(2, 7) if d == 6 or round(t, d) == round(t, 6))
    while digits < 6 and p != t and f"{p:.{digits}f}" == f"{t:.{digits}f}":
        digits += 1
    return f"p={p:.{digits}f} {'>=' if p >= t else '<'} {t:.{digits}f}: {prediction}"


def overlay_caption(prob: float, threshold: float, prediction: str | None, focus: float | None) -> str:
    """The caption under an overlay: ``p=0.54 < 0.5401: non, focus n/a (no positive evidence)``."""
    shown = f"{focus:.2f}" if focus is not None else f"n/a ({NO_EVIDENCE})"
    return f"{versus_threshold(prob, threshold, prediction)}, focus {shown}"


def overlay_png(
    image: np.ndarray,
    cam: np.ndarray,
    caption: str = "",
    size: int = 320,
    crop: tuple[float, float, float, float] | None = None,
) -> bytes:
    """The preprocessed image (what the model saw) in gray with the CAM in colour on top, the lung box
    outlined in white, and a caption strip below. PNG bytes."""
    from matplotlib import colormaps
    from PIL import Image, ImageDraw

    gray = np.clip(np.asarray(image, np.float32), 0, 1)
    heat = colormaps["jet"](np.clip(cam, 0, 1))[..., :3]
    alpha = 0.45 * np.clip(cam, 0, 1)[..., None] + 0.1
    rgb = (1 - alpha) * gray[..., None] + alpha * heat
    im = Image.fromarray((rgb * 255).astype(np.uint8), "RGB").resize((size, size), Image.Resampling.BILINEAR)
    x0, x1, y0, y1 = lung_box_in_input(crop)
    ImageDraw.Draw(im).rectangle([x0 * size, y0 * size, x1 * size - 1, y1 * size - 1], outline=(255, 255, 255), width=1)
    out = Image.new("RGB", (size, size + 22), (255, 255, 255))
    out.paste(im, (0, 0))
    ImageDraw.Draw(out).text((4, size + 5), caption[:64], fill=(0, 0, 0))
    buf = BytesIO()
    out.save(buf, "PNG", optimize=True)
    return buf.getvalue()


def heatmap_name(path: str) -> str:
    stem = posixpath.splitext(posixpath.basename(path.rstrip("/")))[0]
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", stem)[:60] or "image"
    return f"{hashlib.sha1(path.encode()).hexdigest()[:10]}_{stem}.png"


# --------------------------------------------------------------------------- Ray Data actor


class Explainer:
    """Ray Data callable class: the scoring Predictor's row plus Grad-CAM, focus and an overlay PNG.

    Rows with a true ``overlay`` column (or every row with ``overlay_all``) get a PNG written to
    ``output/heatmaps/``. Columns other than the pipeline's (``label``, ``set``, ...) pass through. With
    ``embeddings``, an ``embedding`` column too: the model's penultimate-layer features
    (:func:`cxr.models.penultimate_features`; an ensemble's members' side by side), null for unreadable rows.
    """

    def __init__(
        self,
        model_uri: str,
        run_id: str,
        threads: int,
        settings: storage.S3Settings,
        output: str | None = None,
        overlay_all: bool = False,
        layer: str | None = None,
        embeddings: bool = False,
    ):
        import torch

        from .checkpoint import load_checkpoint
        from .score import Predictor

        self.predictor = Predictor(model_uri, run_id, threads, False, settings)
        loaded = load_checkpoint(model_uri, optimize=False, settings=settings)  # unfused: layer names as in models.py
        self.info = loaded.info
        self.gradcam = cam_for(loaded, layer)
        self.loaded = loaded if embeddings else None
        self.settings, self.output, self.overlay_all = settings, output, overlay_all
        torch.set_num_threads(threads)

    def __call__(self, batch: dict) -> pa.Table:
        from .preprocess import to_model_input

        table = self.predictor(batch)
        n = table.num_rows
        ok = np.array([v is not None for v in table["prob_covid"].to_pylist()], bool)
        focus = np.full(n, np.nan, np.float32)
        corner = np.full(n, np.nan, np.float32)
        heatmaps: list[str | None] = [None] * n
        want = np.asarray(batch["overlay"], bool) if "overlay" in batch else np.full(n, self.overlay_all)
        if ok.any():
            idx = np.flatnonzero(ok)
            cams = self.gradcam(to_model_input(batch["image"][idx], self.info.preprocess))
            probs = table["prob_covid"].to_numpy(zero_copy_only=False)
            thresholds = table["threshold"].to_numpy(zero_copy_only=False)
            predictions = table["prediction"].to_pylist()
            for k, i in enumerate(idx):
                f, c = focus_scores(cams[k], self.info.preprocess.crop)
                focus[i] = np.nan if f is None else f
                corner[i] = np.nan if c is None else c
                if self.output and (want[i] or self.overlay_all):
                    name = heatmap_name(str(batch["path"][i]))
                    caption = overlay_caption(probs[i], thresholds[i], predictions[i], f)
                    storage.write_bytes(
                        storage.join(self.output, HEATMAP_DIR, name),
                        overlay_png(batch["image"][i], cams[k], caption, crop=self.info.preprocess.crop),
                        self.settings,
                    )
                    heatmaps[i] = f"{HEATMAP_DIR}/{name}"
        has = ~np.isnan(focus)
        if self.loaded is not None:
            table = table.append_column("embedding", self._embeddings(batch["image"], ok))
        cols = {
            "focus": pa.array(focus, pa.float32(), mask=~has),
            "corner_share": pa.array(corner, pa.float32(), mask=~has),
            "outside_lungs": pa.array(focus < FOCUS_THRESHOLD, pa.bool_(), mask=~has),
            "heatmap": pa.array(heatmaps, pa.string()),
        }
        for name, arr in cols.items():
            table = table.append_column(name, arr)
        skip = {"path", "image", "width", "height", "error", "overlay"}
        for key, values in batch.items():
            if key not in skip and key not in table.column_names:
                table = table.append_column(key, pa.array(list(values)))
        return table

    def _embeddings(self, images, ok: np.ndarray) -> pa.Array:
        """The penultimate-layer features of the readable images, a list of float32 per row (null elsewhere)."""
        import torch

        from .checkpoint import LoadedEnsemble
        from .models import penultimate_features
        from .preprocess import to_model_input

        out: list = [None] * len(ok)
        if ok.any():
            idx = np.flatnonzero(ok)
            x = to_model_input(images[idx], self.info.preprocess)
            members = self.loaded.members if isinstance(self.loaded, LoadedEnsemble) else [self.loaded]
            feats = torch.cat([penultimate_features(m.model, x) for m in members], dim=1).numpy()
            for k, i in enumerate(idx):
                out[i] = feats[k]
        return pa.array(out, pa.list_(pa.float32()))


def explain_dataset(
    paths_ds,
    model_uri: str,
    spec,
    plan,
    run_id: str,
    settings: storage.S3Settings,
    output: str | None = None,
    overlay_all: bool = False,
    layer: str | None = None,
    all_views: bool = False,
    embeddings: bool = False,
):
    """Lazy Ray Dataset of score rows + ``focus``, ``corner_share``, ``outside_lungs``, ``heatmap`` (and
    ``embedding`` with ``embeddings``)."""
    import ray.data

    from .runtime import torch_actor_remote_args
    from .score import decoded_dataset

    decoded = decoded_dataset(paths_ds, spec, settings, plan.task_cpus, plan.batch_size, all_views=all_views)
    return decoded.map_batches(
        Explainer,
        fn_constructor_kwargs={
            "model_uri": model_uri,
            "run_id": run_id,
            "threads": plan.threads_per_actor,
            "settings": settings,
            "output": output,
            "overlay_all": overlay_all,
            "layer": layer,
            "embeddings": embeddings,
        },
        batch_size=plan.batch_size,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(min_size=1, max_size=plan.actors),
        num_cpus=plan.cpus_per_actor,
        **torch_actor_remote_args(),
    )


def run_explain(
    table: pa.Table,
    model_uri: str,
    settings: storage.S3Settings,
    output: str | None = None,
    *,
    overlay_all: bool = False,
    layer: str | None = None,
    batch_size: int = 16,
    actors: int | None = None,
    all_views: bool = False,
    embeddings: bool = False,
) -> pa.Table:
    """Explain every row of ``table`` (a ``path`` column, optional ``overlay`` and pass-through columns);
    the result rows, collected on the driver. ``all_views``: lateral and oblique DICOM views too;
    ``embeddings``: an ``embedding`` column (:class:`Explainer`)."""
    import ray

    from .checkpoint import load_info
    from .output import new_run_id
    from .resources import cluster_plan
    from .runtime import ensure_ray
    from .sources import table_dataset

    info = load_info(model_uri, settings)
    ensure_ray()
    plan = cluster_plan(actors=actors, batch_size=batch_size, gpus_per_actor=0)
    ds = explain_dataset(
        table_dataset(table),
        model_uri,
        info.preprocess,
        plan,
        new_run_id(),
        settings,
        output,
        overlay_all,
        layer,
        all_views,
        embeddings,
    )
    return pa.concat_tables(ray.get(ds.to_arrow_refs()), promote_options="default")


# --------------------------------------------------------------------------- gallery and job


def no_evidence(rows: list[dict]) -> int:
    """How many explained rows (no error) have a zero Grad-CAM map: null focus, no positive evidence."""
    return sum(r.get("error") is None and r.get("focus") is None for r in rows)


def gallery_stats(rows: list[dict]) -> str:
    """``6 images, median focus 0.53 of 2, 0 of 2 with focus < 0.5, 4 with no positive evidence (focus n/a)``."""
    focus = np.array([r["focus"] for r in rows if r.get("focus") is not None], float)
    no_focus = no_evidence(rows)
    parts = [f"{len(rows)} images"]
    if focus.size:
        parts += [
            f"median focus {np.median(focus):.2f}" + (f" of {focus.size}" if no_focus else ""),
            f"{int(np.sum(focus < FOCUS_THRESHOLD))} of {focus.size} with focus < {FOCUS_THRESHOLD}",
        ]
    if no_focus:
        parts.append(f"{no_focus} with {NO_EVIDENCE} (focus n/a)")
    elif not focus.size:
        parts.append("no focus scores")
    return ", ".join(parts)


def gallery_html(rows: list[dict], title: str, note: str = "") -> str:
    """A page of overlay thumbnails (relative links), highest probability first."""
    from .pages import CSS, esc

    shown = sorted((r for r in rows if r.get("heatmap")), key=lambda r: -(r.get("prob_covid") or 0))
    figs = []
    for r in shown:
        f = r.get("focus")
        flag = ' style="border:3px solid #d62728"' if r.get("outside_lungs") else ""
        vs = (
            versus_threshold(r["prob_covid"], r["threshold"], r.get("prediction"))
            if r.get("threshold") is not None
            else f"p={r['prob_covid']:.3f}: {r.get('prediction')}"
        )
        figs.append(
            f'<figure><a href="{esc(r["heatmap"])}"><img src="{esc(r["heatmap"])}" width="240"{flag}></a>'
            f"<figcaption>{esc(posixpath.basename(r['path']))}<br>{esc(vs)}"
            f" · focus {f'n/a ({NO_EVIDENCE})' if f is None else f'{f:.2f}'}</figcaption></figure>"
        )
    stats = gallery_stats(rows)
    no_focus = no_evidence(rows)
    x0, x1, y0, y1 = LUNG_BOX
    return "\n".join(
        [
            "<!DOCTYPE html>",
            '<html lang="en"><head><meta charset="utf-8">',
            f"<title>{esc(title)}</title><style>{CSS}</style></head><body>",
            f"<h1>{esc(title)}</h1>",
            f'<p class="sub">{esc(stats)}. {esc(note)}</p>',
            "<p>Grad-CAM of the COVID-19 class on the image the model saw (squashed to a square). White box: the "
            "lung region "
            f"(x {x0:.0%}–{x1:.0%}, y {y0:.0%}–{y1:.0%} of the image); <b>focus</b> = share of the heatmap inside it "
            "(uniform: 0.525). "
            f"Red frame: focus &lt; {FOCUS_THRESHOLD} (the evidence sits mostly outside the lungs). Captions: the "
            "probability "
            f"of COVID-19 against the model's threshold, and the prediction.</p>",
            (
                f"<p><b>focus n/a ({NO_EVIDENCE})</b>, {no_focus} of these images: their Grad-CAM map is zero. "
                "Grad-CAM keeps only "
                "the regions whose activations raise the COVID-19 score; in these images none does (typical of an "
                "image the model "
                "finds clearly negative), so there is no evidence to locate, and they are not in the median focus.</p>"
                if no_focus
                else ""
            ),
            '<div class="figs">' + "".join(figs) + "</div>",
            "<footer>Generated by cxr.explain. Research tool, not a medical device.</footer></body></html>",
        ]
    )


@dataclass
class ExplainSummary:
    output: str
    files: int
    explained: int
    errors: int
    outside_lungs: int
    median_focus: float | None
    heatmaps: int
    seconds: float
    not_frontal: int = 0  # of the errors: lateral/oblique DICOM views (without --all-views)
    no_focus: int = 0  # of the explained: a zero Grad-CAM map, no positive evidence (focus null)
    available: int | None = None  # files of the input before a limit took ``files`` of them
    limit_option: str = "--limit"  # the option that set the limit, for the summary line

    def selection(self) -> str | None:
        """``6 of 15 files (--limit 6)`` when a limit cut the input, else None."""
        if self.available is None or self.available <= self.files:
            return None
        return f"{self.files} of {self.available} files ({self.limit_option} {self.files})"

    def line(self) -> str:
        views = f", {self.not_frontal} not frontal views" if self.not_frontal else ""
        notes = f"{self.errors - self.not_frontal} unreadable{views}"
        if self.selection():
            head = f"explained {self.explained} of {self.available} files ({self.limit_option} {self.files}; {notes})"
        else:
            head = f"explained {self.explained} of {self.files} images ({notes})"
        scored = self.explained - self.no_focus
        mf = (
            "n/a"
            if self.median_focus is None
            else f"{self.median_focus:.2f}" + (f" of {scored}" if self.no_focus else "")
        )
        none = f", {self.no_focus} with {NO_EVIDENCE} (focus n/a)" if self.no_focus else ""
        return (
            f"{head}: median focus {mf}{none}, {self.outside_lungs} with focus < {FOCUS_THRESHOLD}; "
            f"{self.heatmaps} heatmaps -> {storage.join(self.output, 'gallery.html')}"
        )


def explain_paths(
    paths: list[str],
    model: str,
    output: str,
    *,
    overwrite: bool = False,
    layer: str | None = None,
    batch_size: int = 16,
    actors: int | None = None,
    title: str | None = None,
    all_views: bool = False,
    available: int | None = None,
    limit_option: str = "--limit",
) -> ExplainSummary:
    """Grad-CAM overlays for every path, ``explanations.parquet``, ``gallery.html`` and ``_summary.json`` at ``output``.
    ``available``: how many files the input had when a limit (``limit_option``) picked ``paths`` from them."""
    import pyarrow.parquet as pq

    from .output import prepare_output
    from .score import count_not_frontal

    settings = storage.s3_settings()
    check_model(model, layer, settings)
    prepare_output(output, overwrite, settings)
    start = time.perf_counter()
    result = run_explain(
        pa.table({"path": pa.array(paths, pa.string())}),
        model,
        settings,
        output,
        overlay_all=True,
        layer=layer,
        batch_size=batch_size,
        actors=actors,
        all_views=all_views,
    )
    fs, path = storage.filesystem(output, settings)
    pq.write_table(result, f"{path}/explanations.parquet", filesystem=fs)
    rows = result.to_pylist()
    focus = [r["focus"] for r in rows if r["focus"] is not None]
    summary = ExplainSummary(
        output,
        len(rows),
        sum(r["error"] is None for r in rows),
        sum(r["error"] is not None for r in rows),
        sum(bool(r["outside_lungs"]) for r in rows),
        float(np.median(focus)) if focus else None,
        sum(r["heatmap"] is not None for r in rows),
        round(time.perf_counter() - start, 1),
        count_not_frontal(result["error"]),
        no_evidence(rows),
        available,
        limit_option,
    )
    note = f"Explained {summary.selection()}." if summary.selection() else ""
    storage.write_bytes(
        storage.join(output, "gallery.html"), gallery_html(rows, title or f"Grad-CAM: {model}", note).encode(), settings
    )
    storage.write_bytes(storage.join(output, "_summary.json"), json.dumps(asdict(summary), indent=2).encode(), settings)
    return summary


def explain(
    inputs: list[str], model: str, output: str, *, limit: int | None = None, seed: int = 0, **kwargs
) -> ExplainSummary:
    """Explain every image under ``inputs`` (folders, s3:// prefixes, manifests; as score.py); ``limit``
    takes a random subset of that size (fixed ``seed``)."""
    from .sources import input_paths

    paths = input_paths(inputs, storage.s3_settings()).to_pylist()
    available = len(paths)
    if limit is not None and len(paths) > limit:
        rng = np.random.default_rng(seed)
        paths = sorted(rng.choice(paths, size=limit, replace=False).tolist())
    return explain_paths(paths, model, output, available=available, **kwargs)


POSITIVE_HEATMAPS_DIR = "_heatmaps"  # '_' prefix: readers of the score table (pyarrow datasets) skip it


def explain_positives(
    score_output: str, model: str, *, output: str | None = None, limit: int | None = None, **kwargs
) -> ExplainSummary | None:
    """Post-step of a finished score run: Grad-CAM for the rows predicted positive, written under
    ``score_output/_heatmaps/`` (or ``output``). None when no row is positive."""
    import pyarrow.compute as pc
    import pyarrow.dataset as pads

    settings = storage.s3_settings()
    fs, path = storage.filesystem(score_output, settings)
    table = pads.dataset(path, filesystem=fs, format="parquet").to_table(columns=["path", "prediction", "prob_covid"])
    positive = table.filter(pc.and_(pc.equal(table["prediction"], "covid"), pc.is_valid(table["prob_covid"])))
    positive = positive.sort_by([("prob_covid", "descending")])
    available = positive.num_rows
    if limit is not None:
        positive = positive.slice(0, limit)
    if positive.num_rows == 0:
        return None
    target = output or storage.join(score_output, POSITIVE_HEATMAPS_DIR)
    # every view: a row predicted positive was scored, whatever its view (score --all-views)
    return explain_paths(
        positive["path"].to_pylist(),
        model,
        target,
        title="Grad-CAM of images predicted COVID-19",
        all_views=True,
        available=available,
        limit_option="--explain-limit",
        **kwargs,
    )
