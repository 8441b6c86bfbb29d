"""The CDK app: ``cdk synth`` / ``cdk deploy`` from the repository root (see cdk.json).

Settings come from CDK context; ``cdk synth -c environment=prod -c max_workers=20``. The
settings, their defaults and meanings are in ``cdk/dagster_taskiq_cdk/settings.py``.
"""

from __future__ import annotations

from aws_cdk import App

from cdk.dagster_taskiq_cdk.stack import build_stack


def main() -> None:
    app = App()
    build_stack(app)
    app.synth()


if __name__ == "__main__":
    main()
