"""Knowledge: item types, Apriori patterns, the store, rule/thought checks, and `bkd-edge distill`
end to end against a REAL llama.cpp server (the default GGUF as a teacher stand-in)."""

import json

import numpy as np
import pytest

from bundlekd_edge import BkdError
from bundlekd_edge.data import Bundle, Item, Session
from bundlekd_edge.knowledge import Teacher, TeacherConfig
from bundlekd_edge.knowledge.ask import ask_checked
from bundlekd_edge.knowledge.patterns import PatternConfig, bundle_transactions, item_type, mine_patterns, title_type
from bundlekd_edge.knowledge.rules import check_bundles, check_rules, merge_rules
from bundlekd_edge.knowledge.sampling import k_center, sample_sessions
from bundlekd_edge.knowledge.store import (
    Record,
    read_knowledge,
    read_records,
    verify_store,
    write_manifest,
    write_records,
)
from bundlekd_edge.knowledge.thoughts import check_thoughts
from tests.test_teacher import LlamaServer, free_port

# ---------------------------------------------------------------- types and patterns


@pytest.mark.parametrize(
    "title, expected",
    [
        ("Mophie Juice Pack Air Battery Case for iPhone 5 and 5S", "battery case"),  # head noun is last
        ("Toshiba Canvio 750 GB USB 3.0 Basics Portable Hard Drive - HDTB107XK3AA(Black)", "hard drive"),
        ("Transcend 400X - 64 GB Compact Flash Memory Card TS64GCF400 (Blue)", "memory card"),  # not in the head
        ("Belkin Mini Travel Swivel Charger Surge Protector with Dual USB Ports", "surge protector"),
        ("SanDisk Extreme 64GB USB 3.0 Flash Drive With Speed Up To 190MB/s", "usb flash drive"),
        ("Anker Astro 5600mAh Portable External Battery Charger for Smartphones", "power bank"),
        ("Kingwin Anti-Static Wrist Straps (ATS-W24)", "strap"),  # no lexicon term: last word, singular
        ("Canon EOS &amp; 50mm Lenses", "lens"),  # HTML unescaped, plural matched
        ("", "other"),
    ],
)
def test_title_types_follow_the_documented_rule(title, expected):
    assert title_type(title) == expected


def test_categories_win_over_titles():
    item = Item("a", "Padded camera bag", (("Electronics", "Camera & Photo", "Bags & Cases"), ("Other", "X")))
    assert item_type(item) == "bags & cases"
    assert item_type(Item("b", "Padded camera bag")) == "bag"


def _session(sid, titles, bundles):
    items = [Item(f"{sid}-{i}", t) for i, t in enumerate(titles)]
    return Session(sid, items, [Bundle(tuple(f"{sid}-{i}" for i in b)) for b in bundles], "train")


def test_apriori_over_bundle_type_sets():
    cam, bag, card, cable = "DSLR Camera", "Camera Bag", "SD Card 64GB", "HDMI Cable"
    sessions = [
        _session("a", [cam, bag, card, cable], [(0, 1, 2)]),  # the cable is in the session, not in a bundle
        _session("b", [cam, card, bag], [(0, 1)]),
        _session("c", [cam, bag, card], [(0, 1, 2)]),
        _session("d", [cable, cable + " 2", card], [(0, 1)]),
    ]
    transactions, owners = bundle_transactions(sessions)
    full = ("bag", "camera", "memory card")
    assert transactions == [full, ("camera", "memory card"), full, ("cable",)]
    assert owners == ["a", "b", "c", "d"]

    found = mine_patterns(sessions, PatternConfig(min_support=0.5, min_confidence=0.6))
    texts = [p.text() for p in found]
    assert texts[:6] == [
        "camera -> memory card (support 0.75, confidence 1.00)",
        "memory card -> camera (support 0.75, confidence 1.00)",
        "bag -> camera (support 0.50, confidence 1.00)",
        "bag -> memory card (support 0.50, confidence 1.00)",
        "camera -> bag (support 0.50, confidence 0.67)",
        "memory card -> bag (support 0.50, confidence 0.67)",
    ]  # one type per consequent; "bag + camera -> memory card" is implied by "bag -> memory card": pruned
    assert "camera + memory card -> bag (support 0.50, confidence 0.67)" not in texts  # no better than "camera -> bag"
    assert "camera + memory card (support 0.75)" in texts
    assert not any("cable" in t for t in texts)  # session co-occurrence alone is not bundling
    rule = next(p for p in found if p.text().startswith("bag -> camera"))
    assert rule.session_ids == ("a", "c")
    assert found == mine_patterns(sessions, PatternConfig(min_support=0.5, min_confidence=0.6))  # deterministic
    kinds = [p.kind for p in found]
    assert kinds == sorted(kinds)  # association rules (most confident first), then itemsets


