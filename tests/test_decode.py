"""Tests for cxr.decode: every input is generated here (Pillow / pydicom / numpy), no Ray."""

from __future__ import annotations

import io
import struct
import warnings
import zlib

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import (
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGExtended12Bit,
    JPEGLSLossless,
    SecondaryCaptureImageStorage,
    generate_uid,
)

from cxr.decode import IMAGE_EXTENSIONS, MAX_PIXELS, Decoded, decode, is_dicom, is_non_frontal, sniff_kind
from support.images import compress_dicom, dicom_bytes, xray_like

# ------------------------------------------------------------------ helpers


def _check_image(d: Decoded, shape: tuple[int, int]) -> np.ndarray:
    assert d.ok, d.error
    assert d.error is None
    img = d.image
    assert isinstance(img, np.ndarray)
    assert img.dtype == np.float32 and img.ndim == 2 and img.shape == shape
    assert img.flags["C_CONTIGUOUS"]
    assert np.isfinite(img).all() and img.min() >= 0.0 and img.max() <= 1.0
    assert (d.height, d.width) == shape
    return img


def _check_error(d: Decoded, prefix: str) -> str:
    assert not d.ok and d.image is None
    assert isinstance(d.error, str) and d.error.startswith(prefix), d.error
    assert "\n" not in d.error
    return d.error


def _pil_bytes(im: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


def _png_with_size(width: int, height: int) -> bytes:
    """A real 1x1 PNG whose IHDR is patched to claim width x height (with a correct CRC)."""
    data = bytearray(_pil_bytes(Image.new("L", (1, 1), 7)))
    assert data[12:16] == b"IHDR"
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])) & 0xFFFFFFFF)
    return bytes(data)


def _dicom(
    pixels: np.ndarray,
    photometric: str = "MONOCHROME2",
    *,
    frames: int = 1,
    ts=ExplicitVRLittleEndian,
    file_meta: bool = True,
    **attrs,
) -> bytes:
    """A DICOM file (uint16 grayscale, or uint8 RGB when pixels is HxWx3) written by pydicom."""
    ds = Dataset()
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = generate_uid()
    ds.Modality = "DX"
    rgb = pixels.ndim == 3 and frames == 1
    ds.Rows, ds.Columns = pixels.shape[-3:-1] if rgb else pixels.shape[-2:]
    ds.SamplesPerPixel = 3 if rgb else 1
    ds.PhotometricInterpretation = "RGB" if rgb else photometric
    bits = 8 if rgb else 16
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = bits, bits, bits - 1, 0
    if rgb:
        ds.PlanarConfiguration = 0
    if frames > 1:
        ds.NumberOfFrames = frames
    for key, value in attrs.items():
        setattr(ds, key, value)
    if ts.is_compressed:
        ds.PixelData = encapsulate([b"\x00\x01 this is not a codestream " * 4])
        ds["PixelData"].VR = "OB"
    else:
        ds.PixelData = pixels.astype(np.uint8 if rgb else "<u2").tobytes()
        ds["PixelData"].VR = "OB" if rgb else "OW"
    buf = io.BytesIO()
    if file_meta:
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ts
        ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.save_as(buf, enforce_file_format=True)
    else:  # bare dataset: no preamble, no "DICM", no file meta, implicit VR little endian
        ds.save_as(buf, implicit_vr=True, little_endian=True)
    return buf.getvalue()


GRAY4 = np.array([[0, 1000], [2000, 4000]], dtype=np.uint16)


# ------------------------------------------------------------------ interface / sniffing


def test_constants_and_decoded_ok():
    assert MAX_PIXELS == 64_000_000
    assert IMAGE_EXTENSIONS == (".png", ".jpg", ".jpeg", ".dcm")
    assert Decoded(np.zeros((1, 1), np.float32), 1, 1, None).ok
    assert not Decoded(None, None, None, "empty file").ok


