"""gdp.tiling: window plans, blending weights, exact split/merge round trips, streaming, seams."""

from __future__ import annotations

import pytest
import torch

from gdp.tiling import (StreamingMerger, Window, blend_window, border_mask, merge, pad_to_min,
                        plan_windows, split, unpad)

KINDS = ["uniform", "smooth"]


def _offsets(windows: list[Window]) -> tuple[list[int], list[int]]:
    return sorted({w.top for w in windows}), sorted({w.left for w in windows})


# --- plans ------------------------------------------------------------------------------------


@pytest.mark.parametrize("height, width, patch, stride, rows, cols", [
    (256, 384, 256, 128, [0], [0, 128]),
    (400, 600, 256, 128, [0, 128, 144], [0, 128, 256, 344]),
    (37, 31, 16, 7, [0, 7, 14, 21], [0, 7, 14, 15]),
    (16, 16, 16, 1, [0], [0]),
])
def test_plan_offsets(height, width, patch, stride, rows, cols):
    windows = plan_windows(height, width, patch, stride)
    assert _offsets(windows) == (rows, cols)
    assert len(windows) == len(rows) * len(cols) == len(set(windows))
    assert windows == sorted(windows, key=lambda w: (w.top, w.left))  # row-major
    assert all(w.size == patch for w in windows)


def test_plan_large_image_count():
    windows = plan_windows(1060, 1900, 256, 128)
    rows, cols = _offsets(windows)
    assert (len(rows), len(cols), len(windows)) == (8, 14, 112)
    assert (rows[-1], cols[-1]) == (804, 1644)


@pytest.mark.parametrize("height, width, patch, stride", [(37, 31, 16, 7), (64, 64, 16, 16), (50, 20, 20, 3)])
def test_plan_covers_every_pixel_within_bounds(height, width, patch, stride):
    covered = torch.zeros(height, width, dtype=torch.int64)
    for w in plan_windows(height, width, patch, stride):
        assert 0 <= w.top and w.bottom <= height and 0 <= w.left and w.right <= width
        covered[w.index] += 1
    assert bool((covered > 0).all())


@pytest.mark.parametrize("height, width, patch, stride, match", [
    (10, 40, 16, 8, "pad it first with pad_to_min"),
    (40, 40, 16, 0, "1 <= stride <= patch"),
    (40, 40, 16, 17, "1 <= stride <= patch"),
    (40, 40, 0, 1, "1 <= stride <= patch"),
])
def test_plan_rejects_impossible_requests(height, width, patch, stride, match):
    with pytest.raises(ValueError, match=match):
        plan_windows(height, width, patch, stride)


def test_window_helpers():
    w = Window(top=2, left=3, size=4)
    x = torch.arange(2 * 10 * 10).reshape(2, 10, 10)
    assert (w.bottom, w.right) == (6, 7)
    assert torch.equal(x[w.index], x[:, 2:6, 3:7])
    assert torch.equal(x[..., w.rows, w.cols], x[:, 2:6, 3:7])


# --- weights ----------------------------------------------------------------------------------


