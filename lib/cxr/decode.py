"""Decode the raw bytes of one PNG / JPEG / DICOM file into one normalised grayscale array.

`decode` never raises for bad input: every failure becomes a one-line error string in
`Decoded.error`. Output images are 2-D float32 in [0, 1] with 0 = black (air dark, bone
bright, i.e. MONOCHROME2-like), C-contiguous.
"""

from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass
from io import BytesIO

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

MAX_PIXELS: int = 64_000_000  # default cap on width*height (decompression bombs)
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".dcm")

_EXT_KIND = {".png": "png", ".jpg": "jpeg", ".jpeg": "jpeg", ".dcm": "dicom"}
# DICOM ViewPosition (0018,5101) values of projections other than the frontal (PA/AP) chest X-ray the
# models read: lateral, decubitus, oblique (the DICOM defined terms, and the spellings vendors also use).
NON_FRONTAL_VIEWS = frozenset({"LL", "RL", "LAT", "LATERAL", "LLD", "RLD", "LLO", "RLO", "LAO", "RAO", "LPO", "RPO"})
NOT_FRONTAL = "not a frontal view"  # how the error of such a file starts (``decode(..., frontal_only=True)``)
_PIL_FORMATS = ("PNG", "JPEG")  # the JPEG opener also yields MPO (phone photos); primary frame used
_ERR_LEN = 200

# Our own cap (``max_pixels``, checked from the header before pixels load) replaces Pillow's bomb
# *warning*; Pillow's hard DecompressionBombError (2x its limit) is still caught below. A filter set
# once here, rather than warnings.catch_warnings() per call, which is not thread-safe and decode()
# runs in threads.
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)


@dataclass(frozen=True)
class Decoded:
    image: np.ndarray | None  # 2-D float32 in [0, 1], C-contiguous; None on error
    width: int | None  # as displayed (after EXIF orientation); None if unknown
    height: int | None
    error: str | None  # None when fine; else a one-line human-readable reason
    view: str | None = None  # DICOM ViewPosition (e.g. "PA", "AP", "LL"); None for PNG/JPEG or when absent

    @property
    def ok(self) -> bool:
        return self.error is None


def is_dicom(head: bytes) -> bool:
    return head[128:132] == b"DICM"


def _magic_kind(head: bytes) -> str | None:
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if head.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    if is_dicom(head):
        return "dicom"
    return None


def sniff_kind(name: str, head: bytes) -> str | None:
    """ "png" | "jpeg" | "dicom" | None: magic bytes first, else the (case-insensitive) extension."""
    kind = _magic_kind(head)
    if kind is None and "." in name:
        kind = _EXT_KIND.get("." + name.rsplit(".", 1)[-1].lower())
    return kind


def _one_line(text: str, limit: int = _ERR_LEN) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _fail(error: str, width: int | None = None, height: int | None = None) -> Decoded:
    return Decoded(None, width, height, _one_line(error, 2 * _ERR_LEN))


def _done(a: np.ndarray, width: int, height: int) -> Decoded:
    a = np.asarray(a, dtype=np.float32)
    if a.ndim != 2 or a.size == 0:
        return _fail(f"unreadable: decoded pixel array has shape {a.shape}, expected 2-D", width, height)
    if not np.isfinite(a).all():  # (a full-size radiograph is ~8 megapixels: no pass over it that is not needed)
        a = np.nan_to_num(a, nan=0.0, posinf=1.0, neginf=0.0)
    return Decoded(np.ascontiguousarray(np.clip(a, 0.0, 1.0)), width, height, None)


def _minmax(a: np.ndarray) -> np.ndarray:
    """Scale to [0, 1] as float32; non-finite values count as the minimum; a constant image gives zeros.
    Integer pixels (up to 16 bits: exact in float32) are not widened to float64 first."""
    a = np.asarray(a)
    if a.dtype.kind == "f":
        finite = np.isfinite(a)
        if not finite.all():
            a = np.where(finite, a, a[finite].min() if finite.any() else 0.0)
    lo, hi = float(a.min()), float(a.max())
    if not hi > lo:
        return np.zeros(a.shape, np.float32)
    out = a.astype(np.float32)
    out -= np.float32(lo)
    out /= np.float32(hi - lo)
    return out


def _too_many(width: int, height: int, max_pixels: int) -> Decoded | None:
    if width * height > max_pixels:
        return _fail(
            f"too many pixels: {width}x{height} = {width * height:,} exceeds the cap of {max_pixels:,}", width, height
        )
    return None


# ---------------------------------------------------------------- PNG / JPEG (Pillow)


def _pil_to_array(im: Image.Image) -> np.ndarray:
    mode = im.mode
    if mode.startswith("I;16") or mode == "I":  # 16-bit grayscale PNG: keep full precision
        return np.asarray(im).astype(np.float64) / 65535.0
    if mode == "F":
        return _minmax(np.asarray(im))
    if mode not in ("L", "1", "LA", "La"):  # P, PA, RGB(A), CMYK, YCbCr, ...: via RGB, alpha ignored
        im = im.convert("RGB")
    return np.asarray(im.convert("L"), dtype=np.float32) / 255.0


