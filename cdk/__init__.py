"""The CDK app that deploys dagster-taskiq: ``cdk synth`` / ``cdk deploy`` from the repo root."""
