"""The advisory-lock keys never change between releases.

During a deploy the old and the new release run side by side: a schema change or a scaling
evaluation is only exclusive if both releases take the same lock. The keys are seeded with the
modules' first-release names, so moving a module does not change them.
"""

from __future__ import annotations

from dagster_taskiq.core import ledger
from dagster_taskiq.scaling import scaler


def test_the_schema_lock_is_the_first_releases() -> None:
    assert ledger._SCHEMA_LOCK_ID == 1386706542


def test_the_scaling_evaluation_lock_is_the_first_releases() -> None:
    assert scaler.EVALUATION_LOCK_CLASS == -1124701013
