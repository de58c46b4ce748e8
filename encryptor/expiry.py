"""`--not-after WHEN`: an ISO 8601 time or a relative `+30d` / `+12h`, resolved to UTC seconds."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from encryptor.errors import InputError

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
MAX_RELATIVE_SECONDS = 100 * 365 * 86400


def parse_when(text: str, *, now: datetime | None = None) -> datetime:
    """An aware UTC datetime for `text`, which must lie in the future."""
    now = now or datetime.now(UTC)
    text = text.strip()
    when = now + _relative(text) if text.startswith("+") else _absolute(text)
    when = when.astimezone(UTC).replace(microsecond=0)
    if when <= now:
        raise InputError(f"--not-after {text!r} is not in the future")
    return when


def _relative(text: str) -> timedelta:
    count, unit = text[1:-1], text[-1:]
    if unit not in _UNITS or not count.isascii() or not count.isdigit():
        raise InputError(
            f"--not-after {text[:40]!r}: use ISO 8601 (2030-01-31, 2030-01-31T12:00:00Z) "
            "or +N followed by s, m, h, d or w (e.g. +30d, +12h)"
        )
    seconds = int(count) * _UNITS[unit]
    if not 0 < seconds <= MAX_RELATIVE_SECONDS:
        raise InputError(f"--not-after {text!r} must be between 1 second and 100 years")
    return timedelta(seconds=seconds)


def _absolute(text: str) -> datetime:
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        raise InputError(
            f"--not-after {text[:40]!r}: use ISO 8601 (2030-01-31, 2030-01-31T12:00:00Z) "
            "or +N followed by s, m, h, d or w (e.g. +30d, +12h)"
        ) from None
    if when.tzinfo is None:
        if "T" in text or " " in text:
            # A wall-clock time without a zone means different instants on different hosts.
            raise InputError(f"--not-after {text!r} needs a time zone: add Z or an offset")
        when = when.replace(tzinfo=UTC)  # a bare date is midnight UTC
    return when
