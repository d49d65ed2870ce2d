"""Text in and out: ``show`` quotes an offending value for an error detail, ``PerSecond`` caches a
timestamp format that changes once a second, ``loads_json`` parses the JSON clients and agents send as
strict RFC 8259.

May import: the standard library and ``uagw.limits``.
"""

from __future__ import annotations

import json
import re
import time
from typing import Any, Callable, Optional, Union

from .limits import MAX_JSON_DEPTH

__all__ = [
    "PerSecond",
    "loads_json",
    "show",
]


def show(value: Any, limit: int = 80) -> str:
    """Quote an offending value for an error detail: printable, ASCII, and short."""
    if isinstance(value, (bytes, bytearray)):
        value = bytes(value).decode("latin-1")
    text = ascii(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."



def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON (RFC 8259 has no NaN or Infinity)")


def _finite_float(text: str) -> float:
    value = float(text)
    if value in (float("inf"), float("-inf")):
        raise ValueError(f"number {show(text, 40)} is too large for a finite double")
    return value


def loads_json(data: Union[str, bytes, bytearray]) -> Any:
    """Parse JSON from a client or an agent as strict RFC 8259: no NaN or Infinity (browsers' JSON.parse
    refuses them, so forwarding one would break every client), no number that overflows to infinity,
    and at most MAX_JSON_DEPTH levels of nesting, so that what we accept we can also encode again.

    Raises ValueError with a reason; never RecursionError.
    """
    try:
        if isinstance(data, str) and not data.startswith("\ufeff"):
            value = _strict_decoder.decode(data)  # what json.loads does with a str, minus a decoder per call
        else:
            value = json.loads(data, parse_constant=_refuse_constant, parse_float=_finite_float)
    except RecursionError:
        raise ValueError(f"nested deeper than {MAX_JSON_DEPTH} levels") from None
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, (dict, list)):
            if depth > MAX_JSON_DEPTH:
                raise ValueError(f"nested deeper than {MAX_JSON_DEPTH} levels")
            children = item.values() if isinstance(item, dict) else item
            stack.extend((child, depth + 1) for child in children if isinstance(child, (dict, list)))
    # Cheap test first, on the text as it came (no decoded copy of a 1 MiB line): only a \\u escape can
    # make a lone surrogate.
    pattern = _SURROGATE_ESCAPE_RE if isinstance(data, str) else _SURROGATE_ESCAPE_BYTES_RE
    if pattern.search(data):  # type: ignore[arg-type]
        try:
            json.dumps(value, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError:
            raise ValueError("a string holds a lone UTF-16 surrogate (\\ud800-\\udfff), which is not text") from None
    return value


# Made once: json.loads with options builds a JSONDecoder per call (~1 us), on every client message.
_strict_decoder = json.JSONDecoder(parse_constant=_refuse_constant, parse_float=_finite_float)
_SURROGATE_ESCAPE_RE = re.compile(r"\\u[dD][89a-fA-F]")
_SURROGATE_ESCAPE_BYTES_RE = re.compile(rb"\\u[dD][89a-fA-F]")


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
