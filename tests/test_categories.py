"""Categories as a signal: the category view of a session, the `category` baseline, the view a
pack and `baseline:choice` choose on train, and today's outputs where a catalogue has none."""

import json
import random
from dataclasses import replace

import pytest

from bundlekd_edge import BkdError
from bundlekd_edge.baselines import (
    CategoryGroups,
    HintChoice,
    hint_candidates,
    tune_category_view,
    with_categories,
)
from bundlekd_edge.categories import CategoryView, category_name, category_partition
from bundlekd_edge.data import Bundle, Item, Session, load_sessions
from bundlekd_edge.packs import Pack

CAMERA = ("Electronics", "Camera & Photo", "Digital Cameras")
LENS = ("Electronics", "Camera & Photo", "Lenses")
BAG = ("Electronics", "Camera & Photo", "Bags & Cases")
MOUSE = ("Electronics", "Computers & Accessories", "Mice")
KEYBOARD = ("Electronics", "Computers & Accessories", "Keyboards")
PHONE = ("Cell Phones & Accessories", "Cases")


def _session(sid: str, paths: list, bundles=(), split: str = "train") -> Session:
    """Items {sid}-0, {sid}-1, ... with these category paths (None: no categories); bundles by index."""
    items = [Item(f"{sid}-{k}", f"item {k}", (p,) if p else ()) for k, p in enumerate(paths)]
    return Session(sid, items, [Bundle(tuple(items[k].id for k in b)) for b in bundles], split)


def test_category_partition_by_path_and_depth():
    s = _session("s", [CAMERA, MOUSE, LENS, None, KEYBOARD, PHONE])
    assert category_partition(s, "first", 1) == [[1, 3], [2, 5]]  # Camera & Photo; Computers & Accessories
    assert category_partition(s, "first", 2) == []  # no two share the third level
    # an item's deepest path, not its first: the phone case listed under Electronics too
    two = Item("x", "case", (PHONE, ("Electronics", "Camera & Photo", "Bags & Cases", "Camera Cases")))
    s2 = Session("s2", [Item("a", "camera", (CAMERA,)), two, Item("b", "case", (PHONE,))])
    assert category_partition(s2, "first", 1) == [[2, 3]]
    assert category_partition(s2, "longest", 1) == [[1, 2]]
    # names compared without case and surrounding space
    s3 = Session("s3", [Item("a", "", (("Electronics", " lenses"),)), Item("b", "", (("electronics", "Lenses"),))])
    assert category_partition(s3, "first", 1) == [[1, 2]]


def test_category_view_checks_what_it_is_given():
    assert not CategoryView() and CategoryView.from_dict(None) == CategoryView()
    view = CategoryView("longest", (1, 2))
    assert CategoryView.from_dict(view.to_dict()) == view and view.label == "longest path, depth 1+2"
    for bad in ({"path": "middle", "depths": [1]}, {"depths": [0]}, {"depths": [1, 1]}, {"depths": "1"}, [1]):
        with pytest.raises(BkdError, match="config"):
            CategoryView.from_dict(bad, "config")


def _catalogue(n: int, seed: int, noisy: bool = False) -> list[Session]:
    """Sessions of a camera, a lens, a mouse, a keyboard in shuffled order: bundled camera + lens and
    mouse + keyboard, as their categories are at depths 1 and 2. `noisy`: each item's category drawn
    at random instead."""
    rng = random.Random(seed)
    kinds = [(*CAMERA[:2], "Photo Gear", "Cameras"), (*LENS[:2], "Photo Gear", "Lenses"),
             (*MOUSE[:2], "Input", "Mice"), (*KEYBOARD[:2], "Input", "Keyboards")]  # fmt: skip
    out = []
    for i in range(n):
        order = rng.sample(range(4), 4)
        paths = [rng.choice(kinds) if noisy else kinds[k] for k in order]
        pos = {k: order.index(k) for k in range(4)}
        out.append(_session(f"t{i}", paths, [(pos[0], pos[1]), (pos[2], pos[3])]))
    return out


