"""Reading IAM policy documents the way IAM matches actions (case-insensitive, * and ?).

The documents are the JSON terraform rendered. The AWS provider writes a one-element list as a
bare string and orders set elements its own way, so `statements()` hands every statement back
with each of those values as a sorted list: tests compare lists, whatever the rendering.
"""

from __future__ import annotations

import re
from typing import Any

NAME_KEY = "kmskeys_name"
NAME_CONDITION = f"kms:EncryptionContext:{NAME_KEY}"

# Every KMS operation that takes an encryption context and touches data.
DATA_PLANE = (
    "kms:Encrypt",
    "kms:Decrypt",
    "kms:ReEncryptFrom",
    "kms:ReEncryptTo",
    "kms:GenerateDataKey",
    "kms:GenerateDataKeyWithoutPlaintext",
    "kms:GenerateDataKeyPair",
    "kms:GenerateDataKeyPairWithoutPlaintext",
)
ENCRYPTING = tuple(a for a in DATA_PLANE if a != "kms:Decrypt" and "ReEncryptFrom" not in a)
DECRYPTING = ("kms:Decrypt", "kms:ReEncryptFrom")


def _as_list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else [value]


def action_matches(pattern: str, action: str) -> bool:
    """Whether an IAM Action pattern covers `action`."""
    regex = "".join(".*" if c == "*" else "." if c == "?" else re.escape(c) for c in pattern)
    return re.fullmatch(regex, action, flags=re.IGNORECASE) is not None


LIST_ELEMENTS = ("Action", "NotAction", "Resource", "NotResource")


def _sorted_list(value: Any) -> list[Any]:
    return sorted(_as_list(value))


def normalized(statement: dict[str, Any]) -> dict[str, Any]:
    """The statement with Action, Resource, principals and condition values as sorted lists."""
    out = dict(statement)
    for element in LIST_ELEMENTS:
        if element in out:
            out[element] = _sorted_list(out[element])
    for element in ("Principal", "NotPrincipal"):
        if isinstance(out.get(element), dict):
            out[element] = {k: _sorted_list(v) for k, v in out[element].items()}
    if "Condition" in out:
        out["Condition"] = {
            op: {key: _sorted_list(v) for key, v in tests.items()}
            for op, tests in out["Condition"].items()
        }
    return out


def statements(policy: dict[str, Any], effect: str | None = None) -> list[dict[str, Any]]:
    """The policy's statements (normalized), optionally only those with `effect`."""
    found = [normalized(s) for s in _as_list(policy["Statement"])]
    return [s for s in found if effect is None or s["Effect"] == effect]


def covers(statement: dict[str, Any], action: str) -> bool:
    """Whether the statement's Action (or NotAction) applies to `action`."""
    if "NotAction" in statement:
        return not any(action_matches(p, action) for p in _as_list(statement["NotAction"]))
    return any(action_matches(p, action) for p in _as_list(statement["Action"]))


def allowing(policy: dict[str, Any], action: str) -> list[dict[str, Any]]:
    """Allow statements that apply to `action`."""
    return [s for s in statements(policy, "Allow") if covers(s, action)]


def unconditionally_denied(policy: dict[str, Any], action: str) -> bool:
    """Whether a Deny statement without conditions, on every resource, covers `action`."""
    return any(
        covers(s, action) and "Condition" not in s and s.get("Resource") == ["*"]
        for s in statements(policy, "Deny")
    )


def denied_on_every_key_but(policy: dict[str, Any], action: str, key_arn: str) -> bool:
    """Whether a Deny without conditions covers `action` on every resource except `key_arn`."""
    return any(
        covers(s, action) and "Condition" not in s and s.get("NotResource") == [key_arn]
        for s in statements(policy, "Deny")
    )


def denied_on(policy: dict[str, Any], action: str, key_arn: str) -> bool:
    """Whether a Deny without conditions covers `action` on `key_arn` itself."""
    return any(
        covers(s, action) and "Condition" not in s and key_arn in s.get("Resource", [])
        for s in statements(policy, "Deny")
    )


def requires_name_binding(statement: dict[str, Any]) -> bool:
    """Whether the statement only applies when the context includes kmskeys_name."""
    condition = statement.get("Condition", {})
    keys = condition.get("ForAnyValue:StringEquals", {}).get("kms:EncryptionContextKeys", [])
    present = condition.get("Null", {}).get(NAME_CONDITION)
    return NAME_KEY in _as_list(keys) and _as_list(present) == ["false"]


SEAL_CONTEXT_KEYS = ["kmskeys_host", "kmskeys_name", "kmskeys_scope", "kmskeys_seal"]


def requires_host_binding(statement: dict[str, Any]) -> bool:
    """Whether the statement only applies to a seal context bound to the caller's instance.

    kmskeys_host must equal ${ec2:SourceInstanceARN} (and that key must be present),
    kmskeys_seal must be "stored", kmskeys_scope a user or the machine, kmskeys_name present,
    and the context may hold no key but those four, spelled exactly so.
    """
    condition = statement.get("Condition", {})
    equals = condition.get("StringEquals", {})
    null = condition.get("Null", {})
    return (
        _as_list(equals.get("kms:EncryptionContext:kmskeys_host")) == ["${ec2:SourceInstanceARN}"]
        and _as_list(equals.get("kms:EncryptionContext:kmskeys_seal")) == ["stored"]
        and sorted(
            _as_list(condition.get("StringLike", {}).get("kms:EncryptionContext:kmskeys_scope"))
        )
        == ["machine", "user:*"]
        and _as_list(null.get("ec2:SourceInstanceARN")) == ["false"]
        and _as_list(null.get(NAME_CONDITION)) == ["false"]
        and sorted(
            _as_list(
                condition.get("ForAllValues:StringEquals", {}).get("kms:EncryptionContextKeys")
            )
        )
        == SEAL_CONTEXT_KEYS
    )


def name_patterns(statement: dict[str, Any]) -> list[str]:
    """The StringLike patterns the kmskeys_name value must match."""
    return _as_list(statement.get("Condition", {}).get("StringLike", {}).get(NAME_CONDITION, []))


def principals(statement: dict[str, Any]) -> list[str]:
    """The AWS principals a statement names."""
    return [str(p) for p in _as_list(statement.get("Principal", {}).get("AWS", []))]
