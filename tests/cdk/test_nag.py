"""cdk-nag's AWS Solutions checks: nothing unacknowledged, and every acknowledgment says why."""

from __future__ import annotations

from typing import Any

import pytest
from aws_cdk.assertions import Annotations, Match
from cdk_nag import AwsSolutionsChecks

from cdk.dagster_taskiq_cdk.nag import MIN_REASON_LENGTH, Acknowledgment

from .conftest import Build

# What the default deployment acknowledges. A new entry needs a reviewed reason: this list
# makes it show up in review.
EXPECTED_ACKNOWLEDGMENTS = {
    "AwsSolutions-ECS2",  # plain environment holds only non-secret configuration
    "AwsSolutions-IAM5[Resource::*]",  # ENI and X-Ray actions, ecr:GetAuthorizationToken
    "AwsSolutions-RDS11",  # default PostgreSQL port
    "AwsSolutions-SMG4",  # no automatic rotation of the database password and signing key
}
# Into an existing database: the stack creates none, so nothing of one is acknowledged.
EXISTING_DATABASE_ACKNOWLEDGMENTS = EXPECTED_ACKNOWLEDGMENTS - {"AwsSolutions-RDS11"}
# Acknowledged only because the custom context turns the protections off.
CONTEXT_ACKNOWLEDGMENTS = {"AwsSolutions-RDS10", "AwsSolutions-RDS6"}


def _violations(build: Build) -> list[str]:
    report = AwsSolutionsChecks(verbose=True).validate_scope(build.stack)
    return [
        f"{v.severity} {v.rule_name} on "
        + ", ".join(r.construct_path or "?" for r in v.violating_resources)
        + f": {v.description}"
        for v in report.violations
    ]


@pytest.mark.parametrize(
    "which", ["default_build", "custom_build", "pools_build", "existing_build"]
)
def test_no_unacknowledged_errors_or_warnings(which: str, request: pytest.FixtureRequest) -> None:
    build: Build = request.getfixturevalue(which)
    assert _violations(build) == []


@pytest.mark.parametrize(
    "which", ["default_build", "custom_build", "pools_build", "existing_build"]
)
def test_no_cdk_errors_or_warnings(which: str, request: pytest.FixtureRequest) -> None:
    build: Build = request.getfixturevalue(which)
    annotations = Annotations.from_stack(build.stack)
    assert annotations.find_error("*", Match.any_value()) == []
    assert annotations.find_warning("*", Match.any_value()) == []


def _acknowledgments(build: Build) -> dict[str, set[str]]:
    """Acknowledged cdk-nag rule -> reasons, from the template's resource metadata."""
    found: dict[str, set[str]] = {}
    for resource in build.json["Resources"].values():
        rules: list[dict[str, Any]] = (
            resource.get("Metadata", {}).get("cdk_nag", {}).get("rules_to_suppress", [])
        )
        for rule in rules:
            if rule["id"].startswith("AwsSolutions-"):
                found.setdefault(rule["id"], set()).add(rule["reason"])
    return found


def test_acknowledged_findings_are_the_reviewed_ones(
    default_build: Build, custom_build: Build, existing_build: Build
) -> None:
    assert set(_acknowledgments(default_build)) == EXPECTED_ACKNOWLEDGMENTS
    assert set(_acknowledgments(custom_build)) == EXPECTED_ACKNOWLEDGMENTS | CONTEXT_ACKNOWLEDGMENTS
    assert set(_acknowledgments(existing_build)) == EXISTING_DATABASE_ACKNOWLEDGMENTS


def test_the_lambda_runtime_needs_no_acknowledgment(
    default_build: Build, existing_build: Build
) -> None:
    """AwsSolutions-L1 (not the latest runtime) is met, not acknowledged."""
    for build in (default_build, existing_build):
        assert "AwsSolutions-L1" not in _acknowledgments(build)


def test_worker_pools_need_no_new_acknowledgment(default_build: Build, pools_build: Build) -> None:
    assert _acknowledgments(pools_build) == _acknowledgments(default_build)


def test_every_acknowledgment_says_why(
    default_build: Build, custom_build: Build, pools_build: Build, existing_build: Build
) -> None:
    rules_by_reason: dict[str, set[str]] = {}
    for build in (default_build, custom_build, pools_build, existing_build):
        for rule, reasons in _acknowledgments(build).items():
            for reason in reasons:
                assert len(reason) >= MIN_REASON_LENGTH, (rule, reason)
                rules_by_reason.setdefault(reason, set()).add(rule)
    # Specific to the finding, not one reason pasted on every rule.
    assert all(len(rules) == 1 for rules in rules_by_reason.values()), rules_by_reason


def test_a_vague_acknowledgment_is_refused() -> None:
    with pytest.raises(ValueError, match="must say why"):
        Acknowledgment("AwsSolutions-IAM5", "needed")


def test_the_iam_wildcards_acknowledged_are_only_resource_stars(default_build: Build) -> None:
    # Acknowledgments are per finding: an action wildcard would need its own, and has none.
    assert not [a for a in _acknowledgments(default_build) if "Action::" in a]