def test_category_baseline_tunes_the_depth_that_bundles_follow():
    model = CategoryGroups().fit(_catalogue(20, 0))
    assert model.describe() == {"name": "category", "path": "first", "depth": 1, "fallback": "none",
                                "train_strict_f1": 1.0}  # fmt: skip
    new = _session("n", [KEYBOARD, BAG, None, MOUSE, CAMERA])
    assert [b["items"] for b in model.predict(new)] == [["n-0", "n-3"], ["n-1", "n-4"]]
    assert CategoryGroups().fit(_catalogue(5, 1)).predict(_session("u", [None, None])) == []
    with pytest.raises(BkdError, match="call fit"):
        CategoryGroups().predict(new)


def test_the_view_is_chosen_where_categories_follow_the_bundles_and_left_out_where_they_are_noise():
    """Beside the whole session, one category partition only ties it (the choice rule keeps the first of
    equals); two depths that agree count twice and win, as the tuner finds by CV."""
    whole = [[[1, 2, 3, 4]]]  # the only other candidate: the whole session
    good = _catalogue(30, 2)
    view, report = tune_category_view(good, [whole] * len(good))
    assert view == CategoryView("first", (1, 2)) and report["winner"] == view.label
    assert report["chosen_cv_strict_f1"] == 1.0 and len(report["views"]) > 1
    # where the title cuts already find the bundles, categories at random only pull the choice away
    noise = _catalogue(30, 3, noisy=True)
    truth = [[sorted(s.item_ids().index(x) + 1 for x in b.items) for b in s.bundles] for s in noise]
    view, report = tune_category_view(noise, [[sorted(t), *whole] for t in truth])
    assert not view and report["winner"] == "none" and report["chosen_cv_strict_f1"] == 1.0
    assert min(v["cv_strict_f1"] for v in report["views"]) < 1.0  # some views would have hurt
    none = [replace(s, items=[replace(it, categories=()) for it in s.items]) for s in good]
    assert tune_category_view(none, [whole] * len(none))[0] == CategoryView()


def test_a_catalogue_without_categories_gives_todays_outputs_exactly(cli, tmp_path, sample_path):
    """The sample has no categories: the pack's manifest is what it was (no view), its candidates are
    the title cuts and the whole session alone, and `baseline:choice` picks what today's rule picks.
    A pack whose view was chosen on categories gives the same candidates to items without any."""
    sessions = load_sessions(sample_path)
    train = [s for s in sessions if s.split == "train"]
    r = cli("pack", "build", "--sessions", sample_path, "--k", "0", "--similar-items", "--no-calibrate",
            "--out", tmp_path / "p")  # fmt: skip
    assert r.exit_code == 0, r.output
    assert "category view: none (no item of the split has categories)" in r.output
    p = Pack(tmp_path / "p")
    assert "categories" not in p.manifest["config"] and not p.category_view
    assert p.manifest["format"] == "bkd-pack/1"  # what every bkd-edge reads
    for s in sessions:
        assert p.candidates(s) == hint_candidates(p._hint_levels(s), len(s.items))

    fitted = HintChoice(p.encode).fit(train)
    assert not fitted.view
    today = HintChoice(p.encode)
    today.clusters, today.params = fitted.clusters, fitted.params  # the same centre, no view ever tuned
    assert fitted.predict_all(sessions) == today.predict_all(sessions)

    p.category_view = CategoryView("first", (1, 2))  # a view chosen on another split that had them
    for s in sessions:
        assert p.candidates(s) == hint_candidates(p._hint_levels(s), len(s.items))


def test_category_partitions_join_the_choice_and_the_manifest_says_so(cli, tmp_path, sample_path):
    """Categories that follow the sample's bundles: the pack build picks a view by CV on train, writes it
    in the manifest, appends its partitions to the candidates, and the choice can pick one."""
    sessions = load_sessions(sample_path)
    labelled = []
    for s in sessions:  # an item's category: the bundle it is in (level 1), its own id below that
        bundle_of = {x: n for n, b in enumerate(s.bundles) for x in b.items}
        items = [replace(it, categories=(("Shop", f"b{bundle_of[it.id]}" if it.id in bundle_of else it.id, it.id),))
                 for it in s.items]  # fmt: skip
        labelled.append(replace(s, items=items))
    path = tmp_path / "labelled.jsonl"
    path.write_text("".join(json.dumps(s.to_dict()) + "\n" for s in labelled))
    r = cli("pack", "build", "--sessions", path, "--k", "0", "--similar-items", "--no-calibrate",
            "--out", tmp_path / "p")  # fmt: skip
    assert r.exit_code == 0, r.output
    p = Pack(tmp_path / "p")
    assert p.manifest["config"]["categories"] == {"path": "first", "depths": [1]}
    assert p.manifest["format"] == "bkd-pack/2"  # an older bkd-edge refuses it by name, not answering otherwise
    assert p.manifest["categories"]["winner"] == "first path, depth 1" and "<- chosen" in r.output
    disjoint = [
        s for s in labelled if len({x for b in s.bundles for x in b.items}) == sum(len(b.items) for b in s.bundles) > 0
    ]
    s = next(s for s in disjoint if s.split == "test")
    truth = sorted([sorted(s.item_ids().index(x) + 1 for x in b.items) for b in s.bundles])
    no_view = hint_candidates(p._hint_levels(s), len(s.items))
    assert p.candidates(s) == with_categories(no_view, p.category_view, s) == no_view + [truth]
    assert "category view" in cli("pack", "show", tmp_path / "p").output


