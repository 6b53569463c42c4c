"""Study: does the local teacher (Qwen2.5-Coder-1.5B) rank a pack's hint candidates better than the choice rule?

Every session's candidates are the shipped pack's (`Pack.candidates`: the similar-items hint at its
three cuts and the whole session). Each ranker scores every candidate first line by its own
log-probability after its prompt (`Engine.candidate_logprobs`: a prefill and one batch per line,
nothing decoded), and the runtime's rule picks the line of highest expected strict F1
(`choose_partition`, T=2 as the runtime uses; T is also cross-validated, below):

    rule      the choice rule alone: cut counts, no model
    student   the shipped student (its adapter over the base) with its own prompt and pack
    zero      the teacher zero-shot: the task and compact-answer contract in its system message, the hint
    few       the same, after the --shots nearest train sessions (MiniLM over titles, as `Pack.nearest`)
              with their compact answers

`--student-adapter` scores another student adapter in the `student` row instead of the shipped one
(a GGUF adapter over the default base, or a training run folder: its adapter/ is written as GGUF
first), e.g. the shipped student trained on to rank (`train/cpu-smollm2-rank.toml`); its log is
OUT/SPLIT-student-NAME.jsonl. Beside strict F1, each model row has `rank_nll`: the mean of
-log p(the candidate closest to the truth) under the runtime's weighing (T=2, cut counts), over the
sessions with candidates that differ in strict F1 (what `train/model.rank_loss` minimises).

Each mode's per-session log-probabilities go to OUT/SPLIT-MODE.jsonl as they are made
(`files.RecordLog`), so a killed run continues where it stopped; rerunning only re-scores.

    python scripts/study_teacher_ranking.py --sessions S.jsonl --split val [--limit N] [--modes zero few]
    python scripts/study_teacher_ranking.py --sessions S.jsonl --split train --limit 150 --modes zero few

On the train split (`--limit` sessions spread evenly over it) the retrieved examples never include
the session itself, and the student is left out (it was trained on those answers). Every run
prints strict F1 / exact per row at T=2, and a K-fold CV (`--folds`) in which each fold's T (or
the rule alone) is picked on the other folds among `TEMPERATURES` and scored on the held-out one.

Measured on Electronic val, 3 Dec 2026, on 2 cores saturated by other work (load 13-24, this run at
nice 10, one thread: llama.cpp's two threads spin-waited, 89 CPU-s for one ~900-token prompt against
~50 with one): only the first 15 sessions of the seeded order (11 with several candidates) were
scored few-shot in 70 min. Strict F1 / exact on those 15: rule 0.629 / 0.389, student 0.639 / 0.367,
teacher few-shot 0.605 / 0.367 (paired 95% CI of few-shot minus rule [-0.089, +0.037]); a perfect
ranker of the same candidates 0.765 / 0.456. Cost per session asked: teacher few-shot ~49 CPU-s
(~830 prompt tokens), student ~3.7 CPU-s (~260). All 90 sessions, no model: rule 0.658 / 0.402,
perfect ranker 0.759 / 0.483. Continue with the same command: finished sessions are kept.

All 90 val sessions, 4 Dec 2026, idle cores (77 with several candidates; strict F1 / exact, rank_nll):
rule 0.658 / 0.402, 1.06; student 0.666 / 0.407, 1.12 (1.3 s a session); teacher zero-shot 0.622 /
0.370, 1.87 (8.8 s); few-shot 0.631 / 0.391, 1.47 (22 s, 32 CPU-s; paired 95% CI of few-shot minus
rule [-0.057, +0.006]); best candidate 0.759 / 0.483. 5-fold CV picks the rule alone for the teacher in
4 of 5 folds (zero 0.641, few 0.642 against the rule's 0.656). The teacher ranks below the cut counts,
so its probabilities are not distilled as soft targets.

The shipped student trained on to rank (`train/cpu-smollm2-rank.toml`, 120 steps, `--student-adapter
runs/rank`), same 90 sessions: 0.667 / 0.407, rank_nll 1.10 (the shipped one's 0.666 / 0.407, 1.12);
5-fold CV over T 0.670 (the shipped one's 0.665, the rule's 0.656): no gain beyond val's noise.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

from bundlekd_edge.data import load_sessions
from bundlekd_edge.files import RecordLog
from bundlekd_edge.metrics import Prediction, bootstrap_strict_f1, evaluate, session_strict_f1, strict_by_session
from bundlekd_edge.packs import Pack, example_text, query_text
from bundlekd_edge.prompts import PromptConfig, candidate_lines, render_answer, session_text
from bundlekd_edge.runtime.adapters import AdapterSpec
from bundlekd_edge.runtime.choice import CHOICE_TEMPERATURE, choose_partition

PACK = "bundlekd_edge/students/smollm2-bundles/pack"
TEACHER_PROMPT = PromptConfig(answer_format="compact", instructions=True, title_chars=60)  # the student's titles
TEMPERATURES = (0.5, 1.0, 2.0, 3.0, 5.0)
MODES = ("student", "zero", "few")


class FewShot:
    """The `shots` train sessions nearest a session (cosine of MiniLM title embeddings), as prompt text."""

    def __init__(self, pack: Pack, train: list, shots: int):
        self.pack, self.train, self.shots = pack, train, shots
        self.index = pack.encode([query_text(s) for s in train])

    def text(self, session) -> str:
        order = np.argsort(-(self.index @ self.pack.encode([query_text(session)])[0]), kind="stable")
        near = [self.train[i] for i in order if self.train[i].session_id != session.session_id][: self.shots]
        rows = [{"session_text": session_text(s, TEACHER_PROMPT), "answer": render_answer(s, TEACHER_PROMPT)}
                for s in near]  # fmt: skip
        return "Similar past sessions and their bundles:\n\n" + "\n\n".join(example_text(r) for r in rows)


def score(modes, sessions, pack, args) -> dict[str, dict[str, dict]]:
    """{mode: {session_id: record}}, resuming OUT/SPLIT-MODE.jsonl. The teacher's modes share one
    loaded model and go session by session, so a run stopped early has both on the same sessions."""
    from bundlekd_edge.runtime import Engine, EngineConfig
    from bundlekd_edge.runtime.batch import session_inputs
    from bundlekd_edge.student import resolve_student

    logs = {}
    for mode in modes:
        settings = {"mode": mode, "sessions": str(args.sessions), "split": args.split, "pack": PACK,
                    "teacher": args.teacher, "shots": args.shots if mode == "few" else 0}  # fmt: skip
        if mode == "student":
            settings["adapter"] = str(args.student_adapter or "shipped")
        logs[mode] = RecordLog(log_path(args, mode), settings, resume=True)
    few = FewShot(pack, load_sessions(args.sessions, "train"), args.shots) if "few" in modes else None
    rankers = {"student": [m for m in modes if m == "student"], "teacher": [m for m in modes if m != "student"]}
    for ranker, ranker_modes in rankers.items():
        todo = [s for s in sessions if any(s.session_id not in logs[m].done for m in ranker_modes)]
        if not todo:
            continue
        if ranker == "student":
            student = resolve_student("default:adapter", pack="none")
            if args.student_adapter:
                student.adapters = (AdapterSpec(student_gguf(args.student_adapter), 1.0),)
            engine = student.load_engine(n_ctx=pack.n_ctx(), threads=args.threads)
        else:
            engine = Engine(args.teacher, EngineConfig(n_ctx=4096, n_threads=args.threads, prompt=TEACHER_PROMPT))
        for s in tqdm(todo, desc=ranker, unit="session", dynamic_ncols=True):
            lines, counts = candidate_lines(pack.candidates(s))
            for mode in ranker_modes:
                if s.session_id in logs[mode].done:
                    continue
                if mode == "student":
                    parts = session_inputs(engine, s, pack)
                    knowledge, examples = parts["knowledge"], parts["examples"]
                else:
                    hint = pack.similar_items_text(s)
                    shots = few.text(s) if mode == "few" else ""
                    knowledge, examples = "", "\n\n".join(t for t in (shots, hint) if t)
                t0, c0 = time.perf_counter(), time.process_time()
                # One distinct candidate: nothing to rank (as calibration does), so the model is not asked.
                logprobs = engine.candidate_logprobs(s, lines, knowledge, examples) if len(lines) > 1 else [0.0]
                seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
                n_prompt = len(engine.prompt_tokens(s, knowledge, examples))
                logs[mode].append({"session_id": s.session_id, "lines": lines, "counts": counts, "logprobs": logprobs,
                                   "seconds": round(seconds, 3), "cpu_s": round(cpu, 3),
                                   "prompt_tokens": n_prompt})  # fmt: skip
    for log in logs.values():
        log.close(complete=True)
    return {mode: read_records(log.path) for mode, log in logs.items()}


def log_path(args, mode: str) -> Path:
    tag = f"-{Path(args.student_adapter).stem}" if mode == "student" and args.student_adapter else ""
    return args.out / f"{args.split}-{mode}{tag}.jsonl"


def student_gguf(adapter: Path) -> Path:
    """A GGUF adapter as given, or a training run's adapter/ written as one (RUN/adapter.gguf)."""
    if not adapter.is_dir():
        return adapter
    from bundlekd_edge.export.lora_gguf import write_lora_gguf
    from bundlekd_edge.runtime import default_model_path

    out = adapter / "adapter.gguf"
    if not out.exists():
        write_lora_gguf(default_model_path(), adapter / "adapter", out)
    return out


