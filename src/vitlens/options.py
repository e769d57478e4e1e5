"""``key=value`` options from URIs and the command line, and the command line's value types."""

from __future__ import annotations

import argparse
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


def int_at_least(low: int, what: str, high: int | None = None):
    """An argparse type: an integer >= ``low`` (and <= ``high``), refused in one line naming ``what`` otherwise.

    Examples:
        >>> int_at_least(1, "a positive integer")("3")
        3
    """

    def parse(v: str) -> int:
        try:
            n = int(v)
        except ValueError:
            n = low - 1
        if n < low or (high is not None and n > high):
            raise argparse.ArgumentTypeError(f"expected {what}, got {v!r}")
        return n

    return parse


positive_int = int_at_least(1, "a positive integer")
non_negative_int = int_at_least(0, "an integer >= 0")


def number(low: float = 0.0, strict: bool = True):
    """An argparse type for a finite float above ``low`` (or at least ``low`` when not ``strict``).

    Examples:
        >>> number(strict=False)("0")
        0.0
    """
    what = f"a number {'>' if strict else '>='} {low:g}"

    def parse(v: str) -> float:
        try:
            x = float(v)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {v!r}") from None
        if not (x > low if strict else x >= low) or x == float("inf"):
            raise argparse.ArgumentTypeError(f"expected {what}, got {v!r}")
        return x

    return parse