def test_data_stats_shows_category_coverage(cli, tmp_path):
    path = tmp_path / "s.jsonl"
    rows = [_session("a", [CAMERA, None, (*LENS, "Zoom")], [(0, 2)], "train"), _session("b", [None, MOUSE], [(0, 1)])]
    path.write_text("".join(json.dumps(s.to_dict()) + "\n" for s in rows))
    result = json.loads(cli("data", "stats", path, "--json").output)
    assert result["all"]["items_with_categories"] == 3 and result["all"]["category_coverage"] == 0.6
    assert result["all"]["category_mean_depth"] == pytest.approx(10 / 3, abs=1e-3)
    assert "items with categories" in cli("data", "stats", path).output


def test_the_service_and_generate_json_take_categories():
    from bundlekd_edge.service.app import ApiError, parse_session

    body = {"items": [{"id": "a", "title": "Canon EOS", "categories": [list(CAMERA)]}, {"id": "b", "title": "Bag"}]}
    s = parse_session(body, "", "req-1", 200)
    assert [it.categories for it in s.items] == [(CAMERA,), ()]
    with pytest.raises(ApiError, match="categories"):
        parse_session({"items": [{"id": "a", "categories": "Cameras"}, {"id": "b"}]}, "", "req-2", 200)


def test_the_category_name_rule_names_a_bundle_by_the_deepest_category_most_of_its_items_carry():
    camera, lens = Item("a", "", (CAMERA,)), Item("b", "", (PHONE, LENS))
    assert category_name([camera, lens]) == "Camera & Photo"  # any of an item's paths; below the root
    assert category_name([Item("c", "", (LENS,)), lens]) == "Lenses"
    assert category_name([Item("c", "", (LENS,)), lens, camera]) == "Camera & Photo"  # all three carry it
    assert category_name([Item("c", "", (LENS,)), lens, Item("m", "", (MOUSE,))]) == "Lenses"  # two of three
    assert category_name([Item("x", ""), Item("y", "")]) == ""


def test_eval_intents_shows_the_category_name_rule_on_the_same_bundles(cli, tmp_path):
    gold = tmp_path / "gold.jsonl"
    s = _session("g", [CAMERA, LENS, MOUSE, KEYBOARD], [(0, 1), (2, 3)], "test")
    s.bundles = [replace(b, intent=i) for b, i in zip(s.bundles, ("Camera & Photo", "Desk setup"))]
    gold.write_text(json.dumps(s.to_dict()) + "\n")
    pred = tmp_path / "pred.jsonl"  # the model named the first bundle well and the second not at all
    bundles = [{"items": ["g-0", "g-1"], "intent": "Camera & Photo"}, {"items": ["g-2", "g-3"], "intent": ""}]
    pred.write_text(json.dumps({"session_id": "g", "valid": True, "bundles": bundles}) + "\n")
    r = cli("eval", "--gold", gold, "--pred", pred, "--intents", "--json")
    assert r.exit_code == 0, r.output
    scores = json.loads(r.output)
    assert scores["intent_pairs"] == 2 and scores["intent_exact"] == 0.5
    # the rule: "Camera & Photo" (exact) and "Computers & Accessories" for the desk bundle (near, not exact)
    assert scores["category_rule_intent_exact"] == 0.5
    assert scores["category_rule_intent_cosine"] > scores["intent_cosine"]
