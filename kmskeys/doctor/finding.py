"""A doctor finding: its level, which check, what it means, and the fix to paste."""

from __future__ import annotations

import os
import shlex
from dataclasses import dataclass
from pathlib import Path

OK, WARN, FAIL, INFO = "ok", "warn", "FAIL", "info"
LEVELS = (OK, INFO, WARN, FAIL)


@dataclass(frozen=True)
class Finding:
    """One thing doctor found: its level, which check, what it means, and the fix to paste."""

    level: str
    check: str
    message: str
    fix: str | None = None

    def line(self) -> str:
        """The text form: `FAIL message; fix: command`."""
        tail = f"; fix: {self.fix}" if self.fix else ""
        return f"{self.level:<4} {self.message}{tail}"

    def as_dict(self) -> dict[str, str | None]:
        """The JSON form."""
        return {"level": self.level, "check": self.check, "message": self.message, "fix": self.fix}


def q(value: object) -> str:
    """`value` quoted for a POSIX shell, as a fix command pastes it."""
    return shlex.quote(os.fspath(value) if isinstance(value, Path) else str(value))
