import json

import llama_cpp
import numpy as np
import pytest
from llama_cpp import LlamaGrammar

from bundlekd_edge import BkdError
from bundlekd_edge.data import Bundle, Item, Session, load_sessions
from bundlekd_edge.prompts import (
    PromptConfig,
    build_messages,
    intents_grammar,
    max_answer_tokens,
    max_bundles_for,
    output_grammar,
    output_schema,
    parse_answer,
    render_answer,
    session_text,
)
from bundlekd_edge.runtime.llamacpp import GrammarGreedy


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


COMPACT = PromptConfig(answer_format="compact")


def test_compact_answer_round_trips_in_far_fewer_tokens(sample_path, engine):
    for s in load_sessions(sample_path):
        text = render_answer(s, COMPACT)
        parsed = parse_answer(text, s, COMPACT)
        assert parsed.valid
        assert sorted((sorted(b["items"]), b["intent"]) for b in parsed.bundles) == sorted(
            (sorted(b.items), b.intent) for b in s.bundles
        )
        compact, full = (engine.llm.tokenize(t.encode(), add_bos=False) for t in (text, render_answer(s)))
        assert len(compact) < 0.6 * len(full) and len(compact) <= max_answer_tokens(len(s.items), COMPACT)


def admitted(engine, gbnf: str, text: str) -> bool:
    """Whether the grammar admits `text` token by token and then lets the answer end."""
    sampler = GrammarGreedy(engine.llm, gbnf)
    try:
        for token in engine.llm.tokenize(text.encode(), add_bos=False) + [engine.llm.token_eos()]:
            one = np.zeros(1, dtype=sampler._one.dtype)
            one[0] = (token, 1.0, 0.0)
            if not sampler._allowed(one):
                return False
            if token != engine.llm.token_eos():
                llama_cpp.llama_sampler_accept(sampler.grammar, token)
        return True
    finally:
        sampler.free()


def test_compact_grammar_admits_the_canonical_answer_and_nothing_looser(sample_path, engine):
    s = load_sessions(sample_path)[0]
    n = len(s.items)
    gbnf = output_grammar(n, COMPACT)
    assert admitted(engine, gbnf, render_answer(s, COMPACT))
    assert admitted(engine, gbnf, "1 2 | 3 4\nCables | Cases")
    assert not admitted(engine, gbnf, "1 2 | 3 4\nCables")  # one intent for two bundles
    assert not admitted(engine, gbnf, "2 1\nCables")  # numbers ascend inside a bundle
    assert not admitted(engine, gbnf, "1\nCables")  # a bundle has 2+ items
    assert not admitted(engine, gbnf, f"1 {n + 1}\nCables")  # no item beyond the session
    assert admitted(engine, intents_grammar(2, COMPACT), "Cables | Cases")
    assert not admitted(engine, intents_grammar(2, COMPACT), "Cables | Cases | Bags")


@pytest.mark.parametrize("raw", ["", "1 x | 3 4\nA | B", "| 1 2\nA", "1 2 |\nA"])
def test_compact_parser_flags_invalid_first_lines(raw):
    parsed = parse_answer(raw, make_session(), COMPACT)
    assert not parsed.valid and parsed.bundles == [] and "first line" in parsed.error


def test_compact_parser_pairs_intents_and_tolerates_a_missing_line():
    s = make_session(4)
    parsed = parse_answer("1 3 | 2 4 9\n Pair | Other ", s, COMPACT)
    assert (
        parsed.bundles
        == [
            {"items": ["id1", "id3"], "intent": "Pair"},
            {"items": ["id2", "id4"], "intent": "Other"},
        ]
        and parsed.dropped_items == 1
    )
    assert parse_answer("1 2", s, COMPACT).bundles == [{"items": ["id1", "id2"], "intent": ""}]


def test_an_unknown_answer_format_is_refused():
    with pytest.raises(BkdError, match="answer_format 'yaml'"):
        PromptConfig(answer_format="yaml")
