"""Image decode/encode over fsspec URLs: 8/16-bit, EXIF orientation, ICC, EXIF, DPI, atomic writes.

This is the one module that converts between stored pixels and tensors. Every tensor that crosses
it is float32 in [0, 1], shaped [1, C, H, W] with C = 3 (RGB) or C = 1 (grayscale); 8-bit values
map as v / 255 and 16-bit values as v / 65535, so writing back what was read is exact.

Pillow (this version) holds 16-bit samples only for grayscale (mode I;16): it reduces 48-bit RGB
PNGs and 16-bit RGB TIFFs to 8 bits. 16-bit colour PNGs are therefore decoded by Pillow twice, once
for the high and once for the low byte of every sample; 16-bit colour TIFFs go through tifffile
when it is importable. Both are written by small encoders here (PNG, and TIFF on Pillow's tag
writer), which carry ICC, EXIF and DPI like Pillow's own encoders do for the other formats.

Metadata: ICC profiles, EXIF (orientation reset to 1; from a TIFF, its descriptive tags and EXIF/GPS
sub-directories) and the resolution in DPI (PNG pHYs, JPEG JFIF density or EXIF, TIFF and BMP
resolution) are read and written back wherever the format can hold them. WEBP has no DPI field: its
DPI goes into the EXIF resolution tags. EXIF that cannot be decoded is dropped, with a note.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib
import io
import os
import posixpath
import re
import struct
import uuid
import warnings
import zlib
from dataclasses import dataclass, replace
from types import ModuleType
from typing import Any, BinaryIO, Iterator

import fsspec
import numpy as np
import torch
from fsspec.implementations.local import LocalFileSystem
from PIL import Image, ImageCms, ImageFile, UnidentifiedImageError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".webp")
DEFAULT_MAX_PIXELS = 178_956_970  # Pillow's own hard limit at its default settings
EXIF_ORIENTATION = 0x0112

_FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".tif": "TIFF", ".tiff": "TIFF",
            ".bmp": "BMP", ".webp": "WEBP"}
_SIXTEEN_BIT_FORMATS = frozenset({"PNG", "TIFF"})
_GRAY16_MODES = frozenset({"I;16", "I;16B", "I;16L", "I;16N", "I"})
_ALPHA_MODES = frozenset({"RGBA", "RGBa", "LA", "La", "PA"})
_GRAY_MODES = frozenset({"1", "L", "LA", "La"}) | _GRAY16_MODES
# Errors a decoder raises on bad bytes. Only used around decoding of bytes already in memory, so
# an OSError here cannot be a transient network failure that should rather be retried.
_DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, IndexError, struct.error, zlib.error,
                  Image.DecompressionBombError)
_CHUNK = 1 << 20
_PNG16_LOW_BYTES = {"RGB;16B": "RGB;16L", "RGBA;16B": "RGBA;16L"}  # see _decode_png16


class ImageError(ValueError):
    """A file that cannot be read or written as an image; str() is one line: '<uri>: <problem>'."""

    def __init__(self, uri: str, problem: str) -> None:
        super().__init__(str(uri), " ".join(str(problem).split()))  # args keep it picklable

    @property
    def uri(self) -> str:
        return self.args[0]

    @property
    def problem(self) -> str:
        return self.args[1]

    def __str__(self) -> str:
        return f"{self.uri}: {self.problem}"


@dataclass(frozen=True)
class ImageInfo:
    """What `read_image` will return, read from the header only (sizes after EXIF orientation)."""

    uri: str
    width: int
    height: int
    mode: str  # Pillow mode of the stored image, e.g. "RGB", "P", "I;16", "CMYK"
    bit_depth: int  # 8 or 16: the depth `read_image` will keep
    channels: int  # 1 or 3 after conversion
    has_alpha: bool
    notes: tuple[str, ...]  # conversions `read_image` will do


@dataclass(frozen=True)
class LoadedImage:
    """A decoded image: pixels [1, C, H, W] float32 in [0, 1], upright, with its metadata."""

    pixels: torch.Tensor
    bit_depth: int
    icc_profile: bytes | None
    exif: bytes | None  # orientation tag reset to 1 (pixels are already upright)
    format: str
    notes: tuple[str, ...]
    dpi: tuple[float, float] | None = None  # pixels per inch (x, y) of the upright pixels, if stored

    def dpi_for(self, width: int, height: int) -> tuple[float, float] | None:
        """The DPI that gives a width x height image of these pixels the same print size (x k after
        x k super-resolution, so a restored scan prints as large as its original)."""
        if self.dpi is None:
            return None
        return (self.dpi[0] * width / self.pixels.shape[-1], self.dpi[1] * height / self.pixels.shape[-2])


@dataclass(frozen=True)
class _Plan:
    """How a header will be decoded: shared by `read_info` and `read_image`."""

    channels: int
    bit_depth: int
    has_alpha: bool
    decoder: str  # "pillow", "png16" (two-pass Pillow) or "tifffile"
    orientation: int
    notes: tuple[str, ...]


# ----------------------------------------------------------------------------------------------
# Reading


def read_info(uri: str | os.PathLike[str], *, max_pixels: int = DEFAULT_MAX_PIXELS,
              **storage_options: Any) -> ImageInfo:
    """Size, mode and planned conversions of an image, from its header (pixels are not decoded)."""
    uri = os.fspath(uri)
    with _open_file(uri, storage_options) as f, _open_pil(uri, f, max_pixels) as im:
        plan = _plan(uri, im, *_exif_of(im))
        (width, height), mode = im.size, im.mode
    if plan.orientation in (5, 6, 7, 8):
        width, height = height, width
    return ImageInfo(uri=uri, width=width, height=height, mode=mode, bit_depth=plan.bit_depth,
                     channels=plan.channels, has_alpha=plan.has_alpha, notes=plan.notes)


def read_image(uri: str | os.PathLike[str], *, max_pixels: int = DEFAULT_MAX_PIXELS,
               **storage_options: Any) -> LoadedImage:
    """Decode an image from any fsspec URL into [1, C, H, W] float32 in [0, 1], upright.

    Raises ImageError (one line, naming the file) for missing, empty, corrupt, truncated or
    oversized files (more than `max_pixels` pixels). `max_pixels` above twice
    `PIL.Image.MAX_IMAGE_PIXELS` also needs that global raised, since Pillow checks it itself.
    """
    uri = os.fspath(uri)
    if ImageFile.LOAD_TRUNCATED_IMAGES:
        raise RuntimeError("PIL.ImageFile.LOAD_TRUNCATED_IMAGES is True, so truncated files would "
                           "load silently; set it back to False before reading images")
    with _open_file(uri, storage_options) as f:
        data = f.read()
    try:
        with _open_pil(uri, io.BytesIO(data), max_pixels) as im:
            return _decode(uri, im, data)
    except ImageError:
        raise
    except _DECODE_ERRORS as e:
        raise ImageError(uri, _describe(e)) from e


def to_tensor(image: Image.Image) -> torch.Tensor:
    """PIL image in mode L, RGB, I;16* or I -> [1, C, H, W] float32 in [0, 1].

    8-bit values are divided by 255 and 16-bit values by 65535 (mode I is clipped to 0..65535).
    """
    if image.mode in ("L", "RGB"):
        scale = 255.0
    elif image.mode in _GRAY16_MODES:
        scale = 65535.0
    else:
        raise ValueError(f"to_tensor expects mode L, RGB, I;16 or I, got {image.mode}; "
                         "convert the image first (read_image does this)")
    array = np.asarray(image)
    if image.mode == "I":
        array = np.clip(array, 0, 65535)
    return _array_to_tensor(array.astype(np.float32), scale)


def _array_to_tensor(array: np.ndarray, scale: float) -> torch.Tensor:
    """[H, W] or [H, W, C] samples -> [1, C, H, W] float32 divided by `scale`."""
    tensor = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32)) / scale
    tensor = tensor[None] if tensor.ndim == 2 else tensor.permute(2, 0, 1)
    return tensor[None].contiguous()


@contextlib.contextmanager
def _open_file(uri: str, storage_options: dict[str, Any]) -> Iterator[BinaryIO]:
    """fsspec.open for reading, with missing files and directories reported as ImageError."""
    try:
        f = fsspec.open(uri, "rb", **storage_options).open()
    except FileNotFoundError as e:
        raise ImageError(uri, "no such file") from e
    except IsADirectoryError as e:
        raise ImageError(uri, "is a directory, not a file") from e
    except PermissionError as e:  # a local mode, or S3's AccessDenied
        raise _denied(uri, e) from e
    with f:
        try:
            yield f
        except PermissionError as e:  # on the first read: S3's InvalidObjectState (an archived object)
            raise _denied(uri, e) from e


def _denied(uri: str, e: PermissionError) -> ImageError:
    detail = "" if e.errno is not None else " ".join(str(e).split())
    return ImageError(uri, "cannot read it: permission denied" + (f" ({detail})" if detail else ""))


@contextlib.contextmanager
def _open_pil(uri: str, f: BinaryIO, max_pixels: int) -> Iterator[Image.Image]:
    """Image.open with the header checked against `max_pixels`; errors become ImageError."""
    try:
        with warnings.catch_warnings():
            # Pillow warns above half its hard limit; this module applies `max_pixels` instead.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(f)
    except UnidentifiedImageError as e:
        raise ImageError(uri, _unidentified(f)) from e
    except Image.DecompressionBombError as e:
        found = re.search(r"\((\d+) pixels\)", str(e))
        size = f"{found.group(1)} pixels" if found else "the image"
        raise ImageError(uri, f"{size} exceeds Pillow's limit of {2 * Image.MAX_IMAGE_PIXELS} "
                              "pixels (decompression bomb)") from e
    except (SyntaxError, EOFError, ValueError, struct.error) as e:
        raise ImageError(uri, f"corrupt file ({e})") from e
    except OSError as e:
        if type(e) is not OSError or e.errno is not None:  # the storage's error, not the header's (Pillow
            raise  # raises plain OSErrors without errno; s3fs gives S3's errors a subclass or an errno)
        raise ImageError(uri, "truncated file" if "truncated" in str(e).lower() else f"corrupt file ({e})") from e
    with im:
        width, height = im.size
        if width * height > max_pixels:
            raise ImageError(uri, f"{width}x{height} exceeds the limit of {max_pixels} pixels "
                                  "(decompression bomb)")
        yield im


def _unidentified(f: BinaryIO) -> str:
    f.seek(0, io.SEEK_END)
    return "empty file (0 bytes)" if f.tell() == 0 else "not an image (cannot identify image file)"


def _describe(e: BaseException) -> str:
    """One-line problem description for a decoder error."""
    message = " ".join(str(e).split()) or type(e).__name__
    if "truncated" in message.lower():
        return "truncated file"
    return f"corrupt or unsupported image data ({message})"


def _plan(uri: str, im: Image.Image, exif: Image.Exif, exif_problem: str = "") -> _Plan:
    """Decide channels, bit depth, decoder and notes from the header of `im`."""
    mode = im.mode
    if mode == "F":
        raise ImageError(uri, "32-bit float pixels are not supported (their range is unknown); "
                              "convert the file to 16-bit integers")
    has_alpha = mode in _ALPHA_MODES or (mode == "P" and "transparency" in im.info)
    gray = mode in _GRAY_MODES or _rawmode(im).startswith("LA;")  # 16-bit LA PNGs open as RGBA
    channels = 1 if gray or (mode in ("P", "PA") and _gray_palette(im)) else 3
    notes: list[str] = []
    bit_depth, decoder = _depth_and_decoder(im, channels, notes)
    if has_alpha:
        notes.append("dropped alpha channel")
    notes.extend(_mode_notes(mode, channels))
    if getattr(im, "n_frames", 1) > 1:
        notes.append(f"used the first of {im.n_frames} frames")
    orientation = _orientation(exif)
    if orientation != 1:
        notes.append(f"applied EXIF orientation {orientation}")
    if exif_problem:
        notes.append(f"dropped undecodable EXIF ({exif_problem})")
    return _Plan(channels, bit_depth, has_alpha, decoder, orientation, tuple(notes))


def _depth_and_decoder(im: Image.Image, channels: int, notes: list[str]) -> tuple[int, str]:
    if im.mode in _GRAY16_MODES:
        return 16, "pillow"
    if _bits_per_sample(im) <= 8:
        return 8, "pillow"
    if im.format == "PNG" and _rawmode(im) in _PNG16_LOW_BYTES:
        return 16, "png16"
    tiff_rgb = im.format == "TIFF" and im.mode in ("RGB", "RGBA")
    if tiff_rgb and _optional("tifffile") is not None:
        return 16, "tifffile"
    advice = "; install tifffile to keep it" if tiff_rgb else ""
    notes.append(f"reduced 16-bit {'gray' if channels == 1 else 'colour'} to 8 bits "
                 f"(Pillow cannot hold it{advice})")
    return 8, "pillow"


def _bits_per_sample(im: Image.Image) -> int:
    """Bits per stored sample, from TIFF tags or the decoder's raw mode (e.g. 'RGB;16B')."""
    if im.format == "TIFF":
        bits = im.tag_v2.get(258, 8)
        return max(bits) if isinstance(bits, tuple) else int(bits)
    return 16 if ";16" in _rawmode(im) else 8


