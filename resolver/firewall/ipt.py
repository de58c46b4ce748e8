"""The iptables backend: chains of ours in the `filter` table of iptables and ip6tables.

OUTPUT and FORWARD each get one jump to a chain of ours; rules of anybody else are never
flushed or rewritten. `apply` builds the new chains under temporary names and swaps the jumps
in one `iptables-restore --noflush` transaction, then renames the chains back.
"""

from __future__ import annotations

import shlex
from collections.abc import Sequence
from dataclasses import dataclass

from resolver.firewall.model import (
    FAMILIES,
    AllowedUser,
    FirewallError,
    RuleState,
    parse_user_comment,
    run,
)

OUTPUT_CHAIN = "KMSKEYS-IMDS"
FORWARD_CHAIN = "KMSKEYS-IMDS-FWD"
TEMP_SUFFIX = "-NEW"
# Every valid uid ((uid_t)-1 is none): matches exactly the packets of a process's socket.
ANY_UID = "0-4294967294"
_OURS = {OUTPUT_CHAIN, FORWARD_CHAIN} | {c + TEMP_SUFFIX for c in (OUTPUT_CHAIN, FORWARD_CHAIN)}
# (built-in chain, our chain) pairs: where each of our chains is jumped to from.
_HOOKS = (("OUTPUT", OUTPUT_CHAIN), ("FORWARD", FORWARD_CHAIN))


@dataclass(frozen=True)
class _Family:
    label: str
    iptables: str
    restore: str
    destination: str


_FAMILIES = tuple(
    _Family(label, f"{tool}tables", f"{tool}tables-restore", f"{address}/{bits}")
    for (label, address), tool, bits in zip(FAMILIES, ("ip", "ip6"), (32, 128), strict=True)
)


@dataclass
class _Table:
    """Our part of one family's filter table, as `iptables -S` lists it."""

    chains: set[str]
    jumps: list[str]  # our jump rules in OUTPUT/FORWARD, as `-A ...` lines
    rules: dict[str, list[list[str]]]  # our chain -> its rules, tokenised


def _read(family: _Family, counters: bool = False) -> _Table:
    argv = [family.iptables, "-w", "-t", "filter", "-S"] + (["-v"] if counters else [])
    table = _Table(set(), [], {})
    for line in run(argv).splitlines():
        tokens = shlex.split(line)
        if len(tokens) >= 2 and tokens[0] == "-N" and tokens[1] in _OURS:
            table.chains.add(tokens[1])
        if len(tokens) < 2 or tokens[0] != "-A":
            continue
        if tokens[1] in _OURS:
            table.rules.setdefault(tokens[1], []).append(tokens)
        elif tokens[1] in ("OUTPUT", "FORWARD") and _target(tokens) in _OURS:
            table.jumps.append(line)
    return table


def _target(tokens: list[str]) -> str | None:
    return tokens[tokens.index("-j") + 1] if "-j" in tokens[:-1] else None


def _option(tokens: list[str], name: str) -> str | None:
    return tokens[tokens.index(name) + 1] if name in tokens[:-1] else None


def _chain_rules(family: _Family, users: Sequence[AllowedUser], suffix: str) -> list[str]:
    out, fwd = OUTPUT_CHAIN + suffix, FORWARD_CHAIN + suffix
    reject = "-p tcp -m comment --comment {c} -j REJECT --reject-with tcp-reset"
    return [
        f":{out} - [0:0]",
        f":{fwd} - [0:0]",
        *(
            f"-A {out} -m owner --uid-owner {u.uid} "
            f"-m comment --comment {_quoted('kmskeys allow ' + u.name)} -j RETURN"
            for u in users
        ),
        # Only packets of a process's socket: kernel-made ones (a TCP reset, an ICMP error) have
        # no owning file, and nft's skuid skips them too. Were they rejected, the reset REJECT
        # sends back to a local client would itself be dropped, and it would wait for a timeout.
        f"-A {out} -m owner --uid-owner {ANY_UID} "
        + reject.format(c=_quoted(f"kmskeys imds {family.label}")),
        # The owner match cannot see forwarded (container) packets: reject them all.
        f"-A {fwd} " + reject.format(c=_quoted(f"kmskeys imds {family.label} forwarded")),
    ]


def _quoted(text: str) -> str:
    # iptables-restore understands double quotes only; user names were checked to need no escape.
    return f'"{text}"'


