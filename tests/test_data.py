import contextlib
import functools
import http.server
import json
import threading

import pytest

from bundlekd_edge import BkdError
from bundlekd_edge.data import (
    Bundle,
    Item,
    Session,
    clean_bundles,
    import_bundlerec,
    load_sessions,
    parse_categories,
    split_sessions,
    stats,
)
from tests.conftest import session, write_lines


def test_sample_loads_with_its_splits(sample_path):
    sessions = load_sessions(sample_path)
    assert len(sessions) == 20
    assert {s.split for s in sessions} == {"train", "val", "test"}
    assert len(load_sessions(sample_path, split="test")) == 4
    assert stats(sessions)["all"]["items_without_title"] == 3


@pytest.mark.parametrize(
    "rows, message",
    [
        ([session("a"), '{"session_id": "b", "items": [}'], r"d.jsonl:2: not valid JSON"),
        ([{"session_id": "a", "bundles": []}], r"d.jsonl:1: missing field 'items'"),
        ([session("a", bundles=[("i1", "i9")])], r"d.jsonl:1: bundles\[0\].items: item 'i9' is not in session 'a'"),
        ([session("a"), session("b"), session("a")], r"d.jsonl:3: duplicate session_id 'a' \(first on line 1\)"),
        ([{**session("a"), "items": []}], r"d.jsonl:1: session 'a' has no items"),
        ([{**session("a"), "split": "dev"}], r"d.jsonl:1: field 'split': unknown split 'dev'"),
        ([session("a", bundles=[("i1", "i1")])], r"d.jsonl:1: bundles\[0\].items: a bundle needs at least 2"),
        ([{**session("a"), "items": [{"id": "i1"}, {"id": "i1"}]}], r"d.jsonl:1: items\[1\]: item 'i1' appears twice"),
        (["[1, 2]"], r"d.jsonl:1: expected a JSON object"),
        (
            [{**session("a"), "session_id": None}],
            r"d.jsonl:1: field 'session_id' must be a string or an integer, got null",
        ),
        ([{**session("a"), "session_id": True}], r"d.jsonl:1: field 'session_id' must be .*, got a boolean"),
        ([{**session("a"), "items": [{"id": None}]}], r"d.jsonl:1: items\[0\]: field 'id' must be .*, got null"),
        ([{**session("a"), "items": [{"id": 1.5}]}], r"d.jsonl:1: items\[0\]: field 'id' must be .*, got a number"),
        (
            [{**session("a"), "items": [{"id": "i1", "categories": 5}]}],
            r"items\[0\]: field 'categories' must be a list",
        ),
        ([{**session("a"), "items": [{"id": "i1", "categories": [[1]]}]}], r"items\[0\]: field 'categories' must be"),
        ([{**session("a"), "items": [{"id": "i1", "title": 7}]}], r"items\[0\]: field 'title' must be a string"),
        ([{**session("a"), "bundles": [{"items": ["i1", None]}]}], r"bundles\[0\].items: item ids must be strings"),
        ([{**session("a"), "bundles": [{"items": ["i1", "i2"], "intent": 3}]}], r"bundles\[0\]: field 'intent' must"),
        (['{"a":' * 5000 + "1" + "}" * 5000], r"d.jsonl:1: JSON nested too deeply"),
    ],
)
def test_bad_sessions_file_names_file_line_and_field(tmp_path, rows, message):
    path = write_lines(tmp_path / "d.jsonl", rows)
    with pytest.raises(BkdError, match=message):
        load_sessions(path)


def test_files_that_are_not_utf8_jsonl_name_file_and_line(tmp_path):
    import gzip

    packed = tmp_path / "s.jsonl.gz"
    packed.write_bytes(gzip.compress(json.dumps(session("a")).encode() + b"\n"))
    with pytest.raises(BkdError, match=r"s.jsonl.gz: a gzip file; decompress it first"):
        load_sessions(packed)
    latin = tmp_path / "latin.jsonl"
    latin.write_bytes(
        (json.dumps(session("a")) + "\n").encode()
        + json.dumps(session("b")).replace("Product", "Caf\u00e9").encode("latin-1")
    )
    with pytest.raises(BkdError, match=r"latin.jsonl:2: not UTF-8 text \(byte \d+\)"):
        load_sessions(latin)
    with pytest.raises(BkdError, match="a folder, not a JSONL file"):
        load_sessions(tmp_path)


