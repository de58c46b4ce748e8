"""The pipeline's program step (issue 24): who asked, whether the name's policy admits it, where
its key may go and with which mask.

The rest is comments: every miss loads this module, and comments cost it nothing."""

# A name whose policy sets `allow_units`, `allow_cgroups` or `allow_exe`, or a blob bound to a
# unit, answers to the requesting program, not to its uid. The pipeline makes one Binding per
# request and asks it nothing for any other name: no /proc/keys read, no import of the
# identification. For a bound request it
#
# - identifies the requester from what the holder of the request's authority sees (an AuthView:
#   gathered here by the handler, or handed over by the gate under the daemon path), after the
#   uid policy and before any backend, host cache or AWS call;
# - judges every requester the authorization key's lines name: the kernel's own line is among
#   them, so a key description that forges more can neither admit anyone (all must pass) nor
#   make a refusal stick (a disagreement is EAGAIN, never cached);
# - refuses a destination keyring that anyone but the requester's own thread, process or session
#   could search (the user or persistent keyring, the user-session keyring, a keyring of another
#   user), since the key is instantiated with possessor bits only (PROGRAM_KEY_PERM);
# - checks, just before the answer, that each requester still waits unkilled.
#
# docs/security.md ("Secrets bound to a program") says what this defends against, and what not.

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from kmskeys.contract import PROGRAM_ADMIN_KEY_PERM, PROGRAM_KEY_PERM
from resolver.errors import IdentityError, IdentityUnclearError, RefusedError
from resolver.log import field

if TYPE_CHECKING:
    from resolver.backend import Context, Timings
    from resolver.programpolicy import ProgramPolicy
    from resolver.requester import AuthView
    from resolver.task import Requester
    from resolver.validators import NameRule

ViewSource = Callable[[], "AuthView"]
# How the kernel names the keyring every process of a uid without a session keyring shares
# (security/keys/process_keys.c: look_up_user_keyrings).
USER_SESSION_KEYRING = "_uid_ses."


class Binding:
    """One request's program binding, decided on demand (see the comment at the top).

    `key` is the key under construction (%k), `uid` the requester's fsuid (%u), `keyrings` its
    thread, process and session keyrings (%T %P %S, 0 for none), `view` the AuthView or a
    callable that gets it (None: gather it here, holding the authority), `rule` the name's
    policy rule (None, or a rule without program keys: the name answers to any program).
    """

    __slots__ = (
        "bound",
        "key",
        "keyrings",
        "policy",
        "requesters",
        "timings",
        "uid",
        "view",
        "who",
    )

    def __init__(
        self,
        key: int,
        uid: int,
        keyrings: tuple[int, int, int],
        view: AuthView | ViewSource | None,
        rule: NameRule | None,
    ) -> None:
        self.key, self.uid, self.keyrings, self.view = key, uid, keyrings, view
        self.policy: ProgramPolicy | None = None
        if rule is not None and rule.binds_programs:
            from resolver.programpolicy import program_policy

            self.policy = program_policy(rule.allow_units, rule.allow_cgroups, rule.allow_exe)
        # True once the request is bound: its key gets PROGRAM_KEY_PERM, and only here.
        self.bound = False
        self.who: Requester | None = None
        self.requesters: tuple[Requester, ...] = ()
        self.timings: Timings | None = None

    def admit(self, context: Context) -> None:
        """For a name with a program policy: identify the requester, refuse it outside the
        policy (RefusedError with the check's own reason) or where its key would go elsewhere
        than its own keyrings (IdentityError); nothing at all for any other name."""
        if self.policy is not None:
            self.identify(context)

    def unit(self, context: Context) -> str:
        """The requester's systemd unit, for a blob bound to one: from the root-controlled part
        of its cgroup only, never from the blob or the request. Identifies the requester if the
        name's policy has not (the key is then bound too); refuses one without a unit."""
        who = self.identify(context)
        if who.unit is None:
            raise RefusedError(
                f"blob is bound to a systemd unit, and the requester has none (cgroup "
                f"{field(who.trusted)})"
            )
        return who.unit

    def identify(self, context: Context) -> Requester:
        """The requester, judged against the policy (once per request)."""
        if self.who is not None:
            return self.who
        self.bound = True
        self.timings = context.timings
        view = self._gathered(context.timings)
        start = time.perf_counter()
        try:
            if view is None:
                from resolver.requester import view_here

                view = view_here(self.key)
            who = self._judge(view, context.notes)
            check_destination(view, self.keyrings, self.uid)
        finally:
            context.timings.add("identify", (time.perf_counter() - start) * 1000)
        self.who = who
        return who

    def perm(self, admin_group: bool) -> int | None:
        """The mask of a bound request's key (with the admin group's bits or not); None for a
        request this binding never bound."""
        if not self.bound:
            return None
        return PROGRAM_ADMIN_KEY_PERM if admin_group else PROGRAM_KEY_PERM

    def still_waiting(self) -> None:
        """RequesterGoneError unless every requester judged still waits, unkilled: called just
        before the answer (a requester killed, or exec'ing, meanwhile receives nothing)."""
        if not self.bound:
            return
        from resolver.task import check_alive

        start = time.perf_counter()
        try:
            for who in self.requesters:
                check_alive(who)
        finally:
            if self.timings is not None:
                self.timings.add("identify", (time.perf_counter() - start) * 1000)

    def _gathered(self, timings: Timings) -> AuthView | None:
        """The view as given, or asked for now from whoever holds the authority (the gate: a
        round trip and its read of /proc/keys, timed as a phase of its own, `view`); None
        when this process holds the authority and gathers it itself, within `identify`."""
        if self.view is None or not callable(self.view):
            return self.view
        start = time.perf_counter()
        try:
            return self.view()
        finally:
            timings.add("view", (time.perf_counter() - start) * 1000)

    def _judge(self, view: AuthView, notes: dict[str, str]) -> Requester:
        from resolver.requester import identify_all

        found = identify_all(view, self.key, self.uid)
        self.requesters = tuple(w for w in found if not isinstance(w, IdentityError))
        if self.requesters:
            # auth_lines: how often the authorization key's line showed (a forgery's trace).
            extra = f" auth_lines={len(view.lines)}" if len(view.lines) > 1 else ""
            notes["requester"] = self.requesters[0].summary() + extra
        return judge(self.policy, found)


