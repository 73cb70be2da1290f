"""Decoding full-size DICOM radiographs as PACS archives store them, against the model they feed, in one run.

    .venv/bin/python benchmarks/decode.py [--size 3000x2500] [--repeat 5] [--model default]

One generated 12-bit radiograph-like image (smooth anatomy-like field plus noise, the size of a CR/DX
chest film) is written uncompressed and in each compressed transfer syntax GDCM encodes (the tests'
``compress_dicom``). For each: the file size and the time of the score pipeline's per-file CPU work
(``cxr.decode.decode`` + ``cxr.preprocess.preprocess`` to the model's input size), one thread. Baselines
measured in the same run: the uncompressed file (ratio = its time / this one: how much slower the codec
makes a file), and the model's forward pass per image (batch 32, one thread; ratio > 1: that codec, not
the model, bounds a CPU node's throughput unless decode tasks get more CPU than the actors).
Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path[:0] = [os.path.join(ROOT, "lib"), os.path.join(ROOT, "tests")]

import numpy as np  # noqa: E402

SYNTAXES = {
    "uncompressed (Explicit VR Little Endian)": None,
    "JPEG Lossless SV1 (1.2.840.10008.1.2.4.70)": "1.2.840.10008.1.2.4.70",
    "JPEG-LS Lossless (1.2.840.10008.1.2.4.80)": "1.2.840.10008.1.2.4.80",
    "JPEG 2000 Lossless (1.2.840.10008.1.2.4.90)": "1.2.840.10008.1.2.4.90",
    "RLE Lossless (1.2.840.10008.1.2.5)": "1.2.840.10008.1.2.5",
}


def radiograph(height: int, width: int) -> np.ndarray:
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:height, 0:width]
    field = 2000 + 1200 * np.sin(x / width * np.pi) * np.cos((y / height - 0.5) * np.pi)
    return (field + rng.normal(0, 40, (height, width))).clip(0, 4095).astype(np.uint16)


def per_image(fn, repeat: int) -> float:
    fn()  # warm-up
    start = time.perf_counter()
    for _ in range(repeat):
        fn()
    return (time.perf_counter() - start) / repeat


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="3000x2500", help="HEIGHTxWIDTH of the generated radiograph")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--model", default="default")
    args = ap.parse_args()

    import torch

    from cxr.checkpoint import load_checkpoint
    from cxr.decode import decode
    from cxr.preprocess import preprocess
    from support.images import compress_dicom, dicom_bytes  # the tests' DICOM writer and GDCM encoder

    torch.set_num_threads(1)
    height, width = (int(v) for v in args.size.lower().split("x"))
    loaded = load_checkpoint(args.model)
    spec = loaded.info.preprocess
    batch = np.zeros((32, spec.input_size, spec.input_size), np.float32)
    model_s = per_image(lambda: loaded.predict_proba(batch), max(1, args.repeat // 2)) / len(batch)

    raw = dicom_bytes(radiograph(height, width))
    rows, base = [], None
    for name, uid in SYNTAXES.items():
        data = raw if uid is None else compress_dicom(raw, uid)

        def work(data=data):
            decoded = decode(data, "x.dcm")
            assert decoded.ok, decoded.error
            preprocess(decoded.image, spec)

        seconds = per_image(work, args.repeat)
        base = base or seconds
        rows.append(
            {
                "transfer_syntax": name,
                "megabytes": round(len(data) / 1e6, 2),
                "ms_per_image": round(seconds * 1e3, 1),
                "images_per_s": round(1 / seconds, 2),
                "time_vs_uncompressed": round(seconds / base, 2),
                "time_vs_model": round(seconds / model_s, 2),
            }
        )
    print(
        json.dumps(
            {
                "image": f"{height}x{width}, 12 bits",
                "threads": 1,
                "model": loaded.info.model_id,
                "model_input": spec.input_size,
                "model_ms_per_image": round(model_s * 1e3, 1),
                "rows": rows,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
