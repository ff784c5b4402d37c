"""Declared filter fields: the filter rewriter and the typed row values (no server)."""

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from embedding_pipeline.index.filters import (
    MIRROR_KEY,
    MIRROR_PREFIX,
    check_declared,
    mirror_key,
    mirrored_values,
    rewrite_filter,
    tokenize,
    typed_values,
)
from embedding_pipeline.settings import ConfigError

FIELDS = {"category": "VARCHAR", "year": "INT64", "score": "DOUBLE", "ok": "BOOL"}


def typed(key: str, inner: str) -> str:
    return f"(has_meta_{key} == true and ({inner}))"


@pytest.mark.parametrize(
    "expr, expected",
    [
        # The original specification's syntax, both quote styles; the rest of the expression is kept byte for byte.
        ('metadata["category"] == "nature"', typed("category", 'meta_category == "nature"')),
        (
            "metadata['category'] == 'nature' and drop == 'x'",
            typed("category", "meta_category == 'nature'") + " and drop == 'x'",
        ),
        ('"nature" == metadata["category"]', typed("category", '"nature" == meta_category')),
        ('metadata["category"] in ["a", "b"]', typed("category", 'meta_category in ["a", "b"]')),
        ('metadata["category"] like "nat%"', typed("category", 'meta_category like "nat%"')),
        ('metadata["year"] >= 1990', typed("year", "meta_year >= 1990")),
        ('metadata["year"] > -5', typed("year", "meta_year > -5")),
        ('-5 < metadata["year"]', typed("year", "-5 < meta_year")),
        # Ranges are written out as two comparisons (milvus-lite has no chained range).
        ('1990 <= metadata["year"] < 2000', typed("year", "1990 <= meta_year and meta_year < 2000")),
        ('2000 > metadata["year"] >= 1990', typed("year", "2000 > meta_year and meta_year >= 1990")),
        ('metadata["year"] in [1, -2, 3]', typed("year", "meta_year in [1, -2, 3]")),
        ('metadata["score"] < 0.5', typed("score", "meta_score < 0.5")),
        ('metadata["score"] >= 2', typed("score", "meta_score >= 2")),
        ('metadata["ok"] == True', typed("ok", "meta_ok == True")),
        # Several comparisons, grouping and connectives.
        (
            '(metadata["category"] == "a" or metadata["year"] == 3) && metadata["ok"] == false',
            "("
            + typed("category", 'meta_category == "a"')
            + " or "
            + typed("year", "meta_year == 3")
            + ") && "
            + typed("ok", "meta_ok == false"),
        ),
        (
            'drop == "d" and (metadata["category"] == "a")',
            'drop == "d" and (' + typed("category", 'meta_category == "a"') + ")",
        ),
    ],
)
def test_comparisons_on_declared_keys_move_to_typed_columns(expr, expected):
    assert rewrite_filter(expr, FIELDS) == expected


@pytest.mark.parametrize(
    "expr",
    [
        'metadata["color"] == "red"',  # undeclared: JSON path
        'metadata["category"] != "a"',  # engines disagree on missing keys under negation: keep the JSON path
        'not (metadata["category"] == "a")',
        'not metadata["category"] == "a"',
        '!(metadata["year"] > 3 and drop == "x")',
        'metadata["category"] not in ["a"]',
        'metadata["year"] > 2.5',  # literal of another type
        'metadata["year"] == "1999"',
        'metadata["category"] == 5',
        'metadata["ok"] > true',  # BOOL compares by equality only
        'metadata["ok"] != false',
        'metadata["year"] in [1, 2.5]',
        'metadata["category"]["sub"] == "a"',  # nested path
        'metadata["year"] + 1 == 5',  # arithmetic
        '5 == 1 + metadata["year"]',
        'x - 5 < metadata["year"]',
        'metadata["year"] < 5 + 1',
        'json_contains(metadata["category"], "a")',  # function argument
        'array_length(metadata["year"] == 1)',
        'exists metadata["category"]',
        'metadata["year"] == metadata["score"]',
        '1 < metadata["year"] > 0',  # not a range
        'uri == "metadata[\\"category\\"] == \\"a\\""',  # inside a string literal
        'uri like \'metadata["category"] == "a"%\'',
        '$meta["category"] == "a"',
        "metadata['cat\\'egory'] == \"a\"",
        "",
    ],
)
def test_everything_else_is_left_exactly_as_written(expr):
    assert rewrite_filter(expr, FIELDS) == expr


def test_no_declared_fields_means_no_change():
    assert rewrite_filter('metadata["category"] == "nature"', {}) == 'metadata["category"] == "nature"'
    assert rewrite_filter(None, FIELDS) == ""


def test_tokenizer_keeps_string_literals_whole():
    tokens = tokenize('uri == "a \\" b" or x == \'c\'')
    assert [t.text for t in tokens if t.kind == "str"] == ['"a \\" b"', "'c'"]