def _decode_pil(data: bytes, kind: str, by_magic: bool, max_pixels: int) -> Decoded:
    width = height = None
    try:
        with Image.open(BytesIO(data), formats=_PIL_FORMATS) as im:
            width, height = im.size
            if (bad := _too_many(width, height, max_pixels)) is not None:
                return bad
            if im.format == "PNG" and getattr(im, "n_frames", 1) > 1:
                return _fail(f"multi-frame PNG (APNG with {im.n_frames} frames) is not supported", width, height)
            shown = ImageOps.exif_transpose(im)  # loads the pixels (primary frame for MPO)
            shown.load()
            width, height = shown.size
            return _done(_pil_to_array(shown), width, height)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        return _fail(f"too many pixels (Pillow's bomb limit): {e}", width, height)
    except UnidentifiedImageError:
        if by_magic:
            return _fail(f"truncated or corrupt {kind.upper()} header ({len(data)} bytes)")
        return _fail("not an image: content is not PNG/JPEG/DICOM despite its file extension")
    except (OSError, SyntaxError, ValueError) as e:
        msg = _one_line(e)
        if "truncated" in msg.lower() or "broken data stream" in msg.lower():
            return _fail(f"truncated {kind.upper()} file: {msg}", width, height)
        return _fail(f"unreadable: {type(e).__name__}: {msg}", width, height)


# ---------------------------------------------------------------- DICOM (pydicom)


def _unsupported_syntax(ts, exc: Exception) -> str:
    from pydicom.pixels import get_decoder

    try:
        decoder = get_decoder(ts)
    except NotImplementedError:
        return f"unsupported DICOM transfer syntax {ts.name} ({ts}): pydicom has no decoder for it"
    have = ", ".join(decoder.available_plugins)
    need = "; ".join(decoder.missing_dependencies)
    hint = f"; decodable with: {need}" if need else ""
    why = f"installed decoder(s) {have} failed ({_one_line(exc, 120)})" if have else "no decoder plugin installed"
    return f"unsupported DICOM transfer syntax {ts.name} ({ts}): {why}{hint}"


def _decode_dicom(data: bytes, max_pixels: int, frontal_only: bool = False) -> Decoded:
    import pydicom
    from pydicom.pixels import apply_color_lut, apply_modality_lut, apply_voi_lut
    from pydicom.uid import UID, ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

    ds = pydicom.dcmread(BytesIO(data), force=True)
    if not any(k in ds for k in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
        return _fail("no pixel data in DICOM")
    rows, cols = ds.get("Rows"), ds.get("Columns")
    if not rows or not cols:
        return _fail("DICOM has pixel data but no Rows/Columns")
    rows, cols = int(rows), int(cols)
    view = _view_position(ds)
    if frontal_only and is_non_frontal(view):  # from the header: its pixels are never decoded
        return dataclasses.replace(
            _fail(
                f"{NOT_FRONTAL}: DICOM ViewPosition {view} (the models read PA/AP chest X-rays; "
                "--all-views scores every view)",
                cols,
                rows,
            ),
            view=view,
        )
    frames = int(ds.get("NumberOfFrames") or 1)
    if frames > 1:
        return _fail(f"multi-frame DICOM ({frames} frames) is not supported", cols, rows)
    if (bad := _too_many(cols, rows, max_pixels)) is not None:
        return bad

    if "TransferSyntaxUID" not in ds.file_meta:  # bare dataset without file meta: use how it was read
        implicit, little = getattr(ds, "original_encoding", (True, True))
        ds.file_meta.TransferSyntaxUID = (
            ImplicitVRLittleEndian if implicit else ExplicitVRLittleEndian if little else ExplicitVRBigEndian
        )
    ts = UID(ds.file_meta.TransferSyntaxUID)
    try:
        arr = ds.pixel_array
    except Exception as e:
        if ts.is_transfer_syntax and not ts.is_compressed:
            if "less than expected" in str(e):
                return _fail(f"truncated DICOM pixel data: {e}", cols, rows)
            raise
        return _fail(_unsupported_syntax(ts, e), cols, rows)

    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).strip().upper()
    if photometric == "PALETTE COLOR":
        arr = apply_color_lut(arr, ds)
    if arr.ndim == 3 and arr.shape[-1] in (3, 4):  # RGB (pydicom already converted YBR to RGB)
        arr = arr[..., :3].astype(np.float64) @ np.array([0.299, 0.587, 0.114])
    else:
        arr = apply_voi_lut(apply_modality_lut(arr, ds), ds)
    img = _minmax(arr)
    if photometric == "MONOCHROME1" and img.max() > 0:
        img = 1.0 - img
    done = _done(img, cols, rows)
    return dataclasses.replace(done, view=view) if done.ok else done


def is_non_frontal(view: str | None) -> bool:
    """True for a ViewPosition that names a lateral, decubitus or oblique projection; False for PA/AP,
    unknown values and no value (those are scored)."""
    words = (view or "").upper().replace("_", " ").split()
    return bool(words) and words[0] in NON_FRONTAL_VIEWS


def _view_position(ds) -> str | None:
    value = ds.get("ViewPosition")
    text = " ".join(str(value).split()).upper() if value is not None else ""
    return text[:32] or None


# ---------------------------------------------------------------- entry point


def decode(data: bytes, name: str = "", max_pixels: int = MAX_PIXELS, *, frontal_only: bool = False) -> Decoded:
    """Decode one file's bytes; never raises for bad input (errors go to `Decoded.error`). ``frontal_only``: a
    DICOM whose ViewPosition is lateral, decubitus or oblique (:func:`is_non_frontal`) is an error
    (``not a frontal view ...``, with its view), found from the header without decoding the pixels."""
    try:
        if not data:
            return _fail("empty file")
        data = bytes(data)
        magic = _magic_kind(data[:132])
        kind = magic or sniff_kind(name, b"")
        if kind is None:
            return _fail(f"not an image: no PNG/JPEG/DICOM signature ({len(data)} bytes, name {name!r})")
        if kind == "dicom":
            return _decode_dicom(data, max_pixels, frontal_only)
        return _decode_pil(data, kind, magic is not None, max_pixels)
    except Exception as e:  # noqa: BLE001 - the contract is: bad input never raises
        return _fail(f"unreadable: {type(e).__name__}: {_one_line(e)}")
