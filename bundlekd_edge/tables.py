"""Plain-text tables (Markdown pipe tables: readable in a terminal, pasteable into a README)."""

from __future__ import annotations


def fmt(value, spec: str = "") -> str:
    if value is None:
        return "-"
    if spec:
        return format(value, spec)
    if isinstance(value, float):
        return f"{value:.3f}"
    return str(value)


def table(rows: list[dict], columns: list[tuple[str, str, str]]) -> str:
    """rows: dicts; columns: (key, header, format spec). Numbers are right-aligned."""
    cells = [[fmt(r.get(key), spec) for key, _, spec in columns] for r in rows]
    headers = [h for _, h, _ in columns]
    widths = [max(len(h), *(len(c[i]) for c in cells)) if cells else len(h) for i, h in enumerate(headers)]
    numeric = [all(_is_number(r.get(key)) for r in rows) and rows for key, _, _ in columns]

    def line(values):
        parts = [v.rjust(w) if num else v.ljust(w) for v, w, num in zip(values, widths, numeric)]
        return "| " + " | ".join(parts) + " |"

    rule = "|" + "|".join(("-" * (w + 1) + ":") if num else ("-" * (w + 2)) for w, num in zip(widths, numeric)) + "|"
    return "\n".join([line(headers), rule, *(line(c) for c in cells)])


def _is_number(v) -> bool:
    if isinstance(v, str):
        try:
            float(v)
            return True
        except ValueError:
            return False
    return isinstance(v, (int, float)) and not isinstance(v, bool) or v is None


QUALITY_ROWS = [
    ("precision", "paper precision (subset hits)"),
    ("recall", "paper recall"),
    ("coverage", "paper coverage"),
    ("strict_precision", "strict precision (matched Jaccard)"),
    ("strict_recall", "strict recall"),
    ("strict_f1", "strict F1"),
    ("exact_match", "exact-match rate"),
    ("valid_rate", "JSON-valid rate"),
    ("hallucination_rate", "hallucinated-item rate"),
    ("empty_rate", "empty-output rate"),
]


def quality_table(scores: dict) -> str:
    rows = [{"metric": label, "value": scores[key]} for key, label in QUALITY_ROWS]
    rows.append({"metric": "sessions", "value": scores["sessions"]})
    rows.append({"metric": "of which without a prediction", "value": scores.get("missing_predictions", 0)})
    rows.append({"metric": "of which skipped (< 2 items)", "value": scores.get("skipped", 0)})
    if "intent_pairs" in scores:
        rows.append({"metric": "intent cosine (matched bundles)", "value": scores["intent_cosine"]})
        rows.append({"metric": "intent named exactly", "value": scores["intent_exact"]})
        rows.append({"metric": "matched bundles with a true intent", "value": scores["intent_pairs"]})
    if "category_rule_intent_cosine" in scores:
        rows.append({"metric": "intent cosine, category-name rule (same bundles)",
                     "value": scores["category_rule_intent_cosine"]})  # fmt: skip
        rows.append({"metric": "named exactly, category-name rule", "value": scores["category_rule_intent_exact"]})
    if "intent_judge" in scores:
        rows.append({"metric": f"intent judge score 0-1 ({scores.get('intent_judge_model', '')})",
                     "value": scores["intent_judge"]})  # fmt: skip
    return table(rows, [("metric", "metric", ""), ("value", "value", "")])
