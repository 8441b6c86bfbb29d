"""Where things are in the repository, wherever the app is run from."""

from __future__ import annotations

from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
LAMBDAS_DIR = REPO_ROOT / "lambdas"
PACKAGE_DIR = REPO_ROOT / "executor" / "dagster_taskiq"
# Lambda bundles; build/ is gitignored.
LAMBDA_BUILD_DIR = REPO_ROOT / "build" / "lambda"