def test_sampling_is_seeded_and_bounded():
    sessions = [_session(str(i), ["a b", "c d"], [(0, 1)]) for i in range(10)]
    picked = sample_sessions(sessions, "random", 0.3, seed=1)
    assert len(picked) == 3 and picked == sample_sessions(sessions, "random", 0.3, seed=1)
    assert [s.session_id for s in picked] == sorted((s.session_id for s in picked), key=int)  # file order
    with pytest.raises(BkdError, match="needs a teacher"):
        sample_sessions(sessions, "difficulty", 0.3)
    with pytest.raises(BkdError, match="choose from random, length, diversity, difficulty"):
        sample_sessions(sessions, "hardest", 0.3)
    with pytest.raises(BkdError, match="ratio"):
        sample_sessions(sessions, "random", 0)


def test_length_and_difficulty_sampling_pick_the_longest_and_the_hardest():
    sessions = [_session(str(i), ["a b"] * (2 + i % 5), [(0, 1)]) for i in range(10)]
    longest = sample_sessions(sessions, "length", 0.2)
    assert [len(s.items) for s in longest] == [6, 6]
    errors = [0.1 * i for i in range(10)]
    hardest = sample_sessions(sessions, "difficulty", 0.3, error=lambda rows: errors)
    assert [s.session_id for s in hardest] == ["7", "8", "9"]


