"""A bench report as people read it: Markdown tables and two PNG plots (matplotlib)."""

from __future__ import annotations

import os
from pathlib import Path

from ..files import atomic_write, write_json
from ..tables import table

MIB = 2**20

# (section, key, larger is better): the ratios a report gives against its reference rows (`runner.ratios`).
RATIO_KEYS = [
    ("latency", "latency_p50_s", False),
    ("latency", "ttft_cached_p50_s", False),
    ("latency", "sessions_per_min", True),
    ("memory", "peak_rss", False),
    ("memory", "model_file_bytes", False),
    ("memory", "kv_cache_bytes", False),
    ("quality", "strict_f1", True),
    ("quality", "exact_match", True),
]


def _get(row: dict, section: str, key: str, scale: float = 1.0):
    value = (row.get(section) or {}).get(key)
    return value / scale if isinstance(value, (int, float)) else None


def _name(row: dict) -> str:
    return f"{row['name']} ({row['label']})" if row.get("label") else row["name"]


def quality_rows(rows):
    keys = ["strict_precision", "strict_recall", "strict_f1", "exact_match", "precision", "recall", "coverage",
            "valid_rate", "hallucination_rate", "empty_rate"]  # fmt: skip
    return [{"engine": _name(r), **{k: _get(r, "quality", k) for k in keys}} for r in rows]


QUALITY_COLUMNS = [
    ("engine", "engine", ""),
    ("strict_precision", "strict P", ".3f"),
    ("strict_recall", "strict R", ".3f"),
    ("strict_f1", "strict F1", ".3f"),
    ("exact_match", "exact", ".3f"),
    ("precision", "paper P", ".3f"),
    ("recall", "paper R", ".3f"),
    ("coverage", "coverage", ".3f"),
    ("valid_rate", "valid", ".3f"),
    ("hallucination_rate", "halluc.", ".3f"),
    ("empty_rate", "empty", ".3f"),
]

LATENCY_COLUMNS = [
    ("engine", "engine", ""),
    ("ttft_cached_p50_s", "TTFT p50 cached (s)", ".3f"),
    ("ttft_cached_p95_s", "TTFT p95 cached (s)", ".3f"),
    ("ttft_uncached_p50_s", "TTFT p50 uncached (s)", ".3f"),
    ("prefill_tps", "prefill tok/s", ".0f"),
    ("decode_tps", "decode tok/s", ".1f"),
    ("latency_p50_s", "latency p50 (s)", ".4f"),
    ("latency_p95_s", "latency p95 (s)", ".4f"),
    ("sessions_per_min", "sessions/min", ".1f"),
]

MEMORY_COLUMNS = [
    ("engine", "engine", ""),
    ("peak_rss", "peak RSS (MiB)", ".1f"),
    ("rss_file", "RSS file-backed (MiB)", ".1f"),
    ("rss_anon", "RSS anonymous (MiB)", ".1f"),
    ("model_file_bytes", "model file (MiB)", ".1f"),
    ("kv_cache_bytes", "KV cache at n_ctx (MiB)", ".1f"),
]


def markdown(report: dict) -> str:
    rows = [r for r in report["rows"] if r["status"] == "ok"]
    failed = [r for r in report["rows"] if r["status"] != "ok"]
    opt, repro = report["options"], report["reproducibility"]
    out = [
        "# bkd-edge bench",
        "",
        f"Sessions: `{opt['sessions']}`, split `{opt['split']}`"
        + (f", first {opt['limit']}" if opt["limit"] else "")
        + f"; n_ctx {opt['n_ctx']}, {repro['threads']} threads, seed {opt['seed']}; "
        f"CPU {repro['cpu'].get('model', '?')}. Each engine ran alone in a fresh process after "
        f"{opt['warmup']} warm-up session(s).",
    ]
    if report.get("teacher"):
        out += ["", f"Ratios are against the teacher row `{report['teacher']}`."]
    out += ["", "## Quality", "", table(quality_rows(rows), QUALITY_COLUMNS)]
    lat = [{"engine": _name(r), **{k: _get(r, "latency", k) for k, _, _ in LATENCY_COLUMNS[1:]}} for r in rows]
    out += ["", "## Latency", "", table(lat, LATENCY_COLUMNS)]
    out += ["", "TTFT *cached*: the static prompt prefix (and pack) already in the KV cache; *uncached*: the cache "
            f"emptied first ({opt['cold']} sessions). HTTP rows time whole requests."]  # fmt: skip
    mem = [
        {"engine": _name(r), **{k: _get(r, "memory", k, MIB) for k, _, _ in MEMORY_COLUMNS[1:]}}
        for r in rows
        if r["kind"] != "http"
    ]
    out += ["", "## Memory", "", table(mem, MEMORY_COLUMNS)]
    out += ["", "RSS file-backed is mostly the memory-mapped model; anonymous is the KV cache, compute buffers "
            "and the Python process. KV cache: f16 K and V for every layer at n_ctx."]  # fmt: skip
    tp = [r for r in rows if r.get("throughput")]
    if tp:
        levels = sorted({t["concurrency"] for r in tp for t in r["throughput"]})
        cols = [("engine", "engine", "")] + [(f"c{c}", f"{c} at once (sessions/min)", ".1f") for c in levels]
        data = [
            {"engine": _name(r), **{f"c{t['concurrency']}": t["sessions_per_min"] for t in r["throughput"]}} for r in tp
        ]
        n = tp[0]["throughput"][0]["sessions"]
        out += ["", "## Batch throughput", "", f"{n} sessions on one model, batched decoding.", "", table(data, cols)]
    ratio_cols = [("engine", "engine", "")] + [(k, k.replace("_", " "), ".3f") for _, k, _ in RATIO_KEYS]
    vs = [{"engine": _name(r), **r["vs_teacher"]} for r in rows if r.get("vs_teacher")]
    if vs:
        out += ["", f"## Ratios against the teacher (`{report['teacher']}`)", "", table(vs, ratio_cols)]
    if report.get("comparisons"):
        cmp_rows = [{"engine": f"{c['engine']} / {c['reference']}", **c["ratios"]} for c in report["comparisons"]]
        out += ["", "## Comparisons", "", table(cmp_rows, ratio_cols)]
    if failed:
        out += ["", "## Failed engines", ""] + [f"- `{r['name']}`: {r.get('error', '?')}" for r in failed]
    out += ["", "## Plots", "", "![quality vs latency](quality_latency.png)", "", "![memory](memory.png)"]
    out += ["", "## Reproducibility", ""]
    out += [f"- {k}: `{v}`" for k, v in repro.items() if k not in ("cpu", "models", "packs")]
    out += [f"- CPU flags: `{' '.join(repro['cpu'].get('flags', []))}`"]
    out += [f"- model `{name}` sha256 `{digest}`" for name, digest in repro["models"].items()]
    out += [f"- pack of `{name}` manifest sha256 `{digest}`" for name, digest in repro["packs"].items()]
    return "\n".join(out) + "\n"