def test_is_dicom_and_sniff_kind_by_magic_and_extension():
    png = _pil_bytes(Image.new("L", (2, 2)))
    jpg = _pil_bytes(Image.new("L", (2, 2)), "JPEG")
    dcm = _dicom(GRAY4)
    assert is_dicom(dcm) and not is_dicom(png) and not is_dicom(b"")
    # magic bytes win over the name
    assert sniff_kind("x.dcm", png) == "png"
    assert sniff_kind("x.png", jpg) == "jpeg"
    assert sniff_kind("no_extension", dcm[:200]) == "dicom"
    # no magic: extension decides, case-insensitively
    assert sniff_kind("A.PNG", b"") == "png"
    assert sniff_kind("dir.v2/b.JpEg", b"xx") == "jpeg"
    assert sniff_kind("c.jpg", b"") == "jpeg"
    assert sniff_kind("scan.DCM", b"\x08\x00") == "dicom"
    assert sniff_kind("notes.txt", b"hello") is None
    assert sniff_kind("", b"") is None


def test_dicom_without_preamble_sniffed_by_extension_and_decoded():
    data = _dicom(GRAY4, file_meta=False)
    assert not is_dicom(data)
    assert sniff_kind("scan.dcm", data) == "dicom"
    assert sniff_kind("scan", data) is None
    img = _check_image(decode(data, "scan.dcm"), (2, 2))
    np.testing.assert_allclose(img, [[0, 0.25], [0.5, 1.0]], atol=1e-6)
    _check_error(decode(data, "scan"), "not an image")


# ------------------------------------------------------------------ PNG modes


def test_png_8bit_gray_exact_values():
    a = np.array([[0, 128, 255], [1, 2, 3]], dtype=np.uint8)
    img = _check_image(decode(_pil_bytes(Image.fromarray(a, "L")), "a.png"), (2, 3))
    np.testing.assert_allclose(img, a / 255.0, atol=1e-7)


def test_png_rgb_luminance():
    a = np.zeros((2, 3, 3), dtype=np.uint8)
    a[0, 0] = (255, 0, 0)
    a[0, 1] = (0, 255, 0)
    a[0, 2] = (0, 0, 255)
    a[1, :] = 255
    im = Image.fromarray(a, "RGB")
    img = _check_image(decode(_pil_bytes(im), "rgb.png"), (2, 3))
    np.testing.assert_allclose(img, np.asarray(im.convert("L")) / 255.0, atol=1e-7)
    np.testing.assert_allclose(img[0], [0.299, 0.587, 0.114], atol=1.5 / 255)
    np.testing.assert_allclose(img[1], 1.0)


def test_png_rgba_ignores_alpha():
    a = np.zeros((1, 2, 4), dtype=np.uint8)
    a[0, 0] = (255, 255, 255, 0)  # fully transparent white is still white
    a[0, 1] = (0, 255, 0, 128)
    img = _check_image(decode(_pil_bytes(Image.fromarray(a, "RGBA")), "rgba.png"), (1, 2))
    assert img[0, 0] == 1.0
    assert img[0, 1] == pytest.approx(0.587, abs=1.5 / 255)


def test_png_palette_with_transparency_ignores_alpha():
    im = Image.new("P", (2, 2), 0)
    im.putpalette([255, 255, 255, 0, 0, 0, 255, 0, 0] + [0] * (3 * 253))
    im.putpixel((1, 0), 1)
    im.putpixel((0, 1), 2)
    data = _pil_bytes(im, transparency=0)  # index 0 (white) fully transparent
    assert Image.open(io.BytesIO(data)).mode == "P"
    img = _check_image(decode(data, "p.png"), (2, 2))
    assert img[0, 0] == 1.0 and img[1, 1] == 1.0  # transparent white stays white
    assert img[0, 1] == 0.0
    assert img[1, 0] == pytest.approx(0.299, abs=1.5 / 255)


def test_png_la_uses_luminance_channel():
    a = np.array([[[200, 0], [50, 255]]], dtype=np.uint8)
    data = _pil_bytes(Image.fromarray(a, "LA"))
    assert Image.open(io.BytesIO(data)).mode == "LA"
    img = _check_image(decode(data, "la.png"), (1, 2))
    np.testing.assert_allclose(img, [[200 / 255, 50 / 255]], atol=1e-7)


def test_png_1bit():
    im = Image.new("1", (3, 2), 0)
    im.putpixel((2, 1), 1)
    img = _check_image(decode(_pil_bytes(im), "bw.png"), (2, 3))
    assert img[1, 2] == 1.0 and img.sum() == 1.0


