"""Score job vs a plain single-process PyTorch loop over the same real images, in one run.

    .venv/bin/python benchmarks/score.py [--data ../shared/data/covid-xray-5k/train] [--model DIR] [--limit N]

Both sides use the same model (mobilenet_v2 at 224 px unless --model says otherwise), the same batch
size and all of this machine's cores. Timed: from "start scoring" to "results written", model
loading included on both sides; Ray's own start-up (``ray.init``) is not, as a user's cluster is
already up. Prints images/s of both and their ratio (target on a 2-core machine: >= 1.0).

The score job's actors start with the malloc settings of ``cxr.runtime.TORCH_WORKER_MALLOC_ENV``; the loop
with the job's model optimisations runs once more, in a subprocess with those settings too, so the job is
also compared with a loop given every advantage it has.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "lib"))


def plain_loop(paths: list[str], model_uri: str, batch_size: int, optimized: bool = False) -> float:
    """The baseline: PIL decode -> resize -> normalise -> model, serially, in batches.

    ``optimized``: the same loop with the score job's inference optimisations (fused batch norms,
    channels-last), to separate what pipelining gives from what the optimisations give."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    import torch
    from PIL import Image

    from cxr.checkpoint import load_checkpoint

    torch.set_num_threads(os.cpu_count() or 1)
    start = time.perf_counter()
    loaded = load_checkpoint(model_uri, optimize=optimized)
    spec = loaded.info.preprocess
    mean = torch.tensor(spec.mean).view(1, -1, 1, 1)
    std = torch.tensor(spec.std).view(1, -1, 1, 1)
    model = loaded.model
    probs: list[float] = []
    for i in range(0, len(paths), batch_size):
        arrays = []
        for p in paths[i : i + batch_size]:
            with Image.open(p) as im:
                im = im.convert("L").resize((spec.input_size, spec.input_size), Image.Resampling.BILINEAR)
                arrays.append(np.asarray(im, dtype=np.float32) / 255.0)
        x = (torch.from_numpy(np.stack(arrays)).unsqueeze(1).expand(-1, 3, -1, -1) - mean) / std
        if optimized:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.inference_mode():
            probs += torch.softmax(model(x), 1)[:, 1].tolist()
    with tempfile.TemporaryDirectory() as d:
        pq.write_table(
            pa.table({"path": paths, "prob_covid": pa.array(probs, pa.float32())}), os.path.join(d, "out.parquet")
        )
    return time.perf_counter() - start


def main() -> None:
    here = os.path.dirname(os.path.abspath(__file__))
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=os.path.join(here, "..", "..", "shared", "data", "covid-xray-5k", "train"))
    p.add_argument(
        "--model", help="checkpoint (default: a fresh mobilenet_v2 at 224 px; speed does not depend on weights)"
    )
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--limit", type=int, help="use only the first N images")
    p.add_argument("--loop-only", nargs=2, metavar=("PATHS_FILE", "MODEL"), help=argparse.SUPPRESS)  # internal
    args = p.parse_args()
    if args.loop_only:
        paths_file, model = args.loop_only
        print(json.dumps(plain_loop(open(paths_file).read().split("\n"), model, args.batch_size, optimized=True)))
        return
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

    import ray

    from cxr.checkpoint import ModelInfo, save_checkpoint
    from cxr.models import create_model
    from cxr.score import score
    from cxr.sources import list_images

    paths = list_images(os.path.abspath(args.data))[: args.limit]
    tmp = tempfile.mkdtemp(prefix="cxr-bench-")
    model_uri = args.model
    if model_uri is None:
        model_uri = os.path.join(tmp, "model")
        save_checkpoint(create_model("mobilenet_v2"), ModelInfo("mobilenet_v2"), model_uri)
    print(f"{len(paths)} images from {args.data}; model {model_uri}; batch {args.batch_size}; {os.cpu_count()} CPUs")

    loop_s = plain_loop(paths, model_uri, args.batch_size)
    print(f"plain loop            : {len(paths) / loop_s:7.1f} images/s ({loop_s:.1f} s)")
    opt_s = plain_loop(paths, model_uri, args.batch_size, optimized=True)
    print(f"loop, same model opts : {len(paths) / opt_s:7.1f} images/s ({opt_s:.1f} s)")
    from cxr.runtime import TORCH_WORKER_MALLOC_ENV

    paths_file = os.path.join(tmp, "paths.txt")
    with open(paths_file, "w") as f:
        f.write("\n".join(paths))
    out = subprocess.run(
        [
            sys.executable,
            os.path.abspath(__file__),
            "--loop-only",
            paths_file,
            model_uri,
            "--batch-size",
            str(args.batch_size),
        ],
        env={**os.environ, **TORCH_WORKER_MALLOC_ENV},
        check=True,
        capture_output=True,
        text=True,
    )
    all_s = json.loads(out.stdout.strip().splitlines()[-1])
    print(f"loop, same opts+malloc: {len(paths) / all_s:7.1f} images/s ({all_s:.1f} s)")

    ray.init(logging_level="ERROR", include_dashboard=False)
    from ray.data import DataContext

    DataContext.get_current().enable_progress_bars = False
    manifest = os.path.join(tmp, "inputs.csv")
    with open(manifest, "w") as f:
        f.write("path\n" + "\n".join(paths) + "\n")
    summary = score(
        [manifest] if args.limit else [os.path.abspath(args.data)],
        os.path.join(tmp, "scores"),
        model_uri,
        batch_size=args.batch_size,
    )
    assert summary.files == len(paths), summary
    print(
        f"score job             : {summary.images_per_s:7.1f} images/s ({summary.seconds:.1f} s, {summary.errors} "
        "errors)"
    )
    print(f"ratio score job / plain loop           : {summary.images_per_s / (len(paths) / loop_s):.2f}")
    print(f"ratio score job / loop with same opts  : {summary.images_per_s / (len(paths) / opt_s):.2f}")
    print(f"ratio score job / loop, opts + malloc  : {summary.images_per_s / (len(paths) / all_s):.2f}")
    ray.shutdown()


if __name__ == "__main__":
    main()
