"""Stage "report": the metric table across methods and budgets, a PNG plot in the store, Prefect artifacts.

A result whose method is ``"full"`` is the full-pool reference (a model trained on the whole train split): it is
drawn as its own table row and a dashed line in the plot, never as a budget column of its own. The Prefect
markdown artifact carries the plot inline (a ``data:image/png;base64`` image), so the UI shows it; the PNG stays
in the store too."""

from __future__ import annotations

import base64
import io
from collections import defaultdict
from typing import Any

import numpy as np
from prefect import task

from tasks.cache import ContentCache
from tasks.store import open_store

__all__ = ["FULL_POOL", "artifact_markdown", "choices", "publish", "report", "summarize_metrics"]

FULL_POOL = "full"  # the method name of the full-pool reference result


def summarize_metrics(results: list[dict[str, Any]], metric: str) -> list[dict[str, Any]]:
    """Mean ± std of ``metric`` per (method, n) over seeds, sorted by n then method."""
    groups: dict[tuple[str, int], list[float]] = defaultdict(list)
    for r in results:
        groups[(r["method"], r["n"])].append(float(r[metric]))
    return [{"method": m, "n": n, "mean": float(np.mean(v)), "std": float(np.std(v)), "seeds": len(v)}
            for (m, n), v in sorted(groups.items(), key=lambda kv: (kv[0][1], kv[0][0]))]


def _split_reference(summary: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(the selection methods' rows, the full-pool reference rows)."""
    return ([s for s in summary if s["method"] != FULL_POOL], [s for s in summary if s["method"] == FULL_POOL])


def _cell(s: dict[str, Any]) -> str:
    return f"{s['mean']:.4f} ± {s['std']:.4f}"


def markdown(summary: list[dict[str, Any]], metric: str) -> str:
    """The metric table: one row per method, one column per budget; the full-pool reference (if any) as a last
    row with its value under every budget, for comparison."""
    selected, reference = _split_reference(summary)
    budgets = sorted({s["n"] for s in selected})
    methods = list(dict.fromkeys(s["method"] for s in selected))
    cell = {(s["method"], s["n"]): s for s in selected}
    lines = [f"| method | {' | '.join(f'n={n}' for n in budgets)} |", "|---|" + "---|" * len(budgets)]
    for m in methods:
        row = [_cell(cell[(m, n)]) if (m, n) in cell else "" for n in budgets]
        lines.append(f"| {m} | {' | '.join(row)} |")
    for ref in reference:
        lines.append(f"| full pool (n={ref['n']}) | {' | '.join([_cell(ref)] * len(budgets))} |")
    return f"**{metric}** on the test split (mean ± std over seeds)\n\n" + "\n".join(lines)


def choices(results: list[dict[str, Any]]) -> str:
    """Which variant skmm_best kept per budget (chosen on the val split), e.g. "n=50: skmm ×3, skmm_v2 ×2"."""
    picked: dict[int, list[str]] = defaultdict(list)
    for r in results:
        if r.get("chosen"):
            picked[r["n"]].append(r["chosen"])
    parts = [f"n={n}: " + ", ".join(f"{v} ×{picks.count(v)}" for v in sorted(set(picks)))
             for n, picks in sorted(picked.items())]
    return ("skmm_best kept (chosen on the val split): " + "; ".join(parts)) if parts else ""


def plot_png(summary: list[dict[str, Any]], metric: str) -> bytes:
    """Metric vs budget per method (error bars: std over seeds); the full-pool reference as a dashed line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    selected, reference = _split_reference(summary)
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for m in dict.fromkeys(s["method"] for s in selected):
        pts = [s for s in selected if s["method"] == m]
        ax.errorbar([s["n"] for s in pts], [s["mean"] for s in pts], yerr=[s["std"] for s in pts], marker="o",
                    capsize=3, label=m)
    for ref in reference:
        ax.axhline(ref["mean"], color="black", linestyle="--", linewidth=1, label=f"full pool (n={ref['n']})")
        if ref["std"] > 0:
            ax.axhspan(ref["mean"] - ref["std"], ref["mean"] + ref["std"], color="black", alpha=0.08)
    ax.set(xscale="log", xlabel="budget n", ylabel=metric, title=f"{metric} vs budget")
    budgets = sorted({s["n"] for s in selected})
    ax.set_xticks(budgets, [str(n) for n in budgets])  # the budgets themselves, not 2×10¹
    ax.minorticks_off()
    ax.legend()
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, metadata={"Software": None})  # no timestamps: same bytes each run
    plt.close(fig)
    return buf.getvalue()


@task(name="report", cache_policy=ContentCache(code_version="report-3"), persist_result=True,
      result_serializer="json")
def report(results: list[dict[str, Any]], store: dict, metric: str = "accuracy") -> dict[str, Any]:
    """Write the plot and the markdown table to the store (the flow publishes them as Prefect artifacts)."""
    st = open_store(store)
    summary = summarize_metrics(results, metric)
    table_md = markdown(summary, metric)
    if note := choices(results):
        table_md += "\n\n" + note
    plot = st.put_bytes(plot_png(summary, metric), "report", ".png")
    text = st.put_bytes((table_md + f"\n\nPlot: {plot.uri}\n").encode(), "report", ".md")
    return {"metric": metric, "summary": summary, "markdown": table_md, "plot": plot.to_dict(),
            "report": text.to_dict()}


def artifact_markdown(rep: dict[str, Any], png: bytes) -> str:
    """The ``skmm-report`` artifact's text: the table, the variant choices, the plot inline as a data URI (a
    browser never opens the store's ``file://`` path from the UI), and where the plot and report lie in the store."""
    image = f"![{rep.get('metric', 'metric')} vs budget](data:image/png;base64,{base64.b64encode(png).decode('ascii')})"
    return (f"{rep['markdown']}\n\n{image}\n\nIn the store:\n\n- plot `{rep['plot']['uri']}`\n"
            f"- report `{rep['report']['uri']}`\n")


def publish(results: list[dict[str, Any]], rep: dict[str, Any], store: dict[str, Any]) -> None:
    """Prefect markdown + table artifacts of a report, for the run's page in the UI (on cache hits too). The plot
    is read back from ``store`` (checked against its ref) and inlined."""
    from prefect.artifacts import create_markdown_artifact, create_table_artifact

    from storage.artifacts import ArtifactRef

    png = open_store(store).get_bytes(ArtifactRef.from_dict(rep["plot"]))
    create_markdown_artifact(markdown=artifact_markdown(rep, png), key="skmm-report",
                             description="metric vs budget per selection method")
    create_table_artifact(table=[{k: v for k, v in r.items() if not isinstance(v, dict)} for r in results],
                          key="skmm-runs", description="one row per (method, budget, seed)")
