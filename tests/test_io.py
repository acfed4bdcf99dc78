"""gdp.io on real files: exact round trips, orientation, metadata, conversions, errors, atomicity."""

from __future__ import annotations

import hashlib
import os
import pickle
import struct
import uuid
import zlib

import fsspec
import numpy as np
import pytest
import skimage.data
import torch
from PIL import Image, ImageCms, ImageOps

from gdp import io as gio
from gdp.io import ImageError, list_images, read_image, read_info, relative_path, sha256_of, write_image


@pytest.fixture(scope="module")
def photo() -> np.ndarray:
    """A real RGB photo crop, uint8 [40, 56, 3] (odd-ish, non-square)."""
    return np.ascontiguousarray(skimage.data.astronaut()[100:140, 200:256])


@pytest.fixture(scope="module")
def gray_photo() -> np.ndarray:
    """A real grayscale photo crop, uint8 [37, 31]."""
    return np.ascontiguousarray(skimage.data.camera()[200:237, 240:271])


@pytest.fixture(scope="module")
def srgb_icc() -> bytes:
    return ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()


def _as_uint(pixels: torch.Tensor, top: int) -> np.ndarray:
    """[1, C, H, W] in [0, 1] -> integer [H, W, C] (or [H, W] for C = 1)."""
    array = (pixels[0].permute(1, 2, 0) * top).round().to(torch.int64).numpy()
    return array[..., 0] if array.shape[-1] == 1 else array


def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


# --- round trips ------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["rgb", "gray"])
def test_8bit_png_round_trip_is_exact(tmp_path, photo, gray_photo, kind):
    samples = photo if kind == "rgb" else gray_photo
    source = tmp_path / "in.png"
    Image.fromarray(samples).save(source)

    loaded = read_image(str(source))
    assert loaded.pixels.dtype == torch.float32
    assert loaded.pixels.shape == (1, 3 if kind == "rgb" else 1, *samples.shape[:2])
    assert (loaded.bit_depth, loaded.format, loaded.notes) == (8, "PNG", ())
    assert np.array_equal(_as_uint(loaded.pixels, 255), samples)

    write_image(str(tmp_path / "out.png"), loaded.pixels)
    assert np.array_equal(np.asarray(Image.open(tmp_path / "out.png")), samples)


def test_16bit_gray_png_round_trip_is_exact(tmp_path, gray_photo):
    low_bytes = np.arange(gray_photo.size).reshape(gray_photo.shape) % 251
    samples = (gray_photo.astype(np.uint16) * 257 + low_bytes).astype(np.uint16)
    Image.fromarray(samples).save(tmp_path / "in.png")

    loaded = read_image(str(tmp_path / "in.png"))
    assert loaded.bit_depth == 16 and loaded.pixels.shape == (1, 1, 37, 31)
    assert np.array_equal(_as_uint(loaded.pixels, 65535), samples)

    write_image(str(tmp_path / "out.png"), loaded.pixels, bit_depth=16)
    written = Image.open(tmp_path / "out.png")
    assert written.mode == "I;16" and np.array_equal(np.asarray(written), samples)


def test_16bit_rgb_png_round_trip_is_exact(tmp_path, photo):
    samples = (photo.astype(np.uint16) * 257 + 17).astype(np.uint16)
    pixels = torch.from_numpy(samples.astype(np.float32) / 65535).permute(2, 0, 1)[None]

    write_image(str(tmp_path / "out.png"), pixels, bit_depth=16)
    assert (tmp_path / "out.png").read_bytes()[24:26] == bytes([16, 2])  # IHDR: 16-bit truecolour
    loaded = read_image(str(tmp_path / "out.png"))
    assert loaded.bit_depth == 16 and loaded.notes == ()
    assert np.array_equal(_as_uint(loaded.pixels, 65535), samples)


