"""A pack's calibration: which rule chooses the answer's partition, by cross-validation on train."""

import json

import numpy as np
import pytest

from bundlekd_edge.calibration import RULES, TIE, Evidence, cross_validate
from bundlekd_edge.data import Bundle, Item, Session
from bundlekd_edge.packs import Pack
from bundlekd_edge.runtime.choice import ChoiceRule, candidate_features

# Four items, truth "1 2 | 3 4". The hint's candidates: the truth, one coarse bundle, one pair.
TRUTH, COARSE, PAIR = "1 2 | 3 4", "1 2 3 4", "1 2"


def evidence(n: int, logprobs: list[float], counts: list[int], cluster: str, category: str = "") -> list[Evidence]:
    out = []
    for k in range(n):
        items = [Item(f"s{k}i{j}", f"title {j}") for j in range(1, 5)]
        gold = [Bundle((items[0].id, items[1].id), "a"), Bundle((items[2].id, items[3].id), "b")]
        s = Session(f"s{k}", items, gold, split="train")
        out.append(Evidence(s, [TRUTH, COARSE, PAIR], counts, logprobs, cluster, category))
    return out


@pytest.mark.parametrize(
    "case, logprobs, counts, cluster, winner",
    [
        # The cut counts favour the coarse line and so does the cluster; the student knows better
        # (already at its smallest weight, the simplest student rule).
        ("student knows", [0.0, -9.0, -9.0], [1, 3, 1], COARSE, "student T=5"),
        # The student is confidently wrong; the cluster's partition is the truth.
        ("cluster knows", [-9.0, 0.0, -9.0], [1, 3, 1], TRUTH, "cluster"),
        # The counts alone find the truth; the student pulls to the coarse line; the cluster is coarse.
        ("counts know", [-9.0, 0.0, -9.0], [3, 1, 1], COARSE, "choice"),
        # Everything gives the truth: a tie goes to the simplest rule.
        ("all agree", [0.0, -9.0, -9.0], [3, 1, 1], TRUTH, "cluster"),
    ],
)
def test_calibration_picks_the_known_best_rule(case, logprobs, counts, cluster, winner):
    report = cross_validate(evidence(10, logprobs, counts, cluster))
    assert report["winner"] == winner, case
    scores = {r["rule"]: r["cv_strict_f1"] for r in report["rules"]}
    without_categories = [r.label for r in RULES if r.name != "category"]  # no category line: no category rule
    assert list(scores) == without_categories and report["folds"] == 5 and report["sessions"] == 10
    assert scores[winner] == pytest.approx(1.0) == report["calibrated_cv_strict_f1"]
    simpler = list(scores)[: list(scores).index(winner)]
    assert all(scores[r] < scores[winner] - TIE for r in simpler)  # it had to beat every simpler rule


def test_the_category_rule_is_one_of_the_rules_where_the_catalogue_has_categories():
    # the counts, the student and the cluster favour the coarse line; the category partition is the truth
    report = cross_validate(evidence(10, [-9.0, 0.0, -9.0], [1, 3, 1], COARSE, category=TRUTH))
    scores = {r["rule"]: r["cv_strict_f1"] for r in report["rules"]}
    assert list(scores) == [r.label for r in RULES] and report["winner"] == "category"
    assert scores["category"] == pytest.approx(1.0) and scores["cluster"] < 1.0 - TIE


def test_every_rule_before_the_learned_ones_picks_as_choose_partition_does():
    """The runtime now asks the rule (`ChoiceRule.pick`, the session passed along): for the rules a pack
    could hold before, that is `choose_partition` exactly, with the student's scores only where used."""
    from bundlekd_edge.runtime.choice import choose_partition

    lines, counts, logprobs = [TRUTH, COARSE, PAIR], [1, 3, 1], [0.0, -9.0, -1.0]
    for rule in [ChoiceRule("choice"), *(ChoiceRule("student", t) for t in (5.0, 2.0, 1.0)), ChoiceRule()]:
        scores = logprobs if rule.uses_student else None
        assert rule.pick(lines, logprobs, counts) == choose_partition(lines, scores, counts, rule.temperature)
    assert (
        ChoiceRule("choice").pick(lines, logprobs, counts)
        == COARSE
        != ChoiceRule("student", 1.0).pick(lines, logprobs, counts)
    )


def test_a_choice_rule_outside_its_range_is_refused():
    with pytest.raises(ValueError, match="not one of"):
        ChoiceRule("oracle")
    with pytest.raises(ValueError, match=r"not in \[0.1, 100\]"):
        ChoiceRule("student", float("nan"))
    with pytest.raises(ValueError, match="needs 9 finite weights"):
        ChoiceRule("learned", weights=(1.0, 2.0))
    with pytest.raises(ValueError, match="takes no weights"):
        ChoiceRule("choice", weights=(1.0,) * 9)


