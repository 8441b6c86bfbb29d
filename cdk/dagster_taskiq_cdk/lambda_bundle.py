"""Lambda code assets built without Docker: copies from this virtualenv, checked and deterministic.

A bundle is a directory holding

- ``handler.py``: ``lambdas/<name>/handler.py``, so the entry point is ``handler.lambda_handler``;
- the dagster-free modules of ``dagster_taskiq`` the Lambdas use (never the executor, the worker
  or the local stack, which import dagster);
- the third-party distributions those modules need, copied file by file from site-packages
  (``importlib.metadata``), except what the Lambda Python runtime already provides (boto3,
  botocore, s3transfer).

The functions run on the newest Python runtime Lambda offers (``LAMBDA_PYTHON_VERSION``, on
x86_64), whatever Python synthesizes. Compiled extensions (SQLAlchemy's and wrapt's) must be
built for that runtime: from this virtualenv when its interpreter is the runtime's, else from
the same versions' wheels for that CPython on manylinux, which pip downloads once, without
Docker, into ``build/wheels/`` (``pip download --python-version 3.14 --platform
manylinux2014_x86_64 --only-binary=:all:``). Everything else is pure Python and comes from the
virtualenv. Where pip cannot download (offline, no cached wheel), the bundle leaves the
extensions out with a warning, and both libraries fall back to pure Python.

The directory is content-addressed (``<build>/<name>-<digest>``) and written once, by an atomic
rename: the same inputs give the same directory and the same CDK asset hash, and two synths
running at once never see half a bundle. A directory that no longer holds exactly its content
(a handler run from it leaves ``__pycache__``) is built again, not reused.
"""

from __future__ import annotations

import ast
import contextlib
import hashlib
import importlib.metadata
import itertools
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import warnings
import zipfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from packaging.requirements import Requirement

from .paths import LAMBDA_BUILD_DIR, LAMBDAS_DIR, PACKAGE_DIR, REPO_ROOT

PACKAGE = PACKAGE_DIR.name

# The modules of the package the Lambdas may import: its dagster-free half (``core``, the
# scaler, the dead-letter processor), as paths under the package without ``.py``. A folder's
# ``__init__`` is listed with it: the bundle imports nothing that is not here.
BUNDLED_MODULES = (
    "__init__",
    "core/__init__",
    "core/connections",
    "core/errors",
    "core/ledger",
    "core/messages",
    "core/observability",
    "core/schema",
    "core/settings",
    "core/sqs",
    "dead_letters/__init__",
    "dead_letters/processor",
    "scaling/__init__",
    "scaling/outlook",
    "scaling/policy",
    "scaling/scaler",
)

# Third-party distributions, with the extras the package uses (powertools' Tracer needs
# aws-xray-sdk). Their requirements are checked to be here or in the runtime at build time.
BUNDLED_DISTRIBUTIONS = (
    "asn1crypto",
    "aws-lambda-powertools",
    "aws-xray-sdk",
    "jmespath",
    "pg8000",
    "python-dateutil",
    "scramp",
    "six",
    "sqlalchemy",
    "typing-extensions",
    "wrapt",
)
BUNDLED_EXTRAS = {"aws-lambda-powertools": ("tracer",)}

# In every Lambda Python runtime: bundling them would only pin an older copy.
RUNTIME_DISTRIBUTIONS = frozenset({"boto3", "botocore", "s3transfer"})
RUNTIME_MODULES = frozenset({"boto3", "botocore", "s3transfer"})

# The Lambda runtime the compiled extensions must match: the newest Python Lambda offers.
LAMBDA_PYTHON_VERSION = "3.14"
LAMBDA_PLATFORM = "linux-x86_64"
# Wheels that load on it: Lambda's Python runtimes since 3.12 are Amazon Linux 2023 (glibc
# 2.34); x86_64.
LAMBDA_WHEEL_PLATFORMS = ("manylinux2014_x86_64", "manylinux_2_28_x86_64")
# Downloaded wheels and their extracted extensions, kept between synths (build/ is ignored).
WHEEL_CACHE_DIR = REPO_ROOT / "build" / "wheels"
_EXTENSION_SUFFIXES = (".so", ".pyd")
# The zip CDK makes keeps each file's mode: fixed modes, same zip on every machine.
FILE_MODE = 0o644
DIRECTORY_MODE = 0o755