def test_typed_values_store_fitting_values_and_report_the_rest():
    metadata = {"category": "nature", "year": "1999", "score": 3, "ok": 1}
    columns, problems = typed_values("img_1", metadata, FIELDS)
    assert columns == {
        "meta_category": "nature",
        "has_meta_category": True,
        "meta_year": 0,
        "has_meta_year": False,
        "meta_score": 3.0,
        "has_meta_score": True,  # a DOUBLE key takes integers
        "meta_ok": False,
        "has_meta_ok": False,
    }
    assert {(p.id, p.key, p.declared) for p in problems} == {("img_1", "year", "INT64"), ("img_1", "ok", "BOOL")}
    assert "expected an integer, got str" in next(p.reason for p in problems if p.key == "year")


def test_missing_or_null_values_are_absent_not_mismatched():
    columns, problems = typed_values("x", {"category": None}, FIELDS)
    assert not problems
    assert not any(v for k, v in columns.items() if k.startswith("has_"))


@pytest.mark.parametrize(
    "value, reason",
    [(True, "got bool"), (2**63, "64-bit"), (float("nan"), None), ("x" * 3000, "longer")],
)
def test_edge_values_do_not_fit(value, reason):
    kind = {str: "VARCHAR", float: "DOUBLE"}.get(type(value), "INT64")
    _, problems = typed_values("x", {"k": value}, {"k": kind})
    assert len(problems) == 1
    assert reason is None or reason in problems[0].reason


@pytest.mark.parametrize(
    "fields, needle",
    [
        ({"bad-key": "VARCHAR"}, "'bad-key' cannot be a column name"),
        ({"1st": "INT64"}, "'1st'"),
        ({"k": "FLOAT"}, "milvus.filter_fields.k"),
        ({f"k{i}": "BOOL" for i in range(30)}, "at most 24"),
    ],
)
def test_bad_declarations_name_the_key(fields, needle):
    with pytest.raises(ConfigError, match="filter_fields") as err:
        check_declared(fields)
    assert needle in str(err.value)


# -- mirrors of undeclared keys ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "expr, expected",
    [
        ('metadata["color"] == "red"', '(m__color == "red")'),
        ('metadata["n"] in [1, "a", true]', '(m__n in [1, "a", true])'),
        ('1 <= metadata["n"] < 5', "(1 <= m__n and m__n < 5)"),
        ('metadata["name"] like "re%" or metadata["n"] > -2.5', '(m__name like "re%") or (m__n > -2.5)'),
        # declared keys keep their typed column; the rest of the filter uses mirrors
        (
            'metadata["category"] == "nature" and metadata["color"] == "red"',
            '(has_meta_category == true and (meta_category == "nature")) and (m__color == "red")',
        ),
        # not rewritten: negations, keys that are no names, nested paths, function arguments, string contents
        ('metadata["color"] != "red"', 'metadata["color"] != "red"'),
        ('not (metadata["color"] == "red")', 'not (metadata["color"] == "red")'),
        ('metadata["a b"] == "red"', 'metadata["a b"] == "red"'),
        ('metadata["a"]["b"] == 1', 'metadata["a"]["b"] == 1'),
        ('array_contains(metadata["tags"], "x")', 'array_contains(metadata["tags"], "x")'),
        ('uri == "metadata[\\"color\\"] == 1"', 'uri == "metadata[\\"color\\"] == 1"'),
    ],
)
def test_undeclared_keys_move_to_their_mirrors(expr, expected):
    assert rewrite_filter(expr, {"category": "VARCHAR"}, mirrored=True) == expected


def test_without_mirrors_undeclared_keys_keep_the_json_path():
    assert rewrite_filter('metadata["color"] == "red"', {}, mirrored=False) == 'metadata["color"] == "red"'


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=5),
    lambda inner: st.lists(inner, max_size=2) | st.dictionaries(st.text(max_size=3), inner, max_size=2),
    max_leaves=4,
)


@given(st.dictionaries(st.text(max_size=8), json_values, max_size=6))
def test_a_mirror_is_its_keys_scalar_value_as_given(metadata):
    mirrors = mirrored_values(metadata)
    for mirror, value in mirrors.items():
        assert mirror.startswith(MIRROR_PREFIX)
        key = mirror[len(MIRROR_PREFIX) :]
        assert metadata[key] is value and isinstance(value, (str, int, float))
    # Every scalar under a usable name is mirrored; nothing else is.
    for key, value in metadata.items():
        usable = MIRROR_KEY.fullmatch(key) is not None
        scalar = (
            isinstance(value, (str, bool))
            or (isinstance(value, int) and -(2**63) <= value < 2**63)
            or (isinstance(value, float) and math.isfinite(value))
        )
        assert (mirror_key(key) in mirrors) == (usable and scalar)
