"""The one duration grammar of edgefleet's command line and specs.

A duration is plain seconds (``90``, ``1.5``) or one or more NUMBER+UNIT pairs, largest unit first or not
(``30s``, ``10m``, ``2h``, ``1d``, ``1h30m``, ``1d 12h``), with units ``ms``, ``s``, ``m``, ``h``, ``d``, ``w``.
A leading ``-`` is accepted only where a negative duration means something (a clock running behind)."""

from __future__ import annotations

import math
import re
from datetime import timedelta

from edgefleet.errors import UsageError

__all__ = ["GRAMMAR", "parse_duration", "parse_timedelta"]

GRAMMAR = "seconds or NUMBER+UNIT pairs with units ms, s, m, h, d, w (e.g. 90, 30s, 10m, 2h, 1d, 1h30m)"

_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, "w": 7 * 86400.0}
_NUMBER = r"\d+(?:\.\d+)?"
# "ms" before "m": the alternation takes the first unit that matches
_PAIR = re.compile(rf"({_NUMBER})\s*(ms|s|m|h|d|w)")
_WHOLE = re.compile(rf"(-)?\s*(?:({_NUMBER})|((?:{_NUMBER}\s*(?:ms|s|m|h|d|w)\s*)+))")


def parse_duration(
    text: str, *, flag: str | None = None, allow_negative: bool = False, allow_zero: bool = True
) -> float:
    """``text`` in seconds, or a :class:`UsageError` naming ``flag`` and the grammar."""
    where = f"{flag} {text!r}" if flag else f"duration {text!r}"
    m = _WHOLE.fullmatch(text.strip())
    if m is None:
        raise UsageError(f"{where} is not a duration: use {GRAMMAR}")
    negative, plain, pairs = m.groups()
    seconds = float(plain) if plain is not None else sum(float(n) * _UNIT_SECONDS[u] for n, u in _PAIR.findall(pairs))
    if not math.isfinite(seconds):
        raise UsageError(f"{where} is too large")
    if negative:
        if not allow_negative:
            raise UsageError(f"{where}: the duration must not be negative")
        seconds = -seconds
    if seconds == 0 and not allow_zero:
        raise UsageError(f"{where}: the duration must be positive")
    return seconds


def parse_timedelta(
    text: str, *, flag: str | None = None, allow_negative: bool = False, allow_zero: bool = True
) -> timedelta:
    """:func:`parse_duration` as a :class:`~datetime.timedelta`."""
    seconds = parse_duration(text, flag=flag, allow_negative=allow_negative, allow_zero=allow_zero)
    try:
        return timedelta(seconds=seconds)
    except OverflowError:
        raise UsageError(f"{flag or 'duration'} {text!r} is too large") from None
