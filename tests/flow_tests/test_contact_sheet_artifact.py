"""A collection run ends with a before/after contact sheet: a PNG under the output and a markdown
artifact that shows it inline in the Prefect UI (issue 19.7)."""

from __future__ import annotations

import asyncio
import base64
import io

from PIL import Image

from flows.restore_collection import restore_collection
from gdp.contact_sheet import CONTACT_DIR


def test_collection_run_writes_a_contact_sheet_artifact(tmp_path, images, tiny_prior_path):
    for k, (name, top) in enumerate([("astronaut", 40), ("astronaut", 200), ("coffee", 100)]):
        truth = images.crop(32, 32, name, top=top, left=120)
        images.write(tmp_path / "ref" / f"img{k}.png", images.png(truth))
        images.write(tmp_path / "in" / f"img{k}.png", images.png(images.downsample(truth, 2)))
    state = restore_collection(input_uri=str(tmp_path / "in"), output_uri=str(tmp_path / "out"), task="sr",
                               options={"factor": 2}, prior=tiny_prior_path, steps=1,
                               reference_uri=str(tmp_path / "ref"), return_state=True)
    assert state.is_completed(), state.message
    run_id = state.state_details.flow_run_id
    png = tmp_path / "out" / CONTACT_DIR / f"run-{run_id}.png"
    with Image.open(png) as sheet:
        assert sheet.size == (3 * 260 + 4, 18 + 3 * (18 + 264))  # 3 images (all "worst"), 3 columns of 256

    async def artifact():
        from prefect.client.orchestration import get_client
        from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey, FlowRunFilter, FlowRunFilterId
        async with get_client() as client:
            found = await client.read_artifacts(
                artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["restore-contact-sheet"])),
                flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run_id])))
        return found

    found = asyncio.run(artifact())
    assert len(found) == 1 and found[0].type == "markdown"
    markdown = found[0].data
    assert f"Full size: `{png}`" in markdown and "3 worst and 0 best restorations by PSNR" in markdown
    preview = markdown.split("data:image/jpeg;base64,", 1)[1].rstrip(")")
    with Image.open(io.BytesIO(base64.b64decode(preview))) as im:
        assert im.format == "JPEG" and im.width == 720
