"""Declared filter fields: metadata keys stored as typed scalar columns, and filters rewritten to use them.

``milvus.filter_fields: {category: VARCHAR, year: INT64}`` gives every row, besides the full ``metadata`` JSON, a
column ``meta_category`` holding that key's value and a BOOL column ``has_meta_category`` saying whether the row has
a value of the declared type (Milvus 2.3 has no nullable columns, so absence needs its own column). Filtering a JSON
path parses every row's JSON per query; a typed column is a plain, indexable scan.

Users keep writing filters on the JSON path, e.g. ``metadata["category"] == "nature"``. :func:`rewrite_filter` turns
each comparison of a declared key with a literal of its type into ``(has_meta_category == true and (meta_category ==
"nature"))``. The rewrite gives exactly the rows the JSON path gives, so it is only done where that holds:

* positive comparisons only (``==  <  <=  >  >=``, ranges like ``1 < x < 5`` (written out as two comparisons),
  ``in [...]``, ``like``); ``!=``, ``not in`` and anything under ``not`` stay on the JSON path, because engines
  disagree on how a missing key behaves there (Milvus 2.3 counts it as "not equal", milvus-lite does not);
* a literal of the declared type (an INT64 key compared with ``2.5`` stays on the JSON path); BOOL keys with ``==``;
* a plain comparison: the key inside arithmetic, a function call or a nested path (``metadata["a"]["b"]``) is left as
  it is, and string literals are never touched.

A value of the wrong type for a declared key (``"year": "1999"`` for INT64) keeps its row: the JSON holds it as
given, the typed column is empty (``has_meta_year`` false), and the row is reported (see :func:`typed_values`).
Filters on a declared key therefore see only values of its declared type; a DOUBLE key also takes integers.

Keys nobody declared are fast too, in collections this version creates: each row also carries every scalar metadata
value under a top-level *mirror* key (``m__color`` for ``metadata["color"]``) in the collection's dynamic field, and
:func:`rewrite_filter` turns the same positive comparisons of any such key into comparisons of its mirror. A mirror
holds exactly the JSON value of the key it copies, so the rows are the same; the engine reads one small column
instead of every row's JSON document (milvus-lite evaluates a JSON path row by row over the whole segment, the
vectors included). Collections created before mirrors keep the JSON path.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, Mapping

from embedding_pipeline.settings import ConfigError

FIELD_PREFIX = "meta_"
PRESENCE_PREFIX = "has_meta_"
KEY_PATTERN = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}")
MAX_DECLARED = 24  # two columns each; Milvus allows 64 fields per collection and the base schema has 7
VARCHAR_MAX = 2048
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
TYPES = ("VARCHAR", "INT64", "DOUBLE", "BOOL")
# Undeclared keys: the mirror of metadata["k"] is the dynamic key MIRROR_PREFIX + k (a name no schema field takes).
MIRROR_PREFIX = "m__"
MIRROR_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,60}")
ANY = "ANY"  # the "type" of an undeclared key: any literal compares with the JSON value it mirrors


def value_field(key: str) -> str:
    return FIELD_PREFIX + key


def presence_field(key: str) -> str:
    return PRESENCE_PREFIX + key


def check_declared(fields: Mapping[str, str]) -> dict[str, str]:
    """The declared keys, checked: names usable as column names, known types, not too many."""
    if len(fields) > MAX_DECLARED:
        raise ConfigError(f"milvus.filter_fields declares {len(fields)} keys; at most {MAX_DECLARED} are supported")
    for key, kind in fields.items():
        if not KEY_PATTERN.fullmatch(key):
            raise ConfigError(
                f"milvus.filter_fields: key {key!r} cannot be a column name; use letters, digits and '_' "
                "(not starting with a digit, at most 64 characters)"
            )
        if kind not in TYPES:
            raise ConfigError(f"milvus.filter_fields.{key}: type {kind!r} is not one of {', '.join(TYPES)}")
    return dict(fields)


# -- row values --------------------------------------------------------------------------------------------------


_EMPTY: dict[str, Any] = {"VARCHAR": "", "INT64": 0, "DOUBLE": 0.0, "BOOL": False}


def _typed(kind: str, value: Any) -> tuple[bool, Any, str]:
    """(fits, stored value, reason if not) for one metadata value and a declared type."""
    if value is None:
        return False, _EMPTY[kind], ""
    if kind == "VARCHAR":
        if not isinstance(value, str):
            return False, "", f"expected a string, got {type(value).__name__}"
        if len(value.encode()) > VARCHAR_MAX:  # Milvus 2.x counts bytes
            return False, "", f"string longer than {VARCHAR_MAX} bytes as UTF-8"
        return True, value, ""
    if kind == "INT64":
        if isinstance(value, bool) or not isinstance(value, int):
            return False, 0, f"expected an integer, got {type(value).__name__}"
        if not INT64_MIN <= value <= INT64_MAX:
            return False, 0, "integer outside the 64-bit range"
        return True, value, ""
    if kind == "DOUBLE":
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return False, 0.0, f"expected a number, got {type(value).__name__}"
        if isinstance(value, float) and not math.isfinite(value):
            return False, 0.0, "not a finite number"
        return True, float(value), ""
    if not isinstance(value, bool):
        return False, False, f"expected true or false, got {type(value).__name__}"
    return True, value, ""


@dataclass(frozen=True)
class TypeMismatch:
    """A row whose metadata value does not fit its key's declared type (the row is stored; the typed column is
    empty)."""

    id: str
    key: str
    declared: str
    reason: str

    def as_dict(self) -> dict[str, str]:
        return {"id": self.id, "key": self.key, "declared": self.declared, "reason": self.reason}


def typed_values(
    row_id: str, metadata: Mapping[str, Any], fields: Mapping[str, str]
) -> tuple[dict[str, Any], list[TypeMismatch]]:
    """The declared columns of one row, and the keys whose value did not fit (a missing key is no mismatch)."""
    columns: dict[str, Any] = {}
    problems = []
    for key, kind in fields.items():
        fits, stored, reason = _typed(kind, metadata.get(key))
        columns[value_field(key)] = stored
        columns[presence_field(key)] = fits
        if reason:
            problems.append(TypeMismatch(row_id, key, kind, reason))
    return columns, problems


def mirror_key(key: str) -> str:
    return MIRROR_PREFIX + key


def mirrored_values(metadata: Mapping[str, Any]) -> dict[str, Any]:
    """The mirror keys of one row: every top-level metadata key usable as a name whose value is a string, a
    number or a boolean, under :func:`mirror_key`, with the value as it is. Lists, objects, nulls and non-finite
    numbers are not mirrored: a positive comparison of a literal with any of them matches nothing either way."""
    out: dict[str, Any] = {}
    for key, value in metadata.items():
        if not isinstance(key, str) or not MIRROR_KEY.fullmatch(key):
            continue
        if isinstance(value, bool) or isinstance(value, str):
            out[mirror_key(key)] = value
        elif isinstance(value, int) and INT64_MIN <= value <= INT64_MAX:
            out[mirror_key(key)] = value
        elif isinstance(value, float) and math.isfinite(value):
            out[mirror_key(key)] = value
    return out


# -- the filter rewriter -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Token:
    kind: str  # "str", "num", "name", "op", "punct", "other"
    text: str
    start: int
    end: int

    @property
    def word(self) -> str:
        return self.text.lower() if self.kind == "name" else ""


_TOKEN = re.compile(
    r"""
    (?P<space>\s+)
  | (?P<str>"(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*')
  | (?P<num>(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?)
  | (?P<name>[A-Za-z_$][A-Za-z0-9_]*)
  | (?P<op>==|!=|<=|>=|&&|\|\||\*\*|<<|>>|[<>+\-*/%!~&|^])
  | (?P<punct>[()\[\],{}])
  | (?P<other>.)
    """,
    re.VERBOSE | re.DOTALL,
)

_COMPARE = {"==", "<", "<=", ">", ">="}
_ASCENDING, _DESCENDING = {"<", "<="}, {">", ">="}
_BOOLEANS = {"true", "false"}
_CONNECTIVES = {"and", "or", "&&", "||"}


def tokenize(expr: str) -> list[Token]:
    tokens = []
    for match in _TOKEN.finditer(expr):
        kind = match.lastgroup or "other"
        if kind != "space":
            tokens.append(Token(kind, match.group(), match.start(), match.end()))
    return tokens


def _is(token: Token | None, *texts: str) -> bool:
    return token is not None and (token.text in texts or token.word in texts)


def _boundary(token: Token | None) -> bool:
    """A token that may stand right before or after a whole comparison: nothing, a parenthesis, and/or."""
    return token is None or token.text in ("(", ")") or token.word in _CONNECTIVES or token.text in _CONNECTIVES


class _Rewriter:
    def __init__(self, expr: str, fields: Mapping[str, str]):
        self.expr = expr
        self.fields = fields
        self.tokens = tokenize(expr)

    def at(self, i: int) -> Token | None:
        return self.tokens[i] if 0 <= i < len(self.tokens) else None

    def reference(self, i: int) -> str | None:
        """The declared key if ``metadata["key"]`` starts at token ``i`` (and no deeper path follows)."""
        name, open_, key, close, after = (self.at(i + k) for k in range(5))
        if not (name and name.kind == "name" and name.text == "metadata" and _is(open_, "[") and _is(close, "]")):
            return None
        if key is None or key.kind != "str" or "\\" in key.text or _is(after, "["):
            return None
        inner = key.text[1:-1]
        return inner if self.kind(inner) is not None else None

    def kind(self, key: str) -> str | None:
        """The declared type of ``key``, or None when comparisons of it are not rewritten."""
        return self.fields.get(key)

    def literal(self, i: int, kind: str) -> int | None:
        """The index after a literal of declared ``kind`` starting at token ``i`` (a sign counts), else None."""
        token = self.at(i)
        if token is None:
            return None
        if kind == "VARCHAR" or (kind == ANY and token.kind == "str"):
            return i + 1 if token.kind == "str" else None
        if kind == "BOOL" or (kind == ANY and token.word in _BOOLEANS):
            return i + 1 if token.word in _BOOLEANS else None
        sign = token.text in ("+", "-") and token.kind == "op"
        number = self.at(i + 1) if sign else token
        if number is None or number.kind != "num":
            return None
        if kind == "INT64":
            if not number.text.isdigit():
                return None
            value = -int(number.text) if token.text == "-" else int(number.text)
            if not INT64_MIN <= value <= INT64_MAX:
                return None
        return (i + 2) if sign else (i + 1)

    def literal_list(self, i: int, kind: str) -> int | None:
        """The index after ``[lit, lit, ...]`` starting at ``i``, every element of ``kind``, else None."""
        if not _is(self.at(i), "["):
            return None
        j = i + 1
        if _is(self.at(j), "]"):
            return j + 1
        while True:
            j2 = self.literal(j, kind)
            if j2 is None:
                return None
            if _is(self.at(j2), "]"):
                return j2 + 1
            if not _is(self.at(j2), ","):
                return None
            j = j2 + 1

    def comparison(self, i: int) -> tuple[int, int, str] | None:
        """(first token, end token, key) of a comparison of a declared key with literals that includes the
        reference starting at token ``i``; None if there is none."""
        key = self.reference(i)
        if key is None:
            return None
        kind = self.kind(key)
        assert kind is not None  # reference() found it
        before, op, after = self.at(i - 1), self.at(i + 4), i + 4
        if before is not None and before.text in _COMPARE | {"!="}:
            # literal OP metadata["k"], or a range: literal OP metadata["k"] OP literal
            if before.text == "!=" or (kind == "BOOL" and before.text != "=="):
                return None
            start = self._literal_before(i - 1, kind)
            if start is None:
                return None
            if op is None or op.text not in _COMPARE:
                return start, after, key
            same_way = (before.text in _ASCENDING and op.text in _ASCENDING) or (
                before.text in _DESCENDING and op.text in _DESCENDING
            )
            end = self.literal(after + 1, kind) if same_way else None
            return (start, end, key) if end is not None else None
        # metadata["k"] OP literal; metadata["k"] in [literals]; metadata["k"] like "pattern"
        if op is not None and op.text in _COMPARE and (kind != "BOOL" or op.text == "=="):
            end = self.literal(after + 1, kind)
            return (i, end, key) if end is not None else None
        if _is(op, "in"):
            end = self.literal_list(after + 1, kind)
            return (i, end, key) if end is not None else None
        pattern = self.at(after + 1)
        if _is(op, "like") and kind in ("VARCHAR", ANY) and pattern is not None and pattern.kind == "str":
            return i, after + 2, key
        return None

    def _literal_before(self, op_index: int, kind: str) -> int | None:
        """The first token of a literal of ``kind`` that ends right before token ``op_index``."""
        for length in (2, 1):  # a signed number is two tokens; try it first so "-5" is not read as "5"
            start = op_index - length
            if start >= 0 and self.literal(start, kind) == op_index:
                return start
        return None

    def negated_or_nested(self, start: int) -> bool:
        """True if the comparison starting at ``start`` sits under a ``not``/``!`` or inside a function call."""
        depth_flags: list[bool] = []
        for k in range(start):
            token = self.tokens[k]
            if token.text == "(":
                prev = self.at(k - 1)
                blocked = prev is not None and (
                    prev.word == "not" or prev.text == "!" or prev.kind == "name" and prev.word not in _CONNECTIVES
                )
                depth_flags.append(blocked)
            elif token.text == ")" and depth_flags:
                depth_flags.pop()
        return any(depth_flags)

    def column(self, key: str) -> str:
        return value_field(key)

    def comparison_text(self, key: str, inner: str) -> str:
        return f"({presence_field(key)} == true and ({inner}))"

    def rewrite(self) -> str:
        pieces: list[str] = []
        cursor = 0  # character offset copied so far
        i = 0
        done_until = 0  # token index: comparisons are never overlapped
        while i < len(self.tokens):
            found = self.comparison(i) if i >= done_until else None
            if found is None:
                i += 1
                continue
            start, end, key = found
            if (
                start < done_until
                or not (_boundary(self.at(start - 1)) and _boundary(self.at(end)))
                or (self.negated_or_nested(start))
            ):
                i += 1
                continue
            first, last = self.tokens[start], self.tokens[end - 1]
            ref_first, ref_last = self.tokens[i], self.tokens[i + 3]
            left, right = self.expr[first.start : ref_first.start], self.expr[ref_last.end : last.end]
            column = self.column(key)
            if start < i and end > i + 4:
                # A range: milvus-lite reads "a < x < b" as "(a < x) < b", so spell it as two comparisons.
                inner = f"{left}{column} and {column}{right}"
            else:
                inner = f"{left}{column}{right}"
            pieces.append(self.expr[cursor : first.start])
            pieces.append(self.comparison_text(key, inner))
            cursor = last.end
            done_until = end
            i = end
        pieces.append(self.expr[cursor:])
        return "".join(pieces)


class _MirrorRewriter(_Rewriter):
    """Comparisons of undeclared keys moved to their mirrors: the same value, so no presence test is needed."""

    def __init__(self, expr: str):
        super().__init__(expr, {})

    def kind(self, key: str) -> str | None:
        return ANY if MIRROR_KEY.fullmatch(key) else None

    def column(self, key: str) -> str:
        return mirror_key(key)

    def comparison_text(self, key: str, inner: str) -> str:
        return f"({inner})"


def rewrite_filter(expr: str | None, fields: Mapping[str, str], mirrored: bool = False) -> str:
    """``expr`` with comparisons on declared metadata keys moved to their typed columns, and (``mirrored``: the
    collection keeps mirrors) comparisons on any other key moved to its mirror (see module docstring)."""
    if not expr:
        return ""
    if fields:
        expr = _Rewriter(expr, fields).rewrite()
    if mirrored:
        expr = _MirrorRewriter(expr).rewrite()
    return expr


# -- filters on the drop ---------------------------------------------------------------------------------------------

MEMBERSHIP_FIELD = "drops"


def rewrite_drop_filter(expr: str | None) -> str:
    """``expr`` with comparisons on ``drop`` turned into membership tests on the ``drops`` array.

    An image listed by several drops is one row whose ``drops`` holds all of them (``drop`` holds one, for display),
    so "the rows of drop X" is ``array_contains(drops, "X")``. Rewritten: ``drop == s``, ``drop != s``,
    ``drop in [s, …]`` and ``drop not in [s, …]`` with string literals; anything else about ``drop`` is left as
    written and reads the display field.
    """
    if not expr:
        return expr or ""
    tokens = tokenize(expr)
    pieces: list[str] = []
    cursor = i = 0
    while i < len(tokens):
        token = tokens[i]
        prev = tokens[i - 1] if i else None
        if token.kind != "name" or token.text != "drop" or (prev is not None and prev.text in ("[", ".")):
            i += 1
            continue
        found = _drop_comparison(tokens, i)
        if found is None:
            i += 1
            continue
        end, replacement = found
        pieces.append(expr[cursor : token.start])
        pieces.append(replacement)
        cursor = tokens[end - 1].end
        i = end
    pieces.append(expr[cursor:])
    return "".join(pieces)


def _drop_comparison(tokens: list[Token], i: int) -> tuple[int, str] | None:
    """(end token, replacement) for a comparison of ``drop`` starting at token ``i``."""

    def at(k: int) -> Token | None:
        return tokens[k] if k < len(tokens) else None

    op = at(i + 1)
    if op is None:
        return None
    if op.text in ("==", "!=") and (value := at(i + 2)) is not None and value.kind == "str":
        test = f"array_contains({MEMBERSHIP_FIELD}, {value.text})"
        return i + 3, test if op.text == "==" else f"(not {test})"
    negated = op.word == "not" and _is(at(i + 2), "in")
    if not (op.word == "in" or negated):
        return None
    j = i + (3 if negated else 2)
    if not _is(at(j), "["):
        return None
    values, k = [], j + 1
    while True:
        token = at(k)
        if token is None:
            return None
        if token.kind != "str":
            return None
        values.append(token.text)
        sep = at(k + 1)
        if sep is not None and sep.text == "]":
            k += 1
            break
        if sep is None or sep.text != ",":
            return None
        k += 2
    test = f"array_contains_any({MEMBERSHIP_FIELD}, [{', '.join(values)}])"
    return k + 1, f"(not {test})" if negated else test
