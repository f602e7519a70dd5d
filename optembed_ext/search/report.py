"""Markdown report and plot of an OptEmbed run (written by ``optembed search``)."""
from __future__ import annotations

from pathlib import Path

VARIANT_LABELS = {
    "uniform": "Original (uniform)",
    "optembed": "OptEmbed",
    "optembed_e": "OptEmbed-E (rows only)",
    "optembed_d": "OptEmbed-D (dims only)",
    "no_retrain": "OptEmbed w/o retraining",
}
VARIANT_ORDER = ("uniform", "optembed", "optembed_e", "optembed_d", "no_retrain")


def _fmt(v, spec: str) -> str:
    if v is None:
        return "-"
    try:
        return format(v, spec)
    except (TypeError, ValueError):
        return str(v)


def _bytes(n) -> str:
    if n is None:
        return "-"
    n = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return str(n)


def render_markdown(result: dict) -> str:
    """The report text of a :func:`~optembed_ext.search.optembed.run_optembed` result."""
    variants = result.get("variants", {})
    base = variants.get("uniform", {})
    lines = [f"# OptEmbed on {result.get('dataset')} with {result.get('model')}", ""]
    cfg = result.get("config", {})
    lines.append(f"Embedding table: {result.get('num_features')} rows x D={result.get('embed_dim')}, "
                 f"{len(result.get('field_names', []))} fields. Training: lr {cfg.get('lr')}, weight decay "
                 f"{cfg.get('weight_decay')}, batch {cfg.get('batch_size')}, epochs {cfg.get('epochs')} "
                 f"(supernet {cfg.get('supernet_epochs') or cfg.get('epochs')}, retrain "
                 f"{cfg.get('retrain_epochs') or cfg.get('epochs')}), patience {cfg.get('patience')}; "
                 f"threshold lr {cfg.get('threshold_lr')}, alpha {cfg.get('alpha')}, L{cfg.get('norm')} norm; "
                 f"evolution {cfg.get('generations')} generations of {cfg.get('mutation_num')} mutations + "
                 f"{cfg.get('crossover_num')} crossovers (+{cfg.get('keep_num')} kept), m_prob {cfg.get('m_prob')}.")
    lines += ["", "## Results (test split)", "",
              "| model | AUC | dAUC vs original | logloss | sparsity | params | bytes (masked) | bytes (compact) "
              "| time (s) |",
              "|---|---|---|---|---|---|---|---|---|"]
    for key in VARIANT_ORDER:
        v = variants.get(key)
        if not v:
            continue
        dauc = None
        if base.get("test_auc") is not None and v.get("test_auc") is not None:
            dauc = v["test_auc"] - base["test_auc"]
        lines.append(f"| {VARIANT_LABELS[key]} | {_fmt(v.get('test_auc'), '.5f')} | {_fmt(dauc, '+.5f')} | "
                     f"{_fmt(v.get('test_logloss'), '.5f')} | {_fmt(v.get('sparsity'), '.4f')} | "
                     f"{_fmt(v.get('params'), ',d')} | {_bytes(v.get('bytes'))} | {_bytes(v.get('compact_bytes'))} | "
                     f"{_fmt(v.get('seconds'), '.1f')} |")
    kept = [VARIANT_LABELS[k] for k in VARIANT_ORDER if (variants.get(k) or {}).get("kept_initial")]
    if kept:
        lines += ["", f"Retraining kept its starting state (no epoch beat it on validation, `retrain-keep-initial`): "
                      f"{', '.join(kept)}."]
    lines += ["", "Time = wall time of the phases the variant needs (phases are shared between variants). "
              "Bytes (masked) = kept rows x field dims x element size; bytes (compact) = the served compact table "
              "(`optembed_ext.export`: packed kept rows + id remap + per-field offsets/dims; the plain N x D table "
              "for the original model)."]
    ex = result.get("export")
    if ex:
        lat = ex.get("latency_ms") or {}
        text = (f"Compact export of OptEmbed: `{ex.get('model')}`, embedding {_bytes(ex.get('compact_bytes'))} vs "
                f"uniform {_bytes(ex.get('uniform_bytes'))} ({_fmt(ex.get('compression_ratio'), '.2f')}x smaller), "
                f"max |logit(compact) - logit(masked)| {_fmt(ex.get('max_abs_logit_diff_vs_masked'), '.2e')}")
        if lat:
            text += "; inference latency (median ms per batch): " + ", ".join(f"{k} {v:.3f}" for k, v in lat.items())
        lines += ["", text + "."]
    lines += ["",
              "## Wall time per phase", "", "| phase | seconds |", "|---|---|"]
    for name, sec in result.get("phase_seconds", {}).items():
        lines.append(f"| {name} | {sec:.1f} |")
    evo = result.get("evolution") or {}
    sp = result.get("speedup")
    lines += ["", "## Evolutionary search", ""]
    lines.append(f"Best validation AUC {_fmt(evo.get('best_val_auc'), '.5f')} found in generation "
                 f"{evo.get('best_generation')} of {evo.get('generations')}; {evo.get('candidates_evaluated')} "
                 f"distinct candidates evaluated in {_fmt(evo.get('search_seconds'), '.1f')} s.")
    if sp:
        stack = (f", lookup batch {sp['batch_size']}, <= {sp['max_stack_rows']} stacked rows per backbone call"
                 if "max_stack_rows" in sp else "")
        lines.append(f"One generation ({sp['candidates']} candidates, {sp['samples']} validation samples{stack}): "
                     f"population-batched {sp['batched_seconds']:.3f} s vs one at a time "
                     f"{sp['one_at_a_time_seconds']:.3f} s: **{sp['speedup']:.2f}x** speedup "
                     f"(max |AUC difference| {sp['max_auc_diff']:.2e}).")
    lines += ["", "## Per field (case study)", "",
              "| field | cardinality | kept rows | kept % | threshold | chosen dim |", "|---|---|---|---|---|---|"]
    names = result.get("field_names", [])
    card = result.get("cardinalities", [])
    kept = result.get("kept_rows_per_field", [])
    dims = result.get("field_dims", [])
    thr = result.get("thresholds") or [None] * len(names)
    for i, n in enumerate(names):
        pct = 100.0 * kept[i] / card[i] if card and card[i] else None
        lines.append(f"| {n} | {card[i]} | {kept[i]} | {_fmt(pct, '.1f')} | {_fmt(thr[i], '.4f')} | {dims[i]} |")
    lines.append("")
    return "\n".join(lines)


