"""Before/after contact sheets of a restored collection, to judge a run at a glance.

One row per image: the observation (upscaled to the restoration's size, nearest neighbour, so its
pixels show), the restoration, and the reference when the run has one; each row labelled with its
name and scores. `report` picks the worst images and a few of the best from a run's manifest rows,
writes the sheet as a PNG under the output (OUTPUT/_manifests/_contact/run-<id>.png, which Parquet
readers of the manifest folder skip) and returns markdown that shows a JPEG preview of it inline
(the Prefect UI renders data: images in markdown artifacts) and names the PNG.
"""

from __future__ import annotations

import base64
import io
import posixpath
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

from gdp.io import ImageError, read_image, relative_path, write_image

CONTACT_DIR = "_manifests/_contact"
_LABEL = 18  # pixels of the text line above each row
_PAD = 4


@dataclass(frozen=True)
class SheetRow:
    label: str  # e.g. "worst 1: scans/a.png  PSNR 24.10 dB  consistency 35.20 dB"
    observation_uri: str
    restored_uri: str
    reference_uri: str | None = None


def pick(rows: Sequence[dict], output_uri: str, reference_uri: str | None = None, worst: int = 4,
         best: int = 2) -> list[SheetRow]:
    """The `worst` restored images by PSNR against the reference (by consistency PSNR without one),
    then the `best` ones, best first; all of them, worst first, when there are no more than that."""
    ok = [r for r in rows if r.get("status") == "ok"]
    key = "psnr" if reference_uri and any(r.get("psnr") is not None for r in ok) else "consistency_psnr"
    ok = sorted((r for r in ok if r.get(key) is not None), key=lambda r: r[key])
    chosen = [("worst", k, r) for k, r in enumerate(ok[:worst], 1)]
    chosen += [("best", k, r) for k, r in enumerate(reversed(ok[worst:][-best:] if best else []), 1)]
    sheet = []
    for kind, k, row in chosen:
        relpath = relative_path(output_uri, row["output_uri"])
        scores = "  ".join(f"{name} {row[field]:.2f} dB" for name, field in
                           (("PSNR", "psnr"), ("consistency", "consistency_psnr")) if row.get(field) is not None)
        reference = posixpath.join(reference_uri.rstrip("/"), relpath) if reference_uri else None
        sheet.append(SheetRow(f"{kind} {k}: {relpath}  {scores}", row["source_uri"], row["output_uri"], reference))
    return sheet


def contact_sheet(rows: Sequence[SheetRow], cell: int = 256, **storage_options) -> torch.Tensor:
    """The sheet as [3, H, W] in [0, 1]: a header, then per row its label and its images side by side,
    each fitted into cell x cell at the restoration's aspect ratio (all of a row at the same scale)."""
    from torchvision.utils import make_grid
    columns = 3 if any(r.reference_uri for r in rows) else 2
    blocks = [_text_strip(["observation (upscaled)", "restored", "reference"][:columns], cell, columns)]
    for row in rows:
        restored = read_image(row.restored_uri, **storage_options).pixels
        height, width = _fit(restored.shape[-2:], cell)
        images = [row.observation_uri, restored] + ([row.reference_uri] if columns == 3 else [])
        cells = [_cell(image, height, width, cell, storage_options) for image in images]
        blocks.append(_text_strip([row.label], cell, columns))
        blocks.append(make_grid(torch.stack(cells), nrow=columns, padding=_PAD, pad_value=1.0))
    return torch.cat(blocks, dim=1)


def report(rows: Sequence[dict], output_uri: str, run_id: str, reference_uri: str | None = None,
           storage_options: dict | None = None, cell: int = 256) -> str | None:
    """Write the contact sheet of a run's worst and best images; markdown that shows it, or None when
    nothing was restored. A sheet that cannot be made is reported in the markdown, not raised."""
    storage_options = storage_options or {}
    picked = pick(rows, output_uri, reference_uri)
    if not picked:
        return None
    uri = posixpath.join(output_uri.rstrip("/"), CONTACT_DIR, f"run-{run_id}.png")
    try:
        sheet = contact_sheet(picked, cell, **storage_options)
        write_image(uri, sheet, **storage_options)
    except (ImageError, OSError, ValueError) as e:
        return f"# Contact sheet\n\nNo contact sheet: {' '.join(str(e).split())}"
    basis = "PSNR against the reference" if reference_uri else "consistency PSNR (D(x) against y)"
    return "\n".join([
        "# Contact sheet", "",
        f"The {sum(r.label.startswith('worst') for r in picked)} worst and {sum(r.label.startswith('best') for r in picked)} "
        f"best restorations by {basis}: observation (upscaled, nearest), restored"
        f"{', reference' if reference_uri else ''}. Full size: `{uri}`", "",
        f"![contact sheet](data:image/jpeg;base64,{_jpeg_preview(sheet)})"])


def _fit(size: Sequence[int], cell: int) -> tuple[int, int]:
    height, width = int(size[0]), int(size[1])
    scale = cell / max(height, width)
    return max(1, round(height * scale)), max(1, round(width * scale))


def _cell(image: str | torch.Tensor, height: int, width: int, cell: int, storage_options: dict) -> torch.Tensor:
    """One image as RGB [3, cell, cell]: resized to height x width (nearest when enlarged, antialiased
    when reduced), centred on white."""
    x = image if isinstance(image, torch.Tensor) else read_image(image, **storage_options).pixels
    x = x.expand(-1, 3, -1, -1).float()
    if x.shape[-2] < height or x.shape[-1] < width:
        x = F.interpolate(x, size=(height, width), mode="nearest")
    else:
        x = F.interpolate(x, size=(height, width), mode="bilinear", antialias=True, align_corners=False)
    canvas = torch.ones(3, cell, cell)
    top, left = (cell - height) // 2, (cell - width) // 2
    canvas[:, top:top + height, left:left + width] = x[0].clamp(0, 1)
    return canvas


def _text_strip(texts: Sequence[str], cell: int, columns: int) -> torch.Tensor:
    """White strip as wide as a grid row, with one text per column (or one across the row)."""
    width = columns * (cell + _PAD) + _PAD
    strip = Image.new("RGB", (width, _LABEL), "white")
    draw = ImageDraw.Draw(strip)
    step = (cell + _PAD) if len(texts) > 1 else width
    for k, text in enumerate(texts):
        while len(text) > 8 and draw.textlength(text) > step - 2 * _PAD:  # long paths: cut in the middle
            text = text[:len(text) // 2 - 2] + "..." + text[len(text) // 2 + 2:]
        draw.text((_PAD + k * step, 3), text, fill="black")
    return torch.from_numpy(np.asarray(strip).copy()).permute(2, 0, 1).float() / 255


def _jpeg_preview(sheet: torch.Tensor, max_width: int = 720) -> str:
    """The sheet as a base64 JPEG at most `max_width` wide (small enough for an artifact)."""
    array = (sheet.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    image = Image.fromarray(array)
    if image.width > max_width:
        image = image.resize((max_width, round(image.height * max_width / image.width)), Image.Resampling.LANCZOS)
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=80)
    return base64.b64encode(buffer.getvalue()).decode("ascii")
