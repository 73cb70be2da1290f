"""Train job (Ray Train) vs a plain single-process PyTorch training loop, same data and model, one run.

    .venv/bin/python benchmarks/train.py [--data ../shared/data/covid-xray-5k] [--limit 320] [--epochs 2]

Both sides decode and preprocess the images once (the train job into Ray's object store, the loop into
memory), then train mobilenet_v2 from ImageNet weights with the same batch size, the same augmentation
and all of this machine's cores. Compared: training images/s per epoch after the first (the steady
state), and end-to-end wall time. Target on a 2-core machine: ratio >= 0.8.

The train job starts its workers with the malloc settings of ``cxr.runtime.TORCH_WORKER_MALLOC_ENV``; the
plain loop runs twice: as a user would write it (default allocator) and, in a subprocess, with those same
settings, so the job is also compared with a loop given the same advantage.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "lib"))


def subset(data: str, limit: int, root: str) -> str:
    """A {train}/{covid,non} tree of symlinks: up to limit/5 COVID images, the rest non-COVID."""
    from cxr.data import labelled_files

    files = labelled_files(data, "train")
    covid = [f for f in files if f.label == 1][: limit // 5]
    non = [f for f in files if f.label == 0][: limit - len(covid)]
    for f in covid + non:
        d = os.path.join(root, "train", "covid" if f.label else "non")
        os.makedirs(d, exist_ok=True)
        os.symlink(f.path, os.path.join(d, os.path.basename(f.path)))
    return root


def plain_loop(root: str, epochs: int, batch_size: int, image_size: int) -> tuple[list[float], float]:
    import numpy as np
    import torch

    from cxr.augment import AugmentConfig, augment
    from cxr.data import labelled_files
    from cxr.decode import decode
    from cxr.models import create_model
    from cxr.preprocess import PreprocessSpec, preprocess, to_model_input

    torch.set_num_threads(os.cpu_count() or 1)
    start = time.perf_counter()
    spec = PreprocessSpec(input_size=image_size)
    files = labelled_files(root, "train")
    images = np.stack([preprocess(decode(open(f.path, "rb").read(), f.path).image, spec) for f in files])
    labels = np.array([f.label for f in files])
    model = create_model("mobilenet_v2", "imagenet")
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-4)
    rng = np.random.default_rng(0)
    rates = []
    for _ in range(epochs):
        model.train()
        t = time.perf_counter()
        for idx in np.array_split(rng.permutation(len(files)), max(1, len(files) // batch_size)):
            x = to_model_input(np.stack([augment(images[i], rng, AugmentConfig()) for i in idx]), spec)
            loss = torch.nn.functional.cross_entropy(model(x), torch.as_tensor(labels[idx]))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        rates.append(len(files) / (time.perf_counter() - t))
    return rates, time.perf_counter() - start


def plain_loop_rate(root: str, epochs: int, batch_size: int, image_size: int) -> tuple[float, float]:
    rates, seconds = plain_loop(root, epochs, batch_size, image_size)
    return (sum(rates[1:]) / (len(rates) - 1) if len(rates) > 1 else rates[0]), seconds


def main() -> None:
    here = os.path.dirname(os.path.abspath(__file__))
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=os.path.join(here, "..", "..", "shared", "data", "covid-xray-5k"))
    p.add_argument("--limit", type=int, default=320)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--plain-only", metavar="ROOT", help=argparse.SUPPRESS)  # internal: the loop in a subprocess
    args = p.parse_args()
    if args.plain_only:
        print(json.dumps(plain_loop_rate(args.plain_only, args.epochs, args.batch_size, args.image_size)))
        return
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

    import ray

    from cxr.train import TrainConfig, train

    tmp = tempfile.mkdtemp(prefix="cxr-bench-train-")
    root = subset(os.path.abspath(args.data), args.limit, os.path.join(tmp, "data"))
    print(
        f"{args.limit} images, {args.epochs} epochs, mobilenet_v2 at {args.image_size} px, batch {args.batch_size}, "
        f"{os.cpu_count()} CPUs"
    )

    loop_rate, loop_s = plain_loop_rate(root, args.epochs, args.batch_size, args.image_size)
    print(f"plain loop : {loop_rate:6.1f} images/s per epoch after the first; {loop_s:.0f} s end to end")
    from cxr.runtime import TORCH_WORKER_MALLOC_ENV

    out = subprocess.run(
        [
            sys.executable,
            os.path.abspath(__file__),
            "--plain-only",
            root,
            "--epochs",
            str(args.epochs),
            "--batch-size",
            str(args.batch_size),
            "--image-size",
            str(args.image_size),
        ],
        env={**os.environ, **TORCH_WORKER_MALLOC_ENV},
        check=True,
        capture_output=True,
        text=True,
    )
    tuned_rate, tuned_s = json.loads(out.stdout.strip().splitlines()[-1])
    print(
        f"plain loop, the job's malloc settings: {tuned_rate:6.1f} images/s per epoch after the first; {tuned_s:.0f} "
        "s end to end"
    )

    ray.init(logging_level="ERROR", include_dashboard=False)
    from ray.data import DataContext

    DataContext.get_current().enable_progress_bars = False
    start = time.perf_counter()
    # val_fraction: the train job holds out validation images; train on as many as the loop does.
    cfg = TrainConfig(
        data=root,
        output=os.path.join(tmp, "run"),
        epochs=args.epochs,
        batch_size=args.batch_size,
        image_size=args.image_size,
        oversample=1,
        val_fraction=0.1,
    )
    train(cfg)
    job_s = time.perf_counter() - start
    rows = list(csv.DictReader(open(os.path.join(tmp, "run", "metrics.csv"))))
    rates = [float(r["train_images_per_s"]) for r in rows]
    job_rate = sum(rates[1:]) / max(1, len(rates) - 1) if len(rates) > 1 else rates[0]
    print(
        f"train job  : {job_rate:6.1f} images/s per epoch after the first; {job_s:.0f} s end to end (incl. validation "
        "each epoch)"
    )
    print(f"ratio train job / plain loop (images/s): {job_rate / loop_rate:.2f}")
    print(f"ratio train job / plain loop with the job's malloc settings (images/s): {job_rate / tuned_rate:.2f}")
    ray.shutdown()


if __name__ == "__main__":
    main()