def test_diversity_sampling_covers_every_cluster():
    # Three tight clusters of sessions: k-center must take one from each before any second pick.
    centers = np.eye(3)
    vectors = np.array([centers[i % 3] + 0.01 * (i // 3) for i in range(12)])
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    sessions = [_session(str(i), ["a b"], [(0, 0)]) for i in range(12)]
    picked = sample_sessions(sessions, "diversity", 0.25, seed=4, embed=lambda rows: vectors)
    assert sorted(int(s.session_id) % 3 for s in picked) == [0, 1, 2]
    assert k_center(vectors, 3, seed=4) == k_center(vectors, 3, seed=4)


def test_diversity_on_real_titles_with_the_onnx_encoder(tmp_path, cli, sample_path):
    r = cli("distill", "--sessions", sample_path, "--out", tmp_path / "k", "--sampling", "diversity", "--ratio", "0.5")
    assert r.exit_code == 0, r.output
    assert "from 7 of 14 train sessions" in r.output


def test_distill_accumulates_domains_and_refuses_clashing_ids(tmp_path, cli, sample_path):
    other = tmp_path / "other.jsonl"
    rows = [json.loads(line) for line in sample_path.read_text().splitlines()]
    other.write_text("".join(json.dumps({**r, "session_id": "o-" + r["session_id"]}) + "\n" for r in rows))
    r = cli("distill", "--sessions", sample_path, "--sessions", other, "--out", tmp_path / "k")
    assert r.exit_code == 0, r.output
    assert "of 28 train sessions" in r.output
    run = json.loads((tmp_path / "k" / "manifest.json").read_text())
    last = run["runs"][-1] if "runs" in run else run
    assert len(last["sessions"]["files"]) == 2
    r = cli("distill", "--sessions", sample_path, "--sessions", sample_path, "--out", tmp_path / "k2")
    assert r.exit_code == 1 and "'sample-01' is also in" in r.output


# ---------------------------------------------------------------- store


def test_store_roundtrip_manifest_and_tamper_check(tmp_path):
    rec = Record(
        "pattern", "camera -> memory card (support 0.04, confidence 0.61)", ["e1"], "patterns", extra={"support": 0.04}
    )
    write_records(tmp_path, "patterns", [rec])
    write_manifest(tmp_path, {"command": "distill", "args": {"formats": "patterns"}})
    rule = Record("rule", "Keep chargers with the devices they charge.", ["e2", "e3"], "rules", "m", ["ab" * 32])
    write_records(tmp_path, "rules", [rule])
    manifest = write_manifest(tmp_path, {"command": "distill", "args": {"formats": "rules"}})
    assert len(manifest["runs"]) == 2 and manifest["records"] == {"patterns.jsonl": 1, "rules.jsonl": 1}
    assert set(manifest["files"]) == {"patterns.jsonl", "rules.jsonl"}
    assert read_records(tmp_path) == [rec, rule] and verify_store(tmp_path) == []
    line = json.loads((tmp_path / "rules.jsonl").read_text())
    assert line["kind"] == "rule" and line["prompt_sha256"] == ["ab" * 32] and line["teacher_model"] == "m"

    (tmp_path / "rules.jsonl").write_text((tmp_path / "rules.jsonl").read_text().replace("chargers", "cables"))
    assert verify_store(tmp_path) == [f"{tmp_path / 'rules.jsonl'}: changed (sha256 differs from the manifest)"]
    with pytest.raises(BkdError, match="refusing a changed knowledge store: .*rules.jsonl: changed"):
        read_knowledge(tmp_path)  # what `pack build` reads: never a store edited behind its manifest
    with pytest.raises(BkdError, match="unknown knowledge format"):
        write_records(tmp_path, "hunches", [])
    (tmp_path / "thoughts.jsonl").write_text('{"text": "x"}\n')
    with pytest.raises(BkdError, match=r"thoughts.jsonl:1: not a knowledge record"):
        read_records(tmp_path)


# ---------------------------------------------------------------- answer checks and bounded retries


def test_answer_checks_reject_invented_items_and_bad_shapes():
    s = _session("s", ["a", "b", "c"], [(0, 1)])
    assert check_bundles(s, '{"bundles": [{"items": [1, 2], "intent": "x"}]}')[0] == [
        {"items": ["s-0", "s-1"], "intent": "x"}
    ]
    wrong = check_bundles(s, '{"bundles": [{"items": [1, 7], "intent": "x"}]}')
    assert wrong == (None, "names item(s) 7 not in the session (1..3)")
    assert check_bundles(s, "{not json")[0] is None
    assert check_rules('{"rules": ["  Keep  a camera with its bag. ", 3, ""]}') == (["Keep a camera with its bag."], "")
    assert check_rules('{"rules": ["MENU_1.1.1.1.1"]}')[0] is None  # not a sentence: rejected, then retried
    rambling = "Keep cases with their phones, " * 8  # over 200 characters: not one rule, dropped whole
    assert check_rules(json.dumps({"rules": [rambling, "Keep a lens with its camera."]})) == (
        ["Keep a lens with its camera."], "")  # fmt: skip
    two = _session("t", ["a", "b", "c", "d"], [(0, 1), (2, 3)])
    a, b = {"bundle": 1, "why": "both serve one camera"}, {"bundle": 2, "why": "both charge one phone"}

    def check(*thoughts):
        return check_thoughts(two, json.dumps({"thoughts": list(thoughts)}))

    assert check(b, a) == ({1: "both serve one camera", 2: "both charge one phone"}, "")
    assert check(a, {"bundle": 3, "why": "they go well together"})[1] == "names bundle 3; the session has bundles 1..2"
    assert check(a)[1] == "explains 1 of 2 bundles"
    assert check(a, a)[1] == "explains bundle 1 twice"
    assert "not a sentence" in check(a, {"bundle": 2, "why": "1.1.1"})[1]


def test_rules_are_merged_and_deduplicated():
    found = [
        ("Keep a camera with its memory card.", ["a"], ["k1"]),
        ("keep a camera with its memory card", ["b"], ["k2"]),  # same after normalising
        ("Keep a camera together with its memory card.", ["c"], ["k3"]),  # near duplicate
        ("Cables go with the device they connect.", ["d"], ["k4"]),
    ]
    merged = merge_rules(found, near=0.8)
    assert merged == [
        ("Keep a camera with its memory card.", ["a", "b", "c"], ["k1", "k2", "k3"]),
        ("Cables go with the device they connect.", ["d"], ["k4"]),
    ]


class ScriptedTeacher(Teacher):
    """Answers from a list, in order: for the bounded-retry logic only (real teachers are tested elsewhere)."""

    model = "scripted"

    def __init__(self, answers):
        super().__init__(TeacherConfig())
        self.answers, self.seen = list(answers), []

    def _call(self, messages, params):
        self.seen.append(params)
        return self.answers.pop(0), {"prompt_tokens": 1, "completion_tokens": 1}, "stop"


def test_bad_answers_are_retried_a_bounded_number_of_times_then_failures():
    s = _session("s", ["a", "b", "c"], [(0, 1)])
    teacher = ScriptedTeacher(["{oops", '{"bundles": [{"items": [1, 2], "intent": "x"}]}'])
    [out] = ask_checked(teacher, [{"messages": [{"role": "user", "content": "1"}]}], lambda i, t: check_bundles(s, t))
    assert out.ok and len(out.keys) == 2 and out.errors[0].startswith("attempt 1: not valid JSON")
    assert teacher.seen[1]["temperature"] > 0 and teacher.seen[1]["seed"] == 1  # a greedy retry would repeat itself

    bad = '{"bundles": [{"items": [1, 9], "intent": "x"}]}'
    teacher = ScriptedTeacher([bad] * 3)
    [out] = ask_checked(
        teacher, [{"messages": [{"role": "user", "content": "2"}]}], lambda i, t: check_bundles(s, t), 3
    )
    assert not out.ok and out.value is None and len(out.errors) == 3 and teacher.answers == []
    assert "names item(s) 9 not in the session" in out.errors[-1]


# ---------------------------------------------------------------- `bkd-edge distill`, real server


def test_distill_patterns_without_a_teacher(tmp_path, cli, sample_path):
    r = cli("distill", "--sessions", sample_path, "--out", tmp_path / "k", "--min-support", "0.1")
    assert r.exit_code == 0, r.output
    assert "patterns from 14 of 14 train sessions" in r.output
    rows = [json.loads(line) for line in (tmp_path / "k" / "patterns.jsonl").read_text().splitlines()]
    assert rows and all(row["kind"] == "pattern" and row["source_session_ids"] for row in rows)
    assert verify_store(tmp_path / "k") == []
    r = cli("distill", "--sessions", sample_path, "--out", tmp_path / "k2", "--formats", "patterns,rules")
    assert r.exit_code == 1 and "needs a --teacher" in r.output
    r = cli("distill", "--sessions", sample_path, "--out", tmp_path / "k", "--formats", "rulez")
    assert r.exit_code == 1 and "choose from patterns, rules, thoughts" in r.output


def test_distill_with_a_dead_teacher_fails_clearly_and_writes_nothing(tmp_path, cli, sample_path):
    port = free_port()
    r = cli("distill", "--sessions", sample_path, "--out", tmp_path / "k", "--formats", "patterns,thoughts",
            "--teacher", f"http://127.0.0.1:{port}", "--teacher-model", "m", "--retries", "0", "--quiet")  # fmt: skip
    assert r.exit_code == 1
    assert f"Error: teacher http://127.0.0.1:{port}/v1/chat/completions: connection refused" in r.output
    assert not list((tmp_path / "k").glob("*.json*"))  # no knowledge file, no manifest


def test_distill_end_to_end_with_a_real_server_then_rerun_from_cache(tmp_path, cli, sample_path):
    out = tmp_path / "knowledge"
    args = ["distill", "--sessions", sample_path, "--out", out, "--formats", "patterns,rules,thoughts",
            "--sampling", "random", "--ratio", "0.1", "--attempts", "1", "--rules-per-batch", "2",
            "--rule-chars", "40", "--why-chars", "40", "--retries", "1", "--quiet"]  # fmt: skip
    server = LlamaServer().start()
    try:
        r = cli(*args, "--teacher", server.url)
    finally:
        server.stop()
    assert r.exit_code == 0, r.output
    assert "from 1 of 14 train sessions" in r.output and "0 cached" in r.output
    run = json.loads((out / "manifest.json").read_text())["runs"][-1]
    calls = run["calls"]
    assert calls["made"] >= 2 and calls["failed"] == 0 and calls["tokens"] > 0
    assert run["teacher"]["teacher"] == server.url + "/v1" and run["sessions"]["ids"] == ["sample-14"]
    # Every answer is either knowledge or a recorded failure: nothing invented, nothing lost.
    produced = run["counts"]["thoughts"] + sum(f["stage"] == "thoughts" for f in run["failures"])
    assert produced == 1
    for rec in read_records(out):
        if rec.kind != "pattern":
            assert rec.teacher_model == run["teacher"]["model"] and rec.prompt_sha256 and rec.source_session_ids
    assert verify_store(out) == []
    read_knowledge(out)  # what `pack build` reads

    # The server is gone: a rerun is answered entirely from the cache.
    r = cli(*args, "--teacher", server.url, "--teacher-model", run["teacher"]["model"])
    assert r.exit_code == 0, r.output
    again = json.loads((out / "manifest.json").read_text())["runs"][-1]["calls"]
    assert (again["made"], again["cached"], again["failed"]) == (0, calls["made"], 0)
    assert f"teacher calls: 0 made, {calls['made']} cached" in r.output
