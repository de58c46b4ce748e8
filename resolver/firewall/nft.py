"""The nftables backend: all rules in one table of ours, `inet kmskeys`, loaded atomically."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from resolver.firewall.model import (
    FAMILIES,
    AllowedUser,
    FirewallError,
    RuleState,
    parse_user_comment,
    run,
)

TABLE = "kmskeys"
WHERE = f"table inet {TABLE}"

# Rule comments double as the counter labels `status` reports.
_OUTPUT_COMMENT = "kmskeys imds {family}"
_FORWARD_COMMENT = "kmskeys imds {family} forwarded"

_DADDR = {"ipv4": "ip daddr", "ipv6": "ip6 daddr"}


class NftBackend:
    """Rules in table `inet kmskeys`, loaded with one `nft -f` batch, so all or nothing changes."""

    name = "nftables"
    package = "nftables"
    commands: tuple[str, ...] = ("nft",)

    def render(self, users: Sequence[AllowedUser]) -> str:
        """The batch `apply` loads: declare, delete and recreate our table, in one transaction."""
        elements = ", ".join(f'{u.uid} comment "{u.name}"' for u in users)
        output = [
            f"{_DADDR[family]} {address} meta l4proto tcp meta skuid != @allowed_uids "
            f'counter reject with tcp reset comment "{_OUTPUT_COMMENT.format(family=family)}"'
            for family, address in FAMILIES
        ]
        # Forwarded packets (containers) carry no local socket owner: reject them all.
        forward = [
            f"{_DADDR[family]} {address} meta l4proto tcp "
            f'counter reject with tcp reset comment "{_FORWARD_COMMENT.format(family=family)}"'
            for family, address in FAMILIES
        ]
        lines = [
            "# kmskeys: only root and the allowed users may reach the EC2 metadata service (IMDS).",
            "# Managed by `kmskeys-resolver firewall`; loading this file replaces the whole table.",
            # Declaring the table first makes the delete succeed on a host that has none yet.
            f"table inet {TABLE} {{}}",
            f"delete table inet {TABLE}",
            f"table inet {TABLE} {{",
            '\tcomment "managed by kmskeys-resolver firewall"',
            "\tset allowed_uids {",
            "\t\ttype uid",
            f"\t\telements = {{ {elements} }}",
            "\t}",
            "",
            "\tchain output {",
            "\t\ttype filter hook output priority filter; policy accept;",
            *(f"\t\t{rule}" for rule in output),
            "\t}",
            "",
            "\tchain forward {",
            "\t\ttype filter hook forward priority filter; policy accept;",
            *(f"\t\t{rule}" for rule in forward),
            "\t}",
            "}",
        ]
        return "\n".join(lines) + "\n"

    def apply(self, users: Sequence[AllowedUser]) -> None:
        """Replace our table in a single transaction: never a moment without rules, nor two."""
        run(["nft", "-f", "-"], stdin=self.render(users))

    def remove(self) -> bool:
        """Delete our table, and only it; False if it was not there."""
        if self._listing() is None:
            return False
        run(["nft", "-f", "-"], stdin=f"table inet {TABLE} {{}}\ndelete table inet {TABLE}\n")
        return True

    def state(self) -> RuleState | None:
        """Allowed users from the set, reject counts from the rule counters."""
        listing = self._listing()
        if listing is None:
            return None
        state = RuleState(self.name, WHERE)
        labels = {_OUTPUT_COMMENT.format(family=f): f"output {f}" for f, _ in FAMILIES} | {
            _FORWARD_COMMENT.format(family=f): f"forward {f}" for f, _ in FAMILIES
        }
        for item in listing:
            if "set" in item and item["set"].get("name") == "allowed_uids":
                for elem in item["set"].get("elem", []):
                    state.allowed.append(_allowed(elem))
            elif "rule" in item and item["rule"].get("comment") in labels:
                rule = item["rule"]
                packets = sum(
                    int(e["counter"]["packets"]) for e in rule.get("expr", []) if "counter" in e
                )
                state.rejected[labels[rule["comment"]]] = packets
        state.allowed.sort()
        state.rejected = {v: state.rejected.get(v, 0) for v in labels.values()}
        return state

    def _listing(self) -> list[dict[str, Any]] | None:
        tables = json.loads(run(["nft", "-j", "list", "tables", "inet"]) or "{}")
        if not any(
            item.get("table", {}).get("name") == TABLE for item in tables.get("nftables", [])
        ):
            return None
        data = json.loads(run(["nft", "-j", "list", "table", "inet", TABLE]))
        items = data.get("nftables")
        if not isinstance(items, list):
            raise FirewallError(f"unexpected `nft -j list table inet {TABLE}` output")
        return items


def _allowed(elem: Any) -> AllowedUser:
    # A set element is a bare uid, or {"elem": {"val": uid, "comment": name}} with a comment.
    if isinstance(elem, dict) and "elem" in elem:
        return parse_user_comment(int(elem["elem"]["val"]), elem["elem"].get("comment"))
    return parse_user_comment(int(elem), None)