def _rawmode(im: Image.Image) -> str:
    """The decoder's raw mode before loading, e.g. 'RGB;16B' for a 48-bit PNG ('' if unknown)."""
    if not im.tile:
        return ""
    args = im.tile[0].args
    rawmode = args if isinstance(args, str) else (args[0] if args else "")
    return rawmode if isinstance(rawmode, str) else ""


def _mode_notes(mode: str, channels: int) -> list[str]:
    if mode in ("RGB", "L", "RGBA", "LA") or mode in _GRAY16_MODES:
        return []
    if mode == "1":
        return ["converted 1-bit to grayscale"]
    if mode in ("P", "PA"):
        return ["converted palette to grayscale" if channels == 1 else "converted palette to RGB"]
    return [f"converted {mode} to RGB"]


def _gray_palette(im: Image.Image) -> bool:
    palette = im.getpalette("RGB") or []
    return all(palette[i] == palette[i + 1] == palette[i + 2] for i in range(0, len(palette), 3))


def _orientation(exif: Image.Exif) -> int:
    value = exif.get(EXIF_ORIENTATION, 1)
    return value if isinstance(value, int) and 1 <= value <= 8 else 1


def _decode(uri: str, im: Image.Image, data: bytes) -> LoadedImage:
    """Decode the opened image `im` (whose bytes are `data`) following its plan."""
    exif, exif_problem = _exif_of(im)
    plan, rawmode = _plan(uri, im, exif, exif_problem), _rawmode(im)
    extra_notes: list[str] = []
    icc = im.info.get("icc_profile") or None
    if plan.decoder == "tifffile":
        pixels = _decode_tiff16(data, plan.channels)
    else:
        im.load()  # raises on truncated data (LOAD_TRUNCATED_IMAGES is False)
        plan = _late_orientation(plan, im)
        if plan.decoder == "png16":
            pixels = _decode_png16(np.asarray(im), data, rawmode, plan.channels)
        else:
            converted, icc = _to_supported_mode(im, plan.channels, icc, extra_notes)
            pixels = to_tensor(converted)
    if im.format == "PNG" and not exif_problem:  # an eXIf chunk after the pixels is seen only now
        exif, exif_problem = _exif_of(im)
        if exif_problem:
            extra_notes.append(f"dropped undecodable EXIF ({exif_problem})")
    return LoadedImage(pixels=_apply_orientation(pixels, plan.orientation),
                       bit_depth=plan.bit_depth, icc_profile=icc,
                       exif=None if exif_problem else _exif_bytes(im, exif), format=im.format or "",
                       notes=(*plan.notes, *extra_notes), dpi=_dpi_of(im, exif, plan.orientation))


