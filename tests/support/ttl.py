"""Key lifetimes in the suite: the kernel counts key expiry in whole seconds.

Kernel fact (key_set_expiry, key_is_dead): a timeout of T seconds sets the key's expiry to the
current wall-clock second plus T, and the key is dead once the clock's second reaches it. So it
lives between T - 1 and T seconds: a 1 s timeout can end 0.03 s after it was set (0.036 to
0.990 s measured), whatever the load. The same holds for a rejected key's negative timeout.

Hence two rules for every test:
- a key or cached refusal that must still be there uses T >= MIN_TTL, and is checked within
  T - 1 s of being set (here, within milliseconds);
- one that must be gone is waited for past T: `gone_after(T)`.
"""

from __future__ import annotations

# The shortest ttl / negative_ttl a test may rely on: it lives at least MIN_TTL - 1 = 2 s.
MIN_TTL = 3
# Slack past the whole T before a test may expect the key gone (scheduling, not rounding).
GONE_MARGIN = 0.5


def gone_after(ttl: float) -> float:
    """Seconds to wait for a key with a `ttl`-second timeout to be certainly expired."""
    return ttl + GONE_MARGIN


def shortest_life(ttl: int) -> float:
    """The least a key with a `ttl`-second timeout lives (the kernel rounds to whole seconds)."""
    return ttl - 1
