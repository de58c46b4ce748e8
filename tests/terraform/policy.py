"""Reading IAM policy documents the way IAM matches actions (case-insensitive, * and ?)."""

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


def statements(policy: dict[str, Any], effect: str | None = None) -> list[dict[str, Any]]:
    """The policy's statements, optionally only those with `effect`."""
    found = _as_list(policy["Statement"])
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
        covers(s, action) and "Condition" not in s and _as_list(s.get("Resource")) == ["*"]
        for s in statements(policy, "Deny")
    )


def requires_name_binding(statement: dict[str, Any]) -> bool:
    """Whether the statement only applies when the context includes kmskeys_name."""
    condition = statement.get("Condition", {})
    keys = condition.get("ForAnyValue:StringEquals", {}).get("kms:EncryptionContextKeys", [])
    present = condition.get("Null", {}).get(NAME_CONDITION)
    return NAME_KEY in _as_list(keys) and _as_list(present) == ["false"]


def name_patterns(statement: dict[str, Any]) -> list[str]:
    """The StringLike patterns the kmskeys_name value must match."""
    return _as_list(statement.get("Condition", {}).get("StringLike", {}).get(NAME_CONDITION, []))


def principals(statement: dict[str, Any]) -> list[str]:
    """The AWS principals a statement names."""
    return [str(p) for p in _as_list(statement.get("Principal", {}).get("AWS", []))]