def _jump(hook: str, family: _Family, chain: str, verb: str = "-A") -> str:
    position = " 1" if verb == "-I" else ""
    return f"{verb} {hook}{position} -d {family.destination} -p tcp -j {chain}"


def _drop_ours(table: _Table, chains: Sequence[str]) -> list[str]:
    """Restore lines that delete our old jumps, then flush and delete the named chains."""
    lines = ["-D" + jump.removeprefix("-A") for jump in table.jumps]
    lines += [f"-F {c}" for c in chains if c in table.chains]
    lines += [f"-X {c}" for c in chains if c in table.chains]
    return lines


class IptablesBackend:
    """Chains KMSKEYS-IMDS (OUTPUT, owner match) and KMSKEYS-IMDS-FWD (FORWARD), v4 and v6."""

    name = "iptables"
    package = "iptables"
    commands: tuple[str, ...] = ("iptables", "ip6tables", "iptables-restore", "ip6tables-restore")

    def render(self, users: Sequence[AllowedUser]) -> str:
        """Two `iptables-restore --noflush` inputs, IPv4 then IPv6, for a host without our rules."""
        parts = [
            "# kmskeys: only root and the allowed users may reach the EC2 metadata service (IMDS).",
            "# Two sections: feed each to its own tool with --noflush, which keeps others' rules.",
        ]
        for family in _FAMILIES:
            parts += [
                f"# --- {family.restore} --noflush ---",
                "*filter",
                *_chain_rules(family, users, ""),
                *(_jump(hook, family, chain, "-I") for hook, chain in _HOOKS),
                "COMMIT",
            ]
        return "\n".join(parts) + "\n"

    def apply(self, users: Sequence[AllowedUser]) -> None:
        """Per family: new chains under temporary names, jumps swapped in one commit, renamed."""
        for family in _FAMILIES:
            table = _read(family)
            batch = [
                "*filter",
                *_chain_rules(family, users, TEMP_SUFFIX),
                *(_jump(hook, family, chain + TEMP_SUFFIX, "-I") for hook, chain in _HOOKS),
                *_drop_ours(table, [OUTPUT_CHAIN, FORWARD_CHAIN]),
                "COMMIT",
            ]
            run([family.restore, "-w", "--noflush"], stdin="\n".join(batch) + "\n")
            # Renaming a referenced chain keeps its jumps; iptables-nft cannot rename a chain
            # created in the same restore transaction, so this is a second, separate step.
            for chain in (OUTPUT_CHAIN, FORWARD_CHAIN):
                run([family.iptables, "-w", "-t", "filter", "-E", chain + TEMP_SUFFIX, chain])

    def remove(self) -> bool:
        """Delete our jumps from OUTPUT/FORWARD and our chains, one commit per family."""
        removed = False
        for family in _FAMILIES:
            table = _read(family)
            if not table.chains and not table.jumps:
                continue
            batch = ["*filter", *_drop_ours(table, sorted(_OURS)), "COMMIT"]
            run([family.restore, "-w", "--noflush"], stdin="\n".join(batch) + "\n")
            removed = True
        return removed

    def state(self) -> RuleState | None:
        """Allowed users from our RETURN rules, reject counts from the REJECT rule counters."""
        tables = {family.label: _read(family, counters=True) for family in _FAMILIES}
        if not any(t.chains or t.jumps for t in tables.values()):
            return None
        where = f"chains {OUTPUT_CHAIN}, {FORWARD_CHAIN} in ip and ip6 filter"
        state = RuleState(self.name, where)
        for hook, chain in _HOOKS:
            for label, table in tables.items():
                state.rejected[f"{hook.lower()} {label}"] = sum(
                    _packets(rule) for rule in table.rules.get(chain, []) if "REJECT" in rule
                )
        for rule in tables["ipv4"].rules.get(OUTPUT_CHAIN, []):
            uid = _option(rule, "--uid-owner")
            if uid is not None and _target(rule) == "RETURN":
                state.allowed.append(parse_user_comment(int(uid), _option(rule, "--comment")))
        state.allowed.sort()
        return state


def _packets(tokens: list[str]) -> int:
    counters = _option(tokens, "-c")
    if counters is None:
        raise FirewallError("`iptables -S -v` listed a rule without counters")
    return int(counters)
