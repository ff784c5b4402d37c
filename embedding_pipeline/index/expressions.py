"""The one way to put a user's value into a Milvus boolean expression.

Ids, drop names, URIs and model labels come from outside (manifests, the HTTP API, folder names). Pasting one into
an expression unescaped lets it rewrite the expression: pymilvus's own ``delete(ids=…)`` / ``get(ids=…)`` build
``id in ['<raw>']``, so an id ``x'] or id not in ['`` deletes every row of the collection. Nothing in the project
passes user values to those helpers; every expression with a user value is built here.

A literal is double-quoted with ``\\``, ``"``, newline, carriage return and tab escaped; every other character,
unicode included, goes in as itself. Both engines the project supports parse exactly that (checked against
milvus-lite 3.2 and Milvus 2.3.5): milvus-lite rejects ``\\uXXXX`` escapes and a raw carriage return, Milvus 2.3
rejects escaped surrogate pairs. NUL cannot be represented at all and is refused.
"""

from __future__ import annotations

from typing import Iterable, Iterator, Sequence

_ESCAPES = {"\\": "\\\\", '"': '\\"', "\n": "\\n", "\r": "\\r", "\t": "\\t"}
# Ids per ``id in [...]`` expression: keeps one expression far below the engines' expression size limits.
IN_LIST_CHUNK = 500


class ExpressionValueError(ValueError):
    """A value that no Milvus string literal can carry (NUL)."""


def literal(value: str) -> str:
    """``value`` as a Milvus string literal that the expression parser reads back as exactly ``value``."""
    if not isinstance(value, str):
        raise TypeError(f"expression values are strings, not {type(value).__name__}")
    if "\0" in value:
        raise ExpressionValueError("a value with a NUL character cannot be used in a Milvus expression")
    return '"' + "".join(_ESCAPES.get(ch, ch) for ch in value) + '"'


def equals(field: str, value: str) -> str:
    return f"{field} == {literal(value)}"


def not_equals(field: str, value: str) -> str:
    return f"{field} != {literal(value)}"


def in_list(field: str, values: Iterable[str]) -> str:
    """``field in [v1, v2, …]``; an empty list matches nothing."""
    return f"{field} in [{', '.join(literal(v) for v in values)}]"


def array_contains(field: str, value: str) -> str:
    return f"array_contains({field}, {literal(value)})"


def array_contains_any(field: str, values: Iterable[str]) -> str:
    return f"array_contains_any({field}, [{', '.join(literal(v) for v in values)}])"


def chunks(values: Sequence[str], size: int = IN_LIST_CHUNK) -> Iterator[Sequence[str]]:
    """``values`` in slices of at most ``size`` (one ``in [...]`` expression each)."""
    for start in range(0, len(values), size):
        yield values[start : start + size]


def unquote(text: str) -> str:
    """The value of a literal made by :func:`literal` (the inverse, for tests and for reading expressions back)."""
    if len(text) < 2 or text[0] != '"' or text[-1] != '"':
        raise ValueError(f"not a double-quoted literal: {text!r}")
    reverse = {v[1]: k for k, v in _ESCAPES.items()}
    out, i, body = [], 0, text[1:-1]
    while i < len(body):
        ch = body[i]
        if ch == "\\":
            if i + 1 >= len(body) or body[i + 1] not in reverse:
                raise ValueError(f"unknown escape at {i} in {text!r}")
            out.append(reverse[body[i + 1]])
            i += 2
            continue
        if ch == '"':
            raise ValueError(f"unescaped quote at {i} in {text!r}")
        out.append(ch)
        i += 1
    return "".join(out)
