"""Durations written as the provider's ``Cancel-After`` header writes them.

``90s``, ``500ms``, ``5m``, ``1h30m``; a bare number is seconds.
"""

from __future__ import annotations

import re

_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|h|m|s)")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_duration(text: str) -> float:
    """Seconds in ``text``; ValueError, saying what is wrong, if it is not one."""
    text = text.strip()
    try:
        seconds = float(text)
    except ValueError:
        parts = _PART.findall(text)
        if not parts or "".join(n + u for n, u in parts) != text:
            msg = f"{text!r} is not a duration such as 90s or 5m"
            raise ValueError(msg) from None
        seconds = sum(float(n) * _UNITS[u] for n, u in parts)
    if seconds <= 0:
        msg = f"{text!r} must be longer than zero"
        raise ValueError(msg)

    return seconds
