"""Generated chest-X-ray-like data sets with planted problems, and tiny models that look where we tell them.

Used by test_validate.py, test_explain.py and test_audit.py.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image

from .images import dicom_bytes, jpeg_bytes, png_bytes


def chest_like(h: int, w: int, seed: int, finding: bool = False, marker: bool = False) -> np.ndarray:
    """A uint8 'chest X-ray': bright body, two dark lung fields, random soft structures (so that images
    differ in their low frequencies, as real X-rays do), noise. ``finding``: a soft bright opacity
    inside a lung. ``marker``: a bright square in the top-left corner (a burnt-in label)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w] / np.array([h, w])[:, None, None]
    img = 150 + 30 * rng.standard_normal() * (x - 0.5)
    for cx in (0.32 + rng.uniform(-0.04, 0.04), 0.68 + rng.uniform(-0.04, 0.04)):
        lung = ((x - cx) / 0.15) ** 2 + ((y - 0.47 - rng.uniform(-0.05, 0.05)) / 0.3) ** 2 < 1
        img = img - 70 * lung
    for _ in range(4):  # ribs / vessels / clothing: random soft blobs anywhere
        cx, cy, r = rng.uniform(0.1, 0.9), rng.uniform(0.1, 0.9), rng.uniform(0.08, 0.2)
        img = img + rng.uniform(-35, 35) * np.exp(-(((x - cx) ** 2 + (y - cy) ** 2) / (2 * r * r)))
    # a soft patch inside a lung: bright (an opacity) with the finding, dark otherwise, so that both
    # classes compress alike and file size says nothing about the label
    cx, cy = rng.choice([0.32, 0.68]) + rng.uniform(-0.04, 0.04), rng.uniform(0.4, 0.6)
    img = img + (55 if finding else -55) * np.exp(-(((x - cx) ** 2 + (y - cy) ** 2) / (2 * 0.07**2)))
    img = img + rng.normal(0, 5, (h, w))
    if marker:  # a burnt-in label: a bright square in the top-left corner
        s = max(4, int(0.16 * min(h, w)))
        img[2 : 2 + s, 2 : 2 + s] = 250
    return np.clip(img, 5, 250).astype(np.uint8)