def rank_nll(sessions, records: dict, model: bool = True) -> float | None:
    """Mean -log p(the candidate of highest strict F1) at the runtime's weighing, over the sessions
    whose candidates differ in strict F1 (`model=False`: the cut counts alone, the rule's)."""
    losses = []
    for s in sessions:
        r = records[s.session_id]
        gold = [frozenset(b.items) for b in s.bundles]
        parts = [[frozenset(g) for g in bundles_of(s, line) if len(g) >= 2] for line in r["lines"]]
        f1 = [session_strict_f1(part, gold) for part in parts]
        if len(set(f1)) < 2:
            continue
        z = (np.asarray(r["logprobs"]) / CHOICE_TEMPERATURE if model else 0.0) + np.log(r["counts"])
        losses.append(-(z[int(np.argmax(f1))] - np.logaddexp.reduce(z)))
    return round(float(np.mean(losses)), 4) if losses else None


def read_records(path: Path) -> dict[str, dict]:
    """{session_id: record} of a mode's log; a line still being written by a running scorer is left out."""
    records = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            records[json.loads(line)["session_id"]] = json.loads(line)
        except ValueError:
            pass
    return records


def bundles_of(session, line: str) -> list[list[str]]:
    """A compact first line's groups of item numbers, as the session's item ids."""
    ids = session.item_ids()
    return [[ids[int(n) - 1] for n in g.split()] for g in line.split(" | ")]


