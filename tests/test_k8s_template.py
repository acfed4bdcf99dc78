"""The Kubernetes base job template for GPU work pools (deployments/kubernetes): valid for Prefect's
server, every placeholder declared, GPUs requested and limited."""

from __future__ import annotations

import json
import re
from pathlib import Path

TEMPLATE = Path(__file__).resolve().parent.parent / "deployments/kubernetes/gpu-pool.base-job-template.json"


def test_template_is_accepted_by_prefect_and_requests_gpus():
    from prefect.server.schemas.actions import WorkPoolCreate
    template = json.loads(TEMPLATE.read_text())
    pool = WorkPoolCreate(name="gpu-k8s", type="kubernetes", base_job_template=template)
    assert pool.base_job_template == template
    placeholders = set(re.findall(r"{{\s*(\w+)\s*}}", json.dumps(template["job_configuration"])))
    assert placeholders <= set(template["variables"]["properties"]), placeholders - set(template["variables"]["properties"])
    container = template["job_configuration"]["job_manifest"]["spec"]["template"]["spec"]["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "{{ gpus }}"
    assert container["resources"]["requests"]["nvidia.com/gpu"] == "{{ gpus }}"
    assert template["variables"]["properties"]["gpus"]["default"] == 1
