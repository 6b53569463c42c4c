import pytest

from bundlekd_edge import BkdError
from bundlekd_edge.data import Bundle, Item, Session
from bundlekd_edge.metrics import Prediction, evaluate, load_predictions
from tests.conftest import write_lines


def make(sid, n, *gold):
    items = [Item(f"{sid}-{k}", f"t{k}") for k in range(1, n + 1)]
    return Session(sid, items, [Bundle(tuple(f"{sid}-{k}" for k in b)) for b in gold])


def pred(sid, *bundles, valid=True):
    return Prediction(sid, [[f"{sid}-{k}" for k in b] for b in bundles], valid)


def score(gold, *preds):
    return evaluate(gold, {p.session_id: p for p in preds})


def test_subset_hit_counts_for_paper_metrics_but_strict_scores_the_overlap():
    gold = [make("a", 6, (1, 2, 3, 4))]
    r = score(gold, pred("a", (1, 2)))
    assert r["precision"] == 1.0 and r["recall"] == 1.0
    assert r["coverage"] == pytest.approx(0.5)  # |p| / |g| = 2 / 4
    assert r["strict_precision"] == pytest.approx(0.5)  # Jaccard({1,2}, {1,2,3,4})
    assert r["strict_recall"] == pytest.approx(0.5)
    assert r["exact_match"] == 0.0


def test_non_hit_scores_zero_on_paper_metrics():
    gold = [make("a", 6, (1, 2, 3))]
    r = score(gold, pred("a", (3, 4)))  # 4 is outside the ground-truth bundle
    assert r["precision"] == 0.0 and r["recall"] == 0.0 and r["coverage"] == 0.0
    assert r["strict_precision"] == pytest.approx(1 / 4)  # |{3}| / |{1,2,3,4}|


def test_several_hits_on_one_ground_truth_bundle_each_count_but_strict_matches_one():
    gold = [make("a", 6, (1, 2, 3, 4), (5, 6))]
    r = score(gold, pred("a", (1, 2), (3, 4)))
    # Paper: both predictions hit bundle 1 (precision 2 / 2); recall counts bundle 1 found once: 1 / 2.
    assert r["precision"] == 1.0 and r["recall"] == 0.5
    # Strict: only one of them may match {1,2,3,4}; the other matches {5,6} with Jaccard 0.
    assert r["strict_precision"] == pytest.approx(0.5 / 2)
    assert r["strict_recall"] == pytest.approx(0.5 / 2)


def test_exact_match_and_one_to_one_matching_maximises_summed_jaccard():
    gold = [make("a", 6, (1, 2, 3), (4, 5))]
    r = score(gold, pred("a", (4, 5), (1, 2, 3)))
    assert r["exact_match"] == 1.0 and r["strict_f1"] == pytest.approx(1.0)
    # Greedy matching would pair {1,2,3,4} with {1,2,3} and leave {4,5}'s best partner taken.
    r = score(gold, pred("a", (1, 2, 3, 4), (4, 5)))
    assert r["strict_precision"] == pytest.approx((3 / 4 + 1) / 2)


def test_empty_prediction_and_missing_session_count_as_zero():
    gold = [make("a", 4, (1, 2)), make("b", 4, (1, 2))]
    r = score(gold, pred("a"))  # "a" empty, "b" missing
    assert r["empty_rate"] == 1.0
    assert r["strict_f1"] == 0.0 and r["precision"] == 0.0
    assert r["missing_predictions"] == 1
    assert r["valid_rate"] == 0.5  # a missing prediction is not a valid answer


def test_singleton_bundles_are_dropped():
    gold = [make("a", 4, (1, 2))]
    r = score(gold, pred("a", (1,), (1, 2)))
    assert r["precision"] == 1.0  # the singleton is not a predicted bundle
    assert r["exact_match"] == 1.0
    r = score(gold, pred("a", (1,)))
    assert r["empty_rate"] == 1.0


def test_hallucinated_items_are_counted_and_never_hit():
    gold = [make("a", 3, (1, 2))]
    r = evaluate(gold, {"a": Prediction("a", [["a-1", "a-2", "ghost"]])})
    assert r["hallucination_rate"] == pytest.approx(1 / 3)
    assert r["precision"] == 0.0


def test_unknown_session_id_is_an_error():
    gold = [make("a", 3, (1, 2))]
    with pytest.raises(BkdError, match="not in the gold file.*'zzz'"):
        score(gold, pred("zzz", (1, 2)))


def test_averages_are_over_sessions():
    gold = [make("a", 4, (1, 2)), make("b", 4, (1, 2))]
    r = score(gold, pred("a", (1, 2)), pred("b", (3, 4)))
    assert r["precision"] == 0.5 and r["exact_match"] == 0.5 and r["sessions"] == 2


def test_load_predictions_errors_name_line(tmp_path):
    path = write_lines(tmp_path / "p.jsonl", [{"session_id": "a", "bundles": []}, {"session_id": "a", "bundles": []}])
    with pytest.raises(BkdError, match=r"p.jsonl:2: duplicate prediction"):
        load_predictions(path)
    path = write_lines(tmp_path / "q.jsonl", [{"session_id": "a", "bundles": [{"items": "x"}]}])
    with pytest.raises(BkdError, match=r"q.jsonl:1: bundles\[0\]"):
        load_predictions(path)


def test_a_repeated_bundle_counts_once():
    gold = [make("a", 6, (1, 2), (3, 4))]
    r = score(gold, pred("a", (1, 2), (2, 1), (1, 2)))
    assert r["recall"] == 0.5 and r["precision"] == 1.0 and r["strict_recall"] == 0.5


@pytest.mark.parametrize(
    "row, message",
    [
        ({"session_id": "a", "bundles": [], "valid": "false"}, r"p.jsonl:1: field 'valid' must be true or false"),
        ({"session_id": None, "bundles": []}, r"p.jsonl:1: field 'session_id' must be a string or an integer"),
        ({"session_id": 1.5, "bundles": []}, r"p.jsonl:1: field 'session_id' must be"),
        ({"session_id": "a", "bundles": [{"items": [None, "x"]}]}, r"p.jsonl:1: bundles\[0\].items: item ids must be"),
        ({"session_id": "a", "bundles": [], "skipped": True}, r"p.jsonl:1: field 'skipped' must be a string"),
    ],
)
def test_prediction_fields_have_their_types(tmp_path, row, message):
    with pytest.raises(BkdError, match=message):
        load_predictions(write_lines(tmp_path / "p.jsonl", [row]))
