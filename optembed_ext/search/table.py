"""The comparison's outputs: the paper-style table, the AUC-vs-parameters Pareto plot, CSV and JSON."""
from __future__ import annotations

import csv
import json
import math
from pathlib import Path

from ..results import RESULT_COLUMNS, num_or_nan as _num, read_method_folder
from ..train.config import save_json
from .base import method_names


def collect_rows(out) -> list[dict]:
    """Every result row of the complete method folders ``out/<dataset>/<model>/<method>/`` (sorted by dataset,
    model, method in registry order, parameters)."""
    out = Path(out)
    rows = []
    for f in sorted(out.glob("*/*/*/metrics.json")):
        m = read_method_folder(f.parent)
        if m is not None:
            rows.extend(m["rows"])
    order = {m: i for i, m in enumerate(method_names())}
    rows.sort(key=lambda r: (r.get("dataset", ""), r.get("model", ""), order.get(r.get("method"), len(order)),
                             str(r.get("method")), _num(r.get("num_params"))))
    return rows


def pareto_front(points) -> list[int]:
    """Indices of the points ``(params, auc)`` not dominated by another (fewer or equal parameters and a
    higher or equal AUC, one of them strictly), ordered by parameters."""
    pts = [(i, _num(p), _num(a)) for i, (p, a) in enumerate(points)]
    pts = [t for t in pts if math.isfinite(t[1]) and math.isfinite(t[2])]
    pts.sort(key=lambda t: (t[1], -t[2]))
    front, best = [], -math.inf
    for i, _, a in pts:
        if a > best:
            front.append(i)
            best = a
    return front


def _fmt_params(n) -> str:
    n = _num(n)
    if not math.isfinite(n):
        return "-"
    if n >= 1e6:
        return f"{n / 1e6:.2f}M"
    if n >= 1e3:
        return f"{n / 1e3:.1f}K"
    return f"{int(n)}"


def format_table(rows: list[dict]) -> str:
    """Markdown table (one line per row, Pareto-optimal rows of each dataset/model marked with ``*``)."""
    pareto = set()
    groups: dict[tuple, list[int]] = {}
    for i, r in enumerate(rows):
        groups.setdefault((r.get("dataset"), r.get("model")), []).append(i)
    for idx in groups.values():
        front = pareto_front([(rows[i].get("num_params"), rows[i].get("auc")) for i in idx])
        pareto.update(idx[j] for j in front)
    head = ("| Dataset | Model | Method | Variant | AUC | Logloss | Emb. params | Sparsity | Train (s) | "
            "Search (s) | Infer (s) |")
    lines = [head, "|" + "|".join(["---"] * 11) + "|"]
    for i, r in enumerate(rows):
        auc = _num(r.get("auc"))
        ll = _num(r.get("logloss"))
        sp = _num(r.get("sparsity"))
        lines.append("| " + " | ".join([
            str(r.get("dataset")), str(r.get("model")), str(r.get("method")), str(r.get("variant")),
            (f"{auc:.4f}" if math.isfinite(auc) else "-") + ("*" if i in pareto else ""),
            f"{ll:.4f}" if math.isfinite(ll) else "-", _fmt_params(r.get("num_params")),
            f"{sp:.3f}" if math.isfinite(sp) else "-", _fmt_s(r.get("train_seconds")),
            _fmt_s(r.get("search_seconds")), _fmt_s(r.get("infer_seconds"), 3)]) + " |")
    lines.append("")
    lines.append("`*`: on the AUC-vs-embedding-parameters Pareto front of its dataset and model. Train time: "
                 "summed training epochs of every run of the method (search included); inference: one pass over "
                 "the test split.")
    return "\n".join(lines) + "\n"


def _fmt_s(v, digits: int = 1) -> str:
    v = _num(v)
    return f"{v:.{digits}f}" if math.isfinite(v) else "-"


def plot_pareto(rows: list[dict], path) -> Path:
    """AUC against embedding parameters (log scale), one panel per (dataset, model), Pareto front dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r.get("dataset"), r.get("model")), []).append(r)
    n = max(1, len(groups))
    fig, axes = plt.subplots(1, n, figsize=(5.5 * n, 4.2), squeeze=False)
    methods = list(method_names()) + sorted({str(r.get("method")) for r in rows} - set(method_names()))
    marker_cycle, color_cycle = "osD^vPX*<>ph", ["0.4", "C3", "C0", "C2", "C1", "C4", "C5", "C6", "C7", "C8", "C9"]
    markers = {m: marker_cycle[i % len(marker_cycle)] for i, m in enumerate(methods)}
    colors = {m: color_cycle[i % len(color_cycle)] for i, m in enumerate(methods)}
    for ax, ((ds, model), rs) in zip(axes[0], sorted(groups.items(), key=lambda kv: str(kv[0]))):
        for method in methods:
            pts = [(r["num_params"], r["auc"]) for r in rs if r.get("method") == method
                   and math.isfinite(_num(r.get("auc"))) and _num(r.get("num_params")) > 0]
            if not pts:
                continue
            pts.sort()
            ax.plot([p for p, _ in pts], [a for _, a in pts], marker=markers[method], color=colors[method],
                    linestyle="-" if method == "uniform" else "none", label=method)
        valid = [r for r in rs if _num(r.get("num_params")) > 0]
        front = pareto_front([(r.get("num_params"), r.get("auc")) for r in valid])
        if front:
            ax.plot([valid[i]["num_params"] for i in front], [valid[i]["auc"] for i in front], "k--", lw=0.8,
                    drawstyle="steps-post", label="Pareto front")
        ax.set_xscale("log")
        ax.set_xlabel("embedding parameters")
        ax.set_ylabel("test AUC")
        ax.set_title(f"{ds} / {model}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    if not groups:
        axes[0][0].text(0.5, 0.5, "no results", ha="center")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_results(rows: list[dict], out) -> dict:
    """Write ``table.md``, ``results.csv``, ``results.json`` and ``pareto.png`` into ``out``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "table.md").write_text(format_table(rows), encoding="utf-8")
    extra = sorted({k for r in rows for k in r} - set(RESULT_COLUMNS))
    with open(out / "results.csv", "w", newline="", encoding="utf-8") as fh:
        w = csv.DictWriter(fh, fieldnames=list(RESULT_COLUMNS) + extra)
        w.writeheader()
        for r in rows:
            w.writerow({k: (json.dumps(v) if isinstance(v, (list, dict)) else v) for k, v in r.items()})
    save_json(out / "results.json", {"rows": rows})
    plot_pareto(rows, out / "pareto.png")
    return {"table": out / "table.md", "csv": out / "results.csv", "json": out / "results.json",
            "plot": out / "pareto.png"}