@pytest.mark.parametrize("patch", [1, 2, 7, 16, 256])
def test_smooth_window_is_symmetric_and_positive(patch):
    w = blend_window(patch, "smooth", "cpu", torch.float32)
    assert w.shape == (patch, patch) and w.dtype == torch.float32
    assert torch.equal(w, w.flip(0)) and torch.equal(w, w.flip(1)) and torch.equal(w, w.T)
    assert float(w.min()) > 0 and float(w.max()) <= 1
    if patch >= 16:  # a real taper: centre much heavier than the corners
        assert float(w[patch // 2, patch // 2]) > 0.9 and float(w[0, 0]) < 0.01


def test_uniform_window_is_ones_and_unknown_kind_fails():
    assert torch.equal(blend_window(5, "uniform", None, torch.float64), torch.ones(5, 5, dtype=torch.float64))
    with pytest.raises(ValueError, match="use 'uniform' or 'smooth'"):
        blend_window(5, "hann")  # type: ignore[arg-type]


# --- split / merge ----------------------------------------------------------------------------


def test_split_layout_is_image_major():
    x = torch.rand(2, 3, 37, 31)
    windows = plan_windows(37, 31, 16, 7)
    patches = split(x, windows)
    assert patches.shape == (2 * len(windows), 3, 16, 16)
    assert torch.equal(patches[len(windows) + 5], x[1][windows[5].index])


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("height, width, patch, stride", [(37, 31, 16, 7), (40, 40, 16, 16), (31, 37, 31, 1)])
def test_merge_of_split_is_identity(kind, height, width, patch, stride):
    x = torch.rand(2, 3, height, width, generator=torch.Generator().manual_seed(0))
    windows = plan_windows(height, width, patch, stride)
    y = merge(split(x, windows), windows, height, width, blend_window(patch, kind))
    assert y.shape == x.shape
    torch.testing.assert_close(y, x, rtol=0, atol=1e-6)


def test_merge_averages_disagreeing_patches_by_weight():
    windows = plan_windows(4, 6, 4, 2)  # two windows overlapping in columns 2..3
    patches = torch.stack([torch.zeros(1, 4, 4), torch.ones(1, 4, 4)])
    weight = torch.full((4, 4), 1.0)
    weight[:, :2] = 3.0  # the second window's left half weighs 3 in the overlap
    y = merge(patches, windows, 4, 6, weight)
    assert y[0, 0, 0].tolist() == [0.0, 0.0, 0.75, 0.75, 1.0, 1.0]


def test_merge_rejects_bad_inputs():
    windows = plan_windows(8, 8, 4, 4)
    with pytest.raises(ValueError, match=r"need patches \[B\*4, C, p, p\]"):
        merge(torch.zeros(3, 1, 4, 4), windows, 8, 8, torch.ones(4, 4))
    with pytest.raises(ValueError, match="do not cover every pixel"):
        merge(torch.zeros(3, 1, 4, 4), windows[:3], 8, 8, torch.ones(4, 4))


# --- padding ----------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["reflect", "replicate", "constant"])
@pytest.mark.parametrize("height, width", [(10, 40), (3, 5), (1, 1), (40, 40)])
def test_pad_to_min_and_unpad(mode, height, width):
    x = torch.rand(2, 3, height, width)
    padded, pads = pad_to_min(x, 16, mode)
    assert padded.shape == (2, 3, max(16, height), max(16, width))
    assert pads == (max(0, 16 - height), max(0, 16 - width))
    assert torch.equal(padded[..., :height, :width], x) and torch.equal(unpad(padded, pads), x)
    plan_windows(*padded.shape[-2:], 16, 8)  # now plannable


def test_reflect_padding_mirrors():
    x = torch.tensor([[1.0, 2.0, 3.0]])
    padded, _ = pad_to_min(x, 7)
    assert padded[0].tolist() == [1.0, 2.0, 3.0, 2.0, 1.0, 2.0, 3.0]
    assert padded.shape == (7, 7)


# --- streaming --------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_streaming_merger_equals_merge_and_streams_rows(kind):
    height, width, patch, stride = 37, 31, 16, 7
    x = torch.rand(1, 3, height, width, generator=torch.Generator().manual_seed(1))
    noisy = split(x, plan_windows(height, width, patch, stride)) + 0.1 * torch.rand(16, 3, patch, patch)
    streamed: list[tuple[int, torch.Tensor]] = []
    merger = StreamingMerger(height, width, 3, patch, stride, kind,
                             on_rows=lambda first, rows: streamed.append((first, rows.clone())))

    readiness = []
    for window, p in zip(merger.windows, noisy):
        merger.add(window, p)
        readiness.append(merger.rows_ready())
    expected = merge(noisy, merger.windows, height, width, blend_window(patch, kind))[0]

    assert torch.equal(merger.finish(), expected)
    assert readiness[3::4] == [7, 14, 21, 37]  # a window row completes every 4 windows
    assert [first for first, _ in streamed] == [0, 7, 14, 21]
    assert torch.equal(torch.cat([rows for _, rows in streamed], dim=1), expected)


def test_streaming_merger_out_of_order_and_errors():
    merger = StreamingMerger(20, 20, 1, 10, 10, "smooth")
    last, *others = reversed(merger.windows)
    merger.add(last, torch.ones(1, 10, 10))
    assert merger.rows_ready() == 0
    with pytest.raises(ValueError, match="already added"):
        merger.add(last, torch.ones(1, 10, 10))
    with pytest.raises(ValueError, match="not in the plan"):
        merger.add(Window(1, 1, 10), torch.ones(1, 10, 10))
    with pytest.raises(ValueError, match=r"patch must be \[1, 10, 10\]"):
        merger.add(others[0], torch.ones(3, 10, 10))
    with pytest.raises(ValueError, match="3 of 4 windows were never added"):
        merger.finish()
    for window in others:
        merger.add(window, torch.ones(1, 10, 10))
    torch.testing.assert_close(merger.finish(), torch.ones(1, 20, 20))


# --- seams ------------------------------------------------------------------------------------


def test_border_mask_marks_interior_edges_only():
    windows = plan_windows(10, 10, 6, 4)  # offsets [0, 4]: interior edges at lines 4 and 6
    mask = border_mask(10, 10, windows, band=1)
    near = torch.zeros(10, dtype=torch.bool)
    near[3:7] = True  # pixels 3, 4 (around line 4) and 5, 6 (around line 6)
    assert torch.equal(mask, near[:, None] | near[None, :])
    assert not border_mask(10, 10, plan_windows(10, 10, 10, 5)).any()  # one window: no seams


def test_border_mask_band_and_partial_edges():
    windows = [Window(0, 0, 4), Window(0, 4, 4)]  # side by side in an 8x8 image, rows 4..7 uncovered
    mask = border_mask(8, 8, windows, band=2)
    expected = torch.zeros(8, 8, dtype=torch.bool)
    expected[2:6, :] = True  # bottom edges at line 4, both windows
    expected[:4, 2:6] = True  # the shared vertical edge at column 4, within the windows' rows
    assert torch.equal(mask, expected)
