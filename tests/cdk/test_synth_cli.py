"""`make synth`: the pinned CDK CLI synthesizes the app offline, from the repository root."""

from __future__ import annotations

import json
import os
import shutil
import subprocess

import pytest

from cdk.dagster_taskiq_cdk.paths import REPO_ROOT

STACK = "DagsterTaskiq-dev"


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("npm") is None, reason="needs Node.js and npm")
def test_make_synth() -> None:
    environment = {
        key: value for key, value in os.environ.items() if not key.startswith(("AWS_", "CDK_"))
    }
    completed = subprocess.run(
        ["make", "--no-print-directory", "synth"],
        cwd=REPO_ROOT,
        env=environment,  # no AWS credentials, no account or region
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert completed.returncode == 0, completed.stdout + completed.stderr
    out = REPO_ROOT / "cdk.out"
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["artifacts"][STACK]["type"] == "aws:cloudformation:stack"
    template = json.loads((out / f"{STACK}.template.json").read_text())
    types = {resource["Type"] for resource in template["Resources"].values()}
    assert {"AWS::ECS::Service", "AWS::Lambda::Function", "AWS::RDS::DBCluster"} <= types
    (service,) = [r for r in template["Resources"].values() if r["Type"] == "AWS::ECS::Service"]
    assert "DesiredCount" not in service["Properties"]
    # cdk-nag ran as a validation plugin and found nothing unacknowledged.
    report = json.loads((out / "validation-report.json").read_text())
    assert not [r for r in report.get("pluginReports", []) if r.get("violations")]
