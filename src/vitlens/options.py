"""``key=value`` options from URIs and the command line, with their values typed."""

from __future__ import annotations

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


def parse_options(items: Iterable[str], what: str = "option") -> dict:
    """``["steps=16", "baseline=blur"]`` → ``{"steps": 16, "baseline": "blur"}``."""
    options = {}
    for item in items:
        key, eq, value = item.partition("=")
        if not eq or not key:
            raise VitlensError(f"bad {what} {item!r}: expected key=value")
        options[key] = parse_value(value)
    return options