def judge(policy: ProgramPolicy | None, found: tuple[Requester | IdentityError, ...]) -> Requester:
    """The requester to answer, from every one the authorization key's lines name (the real one
    is among them): all must pass `policy` (None: any identified requester passes) and agree on
    the unit, or all fail (RefusedError or IdentityError, cached); anything else is
    IdentityUnclearError (EAGAIN, never cached: a forgery cannot make a refusal stick)."""
    reasons = [_refusal(policy, who) for who in found]
    if all(reason is None for reason in reasons):
        passed = [who for who in found if not isinstance(who, IdentityError)]
        if len({who.unit for who in passed}) > 1:
            raise IdentityUnclearError(
                f"{len(found)} lines of /proc/keys claim the authorization key and name "
                "requesters of different units: a key description forges them"
            )
        return passed[0]
    if len(found) == 1 and isinstance(found[0], IdentityError):
        raise found[0]
    if all(reason is not None for reason in reasons):
        first = str(reasons[0])
        if len(found) > 1:
            first += f" (and {len(found) - 1} other requesters a key description named)"
        raise RefusedError(first)
    raise IdentityUnclearError(
        f"{len(found)} lines of /proc/keys claim the authorization key and the policy judges "
        "their requesters differently: a key description forges them"
    )


def _refusal(policy: ProgramPolicy | None, who: Requester | IdentityError) -> str | None:
    if isinstance(who, IdentityError):
        return who.reason
    if policy is None:
        return None
    from resolver.programpolicy import refusal

    refused = refusal(policy, who)
    return None if refused is None else f"program policy ({refused.check}): {refused.reason}"


def check_destination(view: AuthView, keyrings: tuple[int, int, int], uid: int) -> None:
    """Refuse a destination keyring that another program of the uid, or another user, could
    search: a key with possessor bits only goes into the requester's own thread, process or
    session keyring, owned by its uid, and never into the user-session keyring."""
    thread, process, session = keyrings
    dest = view.dest
    kind, owner, name = _described(view.dest_description)
    shown = f"{field(name)} ({dest})" if name else str(dest)
    if not dest or dest not in {ring for ring in (thread, process, session) if ring}:
        raise IdentityError(
            f"destination keyring {shown} is not the requester's own thread, process or session "
            "keyring (keyring='user' or 'persistent', or one given by serial): a program-bound "
            "name is cached only where its requester alone finds it"
        )
    if kind != "keyring" or owner != uid:
        raise IdentityError(
            f"destination keyring {shown} belongs to uid {owner}, not the requester's {uid} (a "
            "session kept across su or runuser?): everyone sharing it would read the key; give "
            "the program a session keyring of its own"
        )
    if dest == session and name.startswith(USER_SESSION_KEYRING):
        raise IdentityError(
            f"the requester has no session keyring: its keys go to {field(name)}, which every "
            f"process of uid {uid} without one shares; give the program a session keyring of "
            "its own (systemd: KeyringMode=private, the default for system services; or "
            "`keyctl session -`)"
        )


def _described(text: str) -> tuple[str, int, str]:
    """(type, owner uid, description) of a keyctl_describe string; ("", -1, "") if none."""
    parts = text.split(";", 4)
    if len(parts) != 5 or not parts[1].isdigit():
        return "", -1, ""
    return parts[0], int(parts[1]), parts[4]
