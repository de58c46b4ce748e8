"""The `sm:` backend: a Secrets Manager secret, read with GetSecretValue through the gateway.

`sm:NAME[#FIELD][#stage=LABEL|#version=ID]` (kmskeys/awsname.py) reads the secret
`sm_path_prefix + NAME`, when `sm_secrets` admits it (resolver/sourcename.py): by name in the
first configured Region, or by the full ARN the allowlist lists (which pins account and
Region). The answer must name that very secret (Name, ARN, Region) and the version asked for.
A text secret (SecretString) is served as its UTF-8 bytes, a binary one (SecretBinary) as is;
`#FIELD` serves one top-level field of a JSON object (`select_field`). The host cache, stale
answers and bounds are resolver/awssource.py's. The KMS decrypt Secrets Manager makes for the
caller is AWS's business (terraform's resolver-host module scopes it by kms:ViaService).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from kmskeys.awsname import SmQuery, parse_sm_selector
from kmskeys.errors import InvalidNameError
from resolver.awssource import (
    Fetched,
    SourceBackend,
    allowed_target,
    check_answered,
    version_text,
)
from resolver.backend import Request
from resolver.errors import (
    RefusedError,
    ResolverError,
    ServiceUnavailableError,
    UnknownSecretError,
)
from resolver.gateway import Target
from resolver.sourcename import allowed
from resolver.spec_sm import SERVICE

if TYPE_CHECKING:
    from resolver.config import Config


class SecretValue:
    """GetSecretValue of one secret, one version (an Operation[Fetched] of the gateway)."""

    service = SERVICE
    label = "Secrets Manager"
    method = "get_secret_value"
    phase = "sm"

    def __init__(self, secret: str, query: SmQuery) -> None:
        self.secret = secret  # the secret's name: sm_path_prefix + NAME
        self.query = query
        self.where = ""

    def authorize(self, config: Config) -> Target:
        """Only a secret `sm_secrets` admits; its ARN's Region, or the first configured."""
        target = allowed_target(
            allowed(config.sm_secrets, self.secret, SERVICE),
            self.secret,
            config.regions,
            refused=f"secret not allowed: {self.secret!r} is not in sm_secrets",
            unset="sm_secrets names secrets by name: set region (or regions)",
        )
        self.where = target.region
        return target

    def plan(self, config: Config, target: Target) -> tuple[list[Target], str]:
        """One Region: a replica may lag its primary, so no fallback."""
        return [target], ""

    def params(self, target: Target) -> dict[str, Any]:
        """SecretId, and the version: a stage (AWSCURRENT by default) or a VersionId."""
        params: dict[str, Any] = {"SecretId": target.resource}
        if self.query.version_id is not None:
            params["VersionId"] = self.query.version_id
        else:
            params["VersionStage"] = self.query.aws_stage
        return params

    def answer(self, target: Target, response: dict[str, Any]) -> Fetched:
        """The value, from an answer about this very secret and version."""
        version = version_text(response.get("VersionId"))
        name, arn = response.get("Name"), response.get("ARN")
        if version is None or not isinstance(name, str) or not isinstance(arn, str):
            raise ServiceUnavailableError("Secrets Manager answered a malformed GetSecretValue")
        check_answered(self, target, arn, self.secret, named=name == self.secret, what="secret")
        stages = response.get("VersionStages")
        stage = self.query.aws_stage
        if stage is not None and isinstance(stages, list) and stage not in stages:
            raise RefusedError(f"Secrets Manager answered a version without the stage {stage}")
        if self.query.version_id is not None and version != self.query.version_id:
            raise RefusedError("Secrets Manager answered another VersionId than asked for")
        text, binary = response.get("SecretString"), response.get("SecretBinary")
        if isinstance(text, str) and binary is None:
            try:
                return Fetched(text.encode("utf-8"), version)
            except UnicodeEncodeError:
                pass
        elif isinstance(binary, bytes) and text is None:
            return Fetched(binary, version, binary=True)
        raise ServiceUnavailableError("Secrets Manager answered a malformed secret value")

    def invalid_request(self) -> str:
        """botocore refused the parameters."""
        return "the name or selector does not make a valid GetSecretValue request"

    def refusal(self, code: str) -> ResolverError | None:
        """What a refusal code means for GetSecretValue (None: a refusal like any other)."""
        what = f"{self.secret!r} in {self.where}"
        if code == "ResourceNotFoundException":
            version = self.query.version_id or self.query.aws_stage
            return UnknownSecretError(
                f"Secrets Manager {code}: no secret {what}, or no version {version} of it"
            )
        if code == "InvalidRequestException":
            return UnknownSecretError(
                f"Secrets Manager {code}: secret {what} is marked for deletion "
                "(RestoreSecret brings it back)"
            )
        if code == "DecryptionFailure":
            return RefusedError(
                f"Secrets Manager {code}: its KMS key did not decrypt {what} for this role"
            )
        return None

    def identity(self, target: Target) -> str:
        """The call, as the host cache keys it: Region, secret, version (not the field)."""
        version = self.query.version_id or f"stage={self.query.aws_stage}"
        return "\0".join((SERVICE, target.region, target.resource, version))