def test_png_16bit_full_precision():
    a = np.array([[0, 32768, 65535], [1, 256, 65534]], dtype=np.uint16)
    data = _pil_bytes(Image.fromarray(a))
    assert Image.open(io.BytesIO(data)).mode.startswith("I")
    img = _check_image(decode(data, "x16.png"), (2, 3))
    assert img[0, 0] == 0.0 and img[0, 2] == 1.0
    assert img[0, 1] == pytest.approx(0.5, abs=1e-4)
    assert img[1, 0] == pytest.approx(1 / 65535, rel=1e-5)  # not collapsed to 8 bits
    assert img[1, 2] < 1.0 and img[1, 1] == pytest.approx(256 / 65535, rel=1e-5)


# ------------------------------------------------------------------ JPEG


def test_jpeg_gray_and_rgb():
    gray = Image.new("L", (16, 8), 128)
    img = _check_image(decode(_pil_bytes(gray, "JPEG", quality=95), "g.jpg"), (8, 16))
    np.testing.assert_allclose(img, 128 / 255, atol=2 / 255)

    rgb = Image.new("RGB", (10, 6), (0, 255, 0))
    img = _check_image(decode(_pil_bytes(rgb, "JPEG", quality=95), "c.jpeg"), (6, 10))
    np.testing.assert_allclose(img, 0.587, atol=4 / 255)


def test_jpeg_cmyk():
    im = Image.new("CMYK", (4, 4), (0, 0, 0, 0))  # no ink = white
    img = _check_image(decode(_pil_bytes(im, "JPEG", quality=95), "cmyk.jpg"), (4, 4))
    np.testing.assert_allclose(img, 1.0, atol=3 / 255)


def test_jpeg_exif_orientation_6_rotates():
    stored = np.zeros((20, 40), dtype=np.uint8)  # 40 wide, 20 tall as stored
    stored[:6, :6] = 255  # bright marker at stored top-left
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    data = _pil_bytes(Image.fromarray(stored, "L"), "JPEG", quality=95, exif=exif)
    d = decode(data, "phone.jpg")
    img = _check_image(d, (40, 20))  # displayed: 20 wide, 40 tall
    assert (d.width, d.height) == (20, 40)
    assert img[:5, -5:].mean() > 0.9  # marker now top-right
    assert img[:5, :5].mean() < 0.1 and img[-5:, -5:].mean() < 0.1


def test_jpeg_mpo_uses_primary_frame():
    primary, second = Image.new("RGB", (8, 8), "white"), Image.new("RGB", (8, 8), "black")
    data = _pil_bytes(primary, "MPO", save_all=True, append_images=[second])
    with Image.open(io.BytesIO(data)) as im:
        assert getattr(im, "n_frames", 1) == 2
    img = _check_image(decode(data, "photo.jpg"), (8, 8))
    assert img.mean() > 0.95


def test_extension_lies_dispatch_by_magic():
    a = np.array([[10, 250]], dtype=np.uint8)
    png = _pil_bytes(Image.fromarray(a, "L"))
    img = _check_image(decode(png, "really_a_png.jpg"), (1, 2))
    np.testing.assert_allclose(img, a / 255.0)
    jpg = _pil_bytes(Image.new("L", (5, 3), 200), "JPEG", quality=95)
    img = _check_image(decode(jpg, "really_a_jpeg.png"), (3, 5))
    np.testing.assert_allclose(img, 200 / 255, atol=2 / 255)
    _check_image(decode(_dicom(GRAY4), "really_a_dicom.png"), (2, 2))


# ------------------------------------------------------------------ DICOM


def test_dicom_monochrome2_uint16():
    d = decode(_dicom(GRAY4), "a.dcm")
    img = _check_image(d, (2, 2))
    assert (d.width, d.height) == (2, 2)
    np.testing.assert_allclose(img, [[0, 0.25], [0.5, 1.0]], atol=1e-6)


def test_dicom_monochrome1_inverted():
    m2 = _check_image(decode(_dicom(GRAY4, "MONOCHROME2")), (2, 2))
    m1 = _check_image(decode(_dicom(GRAY4, "MONOCHROME1")), (2, 2))
    assert m2[0, 0] < m2[1, 1] and m1[0, 0] > m1[1, 1]  # order of a known pixel pair flips
    np.testing.assert_allclose(m1, 1.0 - m2, atol=1e-6)
    assert m1[0, 0] == 1.0 and m1[1, 1] == 0.0