def write_png(path: Path, arr: np.ndarray, mode: str | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(png_bytes(arr, mode))
    return path


def clean_tree(root: Path, n_train: int = 12, n_test: int = 6, size: int = 64, seed: int = 0) -> Path:
    """{train,test}/{covid,non}/: same size, mode and format in both classes; covid images carry a finding."""
    k = 0
    for split, n in (("train", n_train), ("test", n_test)):
        for cls in ("covid", "non"):
            for i in range(n):
                k += 1
                write_png(
                    root / split / cls / f"{cls}-{split}-{i}.png",
                    chest_like(size, size, seed * 100_000 + k, finding=cls == "covid"),
                )
    return root


def planted_tree(root: Path, seed: int = 1) -> tuple[Path, dict]:
    """A data set with one of every problem the validate job looks for. Returns (root, what was planted)."""
    k = 0
    for split, n in (("train", 12), ("test", 6)):
        for cls, (h, w) in (("covid", (96, 80)), ("non", (64, 64))):  # covid images are larger: a size shortcut
            for i in range(n):
                k += 1
                write_png(
                    root / split / cls / f"{cls}-{split}-{i}.png",
                    chest_like(h, w, seed * 100_000 + k, finding=cls == "covid"),
                )
    good = (root / "train" / "non" / "non-train-0.png").read_bytes()
    planted = {
        "truncated": write_png(root / "train" / "non" / "truncated.png", chest_like(64, 64, 7)),
        "empty": root / "train" / "non" / "empty.png",
        "wrong_extension": root / "train" / "non" / "really-a-jpeg.png",
        "exact_dup": root / "test" / "covid" / "copy-of-train-covid-3.png",
        "near_dup": root / "test" / "non" / "recompressed-train-non-5.jpg",
        "patient_train": write_png(
            root / "train" / "non" / "Atelectasis-patient00042-study1-view1_frontal.png", chest_like(64, 64, 4242)
        ),
        "patient_test": write_png(
            root / "test" / "non" / "No Finding-patient00042-study2-view1_frontal.png", chest_like(64, 64, 4343)
        ),
        "rgb": root / "train" / "non" / "colour.png",
        "tiny": write_png(root / "train" / "non" / "tiny.png", chest_like(20, 20, 99)),
        "lateral": root / "train" / "non" / "lateral-view.dcm",
    }
    planted["truncated"].write_bytes(planted["truncated"].read_bytes()[:300])
    planted["empty"].write_bytes(b"")
    planted["wrong_extension"].write_bytes(jpeg_bytes(chest_like(64, 64, 77)))
    planted["exact_dup"].write_bytes((root / "train" / "covid" / "covid-train-3.png").read_bytes())
    near = np.clip(np.asarray(Image.open(root / "train" / "non" / "non-train-5.png")).astype(int) + 6, 0, 255).astype(
        np.uint8
    )
    planted["near_dup"].write_bytes(jpeg_bytes(near))
    planted["rgb"].write_bytes(png_bytes(np.stack([chest_like(64, 64, 555)] * 3, -1)))
    planted["lateral"].write_bytes(dicom_bytes(chest_like(64, 64, 321).astype(np.uint16) * 16, view="LL"))
    assert good  # the originals stay untouched
    return root, planted


# --------------------------------------------------------------------------- models


def marker_tree(root: Path, n: int, size: int, seed: int, cue: str) -> Path:
    """{covid,non}/ where covid images carry ``cue``: "marker" (corner square only) or "finding"
    (opacity inside a lung only); non images carry neither."""
    for cls in ("covid", "non"):
        for i in range(n):
            s = seed * 100_000 + i + (50_000 if cls == "covid" else 0)
            pos = cls == "covid"
            arr = chest_like(size, size, s, finding=pos and cue == "finding", marker=pos and cue == "marker")
            write_png(root / cls / f"{cls}-{seed}-{i}.png", arr)
    return root


def train_tiny(root: Path, out: str, cue: str, size: int = 128, n: int = 30, epochs: int = 3, seed: int = 0) -> str:
    """Fine-tune mobilenet_v2 (ImageNet weights, plain torch loop, a few seconds on CPU) on a
    ``marker_tree`` and save it as a checkpoint with threshold 0.5."""
    import torch

    from cxr.checkpoint import ModelInfo, save_checkpoint
    from cxr.decode import decode
    from cxr.models import create_model
    from cxr.preprocess import PreprocessSpec, preprocess, to_model_input

    torch.manual_seed(seed)
    data = marker_tree(root, n, size, seed=900 + seed, cue=cue)
    spec = PreprocessSpec(input_size=size)
    paths = sorted(data.rglob("*.png"))
    x = np.stack([preprocess(decode(p.read_bytes(), p.name).image, spec) for p in paths])
    y = torch.tensor([int(p.parent.name == "covid") for p in paths])
    model = create_model("mobilenet_v2", weights="imagenet")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(paths), generator=g).split(16):
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(model(to_model_input(x[idx.numpy()], spec)), y[idx])
            loss.backward()
            opt.step()
    save_checkpoint(model.eval(), ModelInfo("mobilenet_v2", spec, threshold=0.5), out)
    return out


def jpeg_of(arr: np.ndarray, quality: int = 85) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def planted_sources(root: Path, n: int = 20, size: int = 64, skew: float = 0.8) -> Path:
    """A labelled manifest (``labels.csv``: path, label, patient, source) over three sources whose images carry
    nothing of the label, only their source's mark: ``a`` a bright square top-left, ``b`` none, ``c`` one
    bottom-right. ``a`` and ``c`` hold ``skew`` covid images, ``b`` as many non: recognising the source scores
    well on a pooled split, and inside any one source there is nothing to find (chance)."""
    s = size // 4
    corners = {"a": (slice(2, 2 + s), slice(2, 2 + s)), "b": None, "c": (slice(-2 - s, -2), slice(-2 - s, -2))}
    rows = ["path,label,patient,source"]
    k = 0
    for source, box in corners.items():
        n_covid = round(n * (1 - skew if source == "b" else skew))
        for i in range(n):
            k += 1
            img = chest_like(size, size, 7000 + k)
            if box:
                img[box] = 250
            write_png(root / "images" / f"{source}-{i}.png", img)
            rows.append(f"images/{source}-{i}.png,{'covid' if i < n_covid else 'non'},{source}-{i},{source}")
    (root / "labels.csv").write_text("\n".join(rows) + "\n")
    return root / "labels.csv"