def _exif_of(im: Image.Image) -> tuple[Image.Exif, str]:
    """(EXIF known so far, "") without decoding pixels (PngImageFile.getexif would decode them),
    or (empty EXIF, the problem) when it cannot be decoded: the image is still read, without it."""
    exif = Image.Exif()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Pillow warns about (and skips) broken tags itself
            if im.format != "PNG":
                exif = im.getexif()
            elif im.info.get("exif"):
                exif.load(im.info["exif"])
            if im.info.get("exif"):  # what will be written back must parse as well
                Image.Exif().load(im.info["exif"])
    except _DECODE_ERRORS as e:
        return Image.Exif(), " ".join(str(e).split())[:120] or type(e).__name__
    return exif, ""


# TIFF tags not carried as EXIF: those of the stored pixels (written anew for every image; resolution
# and ICC travel as `dpi` and `icc_profile`), the orientation (pixels are upright) and XMP
_TIFF_NOT_EXIF = frozenset({254, 255, 256, 257, 258, 259, 262, 263, 266, 269, 273, 274, 277, 278, 279,
                                  280, 281, 282, 283, 284, 290, 291, 296, 297, 317, 318, 319, 320, 321, 322,
                                  323, 324, 325, 338, 339, 340, 341, 347, 529, 530, 531, 532, 700, 34675})
