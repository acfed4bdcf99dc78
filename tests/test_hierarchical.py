"""Hierarchical tiling: exact local operators, independence of windows, the whole restore path."""

import pytest
import torch

from gdp.hierarchical import (global_pass, localize, merge_windows, plan_hierarchical, restore_windows)
from gdp.guidance import Guidance
from gdp.operators import make_operator
from gdp.restore import plan_tiling, restore

CASES = [("sr", {"factor": 4}), ("sr", {"factor": 2}), ("deblur", {}), ("deblur", {"mode": "valid"}),
         ("deblur", {"sigma": 1.5, "kernel_size": 6}), ("inpaint", {"ratio": 0.3, "seed": 1}), ("colorize", {})]


@pytest.mark.parametrize("task,opts", CASES)
def test_local_operator_is_the_exact_restriction_of_A(task, opts):
    """A_local(x[window]) equals the window's crop of A(x): guidance per window loses nothing."""
    op = make_operator(task, **opts)
    g = torch.Generator().manual_seed(0)
    x = torch.rand(1, 3, 88, 72, generator=g, dtype=torch.float64)
    y = op.A(x)
    plan = plan_hierarchical(88, 72, 32, 24, align=opts.get("factor", 1))
    local, y_local = localize(op, y, list(plan.windows))
    patches = torch.stack([x[0][w.index] for w in plan.windows])
    assert len(plan.windows) == 12
    torch.testing.assert_close(local.A(patches), y_local, rtol=0, atol=1e-12)


def test_plan_aligns_windows_to_the_sr_factor_and_picks_a_coarse_scale():
    plan = plan_hierarchical(256, 384, 64, 48, align=4)
    assert all(w.top % 4 == 0 and w.left % 4 == 0 for w in plan.windows)
    assert plan.scale == 4 and plan.coarse_size == (64, 96)
    assert plan_tiling(256, 384, 64, "auto")["mode"] == "fused"
    assert plan_tiling(2048, 2048, 64, "auto")["mode"] == "hierarchical"
    assert plan_tiling(64, 64, 64, "auto")["mode"] == "single"


def test_windows_restored_separately_and_merged_equal_the_in_process_result(tiny_prior):
    """Any subset of windows can run elsewhere: window k's result depends only on (seed, k)."""
    torch.manual_seed(0)
    op = make_operator("sr", factor=2)
    y = torch.rand(1, 3, 32, 28)
    plan = plan_hierarchical(64, 56, 32, 24, align=2)
    guidance = Guidance(scale=8000)
    coarse, _ = global_pass(y, op, tiny_prior, plan, 3, 5, guidance)
    n = len(plan.windows)
    together, nfe = restore_windows(y, op, tiny_prior, plan, coarse, list(range(n)), 3, 5, guidance, batch_size=n)
    parts = [restore_windows(y, op, tiny_prior, plan, coarse, [k], 3, 5, guidance, batch_size=1)[0] for k in
             reversed(range(n))]
    separate = torch.cat(parts[::-1])
    assert nfe == 3 * n
    torch.testing.assert_close(separate, together, rtol=0, atol=2e-5)
    merged = merge_windows(separate, plan)
    torch.testing.assert_close(merged, merge_windows(together, plan), rtol=0, atol=2e-5)
    assert merged.shape == (1, 3, 64, 56)


def test_hierarchical_restore_end_to_end(tiny_prior):
    torch.manual_seed(1)
    y = torch.rand(1, 3, 40, 36)
    result = restore(y, "sr", tiny_prior, factor=2, steps=3, tiling="hierarchical", guidance=Guidance(scale=8000))
    assert result.image.shape == (1, 3, 80, 72)
    assert result.tiling["mode"] == "hierarchical" and result.tiling["n_patches"] == len(
        plan_hierarchical(80, 72, 32, 24, 2).windows)
    # NFE = coarse pass (40x36 at scale 2: 4 fused windows) + every full-resolution window, per step
    from gdp.tiling import plan_windows
    assert result.nfe == 3 * (len(plan_windows(40, 36, 32, 24)) + result.tiling["n_patches"])
    assert 0 <= result.image.min() and result.image.max() <= 1
    assert result.consistency_psnr.item() > 20


