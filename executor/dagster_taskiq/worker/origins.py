"""The code-location allow-list: a worker runs only jobs from code it was told to run.

A message names the job by its Python origin (a module, package or file and an
attribute). The worker loads that code in-process, so an origin outside the allow-list
is refused before anything is imported.
"""

from __future__ import annotations

import os

from dagster._core.code_pointer import (
    CodePointer,
    CustomPointer,
    FileCodePointer,
    ModuleCodePointer,
    PackageCodePointer,
)
from dagster._core.origin import JobPythonOrigin

from dagster_taskiq.core.messages import safe_text
from dagster_taskiq.worker.config import CodeLocation

# What a refusal quotes of a name from a message: it is stored and shown to users.
QUOTED_CHARS = 300
# The canary job of `dagster-taskiq doctor`, accepted whatever the code locations: it is
# a module of this package, code every worker has and runs already (its op does nothing),
# so accepting it loads nothing new, and the doctor can send a step through any worker.
CANARY_MODULE = "dagster_taskiq.operations.doctor.canary_job"


def quoted(value: object) -> str:
    """``value`` as a bounded, storable quotation (repr escapes what text may not hold)."""
    return safe_text(repr(value), QUOTED_CHARS)


def _describe(pointer: CodePointer) -> tuple[str, str]:
    if isinstance(pointer, CustomPointer):
        # A job made by a function with arguments (build_reconstructable_job): its code
        # is the module of that function.
        return _describe(pointer.reconstructor_pointer)
    if isinstance(pointer, ModuleCodePointer | PackageCodePointer):
        return "module", pointer.module
    if isinstance(pointer, FileCodePointer):
        return "file", os.path.realpath(pointer.python_file)
    return "other", pointer.describe()


def origin_allowed(origin: JobPythonOrigin, locations: tuple[CodeLocation, ...]) -> str | None:
    """None if the job's code is in one of the locations, else the reason it is refused.
    Never raises: an origin from a message may hold anything (a path with NUL in it)."""
    try:
        kind, target = _describe(origin.get_repo_pointer())
    except (ValueError, OSError, AttributeError) as e:
        return (
            f"Refused: job {quoted(origin.job_name)} has a code origin that cannot be read "
            f"({quoted(e)})."
        )
    if kind == "module" and target == CANARY_MODULE:
        return None
    for location in locations:
        if kind == "file" and location.is_file and os.path.realpath(location.target) == target:
            return None
        if kind == "module" and not location.is_file and location.target == target:
            return None
    allowed = ", ".join(c.target for c in locations) or "none"
    return (
        f"Refused: job {quoted(origin.job_name)} comes from {kind} {quoted(target)}, which is "
        f"not one of this worker's code locations ({allowed}). Add it with --code-location."
    )