_EXIF_SUB_IFDS = (0x8769, 0x8825)  # the EXIF and GPS directories
_EXIF_INTEROP = 0xA005  # inside the EXIF directory


def _exif_bytes(im: Image.Image, exif: Image.Exif) -> bytes | None:
    """The EXIF to carry over, as bytes, with the orientation tag set to 1."""
    if im.format != "TIFF":
        return _upright_exif(im.info.get("exif"))
    picture = Image.Exif()  # a TIFF's EXIF is its first directory's descriptive tags and sub-directories
    for tag, value in exif.items():
        if tag not in _TIFF_NOT_EXIF and tag not in _EXIF_SUB_IFDS:
            picture[tag] = value
    for tag in _EXIF_SUB_IFDS:
        if tag in exif and exif.get_ifd(tag):
            picture[tag] = dict(exif.get_ifd(tag))
            if _EXIF_INTEROP in picture[tag]:  # an offset into the source file: carry the directory itself
                picture[tag][_EXIF_INTEROP] = dict(exif.get_ifd(_EXIF_INTEROP))
    return picture.tobytes() if len(picture) else None


def _dpi_of(im: Image.Image, exif: Image.Exif, orientation: int) -> tuple[float, float] | None:
    """Pixels per inch (x, y) as stored (PNG pHYs in pixels per metre, JPEG JFIF, TIFF and BMP
    resolution, else the EXIF resolution in inches or cm), for the upright pixels; values within
    0.01 of a whole number are taken as that number (300 dpi comes back from a PNG as 299.9994)."""
    per_inch = {2: 1.0, 3: 2.54}.get(exif.get(_RESOLUTION_TAGS[2], 2))
    try:
        if "dpi" in im.info:
            x, y = (float(v) for v in im.info["dpi"])
        else:
            x, y = (float(exif[tag]) * per_inch for tag in _RESOLUTION_TAGS[:2])
    except (KeyError, TypeError, ValueError, ZeroDivisionError):
        return None
    if not (0 < x < float("inf") and 0 < y < float("inf")):
        return None
    x, y = (round(v) if abs(v - round(v)) < 0.01 else v for v in (x, y))
    return (y, x) if orientation in (5, 6, 7, 8) else (x, y)


def _late_orientation(plan: _Plan, im: Image.Image) -> _Plan:
    """Account for an eXIf chunk that a PNG stores after its pixels (seen only after load)."""
    orientation = _orientation(_exif_of(im)[0])
    if orientation == plan.orientation:
        return plan
    return replace(plan, orientation=orientation,
                   notes=(*plan.notes, f"applied EXIF orientation {orientation}"))