def test_the_learned_rule_finds_the_candidate_only_the_categories_point_to():
    """The counts, the student and the cluster all favour the coarse line; the truth is the one line
    whose bundles are category-pure (the wrong pairing mixes them). Only the learned rule can see
    that, and cross-validation says so; fitted on all sessions its weight on purity is positive."""
    wrong = "1 3 | 2 4"
    out = []
    for k in range(10):
        items = [Item(f"s{k}i{j}", f"title {j}", ((("Shop", "Cameras"),) if j <= 2 else (("Shop", "Audio"),)))
                 for j in range(1, 5)]  # fmt: skip
        gold = [Bundle((items[0].id, items[1].id), "a"), Bundle((items[2].id, items[3].id), "b")]
        out.append(Evidence(Session(f"s{k}", items, gold, split="train"), [COARSE, TRUTH, wrong], [3, 1, 1],
                            [0.0, -9.0, -9.0], COARSE))  # fmt: skip
    report = cross_validate(out)
    scores = {r["rule"]: r["cv_strict_f1"] for r in report["rules"]}
    assert report["winner"] == "learned" and scores["learned"] == pytest.approx(1.0)
    assert max(scores[r] for r in scores if not r.startswith("learned")) < 0.6
    assert report["calibrated_cv_strict_f1"] == pytest.approx(1.0)
    assert report["weights"]["category_purity"] > 0
    rule = ChoiceRule("learned", weights=tuple(report["weights"].values()))
    assert rule.pick(out[0].lines, None, out[0].counts, out[0].session) == TRUTH
    # without the categories the same rule cannot tell the pure line from the mixed one
    blind = Session("b", [Item(it.id, it.title) for it in out[0].session.items])
    score = candidate_features(out[0].lines, out[0].counts, None, blind) @ np.asarray(rule.weights)
    assert score[1] == pytest.approx(score[2])


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory, sample_path):
    """`pack build` as a user with their own catalogue runs it (the student run over the sample's train split)."""
    from click.testing import CliRunner

    from bundlekd_edge.cli import main

    out = tmp_path_factory.mktemp("cal") / "pack"
    r = CliRunner().invoke(main, ["pack", "build", "--sessions", str(sample_path), "--k", "0", "--similar-items",
                                  "--out", str(out)], catch_exceptions=False)  # fmt: skip
    assert r.exit_code == 0, r.output
    return out, r.output


def test_pack_build_calibrates_the_choice_and_prints_every_rule(calibrated):
    out, printed = calibrated
    manifest = json.loads((out / "manifest.json").read_text())
    report, choice = manifest["calibration"], manifest["config"]["choice"]
    # the sample has no categories: every rule but `category` is offered
    assert [r["rule"] for r in report["rules"]] == [r.label for r in RULES if r.name != "category"]
    assert ChoiceRule(choice["rule"], choice["temperature"]).label == report["winner"]
    assert report["student"] == "smollm2-bundles" and report["student_s_per_100_sessions"] > 0
    for r in report["rules"]:
        assert f"{r['rule']:<14} {r['cv_strict_f1']:.4f}" in printed
    assert f"{report['winner']:<14}" in printed.split("<- chosen")[0].splitlines()[-1]
    assert Pack(out).choice.label == report["winner"]


def test_generate_says_which_rule_chose_and_a_cluster_pack_answers_the_cluster_partition(
    calibrated, cli, tmp_path, sample_path
):
    """Whatever rule a pack was calibrated to, the student names the bundles and the record says
    who chose the partition; under `cluster` the partition is the baseline's."""
    import shutil

    from bundlekd_edge.data import load_sessions

    pack = tmp_path / "cluster-pack"
    shutil.copytree(calibrated[0], pack)
    manifest = json.loads((pack / "manifest.json").read_text())
    manifest["config"]["choice"]["rule"] = "cluster"
    (pack / "manifest.json").write_text(json.dumps(manifest))
    out = tmp_path / "pred.jsonl"
    r = cli("generate", "--model", "default", "--pack", pack, "--sessions", sample_path, "--split", "test",
            "--limit", "3", "--out", out, "--quiet")  # fmt: skip
    assert r.exit_code == 0, r.output
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    p = Pack(pack)
    by_id = {s.session_id: s for s in load_sessions(sample_path, split="test")}
    for row in rows:
        s = by_id[row["session_id"]]
        assert row["chosen_by"] == "cluster" and row["valid"]
        ids = s.item_ids()
        expected = sorted(sorted(ids[n - 1] for n in g) for g in p.cluster_candidate(s))
        assert sorted(sorted(b["items"]) for b in row["bundles"]) == expected
        assert all(b["intent"] for b in row["bundles"])  # the student still names every bundle
