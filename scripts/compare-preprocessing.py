"""Which preprocessing makes a model that holds up on other hospitals' X-rays? A quick comparison.

Trains mobilenet_v2 (ImageNet weights) with a plain PyTorch loop on the COVID-Xray-5k training split once per
preprocessing variant (same split, seed, augmentation and schedule), chooses each model's threshold on its
validation split (sensitivity >= 0.98), and prints, per variant, validation AUC/specificity next to the
external figures at that threshold: sensitivity on Hannover / Actualmed / Figure1 COVID-19, false-positive rate
on Actualmed / Figure1 / Kermany normals, and the ROC AUC on Actualmed (COVID-19 and normals of ONE source:
the fairest external test of whether the model sees the disease rather than the source).

    .venv/bin/python scripts/compare-preprocessing.py --data ../shared/data [--size 128] [--epochs 5]

Images are decoded once (squashed to 320 px); a variant then crops, resizes and normalises from that. The
train job does the same with --crop / --equalize (recorded in the checkpoint). About 4 minutes per variant
on 2 CPUs at 128 px. Results append to --out as JSON lines.
"""

from __future__ import annotations

import argparse
import csv
import glob
import json
import os
import re
import sys
import time

import numpy as np
from PIL import Image

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "lib"))

from cxr.augment import AugmentConfig, augment
from cxr.decode import decode
from cxr.metrics import choose_threshold
from cxr.models import create_model
from cxr.preprocess import LUNG_BOX, PreprocessSpec, preprocess, to_model_input

SETS = {
    "train_covid": "covid-xray-5k/train/covid/*",
    "train_non": "covid-xray-5k/train/non/*",
    "hannover": "external/hannover-covid/covid/*",
    "actualmed_covid": "external/actualmed/covid/*",
    "actualmed_non": "external/actualmed/non/*",
    "figure1_covid": "external/figure1/covid/*",
    "figure1_non": "external/figure1/non/*",
    "kermany": "external/kermany-pediatric/test/non/*",
}
VARIANTS = {  # name -> (PreprocessSpec keywords, augmentation degrade_p)
    "whole image": ({}, 0.5),
    "lung crop": ({"crop": LUNG_BOX}, 0.5),
    "lung crop + equalise": ({"crop": LUNG_BOX, "equalize": True}, 0.5),
    "lung crop + equalise + more degradation": ({"crop": LUNG_BOX, "equalize": True}, 0.8),
}
BASE = 320


def load(root: str) -> dict[str, tuple[np.ndarray, list[str]]]:
    out = {}
    for key, pattern in SETS.items():
        files = sorted(glob.glob(os.path.join(root, pattern)))
        arrays = []
        for f in files:
            with open(f, "rb") as fh:
                img = decode(fh.read(), f).image
            arrays.append(
                np.asarray(
                    Image.fromarray(img.astype(np.float32)).resize((BASE, BASE), Image.Resampling.BILINEAR), np.float16
                )
            )
        out[key] = (np.stack(arrays), [os.path.basename(f) for f in files])
        print(f"  {key}: {len(files)} images", flush=True)
    return out


def run_variant(name, spec, degrade, data, groups, args) -> dict:
    import torch
    from sklearn.metrics import roc_auc_score
    from sklearn.model_selection import StratifiedGroupKFold

    torch.set_num_threads(os.cpu_count() or 1)
    prep = lambda key: np.stack([preprocess(x.astype(np.float32), spec) for x in data[key][0]])  # noqa: E731
    x = np.concatenate([prep("train_covid"), prep("train_non")])
    y = np.r_[np.ones(len(data["train_covid"][0])), np.zeros(len(data["train_non"][0]))].astype(int)
    tr, va = next(StratifiedGroupKFold(5, shuffle=True, random_state=args.seed).split(x, y, groups))
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    model = create_model("mobilenet_v2", weights="imagenet")
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, args.epochs)
    idx = np.r_[np.repeat(tr[y[tr] == 1], 5), tr[y[tr] == 0]]
    weight = torch.tensor([1.0, float((y[idx] == 0).sum() / (y[idx] == 1).sum())])
    aug = AugmentConfig(degrade_p=degrade)

    def predict(images):
        model.eval()
        with torch.inference_mode():
            return np.concatenate(
                [
                    torch.softmax(model(to_model_input(images[i : i + 128], spec)), 1)[:, 1].numpy()
                    for i in range(0, len(images), 128)
                ]
            )

    for epoch in range(args.epochs):
        model.train()
        t0 = time.perf_counter()
        for b in np.array_split(rng.permutation(idx), max(1, len(idx) // 32)):
            xb = to_model_input(np.stack([augment(x[j], rng, aug) for j in b]), spec)
            loss = torch.nn.functional.cross_entropy(model(xb), torch.as_tensor(y[b]), weight=weight)
            opt.zero_grad()
            loss.backward()
            opt.step()
        sched.step()
        print(f"  {name}: epoch {epoch} {time.perf_counter() - t0:.0f}s", flush=True)
    pv = predict(x[va])
    t = choose_threshold(y[va], pv, 0.98)
    ext = {k: predict(prep(k)) for k in SETS if not k.startswith("train")}
    res = {
        "variant": name,
        "preprocess": spec.to_dict(),
        "degrade_p": degrade,
        "size": args.size,
        "epochs": args.epochs,
        "seed": args.seed,
        "val_auc": float(roc_auc_score(y[va], pv)),
        "threshold": float(t),
        "val_specificity": float(np.mean(pv[y[va] == 0] < t)),
    }
    for k, p in ext.items():
        res[k + ("_sensitivity" if k.endswith("covid") or k == "hannover" else "_fpr")] = float(np.mean(p >= t))
    a_pos, a_neg = ext["actualmed_covid"], ext["actualmed_non"]
    res["actualmed_auc"] = float(roc_auc_score(np.r_[np.ones(len(a_pos)), np.zeros(len(a_neg))], np.r_[a_pos, a_neg]))
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="../shared/data", help="folder holding covid-xray-5k/ and external/")
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated subset of: " + ", ".join(VARIANTS))
    ap.add_argument("--out", default="runs/compare-preprocessing.jsonl")
    args = ap.parse_args()
    print("decoding ...", flush=True)
    data = load(args.data)
    meta = {}
    with open(
        os.path.join(args.data, "covid-xray-5k", "SOURCE", "covid_images_ieee8023_metadata.tsv"), newline=""
    ) as f:
        for row in csv.DictReader(f, delimiter="\t"):  # images cut from one case report stay on one side
            meta[row["filename"]] = row["url"] or row["filename"]
    groups = [meta.get(n, n) for n in data["train_covid"][1]] + [
        (re.search(r"patient\d+", n) or [n])[0] for n in data["train_non"][1]
    ]
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    for name in [v.strip() for v in args.variants.split(",") if v.strip()]:
        kwargs, degrade = VARIANTS[name]
        res = run_variant(name, PreprocessSpec(input_size=args.size, **kwargs), degrade, data, groups, args)
        print(
            json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in res.items() if k != "preprocess"}),
            flush=True,
        )
        with open(args.out, "a") as f:
            f.write(json.dumps(res) + "\n")


if __name__ == "__main__":
    main()