def _to_supported_mode(im: Image.Image, channels: int, icc: bytes | None,
                       notes: list[str]) -> tuple[Image.Image, bytes | None]:
    """Convert a loaded image to L, RGB or 16-bit gray (notes already planned, except ICC ones)."""
    im.load()
    mode = im.mode
    if mode in ("L", "RGB"):
        return im, icc
    if mode in _GRAY16_MODES:
        values = np.asarray(im)
        if mode == "I" and (values.min() < 0 or values.max() > 65535):
            notes.append("clipped 32-bit integer values to 0..65535")
        return im, icc
    if mode == "CMYK":
        return _cmyk_to_rgb(im, icc, notes)
    if mode in ("P", "PA"):
        im = im.convert("RGBA")  # expand the palette (and any transparency) before dropping alpha
    return im.convert("L" if channels == 1 else "RGB"), icc


def _cmyk_to_rgb(im: Image.Image, icc: bytes | None,
                 notes: list[str]) -> tuple[Image.Image, bytes | None]:
    """CMYK -> RGB through the embedded ICC profile when there is one, else Pillow's formula."""
    if icc:
        try:
            source = ImageCms.ImageCmsProfile(io.BytesIO(icc))
            srgb = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB"))
            rgb = ImageCms.profileToProfile(im, source, srgb, outputMode="RGB")
            notes.append("used the embedded CMYK ICC profile; the output profile is sRGB")
            return rgb, srgb.tobytes()
        except (ImageCms.PyCMSError, OSError, ValueError):
            notes.append("dropped an unusable CMYK ICC profile")
    return im.convert("RGB"), None


