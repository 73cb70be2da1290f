"""GPU benchmark: model ceiling, CPU decode, score job (JPEG and PNG) and train job vs a plain AMP loop, one run.

    source .device/activate && python benchmarks/gpu.py --out $OUT/gpu.json            # on the GPU node
    .venv/bin/python benchmarks/gpu.py --device cpu --quick                            # smoke run here (no figures)

Reads real chest X-rays from ``--data`` (benchmarks/make_gpu_bench_data.py builds it: 1024x1024 grayscale
JPEG bytes) and writes, on the node's local disk, an archive of ``--files`` JPEG files and as many PNG
files (the same pixels re-encoded losslessly), repeating the images. Then, in order:

1. CPU decode: decode + preprocess (the score job's own functions) in one process per core, per format:
   the most the CPU side can feed; device JPEG decode + preprocess (``cxr.device_decode``, nvJPEG, batched):
   the issue's JPEG reference; and checks on the device: device decode vs CPU decode, and the shipped
   model's probabilities (mixed precision on the device) vs float32 on the CPU.
2. Per backbone (``--backbones``): model-only images/s (random weights; bf16 autocast, channels-last,
   batch ``--batch-size`` on a device-resident batch: the ceiling), the same through
   ``LoadedModel.predict_proba`` from host memory (adds the pinned host->device copy), and the score job
   (``cxr.score.score``, Ray Data, end to end incl. actor start-up) on the JPEG archive (JPEGs decoded by
   the predictor on the GPU, its default there) and on the PNG archive (CPU decode tasks), with its ratio
   to min(ceiling, CPU decode); for ``--cpu-jpeg-backbones`` also the JPEG archive decoded on the CPU.
3. Per ``--train-backbones``: a plain single-process mixed-precision PyTorch loop (the same preprocessed
   images in memory, the same augmentation, bf16 autocast, channels-last) against the train job
   (``cxr.train.train``, Ray Train, one GPU worker); images/s per epoch after the first, and their ratio.

Weights are random (speed does not depend on them; the GPU node has no network for ImageNet weights).
Prints a table and writes every figure to ``--out`` (JSON).
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from datetime import UTC, datetime

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "lib"))

ALL_BACKBONES = ["mobilenet_v2", "mobilenet_v3_large", "resnet50", "efficientnet_b0", "densenet121"]


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# --------------------------------------------------------------------------- archive on local disk


def _png_from_jpeg(jpeg: bytes) -> bytes:
    from PIL import Image

    with Image.open(io.BytesIO(jpeg)) as im:
        buf = io.BytesIO()
        im.convert("L").save(buf, "PNG")  # Pillow's default zlib level (6), as most archives are written
        return buf.getvalue()


def build_archive(data: str, root: str, files: int, train_images: int, workers: int) -> dict:
    """root/{jpeg,png}/ with ``files`` images each, root/train/train/{covid,non}/ with ``train_images`` JPEGs."""
    import pyarrow.parquet as pq

    table = pq.read_table(data).to_pydict()
    jpegs, labels, names = table["jpeg"], table["label"], table["name"]
    if not jpegs:
        raise SystemExit(f"error: {data} holds no images")
    with ProcessPoolExecutor(workers) as pool:
        pngs = list(pool.map(_png_from_jpeg, jpegs, chunksize=4))
    for kind, blobs in (("jpeg", jpegs), ("png", pngs)):
        d = os.path.join(root, kind)
        os.makedirs(d, exist_ok=True)
        for i in range(files):
            with open(os.path.join(d, f"{i:06d}.{'jpg' if kind == 'jpeg' else 'png'}"), "wb") as f:
                f.write(blobs[i % len(blobs)])
    for i in range(train_images):
        j = i % len(jpegs)
        d = os.path.join(root, "train", "train", labels[j])
        os.makedirs(d, exist_ok=True)
        with open(os.path.join(d, f"r{i // len(jpegs):03d}_{os.path.splitext(names[j])[0]}.jpg"), "wb") as f:
            f.write(jpegs[j])
    return {
        "source_images": len(jpegs),
        "jpeg_mib": sum(map(len, jpegs)) / len(jpegs) / 2**20 * files,
        "png_mib": sum(map(len, pngs)) / len(pngs) / 2**20 * files,
    }


# --------------------------------------------------------------------------- CPU decode figure


def _decode_chunk(args: tuple[list[str], int]) -> int:
    from cxr.decode import decode
    from cxr.preprocess import PreprocessSpec, preprocess

    paths, size = args
    spec = PreprocessSpec(input_size=size)
    for p in paths:
        with open(p, "rb") as f:
            preprocess(decode(f.read(), p).image, spec)
    return len(paths)


def cpu_decode_rate(folder: str, workers: int, size: int) -> float:
    paths = sorted(os.path.join(folder, n) for n in os.listdir(folder))
    chunks = [(paths[i : i + 16], size) for i in range(0, len(paths), 16)]
    with ProcessPoolExecutor(workers) as pool:
        list(pool.map(_decode_chunk, chunks[:workers]))  # warm the workers (imports)
        start = time.perf_counter()
        n = sum(pool.map(_decode_chunk, chunks))
    return n / (time.perf_counter() - start)


# --------------------------------------------------------------------------- device JPEG decode + checks


def device_decode_rate(data: str, device: str, batch: int, size: int, seconds: float) -> float:
    """images/s of cxr.device_decode (nvJPEG on CUDA) over the carried JPEGs, bytes in host memory."""
    import pyarrow.parquet as pq

    from cxr.device_decode import decode_preprocess_jpegs
    from cxr.preprocess import PreprocessSpec

    jpegs = pq.read_table(data, columns=["jpeg"]).column("jpeg").to_pylist()
    chunk = [jpegs[i % len(jpegs)] for i in range(batch)]
    spec = PreprocessSpec(input_size=size)
    decode_preprocess_jpegs(chunk, spec, device)
    _sync(device)
    n, start = 0, time.perf_counter()
    while n < 2 or time.perf_counter() - start < seconds:
        decode_preprocess_jpegs(chunk, spec, device)
        n += 1
    _sync(device)
    return n * batch / (time.perf_counter() - start)


def device_checks(data: str, device: str) -> dict:
    """On the device: cxr.device_decode against the CPU decode + preprocess, and the shipped model's
    probabilities (mixed precision on the device) against float32 on the CPU, on the carried X-rays."""
    import numpy as np
    import pyarrow.parquet as pq

    from cxr.checkpoint import load_checkpoint
    from cxr.decode import decode
    from cxr.device_decode import decode_preprocess_jpegs
    from cxr.preprocess import preprocess

    jpegs = pq.read_table(data, columns=["jpeg"]).column("jpeg").to_pylist()
    cpu = load_checkpoint("default")
    on_device = load_checkpoint("default", device=device)
    spec = cpu.info.preprocess
    want = np.stack([preprocess(decode(j).image, spec) for j in jpegs])
    got, errors = decode_preprocess_jpegs(jpegs, spec, device)
    got = got.cpu().numpy()
    p_cpu, p_dev = cpu.predict_proba(want), on_device.predict_proba(want)
    p_dev_decoded = on_device.predict_proba(got)
    t = cpu.info.threshold
    return {
        "device_decode_errors": sum(e is not None for e in errors),
        "device_decode_max_abs_diff": float(np.abs(got - want).max()),
        "device_decode_mean_abs_diff": float(np.abs(got - want).mean()),
        "proba_max_abs_diff_device_vs_cpu_fp32": float(np.abs(p_dev - p_cpu).max()),
        "proba_max_abs_diff_device_decode_vs_cpu": float(np.abs(p_dev_decoded - p_cpu).max()),
        "decisions_differing": int(np.sum((p_dev >= t) != (p_cpu >= t))),
        "images": len(jpegs),
    }


# --------------------------------------------------------------------------- model ceiling


def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def model_rates(backbone: str, device: str, batch: int, size: int, seconds: float) -> tuple[float, float]:
    """(model-only images/s on a device-resident batch, images/s through LoadedModel.predict_proba from host)."""
    import numpy as np
    import torch

    from cxr.checkpoint import LoadedModel, ModelInfo
    from cxr.models import create_model
    from cxr.preprocess import PreprocessSpec

    torch.manual_seed(0)
    loaded = LoadedModel(create_model(backbone, "none"), ModelInfo(backbone, PreprocessSpec(input_size=size)), device)
    x = torch.randn(batch, 3, size, size, device=device).contiguous(memory_format=torch.channels_last)

    def timed(step) -> float:
        for _ in range(3):
            step()
        _sync(device)
        n, start = 0, time.perf_counter()
        while True:
            step()
            n += 1
            if n >= 2 and time.perf_counter() - start > seconds:
                _sync(device)
                el = time.perf_counter() - start
                if el > seconds:
                    return n * batch / el

    def model_only():
        with (
            torch.inference_mode(),
            torch.autocast(
                torch.device(device).type, dtype=loaded.amp_dtype or torch.float32, enabled=loaded.amp_dtype is not None
            ),
        ):
            loaded.model(x)

    host = np.random.default_rng(0).random((batch, size, size), dtype=np.float32)
    ceiling = timed(model_only)
    through = timed(lambda: loaded.predict_proba(host))
    loaded = x = None  # drop the model and the batch before emptying the CUDA cache
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    return ceiling, through


# --------------------------------------------------------------------------- score job


def score_rate(
    folder: str, backbone: str, size: int, work: str, batch: int | None, device_jpeg: bool | None = None
) -> tuple[float, float, int]:
    from cxr.checkpoint import ModelInfo, save_checkpoint
    from cxr.models import create_model
    from cxr.preprocess import PreprocessSpec
    from cxr.score import score

    model_uri = os.path.join(work, f"model-{backbone}")
    if not os.path.exists(model_uri):
        save_checkpoint(create_model(backbone, "none"), ModelInfo(backbone, PreprocessSpec(input_size=size)), model_uri)
    out = os.path.join(work, f"scores-{backbone}-{os.path.basename(folder)}")
    summary = score([folder], out, model_uri, batch_size=batch, overwrite=True, device_jpeg=device_jpeg)
    shutil.rmtree(out, ignore_errors=True)
    return summary.images_per_s, summary.seconds, summary.errors


# --------------------------------------------------------------------------- training


def plain_train_loop(root: str, backbone: str, device: str, epochs: int, batch: int, size: int) -> list[float]:
    """Decode + preprocess once into memory, then a plain mixed-precision loop with the train job's augmentation."""
    import numpy as np
    import torch

    from cxr.augment import AugmentConfig, augment
    from cxr.data import labelled_files
    from cxr.models import create_model
    from cxr.preprocess import PreprocessSpec, to_model_input

    spec = PreprocessSpec(input_size=size)
    files = labelled_files(root, "train")
    with ProcessPoolExecutor(os.cpu_count() or 1) as pool:
        images = np.stack(list(pool.map(_load_preprocessed, [(f.path, size) for f in files], chunksize=8)))
    labels = np.array([f.label for f in files])
    cuda = device.startswith("cuda")
    amp = torch.bfloat16 if cuda and torch.cuda.is_bf16_supported() else torch.float16 if cuda else None
    torch.manual_seed(0)
    model = create_model(backbone, "none").to(device).to(memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-4)
    scaler = torch.amp.GradScaler(enabled=amp == torch.float16)
    rng = np.random.default_rng(0)
    rates = []
    for _ in range(epochs):
        model.train()
        start = time.perf_counter()
        for idx in np.array_split(rng.permutation(len(files)), max(1, len(files) // batch)):
            x = to_model_input(np.stack([augment(images[i], rng, AugmentConfig()) for i in idx]), spec)
            x = x.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
            y = torch.as_tensor(labels[idx], device=device)
            with torch.autocast(torch.device(device).type, dtype=amp or torch.float32, enabled=amp is not None):
                loss = torch.nn.functional.cross_entropy(model(x).float(), y)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        loss.item()  # waits for the GPU
        rates.append(len(files) / (time.perf_counter() - start))
    return rates


def _load_preprocessed(args: tuple[str, int]):
    from cxr.decode import decode
    from cxr.preprocess import PreprocessSpec, preprocess

    path, size = args
    with open(path, "rb") as f:
        return preprocess(decode(f.read(), path).image, PreprocessSpec(input_size=size))


def train_job_rates(root: str, backbone: str, gpu: bool, epochs: int, batch: int, size: int, work: str) -> list[float]:
    from cxr.train import TrainConfig, train

    out = os.path.join(work, f"train-{backbone}")
    shutil.rmtree(out, ignore_errors=True)
    # val_fraction 0.1: the job holds out validation images (patient-grouped); it trains on ~90% of what the loop does.
    cfg = TrainConfig(
        data=root,
        output=out,
        backbone=backbone,
        weights="none",
        epochs=epochs,
        batch_size=batch,
        image_size=size,
        oversample=1,
        val_fraction=0.1,
        gpu=gpu,
        workers=1,
    )
    train(cfg)
    with open(os.path.join(out, "metrics.csv")) as f:
        return [float(r["train_images_per_s"]) for r in csv.DictReader(f)]


def steady(rates: list[float]) -> float:
    return sum(rates[1:]) / (len(rates) - 1) if len(rates) > 1 else rates[0]


# --------------------------------------------------------------------------- main


def main() -> int:
    here = os.path.dirname(os.path.abspath(__file__))
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=os.path.join(here, "data", "xrays.parquet"))
    p.add_argument("--device", default="cuda", help="cuda (default) or cpu (a smoke run: its figures mean nothing)")
    p.add_argument("--backbones", default=",".join(ALL_BACKBONES), help="comma-separated (default: all five)")
    p.add_argument("--train-backbones", default="mobilenet_v2", help="comma-separated; '' skips training")
    p.add_argument("--files", type=int, default=4000, help="files per format in the scoring archive")
    p.add_argument("--train-images", type=int, default=2048)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=256, help="inference batch (model ceiling and score job)")
    p.add_argument("--train-batch-size", type=int, default=128)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--model-seconds", type=float, default=3.0, help="timing window per model-only figure")
    p.add_argument("--skip-score", action="store_true")
    p.add_argument(
        "--cpu-jpeg-backbones",
        default="mobilenet_v2",
        help="also score the JPEG archive with CPU decoding (device_jpeg=False) for these; '' for none",
    )
    p.add_argument("--quick", action="store_true", help="tiny sizes everywhere, to prove the script runs end to end")
    p.add_argument("--workdir", help="where the archive goes (default: a fresh temporary folder, removed at the end)")
    p.add_argument("--out", help="write every figure here as JSON")
    args = p.parse_args()
    if args.quick:
        args.files, args.train_images, args.epochs = 48, 48, 2
        args.batch_size, args.train_batch_size, args.image_size, args.model_seconds = 8, 8, 64, 0.2
    backbones = [b for b in args.backbones.split(",") if b]
    train_backbones = [b for b in args.train_backbones.split(",") if b]
    cpu_jpeg_backbones = [b for b in args.cpu_jpeg_backbones.split(",") if b]
    if unknown := [b for b in backbones + train_backbones if b not in ALL_BACKBONES]:
        p.error(f"unknown backbone(s) {unknown}; choose from {ALL_BACKBONES}")
    if not os.path.isfile(args.data):
        p.error(f"{args.data} not found: build it with benchmarks/make_gpu_bench_data.py and carry it along")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

    import torch

    device = args.device
    gpu = device.startswith("cuda")
    if gpu and not torch.cuda.is_available():
        print("error: --device cuda but torch sees no CUDA device (use --device cpu for a smoke run)", file=sys.stderr)
        return 2
    cpus = os.cpu_count() or 1
    results: dict = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name(0) if gpu else f"CPU ({platform.processor() or platform.machine()})",
        "cpus": cpus,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "args": vars(args),
        "bf16": bool(gpu and torch.cuda.is_bf16_supported()),
        "backbones": {},
        "train": {},
    }
    log(f"{results['device']}, {cpus} CPUs, torch {torch.__version__}; backbones {backbones}; train {train_backbones}")

    def save() -> None:  # after every phase: a run stopped at its time limit still leaves its figures so far
        if args.out:
            os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
            with open(args.out, "w") as f:
                json.dump(results, f, indent=2)

    work = args.workdir or tempfile.mkdtemp(prefix="cxr-gpu-bench-")
    started = time.perf_counter()
    try:
        results["archive"] = build_archive(args.data, work, args.files, args.train_images, cpus)
        log(
            f"archive: {args.files} JPEG ({results['archive']['jpeg_mib']:.0f} MiB) + {args.files} PNG "
            f"({results['archive']['png_mib']:.0f} MiB) from {results['archive']['source_images']} real X-rays, "
            f"{args.train_images} training images; {work}"
        )
        decode = {k: cpu_decode_rate(os.path.join(work, k), cpus, args.image_size) for k in ("jpeg", "png")}
        results["cpu_decode"] = decode
        log(f"CPU decode+preprocess, {cpus} processes: JPEG {decode['jpeg']:,.0f}/s, PNG {decode['png']:,.0f}/s")
        results["device_decode"] = device_decode_rate(
            args.data, device, args.batch_size, args.image_size, args.model_seconds
        )
        log(f"device JPEG decode+preprocess (cxr.device_decode, {device}): {results['device_decode']:,.0f}/s")
        results["checks"] = device_checks(args.data, device)
        log(f"checks on {device}: {results['checks']}")
        save()

        if (backbones and not args.skip_score) or train_backbones:
            import logging

            import ray
            import ray.data

            from cxr.runtime import code_runtime_env

            # The jobs' own ensure_ray() then finds Ray up; workers' logs stay out of the table.
            ray.init(logging_level=logging.WARNING, runtime_env=code_runtime_env(), log_to_driver=False)
            os.environ.setdefault(
                "RAY_ADDRESS", ray.get_runtime_context().gcs_address
            )  # Ray Train's helpers find this one
            ray.data.DataContext.get_current().enable_progress_bars = False
        for b in backbones:
            ceiling, through = model_rates(b, device, args.batch_size, args.image_size, args.model_seconds)
            row = {"model_only": ceiling, "predict_proba_from_host": through}
            log(f"{b}: model only {ceiling:,.0f}/s; predict_proba from host {through:,.0f}/s")
            if not args.skip_score:
                for kind in ("jpeg", "png"):
                    # JPEG: the device route (the default on GPU actors; forced so that a CPU smoke run takes it too)
                    rate, secs, errors = score_rate(
                        os.path.join(work, kind),
                        b,
                        args.image_size,
                        work,
                        args.batch_size if args.quick else None,
                        device_jpeg=kind == "jpeg" or None,
                    )
                    bound = min(ceiling, decode[kind])
                    row[f"score_{kind}"] = rate
                    row[f"score_{kind}_ratio_to_bound"] = rate / bound
                    row[f"score_{kind}_ratio_to_target_base"] = rate / (
                        results["device_decode"] if kind == "jpeg" else decode[kind]
                    )
                    log(
                        f"{b}: score job {kind.upper()} {rate:,.0f}/s ({secs:.1f} s, {errors} errors) = "
                        f"{rate / bound:.2f} of min(model {ceiling:,.0f}, CPU decode {decode[kind]:,.0f})"
                    )
                if b in cpu_jpeg_backbones:  # the same JPEG archive with the decode tasks decoding on the CPU
                    rate, secs, errors = score_rate(
                        os.path.join(work, "jpeg"),
                        b,
                        args.image_size,
                        work,
                        args.batch_size if args.quick else None,
                        device_jpeg=False,
                    )
                    row["score_jpeg_cpu_decode"] = rate
                    log(f"{b}: score job JPEG with CPU decoding {rate:,.0f}/s ({secs:.1f} s, {errors} errors)")
            results["backbones"][b] = row
            save()

        for b in train_backbones:
            root = os.path.join(work, "train")
            loop = plain_train_loop(root, b, device, args.epochs, args.train_batch_size, args.image_size)
            log(f"{b}: plain AMP loop {steady(loop):,.1f} training images/s (epochs {[round(r) for r in loop]})")
            job = train_job_rates(root, b, gpu, args.epochs, args.train_batch_size, args.image_size, work)
            log(f"{b}: train job {steady(job):,.1f} training images/s (epochs {[round(r) for r in job]})")
            results["train"][b] = {"plain_loop": loop, "train_job": job, "ratio": steady(job) / steady(loop)}
            save()
    finally:
        import ray

        ray.shutdown()
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
    results["seconds"] = time.perf_counter() - started

    print(
        f"\n{results['device']}, {cpus} CPUs, {results['date']} (batch {args.batch_size}, {args.image_size} px, "
        f"{'bf16' if results['bf16'] else 'fp16' if gpu else 'fp32'}, channels-last)"
    )
    print(
        f"CPU decode+preprocess ({cpus} processes): JPEG {decode['jpeg']:,.0f} images/s, PNG {decode['png']:,.0f} "
        "images/s; "
        f"device JPEG decode+preprocess {results['device_decode']:,.0f} images/s"
    )
    print(f"checks: {results['checks']}")
    print(
        f"{'backbone':20s} {'model only':>11s} {'from host':>10s} {'score JPEG':>11s} {'ratio':>6s} "
        f"{'score PNG':>10s} {'ratio':>6s}"
    )
    for b, r in results["backbones"].items():
        print(
            f"{b:20s} {r['model_only']:11,.0f} {r['predict_proba_from_host']:10,.0f} "
            f"{r.get('score_jpeg', float('nan')):11,.0f} {r.get('score_jpeg_ratio_to_bound', float('nan')):6.2f} "
            f"{r.get('score_png', float('nan')):10,.0f} {r.get('score_png_ratio_to_bound', float('nan')):6.2f}"
        )
    print("(ratio: score job / min(model only, CPU decode); images/s)")
    for b, r in results["backbones"].items():
        if "score_jpeg" in r:
            print(
                f"targets {b}: score JPEG / device JPEG decode {r['score_jpeg_ratio_to_target_base']:.2f} (target >= "
                "0.6 "
                f"for mobilenet_v2); score PNG / CPU PNG decode {r['score_png_ratio_to_target_base']:.2f} (target >= "
                "0.8)"
            )
    for b, r in results["train"].items():
        print(
            f"train {b}: plain AMP loop {steady(r['plain_loop']):,.1f}, train job {steady(r['train_job']):,.1f} "
            f"images/s (epochs after the first) -> ratio {r['ratio']:.2f}"
        )
    print(f"total {results['seconds']:.0f} s")
    save()
    return 0


if __name__ == "__main__":
    sys.exit(main())