def _filtered_png16(samples: np.ndarray) -> bytes:
    """uint16 [H, W, C] -> PNG whose rows cycle through all five filter types (test encoder)."""
    height, width, channels = samples.shape
    rows = samples.astype(">u2").reshape(height, -1).view(np.uint8).astype(np.int32)
    bpp = 2 * channels
    scanlines = []
    for y in range(height):
        r, b = rows[y], rows[y - 1] if y else np.zeros_like(rows[0])
        a, c = (np.concatenate([np.zeros(bpp, np.int32), row[:-bpp]]) for row in (r, b))  # left, up-left
        p = a + b - c
        pa, pb, pc = np.abs(p - a), np.abs(p - b), np.abs(p - c)
        paeth = np.where((pa <= pb) & (pa <= pc), a, np.where(pb <= pc, b, c))
        kind = y % 5
        predictor = [0 * r, a, b, (a + b) // 2, paeth][kind]
        scanlines.append(bytes([kind]) + ((r - predictor) % 256).astype(np.uint8).tobytes())
    colour_type = {3: 2, 4: 6}[channels]
    header = struct.pack(">IIBBBBB", width, height, 16, colour_type, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header)
            + _png_chunk(b"IDAT", zlib.compress(b"".join(scanlines))) + _png_chunk(b"IEND", b""))


@pytest.mark.parametrize("channels", [3, 4])
def test_16bit_png_with_every_filter_type_decodes_exactly(tmp_path, photo, channels):
    rng = np.random.default_rng(0)
    samples = rng.integers(0, 65536, (*photo.shape[:2], channels), dtype=np.uint16)
    samples[..., :3] = np.where(rng.random(photo.shape) < 0.5, samples[..., :3], photo.astype(np.uint16) * 257)
    (tmp_path / "f.png").write_bytes(_filtered_png16(samples))

    loaded = read_image(str(tmp_path / "f.png"))
    assert loaded.bit_depth == 16 and loaded.notes == (("dropped alpha channel",) if channels == 4 else ())
    assert np.array_equal(_as_uint(loaded.pixels, 65535), samples[..., :3])


def test_16bit_rgb_tiff_round_trip_is_exact(tmp_path, photo):
    tifffile = pytest.importorskip("tifffile")
    samples = (photo.astype(np.uint16) * 257 + 17).astype(np.uint16)
    pixels = torch.from_numpy(samples.astype(np.float32) / 65535).permute(2, 0, 1)[None]

    write_image(str(tmp_path / "out.tif"), pixels, bit_depth=16)
    assert np.array_equal(tifffile.imread(tmp_path / "out.tif"), samples)
    loaded = read_image(str(tmp_path / "out.tif"))
    assert loaded.bit_depth == 16 and np.array_equal(_as_uint(loaded.pixels, 65535), samples)


def test_16bit_rgb_tiff_without_tifffile_loads_as_8bit_with_a_note(tmp_path, photo, monkeypatch):
    tifffile = pytest.importorskip("tifffile")
    tifffile.imwrite(tmp_path / "deep.tif", (photo.astype(np.uint16) * 257), photometric="rgb")
    monkeypatch.setattr(gio, "_optional", lambda name: None)

    loaded = read_image(str(tmp_path / "deep.tif"))
    assert loaded.bit_depth == 8 and loaded.notes == ("reduced 16-bit colour to 8 bits (Pillow cannot "
                                                      "hold it; install tifffile to keep it)",)
    assert np.array_equal(_as_uint(loaded.pixels, 255), photo)
    assert read_info(str(tmp_path / "deep.tif")).bit_depth == 8
    # writing 16-bit colour TIFF needs no tifffile (gdp.io's own encoder); reading it back does
    deep = torch.from_numpy(photo.astype(np.float32) * 257 / 65535).permute(2, 0, 1)[None]
    write_image(str(tmp_path / "out.tif"), deep, bit_depth=16)
    monkeypatch.undo()
    assert np.array_equal(tifffile.imread(tmp_path / "out.tif"), photo.astype(np.uint16) * 257)


# --- orientation and metadata -----------------------------------------------------------------


def _save_with_orientation(path, samples: np.ndarray, orientation: int) -> None:
    exif = Image.Exif()
    exif[gio.EXIF_ORIENTATION] = orientation
    exif[0x010F] = "gdp-test"  # Make
    Image.fromarray(samples).save(path, exif=exif)


