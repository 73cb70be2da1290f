"""Generated chest-X-ray-like images in every format the jobs read (good and broken), and labelled trees of them."""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np


def png_bytes(arr: np.ndarray, mode: str | None = None) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    (Image.fromarray(arr) if mode is None else Image.fromarray(arr).convert(mode)).save(buf, "PNG")
    return buf.getvalue()


def jpeg_bytes(arr: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def dicom_bytes(
    arr: np.ndarray,
    *,
    frames: int = 1,
    photometric: str = "MONOCHROME2",
    preamble: bool = True,
    view: str | None = None,
) -> bytes:
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"  # digital X-ray
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset("x.dcm", {}, file_meta=meta, preamble=b"\0" * 128)
    ds.Modality = "DX"
    if view is not None:
        ds.ViewPosition = view
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Rows, ds.Columns = arr.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    data = np.stack([arr.astype(np.uint16)] * frames) if frames > 1 else arr.astype(np.uint16)
    if frames > 1:
        ds.NumberOfFrames = frames
    ds.PixelData = data.tobytes()
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def compress_dicom(data: bytes, transfer_syntax: str) -> bytes:
    """``data`` (an uncompressed DICOM file) re-encoded by GDCM into ``transfer_syntax`` (a UID), the way a
    PACS export would: JPEG Lossless, JPEG-LS, JPEG 2000, RLE, or 12-bit lossy JPEG Extended."""
    import tempfile

    import gdcm

    with tempfile.TemporaryDirectory() as tmp:
        src, dst = os.path.join(tmp, "in.dcm"), os.path.join(tmp, "out.dcm")
        Path(src).write_bytes(data)
        reader = gdcm.ImageReader()
        reader.SetFileName(src)
        assert reader.Read()
        change = gdcm.ImageChangeTransferSyntax()
        change.SetTransferSyntax(gdcm.TransferSyntax(gdcm.TransferSyntax.GetTSType(transfer_syntax)))
        change.SetInput(reader.GetImage())
        assert change.Change(), f"GDCM cannot encode {transfer_syntax}"
        writer = gdcm.ImageWriter()
        writer.SetFile(reader.GetFile())
        writer.SetImage(change.GetOutput())
        writer.SetFileName(dst)
        assert writer.Write()
        return Path(dst).read_bytes()


def xray_like(h: int, w: int, seed: int = 0, blob: bool = False) -> np.ndarray:
    """A smooth uint8 image; ``blob`` adds a bright disc (the synthetic 'finding')."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    img = 80 + 60 * np.sin(x / w * np.pi) + rng.normal(0, 8, (h, w))
    if blob:
        img += 120 * (((y - h * 0.45) ** 2 + (x - w * 0.4) ** 2) < (min(h, w) * 0.18) ** 2)
    return np.clip(img, 0, 255).astype(np.uint8)


# name -> (bytes, expected error prefix or None, (width, height) for good files)
def mixed_files() -> dict[str, tuple[bytes, str | None, tuple[int, int] | None]]:
    gray = xray_like(90, 120, seed=1)
    rgb = np.stack([xray_like(80, 100, seed=2)] * 3, axis=-1)
    good_png = png_bytes(gray)
    files = {
        "good/a.png": (good_png, None, (120, 90)),
        "good/rgb.PNG": (png_bytes(rgb), None, (100, 80)),
        "good/nested/deeper/b.jpg": (jpeg_bytes(xray_like(70, 60, seed=3)), None, (60, 70)),
        "good/c.jpeg": (jpeg_bytes(rgb), None, (100, 80)),
        "good/d16.png": (png_bytes((gray.astype(np.uint16) * 257), "I;16"), None, (120, 90)),
        "good/scan.dcm": (dicom_bytes((gray.astype(np.uint16) * 16), view="PA"), None, (120, 90)),
        "good/inverted.dcm": (dicom_bytes((gray.astype(np.uint16) * 16), photometric="MONOCHROME1"), None, (120, 90)),
        "good/IM000001": (dicom_bytes(gray.astype(np.uint16) * 16), None, (120, 90)),  # DICOM without extension
        # JPEG Lossless (Process 14, SV1): how PACS archives commonly store CR/DX images
        "good/lossless.dcm": (
            compress_dicom(dicom_bytes(gray.astype(np.uint16) * 16), "1.2.840.10008.1.2.4.70"),
            None,
            (120, 90),
        ),
        "bad/empty.png": (b"", "empty file", None),
        "bad/truncated.png": (good_png[: len(good_png) // 2], "truncated", None),
        "bad/text.jpg": (b"this is not an image\n" * 10, "not an image", None),
        "bad/multiframe.dcm": (dicom_bytes(gray.astype(np.uint16), frames=3), "multi-frame", None),
        "bad/lateral.dcm": (
            dicom_bytes((gray.astype(np.uint16) * 16), view="LL"),
            "not a frontal view",
            None,
        ),  # scored with all_views
    }
    return files


IGNORED = {"notes.txt": b"not an input", "README": b"no extension, not DICOM"}


def write_files(root: Path, files: dict) -> Path:
    for name, entry in {**files, **{k: (v, None, None) for k, v in IGNORED.items()}}.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(entry[0])
    return root


def make_labelled_tree(root: Path, n: int = 30, size: int = 64, seed: int = 0, layout: str = "train") -> Path:
    """{layout}/{covid,non}/ of generated images: covid ones carry a bright disc (separable task)."""
    for cls, blob in (("covid", True), ("non", False)):
        d = root / layout / cls if layout else root / cls
        d.mkdir(parents=True, exist_ok=True)
        for i in range(n):
            (d / f"{cls}{seed}-{i}.png").write_bytes(
                png_bytes(xray_like(size, size, seed=seed * 10_000 + i + (5000 if blob else 0), blob=blob))
            )
    return root