def test_dicom_rescale_slope_intercept_applied():
    # a negative slope reverses order, which min-max normalisation alone cannot undo
    img = _check_image(decode(_dicom(GRAY4, RescaleSlope=-1, RescaleIntercept=100)), (2, 2))
    np.testing.assert_allclose(img, [[1.0, 0.75], [0.5, 0.0]], atol=1e-6)


def test_dicom_window_center_width_clips():
    px = np.array([[0, 500, 950, 1000, 1500, 4000]], dtype=np.uint16)
    img = _check_image(decode(_dicom(px, WindowCenter=1000, WindowWidth=200)), (1, 6))
    assert img[0, 0] == 0.0 and img[0, 1] == 0.0  # below the window
    assert img[0, 4] == 1.0 and img[0, 5] == 1.0  # above the window
    assert img[0, 2] == pytest.approx(0.25, abs=0.01)
    assert img[0, 3] == pytest.approx(0.5, abs=0.01)


def test_dicom_window_is_in_rescaled_units():
    # stored 0..1500 -> HU -1000..2000; window [-500, 500] in HU
    px = np.array([[0, 500, 1000, 1500]], dtype=np.uint16)
    ds_bytes = _dicom(px, RescaleSlope=2, RescaleIntercept=-1000, WindowCenter=0, WindowWidth=1000)
    img = _check_image(decode(ds_bytes), (1, 4))
    np.testing.assert_allclose(img, [[0.0, 0.5, 1.0, 1.0]], atol=0.01)


def test_dicom_constant_image_is_zeros():
    img = _check_image(decode(_dicom(np.full((3, 4), 777, np.uint16))), (3, 4))
    assert (img == 0).all()
    img = _check_image(decode(_dicom(np.full((3, 4), 777, np.uint16), "MONOCHROME1")), (3, 4))
    assert np.isfinite(img).all()


def test_dicom_rgb_luminance():
    px = np.zeros((1, 4, 3), dtype=np.uint8)
    px[0, 0] = (255, 0, 0)
    px[0, 1] = (0, 255, 0)
    px[0, 3] = (255, 255, 255)
    img = _check_image(decode(_dicom(px), "rgb.dcm"), (1, 4))
    np.testing.assert_allclose(img, [[0.299, 0.587, 0.0, 1.0]], atol=1e-5)


def test_dicom_multiframe_rejected():
    err = _check_error(decode(_dicom(np.zeros((3, 4, 5), np.uint16), frames=3)), "multi-frame DICOM")
    assert "3 frames" in err


@pytest.mark.parametrize(
    "ts",
    [
        "1.2.840.10008.1.2.4.70",  # JPEG Lossless, Process 14 SV1: the usual PACS storage of CR/DX
        "1.2.840.10008.1.2.4.57",  # JPEG Lossless, Process 14
        "1.2.840.10008.1.2.4.80",  # JPEG-LS Lossless
        "1.2.840.10008.1.2.4.90",  # JPEG 2000 Lossless
        "1.2.840.10008.1.2.5",  # RLE Lossless
    ],
)
@pytest.mark.parametrize("photometric", ["MONOCHROME2", "MONOCHROME1"])
def test_losslessly_compressed_dicom_decodes_to_the_same_image(ts, photometric):
    """A 12-bit X-ray, compressed the way PACS archives store it, decodes exactly like its uncompressed file."""
    px = (xray_like(48, 64, seed=5).astype(np.uint16) * 16 + np.arange(64, dtype=np.uint16)) & 0x0FFF
    raw = dicom_bytes(px, photometric=photometric)
    packed = compress_dicom(raw, ts)
    assert pydicom.dcmread(io.BytesIO(packed)).file_meta.TransferSyntaxUID == ts
    assert len(packed) < len(raw)  # really compressed, not re-wrapped
    want = _check_image(decode(raw, "raw.dcm"), (48, 64))
    got = _check_image(decode(packed, "packed.dcm"), (48, 64))
    np.testing.assert_array_equal(got, want)