def test_exif_orientation_6_rotates_clockwise(tmp_path, photo):
    _save_with_orientation(tmp_path / "o.png", photo, 6)
    loaded = read_image(str(tmp_path / "o.png"))
    height, width = photo.shape[:2]

    upright = _as_uint(loaded.pixels, 255)
    assert upright.shape == (width, height, 3)
    # orientation 6: the stored image is shown turned 90 degrees clockwise
    assert np.array_equal(upright[0, 0], photo[height - 1, 0])
    assert np.array_equal(upright[0, height - 1], photo[0, 0])
    assert np.array_equal(upright, np.rot90(photo, -1))
    assert "applied EXIF orientation 6" in loaded.notes

    exif = Image.Exif()
    exif.load(loaded.exif)
    assert exif[gio.EXIF_ORIENTATION] == 1 and exif[0x010F] == "gdp-test"
    info = read_info(str(tmp_path / "o.png"))
    assert (info.height, info.width) == (width, height) and info.notes == loaded.notes


@pytest.mark.parametrize("orientation", range(1, 9))
def test_every_orientation_matches_pillow_exif_transpose(tmp_path, photo, orientation):
    _save_with_orientation(tmp_path / "o.png", photo, orientation)
    expected = np.asarray(ImageOps.exif_transpose(Image.open(tmp_path / "o.png")))
    assert np.array_equal(_as_uint(read_image(str(tmp_path / "o.png")).pixels, 255), expected)


@pytest.mark.parametrize("ext", [".png", ".jpg", ".tif", ".webp"])
def test_icc_and_exif_are_carried_and_orientation_reset(tmp_path, photo, srgb_icc, ext):
    exif = Image.Exif()
    exif[gio.EXIF_ORIENTATION] = 6
    exif[0x010F] = "gdp-test"
    pixels = torch.from_numpy(photo).permute(2, 0, 1)[None] / 255.0

    write_image(str(tmp_path / f"out{ext}"), pixels, icc_profile=srgb_icc, exif=exif.tobytes())
    written = Image.open(tmp_path / f"out{ext}")
    assert written.info.get("icc_profile") == srgb_icc
    assert written.getexif()[gio.EXIF_ORIENTATION] == 1 and written.getexif()[0x010F] == "gdp-test"
    assert read_image(str(tmp_path / f"out{ext}")).icc_profile == srgb_icc


def test_icc_and_exif_in_16bit_rgb_png(tmp_path, photo, srgb_icc):
    exif = Image.Exif()
    exif[0x010F] = "gdp-test"
    pixels = torch.from_numpy(photo).permute(2, 0, 1)[None] / 255.0
    write_image(str(tmp_path / "out.png"), pixels, bit_depth=16, icc_profile=srgb_icc, exif=exif.tobytes())
    written = Image.open(tmp_path / "out.png")
    assert written.info["icc_profile"] == srgb_icc and written.getexif()[0x010F] == "gdp-test"


def test_jpeg_read_write_keeps_icc(tmp_path, photo, srgb_icc):
    Image.fromarray(photo).save(tmp_path / "in.jpg", icc_profile=srgb_icc, quality=95)
    loaded = read_image(str(tmp_path / "in.jpg"))
    write_image(str(tmp_path / "out.jpg"), loaded.pixels, icc_profile=loaded.icc_profile, exif=loaded.exif)
    assert loaded.format == "JPEG" and Image.open(tmp_path / "out.jpg").info["icc_profile"] == srgb_icc


# --- resolution (DPI) and EXIF on every format --------------------------------------------------

MAKE, EXIF_IFD, GPS_IFD, DATE_TAKEN, X_RESOLUTION = 0x010F, 0x8769, 0x8825, 0x9003, 0x011A


def _camera_exif() -> Image.Exif:
    """EXIF as a camera writes it: a tag in the first directory, one in the EXIF and one in the GPS one."""
    exif = Image.Exif()
    exif[MAKE] = "gdp-test"
    exif.get_ifd(EXIF_IFD)[DATE_TAKEN] = "2021:06:05 04:03:02"
    exif.get_ifd(GPS_IFD)[1] = "N"  # GPSLatitudeRef
    return exif


def _exif_facts(exif: Image.Exif) -> tuple:
    return exif.get(MAKE), exif.get_ifd(EXIF_IFD).get(DATE_TAKEN), exif.get_ifd(GPS_IFD).get(1)


CAMERA = ("gdp-test", "2021:06:05 04:03:02", "N")


