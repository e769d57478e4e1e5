"""``key=value`` options from URIs and the command line, with their values typed."""

from __future__ import annotations

import math
from collections.abc import Iterable

from .errors import VitlensError


def parse_value(text: str) -> object:
    """``"true"`` → True, ``"3"`` → 3, ``"0.5"`` → 0.5, anything else stays a string."""
    low = text.lower()
    if low in ("true", "false"):
        return low == "true"
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def parse_finite(text: str, what: str = "option") -> object:
    """:func:`parse_value`, refusing ``nan`` and ``inf`` (no setting takes them)."""
    value = parse_value(text)
    if isinstance(value, float) and not math.isfinite(value):
        raise VitlensError(f"bad {what}: {text!r} is not a finite number")
    return value


def parse_options(items: Iterable[str], what: str = "option") -> dict:
    """``["steps=16", "baseline=blur"]`` → ``{"steps": 16, "baseline": "blur"}``."""
    options = {}
    for item in items:
        key, eq, value = item.partition("=")
        if not eq or not key:
            raise VitlensError(f"bad {what} {item!r}: expected key=value")
        if key in options:
            raise VitlensError(f"{what} {key!r} given twice")
        options[key] = parse_finite(value, f"{what} {item!r}")
    return options