def test_dicom_12bit_lossy_jpeg_names_the_plugin_that_decodes_it():
    """12-bit JPEG Extended: neither GDCM (through pydicom) nor Pillow decodes it; the error row says what would."""
    data = _dicom(GRAY4, ts=JPEGExtended12Bit, BitsStored=12, HighBit=11)
    err = _check_error(decode(data, "lossy12.dcm"), "unsupported DICOM transfer syntax JPEG Extended")
    assert "1.2.840.10008.1.2.4.51" in err and "pylibjpeg-libjpeg" in err


def test_dicom_view_position_is_read_and_classified():
    assert decode(_dicom(GRAY4, ViewPosition="PA"), "a.dcm").view == "PA"
    assert decode(_dicom(GRAY4, ViewPosition="LL "), "a.dcm").view == "LL"  # padded: normalised
    assert decode(_dicom(GRAY4), "a.dcm").view is None
    assert decode(_dicom(GRAY4, ViewPosition=""), "a.dcm").view is None
    assert decode(_pil_bytes(Image.new("L", (4, 4), 9)), "a.png").view is None
    lateral = decode(_dicom(GRAY4, ViewPosition="LL"), "a.dcm", frontal_only=True)
    assert _check_error(lateral, "not a frontal view: DICOM ViewPosition LL") and lateral.view == "LL"
    assert (lateral.width, lateral.height) == (2, 2)
    assert decode(_dicom(GRAY4, ViewPosition="PA"), "a.dcm", frontal_only=True).ok
    # found from the header: a lateral whose pixel data no decoder could read never reaches the decoder
    junk = _dicom(GRAY4, ts=JPEG2000Lossless, ViewPosition="LL")
    _check_error(decode(junk, "j.dcm", frontal_only=True), "not a frontal view")
    _check_error(decode(junk, "j.dcm"), "unsupported DICOM transfer syntax")
    for view in ("LL", "RL", "LATERAL", "LLD", "RAO", "lat", "LL EXTENDED"):
        assert is_non_frontal(view), view
    for view in ("PA", "AP", "AP SUPINE", "", None, "UNKNOWN"):  # frontal, or nothing to go by: scored
        assert not is_non_frontal(view), view


def test_normalisation_to_float32_with_non_finite_and_constant_pixels():
    from cxr.decode import _done, _minmax

    m = _minmax(np.array([[np.nan, 2.0], [np.inf, 6.0]]))  # non-finite values count as the minimum
    assert m.dtype == np.float32 and m.tolist() == [[0.0, 0.0], [0.0, 1.0]]
    np.testing.assert_allclose(_minmax(np.array([[0, 16383, 65535]], np.uint16)), [[0.0, 0.25, 1.0]], atol=1e-4)
    flat = _minmax(np.full((2, 3), 777, np.uint16))
    assert flat.dtype == np.float32 and flat.shape == (2, 3) and not flat.any()
    d = _done(np.array([[np.nan, np.inf], [-np.inf, 0.5]], np.float32), 2, 2)
    assert d.ok and d.image.tolist() == [[0.0, 1.0], [0.0, 0.5]]
    assert _done(np.array([[-0.5, 1.5]]), 2, 1).image.tolist() == [[0.0, 1.0]]  # clipped to [0, 1], float32
    assert _done(np.zeros(3), 3, 1).error.startswith("unreadable: decoded pixel array has shape (3,)")


def test_dicom_jpeg2000_junk_is_unsupported_syntax():
    err = _check_error(decode(_dicom(GRAY4, ts=JPEG2000Lossless), "j2k.dcm"), "unsupported DICOM transfer syntax")
    assert "JPEG 2000" in err and "1.2.840.10008.1.2.4.90" in err
    assert "pylibjpeg" in err or "gdcm" in err  # names the plugin(s) that would decode it


def test_dicom_jpegls_junk_is_unsupported_syntax():
    err = _check_error(decode(_dicom(GRAY4, ts=JPEGLSLossless), "jls.dcm"), "unsupported DICOM transfer syntax")
    assert "JPEG-LS" in err and "1.2.840.10008.1.2.4.80" in err