def _save_source(path, samples: np.ndarray, ext: str, dpi: tuple) -> None:
    """A file with DPI and EXIF as another program writes it: Pillow (tiffinfo for TIFF, which keeps
    the EXIF directories), or tifffile / gdp's PNG encoder for 16-bit colour that Pillow cannot hold."""
    exif = _camera_exif()
    if samples.dtype == np.uint16 and samples.ndim == 3:
        if ext == "png":
            path.write_bytes(gio.encode_png16_rgb(samples, exif=exif.tobytes(), dpi=dpi))
        else:
            tifffile = pytest.importorskip("tifffile")
            tags = gio._tiff_tags(exif.tobytes())
            tifffile.imwrite(path, samples, photometric="rgb", resolution=dpi, resolutionunit="INCH",
                             extratags=[(MAKE, "s", 0, "gdp-test", True)])
            assert tags[MAKE] == "gdp-test"
        return
    image = Image.fromarray(samples)
    if ext == "tif":
        image.save(path, tiffinfo=gio._tiff_tags(exif.tobytes()), dpi=dpi)
    elif ext == "bmp":
        image.save(path, dpi=dpi)
    elif ext == "webp":  # WEBP has no DPI field: it lives in the EXIF resolution
        exif[X_RESOLUTION], exif[0x011B], exif[0x0128] = dpi[0], dpi[1], 2
        image.save(path, exif=exif, quality=95)
    else:
        image.save(path, exif=exif, dpi=dpi, **({"quality": 95} if ext == "jpg" else {}))


def _written_dpi(path, ext: str) -> tuple:
    """The DPI a third-party reader (Pillow, tifffile for 16-bit colour TIFF) sees in the written file."""
    with Image.open(path) as im:
        if ext == "webp":
            exif = im.getexif()
            return float(exif[X_RESOLUTION]), float(exif[0x011B])
        return tuple(round(float(v), 2) for v in im.info["dpi"])


FORMATS = [("png", 8, 3), ("png", 16, 1), ("png", 16, 3), ("jpg", 8, 3), ("jpg", 8, 1), ("tif", 8, 3),
           ("tif", 16, 1), ("tif", 16, 3), ("webp", 8, 3), ("bmp", 8, 3)]


@pytest.mark.parametrize("ext, depth, channels", FORMATS)
def test_dpi_and_exif_survive_read_and_write_in_every_format(tmp_path, photo, gray_photo, ext, depth, channels):
    samples = photo if channels == 3 else gray_photo
    samples = samples.astype(np.uint16) * 257 if depth == 16 else samples
    source, out = tmp_path / f"in.{ext}", tmp_path / f"out.{ext}"
    _save_source(source, samples, ext, dpi=(300, 200))

    loaded = read_image(str(source))
    assert loaded.bit_depth == depth and loaded.dpi == (300, 200)
    tiff16_rgb_source = ext == "tif" and depth == 16 and channels == 3  # tifffile writes no EXIF directories
    if ext != "bmp":  # BMP holds no EXIF
        parsed = Image.Exif()
        parsed.load(loaded.exif)
        assert _exif_facts(parsed) == (("gdp-test", None, None) if tiff16_rgb_source else CAMERA)

    write_image(str(out), loaded.pixels, bit_depth=depth, exif=_camera_exif().tobytes(), dpi=loaded.dpi)
    assert np.allclose(_written_dpi(out, ext), (300, 200), atol=0.01)  # PNG, BMP: pixels per metre
    again = read_image(str(out))
    assert again.dpi == (300, 200) and again.bit_depth == depth
    if ext != "bmp":
        with Image.open(out) as im:  # a third-party reader finds all three EXIF tags
            assert _exif_facts(im.getexif()) == CAMERA
        parsed = Image.Exif()
        parsed.load(again.exif)
        assert _exif_facts(parsed) == CAMERA
    if ext not in ("jpg", "webp"):  # lossless formats
        assert np.array_equal(_as_uint(again.pixels, 65535 if depth == 16 else 255), samples)


