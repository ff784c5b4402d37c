"""The one function that puts user values into Milvus expressions: every string round-trips, none escapes its
literal (property-based), and drop filters become membership tests."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from embedding_pipeline.index import expressions
from embedding_pipeline.index.filters import rewrite_drop_filter, tokenize

HOSTILE = [
    "x'] or id not in ['",
    'x"] or id not in ["',
    "O'Brien",
    "back\\slash\\",
    "\\",
    '"',
    "]",
    "a\nb\rc\td",
    "üñí 😀 中文",
    "a" * 512,
    "\x01\x1b[31m\x7f",
    '") or true or ("',
]

ids = st.text(alphabet=st.characters(blacklist_characters="\0", blacklist_categories=("Cs",)), max_size=80)


@pytest.mark.parametrize("value", HOSTILE)
def test_hostile_values_stay_one_literal(value):
    text = expressions.literal(value)
    assert expressions.unquote(text) == value
    # The whole literal is one string token for the expression tokenizer: nothing spills into the expression.
    tokens = tokenize(f"id in [{text}]")
    assert [t.kind for t in tokens] == ["name", "name", "punct", "str", "punct"]
    assert tokens[3].text == text


@given(ids)
@settings(max_examples=400)
def test_every_string_round_trips_as_one_token(value):
    text = expressions.literal(value)
    assert expressions.unquote(text) == value
    assert "\n" not in text and "\r" not in text
    tokens = tokenize(expressions.in_list("id", [value, "other"]))
    assert [t.text for t in tokens if t.kind == "str"] == [text, '"other"']


def test_nul_is_refused():
    with pytest.raises(expressions.ExpressionValueError):
        expressions.literal("a\0b")


def test_chunks_cover_all_values_in_order():
    values = [str(i) for i in range(1234)]
    parts = list(expressions.chunks(values, 500))
    assert [len(p) for p in parts] == [500, 500, 234] and [v for p in parts for v in p] == values


@pytest.mark.parametrize(
    "expr, expected",
    [
        ('drop == "a"', 'array_contains(drops, "a")'),
        ("drop == 'a'", "array_contains(drops, 'a')"),
        ('drop != "a"', '(not array_contains(drops, "a"))'),
        ('drop in ["a", "b"]', 'array_contains_any(drops, ["a", "b"])'),
        ('drop not in ["a"]', '(not array_contains_any(drops, ["a"]))'),
        ('drop == "a" and metadata["k"] == 1', 'array_contains(drops, "a") and metadata["k"] == 1'),
        ('metadata["drop"] == "a"', 'metadata["drop"] == "a"'),  # a metadata key, not the field
        ('uri like "drop == %"', 'uri like "drop == %"'),  # inside a string literal
        ('drop like "a%"', 'drop like "a%"'),  # other forms read the display field
        ("drop in []", "drop in []"),
    ],
)
def test_drop_filters_become_membership_tests(expr, expected):
    assert rewrite_drop_filter(expr) == expected


@given(st.text(max_size=30))
def test_the_drop_rewrite_keeps_hostile_drop_names_inside_their_literal(name):
    if "\0" in name:
        return
    rewritten = rewrite_drop_filter(f"drop == {expressions.literal(name)}")
    assert rewritten == f"array_contains(drops, {expressions.literal(name)})"