def test_dicom_pixel_cap_and_missing_pixel_data():
    d = decode(_dicom(np.zeros((30, 40), np.uint16)), max_pixels=1000)
    err = _check_error(d, "too many pixels")
    assert "40x30" in err and "1,000" in err
    ds = pydicom.dcmread(io.BytesIO(_dicom(GRAY4)))
    del ds.PixelData
    buf = io.BytesIO()
    ds.save_as(buf)
    _check_error(decode(buf.getvalue(), "nopix.dcm"), "no pixel data")


def test_dicom_truncated_pixel_data():
    data = _dicom(np.arange(10_000, dtype=np.uint16).reshape(100, 100))
    _check_error(decode(data[: len(data) // 2], "cut.dcm"), "truncated DICOM pixel data")


# ------------------------------------------------------------------ bad input


def test_empty_random_and_text():
    _check_error(decode(b"", "x.png"), "empty file")
    rng = np.random.default_rng(0)
    _check_error(decode(rng.integers(0, 256, 4096, dtype=np.uint8).tobytes(), "blob.bin"), "not an image")
    _check_error(decode(b"patient notes, not an image\n" * 10, "notes.txt"), "not an image")
    _check_error(decode(b"patient notes, not an image\n" * 10, "liar.png"), "not an image")
    _check_error(decode(b"patient notes, not an image\n" * 10), "not an image")


def test_text_named_dcm_does_not_raise():
    d = decode(b"hello world, definitely not DICOM\n" * 10, "fake.dcm")
    assert not d.ok and d.image is None and d.error


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_truncated_files(fmt):
    noise = np.random.default_rng(1).integers(0, 256, (128, 128), dtype=np.uint8)
    data = _pil_bytes(Image.fromarray(noise, "L"), fmt)
    d = decode(data[: len(data) // 2], "cut." + fmt.lower())
    _check_error(d, "truncated")
    _check_error(decode(data[:20], "tiny"), "truncated")


def test_decompression_bomb_small_cap():
    data = _pil_bytes(Image.new("L", (100, 50)))
    err = _check_error(decode(data, "x.png", max_pixels=4999), "too many pixels")
    assert "100x50" in err and "4,999" in err
    _check_image(decode(data, "x.png", max_pixels=5000), (50, 100))


def test_decompression_bomb_patched_header():
    before = Image.MAX_IMAGE_PIXELS
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing may leak out as a warning either
        _check_error(decode(_png_with_size(100_000, 100_000), "bomb.png"), "too many pixels")
        # our cap is checked from the header, before any pixel is loaded
        err = _check_error(decode(_png_with_size(9000, 9000), "bomb.png"), "too many pixels")
        assert "9000x9000" in err and "64,000,000" in err
        # beyond Pillow's hard limit (2x its warning level) even a raised cap cannot let it through
        _check_error(decode(_png_with_size(20_000, 20_000), "bomb.png", max_pixels=10**12), "too many pixels")
    assert Image.MAX_IMAGE_PIXELS == before


def test_apng_multiframe_rejected():
    frames = [Image.new("L", (4, 4), v) for v in (0, 128, 255)]
    data = _pil_bytes(frames[0], "PNG", save_all=True, append_images=frames[1:])
    err = _check_error(decode(data, "anim.png"), "multi-frame")
    assert "3" in err


@pytest.mark.filterwarnings("ignore::UserWarning")  # pydicom warns about the corrupt tags it reads
def test_corrupted_bytes_never_raise():
    rng = np.random.default_rng(42)
    noise = rng.integers(0, 256, (32, 32), dtype=np.uint8)
    sources = [
        _pil_bytes(Image.fromarray(noise, "L")),
        _pil_bytes(Image.fromarray(noise, "L"), "JPEG"),
        _dicom(noise.astype(np.uint16)),
    ]
    for src in sources:
        for _ in range(40):
            buf = bytearray(src)
            for pos in rng.integers(0, len(buf), 8):
                buf[pos] = rng.integers(0, 256)
            cut = int(rng.integers(1, len(buf) + 1))
            d = decode(bytes(buf[:cut]), "fuzz")
            assert isinstance(d, Decoded)
            if d.ok:
                assert d.image.dtype == np.float32 and d.image.ndim == 2
                assert np.isfinite(d.image).all() and 0 <= d.image.min() <= d.image.max() <= 1
            else:
                assert d.image is None and isinstance(d.error, str) and "\n" not in d.error