def test_16bit_rgb_tiff_carries_icc_exif_and_resolution_readable_by_tifffile(tmp_path, photo, srgb_icc):
    tifffile = pytest.importorskip("tifffile")
    samples = photo.astype(np.uint16) * 257 + 3
    pixels = torch.from_numpy(samples.astype(np.float32) / 65535).permute(2, 0, 1)[None]
    write_image(str(tmp_path / "out.tif"), pixels, bit_depth=16, icc_profile=srgb_icc,
                exif=_camera_exif().tobytes(), dpi=(600, 600))
    with tifffile.TiffFile(tmp_path / "out.tif") as tif:
        page = tif.pages[0]
        assert np.array_equal(page.asarray(), samples)
        assert page.tags["XResolution"].value == (600, 1) and page.tags["ResolutionUnit"].value == 2
        assert page.tags["Make"].value == "gdp-test"
        assert page.tags["ExifTag"].value["DateTimeOriginal"] == "2021:06:05 04:03:02"
        assert page.tags["InterColorProfile"].value == srgb_icc
    assert read_image(str(tmp_path / "out.tif")).icc_profile == srgb_icc


def test_dpi_follows_orientation_and_resizing(tmp_path, photo):
    exif = Image.Exif()
    exif[gio.EXIF_ORIENTATION] = 6  # turned 90 degrees: x and y resolution swap
    Image.fromarray(photo).save(tmp_path / "o.png", exif=exif, dpi=(300, 200))
    loaded = read_image(str(tmp_path / "o.png"))
    assert loaded.dpi == (200, 300)
    height, width = loaded.pixels.shape[-2:]
    # x4 super-resolution keeps the print size: 4x the pixels on the same inches
    assert loaded.dpi_for(4 * width, 4 * height) == (800, 1200)
    assert loaded.dpi_for(width, height) == (200, 300)
    Image.fromarray(photo).save(tmp_path / "plain.png")
    assert read_image(str(tmp_path / "plain.png")).dpi is None
    assert read_image(str(tmp_path / "plain.png")).dpi_for(8, 8) is None


def test_exif_resolution_is_made_to_agree_with_the_dpi_written(tmp_path, photo):
    """A camera JPEG's EXIF says 72 dpi like its JFIF header; after x4 super-resolution both say 288."""
    exif = _camera_exif()
    exif[X_RESOLUTION], exif[0x011B], exif[0x0128] = 72, 72, 2
    Image.fromarray(photo).save(tmp_path / "in.jpg", exif=exif, dpi=(72, 72), quality=95)
    loaded = read_image(str(tmp_path / "in.jpg"))
    big = torch.nn.functional.interpolate(loaded.pixels, scale_factor=4, mode="nearest")
    write_image(str(tmp_path / "out.jpg"), big, exif=loaded.exif, dpi=loaded.dpi_for(*big.shape[-1:-3:-1]))
    with Image.open(tmp_path / "out.jpg") as im:
        written = im.getexif()
        assert im.info["dpi"] == (288, 288) and float(written[X_RESOLUTION]) == 288.0
        assert _exif_facts(written) == CAMERA
    # unchanged EXIF is carried byte for byte (re-serialising can lose maker notes)
    write_image(str(tmp_path / "same.jpg"), loaded.pixels, exif=loaded.exif, dpi=loaded.dpi)
    assert Image.open(tmp_path / "same.jpg").info["exif"] == loaded.exif


@pytest.mark.parametrize("payload", [b"Exif\x00\x00XX*\x00\x08\x00\x00\x00", b"Exif\x00\x00" + bytes(range(256))])
def test_undecodable_exif_is_dropped_with_a_note(tmp_path, photo, payload):
    buffer = __import__("io").BytesIO()
    Image.fromarray(photo).save(buffer, format="JPEG", quality=95, dpi=(300, 300))
    data = buffer.getvalue()
    app1 = b"\xff\xe1" + struct.pack(">H", len(payload) + 2) + payload
    (tmp_path / "bad.jpg").write_bytes(data[:2] + app1 + data[2:])

    loaded = read_image(str(tmp_path / "bad.jpg"))
    assert loaded.exif is None and loaded.dpi == (300, 300)
    assert [n for n in loaded.notes if n.startswith("dropped undecodable EXIF")]
    assert read_info(str(tmp_path / "bad.jpg")).notes == loaded.notes
    assert np.abs(_as_uint(loaded.pixels, 255).astype(int) - photo).mean() < 3
    write_image(str(tmp_path / "out.jpg"), loaded.pixels, exif=loaded.exif, dpi=loaded.dpi)
    assert "exif" not in Image.open(tmp_path / "out.jpg").info


