"""The score job with its plan sized by the inputs' measured costs, against the fixed plan, in one run.

    .venv/bin/python benchmarks/score_plan.py [--dicom-files 160] [--images ../shared/data/covid-xray-5k/train]
                                             [--limit N] [--model default] [--repeat 1]

Two archives: ``--dicom-files`` generated full-size chest films (3000x2500, 12 bits, the radiograph of
``benchmarks/decode.py``) stored as JPEG Lossless, the usual PACS export (one file GDCM encodes, written
N times); and the real PNG/JPEG X-rays under ``--images``. Each archive is scored by the score job
(``cxr.score.score`` on a local Ray instance with all of this machine's cores) with the fixed plan
(``measure=False``: one predictor actor per node holding all but half a CPU, as until 2026-11-27) and with
the plan sized by the measured decode share (the default), ``--repeat`` times each, alternating which goes
first; the best run of each counts. Timed: the
whole ``score()`` call (listing, sampling the costs, scoring, writing), Ray's start-up not. Prints one
JSON object: images/s of both, their ratio (measured / fixed) per archive, and both plans.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path[:0] = [os.path.join(ROOT, "lib"), os.path.join(ROOT, "tests"), os.path.dirname(os.path.abspath(__file__))]


def dicom_archive(folder: str, n: int) -> str:
    from decode import radiograph
    from support.images import compress_dicom, dicom_bytes  # the tests' DICOM writer and GDCM encoder

    data = compress_dicom(dicom_bytes(radiograph(3000, 2500)), "1.2.840.10008.1.2.4.70")
    os.makedirs(folder)
    for i in range(n):
        with open(os.path.join(folder, f"{i:05d}.dcm"), "wb") as f:
            f.write(data)
    return folder


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dicom-files", type=int, default=160, help="0: no DICOM archive")
    ap.add_argument("--images", default=os.path.join(ROOT, "..", "shared", "data", "covid-xray-5k", "train"))
    ap.add_argument("--limit", type=int, help="score only the first N of --images")
    ap.add_argument("--model", default="default")
    ap.add_argument("--repeat", type=int, default=1)
    args = ap.parse_args()
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

    import ray
    from ray.data import DataContext

    from cxr.score import score
    from cxr.sources import list_images

    tmp = tempfile.mkdtemp(prefix="cxr-plan-bench-")
    archives = {}
    if args.dicom_files:
        archives["JPEG Lossless DICOM, 3000x2500"] = [dicom_archive(os.path.join(tmp, "dicom"), args.dicom_files)]
    images = list_images(os.path.abspath(args.images))[: args.limit]
    manifest = os.path.join(tmp, "images.csv")
    with open(manifest, "w") as f:
        f.write("path\n" + "\n".join(images) + "\n")
    archives[f"PNG/JPEG X-rays ({os.path.basename(os.path.abspath(args.images))})"] = [manifest]

    ray.init(logging_level="ERROR", include_dashboard=False)
    DataContext.get_current().enable_progress_bars = False
    rows = []
    try:
        for name, inputs in archives.items():
            runs: dict[str, list[float]] = {"fixed": [], "measured": []}
            plans = {}
            for _ in range(args.repeat):
                for mode in (
                    ("fixed", "measured") if len(runs["fixed"]) % 2 == 0 else ("measured", "fixed")
                ):  # alternate who goes first
                    out = os.path.join(tmp, "out")
                    start = time.perf_counter()
                    summary = score(inputs, out, args.model, measure=mode == "measured", overwrite=True)
                    seconds = time.perf_counter() - start
                    assert summary.errors == 0, summary
                    runs[mode].append(summary.files / seconds)
                    plans[mode] = summary.plan
                    shutil.rmtree(out)
            best = {mode: max(v) for mode, v in runs.items()}
            rows.append(
                {
                    "archive": name,
                    "files": summary.files,
                    "images_per_s": {m: round(v, 2) for m, v in best.items()},
                    "ratio_measured_vs_fixed": round(best["measured"] / best["fixed"], 2),
                    "plans": plans,
                }
            )
    finally:
        ray.shutdown()
        shutil.rmtree(tmp, ignore_errors=True)
    print(json.dumps({"cpus": os.cpu_count(), "model": args.model, "repeat": args.repeat, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
