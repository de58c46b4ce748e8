"""The `ssm:` backend: a Parameter Store parameter, read with GetParameter (WithDecryption).

`ssm:NAME[#VERSION|#LABEL]` (kmskeys/awsname.py) reads the parameter whose name, without its
leading `/`, is `ssm_path_prefix + NAME` (resolver/spec_ssm.py says how a name maps), when
`ssm_parameters` admits it (resolver/sourcename.py): by name in the first configured Region, or
by the full ARN the allowlist lists. The selector travels in AWS's own syntax, `NAME:3` or
`NAME:label`. The answer must name that very parameter (Name, ARN, Region), the version asked
for, and a type `ssm_types` serves (SecureString and String by default; a StringList's value is
its comma-separated text). The host cache, stale answers and bounds are resolver/awssource.py's.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from kmskeys.awsname import SsmQuery, parse_ssm_selector
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
from resolver.spec_ssm import SERVICE, entry_name

if TYPE_CHECKING:
    from resolver.config import Config


def aws_name(key: str) -> str:
    """The name GetParameter takes for a kmskeys-form name (no leading `/`): `/a/b` for a
    hierarchy, `db` for a simple name."""
    return f"/{key}" if "/" in key else key


class ParameterValue:
    """GetParameter of one parameter, one version (an Operation[Fetched] of the gateway)."""

    service = SERVICE
    label = "Parameter Store"
    method = "get_parameter"
    phase = "ssm"

    def __init__(self, key: str, query: SsmQuery) -> None:
        self.key = key  # ssm_path_prefix + NAME, without a leading /
        self.query = query
        self.types: tuple[str, ...] = ()
        self.where = ""

    def authorize(self, config: Config) -> Target:
        """Only a parameter `ssm_parameters` admits; its ARN's Region, or the first one."""
        entries = [e if e.startswith("arn:") else entry_name(e) for e in config.ssm_parameters]
        target = allowed_target(
            allowed(entries, self.key, SERVICE),
            aws_name(self.key),
            config.regions,
            refused=f"parameter not allowed: {aws_name(self.key)!r} is not in ssm_parameters",
            unset="ssm_parameters names parameters: set region (or regions)",
        )
        self.types, self.where = config.ssm_types, target.region
        return target

    def plan(self, config: Config, target: Target) -> tuple[list[Target], str]:
        """One Region: a parameter lives in one."""
        return [target], ""

    def params(self, target: Target) -> dict[str, Any]:
        """The name with AWS's own selector (`:3`, `:label`), always decrypted."""
        return {"Name": target.resource + self.query.aws_suffix(), "WithDecryption": True}

    def answer(self, target: Target, response: dict[str, Any]) -> Fetched:
        """The value, from an answer about this very parameter and version, of a served type."""
        found = response.get("Parameter")
        if not isinstance(found, dict):
            raise ServiceUnavailableError("Parameter Store answered a malformed GetParameter")
        name, arn, value = found.get("Name"), found.get("ARN"), found.get("Value")
        kind, version = found.get("Type"), version_text(found.get("Version"))
        if not all(isinstance(x, str) for x in (name, arn, value, kind)) or version is None:
            raise ServiceUnavailableError("Parameter Store answered a malformed GetParameter")
        assert isinstance(name, str) and isinstance(arn, str) and isinstance(value, str)
        named = name.lstrip("/") == self.key
        check_answered(self, target, arn, self.key, named=named, what="parameter")
        if self.query.version is not None and version != str(self.query.version):
            raise RefusedError("Parameter Store answered another version than asked for")
        if kind not in self.types:
            raise RefusedError(
                f"parameter type {kind} is not in ssm_types ({', '.join(self.types)})"
            )
        try:
            return Fetched(value.encode("utf-8"), version)
        except UnicodeEncodeError:
            raise ServiceUnavailableError("Parameter Store answered a malformed value") from None

    def invalid_request(self) -> str:
        """botocore refused the parameters."""
        return "the name or selector does not make a valid GetParameter request"

    def refusal(self, code: str) -> ResolverError | None:
        """What a refusal code means for GetParameter (None: a refusal like any other)."""
        what = f"{aws_name(self.key) + self.query.aws_suffix()!r} in {self.where}"
        if code in ("ParameterNotFound", "ParameterVersionNotFound"):
            return UnknownSecretError(f"Parameter Store {code}: no parameter {what}")
        if code == "InvalidKeyId":
            return RefusedError(
                f"Parameter Store {code}: the KMS key of {what} is disabled, gone or not usable"
            )
        return None

    def identity(self, target: Target) -> str:
        """The call, as the host cache keys it: Region, parameter, selector, and the types
        served (an entry kept under other ssm_types is never a hit)."""
        suffix, types = self.query.aws_suffix(), ",".join(self.types)
        return "\0".join((SERVICE, target.region, target.resource, suffix, types))


class ParameterStoreBackend(SourceBackend):
    """`ssm:` requests: the allowlist, the host cache, then GetParameter."""

    source = "parameterstore"

    def operation(self, request: Request, notes: dict[str, str]) -> ParameterValue:
        """GetParameter of the request's parameter and version."""
        try:
            query = parse_ssm_selector(request.qualifier)
        except InvalidNameError as exc:
            raise RefusedError(str(exc)) from None
        if query.label is not None:
            notes["label"] = query.label
        return ParameterValue(self.config.ssm_path_prefix + request.name, query)