def save_png(fig, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight")
    os.replace(tmp, path)


KIND_MARKER = {"llama": "o", "http": "s", "baseline": "^"}


def plot_quality_latency(rows: list[dict], path: Path) -> None:
    """Strict F1 against per-session latency p50, one point per engine, with the Pareto frontier."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = [(r, _get(r, "latency", "latency_p50_s"), _get(r, "quality", "strict_f1")) for r in rows]
    points = [(r, max(x, 1e-6), y) for r, x, y in points if x is not None and y is not None]
    fig, ax = plt.subplots(figsize=(9, 5))
    # One colour per engine, one marker per kind, named in the legend: similar engines crowd
    # together and labels on the points would overlap.
    colors = plt.get_cmap("tab10").colors
    for i, (r, x, y) in enumerate(points):
        ax.scatter(x, y, marker=KIND_MARKER[r["kind"]], color=colors[i % 10], s=70, zorder=3, label=_name(r))
    frontier, best = [], -1.0
    for _, x, y in sorted(points, key=lambda p: (p[1], -p[2])):
        if y > best:
            frontier.append((x, y))
            best = y
    if len(frontier) > 1:
        ax.step(*zip(*frontier), where="post", color="tab:green", alpha=0.5, label="Pareto frontier")
    ax.set_xscale("log")
    ax.set_xlabel("per-session latency p50 (s, log scale)")
    ax.set_ylabel("strict F1")
    ax.set_title("Quality vs latency (up and left is better)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1), fontsize=8, title="o LLM, ^ baseline, s HTTP")
    save_png(fig, path)
    plt.close(fig)


def plot_memory(rows: list[dict], path: Path) -> None:
    """Peak-time RSS per engine split into file-backed and anonymous, model file and KV cache beside."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    rows = [r for r in rows if _get(r, "memory", "peak_rss") is not None]
    names = [r["name"] for r in rows]
    y = np.arange(len(rows))
    file_b = [(_get(r, "memory", "rss_file", MIB) or 0) for r in rows]
    anon = [(_get(r, "memory", "rss_anon", MIB) or 0) for r in rows]
    fig, ax = plt.subplots(figsize=(8, 0.5 * len(rows) + 1.5))
    ax.barh(y - 0.2, file_b, height=0.4, color="tab:blue", label="RSS file-backed (mapped model)")
    ax.barh(y - 0.2, anon, left=file_b, height=0.4, color="tab:orange", label="RSS anonymous")
    ax.barh(y + 0.2, [(_get(r, "memory", "model_file_bytes", MIB) or 0) for r in rows], height=0.2,
            color="tab:gray", label="model file")  # fmt: skip
    ax.barh(y + 0.4, [(_get(r, "memory", "kv_cache_bytes", MIB) or 0) for r in rows], height=0.2,
            color="tab:purple", label="KV cache at n_ctx")  # fmt: skip
    for i, r in enumerate(rows):
        ax.annotate(f"peak {_get(r, 'memory', 'peak_rss', MIB):.0f} MiB", (file_b[i] + anon[i], y[i] - 0.2),
                    textcoords="offset points", xytext=(4, -3), fontsize=7)  # fmt: skip
    ax.set_yticks(y, names)
    ax.invert_yaxis()
    ax.set_xlabel("MiB")
    ax.set_title("Memory per engine (RSS after the scored run)")
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1), fontsize=8)
    ax.grid(True, axis="x", alpha=0.3)
    save_png(fig, path)
    plt.close(fig)


def write_report(report: dict, out: Path) -> None:
    write_json(out / "report.json", report)
    with atomic_write(out / "report.md") as f:
        f.write(markdown(report))
    ok = [r for r in report["rows"] if r["status"] == "ok"]
    plot_quality_latency(ok, out / "quality_latency.png")
    plot_memory(ok, out / "memory.png")