# Modules that must never be in a bundle: they are the reason for a separate Lambda package.
FORBIDDEN_TOP_LEVEL = ("dagster",)


class BundleError(RuntimeError):
    """The bundle cannot be built: a missing file, a stray import, an unmet requirement."""


@dataclass(frozen=True)
class BundleFile:
    destination: str  # POSIX path inside the bundle
    source: Path


def _abi(python_version: str) -> str:
    """``3.14`` -> ``cp314``: the wheel tag of CPython's ABI."""
    return "cp" + python_version.replace(".", "")


def lambda_runtime_matches(python_version: str = LAMBDA_PYTHON_VERSION) -> bool:
    """True when this interpreter's compiled extensions run on the Lambda runtime."""
    return (
        sys.implementation.cache_tag == f"cpython-{_abi(python_version)[2:]}"
        and sysconfig.get_platform() == LAMBDA_PLATFORM
    )


def build_bundle(
    name: str,
    *,
    build_dir: Path = LAMBDA_BUILD_DIR,
    include_extensions: bool | None = None,
    python_version: str = LAMBDA_PYTHON_VERSION,
) -> Path:
    """Build (or reuse) the bundle of ``lambdas/<name>/handler.py``; returns its directory.

    ``include_extensions=False`` leaves compiled extensions out (pure Python); by default
    they are those of CPython ``python_version`` (the Lambda runtime's; see the module's
    docstring).
    """
    files = plan_bundle(
        name, include_extensions=include_extensions is not False, python_version=python_version
    )
    check_imports(files)
    digest = _digest(files)
    target = build_dir / f"{name}-{digest[:20]}"
    if target.is_dir():
        if tree_digest(target) == digest:
            return target
        # Written to since it was built (running the handler from it leaves __pycache__
        # behind): its asset hash is no longer that of the planned content. Built again.
        _discard(target)
    build_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=build_dir))
    try:
        for file in files:
            destination = staging / file.destination
            destination.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(file.source, destination)
            # Lambda runs the code as another user: readable by all, whatever the umask.
            destination.chmod(FILE_MODE)
        for directory in (staging, *(p for p in staging.rglob("*") if p.is_dir())):
            directory.chmod(DIRECTORY_MODE)
        try:
            staging.rename(target)
        except OSError:
            # Another synth renamed the same content into place first.
            if not target.is_dir():
                raise
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    return target


def plan_bundle(
    name: str, *, include_extensions: bool = True, python_version: str = LAMBDA_PYTHON_VERSION
) -> list[BundleFile]:
    """Every file of the bundle, sorted by destination."""
    handler = LAMBDAS_DIR / name / "handler.py"
    if not handler.is_file():
        raise BundleError(f"No Lambda handler at {handler.relative_to(REPO_ROOT)}")
    files = [BundleFile("handler.py", handler)]
    for module in BUNDLED_MODULES:
        source = PACKAGE_DIR / f"{module}.py"
        if not source.is_file():
            raise BundleError(f"{_dotted(module)} is not at {source.relative_to(REPO_ROOT)}")
        files.append(BundleFile(f"{PACKAGE}/{module}.py", source))
    check_requirements()
    for distribution in BUNDLED_DISTRIBUTIONS:
        files.extend(
            _distribution_files(
                distribution, include_extensions=include_extensions, python_version=python_version
            )
        )
    files.sort(key=lambda f: f.destination)
    destinations = [f.destination for f in files]
    duplicates = {d for d, following in itertools.pairwise(destinations) if d == following}
    if duplicates:
        raise BundleError(f"Two distributions install the same files: {sorted(duplicates)}")
    return files


