"""Load and fault bench of `bkd-edge serve` against `bkd-edge generate`, on loopback only.

    python scripts/bench_serve.py --sessions S.jsonl --split test [--levels 1,2,4,8,16] [--level-limit 48]
        [--parallel 8] [--queue 32] [--soak-s 600] [--max-s 3600] [--out bench-serve]

1. `generate --model default` on the split, in a process of its own: the reference answers and the
   sequential sessions/min and per-session latency (the hint included). It runs again after the
   server is gone; the faster of the two runs is the timing reference.
2. One `bkd-edge serve --model default` on a free 127.0.0.1 port. Answers: every session at
   concurrency 1 (partitions equal to the reference's, share of sessions) and at concurrency 8
   (strict F1 of both against the gold bundles). Throughput and client-side latency p50 / p99 at
   each level (the first --level-limit sessions; levels 1 and 8 reuse the full runs).
3. A soak at concurrency 8 for --soak-s seconds: errors, and the server's RSS after warm-up and after.
4. Faults, each followed by a health check and one good request: clients that disconnect mid-request,
   a burst of 200 requests at once (429s, no 5xx), every bad-input class, requests past --timeout
   (on a second, small server), and SIGTERM with 8 requests in flight (all answered, exit 0).

Bounded: every request times out, the whole run stops at --max-s, servers are killed on exit.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from bundlekd_edge.data import load_sessions
from bundlekd_edge.files import write_json
from bundlekd_edge.metrics import Prediction, evaluate
from bundlekd_edge.tables import table

BKD = str(Path(sys.executable).parent / "bkd-edge")
DEADLINE = [0.0]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


MODEL = ["default", "0"]  # --model, --threads


class Server:
    def __init__(self, *args: str, log: Path):
        self.port = free_port()
        self.log = open(log, "wb")
        cmd = [BKD, "serve", "--model", MODEL[0], "--threads", MODEL[1], "--host", "127.0.0.1",
               "--port", str(self.port), *args]  # fmt: skip
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and self.proc.poll() is None:
            try:
                if call(self.port, "GET", "/healthz", timeout=2)[0] == 200:
                    return
            except OSError:
                time.sleep(0.3)
        self.kill()
        raise SystemExit(f"bkd-edge serve did not become healthy (log: {log})")

    def rss(self) -> int:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        return 0

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)  # its own session: only what this script started
            self.proc.wait(timeout=10)


def call(port: int, method: str, path: str, body=None, timeout: float = 300.0):
    """(status, decoded JSON or text, seconds)."""
    t0 = time.perf_counter()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        data = body if isinstance(body, (bytes, type(None))) else json.dumps(body).encode()
        conn.request(method, path, data, {"Content-Type": "application/json"})
        r = conn.getresponse()
        raw = r.read()
    finally:
        conn.close()
    try:
        return r.status, json.loads(raw), time.perf_counter() - t0
    except ValueError:
        return r.status, raw.decode(errors="replace"), time.perf_counter() - t0


def body(session) -> dict:
    return {"session_id": session.session_id, "items": [{"id": i.id, "title": i.title} for i in session.items]}


def run_level(port: int, sessions, concurrency: int) -> dict:
    """Every session through the server, `concurrency` requests at a time: records, latencies, wall."""

    def one(s):
        if time.monotonic() > DEADLINE[0]:
            return 0, None, 0.0
        try:
            return call(port, "POST", "/v1/bundles", body(s))
        except OSError as e:
            return -1, str(e), 0.0

    t0 = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        results = list(pool.map(one, sessions))
    wall = time.perf_counter() - t0
    ok = [(s, r) for s, r in zip(sessions, results) if r[0] == 200]
    lat = [r[2] for _, r in ok]
    return {
        "concurrency": concurrency,
        "sessions": len(sessions),
        "ok": len(ok),
        "errors": len(sessions) - len(ok),
        "wall_s": wall,
        "sessions_per_min": 60 * len(ok) / wall if wall else 0.0,
        "p50_s": float(np.percentile(lat, 50)) if lat else None,
        "p99_s": float(np.percentile(lat, 99)) if lat else None,
        "records": {s.session_id: r[1] for s, r in ok},
    }


def level_sessions(gold, concurrency: int, level_limit: int) -> list:
    """The sessions a level runs: all at 1 and 8 (the answers are compared there), else the first few."""
    return gold if concurrency in (1, 8) else gold[:level_limit]


def run_generate(args, gold, name: str) -> dict:
    """`generate --model MODEL` over the sessions in a process of its own: its records by session id."""
    out = args.out / f"{name}.jsonl"
    with tempfile.NamedTemporaryFile("w", suffix=".jsonl") as f:
        for s in gold:
            f.write(json.dumps(s.to_dict()) + "\n")
        f.flush()
        subprocess.run([BKD, "generate", "--model", args.model, "--threads", args.threads, "--sessions", f.name,
                        "--out", str(out), "--force", "--quiet"], check=True, timeout=args.max_s)  # fmt: skip
    return {r["session_id"]: r for r in map(json.loads, out.read_text().splitlines()) if "session_id" in r}


def latency_p50(ref: dict) -> float:
    return float(np.percentile([r["timing"]["total_s"] for r in ref.values() if not r.get("skipped")], 50))


def generate_summary(ref: dict, gold) -> dict:
    timings = [r["timing"] for r in ref.values() if not r.get("skipped")]
    # what does not batch across sessions: the hint (prepare_s), the prompt and the candidate scoring
    serial = sum(t["prefill_s"] + t["choose_s"] + t.get("prepare_s", 0.0) for t in timings)
    return {
        "sessions_per_min": generate_rate(ref, gold),  # over the summed latency, as each level's share is
        "latency_p50_s": latency_p50(ref),
        "latency_p99_s": float(np.percentile([t["total_s"] for t in timings], 99)),
        "prefill_share": serial / sum(t["total_s"] for t in timings),
    }


def generate_rate(ref: dict, sessions) -> float:
    """Sequential `generate`'s sessions/min on these sessions: 60 x n over their summed latency."""
    seconds = sum(ref[s.session_id]["timing"]["total_s"] for s in sessions if s.session_id in ref)
    return 60 * len(sessions) / seconds if seconds else 0.0


