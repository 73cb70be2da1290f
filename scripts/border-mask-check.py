"""How much do a model's decisions rest on the image borders (side markers, text, collimation)?

Scores each set twice with the model's own preprocessing: as is, and with everything outside the audit's
lung box (15-85% of the width, 10-85% of the height) of the decoded image replaced by the median of the
inside. A model that
reads the lungs changes little; one that reads the borders changes a lot.

    .venv/bin/python scripts/border-mask-check.py --model default --data ../shared/data
"""

from __future__ import annotations

import argparse
import glob
import os
import random
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "lib"))

from cxr.checkpoint import load_checkpoint
from cxr.decode import decode
from cxr.preprocess import LUNG_BOX, preprocess

BOX = LUNG_BOX  # top, bottom, left, right: the audit's lung box


def positive_share(model, files: list[str], masked: bool, batch: int = 32) -> tuple[float, float]:
    spec, probs = model.info.preprocess, []
    for i in range(0, len(files), batch):
        arrays = []
        for path in files[i : i + batch]:
            with open(path, "rb") as f:
                image = decode(f.read(), path).image
            if masked:  # on the decoded image, before the model's own preprocessing (which may crop)
                h, w = image.shape
                keep = np.zeros(image.shape, bool)
                keep[int(BOX[0] * h) : int(BOX[1] * h), int(BOX[2] * w) : int(BOX[3] * w)] = True
                image = np.where(keep, image, np.median(image[keep])).astype(np.float32)
            x = preprocess(image, spec)
            arrays.append(x)
        probs.append(model.predict_proba(np.stack(arrays)))
    p = np.concatenate(probs)
    return float(np.mean(p >= model.info.threshold)), float(np.median(p))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="default")
    ap.add_argument("--data", default="../shared/data", help="folder holding covid-xray-5k/ and external/")
    ap.add_argument("--limit", type=int, default=300, help="at most N images per set (random, seed 0)")
    args = ap.parse_args()
    model = load_checkpoint(args.model)
    sets = {
        "covid-xray-5k train covid": "covid-xray-5k/train/covid/*",
        "covid-xray-5k train non": "covid-xray-5k/train/non/*",
        "hannover-covid covid": "external/hannover-covid/covid/*",
        "kermany-pediatric test non": "external/kermany-pediatric/test/non/*",
    }
    rng = random.Random(0)
    print(f"model {model.info.model_id}, threshold {model.info.threshold:.4f}; share called covid (median probability)")
    for name, pattern in sets.items():
        files = sorted(glob.glob(os.path.join(args.data, pattern)))
        if not files:
            print(f"{name:30s} (no files)")
            continue
        files = rng.sample(files, args.limit) if len(files) > args.limit else files
        (a, ma), (b, mb) = positive_share(model, files, False), positive_share(model, files, True)
        print(f"{name:30s} n={len(files):4d}  as is {a:.3f} ({ma:.3f})  borders masked {b:.3f} ({mb:.3f})", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
