"""Two CPU helpers that must never become the bottleneck, each against a baseline measured in the same run.

    .venv/bin/python benchmarks/helpers.py [--resamples 1000] [--image-size 224]

1. The bootstrap behind every evaluation report's AUC intervals (``cxr.metrics.bootstrap_auc_ci``: all
   resamples as count histograms over the distinct scores) against the textbook loop (scikit-learn's
   ``roc_auc_score`` and ``average_precision_score`` once per resample), on a test-split-sized set
   (500 COVID + 4,500 non). Prints both times and the speed-up.
2. The training augmentation (``cxr.augment.augment``, default config, one image) against the training step
   it feeds (mobilenet_v2 forward + backward + AdamW, per image of a batch of 32, all cores). Prints the
   augmentation's cost as a share of the step: well below 1 means the data loader keeps up.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "lib"))

import numpy as np


def bootstrap(resamples: int) -> dict:
    from sklearn.metrics import average_precision_score, roc_auc_score

    from cxr.metrics import bootstrap_auc_ci

    rng = np.random.default_rng(3)
    y = np.r_[np.ones(500, dtype=int), np.zeros(4500, dtype=int)]
    p = np.r_[rng.beta(5, 2, 500), rng.beta(2, 5, 4500)]
    bootstrap_auc_ci(y, p, n_bootstrap=10)  # warm-up
    t = time.perf_counter()
    ours = bootstrap_auc_ci(y, p, n_bootstrap=resamples, seed=0)
    fast = time.perf_counter() - t
    pos, neg = np.flatnonzero(y == 1), np.flatnonzero(y == 0)
    loop_n = max(20, resamples // 10)  # the loop is slow: time a tenth and scale
    roc, ap = [], []
    t = time.perf_counter()
    for _ in range(loop_n):
        idx = np.r_[rng.choice(pos, pos.size), rng.choice(neg, neg.size)]
        roc.append(roc_auc_score(y[idx], p[idx]))
        ap.append(average_precision_score(y[idx], p[idx]))
    loop = (time.perf_counter() - t) * resamples / loop_n
    return {
        "resamples": resamples,
        "n": int(y.size),
        "seconds": round(fast, 3),
        "sklearn_loop_seconds": round(loop, 2),
        "speedup": round(loop / fast, 1),
        "roc_ci": [round(v, 4) for v in ours["roc_auc"]],
        "loop_roc_ci": [round(float(v), 4) for v in np.percentile(roc, [2.5, 97.5])],
    }


def augmentation(image_size: int, batch_size: int = 32, steps: int = 5) -> dict:
    import torch
    import torchvision

    from cxr.augment import AugmentConfig, augment

    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:image_size, 0:image_size] / image_size
    img = np.clip(0.3 + 0.3 * np.sin(3 * xx) * np.cos(2 * yy) + 0.05 * rng.standard_normal(yy.shape), 0, 1).astype(
        np.float32
    )
    config = AugmentConfig()
    for _ in range(5):
        augment(img, rng, config)
    n = 100
    t = time.perf_counter()
    for _ in range(n):
        augment(img, rng, config)
    per_image_aug = (time.perf_counter() - t) / n

    torch.set_num_threads(os.cpu_count() or 1)
    model = torchvision.models.mobilenet_v2(num_classes=2)
    optimizer = torch.optim.AdamW(model.parameters(), 3e-4)
    x = torch.randn(batch_size, 3, image_size, image_size)
    y = torch.randint(0, 2, (batch_size,))

    def step() -> None:
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()

    step()
    t = time.perf_counter()
    for _ in range(steps):
        step()
    per_image_step = (time.perf_counter() - t) / (steps * batch_size)
    return {
        "image_size": image_size,
        "augment_ms_per_image": round(per_image_aug * 1e3, 2),
        "train_step_ms_per_image": round(per_image_step * 1e3, 2),
        "augment_share_of_step": round(per_image_aug / per_image_step, 3),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--resamples", type=int, default=1000)
    ap.add_argument("--image-size", type=int, default=224)
    args = ap.parse_args()
    b = bootstrap(args.resamples)
    print(
        f"bootstrap AUC intervals, {b['resamples']} resamples of {b['n']}: {b['seconds']} s, scikit-learn loop "
        f"{b['sklearn_loop_seconds']} s -> {b['speedup']}x faster (ROC AUC interval {b['roc_ci']} vs loop "
        f"{b['loop_roc_ci']})"
    )
    a = augmentation(args.image_size)
    print(
        f"augmentation {a['augment_ms_per_image']} ms per {a['image_size']} px image vs training step "
        f"{a['train_step_ms_per_image']} ms per image -> {a['augment_share_of_step']:.1%} of the step"
    )
    print(json.dumps({"bootstrap": b, "augmentation": a}))


if __name__ == "__main__":
    main()
