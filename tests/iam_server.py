"""moto's server with IAM enforced, for the least-privilege tests: run as a child process,
``python -m tests.iam_server AUDIT_FILE``; prints one JSON line (port, admin credentials),
then serves on loopback until killed or its parent exits.

It is the project's SQS emulator (``dagster_taskiq.local.sqs_emulator``) started with
``INITIAL_NO_AUTH_ACTION_COUNT=0`` (set by the parent, read by moto when imported), so every
call must be signed by an IAM user of the server and allowed by that user's policies. Three
things are added, each because moto's IAM simulation stops short of AWS's here:

- an administrator is created in the IAM backend before serving (with enforcement from the
  first request, no request could create one), and its keys are printed;
- the resource of each call the project makes to ECS, Lambda, SNS and Secrets Manager is
  named as AWS names it (moto checks only SQS calls against a resource and every other call
  against "*", which a resource-scoped statement never matches);
- an API operation whose IAM action has another name is checked under that name (Lambda's
  ``Invoke`` is ``lambda:InvokeFunction``; SQS's ``SendMessageBatch`` needs
  ``sqs:SendMessage``);

and every decision is appended to AUDIT_FILE as a JSON line (principal, action, resource,
allowed), so a test can tell which calls a component made and which were refused.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable
from typing import Any

ACCOUNT = "123456789012"
ADMIN = "administrator"
ADMIN_POLICY = {
    "Version": "2012-10-17",
    "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}],
}
# API operation -> IAM action, where they differ (for the calls the project makes). SQS
# authorizes a batch call with its single call's permission.
IAM_ACTIONS = {
    "lambda:Invoke": "lambda:InvokeFunction",
    "lambda:InvokeAsync": "lambda:InvokeFunction",
    "sqs:SendMessageBatch": "sqs:SendMessage",
    "sqs:DeleteMessageBatch": "sqs:DeleteMessage",
    "sqs:ChangeMessageVisibilityBatch": "sqs:ChangeMessageVisibility",
}


def _arn(response: Any, service: str, resource: str) -> str:
    return f"arn:aws:{service}:{response.region}:{response.current_account}:{resource}"


def _ecs_resource(response: Any) -> str:
    action = response._get_action()
    cluster = response._get_param("cluster") or "default"
    cluster = cluster.rsplit("/", 1)[-1]
    if action == "DescribeServices":
        services = response._get_param("services") or []
        service = services[0] if services else None
    else:
        service = response._get_param("service")
    if not service:
        return "*"
    if service.startswith("arn:"):
        return str(service)
    return _arn(response, "ecs", f"service/{cluster}/{service}")


def _lambda_resource(response: Any) -> str:
    name = (getattr(response, "uri_match", None) or {}).get("FunctionName")
    if not name:
        parts = response.path.split("/functions/", 1)
        name = parts[1].split("/", 1)[0] if len(parts) == 2 else None
    if not name:
        return "*"
    name = name.replace("%3A", ":")
    return str(name) if name.startswith("arn:") else _arn(response, "lambda", f"function:{name}")


def _sns_resource(response: Any) -> str:
    return str(response._get_param("TopicArn") or "*")


def _secret_resource(response: Any) -> str:
    secret_id = response._get_param("SecretId")
    if not secret_id:
        return "*"
    if secret_id.startswith("arn:"):
        return str(secret_id)
    from moto.secretsmanager.models import secretsmanager_backends

    backend = secretsmanager_backends[response.current_account][response.region]
    try:
        return str(backend.describe_secret(secret_id).arn)
    except Exception:
        return "*"


def _resource_names() -> list[tuple[Any, Callable[[Any], str]]]:
    from moto.awslambda.responses import LambdaResponse
    from moto.ecs.responses import EC2ContainerServiceResponse
    from moto.secretsmanager.responses import SecretsManagerResponse
    from moto.sns.responses import SNSResponse

    return [
        (EC2ContainerServiceResponse, _ecs_resource),
        (LambdaResponse, _lambda_resource),
        (SNSResponse, _sns_resource),
        (SecretsManagerResponse, _secret_resource),
    ]


def enforce_like_aws(audit_path: str) -> None:
    """Resources and action names as above, and the audit of every decision."""
    from moto.iam.access_control import IAMRequestBase

    for response_class, name_resource in _resource_names():
        assert not hasattr(response_class, "_determine_resource"), response_class

        def determine(self: Any, name_resource: Callable[[Any], str] = name_resource) -> str:
            try:
                return name_resource(self)
            except Exception:
                return "*"

        response_class._determine_resource = determine

    original = IAMRequestBase.check_action_permitted
    lock = threading.Lock()

    def check_action_permitted(self: Any, resource: str) -> None:
        self._action = IAM_ACTIONS.get(self._action, self._action)
        allowed = False
        try:
            original(self, resource)
            allowed = True
        finally:
            entry = {
                "principal": self._access_key.arn,
                "action": self._action,
                "resource": resource,
                "allowed": allowed,
            }
            with lock, open(audit_path, "a") as audit:
                audit.write(json.dumps(entry) + "\n")

    IAMRequestBase.check_action_permitted = check_action_permitted  # type: ignore[method-assign]


def create_administrator() -> tuple[str, str]:
    from moto.iam.models import iam_backends

    backend = iam_backends[ACCOUNT]["aws"]
    backend.create_user("us-east-1", ADMIN)
    backend.put_user_policy(ADMIN, "everything", json.dumps(ADMIN_POLICY))
    key = backend.create_access_key(ADMIN)
    return key.access_key_id, key.secret_access_key


def main() -> None:
    if os.environ.get("INITIAL_NO_AUTH_ACTION_COUNT") != "0":
        raise SystemExit("Start with INITIAL_NO_AUTH_ACTION_COUNT=0: IAM enforced from the start")
    from moto.moto_server.werkzeug_app import (
        DomainDispatcherApplication,
        MotoRequestHandler,
        create_backend_app,
    )
    from werkzeug.serving import make_server

    from dagster_taskiq.local.sqs_emulator import _exit_with_parent, speed_up_moto

    speed_up_moto()
    enforce_like_aws(sys.argv[1])
    key_id, secret = create_administrator()
    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    threading.Thread(target=_exit_with_parent, args=(os.getppid(),), daemon=True).start()
    app = DomainDispatcherApplication(create_backend_app)
    server = make_server("127.0.0.1", 0, app, threaded=True, request_handler=MotoRequestHandler)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    print(json.dumps({"port": server.server_port, "key_id": key_id, "secret": secret}), flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
