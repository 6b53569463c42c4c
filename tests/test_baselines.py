import pytest

from bundlekd_edge import BkdError
from bundlekd_edge.baselines import BASELINES, make_baseline
from bundlekd_edge.data import Bundle, Item, Session, load_sessions
from bundlekd_edge.metrics import evaluate


def _session(sid: str, titles: list[str], bundles=(), split: str = "train") -> Session:
    """Items are named {sid}-0, {sid}-1, ... in title order; bundles are given by index."""
    items = [Item(f"{sid}-{k}", t) for k, t in enumerate(titles)]
    return Session(sid, items, [Bundle(tuple(items[k].id for k in b)) for b in bundles], split)


def _items(bundles: list[dict]) -> list[list[str]]:
    assert all(b["intent"] == "" for b in bundles)
    return [b["items"] for b in bundles]


def test_whole_and_pairs_exact_outputs():
    s = _session("s", ["a", "b", "c", "d", "e"])
    assert _items(make_baseline("whole").fit([]).predict(s)) == [["s-0", "s-1", "s-2", "s-3", "s-4"]]
    assert _items(make_baseline("pairs").fit([]).predict(s)) == [["s-0", "s-1"], ["s-2", "s-3"]]  # odd last left out
    one = _session("one", ["a"])
    assert make_baseline("whole").predict(one) == [] and make_baseline("pairs").predict(one) == []


def test_unknown_baseline_names_the_known_ones():
    with pytest.raises(BkdError, match="unknown baseline 'lstm'.*whole, pairs, apriori, cluster"):
        make_baseline("lstm")


CAMERAS = ["Canon EOS Rebel T7 DSLR Camera", "Nikon D3500 DSLR Camera Body", "Sony Alpha a6000 Mirrorless Camera"]
CARDS = ["SanDisk Ultra 32GB SD Card", "Lexar 64GB SDXC Card Class 10", "Samsung EVO 128GB microSD Card"]
KEYBOARDS = ["Logitech K120 Wired Keyboard", "Microsoft Wired Keyboard 600", "Das Keyboard 4 Professional"]
MICE = ["Logitech M185 Wireless Mouse", "Razer DeathAdder Gaming Mouse", "Microsoft Basic Optical Mouse"]
OTHERS = ["AmazonBasics HDMI Cable 6 ft", "Bose SoundLink Mini Speaker", "JBL Tune 500 Headphones"]


def test_apriori_learns_type_rules_and_links_only_those():
    # Cameras always go with memory cards and keyboards with mice; cables, speakers, headphones never bundle.
    train = [
        _session(f"t{k}", [CAMERAS[k], KEYBOARDS[k], OTHERS[k], CARDS[k], MICE[k]], [(0, 3), (1, 4)]) for k in range(3)
    ]
    model = make_baseline("apriori").fit(train)
    info = model.describe()
    assert info["train_strict_f1"] == 1.0 and info["fallback"] == "none"
    assert "camera + memory card (1.00)" in info["top_pairs"] and "keyboard + mouse (1.00)" in info["top_pairs"]

    new = _session("n", ["Fujifilm X-T30 Camera", "Anker USB-C Cable", "Kingston 16GB SD Card", "Corsair K55 Keyboard"])
    assert _items(model.predict(new)) == [["n-0", "n-2"]]  # the keyboard and the cable stay out
    unrelated = _session("u", ["Fujifilm X-T30 Camera", "Corsair K55 Keyboard", "Anker USB-C Cable"])
    assert model.predict(unrelated) == []
    assert make_baseline("apriori").fit(train).describe() == info  # deterministic


def test_apriori_and_cluster_need_training_sessions():
    for name in ("apriori", "cluster"):
        with pytest.raises(BkdError, match="call fit"):
            make_baseline(name).predict(_session("s", ["a", "b"]))
        with pytest.raises(BkdError, match="no training sessions"):
            make_baseline(name).fit([])


def test_cluster_groups_near_duplicate_titles_apart():
    cases = [
        "Spigen Tough Armor Case for iPhone 13, Black",
        "OtterBox Defender Series Case for iPhone 13",
        "Spigen Liquid Air Case for Samsung Galaxy S21",
        "OtterBox Commuter Case for Samsung Galaxy S21",
    ]
    chargers = [
        "65W USB-C Laptop Charger for Dell XPS 13 Power Adapter",
        "90W AC Adapter Laptop Charger for HP Pavilion",
        "45W Laptop Charger for Lenovo ThinkPad Power Supply Cord",
        "65W Laptop Charger AC Adapter for Asus Zenbook",
    ]
    train = [_session("t0", [cases[0], chargers[0], cases[1], chargers[1]], [(0, 2), (1, 3)])]
    model = make_baseline("cluster").fit(train)
    assert model.describe()["train_strict_f1"] == 1.0
    new = _session("n", [chargers[2], cases[2], chargers[3], cases[3]])  # unseen titles, interleaved
    assert _items(model.predict(new)) == [["n-0", "n-2"], ["n-1", "n-3"]]


def test_every_baseline_predicts_disjoint_in_session_bundles(sample_path):
    sessions = load_sessions(sample_path)
    train = [s for s in sessions if s.split == "train"]
    for name in BASELINES:
        model = make_baseline(name).fit(train)
        assert model.name == name and model.describe()["name"] == name
        for s in sessions:
            order = s.item_ids()
            seen: set[str] = set()
            for items in _items(model.predict(s)):
                assert len(items) >= 2 and set(items) <= set(order), (name, s.session_id, items)
                assert items == sorted(items, key=order.index)  # session order
                assert not seen & set(items)  # each baseline partitions the session
                seen |= set(items)
        scores = evaluate(sessions, model.predict_all(sessions))
        assert scores["hallucination_rate"] == 0.0 and scores["missing_predictions"] == 0