def test_check_writable_refuses_before_any_work(tmp_path):
    (tmp_path / "file").write_text("x")
    (tmp_path / "folder.png").mkdir()
    gio.check_writable(str(tmp_path / "new" / "deeper" / "out.png"))  # folders are created on write
    gio.check_writable(str(tmp_path / "out.tif"), bit_depth=16)
    with pytest.raises(ImageError, match=r"file/out.png: cannot create it: .*file is a file, not a folder"):
        gio.check_writable(str(tmp_path / "file" / "out.png"))
    with pytest.raises(ImageError, match="cannot create it"):
        gio.check_writable(str(tmp_path / "file" / "sub" / "out.png"))
    with pytest.raises(ImageError, match="is a directory"):
        gio.check_writable(str(tmp_path / "folder.png"))
    with pytest.raises(ValueError, match="unknown image format"):
        gio.check_writable(str(tmp_path / "out.xyz"))
    with pytest.raises(ValueError, match="bit_depth 16 is not possible for JPEG"):
        gio.check_writable(str(tmp_path / "out.jpg"), bit_depth=16)
    gio.check_writable("memory://anywhere/out.png")  # object stores: only the format is checked
    assert not (tmp_path / "new").exists()


# --- mode conversions -------------------------------------------------------------------------


def test_mode_conversions_are_noted(tmp_path, photo):
    rgb = Image.fromarray(photo)
    rgba = rgb.copy()
    rgba.putalpha(Image.fromarray(np.full(photo.shape[:2], 7, np.uint8)))
    cases = {
        "cmyk.jpg": (rgb.convert("CMYK"), 3, ("converted CMYK to RGB",)),
        "palette.png": (rgb.quantize(32), 3, ("converted palette to RGB",)),
        "graypal.png": (rgb.convert("L").convert("P"), 1, ("converted palette to grayscale",)),
        "rgba.png": (rgba, 3, ("dropped alpha channel",)),
        "la.png": (rgb.convert("LA"), 1, ("dropped alpha channel",)),
        "bits.png": (rgb.convert("1"), 1, ("converted 1-bit to grayscale",)),
    }
    for name, (image, channels, notes) in cases.items():
        image.save(tmp_path / name)
        loaded, info = read_image(str(tmp_path / name)), read_info(str(tmp_path / name))
        assert loaded.pixels.shape == (1, channels, *photo.shape[:2]), name
        assert loaded.notes == notes == info.notes, name
        assert (info.channels, info.mode) == (channels, image.mode), name
    rgba_loaded = read_image(str(tmp_path / "rgba.png"))
    assert np.array_equal(_as_uint(rgba_loaded.pixels, 255), photo)  # colour kept, alpha dropped
    palette = read_image(str(tmp_path / "palette.png"))
    assert np.array_equal(_as_uint(palette.pixels, 255), np.asarray(rgb.quantize(32).convert("RGB")))


def test_cmyk_with_an_unusable_icc_profile_drops_it(tmp_path, photo, srgb_icc):
    Image.fromarray(photo).convert("CMYK").save(tmp_path / "c.jpg", icc_profile=srgb_icc)
    loaded = read_image(str(tmp_path / "c.jpg"))
    assert loaded.icc_profile is None and "dropped an unusable CMYK ICC profile" in loaded.notes


def test_float_images_are_rejected_and_32bit_integers_clipped(tmp_path):
    Image.fromarray(np.zeros((4, 5), np.float32)).save(tmp_path / "f.tif")
    with pytest.raises(ImageError, match="f.tif: 32-bit float"):
        read_image(str(tmp_path / "f.tif"))
    Image.fromarray(np.array([[0, 65535, 70000]], np.int32)).save(tmp_path / "i.tif")
    loaded = read_image(str(tmp_path / "i.tif"))
    assert loaded.pixels.flatten().tolist() == [0.0, 1.0, 1.0] and "clipped" in loaded.notes[-1]


# --- errors -----------------------------------------------------------------------------------