def test_category_paths_load_as_lists_of_names(tmp_path):
    rows = [{**session("a"), "items": [{"id": "i1", "categories": ["Electronics", "Cables"]},
                                        {"id": "i2", "categories": [["A", "B"], ["C"]]}, {"id": "i3"}]}]  # fmt: skip
    items = load_sessions(write_lines(tmp_path / "c.jsonl", rows))[0].items
    assert [it.categories for it in items] == [(("Electronics", "Cables"),), (("A", "B"), ("C",)), ()]


def test_unknown_split_and_missing_file(tmp_path, sample_path):
    with pytest.raises(BkdError, match="unknown split 'dev'.*train, val, test"):
        load_sessions(sample_path, split="dev")
    with pytest.raises(BkdError, match="no such file"):
        load_sessions(tmp_path / "nope.jsonl")


def test_items_without_title_are_allowed(tmp_path):
    row = session("a")
    row["items"][2]["title"] = ""
    s = load_sessions(write_lines(tmp_path / "d.jsonl", [row]))[0]
    assert s.items[2].title == "" and stats([s])["all"]["items_without_title"] == 1


def test_clean_bundles_drops_duplicates_and_strict_supersets():
    bundles = [Bundle(("a", "b")), Bundle(("b", "a")), Bundle(("a", "b", "c")), Bundle(("c", "d")), Bundle(("e", "f"))]
    kept = [set(b.items) for b in clean_bundles(bundles)]
    assert kept == [{"a", "b"}, {"c", "d"}, {"e", "f"}]


def test_split_is_seeded_and_70_10_20():
    def fresh():
        return [Session(str(i), [Item("x")]) for i in range(100)]

    a, b, c = split_sessions(fresh(), seed=1), split_sessions(fresh(), seed=1), split_sessions(fresh(), seed=2)
    counts = {k: sum(s.split == k for s in a) for k in ("train", "val", "test")}
    assert counts == {"train": 70, "val": 10, "test": 20}
    assert [s.split for s in a] == [s.split for s in b] != [s.split for s in c]


def test_parse_categories_keeps_names_with_comma_space():
    text = "[[Electronics,Accessories & Supplies,Batteries, Chargers & Accessories],[Cell Phones,Cases]]"
    assert parse_categories(text) == (
        ("Electronics", "Accessories & Supplies", "Batteries, Chargers & Accessories"),
        ("Cell Phones", "Cases"),
    )


def write_bundlerec(folder):
    """A small BundleRec folder shaped like the real CSVs (headers, quoting, gaps)."""
    folder.mkdir(parents=True, exist_ok=True)
    files = {
        "session_item.csv": "session ID,item ID\n"
        + "".join(
            f"{s},{i}\n"
            for s, i in [
                (7, 100),
                (7, 101),
                (7, 102),
                (7, 103),  # two bundles, one a duplicate, one a superset
                (8, 200),
                (8, 201),
                (8, 202),  # one bundle, an item without title
                (9, 300),
                (9, 301),  # no bundle: dropped
                (10, 400),
                (10, 401),
                (10, 402),  # a bundle item outside the session
            ]
        ),  # fmt: skip
        "session_bundle.csv": "session ID,bundle ID\n7,0\n7,1\n7,2\n7,3\n8,4\n10,5\n",
        "bundle_item.csv": "bundle ID,item ID\n"
        + "".join(
            f"{b},{i}\n"
            for b, i in [
                (0, 100),
                (0, 101),
                (1, 101),
                (1, 100),
                (2, 100),
                (2, 101),
                (2, 102),
                (3, 102),
                (3, 103),
                (4, 200),
                (4, 202),
                (5, 400),
                (5, 401),
                (5, 999),
            ]
        ),  # fmt: skip
        "bundle_intent.csv": 'bundle ID,intent\n0,Camera kit\n1,Camera kit again\n2,"Bigger\nkit"\n3,Power\n'
        "4,Phone protection\n5,Audio\n",
        "item_titles.csv": 'item ID,titles\n100,Canon EOS Rebel T5 DSLR\n101,"Lens Cleaning Kit, 7 pieces"\n'
        "102,AA Batteries 8 pack\n103,Battery Charger\n200,Phone Case\n202,Screen Protector\n"
        "300,Mouse\n301,Mouse pad\n400,Speaker\n401,Speaker cable\n402,Amp\n",
        "item_categories.csv": 'item ID,categories\n100,"[[Electronics,Camera & Photo,Digital SLR Cameras]]"\n'
        '103,"[[Electronics,Accessories & Supplies,Batteries, Chargers & Accessories]]"\n',
    }
    for name, text in files.items():
        (folder / name).write_text(text)
    return folder


