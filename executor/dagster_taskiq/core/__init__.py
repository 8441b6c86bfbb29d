"""The dagster-free core: what the Lambdas import (settings, message, ledger, SQS)."""
