"""The Lambda bundles: dagster-free, importable on their own, and the same on every build."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from aws_cdk import FileSystem

from cdk.dagster_taskiq_cdk import lambda_bundle
from cdk.dagster_taskiq_cdk.lambda_bundle import (
    BundleError,
    BundleFile,
    build_bundle,
    check_imports,
    plan_bundle,
    tree_digest,
)
from cdk.dagster_taskiq_cdk.paths import REPO_ROOT

from .conftest import Build

BUNDLES = ("scaler", "dlq_processor")
# What the handlers and the package import directly; the bundle adds what these require.
REQUIRED_DISTRIBUTIONS = {
    "aws-lambda-powertools",
    "aws-xray-sdk",
    "wrapt",
    "sqlalchemy",
    "pg8000",
    "scramp",
    "asn1crypto",
    "python-dateutil",
    "six",
    "typing-extensions",
}
# The Lambda Python runtime's own packages, which the bundle relies on and leaves out.
RUNTIME_PACKAGES = ("boto3", "botocore", "s3transfer", "jmespath", "urllib3")

IMPORT_CHECK = """
import sys
sys.path[:0] = sys.argv[1:3]
import handler
loaded = sorted(m for m in sys.modules if m == "dagster" or m.startswith("dagster."))
assert not loaded, loaded
assert callable(handler.lambda_handler)
outside = sorted(
    name for name, module in list(sys.modules.items())
    if "site-packages" in (getattr(module, "__file__", None) or "")
)
assert not outside, outside
"""


def _import_alone(bundle: Path, runtime_packages: Path) -> None:
    """Import the handler from the bundle and the runtime's packages only."""
    # -S: no site-packages, so nothing can come from this virtualenv (where dagster is).
    # -B: no __pycache__ written into the bundle, which other tests reuse.
    completed = subprocess.run(
        [sys.executable, "-S", "-B", "-c", IMPORT_CHECK, str(bundle), str(runtime_packages)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env={"PATH": "/usr/bin:/bin", "POWERTOOLS_TRACE_DISABLED": "1"},
    )
    assert completed.returncode == 0, completed.stderr


@pytest.fixture(scope="module")
def runtime_packages(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Stand-in for the runtime's site-packages: links to this venv's boto3 and its needs."""
    directory = tmp_path_factory.mktemp("lambda-runtime")
    for name in RUNTIME_PACKAGES:
        module = __import__(name)
        source = Path(module.__file__ or "").parent
        (directory / name).symlink_to(source, target_is_directory=True)
    return directory


@pytest.mark.parametrize("name", BUNDLES)
def test_bundle_contents(name: str) -> None:
    files = plan_bundle(name)
    destinations = [f.destination for f in files]
    assert "handler.py" in destinations
    assert destinations == sorted(destinations)
    assert not [d for d in destinations if "__pycache__" in d or d.endswith(".pyc")]
    package = {d for d in destinations if d.startswith("dagster_taskiq/")}
    assert package == {f"dagster_taskiq/{m}.py" for m in lambda_bundle.BUNDLED_MODULES}
    for excluded in ("executor/definition", "executor/step_handler", "cli", "scaling/trigger"):
        assert f"dagster_taskiq/{excluded}.py" not in package
    assert not [
        d
        for d in destinations
        if d.startswith(("dagster_taskiq/worker/", "dagster_taskiq/executor/", "dagster/"))
    ]
    top_level = lambda_bundle.top_level_modules(files)
    assert {"boto3", "botocore", "dagster"}.isdisjoint(top_level)
    assert {"aws_lambda_powertools", "sqlalchemy", "pg8000", "scramp", "wrapt"} <= top_level


def test_bundled_distributions_cover_what_the_code_needs() -> None:
    bundled = {d.lower() for d in lambda_bundle.BUNDLED_DISTRIBUTIONS}
    assert bundled >= REQUIRED_DISTRIBUTIONS
    lambda_bundle.check_requirements()  # every requirement: bundled or in the runtime


@pytest.mark.parametrize("name", BUNDLES)
def test_bundle_imports_with_only_the_stdlib_and_the_runtime(
    name: str, runtime_packages: Path
) -> None:
    bundle = build_bundle(name)
    _import_alone(bundle, runtime_packages)


# Run by the Lambda runtime's Python (or another CPython the bundle is built for): the
# compiled extensions from the wheels must load, not only the pure-Python fallbacks.
EXTENSIONS_CHECK = """
import sys
sys.path[:0] = sys.argv[1:3]
import handler
from sqlalchemy.util._has_cython import HAS_CYEXTENSION, _CYEXTENSION_MSG
assert HAS_CYEXTENSION, _CYEXTENSION_MSG
import wrapt._wrappers
print(sys.version_info[:2])
"""


def _other_python() -> tuple[str, str] | None:
    """A CPython of another version than this one, and its version: the Lambda runtime's
    first (python3.14), else python3.13, each from $PYTHON314 / $PYTHON313 or the PATH."""
    for version in (lambda_bundle.LAMBDA_PYTHON_VERSION, "3.13"):
        if version == f"{sys.version_info[0]}.{sys.version_info[1]}":
            continue
        # PYTHON313 (as the Makefile names it, found through pyenv) before the PATH.
        named = os.environ.get(f"PYTHON{version.replace('.', '')}")
        executable = named or shutil.which(f"python{version}")
        if executable is None:
            continue
        # The interpreter itself, not a launcher in front of it (which may need its own
        # environment): the check below runs with an empty one.
        probe = subprocess.run(
            [executable, "-c", "import sys; print('%d.%d' % sys.version_info[:2], sys.executable)"],
            capture_output=True,
            text=True,
            check=False,
        )
        found = probe.stdout.split()
        if probe.returncode == 0 and len(found) == 2 and found[0] == version:
            return found[1], version
    return None


def test_the_bundle_carries_the_runtimes_extensions() -> None:
    """Built by this (3.11) interpreter, the bundle has CPython 3.14's compiled extensions."""
    files = plan_bundle("scaler")
    extensions = sorted(f.destination for f in files if f.destination.endswith(".so"))
    if not extensions:
        pytest.skip("no wheel for the Lambda runtime could be downloaded (offline)")
    tag = f"cpython-{lambda_bundle.LAMBDA_PYTHON_VERSION.replace('.', '')}-x86_64-linux-gnu.so"
    assert all(name.endswith(tag) for name in extensions), extensions
    assert any(name.startswith("sqlalchemy/") for name in extensions)
    assert any(name.startswith("wrapt/") for name in extensions)


def test_a_bundle_for_another_python_loads_its_extensions_there(
    tmp_path: Path, runtime_packages: Path
) -> None:
    """The wheels' extensions load in the Python they are for: the bundle built here for
    another CPython, imported by that CPython with nothing but the bundle and the runtime."""
    found = _other_python()
    if found is None:
        pytest.skip("no python3.14 or python3.13 ($PYTHON314, $PYTHON313 or on the PATH)")
    executable, version = found
    bundle = build_bundle("scaler", build_dir=tmp_path, python_version=version)
    completed = subprocess.run(
        [executable, "-S", "-B", "-c", EXTENSIONS_CHECK, str(bundle), str(runtime_packages)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env={"PATH": "/usr/bin:/bin", "POWERTOOLS_TRACE_DISABLED": "1"},
    )
    assert completed.returncode == 0, completed.stderr


def test_the_worker_image_runs_the_lambdas_python() -> None:
    dockerfile = (REPO_ROOT / "worker_image" / "Dockerfile").read_text()
    (base,) = [line for line in dockerfile.splitlines() if line.startswith("FROM ")]
    assert base == f"FROM python:{lambda_bundle.LAMBDA_PYTHON_VERSION}-slim"


def test_pure_python_bundle_imports_too(tmp_path: Path, runtime_packages: Path) -> None:
    """Built where the extensions would not match the runtime, they are left out: still works."""
    bundle = build_bundle("scaler", build_dir=tmp_path, include_extensions=False)
    assert not list(bundle.rglob("*.so"))
    _import_alone(bundle, runtime_packages)


@pytest.mark.parametrize("name", BUNDLES)
def test_bundle_is_deterministic(name: str, tmp_path: Path) -> None:
    first = build_bundle(name, build_dir=tmp_path / "one")
    second = build_bundle(name, build_dir=tmp_path / "two")
    assert first.name == second.name  # content-addressed
    assert tree_digest(first) == tree_digest(second)
    assert FileSystem.fingerprint(str(first)) == FileSystem.fingerprint(str(second))
    assert build_bundle(name, build_dir=tmp_path / "one") == first  # reused, not rebuilt
    assert not list(first.rglob("__pycache__"))
    modes = {p.stat().st_mode & 0o777 for p in first.rglob("*") if p.is_file()}
    assert modes == {0o644}  # readable by Lambda's user whatever the umask


def test_a_bundle_written_to_after_it_was_built_is_built_again(tmp_path: Path) -> None:
    """Running the handler from a bundle leaves __pycache__ in it: reused as it is, its asset
    hash would no longer be that of the content the plan says (and the template was given)."""
    clean = build_bundle("scaler", build_dir=tmp_path)
    digest = tree_digest(clean)
    stray = clean / "dagster_taskiq" / "__pycache__" / "ledger.cpython-311.pyc"
    stray.parent.mkdir()
    stray.write_bytes(b"compiled")
    (clean / "handler.py").write_text("edited\n")
    again = build_bundle("scaler", build_dir=tmp_path)
    assert again == clean
    assert not stray.parent.exists()
    assert tree_digest(again) == digest
    assert [p.name for p in tmp_path.iterdir()] == [clean.name]  # nothing left aside


def test_template_uses_the_bundle(default_build: Build) -> None:
    for name, function in (
        ("scaler", default_build.stack.scaler.function),
        ("dlq_processor", default_build.stack.dead_letters.function),
    ):
        code = default_build.resource(function)["Properties"]["Code"]
        assert code["S3Key"] == FileSystem.fingerprint(str(build_bundle(name))) + ".zip"


def _module(tmp_path: Path, destination: str, source: str) -> BundleFile:
    path = tmp_path / destination.replace("/", "_")
    path.write_text(source)
    return BundleFile(destination, path)


def test_import_check_refuses_dagster(tmp_path: Path) -> None:
    files = [*plan_bundle("scaler"), _module(tmp_path, "dagster_taskiq/bad.py", "import dagster\n")]
    with pytest.raises(BundleError, match="needs dagster"):
        check_imports(files)


def test_import_check_refuses_unbundled_package_modules(tmp_path: Path) -> None:
    handler = "from dagster_taskiq.executor.definition import taskiq_executor\n"
    files = [f for f in plan_bundle("scaler") if f.destination != "handler.py"]
    with pytest.raises(
        BundleError, match=r"dagster_taskiq\.executor\.definition, which is not bundled"
    ):
        check_imports([*files, _module(tmp_path, "handler.py", handler)])
    lazy = "from dagster_taskiq import taskiq_executor\n"  # the package's lazy __getattr__
    with pytest.raises(BundleError, match=r"dagster_taskiq\.taskiq_executor, which is not"):
        check_imports([*files, _module(tmp_path, "handler.py", lazy)])


def test_import_check_ignores_type_checking_imports(tmp_path: Path) -> None:
    source = (
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n"
        "    import dagster\n"
        "from dagster_taskiq.core.ledger import Ledger\n"
    )
    files = [f for f in plan_bundle("scaler") if f.destination != "handler.py"]
    check_imports([*files, _module(tmp_path, "handler.py", source)])
