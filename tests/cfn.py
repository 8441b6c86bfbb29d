"""CloudFormation values resolved outside CloudFormation: a synthesized template's references
(Ref, Fn::GetAtt, Fn::Join, Fn::Sub, Fn::Select, Fn::Split) turned into the strings they
would be once deployed, from a map of what each resource is (its name, URL or ARN).

Tests use it to read the template as the code would see it deployed: environments fed to the
components' settings loaders, and IAM policies given to credentials on moto's server.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Any

# (logical id, attribute or None for Ref) -> the deployed value.
Physical = Callable[[str, str | None], str]

ACCOUNT = "123456789012"
REGION = "us-east-1"
_SUB_VARIABLE = re.compile(r"\$\{([^}!]+)\}")


class Unresolvable(ValueError):
    """A reference the map does not cover (a resource the test did not deploy)."""


def pseudo_parameters(*, account: str = ACCOUNT, region: str = REGION) -> dict[str, str]:
    return {
        "AWS::AccountId": account,
        "AWS::Region": region,
        "AWS::Partition": "aws",
        "AWS::URLSuffix": "amazonaws.com",
        "AWS::StackName": "DagsterTaskiq",
        "AWS::NoValue": "",
    }


def resolve(value: Any, physical: Physical, pseudo: Mapping[str, str]) -> Any:
    """``value`` with every intrinsic function of the kinds above evaluated."""
    if isinstance(value, list):
        return [resolve(item, physical, pseudo) for item in value]
    if not isinstance(value, dict):
        return value
    if len(value) != 1:
        return {key: resolve(item, physical, pseudo) for key, item in value.items()}
    ((name, argument),) = value.items()
    if name == "Ref":
        return pseudo[argument] if argument in pseudo else physical(argument, None)
    if name == "Fn::GetAtt":
        logical_id, attribute = argument if isinstance(argument, list) else argument.split(".", 1)
        return physical(logical_id, attribute)
    if name == "Fn::Join":
        delimiter, parts = argument
        return delimiter.join(str(resolve(part, physical, pseudo)) for part in parts)
    if name == "Fn::Select":
        index, items = argument
        return resolve(items, physical, pseudo)[int(index)]
    if name == "Fn::Split":
        delimiter, text = argument
        return str(resolve(text, physical, pseudo)).split(delimiter)
    if name == "Fn::Sub":
        text, variables = (argument, {}) if isinstance(argument, str) else argument
        given = {key: resolve(item, physical, pseudo) for key, item in variables.items()}

        def substitute(match: re.Match[str]) -> str:
            reference = match.group(1)
            if reference in given:
                return str(given[reference])
            if reference in pseudo:
                return pseudo[reference]
            logical_id, _, attribute = reference.partition(".")
            return physical(logical_id, attribute or None)

        return _SUB_VARIABLE.sub(substitute, text)
    if name.startswith("Fn::"):
        raise Unresolvable(f"{name} is not supported here: {value}")
    return {name: resolve(argument, physical, pseudo)}


def sample_physical(
    template: Mapping[str, Any], *, account: str = ACCOUNT, region: str = REGION
) -> Physical:
    """Plausible deployed values for every resource of ``template``, named after its logical
    id, in the formats AWS uses (queue URLs, ARNs, names, endpoints)."""
    resources: Mapping[str, Any] = template["Resources"]

    def physical(logical_id: str, attribute: str | None) -> str:
        kind = resources[logical_id]["Type"] if logical_id in resources else None
        name = logical_id.lower()
        arn = f"arn:aws:{{}}:{region}:{account}:{{}}"
        values: dict[tuple[str | None, str | None], str] = {
            ("AWS::SQS::Queue", None): f"https://sqs.{region}.amazonaws.com/{account}/{name}",
            ("AWS::SQS::Queue", "Arn"): arn.format("sqs", name),
            ("AWS::SQS::Queue", "QueueName"): name,
            ("AWS::SNS::Topic", None): arn.format("sns", name),
            ("AWS::SNS::Topic", "TopicArn"): arn.format("sns", name),
            ("AWS::SecretsManager::Secret", None): arn.format("secretsmanager", f"secret:{name}")
            + "-AbCdEf",
            ("AWS::SecretsManager::SecretTargetAttachment", None): arn.format(
                "secretsmanager", f"secret:{name}"
            )
            + "-AbCdEf",
            ("AWS::RDS::DBCluster", "Endpoint.Address"): f"{name}.cluster-c0ffee.{region}"
            ".rds.amazonaws.com",
            ("AWS::RDS::DBCluster", "Endpoint.Port"): "5432",
            ("AWS::ECS::Cluster", None): name,
            ("AWS::ECS::Cluster", "Arn"): arn.format("ecs", f"cluster/{name}"),
            ("AWS::ECS::Service", None): arn.format("ecs", f"service/cluster/{name}"),
            ("AWS::ECS::Service", "Name"): name,
            ("AWS::Lambda::Function", None): name,
            ("AWS::Lambda::Function", "Arn"): arn.format("lambda", f"function:{name}"),
            ("AWS::KMS::Key", "Arn"): arn.format("kms", f"key/{name}"),
            ("AWS::Logs::LogGroup", None): name,
            ("AWS::Logs::LogGroup", "Arn"): arn.format("logs", f"log-group:{name}:*"),
            ("AWS::IAM::Role", "Arn"): f"arn:aws:iam::{account}:role/{name}",
            ("AWS::EC2::SecurityGroup", "GroupId"): "sg-0123456789abcdef0",
        }
        try:
            return values[(kind, attribute)]
        except KeyError:
            raise Unresolvable(f"No sample value for {logical_id} ({kind}) {attribute}") from None

    return physical
