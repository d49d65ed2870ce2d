"""How values become text: ``show`` quotes an offending value for an error detail, ``PerSecond`` caches a
timestamp format that changes once a second.

May import: the standard library only.
"""

from __future__ import annotations

import time
from typing import Any, Callable, Optional

__all__ = [
    "PerSecond",
    "show",
]


def show(value: Any, limit: int = 80) -> str:
    """Quote an offending value for an error detail: printable, ASCII, and short."""
    if isinstance(value, (bytes, bytearray)):
        value = bytes(value).decode("latin-1")
    text = ascii(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


class PerSecond:
    """A timestamp format that changes once a second, computed once a second rather than per use."""

    def __init__(self, format_second: Callable[[int], str]) -> None:
        self._format = format_second
        self._second = -1
        self._value = ""

    def __call__(self, second: Optional[int] = None) -> str:
        if second is None:
            second = int(time.time())
        if second != self._second:
            self._second = second
            self._value = self._format(second)
        return self._value