def plot(result: dict, path) -> Path:
    """Bar plots: test AUC and bytes per variant; kept-row fraction and chosen dim per field."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    variants = result.get("variants", {})
    keys = [k for k in VARIANT_ORDER if variants.get(k) and variants[k].get("test_auc") is not None]
    labels = [VARIANT_LABELS[k].split(" (")[0] for k in keys]
    fig, axes = plt.subplots(2, 2, figsize=(12, 8))
    ax = axes[0, 0]
    aucs = [variants[k]["test_auc"] for k in keys]
    ax.bar(labels, aucs, color="tab:blue")
    if aucs:
        lo, hi = min(aucs), max(aucs)
        pad = max(hi - lo, 1e-3)
        ax.set_ylim(lo - pad, hi + pad)
    ax.set_title("test AUC")
    ax.tick_params(axis="x", rotation=20)
    ax = axes[0, 1]
    xs = list(range(len(keys)))
    ax.bar([x - 0.2 for x in xs], [variants[k].get("bytes") or 0 for k in keys], width=0.4, color="tab:orange",
           label="masked (kept rows x dims)")
    ax.bar([x + 0.2 for x in xs], [variants[k].get("compact_bytes") or 0 for k in keys], width=0.4,
           color="tab:purple", label="compact export")
    ax.set_xticks(xs, labels)
    ax.legend(fontsize=8)
    ax.set_title("embedding bytes")
    ax.tick_params(axis="x", rotation=20)
    names = result.get("field_names", [])
    card = result.get("cardinalities", [])
    kept = result.get("kept_rows_per_field", [])
    x = list(range(len(names)))
    ax = axes[1, 0]
    ax.bar(x, [k / c if c else 0 for k, c in zip(kept, card)], color="tab:green")
    ax.set_title("kept rows per field (fraction)")
    ax.set_xticks(x, names, rotation=90, fontsize=7)
    ax = axes[1, 1]
    ax.bar(x, result.get("field_dims", []), color="tab:red")
    ax.set_title(f"chosen dimension per field (D={result.get('embed_dim')})")
    ax.set_xticks(x, names, rotation=90, fontsize=7)
    fig.suptitle(f"OptEmbed: {result.get('dataset')} / {result.get('model')}")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def write_report(run_dir, result: dict) -> Path:
    """Write ``report.md`` and ``report.png`` into ``run_dir``; returns the markdown path."""
    run_dir = Path(run_dir)
    png = plot(result, run_dir / "report.png")
    md = run_dir / "report.md"
    md.write_text(render_markdown(result) + f"\n![summary]({png.name})\n")
    return md