def predictions(sessions, records: dict, temperature: float | None) -> dict[str, Prediction]:
    """The chosen line per session: with the records' log-probabilities at `temperature`, or the rule alone (None)."""
    preds = {}
    for s in sessions:
        r = records[s.session_id]
        lp = None if temperature is None else r["logprobs"]
        line = choose_partition(r["lines"], lp, r["counts"], temperature or CHOICE_TEMPERATURE)
        preds[s.session_id] = Prediction(s.session_id, bundles_of(s, line))
    return preds


def best_candidate(sessions, records: dict) -> dict[str, Prediction]:
    """Each session's candidate of the highest strict F1 against its gold bundles: the ceiling of any ranker."""
    preds = {}
    for s in sessions:
        gold = [frozenset(b.items) for b in s.bundles]
        options = [bundles_of(s, line) for line in records[s.session_id]["lines"]]
        best = max(options, key=lambda o: session_strict_f1([frozenset(g) for g in o if len(g) >= 2], gold))
        preds[s.session_id] = Prediction(s.session_id, best)
    return preds


def cross_validate(sessions, records: dict, folds: int) -> dict:
    """Strict F1 of picking T (None: the rule alone) on the other folds, scored on each held-out fold."""
    order = list(range(len(sessions)))
    random.Random(0).shuffle(order)
    parts = [[sessions[i] for i in order[f::folds]] for f in range(min(folds, len(sessions)))]
    choices = (None, *TEMPERATURES)
    held_scores, picked = [], []
    for f, held in enumerate(parts):
        rest = [s for g, p in enumerate(parts) if g != f for s in p]
        best = max(choices, key=lambda t: evaluate(rest, predictions(rest, records, t))["strict_f1"])
        picked.append("rule" if best is None else best)
        held_scores.append(evaluate(held, predictions(held, records, best))["strict_f1"])
    per_t = {("rule" if t is None else f"T={t:g}"): round(float(np.mean(
        [evaluate(p, predictions(p, records, t))["strict_f1"] for p in parts])), 4) for t in choices}  # fmt: skip
    return {"cv_strict_f1": round(float(np.mean(held_scores)), 4), "fold_sd": round(float(np.std(held_scores)), 4),
            "picked": picked, "per_choice_mean_of_folds": per_t}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sessions", required=True)
    ap.add_argument("--split", default="val")
    ap.add_argument("--limit", type=int, default=0, help="the first N of the split in a seeded random order (0: all)")
    ap.add_argument("--score-only", action="store_true", help="score and exit (no table)")
    ap.add_argument("--report-only", action="store_true", help="no scoring: the table over the sessions scored so far")
    ap.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    ap.add_argument("--teacher", default="qwen1.5b", help="what `--model` takes: the local teacher's name or a .gguf")
    ap.add_argument("--shots", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--out", type=Path, default=Path("runs/teacher-ranking"))
    ap.add_argument("--student-adapter", type=Path, help="the student row's adapter: a GGUF, or a training run folder")
    args = ap.parse_args()
    modes = [m for m in args.modes if not (m == "student" and args.split == "train")]
    pack = Pack(PACK)
    sessions = [s for s in load_sessions(args.sessions, args.split) if len(s.items) >= 2]
    random.Random(0).shuffle(sessions)  # a run stopped early has scored a random subsample
    sessions = sessions[: args.limit or None]
    if args.report_only:
        records = {m: read_records(log_path(args, m)) for m in modes}
    else:
        records = score(modes, sessions, pack, args)
    if args.score_only:
        return
    done = set.intersection(*(set(r) for r in records.values())) if records else set()
    sessions = [s for s in sessions if s.session_id in done]  # a run stopped early: the sessions every mode has
    any_mode = next(iter(records.values()), None) or {
        s.session_id: dict(zip(("lines", "counts"), candidate_lines(pack.candidates(s)))) for s in sessions
    }
    preds = {"rule": predictions(sessions, any_mode, None)}
    preds |= {m: predictions(sessions, r, CHOICE_TEMPERATURE) for m, r in records.items()}
    preds["best candidate"] = best_candidate(sessions, any_mode)  # what a perfect ranker would score
    rows = {m: evaluate(sessions, p) for m, p in preds.items()}
    per_session = {m: strict_by_session(sessions, p) for m, p in preds.items()}

    def cost(m: str) -> dict:
        """Seconds a session: mean over all (one candidate: the model is not asked), p50 of those asked."""
        if m not in records:
            return {}
        timed = [records[m][s.session_id] for s in sessions]
        asked = [r["seconds"] for r in timed if len(r["lines"]) > 1]
        return {"s_per_session_mean": round(float(np.mean([r["seconds"] for r in timed])), 2),
                "s_p50_asked": round(float(np.median(asked)), 2) if asked else 0.0,
                "cpu_s_per_session_mean": round(float(np.mean([r.get("cpu_s", 0.0) for r in timed])), 2)}  # fmt: skip

    def nll(m: str) -> float | None:
        return rank_nll(sessions, records.get(m, any_mode), m in records)

    table = {
        m: {"strict_f1": round(v["strict_f1"], 4), "exact": round(v["exact_match"], 4), **cost(m),
            **({} if m == "best candidate" else {"rank_nll": nll(m)}),
            "minus_rule_95ci": [round(x, 4) for x in bootstrap_strict_f1(per_session[m], per_session["rule"])]}
        for m, v in rows.items()
    }  # fmt: skip
    asked = sum(len(any_mode[s.session_id]["lines"]) > 1 for s in sessions)
    out = {
        "sessions": len(sessions), "with_several_candidates": asked, "split": args.split,
        "temperature": CHOICE_TEMPERATURE, "rows": table,
        "cv": {m: cross_validate(sessions, r, args.folds) for m, r in records.items()},
    }  # fmt: skip
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
