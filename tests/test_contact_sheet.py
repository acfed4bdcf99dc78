"""gdp.contact_sheet on real files: which images it shows, where each one lands, the artifact markdown."""

from __future__ import annotations

import base64
import io

import torch
from PIL import Image

from gdp.contact_sheet import CONTACT_DIR, SheetRow, contact_sheet, pick, report
from gdp.io import read_image, write_image

from conftest import photo


def _collection(tmp_path, n: int = 7):
    """n x2 super-resolution results: a 16x16 observation, a 32x32 'restoration' and a reference, and
    manifest rows whose PSNR rises with the index (image 0 is the worst)."""
    rows = []
    for k in range(n):
        clean = photo(32, 32, top=10 + 30 * k, left=100, step=2)
        obs = torch.nn.functional.avg_pool2d(clean, 2)
        for folder, image in (("in", obs), ("out", (clean + 0.1 * (n - k) / n).clamp(0, 1)), ("ref", clean)):
            write_image(str(tmp_path / folder / f"img{k}.png"), image)
        rows.append({"status": "ok", "source_uri": str(tmp_path / "in" / f"img{k}.png"),
                     "output_uri": str(tmp_path / "out" / f"img{k}.png"), "psnr": 20.0 + k,
                     "consistency_psnr": 40.0 - k})
    rows.append({"status": "failed", "source_uri": "x", "output_uri": "y", "psnr": None, "consistency_psnr": None})
    return rows


def test_pick_takes_the_worst_then_the_best(tmp_path):
    rows = _collection(tmp_path)
    picked = pick(rows, str(tmp_path / "out"), str(tmp_path / "ref"), worst=3, best=2)
    assert [r.label.split(":")[0] for r in picked] == ["worst 1", "worst 2", "worst 3", "best 1", "best 2"]
    assert [r.restored_uri.rsplit("/", 1)[-1] for r in picked] == ["img0.png", "img1.png", "img2.png", "img6.png",
                                                                   "img5.png"]
    assert picked[0].label == "worst 1: img0.png  PSNR 20.00 dB  consistency 40.00 dB"
    assert picked[0].reference_uri == str(tmp_path / "ref" / "img0.png")
    # without a reference: ranked by consistency (image 6 has the lowest), no reference column
    picked = pick(rows, str(tmp_path / "out"), None, worst=1, best=1)
    assert [r.restored_uri.rsplit("/", 1)[-1] for r in picked] == ["img6.png", "img0.png"]
    assert picked[0].reference_uri is None
    assert pick(rows[:2], str(tmp_path / "out"), None) == pick(rows[:2], str(tmp_path / "out"), None, worst=4)
    assert len(pick(rows[:2], str(tmp_path / "out"), None)) == 2 and pick([rows[-1]], "out") == []


def test_sheet_places_observation_restoration_and_reference_side_by_side(tmp_path):
    rows = _collection(tmp_path, n=2)
    picked = pick(rows, str(tmp_path / "out"), str(tmp_path / "ref"))
    sheet = contact_sheet(picked, cell=64)
    # header strip 18 + per row (label 18 + grid 4 + 64 + 4); 3 columns of 64 with 4 px padding
    assert sheet.shape == (3, 18 + 2 * (18 + 72), 3 * 68 + 4)
    top = 18 + 18 + 4  # first image row
    restored = read_image(str(tmp_path / "out" / "img0.png")).pixels[0]
    reference = read_image(str(tmp_path / "ref" / "img0.png")).pixels[0]
    observation = read_image(str(tmp_path / "in" / "img0.png")).pixels[0]
    scaled = torch.nn.functional.interpolate(restored[None], size=(64, 64), mode="nearest")[0]
    # the observation upscaled with nearest neighbour: each 16x16 pixel is a 4x4 block
    assert torch.equal(sheet[:, top:top + 64, 4:68], observation.repeat_interleave(4, 1).repeat_interleave(4, 2))
    assert torch.allclose(sheet[:, top:top + 64, 72:136], scaled, atol=1e-6)
    assert torch.allclose(sheet[:, top:top + 64, 140:204], torch.nn.functional.interpolate(
        reference[None], size=(64, 64), mode="nearest")[0], atol=1e-6)
    assert (sheet[:, :18].mean() > 0.8) and (sheet[:, :18].min() < 0.5)  # white header with dark text


def test_report_writes_the_png_and_markdown_with_an_inline_preview(tmp_path):
    rows = _collection(tmp_path)
    markdown = report(rows, str(tmp_path / "out"), "abc", str(tmp_path / "ref"), cell=64)
    png = tmp_path / "out" / CONTACT_DIR / "run-abc.png"
    with Image.open(png) as im:
        assert im.size == (3 * 68 + 4, 18 + 6 * 90)  # 4 worst + 2 best rows
    assert f"Full size: `{png}`" in markdown and "4 worst and 2 best restorations by PSNR" in markdown
    preview = markdown.split("data:image/jpeg;base64,", 1)[1].rstrip(")")
    with Image.open(io.BytesIO(base64.b64decode(preview))) as im:
        assert im.format == "JPEG" and im.size == (3 * 68 + 4, 18 + 6 * 90)
    assert report([rows[-1]], str(tmp_path / "out"), "none") is None  # nothing restored: no sheet
    broken = [{**rows[0], "source_uri": str(tmp_path / "missing.png")}]
    assert "No contact sheet:" in report(broken, str(tmp_path / "out"), "broken") and \
        str(tmp_path / "missing.png") in report(broken, str(tmp_path / "out"), "broken")


def test_gray_and_different_sizes_fit_one_row(tmp_path):
    gray = photo(20, 40, name="camera", top=10, left=10)
    write_image(str(tmp_path / "obs.png"), gray)
    write_image(str(tmp_path / "out.png"), torch.nn.functional.interpolate(gray, scale_factor=2).expand(-1, 3, -1, -1))
    sheet = contact_sheet([SheetRow("one", str(tmp_path / "obs.png"), str(tmp_path / "out.png"))], cell=80)
    assert sheet.shape == (3, 18 + 18 + 88, 2 * 84 + 4)
    cell = sheet[:, 18 + 18 + 4:18 + 18 + 84, 4:84]
    assert torch.equal(cell[:, :20], torch.ones(3, 20, 80))  # 80x40 fitted into 80x80: centred on white
    assert torch.equal(cell[0, 20:60], cell[1, 20:60])  # gray shown as gray