def check_requirements() -> None:
    """Every requirement of a bundled distribution is bundled or in the Lambda runtime."""
    bundled = {_canonical(d) for d in BUNDLED_DISTRIBUTIONS}
    provided = {_canonical(d) for d in RUNTIME_DISTRIBUTIONS}
    missing: list[str] = []
    for distribution in BUNDLED_DISTRIBUTIONS:
        extras = BUNDLED_EXTRAS.get(distribution, ())
        for requirement in _requirements(distribution, extras):
            name = _canonical(requirement.name)
            if name not in bundled and name not in provided:
                missing.append(f"{distribution} requires {requirement}")
    if missing:
        raise BundleError(
            "Not bundled and not in the Lambda runtime: "
            + "; ".join(missing)
            + ". Add them to BUNDLED_DISTRIBUTIONS."
        )


def _requirements(distribution: str, extras: Iterable[str]) -> Iterator[Requirement]:
    for text in _distribution(distribution).requires or ():
        requirement = Requirement(text)
        if requirement.marker is None:
            yield requirement
            continue
        environments = [{"extra": extra} for extra in extras] or [{"extra": ""}]
        if any(requirement.marker.evaluate(env) for env in environments):
            yield requirement


def _canonical(name: str) -> str:
    return name.lower().replace("_", "-").replace(".", "-")


def _distribution(name: str) -> importlib.metadata.Distribution:
    try:
        return importlib.metadata.distribution(name)
    except importlib.metadata.PackageNotFoundError:
        raise BundleError(
            f"{name} is not installed in this virtualenv; run `make install`"
        ) from None


def _distribution_files(
    name: str, *, include_extensions: bool, python_version: str
) -> list[BundleFile]:
    distribution = _distribution(name)
    files: list[BundleFile] = []
    for entry in distribution.files or ():
        parts = entry.parts
        if ".." in parts or "__pycache__" in parts or entry.suffix == ".pyc":
            continue  # console scripts outside site-packages; bytecode is machine-specific
        if parts[-1] in ("RECORD", "INSTALLER", "REQUESTED", "direct_url.json"):
            continue  # install-time records, not needed to import the package
        if entry.suffix in _EXTENSION_SUFFIXES and not (
            include_extensions and lambda_runtime_matches(python_version)
        ):
            continue  # built for this interpreter: the runtime's come from its wheel
        source = Path(str(distribution.locate_file(entry)))
        if not source.is_file():
            raise BundleError(f"{name}: {entry} is listed but missing; reinstall it")
        files.append(BundleFile(entry.as_posix(), source))
    if not files:
        raise BundleError(f"{name} lists no files to bundle")
    compiled = any(entry.suffix in _EXTENSION_SUFFIXES for entry in distribution.files or ())
    if compiled and include_extensions and not lambda_runtime_matches(python_version):
        files.extend(_runtime_extensions(name, distribution.version, python_version))
    return files


def _runtime_extensions(name: str, version: str, python_version: str) -> list[BundleFile]:
    """The compiled extensions of ``name==version`` for CPython ``python_version`` on the
    Lambda platform, from its wheel.

    The wheel is downloaded once into WHEEL_CACHE_DIR and its extensions extracted beside
    it; without a wheel (pip cannot reach an index) the bundle goes without them.
    """
    cache = WHEEL_CACHE_DIR / f"{_abi(python_version)}-{LAMBDA_WHEEL_PLATFORMS[0]}"
    extracted = cache / f"{_canonical(name)}-{version}"
    if not extracted.is_dir():
        wheel = _download_wheel(name, version, python_version, cache)
        if wheel is None:
            return []
        _extract_extensions(wheel, extracted)
    return [
        BundleFile(path.relative_to(extracted).as_posix(), path)
        for path in sorted(extracted.rglob("*"))
        if path.is_file()
    ]


