"""Nightly incremental scoring: a full run vs a re-run where nothing changed, over the same archive.

    .venv/bin/python benchmarks/incremental.py [--images N] [--size PX] [--model default] [--keep DIR]

Generates N (5,000) small synthetic X-ray-like PNGs in a temporary folder, then times
``cxr.incremental.run_incremental`` twice into a fresh table: the first run scores everything, the second
finds every image already scored (same URI, size and modification time) and only lists, compares and
commits an empty run. Ray's start-up (``ray.init``) is not timed, as a user's cluster is already up.
Prints both times and their ratio (target: a small fraction).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "lib"))


def make_images(root: str, n: int, size: int) -> None:
    import io

    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:size, 0:size]
    base = 80 + 60 * np.sin(x / size * np.pi)
    for i in range(n):
        img = base + rng.normal(0, 8, (size, size))
        if i % 3 == 0:
            img = img + 120 * (((y - size * 0.45) ** 2 + (x - size * 0.4) ** 2) < (size * 0.18) ** 2)
        buf = io.BytesIO()
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(buf, "PNG")
        folder = os.path.join(root, f"{i // 1000:03d}")
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, f"{i:05d}.png"), "wb") as f:
            f.write(buf.getvalue())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=5000)
    p.add_argument("--size", type=int, default=128, help="side of the generated PNGs in pixels")
    p.add_argument("--model", default="default")
    p.add_argument("--keep", help="generate into (or reuse) this folder instead of a temporary one")
    args = p.parse_args()

    import logging

    from cxr import cli
    from cxr.incremental import run_incremental
    from cxr.runtime import ensure_ray

    cli.setup_logging()
    logging.getLogger("cxr").setLevel(logging.WARNING)
    with tempfile.TemporaryDirectory(prefix="cxr-bench-") as tmp:
        images = args.keep or os.path.join(tmp, "images")
        if not os.path.isdir(images) or not os.listdir(images):
            t = time.perf_counter()
            make_images(images, args.images, args.size)
            print(
                f"generated {args.images} PNGs of {args.size}x{args.size} px in {time.perf_counter() - t:.1f}s",
                flush=True,
            )
        table = os.path.join(tmp, "table")
        ensure_ray()
        t = time.perf_counter()
        full = run_incremental([images], table, args.model)
        full_s = time.perf_counter() - t
        print(full.line(), flush=True)
        t = time.perf_counter()
        again = run_incremental([images], table, args.model)
        again_s = time.perf_counter() - t
        print(again.line(), flush=True)
        assert full.scored == full.inputs and again.scored == 0 and again.skipped == full.inputs
    print(
        f"full run:               {full_s:8.1f} s  ({full.scored} images scored, {full.scored / full_s:.1f} images/s)"
    )
    print(f"re-run, nothing changed:{again_s:8.1f} s  ({again.skipped} images skipped)")
    print(f"ratio re-run / full: {again_s / full_s:.4f}")


if __name__ == "__main__":
    main()
