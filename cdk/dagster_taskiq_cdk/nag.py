"""cdk-nag: the AWS Solutions checks, and acknowledgments that each say why they are right here.

cdk-nag 3 is a CDK policy-validation plugin: a violation fails ``cdk synth`` (the CLI prints
the report, also written to ``policy-validation-report.json``), and findings are acknowledged
with CDK's ``Validations.of(construct).acknowledge``, which covers the construct's subtree.
Acknowledgments are also written into the template's resource metadata (``cdk_nag``), as
cdk-nag 2 did, so the reasons travel with the template.

A reason has to say why the finding is acceptable for this system, not restate the rule, so
reasons shorter than MIN_REASON_LENGTH are refused when the stack is built.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import aws_cdk
from aws_cdk import Validations
from cdk_nag import AwsSolutionsChecks
from constructs import IConstruct

MIN_REASON_LENGTH = 40


@dataclass(frozen=True)
class Acknowledgment:
    rule: str  # e.g. "AwsSolutions-IAM5"
    reason: str
    # For rules that report several findings per resource (IAM5): which ones, e.g. "Resource::*".
    findings: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if len(self.reason) < MIN_REASON_LENGTH:
            raise ValueError(
                f"The reason for acknowledging {self.rule} must say why it is right for this "
                f"system ({MIN_REASON_LENGTH}+ characters): {self.reason!r}"
            )

    @property
    def ids(self) -> list[str]:
        return [f"{self.rule}[{finding}]" for finding in self.findings] or [self.rule]


def acknowledge(construct: IConstruct, acknowledgments: Sequence[Acknowledgment]) -> None:
    """Acknowledge findings on ``construct`` and every resource under it."""
    Validations.of(construct).acknowledge(
        *[
            aws_cdk.Acknowledgment(id=rule_id, reason=a.reason)
            for a in acknowledgments
            for rule_id in a.ids
        ]
    )


def add_checks(app: IConstruct) -> None:
    """Run cdk-nag's AWS Solutions pack on the whole app when it is synthesized."""
    Validations.of(app).add_plugins(
        AwsSolutionsChecks(app, verbose=True, write_suppressions_to_cloud_formation=True)
    )
