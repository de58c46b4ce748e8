"""Events as AWS delivers them to EventBridge, for the fleet-rotation rules.

Shapes from the AWS documentation: Secrets Manager API calls arrive as "AWS API Call via
CloudTrail" (the secret named as the caller named it, by name or ARN, in
requestParameters.secretId), a finished rotation as the CloudTrail service event
RotationSucceeded (the secret's ARN in additionalEventData.SecretId), Parameter Store changes
as "Parameter Store Change" (the parameter's name in detail.name), KMS key rotation as "KMS
CMK Rotation" (the key's ARN in resources). kmskeys' own event is defined by
modules/fleet-rotation (terraform/README.md has its schema).
"""

from __future__ import annotations

import json
import uuid
from typing import Any

from tests.support.kms_emulator import KmsEmulator
from tests.support.names import unique

ACCOUNT = "123456789012"


def envelope(
    source: str, detail_type: str, detail: dict[str, Any], region: str, resources: list[str]
) -> dict[str, Any]:
    """The EventBridge event around `detail`."""
    return {
        "version": "0",
        "id": str(uuid.uuid4()),
        "detail-type": detail_type,
        "source": source,
        "account": ACCOUNT,
        "time": "2025-01-01T00:00:00Z",
        "region": region,
        "resources": resources,
        "detail": detail,
    }


def secret_arn(region: str, name: str, suffix: str = "AbC123") -> str:
    """A secret's full ARN: its name and the six characters Secrets Manager appends."""
    return f"arn:aws:secretsmanager:{region}:{ACCOUNT}:secret:{name}-{suffix}"


def secrets_manager_call(
    region: str,
    call: str,
    secret_id: str,
    stages: list[str] | None = None,
    error: str | None = None,
) -> dict[str, Any]:
    """A Secrets Manager API call, as CloudTrail hands it to EventBridge."""
    request: dict[str, Any] = {"secretId": secret_id}
    if call == "PutSecretValue":
        request["clientRequestToken"] = str(uuid.uuid4())
        if stages is not None:
            request["versionStages"] = stages
    if call == "UpdateSecretVersionStage":
        request.update(versionStage="AWSCURRENT", moveToVersionId=str(uuid.uuid4()))
    detail: dict[str, Any] = {
        "eventVersion": "1.08",
        "eventSource": "secretsmanager.amazonaws.com",
        "eventName": call,
        "awsRegion": region,
        "requestParameters": request,
        "responseElements": None,
        "eventType": "AwsApiCall",
    }
    if error is not None:
        detail.update(errorCode=error, errorMessage="refused")
    return envelope("aws.secretsmanager", "AWS API Call via CloudTrail", detail, region, [])


def rotation_succeeded(region: str, arn: str) -> dict[str, Any]:
    """Secrets Manager's RotationSucceeded service event."""
    detail = {
        "eventVersion": "1.05",
        "eventSource": "secretsmanager.amazonaws.com",
        "eventName": "RotationSucceeded",
        "awsRegion": region,
        "additionalEventData": {"SecretId": arn},
        "eventType": "AwsServiceEvent",
    }
    return envelope("aws.secretsmanager", "AWS Service Event via CloudTrail", detail, region, [])


def parameter_change(region: str, name: str, operation: str = "Update") -> dict[str, Any]:
    """A Parameter Store Change event."""
    detail = {"operation": operation, "name": name, "type": "SecureString", "description": ""}
    arn = f"arn:aws:ssm:{region}:{ACCOUNT}:parameter/{name.lstrip('/')}"
    return envelope("aws.ssm", "Parameter Store Change", detail, region, [arn])


def key_rotation(region: str, key_arn: str) -> dict[str, Any]:
    """A KMS CMK Rotation event."""
    detail = {"key-id": key_arn.rsplit("/", 1)[1]}
    return envelope("aws.kms", "KMS CMK Rotation", detail, region, [key_arn])


def flush_request(region: str, name: Any, prefix: Any) -> dict[str, Any]:
    """kmskeys' own Flush Request: detail {"name": NAME, "prefix": PREFIX}."""
    detail = {"name": name, "prefix": prefix}
    return envelope("kmskeys", "kmskeys Flush Request", detail, region, [])


class Probe:
    """EventBridge's engine (moto's, over HTTP) run on a pattern and a target's transformer.

    moto has no TestEventPattern, and it cannot deliver to an SSM target; so each check puts
    the pattern on a rule of an event bus of the probe's own, with an SQS target carrying the
    same input transformer (or constant input), puts the event on that bus, and reads what
    the queue received: nothing when the pattern does not match, else the target's input.
    """

    def __init__(self, emulator: KmsEmulator) -> None:
        self.events = emulator.client("events")
        self.sqs = emulator.client("sqs")
        self.bus = unique("probe")
        self.events.create_event_bus(Name=self.bus)
        self.queue = self.sqs.create_queue(QueueName=unique("probe"))["QueueUrl"]
        attributes = self.sqs.get_queue_attributes(QueueUrl=self.queue, AttributeNames=["QueueArn"])
        self.queue_arn = attributes["Attributes"]["QueueArn"]

    def deliver(
        self, pattern: str, event: dict[str, Any], target: dict[str, Any] | None = None
    ) -> list[Any]:
        """What a rule with `pattern` and a target shaped like `target` hands its target."""
        rule = unique("rule")
        self.events.put_rule(Name=rule, EventBusName=self.bus, EventPattern=pattern)
        shaped = {k: v for k, v in (target or {}).items() if k in ("Input", "InputTransformer")}
        self.events.put_targets(
            Rule=rule,
            EventBusName=self.bus,
            Targets=[{"Id": "probe", "Arn": self.queue_arn, **shaped}],
        )
        try:
            entry = {
                "Source": event["source"],
                "DetailType": event["detail-type"],
                "Detail": json.dumps(event["detail"]),
                "Resources": event["resources"],
                "EventBusName": self.bus,
            }
            answer = self.events.put_events(Entries=[entry])
            assert answer["FailedEntryCount"] == 0, answer
            received = self.sqs.receive_message(QueueUrl=self.queue, MaxNumberOfMessages=10)
            messages = received.get("Messages", [])
            for message in messages:
                self.sqs.delete_message(QueueUrl=self.queue, ReceiptHandle=message["ReceiptHandle"])
            return [json.loads(m["Body"]) for m in messages]
        finally:
            self.events.remove_targets(Rule=rule, EventBusName=self.bus, Ids=["probe"])
            self.events.delete_rule(Name=rule, EventBusName=self.bus)

    def matches(self, pattern: str, event: dict[str, Any]) -> bool:
        """Whether the pattern matches the event."""
        return bool(self.deliver(pattern, event))

    def close(self) -> None:
        self.sqs.delete_queue(QueueUrl=self.queue)
        self.events.delete_event_bus(Name=self.bus)
