"""The evaluate flow end to end (tiny prior, 2 steps): Parquet, summary, PNGs, artifacts, CLI."""

from __future__ import annotations

import asyncio

import pandas as pd

from gdp.baselines import BASELINES


def test_evaluate_flow_writes_results_report_images_and_artifacts(tmp_path, images, tiny_prior_path, capsys):
    import flows.__main__ as cli
    refs = tmp_path / "refs"
    images.write(refs / "astro.png", images.png(images.crop(32, 32, top=40, left=120)))
    images.write(refs / "more/coffee.png", images.png(images.crop(40, 36, "coffee", top=40, left=160)))
    out = tmp_path / "out"
    code = cli.main(["evaluate", str(refs), str(out), "--tasks", "sr", "deblur", "inpaint", "colorize",
                     "--steps", "2", "--prior", tiny_prior_path, "--guidance", "x0", "xt"])
    assert code == 0
    df = pd.read_parquet(out / "results.parquet")
    per_image = sum(len(BASELINES[t]) + 2 for t in ("sr", "deblur", "inpaint", "colorize"))  # + x0 and xt
    assert len(df) == 2 * per_image == 24
    assert set(df.image) == {"astro", "more/coffee"}
    assert set(df[df.method.str.startswith("gdp")].steps) == {2}
    # coffee is 40 rows x 36 columns: 2 x 2 patches of 32 px (fused), NFE = 2 steps x 4 patches
    assert set(df[(df.image == "more/coffee") & (df.method == "gdp-xt")].nfe) == {8}
    assert set(df[(df.image == "astro") & (df.method == "gdp-xt")].nfe) == {2}
    assert (out / "images/more/coffee/deblur/richardson-lucy.png").exists()
    report = (out / "summary.md").read_text()
    assert "LPIPS skipped" in report and "| deblur | gdp-xt | richardson-lucy |" in report
    printed = capsys.readouterr().out
    assert "| sr | bicubic | 2 |" in printed and f"results: {out / 'results.parquet'}" in printed

    from prefect.client.orchestration import get_client

    async def artifact_keys():
        async with get_client() as client:
            return {a.key for a in await client.read_artifacts()}
    assert {"evaluation-summary", "evaluation-report"} <= asyncio.run(artifact_keys())
