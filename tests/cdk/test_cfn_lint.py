"""cfn-lint over every synthesized variant: the template checked against CloudFormation's own
resource schemas (types, patterns, allowed values, references), as a deploy would check it.

Zero errors. A warning is accepted only if it is listed below with the reason it cannot be
fixed here; any other warning fails.
"""

from __future__ import annotations

import importlib.metadata
import re
from typing import Any

import pytest
from cfnlint.api import ManualArgs, lint_file

from cdk.dagster_taskiq_cdk.paths import REPO_ROOT

from .conftest import REGION, Build

VARIANTS = {
    "default_build": "us-east-1",
    "custom_build": "us-east-1",
    "pools_build": "us-east-1",
    # Its own region: the VPC lookup and the database's secret are in eu-west-1.
    "existing_build": REGION,
}

# W3005: "dependency already enforced by a GetAtt". aws-cdk-lib's Function (ours, and the
# provider behind the VPC's restrictDefaultSecurityGroup) adds its role to DependsOn although
# the function's Role property already references it. Harmless: the order is the same.
# Removing it would mean overriding DependsOn wholesale, which would also drop the
# dependencies CDK adds after construction (the role's policy, the subnets' routes).
REDUNDANT_ROLE_DEPENDENCY = re.compile(
    r"^'\w+Role\w*' dependency already enforced by a 'GetAtt' at "
    r"'Resources/\w+/Properties/Role'$"
)


def _accepted(match: Any) -> bool:
    return match.rule.id == "W3005" and bool(REDUNDANT_ROLE_DEPENDENCY.match(match.message))


def lint(build: Build, region: str) -> list[Any]:
    return list(lint_file(build.template_path, ManualArgs(regions=[region])))


@pytest.mark.parametrize(("which", "region"), VARIANTS.items())
def test_cfn_lint_finds_no_error(which: str, region: str, request: pytest.FixtureRequest) -> None:
    build: Build = request.getfixturevalue(which)
    matches = lint(build, region)
    found = [f"{m.rule.id} {m.message} (line {m.linenumber})" for m in matches]
    assert not [f for f in found if f.startswith("E")], found
    unexplained = [
        f"{m.rule.id} {m.message} (line {m.linenumber})" for m in matches if not _accepted(m)
    ]
    assert unexplained == []


def test_cfn_lint_would_find_an_error(default_build: Build, tmp_path: Any) -> None:
    """The check can fail: a malformed property is reported as an error."""
    text = default_build.template_path.read_text()
    broken = tmp_path / "broken.template.json"
    broken.write_text(
        text.replace('"MessageRetentionPeriod": 345600', '"MessageRetentionPeriod": 5')
    )
    errors = [m.rule.id for m in lint_file(broken, ManualArgs(regions=["us-east-1"]))]
    assert [e for e in errors if e.startswith("E")], errors


def test_cfn_lint_is_pinned() -> None:
    """The dev extra and constraints.txt pin the version that runs: a release adds rules."""
    version = importlib.metadata.version("cfn-lint")
    assert f'"cfn-lint=={version}"' in (REPO_ROOT / "pyproject.toml").read_text()
    assert f"cfn-lint=={version}\n" in (REPO_ROOT / "constraints.txt").read_text()