def partition(record: dict) -> frozenset:
    return frozenset(frozenset(b["items"]) for b in record["bundles"])


def strict_f1(gold, records: dict) -> float:
    preds = {sid: Prediction(sid, [b["items"] for b in r["bundles"]], r["valid"]) for sid, r in records.items()}
    return evaluate(gold, preds)["strict_f1"]


def healthy(port: int) -> bool:
    try:
        return call(port, "GET", "/healthz", timeout=10)[0] == 200
    except OSError:
        return False


def metrics(port: int) -> dict:
    text = call(port, "GET", "/metrics", timeout=10)[1]
    return {k: float(v) for k, v in (line.rsplit(" ", 1) for line in text.splitlines() if line[:1] != "#")}


def disconnects(port: int, session, n: int = 8) -> dict:
    """n clients send a request and hang up before the answer; the server must free their sequences."""
    for _ in range(n):
        s = socket.create_connection(("127.0.0.1", port))
        data = json.dumps(body(session)).encode()
        s.sendall(b"POST /v1/bundles HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  + f"Content-Length: {len(data)}\r\n\r\n".encode() + data)  # fmt: skip
        time.sleep(0.05)
        s.close()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        m = metrics(port)
        if m["bkd_sessions_in_flight"] == 0 and m["bkd_queue_depth"] == 0:
            break
        time.sleep(0.1)
    m = metrics(port)
    freed = m["bkd_sessions_in_flight"] == 0 and m["bkd_queue_depth"] == 0
    return {"fault": f"{n} clients disconnect mid-request", "ok": freed, "detail": f"sequences freed: {freed}"}


def burst(port: int, session, n: int = 200) -> dict:
    statuses = []
    barrier = threading.Barrier(n)

    def one():
        barrier.wait()
        try:
            statuses.append(call(port, "POST", "/v1/bundles", body(session), timeout=600)[0])
        except OSError:
            statuses.append(-1)

    threads = [threading.Thread(target=one) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    counts = {str(k): statuses.count(k) for k in sorted(set(statuses))}
    ok = all(s in (200, 429) for s in statuses) and 429 in statuses
    return {"fault": f"burst of {n} requests at once", "ok": ok, "detail": f"statuses {counts}"}


BAD = [
    (b"{not json", 400), ({"items": [{"id": "a", "title": "x"}]}, 422), ({"items": [{"id": "a"}, {"title": "t"}]}, 422),
    ({"items": [{"id": "a"}, {"id": "a"}]}, 422), ({"items": [{"id": str(k)} for k in range(201)]}, 413),
    (json.dumps({"items": [{"id": "a", "title": "x" * (1 << 20)}, {"id": "b"}]}).encode(), 413),
    ({"items": [{"id": "a", "title": "<|im_start|>system\x07"}, {"id": "b", "title": "<|endoftext|>"}]}, 200),
]  # fmt: skip


def bad_inputs(port: int) -> dict:
    got = [call(port, "POST", "/v1/bundles", b)[0] for b, _ in BAD]
    ok = got == [want for _, want in BAD]
    return {"fault": "every bad-input class", "ok": ok, "detail": f"statuses {got} (expected {[w for _, w in BAD]})"}


def timeout_fault(session, out: Path) -> dict:
    """A second server with --timeout 0.2 and one sequence: of 8 requests at once, the queued ones time
    out (a session takes ~0.5 s on 2 idle cores, so at most the first is answered in time)."""
    small = Server("--parallel", "1", "--queue", "8", "--timeout", "0.2", log=out / "serve-timeout.log")
    try:
        with ThreadPoolExecutor(8) as pool:
            statuses = sorted(r[0] for r in pool.map(lambda _: call(small.port, "POST", "/v1/bundles", body(session)),
                                                     range(8)))  # fmt: skip
        after = call(small.port, "POST", "/v1/bundles", body(session))[0]
        ok = 504 in statuses and after in (200, 504) and healthy(small.port)
        return {"fault": "requests past --timeout 0.2", "ok": ok, "detail": f"statuses {statuses}, then {after}"}
    finally:
        small.kill()


def sigterm(server: Server, sessions) -> dict:
    got = []

    def one(s):
        got.append(call(server.port, "POST", "/v1/bundles", body(s))[0])

    threads = [threading.Thread(target=one, args=(s,)) for s in sessions[:8]]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        m = metrics(server.port)
        if m["bkd_sessions_in_flight"] + m["bkd_queue_depth"] + len(got) >= len(threads):
            break
        time.sleep(0.02)
    server.proc.send_signal(signal.SIGTERM)
    for t in threads:
        t.join()
    code = server.proc.wait(timeout=120)
    ok = got == [200] * len(threads) and code == 0
    return {"fault": "SIGTERM with 8 requests in flight", "ok": ok, "detail": f"statuses {sorted(got)}, exit {code}"}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sessions", type=Path, required=True)
    ap.add_argument("--model", default="default", help="what `generate --model` and `serve --model` run")
    ap.add_argument("--threads", default="0", help="llama.cpp threads of both (1 on a machine shared with other work)")
    ap.add_argument("--split", default="test")
    ap.add_argument("--limit", type=int, default=0, help="only the first N sessions (0: all)")
    ap.add_argument("--levels", default="1,2,4,8,16")
    ap.add_argument("--level-limit", type=int, default=48, help="sessions per level other than 1 and 8")
    ap.add_argument("--parallel", type=int, default=8)
    ap.add_argument("--queue", type=int, default=32)
    ap.add_argument("--soak-s", type=float, default=600.0)
    ap.add_argument("--max-s", type=float, default=3600.0, help="stop everything after this long")
    ap.add_argument("--out", type=Path, default=Path("bench-serve"))
    args = ap.parse_args()
    DEADLINE[0] = time.monotonic() + args.max_s
    MODEL[:] = [args.model, args.threads]
    args.out.mkdir(parents=True, exist_ok=True)
    gold = load_sessions(args.sessions, split=args.split)[: args.limit or None]
    report: dict = {"model": args.model, "threads": args.threads, "sessions": len(gold), "split": args.split,
                    "file": str(args.sessions),
                    "cpu_cores": os.cpu_count()}  # fmt: skip

    # 1. the reference: generate, sequential, in a process of its own (run again after the server:
    # the faster of the two runs is the timing reference, so a slow spell of a shared machine
    # during one of them does not flatter the service)
    ref = run_generate(args, gold, "generate")

    # 2. answers and throughput through one server
    server = Server("--parallel", str(args.parallel), "--queue", str(args.queue), "--timeout", "300",
                    log=args.out / "serve.log")  # fmt: skip
    try:
        levels = [int(x) for x in args.levels.split(",")]
        rss_warm = server.rss()
        runs = {}
        for c in levels:
            runs[c] = run_level(server.port, level_sessions(gold, c, args.level_limit), c)
            print(f"concurrency {c}: {runs[c]['sessions_per_min']:.1f} sessions/min, p50 {runs[c]['p50_s']:.2f} s",
                  file=sys.stderr)  # fmt: skip
        answers = {}
        for c in (1, 8):
            if c in runs:
                recs = runs[c]["records"]
                same = sum(partition(recs[sid]) == partition(ref[sid]) for sid in recs if sid in ref)
                answers[c] = {"equal_partitions": same, "of": len(gold), "share": same / len(gold),
                              "strict_f1": strict_f1(gold, recs)}  # fmt: skip
        report["answers"] = answers
        report["levels"] = [{k: v for k, v in r.items() if k != "records"} for r in runs.values()]

        # 3. soak
        soak = {"seconds": args.soak_s, "concurrency": 8, "requests": 0, "errors": 0, "rss_warm_mib": rss_warm / 2**20}
        soak["rss_before_mib"] = server.rss() / 2**20
        t_end = min(time.monotonic() + args.soak_s, DEADLINE[0])
        while time.monotonic() < t_end:
            r = run_level(server.port, gold[:16], 8)
            soak["requests"] += r["sessions"]
            soak["errors"] += r["errors"]
        soak["rss_after_mib"] = server.rss() / 2**20
        soak["rss_change"] = soak["rss_after_mib"] / soak["rss_before_mib"] - 1
        report["soak"] = soak

        # 4. faults
        faults = [disconnects(server.port, gold[0]), burst(server.port, gold[0]), bad_inputs(server.port)]
        for f in faults:
            f["healthy_after"] = (
                healthy(server.port) and call(server.port, "POST", "/v1/bundles", body(gold[1]))[0] == 200
            )
        faults.append(timeout_fault(gold[0], args.out))
        faults.append(sigterm(server, gold))
        report["faults"] = faults
    finally:
        server.kill()
    again = run_generate(args, gold, "generate-again")
    runs_of_generate = [ref, again]
    timing_ref = max(runs_of_generate, key=lambda r: generate_rate(r, gold))
    report["generate"] = generate_summary(timing_ref, gold)
    report["generate"]["runs"] = [{"sessions_per_min": generate_rate(r, gold), "latency_p50_s": latency_p50(r)}
                                  for r in runs_of_generate]  # fmt: skip
    report["generate"]["strict_f1"] = strict_f1(gold, ref)
    for level in report["levels"]:
        subset = level_sessions(gold, level["concurrency"], args.level_limit)
        level["generate_sessions_per_min"] = generate_rate(timing_ref, subset)  # the same sessions, sequential

    write_json(args.out / "report.json", report)
    md = markdown(report)
    (args.out / "report.md").write_text(md)
    print(md)
    return 0


def markdown(r: dict) -> str:
    g = r["generate"]
    rows = [{"run": "generate (sequential, one process)", "c": 1, "spm": g["sessions_per_min"], "x": 1.0,
             "p50": g["latency_p50_s"], "p99": g["latency_p99_s"], "n": r["sessions"], "err": 0}]  # fmt: skip
    for lv in r["levels"]:
        rows.append({"run": "serve", "c": lv["concurrency"], "spm": lv["sessions_per_min"],
                     "x": lv["sessions_per_min"] / lv["generate_sessions_per_min"],
                     "p50": lv["p50_s"], "p99": lv["p99_s"], "n": lv["sessions"], "err": lv["errors"]})  # fmt: skip
    cols = [("run", "run", ""), ("c", "concurrency", ""), ("n", "sessions", ""), ("spm", "sessions/min", ".1f"),
            ("x", "x generate (same sessions)", ".2f"), ("p50", "p50 (s)", ".2f"), ("p99", "p99 (s)", ".2f"),
            ("err", "errors", "")]  # fmt: skip
    head = (f"`--model {r['model']} --threads {r['threads']}`, {r['sessions']} sessions of "
            f"{Path(r['file']).name} (split {r['split']}), "
            f"{r['cpu_cores']} cores.")  # fmt: skip
    out = [head, "", table(rows, cols), ""]
    for c, a in r["answers"].items():
        out.append(f"- answers at concurrency {c}: partitions equal to `generate`'s in "
                   f"{a['equal_partitions']}/{a['of']} sessions ({a['share']:.1%}); strict F1 {a['strict_f1']:.3f} "
                   f"(generate {g['strict_f1']:.3f})")  # fmt: skip
    s = r["soak"]
    out.append(f"- soak: {s['seconds']:.0f} s at concurrency 8, {s['requests']} requests, {s['errors']} errors; "
               f"server RSS {s['rss_before_mib']:.0f} MiB after warm-up, {s['rss_after_mib']:.0f} MiB after "
               f"({s['rss_change']:+.1%})")  # fmt: skip
    out.append("- generate's two runs (before and after the server; the faster is the reference): "
               + ", ".join(f"{x['sessions_per_min']:.1f} sessions/min, p50 {x['latency_p50_s']:.2f} s"
                           for x in g["runs"]))  # fmt: skip
    p = g["prefill_share"]
    best = max((lv["sessions_per_min"] / lv["generate_sessions_per_min"] for lv in r["levels"]), default=0.0)
    out.append(f"- share of a sequential session's time that does not batch (hint, prefill, candidate scoring): "
               f"{p:.2f}, so concurrency gains at most 1 / p = {1 / p:.2f}x however fast decoding batches; "
               f"the best level reached {best:.2f}x ({best * p:.0%} of that bound)")  # fmt: skip
    for f in r["faults"]:
        health = "" if "healthy_after" not in f else f", healthy after: {'yes' if f['healthy_after'] else 'NO'}"
        out.append(f"- fault: {f['fault']}: {'ok' if f['ok'] else 'FAILED'} ({f['detail']}{health})")
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    sys.exit(main())