def test_import_bundlerec_applies_the_preprocessing(tmp_path):
    sessions, report = import_bundlerec(write_bundlerec(tmp_path / "csv"))
    by_id = {s.session_id: s for s in sessions}
    assert set(by_id) == {"7", "8", "10"}  # session 9 has no bundle
    assert [set(b.items) for b in by_id["7"].bundles] == [{"100", "101"}, {"102", "103"}]
    assert by_id["7"].bundles[0].intent == "Camera kit"
    assert by_id["7"].items[1].title == "Lens Cleaning Kit, 7 pieces"
    assert by_id["7"].items[3].categories[0][-1] == "Batteries, Chargers & Accessories"
    assert by_id["8"].items[1].title == ""  # no title: allowed, counted
    assert by_id["10"].bundles[0].items == ("400", "401")  # 999 is not in session 10
    assert report == {
        "sessions_in": 4, "bundles_in": 6, "bundle_items_outside_session": 1, "sessions_out": 3, "bundles_out": 4,
    }  # fmt: skip
    assert all(s.split in ("train", "val", "test") for s in sessions)


def test_data_import_and_stats_commands(tmp_path, cli):
    out = tmp_path / "sessions.jsonl"
    r = cli("data", "import", "bundlerec", write_bundlerec(tmp_path / "csv"), "--out", out, "--prefix", "e")
    assert r.exit_code == 0, r.output
    assert "3 sessions, 4 bundles" in r.output
    assert [s.session_id for s in load_sessions(out)] == ["e7", "e8", "e10"]
    r = cli("data", "stats", out, "--json")
    result = json.loads(r.output)
    assert result["all"]["sessions"] == 3 and result["all"]["bundles"] == 4
    assert result["all"]["items_without_title"] == 1
    assert "items without title" in cli("data", "stats", out).output


def test_import_of_a_folder_without_the_csvs_fails_clearly(tmp_path, cli):
    (tmp_path / "empty").mkdir()
    r = cli("data", "import", "bundlerec", tmp_path / "empty", "--out", tmp_path / "x.jsonl")
    assert r.exit_code == 1
    assert "session_item.csv: missing" in r.output
    assert not (tmp_path / "x.jsonl").exists()


@contextlib.contextmanager
def file_server(root):
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    handler.log_message = lambda *a: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_download_from_a_loopback_mirror_then_import(tmp_path, cli):
    write_bundlerec(tmp_path / "mirror" / "electronic")
    with file_server(tmp_path / "mirror") as url:
        r = cli("data", "download", "--domain", "electronic", "--base-url", url, tmp_path / "got")
    assert r.exit_code == 0, r.output
    assert (tmp_path / "got" / "session_item.csv").read_text().startswith("session ID,item ID")
    r = cli("data", "import", "bundlerec", tmp_path / "got", "--out", tmp_path / "s.jsonl")
    assert "3 sessions, 4 bundles" in r.output


def test_download_without_network_says_so_and_writes_nothing(tmp_path, cli):
    with file_server(tmp_path) as url:
        dead = url  # the server stops at the end of the block: nothing listens there any more
    r = cli("data", "download", "--domain", "food", "--base-url", dead, "--timeout", "5", tmp_path / "got")
    assert r.exit_code == 1
    assert "could not download" in r.output and "by hand" in r.output
    assert not (tmp_path / "got").exists()


def test_an_empty_split_is_an_error_unless_the_caller_has_a_fallback(tmp_path):
    path = write_lines(tmp_path / "s.jsonl", [session("a", split="train")])
    with pytest.raises(BkdError, match="no sessions in split 'val'"):
        load_sessions(path, split="val")
    assert load_sessions(path, split="val", empty_split_ok=True) == []