def _download_wheel(name: str, version: str, python_version: str, cache: Path) -> Path | None:
    cache.mkdir(parents=True, exist_ok=True)
    abi = _abi(python_version)
    prefix = f"{_canonical(name).replace('-', '_')}-{version}-{abi}-".lower()

    def cached() -> list[Path]:
        # Wheel names are normalised to lower case, but not by every older tool.
        wheels = cache.glob("*.whl")
        return sorted(wheel for wheel in wheels if wheel.name.lower().startswith(prefix))

    if cached():
        return cached()[0]
    platforms = [arg for platform in LAMBDA_WHEEL_PLATFORMS for arg in ("--platform", platform)]
    completed = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--quiet",
            "--no-deps",
            "--only-binary=:all:",
            "--python-version",
            python_version,
            "--implementation",
            "cp",
            "--abi",
            abi,
            *platforms,
            "--dest",
            str(cache),
            f"{name}=={version}",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    if completed.returncode != 0 or not cached():
        warnings.warn(
            f"No {name}=={version} wheel for Python {python_version} on "
            f"{LAMBDA_WHEEL_PLATFORMS[0]} (pip said: {completed.stderr.strip()[-500:]}): the "
            "Lambda bundles leave its compiled extensions out and run on pure Python.",
            stacklevel=2,
        )
        return None
    return cached()[0]


def _extract_extensions(wheel: Path, target: Path) -> None:
    """The wheel's extension modules into ``target`` (atomically: a rename at the end)."""
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        with zipfile.ZipFile(wheel) as archive:
            for member in archive.namelist():
                path = PurePosixPath(member)
                if path.suffix not in _EXTENSION_SUFFIXES or ".." in path.parts:
                    continue
                destination = staging / path
                destination.parent.mkdir(parents=True, exist_ok=True)
                destination.write_bytes(archive.read(member))
        try:
            staging.rename(target)
        except OSError:
            if not target.is_dir():
                raise
    finally:
        if staging.exists():
            shutil.rmtree(staging)


def _digest(files: Iterable[BundleFile]) -> str:
    return _hash_tree((file.destination, file.source) for file in files)