def _bad_files(tmp_path, photo) -> dict[str, tuple[str, str]]:
    """name -> (path, expected problem) for each kind of unreadable file."""
    big = np.tile(photo, (4, 4, 1))
    Image.fromarray(big).save(tmp_path / "good.png")
    Image.fromarray(big).save(tmp_path / "good.jpg")
    png, jpg = (tmp_path / "good.png").read_bytes(), (tmp_path / "good.jpg").read_bytes()
    broken = bytearray(png)
    broken[len(png) // 2:len(png) // 2 + 64] = bytes(64)
    header = struct.pack(">IIBBBBB", 30000, 30000, 8, 2, 0, 0, 0)
    files = {
        "cut.png": (png[: len(png) // 2], "truncated file"),
        "cut.jpg": (jpg[: len(jpg) // 2], "truncated file"),
        "broken.png": (bytes(broken), "corrupt"),
        "empty.png": (b"", "empty file (0 bytes)"),
        "text.png": (b"hello, not an image\n", "not an image (cannot identify image file)"),
        "bomb.png": (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header) + _png_chunk(b"IEND", b""),
                     "decompression bomb"),
    }
    for name, (data, _) in files.items():
        (tmp_path / name).write_bytes(data)
    return {name: (str(tmp_path / name), problem) for name, (_, problem) in files.items()}


def test_unreadable_files_raise_one_line_image_errors(tmp_path, photo):
    cases = _bad_files(tmp_path, photo)
    cases["missing.png"] = (str(tmp_path / "missing.png"), "no such file")
    for name, (path, problem) in cases.items():
        with pytest.raises(ImageError) as caught:
            read_image(path)
        message = str(caught.value)
        assert name in message and problem in message and "\n" not in message, message


def test_max_pixels_limits_decoding(tmp_path, photo):
    Image.fromarray(photo).save(tmp_path / "p.png")
    with pytest.raises(ImageError, match=r"p.png: 56x40 exceeds the limit of 1000 pixels \(decompression"):
        read_image(str(tmp_path / "p.png"), max_pixels=1000)
    with pytest.raises(ImageError, match="decompression bomb"):
        read_info(str(tmp_path / "p.png"), max_pixels=1000)


def test_image_error_pickles():
    error = pickle.loads(pickle.dumps(ImageError("s3://b/a.png", "truncated\nfile")))
    assert str(error) == "s3://b/a.png: truncated file" and error.uri == "s3://b/a.png"


def test_read_info_reads_headers_only(tmp_path, photo):
    cases = _bad_files(tmp_path, photo)
    for name in ("cut.png", "cut.jpg"):  # pixels missing, header intact: no decoding happened
        info = read_info(cases[name][0])
        assert (info.width, info.height, info.channels, info.bit_depth) == (224, 160, 3, 8)
    good = read_image(str(tmp_path / "good.png")).pixels
    info = read_info(str(tmp_path / "good.png"))
    assert (1, info.channels, info.height, info.width) == tuple(good.shape)
    for name in ("empty.png", "text.png", "bomb.png"):
        with pytest.raises(ImageError, match=name):
            read_info(cases[name][0])


def test_to_tensor_rejects_unconverted_modes():
    with pytest.raises(ValueError, match="convert the image first"):
        gio.to_tensor(Image.new("CMYK", (2, 2)))


# --- writing ----------------------------------------------------------------------------------


def test_atomic_write_leaves_no_temporary_files(tmp_path, photo):
    pixels = torch.from_numpy(photo).permute(2, 0, 1)[None] / 255.0
    write_image(str(tmp_path / "sub" / "out.png"), pixels)
    write_image(str(tmp_path / "sub" / "out.png"), pixels * 0.5)  # replaces the file
    assert os.listdir(tmp_path / "sub") == ["out.png"]
    halved = np.round(photo * 0.5).astype(np.uint8)
    assert np.array_equal(np.asarray(Image.open(tmp_path / "sub" / "out.png")), halved)


def test_failed_write_keeps_the_old_file(tmp_path, photo, monkeypatch):
    target = tmp_path / "out.png"
    target.write_bytes(b"previous")
    pixels = torch.from_numpy(photo).permute(2, 0, 1)[None] / 255.0
    with pytest.raises(ValueError, match="NaN"):
        write_image(str(target), pixels * float("nan"))

    def failing_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(OSError, match="disk full"):
        write_image(str(target), pixels)
    assert target.read_bytes() == b"previous" and os.listdir(tmp_path) == ["out.png"]


def test_write_refuses_to_overwrite_the_input(tmp_path, photo):
    Image.fromarray(photo).save(tmp_path / "in.png")
    (tmp_path / "link.png").symlink_to(tmp_path / "in.png")
    pixels = torch.zeros(1, 3, 4, 4)
    for target in ("in.png", "link.png", "./in.png"):
        with pytest.raises(ImageError, match="refusing to overwrite the input"):
            write_image(os.path.join(tmp_path, target), pixels, protect=str(tmp_path / "in.png"))
    write_image(str(tmp_path / "out.png"), pixels, protect=str(tmp_path / "in.png"))
    assert np.array_equal(np.asarray(Image.open(tmp_path / "in.png")), photo)


def test_write_rejects_bad_arguments(tmp_path):
    pixels = torch.zeros(1, 3, 4, 4)
    with pytest.raises(ValueError, match="unknown image format"):
        write_image(str(tmp_path / "x.gif"), pixels)
    with pytest.raises(ValueError, match="bit_depth 16 is not possible for JPEG"):
        write_image(str(tmp_path / "x.jpg"), pixels, bit_depth=16)
    with pytest.raises(ValueError, match="C = 1 or 3"):
        write_image(str(tmp_path / "x.png"), torch.zeros(1, 4, 4, 4))
    assert os.listdir(tmp_path) == []


def test_quantisation_rounds_and_clamps(tmp_path):
    pixels = torch.tensor([[-0.5, 0.0, 0.4 / 255, 0.6 / 255, 1.0, 7.0]]).reshape(1, 1, 1, 6)
    write_image(str(tmp_path / "q.png"), pixels)
    assert np.asarray(Image.open(tmp_path / "q.png")).tolist() == [[0, 0, 0, 1, 255, 255]]


# --- fsspec: memory://, listing, paths, hashing ----------------------------------------------


def test_memory_url_round_trip(photo):
    root = f"memory://gdp-test-{uuid.uuid4().hex}"
    pixels = torch.from_numpy(photo).permute(2, 0, 1)[None] / 255.0
    try:
        write_image(f"{root}/a/out.png", pixels)
        assert np.array_equal(_as_uint(read_image(f"{root}/a/out.png").pixels, 255), photo)
        assert read_info(f"{root}/a/out.png").width == photo.shape[1]
        stored = fsspec.filesystem("memory").cat_file(f"{root}/a/out.png")
        assert sha256_of(f"{root}/a/out.png") == hashlib.sha256(stored).hexdigest()
        assert list_images(root) == [f"{root.replace('memory://', 'memory:///')}/a/out.png"]
        with pytest.raises(ImageError, match="out.png: refusing"):
            write_image(f"{root}/a/out.png", pixels, protect=f"{root}/a/out.png")
    finally:
        fsspec.filesystem("memory").rm(root.removeprefix("memory://"), recursive=True)


def test_list_images_filters_and_sorts(tmp_path):
    for name in ["b.PNG", "a/z.jpeg", "a/y.Tif", "c.webp", "notes.txt", "a/deep/x.bmp", "a/.x.png.tmp-1"]:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "folder.png").mkdir()
    expected = [str(tmp_path / n) for n in ["a/deep/x.bmp", "a/y.Tif", "a/z.jpeg", "b.PNG", "c.webp"]]
    assert list_images(str(tmp_path)) == expected
    assert list_images(str(tmp_path), pattern="*") == [str(tmp_path / "b.PNG"), str(tmp_path / "c.webp")]
    assert list_images(str(tmp_path / "c.webp")) == [str(tmp_path / "c.webp")]


def test_relative_path():
    assert relative_path("s3://bucket/in/", "s3://bucket/in/a/b.png") == "a/b.png"
    assert relative_path("/data/in", "/data/in/x.jpg") == "x.jpg"
    with pytest.raises(ValueError, match="is not inside"):
        relative_path("s3://bucket/in", "s3://bucket/inside/x.png")
    with pytest.raises(ValueError, match="is not inside"):
        relative_path("/data/in", "s3://data/in/x.png")


def test_sha256_of_streams_the_file(tmp_path):
    data = os.urandom(3 * (1 << 20) + 5)
    (tmp_path / "f.bin").write_bytes(data)
    assert sha256_of(str(tmp_path / "f.bin")) == hashlib.sha256(data).hexdigest()
    with pytest.raises(ImageError, match="nothing.png: no such file"):
        sha256_of(str(tmp_path / "nothing.png"))