class SecretsManagerBackend(SourceBackend):
    """`sm:` requests: the allowlist, the host cache, GetSecretValue, then the field."""

    source = "secretsmanager"

    def operation(self, request: Request, notes: dict[str, str]) -> SecretValue:
        """GetSecretValue of the request's secret and version."""
        try:
            query = parse_sm_selector(request.qualifier)
        except InvalidNameError as exc:
            raise RefusedError(str(exc)) from None
        if query.aws_stage is not None:
            notes["stage"] = query.aws_stage  # a VersionId asked for is logged as version=
        if query.field is not None:
            notes["field"] = query.field
        return SecretValue(self.config.sm_path_prefix + request.name, query)

    def select(self, fetched: Fetched, request: Request) -> bytes:
        """The whole value, or the field the description names."""
        field = parse_sm_selector(request.qualifier).field
        if field is None:
            return fetched.value
        if fetched.binary:
            raise RefusedError(f"the secret is binary (SecretBinary): it has no field {field!r}")
        return select_field(fetched.value, field)


class _Number(str):
    """A JSON number as the secret wrote it (5432, 1e3): rendered as is, never reformatted."""


def select_field(value: bytes, field: str) -> bytes:
    """The top-level `field` of a JSON object, rendered: a string as its UTF-8 bytes, a number
    as written, true/false, an object or array as compact JSON; null is refused."""
    import json

    try:
        document = json.loads(value, parse_int=_Number, parse_float=_Number)
    except (ValueError, RecursionError):
        raise RefusedError(f"the secret is not JSON, so it has no field {field!r}") from None
    if not isinstance(document, dict):
        raise RefusedError(f"the secret is JSON but not an object: it has no field {field!r}")
    if field not in document:
        raise UnknownSecretError(f"the secret has no field {field!r}")
    found = document[field]
    if found is None:
        raise RefusedError(f"the secret's field {field!r} is null: there is no value to serve")
    try:
        if isinstance(found, str) and not isinstance(found, _Number):
            return found.encode("utf-8")
        return _render(found).encode("utf-8")
    except UnicodeEncodeError:
        raise RefusedError(f"the secret's field {field!r} is not valid Unicode") from None


def _render(value: object) -> str:
    import json

    if isinstance(value, _Number):
        return str.__str__(value)
    if isinstance(value, bool) or value is None:
        return json.dumps(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, list):
        return "[" + ",".join(_render(item) for item in value) + "]"
    assert isinstance(value, dict)
    items = (json.dumps(k, ensure_ascii=False) + ":" + _render(v) for k, v in value.items())
    return "{" + ",".join(items) + "}"