def _hash_tree(entries: Iterable[tuple[str, Path]]) -> str:
    """sha256 over (relative path, file) pairs, in the order given: a plan's digest and a
    built directory's (``tree_digest``) are the same function of the same pairs."""
    digest = hashlib.sha256()
    for relative, path in entries:
        digest.update(relative.encode() + b"\0")
        digest.update(hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()


def top_level_modules(files: Iterable[BundleFile]) -> set[str]:
    """Importable top-level names in the bundle (packages, modules, extension modules)."""
    names: set[str] = set()
    for file in files:
        first = file.destination.split("/", 1)[0]
        if first.endswith((".dist-info", ".data")):
            continue
        names.add(first.split(".", 1)[0])
    return names


def check_imports(files: list[BundleFile]) -> None:
    """Statically: the first-party code imports only the bundle, the stdlib and the runtime.

    A dynamic check (``import handler``) would see this virtualenv's site-packages, where
    dagster is installed; walking the imports cannot be fooled by that. Imports under ``if
    TYPE_CHECKING:`` never run; neither does the package's lazy ``__getattr__`` (PEP 562),
    which the check accounts for by allowing ``from dagster_taskiq import name`` only for
    bundled submodules and names ``__init__`` defines itself.
    """
    available = top_level_modules(files) | RUNTIME_MODULES | set(sys.stdlib_module_names)
    first_party = {f.destination: f.source for f in files if _is_first_party(f.destination)}
    # Every importable first-party module (a folder's ``__init__`` makes the folder one), and
    # the ``__init__`` of each package among them.
    package_inits: dict[str, Path] = {}
    modules: set[str] = set()
    for destination, source in first_party.items():
        if destination.startswith(f"{PACKAGE}/"):
            module = _dotted(destination.removeprefix(f"{PACKAGE}/").removesuffix(".py"))
            modules.add(module)
            if destination.endswith("/__init__.py"):
                package_inits[module] = source
    problems: list[str] = []
    for destination, source in sorted(first_party.items()):
        for module, names in _runtime_imports(destination, source):
            top = module.split(".", 1)[0]
            if top in FORBIDDEN_TOP_LEVEL or (top.startswith("dagster_") and top != PACKAGE):
                problems.append(f"{destination} imports {module}, which needs dagster")
            elif top == PACKAGE:
                if module not in modules:
                    problems.append(f"{destination} imports {module}, which is not bundled")
                    continue
                # ``from package import name``: a bundled submodule, or a name the package's
                # ``__init__`` defines itself (not one its lazy ``__getattr__`` would import).
                init = package_inits.get(module)
                init_names = _module_level_names(init) if init else set()
                for name in names if init else ():
                    if f"{module}.{name}" not in modules and name not in init_names:
                        problems.append(
                            f"{destination} imports {module}.{name}, which is not bundled"
                        )
            elif top not in available:
                problems.append(f"{destination} imports {module}, which is not bundled")
    if problems:
        raise BundleError("The Lambda bundle would not import: " + "; ".join(problems))


def _dotted(path: str) -> str:
    """``core/ledger`` -> ``dagster_taskiq.core.ledger``; ``core/__init__`` -> the package."""
    parts = [PACKAGE, *PurePosixPath(path).parts]
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _is_first_party(destination: str) -> bool:
    return destination == "handler.py" or destination.startswith(f"{PACKAGE}/")


def _module_level_names(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names: set[str] = set()
    for node in tree.body:
        if isinstance(node, ast.FunctionDef | ast.ClassDef):
            names.add(node.name)
        elif isinstance(node, ast.Assign):
            names.update(t.id for t in node.targets if isinstance(t, ast.Name))
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names.add(node.target.id)
    return names - {"__getattr__"}


def _runtime_imports(destination: str, source: Path) -> Iterator[tuple[str, list[str]]]:
    """(module, imported names) for every import that can run, relative ones resolved."""
    tree = ast.parse(source.read_text(), filename=str(source))
    package = list(Path(destination).parent.parts)
    for statement in tree.body:
        if isinstance(statement, ast.FunctionDef) and statement.name == "__getattr__":
            continue  # PEP 562 lazy attributes: see check_imports
        for node in _executable_imports(statement):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    yield alias.name, []
                continue
            names = [alias.name for alias in node.names]
            if node.level:
                base = package[: len(package) - node.level + 1]
                yield ".".join([*base, node.module] if node.module else base), names
            else:
                yield node.module or "", names


def _executable_imports(node: ast.AST) -> Iterator[ast.Import | ast.ImportFrom]:
    """The imports under ``node``, except those in ``if TYPE_CHECKING:`` blocks."""
    if isinstance(node, ast.Import | ast.ImportFrom):
        yield node
        return
    if isinstance(node, ast.If) and _is_type_checking(node.test):
        children: list[ast.AST] = list(node.orelse)
    else:
        children = list(ast.iter_child_nodes(node))
    for child in children:
        yield from _executable_imports(child)


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def tree_digest(directory: Path) -> str:
    """sha256 over a directory's relative paths and contents: equal trees, equal digests.

    Paths in string order, as a plan's destinations are: a bundle that holds exactly its
    plan's files has the digest of the plan (``_digest``).
    """
    files = {p.relative_to(directory).as_posix(): p for p in directory.rglob("*") if p.is_file()}
    return _hash_tree(sorted(files.items()))


def _discard(bundle: Path) -> None:
    """Remove a bundle directory: renamed aside first, so no synth reads it half-deleted."""
    aside = Path(tempfile.mkdtemp(prefix=f".discarded-{bundle.name}-", dir=bundle.parent))
    with contextlib.suppress(FileNotFoundError):  # another synth discarded it first
        bundle.rename(aside / bundle.name)
    shutil.rmtree(aside)


__all__ = [
    "BUNDLED_DISTRIBUTIONS",
    "BUNDLED_MODULES",
    "LAMBDA_BUILD_DIR",
    "LAMBDA_PYTHON_VERSION",
    "BundleError",
    "BundleFile",
    "build_bundle",
    "check_imports",
    "lambda_runtime_matches",
    "plan_bundle",
    "tree_digest",
]
