import json

import pytest
from llama_cpp import LlamaGrammar

from bundlekd_edge.data import Bundle, Item, Session, load_sessions
from bundlekd_edge.prompts import (
    build_messages,
    max_bundles_for,
    output_grammar,
    output_schema,
    parse_answer,
    render_answer,
    session_text,
)


def make_session(n=4):
    items = [Item(f"id{k}", f"Product &amp; thing {k}") for k in range(1, n + 1)]
    return Session("s", items, [Bundle(("id1", "id3"), "Pair")])


def test_items_are_numbered_with_clean_titles_and_placeholder():
    s = make_session(3)
    s.items[1] = Item("id2", "")
    text = session_text(s)
    assert "1. Product & thing 1" in text and "2. (no title)" in text and "3. Product & thing 3" in text
    assert "id1" not in text  # the model answers with numbers, never ids


def test_static_text_comes_before_the_session():
    msgs = build_messages(make_session(), knowledge="RULE: cameras go with bags")
    assert msgs[0]["role"] == "system" and "RULE: cameras go with bags" in msgs[0]["content"]
    assert msgs[1]["content"].startswith("Session items:")
    assert build_messages(make_session(2))[0] == build_messages(make_session(5))[0]  # shared prefix


def test_schema_is_bounded_everywhere():
    schema = output_schema(6)
    bundles = schema["properties"]["bundles"]
    items = bundles["items"]["properties"]["items"]
    assert bundles["maxItems"] == 5 and bundles["minItems"] == 1
    assert items["items"]["enum"] == [1, 2, 3, 4, 5, 6]
    assert (items["minItems"], items["maxItems"]) == (2, 6)
    assert bundles["items"]["properties"]["intent"]["maxLength"] == 40
    assert bundles["items"]["additionalProperties"] is False and schema["additionalProperties"] is False
    assert max_bundles_for(2) == 1 and max_bundles_for(3) == 2


@pytest.mark.parametrize("n", [2, 3, 7, 10, 25])
def test_grammar_compiles_in_llama_cpp(n):
    gbnf = output_grammar(n)
    assert LlamaGrammar.from_string(gbnf, verbose=False) is not None
    assert f'"{n}"' in gbnf and f'"{n + 1}"' not in gbnf


def test_parser_maps_numbers_and_drops_out_of_range_and_repeats():
    s = make_session(4)
    raw = json.dumps({"bundles": [
        {"items": [1, 3, 3, 9], "intent": " Pair "},  # 3 repeated, 9 out of range
        {"items": [2, 0], "intent": "lonely"},  # only one valid item left: dropped
        {"items": [3, 1], "intent": "dup"},  # same set as the first: dropped
        {"items": ["4", 2], "intent": "strings ok"},
    ]})  # fmt: skip
    parsed = parse_answer(raw, s)
    assert parsed.valid
    assert parsed.bundles == [
        {"items": ["id1", "id3"], "intent": "Pair"},
        {"items": ["id4", "id2"], "intent": "strings ok"},
    ]
    assert parsed.dropped_items == 3


@pytest.mark.parametrize("raw", ['{"bundles": [{"items": [1, 2]', "[]", '{"bundles": 3}', '{"bundles": [[1, 2]]}'])
def test_parser_flags_invalid_answers(raw):
    parsed = parse_answer(raw, make_session())
    assert not parsed.valid and parsed.bundles == [] and parsed.error


def test_render_answer_is_the_parse_inverse(sample_path):
    for s in load_sessions(sample_path):
        parsed = parse_answer(render_answer(s), s)
        assert [set(b["items"]) for b in parsed.bundles] == [set(b.items) for b in s.bundles]
        assert [b["intent"] for b in parsed.bundles] == [b.intent for b in s.bundles]
