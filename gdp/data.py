"""A reproducible training set for the prior: photographs from Debian packages and scikit-image.

`gdp data build OUT` (or `build_dataset`) reads the source list `gdp/assets/prior_sources.json`
(package, version, path inside the package, sha256, size, licence, author, role per file), fetches
each package with `apt-get download PKG=VERSION` into a temporary folder, checks the .deb's name and
version, takes the listed files out of its data archive (`dpkg-deb --fsys-tarfile`), checks each
against its recorded sha256, downscales it by at least 2x (most are JPEG wallpapers: block and
chroma-subsampling artefacts shrink below a pixel) and writes it as PNG. scikit-image's sample
photos are copied unchanged from the installed package. The result:

    OUT/train/PACKAGE/NAME.png      the training photos (`gdp train OUT/train ...`)
    OUT/heldout/PACKAGE/NAME.png    photos kept out of training, for validation
    OUT/manifest.parquet            one row per written file (file, package, licence, sha256, ...)

The set is built in `OUT.tmp-XXXX` next to OUT and renamed to OUT at the end: a failure (missing
package, no network, changed file) leaves no OUT and no temporary folder behind, and raises
`DataError` with one line naming the package or file.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
from PIL import Image, ImageCms, ImageOps, PngImagePlugin

SOURCES = Path(__file__).with_name("assets") / "prior_sources.json"
MAX_SIDE = 1280  # longest side of a written package photo
MIN_FACTOR = 2.0  # every package photo is downscaled at least this much
SKIMAGE = "scikit-image"
ROLES = ("train", "heldout")
MANIFEST_COLUMNS = ("file", "role", "package", "package_version", "source_path", "licence", "permissive",
                    "author", "note", "sha256", "source_sha256", "width", "height", "source_width",
                    "source_height", "scale", "bytes")


class DataError(ValueError):
    """The data set cannot be built; str() is one line naming the package or file."""


@dataclass(frozen=True)
class Source:
    """One file of the source list (sha256, width and height are the original's)."""
    name: str
    package: str
    path: str
    sha256: str
    width: int
    height: int
    licence: str
    role: str
    author: str | None = None
    note: str = ""
    licence_source: str | None = None
    min_factor: float = MIN_FACTOR  # downscale at least this much (more for blocky JPEGs)


@dataclass(frozen=True)
class SourceList:
    versions: dict[str, str]  # Debian package -> version
    files: tuple[Source, ...]
    permissive_licences: tuple[str, ...]

    def is_permissive(self, licence: str) -> bool:
        return licence in self.permissive_licences

    def select(self, permissive_only: bool = False) -> list[Source]:
        return [s for s in self.files if not permissive_only or self.is_permissive(s.licence)]


@dataclass
class BuildReport:
    out: str
    files: int = 0
    train: int = 0
    heldout: int = 0
    per_package: dict[str, int] = field(default_factory=dict)
    source_megapixels: float = 0.0  # of the package photos, before downscaling
    megapixels: float = 0.0  # of the package photos as written
    bytes: int = 0  # of everything written, manifest included

    def to_dict(self) -> dict:
        return {"output": self.out, "files": self.files, "train": self.train, "heldout": self.heldout,
                "per_package": self.per_package, "source_megapixels": round(self.source_megapixels, 2),
                "megapixels": round(self.megapixels, 2), "bytes": self.bytes}


def load_sources(path: str | os.PathLike = SOURCES) -> SourceList:
    """The source list; DataError (one line) when it is unreadable or inconsistent."""
    try:
        doc = json.loads(Path(path).read_text())
        versions = {k: v["version"] for k, v in doc["packages"].items()}
        files = tuple(Source(**f) for f in doc["files"])
        permissive = tuple(doc["permissive_licences"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise DataError(f"{path}: not a readable source list: {' '.join(str(e).split())}") from None
    names = set()
    for s in files:
        if s.package != SKIMAGE and s.package not in versions:
            raise DataError(f"{path}: {s.path}: package {s.package} has no recorded version")
        if s.role not in ROLES:
            raise DataError(f"{path}: {s.package}: {s.path}: role {s.role!r} is not one of {', '.join(ROLES)}")
        if not s.min_factor >= MIN_FACTOR:
            raise DataError(f"{path}: {s.package}: {s.path}: min_factor {s.min_factor} is below {MIN_FACTOR}")
        if s.name in names:
            raise DataError(f"{path}: {s.package}: {s.path}: the name {s.name!r} is used twice")
        names.add(s.name)
    return SourceList(versions, files, permissive)


# ---------------------------------------------------------------- downscaling

_SRGB_TO_LINEAR = np.where(np.arange(256) / 255 <= 0.04045, np.arange(256) / 255 / 12.92,
                           ((np.arange(256) / 255 + 0.055) / 1.055) ** 2.4).astype(np.float32)


def downscale_size(width: int, height: int, max_side: int = MAX_SIDE, min_factor: float = MIN_FACTOR) -> tuple[int, int]:
    """Output size: the longest side at most `max_side`, and at least `min_factor` times smaller."""
    factor = max(min_factor, max(width, height) / max_side)
    return max(1, int(width / factor)), max(1, int(height / factor))  # rounded down: never less than factor


def downscale(image: Image.Image, size: tuple[int, int]) -> Image.Image:
    """Resize an 8-bit L or RGB image to `size` with Pillow's Lanczos filter (support 3 output
    pixels, so antialiased) applied to linear-light values: sRGB is decoded to linear float, each
    channel resized in mode F, clipped to [0, 1] and encoded back to 8-bit sRGB."""
    if image.mode not in ("L", "RGB"):
        raise ValueError(f"downscale takes L or RGB images, got {image.mode}")
    linear = _SRGB_TO_LINEAR[np.asarray(image)]
    planes = linear[..., None] if linear.ndim == 2 else linear
    out = np.stack([np.asarray(Image.fromarray(np.ascontiguousarray(planes[..., c]))
                               .resize(size, Image.Resampling.LANCZOS)) for c in range(planes.shape[-1])], -1)
    out = np.clip(out, 0.0, 1.0)
    srgb = np.where(out <= 0.0031308, out * 12.92, 1.055 * np.power(out, 1 / 2.4) - 0.055)
    pixels = np.round(srgb * 255).astype(np.uint8)
    return Image.fromarray(pixels[..., 0] if image.mode == "L" else pixels)


def block_grid_ratio(image: Image.Image, period: int = 8) -> float:
    """How much a JPEG's block grid shows: the mean absolute step between neighbouring pixels
    across the lines of a `period`-pixel grid (rows and columns from 0), over the mean step
    elsewhere. About 1 for a photo without a grid; 1.2-2.5 for the wallpapers here at period 8;
    measure a result downscaled by k at period 8 / k."""
    a = np.asarray(image.convert("L"), dtype=np.float64)
    ratios = []
    for d in (np.abs(np.diff(a, axis=1)), np.abs(np.diff(a, axis=0)).T):
        on = (np.arange(d.shape[1]) % period) == period - 1
        ratios.append((d[:, on].mean(), d[:, ~on].mean()))
    return float(sum(r[0] for r in ratios) / max(sum(r[1] for r in ratios), 1e-12))


def _decode(data: bytes, where: str) -> Image.Image:
    """8-bit L or RGB pixels of an image file: EXIF orientation applied, converted to sRGB when it
    carries another ICC profile, opaque alpha dropped, RGB with three equal channels made L."""
    try:
        img = Image.open(io.BytesIO(data))
        img.load()
        img = ImageOps.exif_transpose(img)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise DataError(f"{where}: cannot decode the image: {' '.join(str(e).split())}") from None
    icc = img.info.get("icc_profile")
    if icc and img.mode in ("RGB", "RGBA"):
        profile = ImageCms.ImageCmsProfile(io.BytesIO(icc))
        if "srgb" not in ImageCms.getProfileDescription(profile).lower():
            img = ImageCms.profileToProfile(img.convert("RGB"), profile, ImageCms.createProfile("sRGB"), outputMode="RGB")
    if img.mode in ("RGBA", "LA"):
        if np.asarray(img.getchannel("A")).min() < 255:
            raise DataError(f"{where}: has transparent pixels; only opaque photographs are supported")
        img = img.convert(img.mode[:-1])
    if img.mode == "P":
        img = img.convert("RGB")
    if img.mode not in ("L", "RGB"):
        raise DataError(f"{where}: pixel mode {img.mode} is not supported (8-bit gray or RGB)")
    if img.mode == "RGB":
        a = np.asarray(img)
        if (a[..., 0] == a[..., 1]).all() and (a[..., 1] == a[..., 2]).all():
            img = Image.fromarray(np.ascontiguousarray(a[..., 0]))
    return img


# ---------------------------------------------------------------- Debian packages

Downloader = Callable[[str, str, Path], Path]


def _run(cmd: list[str], what: str, **kw) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(cmd, capture_output=True, **kw)
    except FileNotFoundError:
        raise DataError(f"{what}: {cmd[0]} not found (gdp data build needs Debian's apt-get and dpkg-deb)") from None


def _last_error(stderr: bytes) -> str:
    lines = [" ".join(line.split()) for line in stderr.decode(errors="replace").splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("E:")]
    return (errors or lines or ["no message"])[-1]


def apt_download(package: str, version: str, dest: Path) -> Path:
    """`apt-get download PACKAGE=VERSION` into `dest`; the .deb's path."""
    what = f"{package} {version}"
    done = _run(["apt-get", "download", "-q", f"{package}={version}"], what, cwd=dest)
    if done.returncode != 0:
        message = _last_error(done.stderr)
        low, hint = message.lower(), ""
        if "unable to locate" in low or "was not found" in low or "no installation candidate" in low:
            hint = " (not in this machine's package lists: run apt-get update, or the version is gone)"
        elif "404" in low:
            hint = " (the registry no longer has this version)"
        elif "fetch" in low or "resolv" in low or "connect" in low:
            hint = " (no network or the registry is unreachable)"
        raise DataError(f"{what}: apt-get download failed: {message}{hint}")
    debs = sorted(dest.glob("*.deb"))
    if len(debs) != 1:
        raise DataError(f"{what}: apt-get download left {len(debs)} .deb files in {dest}, expected 1")
    return debs[0]


def deb_fields(deb: Path) -> tuple[str, str]:
    """(Package, Version) from a .deb's control file."""
    done = _run(["dpkg-deb", "-f", str(deb), "Package", "Version"], str(deb))
    fields = dict(line.split(": ", 1) for line in done.stdout.decode().splitlines() if ": " in line)
    if done.returncode != 0 or "Package" not in fields or "Version" not in fields:
        raise DataError(f"{deb.name}: not a readable .deb: {_last_error(done.stderr)}")
    return fields["Package"], fields["Version"]


def extract_files(deb: Path, paths: Iterable[str], package: str) -> dict[str, bytes]:
    """The bytes of `paths` (relative, as in the source list) from a .deb's data archive."""
    wanted = set(paths)
    found: dict[str, bytes] = {}
    try:
        proc = subprocess.Popen(["dpkg-deb", "--fsys-tarfile", str(deb)], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    except FileNotFoundError:
        raise DataError(f"{package}: dpkg-deb not found (gdp data build needs Debian's apt-get and dpkg-deb)") from None
    try:
        with tarfile.open(fileobj=proc.stdout, mode="r|") as tar:
            for member in tar:
                name = member.name[2:] if member.name.startswith("./") else member.name.lstrip("/")
                if name not in wanted:
                    continue
                if not member.isfile():
                    raise DataError(f"{package}: {name}: is not a regular file in the package (a link?)")
                found[name] = tar.extractfile(member).read()
    except tarfile.TarError as e:
        raise DataError(f"{package}: {deb.name}: cannot read its data archive: {e}") from None
    finally:
        proc.stdout.close()
        stderr = proc.stderr.read()
        proc.stderr.close()
        code = proc.wait()
    if code != 0:
        raise DataError(f"{package}: {deb.name}: dpkg-deb --fsys-tarfile failed: {_last_error(stderr)}")
    missing = sorted(wanted - set(found))
    if missing:
        raise DataError(f"{package}: {missing[0]}: not found in {deb.name}"
                        + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    return found


def check_sha256(data: bytes, source: Source) -> str:
    digest = hashlib.sha256(data).hexdigest()
    if digest != source.sha256:
        raise DataError(f"{source.package}: {source.path}: sha256 {digest[:16]}... does not match the recorded "
                        f"{source.sha256[:16]}... (the file changed)")
    return digest


# ---------------------------------------------------------------- scikit-image

def skimage_root() -> Path:
    """The folder that holds `skimage/` (paths of scikit-image sources are relative to it)."""
    spec = importlib.util.find_spec("skimage")
    if spec is None or not spec.origin:
        raise DataError("scikit-image: not installed; its sample photos are part of the set (pip install 'gdp[eval]')")
    return Path(spec.origin).parent.parent


def _skimage_version() -> str:
    try:
        return importlib.metadata.version(SKIMAGE)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


# ---------------------------------------------------------------- the build

def build_dataset(out: str | os.PathLike, *, permissive_only: bool = False, overwrite: bool = False,
                  sources: SourceList | None = None, download: Downloader = apt_download,
                  skimage_dir: str | os.PathLike | None = None, max_side: int = MAX_SIDE,
                  log: Callable[[str], None] | None = None) -> BuildReport:
    """Build the data set into the local folder `out` (see the module docstring); returns counts.

    `download(package, version, folder)` fetches one .deb into `folder` and returns its path
    (default: `apt-get download`). `skimage_dir` is the folder holding `skimage/` (the source
    list's paths are `skimage/data/NAME`; default: the installed scikit-image's). `permissive_only` keeps the files whose licence is in the source
    list's `permissive_licences` (CC0, public domain, CC-BY).
    """
    log = log or (lambda m: print(m, file=sys.stderr))
    sources = sources or load_sources()
    out = Path(os.path.abspath(out))
    if out.exists():
        if not out.is_dir():
            raise DataError(f"{out}: exists and is not a folder")
        if any(out.iterdir()) and not overwrite:
            raise DataError(f"{out}: exists and is not empty; use --overwrite to replace it")
    chosen = sources.select(permissive_only)
    if not chosen:
        raise DataError("the source list has no files" + (" under a permissive licence" if permissive_only else ""))
    if any(s.package == SKIMAGE for s in chosen):  # before any download
        skimage_dir = Path(skimage_dir) if skimage_dir else skimage_root()
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(f"{out.name}.tmp-{uuid.uuid4().hex[:8]}")
        tmp.mkdir()  # (not mkdtemp: the set gets the umask's permissions, not 0700)
    except OSError as e:
        raise DataError(f"{out}: cannot create a folder there: {e.strerror or e}") from None
    report = BuildReport(str(out))
    try:
        rows = []
        by_package: dict[str, list[Source]] = {}
        for s in chosen:
            by_package.setdefault(s.package, []).append(s)
        for package, files in by_package.items():
            if package == SKIMAGE:
                rows += _copy_skimage(files, tmp, sources, skimage_dir, log)
            else:
                rows += _build_package(package, sources.versions[package], files, tmp, sources, download, max_side, log)
            report.per_package[package] = len(files)
        _write_manifest(tmp / "manifest.parquet", rows)
        report.files = len(rows)
        report.train = sum(r["role"] == "train" for r in rows)
        report.heldout = sum(r["role"] == "heldout" for r in rows)
        debian = [r for r in rows if r["package"] != SKIMAGE]
        report.source_megapixels = sum(r["source_width"] * r["source_height"] for r in debian) / 1e6
        report.megapixels = sum(r["width"] * r["height"] for r in debian) / 1e6
        report.bytes = sum(p.stat().st_size for p in tmp.rglob("*") if p.is_file())
        _replace_folder(tmp, out)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError) and not isinstance(e, DataError):
            raise DataError(f"{out}: cannot write the data set: {e.strerror or e}") from None
        raise
    log(f"gdp data: {out}: {report.train} training and {report.heldout} held-out files, "
        f"{report.bytes / 1e6:.1f} MB")
    return report


def _build_package(package: str, version: str, files: list[Source], tmp: Path, sources: SourceList,
                   download: Downloader, max_side: int, log: Callable[[str], None]) -> list[dict]:
    log(f"gdp data: {package} {version}: downloading")
    with tempfile.TemporaryDirectory(prefix="gdp-deb-") as folder:
        deb = download(package, version, Path(folder))
        name, got = deb_fields(deb)
        if (name, got) != (package, version):
            raise DataError(f"{package}: {deb.name} is {name} {got}, expected {package} {version}")
        contents = extract_files(deb, [s.path for s in files], package)
    rows, before, after = [], 0, 0
    for s in files:
        data = contents.pop(s.path)
        digest = check_sha256(data, s)
        where = f"{package}: {s.path}"
        img = _decode(data, where)
        if img.size != (s.width, s.height):
            raise DataError(f"{where}: is {img.size[0]}x{img.size[1]}, the source list says {s.width}x{s.height}")
        small = downscale(img, downscale_size(*img.size, max_side=max_side, min_factor=s.min_factor))
        rel = f"{s.role}/{package}/{s.name}.png"
        info = PngImagePlugin.PngInfo()
        info.add_text("Title", s.name)
        if s.author:
            info.add_text("Author", s.author)
        info.add_text("Copyright", s.licence)
        info.add_text("Source", f"Debian package {package} {version}: {s.path} (sha256 {digest}), downscaled")
        buf = io.BytesIO()
        small.save(buf, format="PNG", pnginfo=info)
        rows.append(_write(tmp, rel, buf.getvalue(), s, version, digest, small.size, sources))
        before += s.width * s.height
        after += small.size[0] * small.size[1]
    log(f"gdp data: {package} {version}: {len(files)} photos, {before / 1e6:.1f} MP -> {after / 1e6:.1f} MP")
    return rows


def _copy_skimage(files: list[Source], tmp: Path, sources: SourceList, root: Path,
                  log: Callable[[str], None]) -> list[dict]:
    version = _skimage_version()
    rows = []
    for s in files:
        try:
            data = (root / s.path).read_bytes()
        except OSError:
            raise DataError(f"{SKIMAGE} {version}: {s.path}: not found under {root}") from None
        digest = check_sha256(data, s)
        ext = s.path.rsplit(".", 1)[-1].lower()
        size = Image.open(io.BytesIO(data)).size
        rows.append(_write(tmp, f"{s.role}/{SKIMAGE}/{s.name}.{ext}", data, s, version, digest, size, sources))
    log(f"gdp data: {SKIMAGE} {version}: {len(files)} photos copied unchanged")
    return rows


def _write(tmp: Path, rel: str, data: bytes, s: Source, version: str, source_digest: str,
           size: tuple[int, int], sources: SourceList) -> dict:
    path = tmp / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return {"file": rel, "role": s.role, "package": s.package, "package_version": version, "source_path": s.path,
            "licence": s.licence, "permissive": sources.is_permissive(s.licence), "author": s.author,
            "note": s.note, "sha256": hashlib.sha256(data).hexdigest(), "source_sha256": source_digest,
            "width": size[0], "height": size[1], "source_width": s.width, "source_height": s.height,
            "scale": round(min(s.width / size[0], s.height / size[1]), 4), "bytes": len(data)}


def _write_manifest(path: Path, rows: list[dict]) -> None:
    import pandas as pd
    pd.DataFrame(rows, columns=list(MANIFEST_COLUMNS)).to_parquet(path, index=False)


def _replace_folder(tmp: Path, out: Path) -> None:
    """Rename `tmp` to `out`; an existing `out` is moved aside first and removed after."""
    old = None
    if out.exists():
        old = out.with_name(f"{out.name}.old-{uuid.uuid4().hex[:8]}")
        os.rename(out, old)
    try:
        os.rename(tmp, out)
    except OSError:
        if old is not None:
            os.rename(old, out)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def training_folder(uri: str) -> str:
    """`uri`, or `uri/train` when `uri` is a data set written by `build_dataset` (so that training
    on the set's root never reads its held-out photos)."""
    import fsspec
    fs, path = fsspec.core.url_to_fs(uri)
    root = path.rstrip("/")
    if fs.isfile(f"{root}/manifest.parquet") and fs.isdir(f"{root}/heldout") and fs.isdir(f"{root}/train"):
        return uri.rstrip("/") + "/train"
    return uri