def _decode_png16(high: np.ndarray, data: bytes, rawmode: str, channels: int) -> torch.Tensor:
    """48/64-bit PNG -> [1, C, H, W] in [0, 1], alpha dropped.

    Pillow unfilters the PNG in full precision but keeps one byte per sample: its normal decode
    (`high`, raw mode 'RGB;16B') keeps the high bytes; decoding again with the samples read as
    little-endian ('RGB;16L') keeps the low bytes.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        with Image.open(io.BytesIO(data)) as again:
            again.tile = [tile._replace(args=_PNG16_LOW_BYTES[rawmode]) for tile in again.tile]
            again.load()
            low = np.asarray(again)
    samples = (high.astype(np.uint16) << 8) | low
    return _array_to_tensor(samples[..., :channels], 65535.0)


def _decode_tiff16(data: bytes, channels: int) -> torch.Tensor:
    """16-bit TIFF (first page) -> [1, C, H, W] in [0, 1] through tifffile (extra samples dropped)."""
    tifffile = _optional("tifffile")
    with tifffile.TiffFile(io.BytesIO(data)) as tif:
        page = tif.pages[0]
        array, axes = page.asarray(), page.axes
    if axes.startswith("S"):
        array = np.moveaxis(array, 0, -1)
    if array.ndim != 3 or array.dtype != np.uint16:
        raise ValueError(f"unsupported TIFF layout {axes} {array.dtype}")
    return _array_to_tensor(array[..., :channels], 65535.0)


@functools.cache
def _optional(name: str) -> ModuleType | None:
    """An optional module, or None when it is missing or fails to import."""
    try:
        return importlib.import_module(name)
    except (ImportError, OSError, RuntimeError):
        return None


def _apply_orientation(x: torch.Tensor, orientation: int) -> torch.Tensor:
    """Apply EXIF orientation 1..8 to [..., H, W], as PIL.ImageOps.exif_transpose does."""
    if orientation == 2:
        x = x.flip(-1)
    elif orientation == 3:
        x = x.flip(-2, -1)
    elif orientation == 4:
        x = x.flip(-2)
    elif orientation == 5:
        x = x.transpose(-2, -1)
    elif orientation == 6:
        x = torch.rot90(x, -1, dims=(-2, -1))
    elif orientation == 7:
        x = x.transpose(-2, -1).flip(-2, -1)
    elif orientation == 8:
        x = torch.rot90(x, 1, dims=(-2, -1))
    return x.contiguous()


def _upright_exif(exif: bytes | Image.Exif | None) -> bytes | None:
    """EXIF bytes with the orientation tag set to 1, since pixels are stored upright."""
    if not exif:
        return None
    if isinstance(exif, bytes):
        parsed = Image.Exif()
        parsed.load(exif)
        if parsed.get(EXIF_ORIENTATION, 1) == 1:
            return exif  # unchanged bytes: re-serialising can lose maker notes
        exif = parsed
    if EXIF_ORIENTATION in exif:
        exif[EXIF_ORIENTATION] = 1
    return exif.tobytes()


# ----------------------------------------------------------------------------------------------
# Writing


def write_image(uri: str | os.PathLike[str], pixels: torch.Tensor, *, bit_depth: int = 8,
                format: str | None = None, icc_profile: bytes | None = None,
                exif: bytes | None = None, dpi: tuple[float, float] | None = None, quality: int = 95,
                protect: str | None = None, **storage_options: Any) -> None:
    """Encode [1, C, H, W] or [C, H, W] pixels in [0, 1] (C = 1 or 3) and write them atomically.

    Values are clamped to [0, 1] and rounded to `bit_depth` (8, or 16 for PNG/TIFF). `format`
    defaults to the extension's. ICC and EXIF are embedded where the format allows (PNG, JPEG,
    TIFF, WEBP; not BMP), with the EXIF orientation set to 1. `dpi` (x, y) is written as PNG pHYs,
    JPEG JFIF density, TIFF or BMP resolution, and into EXIF resolution tags where the EXIF has
    them (WEBP: always, it has no other place); `LoadedImage.dpi_for` gives the DPI of a resized
    image. `quality` applies to JPEG and WEBP.
    Local files are written to a temporary file beside the target and renamed over it; other
    fsspec URLs are written with one upload (atomic on object stores such as S3, GCS, Azure).
    Raises ImageError if `uri` is the same file as `protect` (pass the input URI there).
    """
    uri = os.fspath(uri)
    fmt = _output_format(uri, format, bit_depth)
    if protect is not None and same_location(uri, os.fspath(protect), storage_options):
        raise ImageError(uri, f"refusing to overwrite the input {protect}")
    if dpi is not None and not all(0 < float(v) < float("inf") for v in dpi):
        raise ValueError(f"{uri}: dpi must be two positive numbers, got {dpi!r}")
    samples = _quantise(pixels, bit_depth)
    data = _encode(samples, fmt, icc_profile, _output_exif(exif, dpi, fmt), quality, dpi)
    _write_atomic(uri, data, storage_options)


def check_writable(uri: str | os.PathLike[str], *, bit_depth: int = 8, format: str | None = None,
                   **storage_options: Any) -> None:
    """Raise now what `write_image(uri, ...)` would raise later for this path: an unknown format or a
    bit depth it cannot hold (ValueError), or, for local paths, a folder in the way, a parent that is
    a file or a folder that cannot be written (ImageError). Call it before a long computation."""
    uri = os.fspath(uri)
    _output_format(uri, format, bit_depth)
    fs, path = fsspec.core.url_to_fs(uri, **storage_options)
    if not isinstance(fs, LocalFileSystem):
        return
    path = os.path.abspath(path)
    if os.path.isdir(path):
        raise ImageError(uri, "is a directory, not a file")
    parent = os.path.dirname(path)
    while not os.path.lexists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise ImageError(uri, f"cannot create it: {parent} is a file, not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ImageError(uri, f"cannot write into {parent} (permission denied)")


def writable_bit_depth(uri: str | os.PathLike[str], bit_depth: int, format: str | None = None) -> int:
    """`bit_depth`, or 8 where the output format cannot hold 16 bits (JPEG, WEBP, BMP)."""
    return bit_depth if _output_format(os.fspath(uri), format, 8) in _SIXTEEN_BIT_FORMATS else 8


def _output_format(uri: str, format: str | None, bit_depth: int) -> str:
    ext = posixpath.splitext(uri)[1].lower()
    fmt = format.upper() if format else _FORMATS.get(ext)
    fmt = {"JPG": "JPEG", "TIF": "TIFF"}.get(fmt, fmt) if fmt else fmt
    if fmt not in _FORMATS.values():
        raise ValueError(f"{uri}: unknown image format {format or ext!r}; use one of "
                         f"{sorted(set(_FORMATS.values()))} or an extension {sorted(_FORMATS)}")
    if bit_depth not in (8, 16) or (bit_depth == 16 and fmt not in _SIXTEEN_BIT_FORMATS):
        raise ValueError(f"{uri}: bit_depth {bit_depth} is not possible for {fmt}; "
                         "use 8, or 16 with PNG or TIFF")
    return fmt


def _quantise(pixels: torch.Tensor, bit_depth: int) -> np.ndarray:
    """[1, C, H, W] or [C, H, W] in [0, 1] -> uint8/uint16 [H, W] (C = 1) or [H, W, 3]."""
    x = pixels.detach()
    if x.ndim == 4 and x.shape[0] == 1:
        x = x[0]
    if x.ndim != 3 or x.shape[0] not in (1, 3):
        raise ValueError(f"pixels must be [1, C, H, W] or [C, H, W] with C = 1 or 3, "
                         f"got {tuple(pixels.shape)}")
    x = x.to("cpu", torch.float32)
    if not torch.isfinite(x).all():
        raise ValueError("pixels contain NaN or infinity; nothing was written")
    top = 255.0 if bit_depth == 8 else 65535.0
    levels = (x.clamp(0.0, 1.0) * top).round().to(torch.int32).permute(1, 2, 0).numpy()
    levels = levels.astype(np.uint8 if bit_depth == 8 else np.uint16)
    return levels[..., 0] if levels.shape[-1] == 1 else levels


def _encode(samples: np.ndarray, fmt: str, icc: bytes | None, exif: bytes | None,
            quality: int, dpi: tuple[float, float] | None = None) -> bytes:
    """Samples from `_quantise` -> encoded file bytes."""
    if samples.dtype == np.uint16 and samples.ndim == 3:
        if fmt == "PNG":
            return encode_png16_rgb(samples, icc_profile=icc, exif=exif, dpi=dpi)
        return encode_tiff16_rgb(samples, icc_profile=icc, exif=exif, dpi=dpi)
    params: dict[str, Any] = {}
    if icc:
        params["icc_profile"] = icc
    if exif and fmt == "TIFF":  # Pillow's `exif=` would drop the EXIF and GPS directories of a TIFF
        params["tiffinfo"] = _tiff_tags(exif)
    elif exif:
        params["exif"] = _parse_exif(exif)
    if dpi and fmt != "WEBP":
        params["dpi"] = tuple(float(v) for v in dpi)
    if fmt in ("JPEG", "WEBP"):
        params["quality"] = quality
    if fmt == "JPEG":
        params["subsampling"] = 0  # keep full-resolution colour in restored images
    buffer = io.BytesIO()
    Image.fromarray(samples).save(buffer, format=fmt, **params)
    return buffer.getvalue()


def _parse_exif(exif: bytes) -> Image.Exif:
    parsed = Image.Exif()
    parsed.load(exif)
    return parsed


_RESOLUTION_TAGS = (0x011A, 0x011B, 0x0128)  # EXIF XResolution, YResolution, ResolutionUnit


def _output_exif(exif: bytes | None, dpi: tuple[float, float] | None, fmt: str) -> bytes | None:
    """The EXIF to embed: orientation 1 (pixels are upright), and resolution tags that agree with
    `dpi` where the EXIF has them (or, for WEBP, which has no other place for a DPI, always).
    Unchanged bytes when nothing changes: re-serialising can lose maker notes."""
    exif = _upright_exif(exif)
    if not dpi or not (exif or fmt == "WEBP"):
        return exif
    parsed = _parse_exif(exif) if exif else Image.Exif()
    if _RESOLUTION_TAGS[0] not in parsed and fmt != "WEBP":
        return exif
    wanted = dict(zip(_RESOLUTION_TAGS, (_rational(dpi[0]), _rational(dpi[1]), 2)))
    if all(parsed.get(tag) == value for tag, value in wanted.items()):
        return exif
    for tag, value in wanted.items():
        parsed[tag] = value
    return parsed.tobytes()


def _rational(value: float):
    from PIL.TiffImagePlugin import IFDRational
    from fractions import Fraction
    f = Fraction(float(value)).limit_denominator(10_000)
    return IFDRational(f.numerator, f.denominator)


def _tiff_tags(exif: bytes):
    """EXIF bytes -> the first TIFF directory's tags, EXIF and GPS directories nested (Pillow's TIFF
    writer serialises a dict as a sub-directory). Tags of the stored pixels are left to the writer."""
    from PIL.TiffImagePlugin import ImageFileDirectory_v2
    parsed = _parse_exif(exif)
    tags = ImageFileDirectory_v2()
    for tag, value in parsed.items():
        if tag in _EXIF_SUB_IFDS:
            value = dict(parsed.get_ifd(tag))
            if _EXIF_INTEROP in value:
                value[_EXIF_INTEROP] = dict(parsed.get_ifd(_EXIF_INTEROP))
            if not value:
                continue
        elif tag in _TIFF_NOT_EXIF and tag != EXIF_ORIENTATION:
            continue
        tags[tag] = value
    return tags


def encode_png16_rgb(samples: np.ndarray, *, icc_profile: bytes | None = None,
                     exif: bytes | None = None, dpi: tuple[float, float] | None = None) -> bytes:
    """uint16 [H, W, 3] -> 48-bit PNG bytes (filter 0, zlib), with optional iCCP, eXIf and pHYs chunks."""
    height, width, _ = samples.shape
    rows = samples.astype(">u2").reshape(height, width * 3).view(np.uint8)
    scanlines = np.concatenate([np.zeros((height, 1), np.uint8), rows], axis=1)  # filter type 0
    compressor = zlib.compressobj(6)
    idat = [compressor.compress(scanlines[i:i + 256].tobytes()) for i in range(0, height, 256)]
    idat.append(compressor.flush())
    chunks = [_png_chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 16, 2, 0, 0, 0))]
    if icc_profile:
        chunks.append(_png_chunk(b"iCCP", b"ICC profile\x00\x00" + zlib.compress(icc_profile)))
    if exif:
        chunks.append(_png_chunk(b"eXIf", exif[6:] if exif.startswith(b"Exif\x00\x00") else exif))
    if dpi:  # pixels per metre, unit 1 (metre), as Pillow writes it
        chunks.append(_png_chunk(b"pHYs", struct.pack(">IIB", *(int(float(v) / 0.0254 + 0.5) for v in dpi), 1)))
    compressed = b"".join(idat)
    chunks += [_png_chunk(b"IDAT", compressed[i:i + (1 << 24)])
               for i in range(0, max(len(compressed), 1), 1 << 24)]
    return b"\x89PNG\r\n\x1a\n" + b"".join(chunks) + _png_chunk(b"IEND", b"")


def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    crc = zlib.crc32(kind + payload) & 0xFFFFFFFF
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", crc)


def encode_tiff16_rgb(samples: np.ndarray, *, icc_profile: bytes | None = None,
                      exif: bytes | None = None, dpi: tuple[float, float] | None = None) -> bytes:
    """uint16 [H, W, 3] -> 48-bit TIFF bytes (little-endian, deflate strips of about 64 KiB), with
    the ICC profile, the EXIF (its tags and EXIF/GPS directories) and the resolution. Laid out as
    Pillow's own TIFF writer does: header, directory (serialised by Pillow), then the strips, whose
    offsets Pillow's serialiser takes relative to the end of the directory."""
    from PIL.TiffImagePlugin import ImageFileDirectory_v2
    height, width, _ = samples.shape
    rows = max(1, (1 << 16) // (width * 6))
    raw = np.ascontiguousarray(samples, dtype="<u2")
    strips = [zlib.compress(raw[i:i + rows].tobytes(), 6) for i in range(0, height, rows)]
    ifd = ImageFileDirectory_v2()
    for tag, value in (_tiff_tags(exif) if exif else {}).items():
        ifd[tag] = value
    ifd[256], ifd[257], ifd[258], ifd[259], ifd[262] = width, height, (16, 16, 16), 8, 2  # 8: deflate, 2: RGB
    ifd[277], ifd[278], ifd[284] = 3, rows, 1
    ifd[273] = tuple(int(o) for o in np.cumsum([0] + [len(s) for s in strips[:-1]]))
    ifd[279] = tuple(len(s) for s in strips)
    if dpi:
        ifd[282], ifd[283], ifd[296] = _rational(dpi[0]), _rational(dpi[1]), 2  # 2: inch
    if icc_profile:
        ifd[34675] = icc_profile
    return b"II*\x00" + struct.pack("<I", 8) + ifd.tobytes(8) + b"".join(strips)


def _write_atomic(uri: str, data: bytes, storage_options: dict[str, Any]) -> None:
    """Write `data` so that readers never see a partial file."""
    fs, path = fsspec.core.url_to_fs(uri, **storage_options)
    if not isinstance(fs, LocalFileSystem):
        fs.pipe_file(path, data)  # one PUT: object stores publish it whole or not at all
        return
    directory, name = os.path.split(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    # hidden, and as short whatever the target's name (a 250-character name stays legal); 37 characters
    temporary = os.path.join(directory, f".tmp-{uuid.uuid4().hex}")
    try:
        with open(temporary, "xb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        raise


def same_location(uri: str, other: str, storage_options: dict[str, Any] | None = None) -> bool:
    """Whether two URLs name the same file (symlinks resolved for local paths)."""
    fs_a, path_a = fsspec.core.url_to_fs(uri, **(storage_options or {}))
    fs_b, path_b = fsspec.core.url_to_fs(other, **(storage_options or {}))
    if type(fs_a) is not type(fs_b):
        return False
    if isinstance(fs_a, LocalFileSystem):
        return os.path.realpath(path_a) == os.path.realpath(path_b)
    return path_a.rstrip("/") == path_b.rstrip("/")


# ----------------------------------------------------------------------------------------------
# Listing and hashing


def list_images(uri: str | os.PathLike[str], pattern: str = "**/*",
                **storage_options: Any) -> list[str]:
    """Sorted URIs of image files (by extension, any case) under `uri` matching `pattern`.

    Local results are absolute paths; others keep their protocol ("s3://bucket/a/b.png").
    A `uri` that is itself an image file gives a list of that one file.
    """
    fs, root = fsspec.core.url_to_fs(os.fspath(uri), **storage_options)
    if fs.isfile(root):
        found = {root: fs.info(root)}
    else:
        found = fs.glob(posixpath.join(root.rstrip("/"), pattern), detail=True)
    paths = [path for path, info in found.items()
             if info.get("type") == "file" and posixpath.splitext(path)[1].lower() in IMAGE_EXTENSIONS]
    return sorted(_full_uri(fs, path) for path in paths)


def _full_uri(fs: fsspec.AbstractFileSystem, path: str) -> str:
    return os.path.abspath(path) if isinstance(fs, LocalFileSystem) else fs.unstrip_protocol(path)


def relative_path(base_uri: str | os.PathLike[str], uri: str | os.PathLike[str]) -> str:
    """Path of `uri` below `base_uri`, with '/' separators ('a/b.png'); ValueError if not below."""
    base_protocol, base = _protocol_and_path(os.fspath(base_uri))
    protocol, path = _protocol_and_path(os.fspath(uri))
    base = base.rstrip("/")
    if protocol != base_protocol or not path.startswith(base + "/"):
        raise ValueError(f"{uri} is not inside {base_uri}")
    return path[len(base) + 1:]


def _protocol_and_path(uri: str) -> tuple[str, str]:
    protocol, path = fsspec.core.split_protocol(uri)
    if protocol in (None, "file", "local"):
        return "file", os.path.abspath(path).replace(os.sep, "/")
    return protocol, path


def sha256_of(uri: str | os.PathLike[str], **storage_options: Any) -> str:
    """Hex SHA-256 of a file's bytes, read in 1 MiB chunks."""
    uri = os.fspath(uri)
    digest = hashlib.sha256()
    with _open_file(uri, storage_options) as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()
