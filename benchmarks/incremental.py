"""Nightly incremental scoring, today's Parquet format vs the Iceberg table, over the same archive.

    .venv/bin/python benchmarks/incremental.py [--images N] [--size PX] [--model default] [--keep DIR] [--nights 365]

Generates N (5,000) small synthetic X-ray-like PNGs in a temporary folder, then, for each format (the
``_committed.json`` Parquet table of ``cxr.incremental.run_incremental`` and the Iceberg table of
``cxr.table.run_nightly``, SQLite catalog), times into a fresh table: the full run; a re-run with nothing new
(only lists, compares and commits an empty run); a night where 1% of the images changed; and a read of the
current table (the project's ``read_table`` for Parquet; PyIceberg and Polars for Iceberg, no project code).
Then an Iceberg table after ``--nights`` simulated nights (each appends 1/nights of the rows as one snapshot,
as a nightly run does, no scoring), read before and after ``cxr.table.maintain``. Ray's start-up is not timed.
Prints every time and the Iceberg / Parquet ratios.
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


def touch_one_percent(images: str, n: int, size: int) -> int:
    """Rewrites every 100th image with new content (size and mtime change); returns how many."""
    import io

    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(1)
    changed = 0
    for i in range(0, n, 100):
        path = os.path.join(images, f"{i // 1000:03d}", f"{i:05d}.png")
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (size + 1, size + 1), dtype=np.uint8)).save(buf, "PNG")
        with open(path, "wb") as f:
            f.write(buf.getvalue())
        changed += 1
    return changed


def timed(fn):
    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t


def simulate_nights(tmp: str, rows: int, nights: int) -> dict:
    """An Iceberg table after ``nights`` appends (one snapshot each): read time and files, before/after maintain."""
    import pyarrow as pa

    from cxr.table import CatalogConfig, iceberg_schema, maintain, open_table

    catalog = CatalogConfig(warehouse=os.path.join(tmp, "nights"))
    tbl = open_table("bench.nights", catalog)
    schema = iceberg_schema()
    per_night = max(1, rows // nights)
    for night in range(nights):
        cols = {f.name: pa.nulls(per_night, f.type) for f in schema}
        cols["path"] = pa.array([f"s3://archive/{night:04d}/{i:05d}.png" for i in range(per_night)])
        cols["model"] = pa.array(["bench@1"] * per_night)
        cols["prob_covid"] = pa.array([0.5] * per_night, pa.float32())
        tbl.append(pa.table(cols, schema=schema), snapshot_properties={"cxr.run-id": f"night-{night}"})
    out = {}
    read, out["read_before_s"] = timed(lambda: open_table("bench.nights", catalog).scan().to_arrow())
    out["files_before"] = len(list(open_table("bench.nights", catalog).scan().plan_files()))
    maintained = timed(lambda: maintain("bench.nights", catalog, older_than_days=0, retain_last=7))
    out["report"], out["maintain_s"] = maintained
    again, out["read_after_s"] = timed(lambda: open_table("bench.nights", catalog).scan().to_arrow())
    out["files_after"] = len(list(open_table("bench.nights", catalog).scan().plan_files()))
    assert read.num_rows == again.num_rows == per_night * nights
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=5000)
    p.add_argument("--size", type=int, default=128, help="side of the generated PNGs in pixels")
    p.add_argument("--model", default="default")
    p.add_argument("--keep", help="generate into (or reuse) this folder instead of a temporary one")
    p.add_argument("--nights", type=int, default=365, help="simulated nights for the maintenance measurement")
    args = p.parse_args()

    import logging

    from cxr import cli
    from cxr.incremental import read_table, run_incremental
    from cxr.runtime import ensure_ray
    from cxr.table import CatalogConfig, open_table, run_nightly

    cli.setup_logging()
    logging.getLogger("cxr").setLevel(logging.WARNING)
    times: dict[str, dict[str, float]] = {"parquet": {}, "iceberg": {}}
    with tempfile.TemporaryDirectory(prefix="cxr-bench-") as tmp:
        images = args.keep or os.path.join(tmp, "images")
        if not os.path.isdir(images) or not os.listdir(images):
            t = time.perf_counter()
            make_images(images, args.images, args.size)
            took = time.perf_counter() - t
            print(f"generated {args.images} PNGs of {args.size}x{args.size} px in {took:.1f}s", flush=True)
        ensure_ray()
        catalog = CatalogConfig(warehouse=os.path.join(tmp, "warehouse"))
        runs = {
            "parquet": lambda: run_incremental([images], os.path.join(tmp, "table"), args.model),
            "iceberg": lambda: run_nightly([images], "bench.scores", args.model, catalog=catalog),
        }
        for fmt, run in runs.items():  # full run and re-run of both formats first, on the same untouched images
            full, times[fmt]["full"] = timed(run)
            print(fmt, full.line(), flush=True)
            again, times[fmt]["rerun"] = timed(run)
            print(fmt, again.line(), flush=True)
            assert full.scored == full.inputs and again.scored == 0 and again.skipped == full.inputs
        changed = touch_one_percent(images, args.images, args.size)
        for fmt, run in runs.items():
            night, times[fmt]["one_percent"] = timed(run)
            print(fmt, night.line(), flush=True)
            assert night.changed == changed and night.scored == changed
        current, times["parquet"]["read"] = timed(lambda: read_table(os.path.join(tmp, "table")))
        tbl = open_table("bench.scores", catalog, create=False)
        ice, times["iceberg"]["read"] = timed(lambda: tbl.scan().to_arrow())
        import polars as pl

        frame, times["iceberg"]["read_polars"] = timed(lambda: pl.scan_iceberg(tbl).collect())
        assert current.num_rows == ice.num_rows == frame.height == args.images
        nights = simulate_nights(tmp, args.images, args.nights)
    print(f"\n{args.images} images of {args.size} px; times in s      parquet   iceberg   iceberg/parquet")
    for what in ("full", "rerun", "one_percent", "read"):
        a, b = times["parquet"][what], times["iceberg"][what]
        print(f"{what:<40}{a:9.2f} {b:9.2f} {b / a:9.3f}")
    print(f"{'read by Polars (iceberg)':<40}{'':9} {times['iceberg']['read_polars']:9.2f}")
    for fmt in times:
        print(f"{fmt}: re-run / full {times[fmt]['rerun'] / times[fmt]['full']:.4f}")
    print(
        f"{args.nights} simulated nights: {nights['files_before']} data files, read {nights['read_before_s']:.2f} s; "
        f"after maintain ({nights['maintain_s']:.1f} s): {nights['files_after']} files, "
        f"read {nights['read_after_s']:.2f} s "
        f"(ratio {nights['read_after_s'] / nights['read_before_s']:.3f})"
    )
    print(nights["report"].line())


if __name__ == "__main__":
    main()
