"""`gdp data build`: the prior's training set from Debian packages and scikit-image.

Packages are real .deb files built here with `dpkg-deb -b` from small trees holding real photos
(scikit-image's), fed to `build_dataset` through its `download` parameter; the failing download
runs the real `apt-get download` on a package that does not exist. One slow test builds the
smallest listed package from Debian's registry and is skipped when it cannot be reached.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import skimage.data
from PIL import Image

from gdp import data as gd
from gdp.cli import EXIT_BAD_INPUT, main

needs_dpkg = pytest.mark.skipif(shutil.which("dpkg-deb") is None, reason="needs dpkg-deb")
PRIOR_MD = Path(__file__).parent.parent / "docs" / "PRIOR.md"


def jpeg(name: str, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(getattr(skimage.data, name)()).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def make_deb(folder: Path, package: str, version: str, files: dict[str, bytes]) -> Path:
    """A real .deb (dpkg-deb -b) holding `files` (paths relative to /)."""
    root = folder / f"{package}-tree"
    (root / "DEBIAN").mkdir(parents=True)
    (root / "DEBIAN" / "control").write_text(
        f"Package: {package}\nVersion: {version}\nArchitecture: all\nMaintainer: gdp tests <t@example.org>\n"
        f"Description: test photos\n")
    for path, content in files.items():
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        (root / path).write_bytes(content)
    deb = folder / f"{package}_{version}_all.deb"
    subprocess.run(["dpkg-deb", "-Zgzip", "--root-owner-group", "-b", str(root), str(deb)], check=True,
                   capture_output=True)
    shutil.rmtree(root)
    return deb


class LocalRegistry:
    """A downloader for build_dataset: builds each package's .deb from `trees` into the folder it
    is given (like apt-get download) and records the packages asked for."""

    def __init__(self, trees: dict[str, tuple[str, dict[str, bytes]]]):
        self.trees, self.asked = trees, []

    def __call__(self, package: str, version: str, dest: Path) -> Path:
        self.asked.append(package)
        deb_version, files = self.trees[package]
        return make_deb(dest, package, deb_version, files)


def source(name, package, path, content: bytes, licence="CC0-1.0", role="train", **kw) -> gd.Source:
    w, h = Image.open(io.BytesIO(content)).size
    return gd.Source(name=name, package=package, path=path, sha256=hashlib.sha256(content).hexdigest(),
                     width=w, height=h, licence=licence, role=role, **kw)


def source_list(files, versions) -> gd.SourceList:
    return gd.SourceList(versions, tuple(files), ("CC0-1.0", "public-domain", "CC-BY-3.0", "CC-BY-4.0"))


def leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if ".tmp-" in p.name or ".old-" in p.name)


def one_line(e: Exception) -> str:
    text = str(e)
    assert "\n" not in text and text.strip() == text
    return text


# ------------------------------------------------------------------ the source list kept in the repo

def test_repo_source_list_matches_the_issue_and_scikit_image():
    s = gd.load_sources()
    counts = {}
    for f in s.files:
        counts[f.package] = counts.get(f.package, 0) + 1
    assert counts == {"plasma-workspace-wallpapers": 11, "mate-backgrounds": 12, "lomiri-wallpapers-16.04": 13,
                      "lomiri-wallpapers-20.04": 1, "lxqt-themes": 11, "palapeli-data": 5, "visp-images-data": 1,
                      "scikit-image": 17}
    debian = [f for f in s.files if f.package != "scikit-image"]
    assert len(debian) == 54
    assert sum(f.width * f.height for f in debian) == 266_562_574
    assert all(re.fullmatch(r"[0-9a-f]{64}", f.sha256) for f in s.files)
    assert all(f.role in ("train", "heldout") for f in s.files)
    assert s.versions["plasma-workspace-wallpapers"] == "4:5.27.5-2"
    assert {f.name for f in s.files if f.min_factor != 2} == {  # block grid still there after 2x
        "Butterfly-Kenneth-Wimer", "beam", "FreshFlower", "Wine_by_Jakkub_Mede", "Aqua", "Garden", "TwoWings"}
    assert {f.min_factor for f in s.files} == {2, 4}
    heldout = sorted(f.name for f in s.files if f.role == "heldout")
    assert heldout == ["Wine_by_Jakkub_Mede", "astronaut", "cincinnati-bridge", "coffee",
                       "life_by_Aitzol_Berasategi", "sunset_by_Aitzol_Berasategi", "text"]
    # the permissive set: 9 lomiri 16.04 photos (CC-BY-4.0, one CC0), 3 public-domain puzzles, 12 scikit-image
    permissive = s.select(permissive_only=True)
    assert len(permissive) == 24
    assert {f.licence for f in permissive} == {"CC0-1.0", "CC-BY-4.0", "public-domain"}
    assert not any(s.is_permissive(x) for x in ("CC-BY-SA-4.0", "CC-BY-SA-3.0", "GFDL", "GPL-2.0-only",
                                                    "LGPL-3.0-only", "unstated", "no-known-restrictions"))
    # the scikit-image photos in the list are the installed ones, byte for byte
    root = gd.skimage_root()
    for f in s.files:
        if f.package == "scikit-image":
            assert hashlib.sha256((root / f.path).read_bytes()).hexdigest() == f.sha256, f.path


def test_repo_source_list_keeps_the_documented_scikit_image_split():
    """The 14 training photos of docs/PRIOR.md stay in training; astronaut and coffee stay out."""
    s = gd.load_sources()
    sk_train = {f.path.rsplit("/", 1)[-1] for f in s.files if f.package == "scikit-image" and f.role == "train"}
    row = next(line for line in PRIOR_MD.read_text().splitlines() if line.startswith("| training data |"))
    assert sk_train == set(re.findall(r"`([a-z_]+\.(?:png|jpg))`", row))
    assert len(sk_train) == 14
    sk_out = {f.name for f in s.files if f.package == "scikit-image" and f.role == "heldout"}
    assert {"astronaut", "coffee"} <= sk_out


def test_load_sources_refuses_a_duplicate_name(tmp_path):
    doc = json.loads(gd.SOURCES.read_text())
    doc["files"][1]["name"] = doc["files"][0]["name"]
    bad = tmp_path / "sources.json"
    bad.write_text(json.dumps(doc))
    with pytest.raises(gd.DataError, match="used twice") as e:
        gd.load_sources(bad)
    assert str(bad) in one_line(e.value)


# ------------------------------------------------------------------ downscaling

def test_downscale_size_is_at_least_2x_and_fits_max_side():
    assert gd.downscale_size(2560, 1600) == (1280, 800)
    assert gd.downscale_size(6028, 3391) == (1280, 720)  # 4.71x
    assert gd.downscale_size(1365, 1074) == (682, 537)   # rounded down: 2.0015x and 2.0000x
    assert gd.downscale_size(1024, 681) == (512, 340)
    for w, h in [(2560, 1600), (6028, 3391), (1365, 1074), (1024, 681), (2056, 3088), (333, 999)]:
        nw, nh = gd.downscale_size(w, h)
        assert w / nw >= 2 and h / nh >= 2 and max(nw, nh) <= 1280


def test_downscale_averages_light_linearly():
    """A one-pixel 0/255 checkerboard halves to mid-gray in linear light: sRGB 188, not 128."""
    checker = ((np.indices((64, 64)).sum(0) % 2) * 255).astype(np.uint8)
    small = np.asarray(gd.downscale(Image.fromarray(checker), (32, 32)))
    assert small.shape == (32, 32)
    assert np.abs(small[8:24, 8:24].astype(int) - 188).max() <= 2
    rgb = gd.downscale(Image.fromarray(np.stack([checker] * 3, -1)), (32, 32))
    assert rgb.mode == "RGB" and np.array_equal(np.asarray(rgb)[..., 1], small)


def test_block_grid_of_a_jpeg_at_2x_and_4x():
    """The measure behind min_factor: astronaut as PNG has no 8-px grid; as a quality-40 JPEG the
    grid is gone after 2x; at quality 20 it still shows after 2x and is gone after 4x."""
    png = Image.fromarray(skimage.data.astronaut())
    q40, q20 = (Image.open(io.BytesIO(jpeg("astronaut", quality=q))).convert("RGB") for q in (40, 20))
    assert gd.block_grid_ratio(png) < 1.03
    assert gd.block_grid_ratio(q40) > 1.35 and gd.block_grid_ratio(q20) > 1.7
    assert gd.block_grid_ratio(q20, period=7) < 1.03  # the grid is at 8 pixels
    assert gd.block_grid_ratio(gd.downscale(q40, (256, 256)), period=4) < 1.03
    assert gd.block_grid_ratio(gd.downscale(q20, (256, 256)), period=4) > 1.05
    assert gd.block_grid_ratio(gd.downscale(q20, (128, 128)), period=2) < 1.04


# ------------------------------------------------------------------ builds from local .debs

@needs_dpkg
def test_build_writes_downscaled_photos_and_a_manifest(tmp_path):
    big, small = jpeg("chelsea"), jpeg("rocket", quality=80)  # 451x300 and 640x427
    files = [source("cat", "photos", "usr/share/p/cat.jpg", big, author="Stefan van der Walt"),
             source("rocket", "photos", "usr/share/p/rocket.jpg", small, licence="public-domain", role="heldout",
                    min_factor=4),
             source("chelsea", "scikit-image", "skimage/data/chelsea.png",
                    (gd.skimage_root() / "skimage/data/chelsea.png").read_bytes(), licence="CC0-1.0")]
    registry = LocalRegistry({"photos": ("1.0-1", {"usr/share/p/cat.jpg": big, "usr/share/p/rocket.jpg": small,
                                                   "usr/share/p/unused.jpg": jpeg("coffee")})})
    out = tmp_path / "set"
    report = gd.build_dataset(out, sources=source_list(files, {"photos": "1.0-1"}), download=registry,
                              max_side=200, log=lambda m: None)
    assert registry.asked == ["photos"]
    m = pd.read_parquet(out / "manifest.parquet")
    assert list(m.columns) == list(gd.MANIFEST_COLUMNS)
    assert len(m) == 3 and report.files == 3 and report.train == 2 and report.heldout == 1
    assert sorted(m["file"]) == ["heldout/photos/rocket.png", "train/photos/cat.png", "train/scikit-image/chelsea.png"]
    on_disk = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    assert on_disk == sorted(list(m["file"]) + ["manifest.parquet"])
    for row in m.itertuples():
        data = (out / row.file).read_bytes()
        assert hashlib.sha256(data).hexdigest() == row.sha256 and len(data) == row.bytes
        assert Image.open(out / row.file).size == (row.width, row.height)
    cat = m.set_index("file").loc["train/photos/cat.png"]
    assert (cat.source_width, cat.source_height) == (451, 300)
    assert (cat.width, cat.height) == (200, 133)  # 2.255x: the longest side fits max_side
    assert cat.package_version == "1.0-1" and cat.author == "Stefan van der Walt" and cat.source_sha256 == files[0].sha256
    rocket = m.set_index("file").loc["heldout/photos/rocket.png"]
    assert (rocket.width, rocket.height) == (160, 106)  # its min_factor 4, not the 3.2x max_side asks for
    deb_rows = m[m["package"] == "photos"]
    assert (deb_rows["source_width"] / deb_rows["width"] >= 2).all()
    assert (deb_rows["source_height"] / deb_rows["height"] >= 2).all()
    assert (deb_rows["scale"] >= 2).all()
    sk = m.set_index("file").loc["train/scikit-image/chelsea.png"]
    assert sk.sha256 == sk.source_sha256 and sk.scale == 1.0  # copied unchanged
    assert report.source_megapixels == pytest.approx((451 * 300 + 640 * 427) / 1e6)
    assert report.bytes == sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    assert leftovers(tmp_path) == []
    # training on the set's root reads train/ only
    from gdp.train import load_training_images
    images, skipped = load_training_images(str(out), crop=64)
    assert len(images) == 2 and skipped == []


@needs_dpkg
def test_permissive_only_keeps_cc0_public_domain_and_cc_by(tmp_path):
    photo = jpeg("chelsea")
    licences = ["CC0-1.0", "public-domain", "CC-BY-4.0", "CC-BY-SA-4.0", "GPL-2.0-or-later", "GFDL"]
    files = [source(f"p{k}", "mixed", f"usr/share/p/{k}.jpg", photo, licence=lic) for k, lic in enumerate(licences)]
    files.append(source("gpl", "gplonly", "usr/share/g/g.jpg", photo, licence="GPL-2.0-only"))
    trees = {"mixed": ("2", {f"usr/share/p/{k}.jpg": photo for k in range(len(licences))}),
             "gplonly": ("3", {"usr/share/g/g.jpg": photo})}
    registry = LocalRegistry(trees)
    out = tmp_path / "permissive"
    gd.build_dataset(out, permissive_only=True, sources=source_list(files, {"mixed": "2", "gplonly": "3"}),
                     download=registry, log=lambda m: None)
    m = pd.read_parquet(out / "manifest.parquet")
    assert sorted(m["licence"]) == ["CC-BY-4.0", "CC0-1.0", "public-domain"]
    assert m["permissive"].all() and len(m) == 3
    assert registry.asked == ["mixed"]  # a package without a permissive file is not downloaded
    full = tmp_path / "full"
    gd.build_dataset(full, sources=source_list(files, {"mixed": "2", "gplonly": "3"}), download=LocalRegistry(trees),
                     log=lambda m: None)
    assert len(pd.read_parquet(full / "manifest.parquet")) == 7


@needs_dpkg
def test_a_changed_file_is_refused_with_one_line_and_nothing_written(tmp_path):
    good, changed = jpeg("chelsea"), jpeg("chelsea", quality=89)
    files = [source("a", "first", "usr/share/a/a.jpg", good),
             source("cat", "second", "usr/share/b/cat.jpg", good)]
    registry = LocalRegistry({"first": ("1", {"usr/share/a/a.jpg": good}),
                              "second": ("1", {"usr/share/b/cat.jpg": changed})})
    out = tmp_path / "set"
    with pytest.raises(gd.DataError) as e:
        gd.build_dataset(out, sources=source_list(files, {"first": "1", "second": "1"}), download=registry,
                         log=lambda m: None)
    line = one_line(e.value)
    assert line.startswith("second: usr/share/b/cat.jpg: sha256 ") and "does not match" in line
    assert hashlib.sha256(changed).hexdigest()[:16] in line and files[1].sha256[:16] in line
    assert registry.asked == ["first", "second"]  # the first package was done: it is not kept
    assert not out.exists() and leftovers(tmp_path) == []


@needs_dpkg
def test_a_missing_file_or_another_version_is_named(tmp_path):
    photo = jpeg("chelsea")
    files = [source("a", "pkg", "usr/share/a/a.jpg", photo), source("b", "pkg", "usr/share/a/b.jpg", photo)]
    sources = source_list(files, {"pkg": "1.0"})
    with pytest.raises(gd.DataError) as e:
        gd.build_dataset(tmp_path / "x", sources=sources, download=LocalRegistry({"pkg": ("1.0", {"usr/share/a/a.jpg": photo})}),
                         log=lambda m: None)
    assert one_line(e.value).startswith("pkg: usr/share/a/b.jpg: not found in pkg_1.0_all.deb")
    with pytest.raises(gd.DataError) as e:
        gd.build_dataset(tmp_path / "x", sources=sources, log=lambda m: None,
                         download=LocalRegistry({"pkg": ("1.1", {"usr/share/a/a.jpg": photo, "usr/share/a/b.jpg": photo})}))
    assert one_line(e.value) == "pkg: pkg_1.1_all.deb is pkg 1.1, expected pkg 1.0"
    assert not (tmp_path / "x").exists() and leftovers(tmp_path) == []


@pytest.mark.skipif(shutil.which("apt-get") is None, reason="needs apt-get")
@needs_dpkg
def test_a_failing_apt_get_download_leaves_no_output(tmp_path):
    """The real apt-get, asked for a package that no registry has: one line naming it, no OUT."""
    photo = jpeg("chelsea")
    files = [source("a", "first", "usr/share/a/a.jpg", photo),
             source("b", "gdp-test-no-such-package", "usr/share/b/b.jpg", photo)]
    local = LocalRegistry({"first": ("1", {"usr/share/a/a.jpg": photo})})

    def download(package, version, dest):
        return local(package, version, dest) if package == "first" else gd.apt_download(package, version, dest)

    out = tmp_path / "set"
    with pytest.raises(gd.DataError) as e:
        gd.build_dataset(out, sources=source_list(files, {"first": "1", "gdp-test-no-such-package": "9.9"}),
                         download=download, log=lambda m: None)
    assert one_line(e.value).startswith("gdp-test-no-such-package 9.9: apt-get download failed: E: ")
    assert not out.exists() and leftovers(tmp_path) == []


@pytest.mark.skipif(shutil.which("apt-get") is None, reason="needs apt-get")
def test_no_network_gdp_data_build_fails_on_one_line(tmp_path, capsys, monkeypatch):
    """`gdp data build` with the repo's list and apt pointed at a closed port (no network)."""
    conf = tmp_path / "apt.conf"
    conf.write_text('Acquire::Retries "0";\nAcquire::http::Proxy "http://127.0.0.1:9";\n'
                    'Acquire::https::Proxy "http://127.0.0.1:9";\n')
    monkeypatch.setenv("APT_CONFIG", str(conf))
    out = tmp_path / "set"
    code = main(["data", "build", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == EXIT_BAD_INPUT
    assert err[:1] == ["gdp data: plasma-workspace-wallpapers 4:5.27.5-2: downloading"]  # progress, then
    assert [line for line in err if "error" in line] == err[-1:]  # the error: the last line, the only one
    assert err[-1].startswith("gdp: error: plasma-workspace-wallpapers 4:5.27.5-2: apt-get download failed: E: ")
    assert not out.exists() and leftovers(tmp_path) == []


@needs_dpkg
def test_an_existing_output_is_kept_unless_overwrite(tmp_path, capsys):
    photo = jpeg("chelsea")
    files = [source("a", "pkg", "usr/share/a/a.jpg", photo)]
    sources = source_list(files, {"pkg": "1"})
    registry = LocalRegistry({"pkg": ("1", {"usr/share/a/a.jpg": photo})})
    out = tmp_path / "set"
    out.mkdir()
    (out / "mine.txt").write_text("keep me")
    with pytest.raises(gd.DataError) as e:
        gd.build_dataset(out, sources=sources, download=registry, log=lambda m: None)
    assert one_line(e.value) == f"{out}: exists and is not empty; use --overwrite to replace it"
    assert registry.asked == [] and (out / "mine.txt").read_text() == "keep me"
    code = main(["data", "build", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == EXIT_BAD_INPUT and len(err) == 1 and "use --overwrite" in err[0]
    gd.build_dataset(out, sources=sources, download=registry, overwrite=True, log=lambda m: None)
    assert sorted(p.name for p in out.iterdir()) == ["manifest.parquet", "train"]
    assert leftovers(tmp_path) == []
    empty = tmp_path / "empty"
    empty.mkdir()  # an empty folder is no data set: written without --overwrite
    gd.build_dataset(empty, sources=sources, download=registry, log=lambda m: None)
    assert (empty / "train" / "pkg" / "a.png").is_file()


# ------------------------------------------------------------------ the registry itself

@pytest.mark.slow
@pytest.mark.skipif(shutil.which("apt-get") is None or shutil.which("dpkg-deb") is None,
                    reason="needs apt-get and dpkg-deb")
def test_real_build_of_palapeli_data(tmp_path):
    """palapeli-data (2 MB) from Debian's registry, checked against the repo's source list."""
    s = gd.load_sources()
    files = [f for f in s.files if f.package == "palapeli-data"]
    try:
        gd.build_dataset(tmp_path / "set", sources=gd.SourceList(s.versions, tuple(files), s.permissive_licences),
                         log=lambda m: None)
    except gd.DataError as e:
        if "apt-get download failed" in str(e) and any(
                k in str(e) for k in ("no network", "package lists", "Unable to locate", "Failed to fetch")):
            pytest.skip(f"Debian's registry is not reachable here: {e}")
        raise
    m = pd.read_parquet(tmp_path / "set" / "manifest.parquet")
    assert len(m) == 5 and set(m["package_version"]) == {"4:22.12.3-1"}
    assert sorted(m["file"][m["role"] == "heldout"]) == ["heldout/palapeli-data/cincinnati-bridge.png"]
    assert (m["width"] == m["source_width"] // 2).all() and (m["height"] == m["source_height"] // 2).all()
    assert sorted(m["licence"]) == ["GFDL", "GFDL", "public-domain", "public-domain", "public-domain"]
