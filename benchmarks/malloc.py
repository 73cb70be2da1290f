"""The torch workers' malloc settings (cxr.runtime.TORCH_WORKER_MALLOC_ENV) against glibc's defaults, in one run.

    .venv/bin/python benchmarks/malloc.py [--steps 8] [--image-size 224] [--batch-size 32]

mobilenet_v2 (random weights, random input, all cores): training steps (forward, backward, AdamW) and
inference batches, each in a fresh process, in the main thread and in a second thread (where Ray Train runs
the training function), with glibc's defaults and with the settings. Prints images/s, page faults per step
and peak memory, and each figure's ratio to the default in the same thread.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "lib"))


def measure(mode: str, thread: bool, steps: int, image_size: int, batch_size: int) -> dict:
    import resource
    import threading
    import time

    import torch
    import torchvision

    out: dict = {}

    def work() -> None:
        torch.set_num_threads(os.cpu_count() or 1)
        model = torchvision.models.mobilenet_v2(num_classes=2)
        x = torch.randn(batch_size, 3, image_size, image_size)
        y = torch.randint(0, 2, (batch_size,))
        optimizer = torch.optim.AdamW(model.parameters(), 3e-4)
        if mode == "eval":
            model.eval()
        for i in range(steps + 2):  # two warm-up steps
            if i == 2:
                start, faults = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            if mode == "eval":
                with torch.inference_mode():
                    model(x)
            else:
                loss = torch.nn.functional.cross_entropy(model(x), y)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
        out["images_per_s"] = batch_size * steps / (time.perf_counter() - start)
        out["faults_per_step"] = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults) / steps
        out["peak_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    if thread:
        t = threading.Thread(target=work)
        t.start()
        t.join()
    else:
        work()
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--one", nargs=2, metavar=("MODE", "WHERE"), help=argparse.SUPPRESS)  # internal: one measurement
    args = p.parse_args()
    if args.one:
        print(json.dumps(measure(args.one[0], args.one[1] == "thread", args.steps, args.image_size, args.batch_size)))
        return

    from cxr.runtime import TORCH_WORKER_MALLOC_ENV

    default_env = {k: v for k, v in os.environ.items() if k not in TORCH_WORKER_MALLOC_ENV and k != "GLIBC_TUNABLES"}
    print(
        f"mobilenet_v2 at {args.image_size} px, batch {args.batch_size}, {args.steps} steps, {os.cpu_count()} CPUs; "
        f"settings: {' '.join(f'{k}={v}' for k, v in TORCH_WORKER_MALLOC_ENV.items())}"
    )
    print(f"{'':24} {'images/s':>9} {'faults/step':>12} {'peak MiB':>9} {'ratio':>6}")
    for mode in ("train", "eval"):
        for where in ("main", "thread"):
            base = None
            for label, env in (("default", default_env), ("settings", {**default_env, **TORCH_WORKER_MALLOC_ENV})):
                run = subprocess.run(
                    [
                        sys.executable,
                        os.path.abspath(__file__),
                        "--one",
                        mode,
                        where,
                        "--steps",
                        str(args.steps),
                        "--image-size",
                        str(args.image_size),
                        "--batch-size",
                        str(args.batch_size),
                    ],
                    env=env,
                    check=True,
                    capture_output=True,
                    text=True,
                )
                r = json.loads(run.stdout.strip().splitlines()[-1])
                base = base or r["images_per_s"]
                print(
                    f"{mode:5} {where:6} {label:11} {r['images_per_s']:9.1f} {r['faults_per_step']:12.0f} "
                    f"{r['peak_mib']:9.0f} "
                    f"{r['images_per_s'] / base:6.2f}"
                )


if __name__ == "__main__":
    main()
