"""The code-location allow-list."""

from __future__ import annotations

import os
from pathlib import Path

from dagster._core.code_pointer import (
    CodePointer,
    CustomPointer,
    FileCodePointer,
    ModuleCodePointer,
    PackageCodePointer,
)
from dagster._core.origin import JobPythonOrigin, RepositoryPythonOrigin

from dagster_taskiq.worker.config import CodeLocation
from dagster_taskiq.worker.origins import origin_allowed


def _origin(pointer: CodePointer) -> JobPythonOrigin:
    return JobPythonOrigin(
        "my_job", RepositoryPythonOrigin(executable_path="/usr/bin/python3", code_pointer=pointer)
    )


def test_a_module_origin_is_allowed_by_its_module_name() -> None:
    origin = _origin(ModuleCodePointer("my_project.defs", "defs", None))
    assert origin_allowed(origin, (CodeLocation("my_project.defs"),)) is None
    assert origin_allowed(origin, (CodeLocation("other"), CodeLocation("my_project.defs"))) is None


def test_a_package_origin_is_allowed_by_its_module_name() -> None:
    origin = _origin(PackageCodePointer("my_project", "defs", None))
    assert origin_allowed(origin, (CodeLocation("my_project"),)) is None


def test_a_job_built_by_a_function_with_arguments_is_allowed_by_its_module() -> None:
    # build_reconstructable_job: the job is whatever make_job(...) returns in that module.
    maker = ModuleCodePointer("my_project.factory", "make_job", None)
    origin = _origin(CustomPointer(maker, ["fanout", 100], []))
    assert origin_allowed(origin, (CodeLocation("my_project.factory"),)) is None
    refusal = origin_allowed(origin, (CodeLocation("my_project.defs"),))
    assert refusal is not None and "'my_project.factory'" in refusal


def test_a_file_origin_is_allowed_by_its_real_path(tmp_path: Path) -> None:
    defs = tmp_path / "defs.py"
    defs.write_text("")
    link = tmp_path / "link.py"
    os.symlink(defs, link)
    origin = _origin(FileCodePointer(str(link), "defs", None))
    assert origin_allowed(origin, (CodeLocation(str(defs)),)) is None


def test_anything_else_is_refused_with_what_to_add() -> None:
    origin = _origin(ModuleCodePointer("evil.module", "defs", None))
    refusal = origin_allowed(origin, (CodeLocation("my_project.defs"),))
    assert refusal is not None
    assert "'evil.module'" in refusal and "(my_project.defs)" in refusal
    assert "--code-location" in refusal
    # A module name never matches a file location of the same text, nor a prefix.
    assert origin_allowed(
        _origin(ModuleCodePointer("my_project", "d", None)), (CodeLocation("my_project.defs"),)
    )
    assert origin_allowed(origin, ()) is not None


def test_code_locations_parse_from_a_comma_separated_variable() -> None:
    parsed = CodeLocation.parse_many(" a.b , ./defs.py,,c ")
    assert [c.target for c in parsed] == ["a.b", "./defs.py", "c"]
    assert [c.is_file for c in parsed] == [False, True, False]
    assert CodeLocation.parse_many(None) == ()
