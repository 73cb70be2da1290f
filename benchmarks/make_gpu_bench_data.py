"""Build the compact image file that benchmarks/gpu.py carries to a GPU node.

    .venv/bin/python benchmarks/make_gpu_bench_data.py [--data ../shared/data/covid-xray-5k] [--covid 6] [--non 18]

Real chest X-rays from the COVID-Xray-5k training split, re-encoded as 1024x1024 grayscale JPEG
(quality 90; the size of a typical archive image): one Parquet file, ``benchmarks/data/xrays.parquet``
(gitignored; never commit it: the images' licences forbid redistribution). Columns: ``name``, ``label``
(``covid``/``non``), ``jpeg`` (bytes). PNG is not stored (it is 2-3x larger and the working tree that
travels to the GPU node is capped at 64 MiB, Ray's bundle included): benchmarks/gpu.py re-encodes the
decoded JPEG pixels as PNG on the node, and repeats the images to make an archive of thousands of files
(decoding speed depends on image size and content, not on how many distinct images there are).
Refuses to write more than ``--max-mib``, and warns when the tracked tree + ``.device`` + this file come
near the 64 MiB that a device run can carry (Ray's bundle alone is ~48 MiB, the tree ~10 MiB).
"""

from __future__ import annotations

import argparse
import io
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "lib"))

SIDE = 1024


def reencode(path: str, quality: int) -> bytes:
    from PIL import Image, ImageOps

    with Image.open(path) as im:
        im = ImageOps.exif_transpose(im).convert("L").resize((SIDE, SIDE), Image.Resampling.BILINEAR)
        buf = io.BytesIO()
        im.save(buf, "JPEG", quality=quality)
        return buf.getvalue()


def main() -> int:
    here = os.path.dirname(os.path.abspath(__file__))
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=os.path.join(here, "..", "..", "shared", "data", "covid-xray-5k"))
    p.add_argument("--output", default=os.path.join(here, "data", "xrays.parquet"))
    p.add_argument("--covid", type=int, default=6, help="COVID-19 images to take (the first N by path)")
    p.add_argument("--non", type=int, default=18, help="non-COVID images to take (spread evenly over the split)")
    p.add_argument("--quality", type=int, default=90)
    p.add_argument("--max-mib", type=float, default=4.0, help="fail rather than write a larger file")
    args = p.parse_args()

    import pyarrow as pa
    import pyarrow.parquet as pq

    from cxr.data import labelled_files

    files = labelled_files(os.path.abspath(args.data), "train")
    covid = [f for f in files if f.label == 1][: args.covid]
    non_all = [f for f in files if f.label == 0]
    step = max(1, len(non_all) // max(1, args.non))
    non = non_all[::step][: args.non]
    chosen = covid + non
    if len(covid) < 2 or len(non) < 2:
        print(
            f"error: need at least 2 images of each class in {args.data}, found {len(covid)} covid, {len(non)} non",
            file=sys.stderr,
        )
        return 2
    names, labels, blobs = [], [], []
    for i, f in enumerate(chosen, 1):
        blobs.append(reencode(f.path, args.quality))
        names.append(os.path.basename(f.path))
        labels.append("covid" if f.label == 1 else "non")
        if i % 40 == 0 or i == len(chosen):
            print(f"  {i}/{len(chosen)} images, {sum(map(len, blobs)) / 2**20:.1f} MiB", flush=True)
    size = sum(map(len, blobs)) / 2**20
    if size > args.max_mib:
        print(f"error: {size:.1f} MiB of JPEG exceeds --max-mib {args.max_mib}; take fewer images", file=sys.stderr)
        return 1
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    table = pa.table({"name": names, "label": labels, "jpeg": pa.array(blobs, pa.binary())})
    pq.write_table(table, args.output, compression="none")  # JPEG does not compress further
    print(
        f"wrote {args.output}: {len(chosen)} images ({len(covid)} covid, {len(non)} non), "
        f"{os.path.getsize(args.output) / 2**20:.1f} MiB"
    )
    travel = _travel_mib(os.path.join(here, ".."))
    if travel is not None:
        print(f"a device run would carry about {travel:.1f} MiB (tracked files + .device + benchmarks/data; limit 64)")
        if travel > 62:
            print("warning: too close to the 64 MiB limit; take fewer images", file=sys.stderr)
    return 0


def _travel_mib(top: str) -> float | None:
    import subprocess

    try:
        tracked = subprocess.run(["git", "-C", top, "ls-files", "-z"], capture_output=True, check=True).stdout.split(
            b"\0"
        )
    except (OSError, subprocess.CalledProcessError):
        return None
    total = sum(
        os.path.getsize(os.path.join(top, f.decode()))
        for f in tracked
        if f and os.path.isfile(os.path.join(top, f.decode()))
    )
    for extra in (".device", os.path.join("benchmarks", "data")):
        for d, _, names in os.walk(os.path.join(top, extra)):
            total += sum(os.path.getsize(os.path.join(d, n)) for n in names)
    return total / 2**20


if __name__ == "__main__":
    sys.exit(main())