@pytest.mark.parametrize("task,opts", [("sr", {"factor": 2}), ("blind-deblur", {"kernel_size": 5})])
def test_hierarchical_restore_reports_progress_to_the_end(tiny_prior, task, opts):
    """The callback counts patch-steps: 1 per coarse step and `steps` per window, for every image
    and sample, rising to exactly its total (a blind operator's several coarse chains included)."""
    torch.manual_seed(2)
    y = torch.rand(2, 3, 40, 36) if task == "sr" else torch.rand(2, 3, 80, 72)
    calls = []
    r = restore(y, task, tiny_prior, steps=3, samples=2, tiling="hierarchical", guidance=Guidance(scale=8000),
                callback=lambda done, total: calls.append((done, total)), **opts)
    n_windows = r.tiling["n_patches"]
    total = 2 * 2 * 3 * (n_windows + 1)
    assert {t for _, t in calls} == {total}
    assert calls[-1][0] == total and [d for d, _ in calls] == sorted(d for d, _ in calls)
    # per image and sample: a call per coarse step (of each of the blind operator's chains) and per batch of windows
    chains = 1 if task == "sr" else make_operator(task, **opts).passes
    assert len(calls) == 2 * 2 * (3 * chains + -(-n_windows // 8))


@pytest.mark.parametrize("mode", ["fused", "hierarchical"])
def test_no_visible_seams_on_a_real_photo(mode):
    """Seam ratio r(O) of a x4 restoration of a held-out photo stays within 10% of r(ground truth)."""
    from pathlib import Path

    from gdp.io import read_image
    from gdp.metrics import seam_ratio
    from gdp.operators import degrade
    from gdp.prior.checkpoint import load_prior
    from gdp.tiling import plan_windows
    x = read_image(str(Path(__file__).resolve().parent.parent / "examples/reference/coffee-cup.png")).pixels
    op = make_operator("sr", factor=4)
    result = restore(degrade(x, op), "sr", load_prior("default"), operator=op, steps=8, tiling=mode)
    windows = plan_windows(128, 128, result.tiling["patch"], result.tiling["stride"])
    assert len(windows) == 9
    assert seam_ratio(result.image, windows) <= 1.1 * seam_ratio(x, windows)


def test_pipeline_pieces_reproduce_restore(tiny_prior_file, tmp_path):
    """coarse pass, window batches split over two 'workers', streaming merge == restore(tiling=hierarchical)."""
    from gdp import collection as col
    from gdp.io import read_image, write_image
    from gdp.prior.checkpoint import load_prior
    torch.manual_seed(3)
    y = torch.rand(1, 3, 36, 40)
    write_image(str(tmp_path / "in" / "a.png"), y)
    settings = col.Settings(task="sr", options={"factor": 2}, prior=str(tiny_prior_file), steps=3, seed=4,
                            tiling="hierarchical")
    job = col.plan_image(str(tmp_path / "in" / "a.png"), str(tmp_path / "in"), str(tmp_path / "out"), settings, 32)
    assert (job.mode, job.width, job.height, job.status) == ("hierarchical", 80, 72, "pending")
    work = str(tmp_path / "work")
    _, coarse_nfe, _ = col.coarse_pass(job, settings, work, "cpu")
    shards = col.window_batches([job], shard_patches=5)
    assert [sum(len(b.indices) for b in s) for s in shards] == [5, job.n_patches - 5]
    outs = [o for shard in reversed(shards) for o in col.restore_window_batches(shard, settings, work, "cpu")]
    result = col.ImageResult(job, nfe=coarse_nfe + sum(o[2] for o in outs), parts=tuple(o[1] for o in outs),
                             tiling={"mode": "hierarchical", "n_patches": job.n_patches})
    row = col.assemble(result, settings, "tiny", "hash", "run")
    written = read_image(job.output_uri).pixels
    expected = restore(read_image(job.source_uri).pixels, "sr", load_prior(str(tiny_prior_file)), factor=2, steps=3,
                       seed=[4], tiling="hierarchical")
    assert row["status"] == "ok" and row["nfe"] == expected.nfe
    assert (written - expected.image).abs().max() <= 1 / 255 + 1e-6  # equal up to 8-bit quantisation
    assert list((tmp_path / "work").iterdir()) == []  # windows and the coarse result cleaned up


@pytest.mark.parametrize("task,options", [("lowlight", {}), ("blind-deblur", {"kernel_size": 5})])
def test_pipeline_pieces_carry_the_blind_estimate(tiny_prior_file, tmp_path, task, options):
    """Blind tasks: the coarse pass's estimate travels with its tile to every window batch (another
    process in the flow) and into the manifest row; the result equals restore(tiling=hierarchical)."""
    import json

    from gdp import collection as col
    from gdp.io import read_image, write_image
    from gdp.prior.checkpoint import load_prior
    torch.manual_seed(5)
    write_image(str(tmp_path / "in" / "a.png"), torch.rand(1, 3, 72, 80) * 0.3)
    settings = col.Settings(task=task, options=options, prior=str(tiny_prior_file), steps=3, seed=2,
                            tiling="hierarchical")
    job = col.plan_image(str(tmp_path / "in" / "a.png"), str(tmp_path / "in"), str(tmp_path / "out"), settings, 32)
    work = str(tmp_path / "work")
    _, coarse_nfe, _ = col.coarse_pass(job, settings, work, "cpu")
    shards = col.window_batches([job], shard_patches=4)
    outs = [o for shard in shards for o in col.restore_window_batches(shard, settings, work, "cpu")]
    result = col.ImageResult(job, nfe=coarse_nfe + sum(o[2] for o in outs), parts=tuple(o[1] for o in outs),
                             tiling={"mode": "hierarchical", "n_patches": job.n_patches})
    row = col.assemble(result, settings, "tiny", "hash", "run")
    op = make_operator(task, **options)
    expected = restore(read_image(job.source_uri).pixels, task, load_prior(str(tiny_prior_file)), operator=op,
                       steps=3, seed=[2], tiling="hierarchical")
    assert row["status"] == "ok" and json.loads(row["estimated_params_json"]) == expected.params["per_image"][0]
    assert (read_image(job.output_uri).pixels - expected.image).abs().max() <= 1 / 255 + 1e-6
    assert row["consistency_psnr"] == pytest.approx(float(expected.consistency_psnr[0]), abs=0.05)


def test_coarse_lowpass_works_when_its_radius_exceeds_the_window():
    """At 64 MP the coarse scale is ~125, so the lowpass radius (2 sigma) passes a 64-px window:
    it must still be a normalised blur (constants kept, mean kept) rather than an error."""
    from gdp.hierarchical import WithCoarse
    guide = WithCoarse(local=None, sigma=62.5, weight=1.0)
    const = torch.full((2, 3, 64, 64), 0.3, dtype=torch.float64)
    torch.testing.assert_close(guide.lowpass(const), const, rtol=0, atol=1e-12)
    x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    low = guide.lowpass(x)
    assert low.shape == x.shape
    assert float((low - x.mean(dim=(2, 3), keepdim=True)).abs().max()) < 0.05  # almost the window mean
    assert float(low.std()) < 0.2 * float(x.std())


@pytest.mark.parametrize("height,width,patch,stride", [(88, 72, 32, 24), (200, 136, 32, 24), (257, 300, 64, 48)])
def test_coarse_window_equals_the_window_of_the_whole_upsampled_coarse_image(height, width, patch, stride):
    """Windows read the coarse guide from their own crop (no full-size upsampling per batch, which
    made 64 MP quadratic): the values match the whole upsampled image's window."""
    from gdp.hierarchical import Upsampled, coarse_window
    plan = plan_hierarchical(height, width, patch, stride)
    ch, cw = plan.coarse_size
    coarse = torch.rand(1, 3, ch, cw, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    up = Upsampled(None, plan.scale, plan.height, plan.width).upsample(coarse)
    assert plan.scale >= 1 and len(plan.windows) > 4
    for w in plan.windows:
        torch.testing.assert_close(coarse_window(coarse, plan, w), up[0][w.index], rtol=0, atol=1e-12)
