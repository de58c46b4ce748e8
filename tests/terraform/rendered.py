"""What terraform rendered: values from `terraform show -json` of a plan or a state.

A plan's JSON holds the data sources read while planning (`prior_state`, where every
`aws_iam_policy_document` is already rendered) and the planned resources (`planned_values`); a
state's JSON holds both under `values`. Either way a value is found by its address, such as
`module.host_default.data.aws_iam_policy_document.kms` or
`module.web_hosts.aws_launch_template.this[0]`.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from typing import Any

import yaml


def _walk(module: dict[str, Any] | None) -> Iterator[dict[str, Any]]:
    if not module:
        return
    yield from module.get("resources", [])
    for child in module.get("child_modules", []):
        yield from _walk(child)


class Rendered:
    """The resources and data sources of one `terraform show -json`, by address."""

    def __init__(self, shown: dict[str, Any]) -> None:
        self.shown = shown
        roots = [
            shown.get("prior_state", {}).get("values", {}).get("root_module"),
            shown.get("planned_values", {}).get("root_module"),
            shown.get("values", {}).get("root_module"),
        ]
        self.resources: dict[str, dict[str, Any]] = {}
        for root in roots:
            for resource in _walk(root):
                self.resources[resource["address"]] = resource

    def values(self, address: str) -> dict[str, Any]:
        """The attribute values of the resource or data source at `address`."""
        try:
            return dict(self.resources[address]["values"])
        except KeyError:
            near = sorted(a for a in self.resources if a.split(".")[:2] == address.split(".")[:2])
            raise KeyError(f"nothing rendered at {address}; in that module: {near}") from None

    def has(self, address: str) -> bool:
        return address in self.resources

    def policy(self, address: str) -> dict[str, Any]:
        """The policy JSON of a data source (its `json`) or a resource (its `policy`)."""
        values = self.values(address)
        document = values.get("json", values.get("policy"))
        assert isinstance(document, str), f"{address} has no rendered policy: {values}"
        parsed = json.loads(document)
        assert isinstance(parsed, dict)
        return parsed

    def addresses(self, mode: str = "managed") -> set[str]:
        """Every address of that mode (managed resources or data sources)."""
        return {a for a, r in self.resources.items() if r["mode"] == mode}


def cloud_config(user_data_base64: str) -> dict[str, Any]:
    """The cloud-config of a launch template's base64 user data, as cloud-init reads it."""
    text = base64.b64decode(user_data_base64).decode()
    first, _, rest = text.partition("\n")
    assert first == "#cloud-config", "cloud-init only reads user data that starts so"
    parsed = yaml.safe_load(rest)
    assert isinstance(parsed, dict)
    return parsed
