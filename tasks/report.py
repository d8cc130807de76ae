"""Stage "report": the metric table across methods and budgets, a PNG plot in the store, Prefect artifacts."""

from __future__ import annotations

import io
from collections import defaultdict
from typing import Any

import numpy as np
from prefect import task

from tasks.cache import ContentCache
from tasks.store import open_store

__all__ = ["choices", "publish", "report", "summarize_metrics"]


def summarize_metrics(results: list[dict[str, Any]], metric: str) -> list[dict[str, Any]]:
    """Mean ± std of ``metric`` per (method, n) over seeds, sorted by n then method."""
    groups: dict[tuple[str, int], list[float]] = defaultdict(list)
    for r in results:
        groups[(r["method"], r["n"])].append(float(r[metric]))
    return [{"method": m, "n": n, "mean": float(np.mean(v)), "std": float(np.std(v)), "seeds": len(v)}
            for (m, n), v in sorted(groups.items(), key=lambda kv: (kv[0][1], kv[0][0]))]


def markdown(summary: list[dict[str, Any]], metric: str) -> str:
    budgets = sorted({s["n"] for s in summary})
    methods = list(dict.fromkeys(s["method"] for s in summary))
    cell = {(s["method"], s["n"]): s for s in summary}
    lines = [f"| method | {' | '.join(f'n={n}' for n in budgets)} |", "|---|" + "---|" * len(budgets)]
    for m in methods:
        row = [f"{cell[(m, n)]['mean']:.4f} ± {cell[(m, n)]['std']:.4f}" if (m, n) in cell else "" for n in budgets]
        lines.append(f"| {m} | {' | '.join(row)} |")
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
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4))
    for m in dict.fromkeys(s["method"] for s in summary):
        pts = [s for s in summary if s["method"] == m]
        ax.errorbar([s["n"] for s in pts], [s["mean"] for s in pts], yerr=[s["std"] for s in pts], marker="o",
                    capsize=3, label=m)
    ax.set(xscale="log", xlabel="budget n", ylabel=metric, title=f"{metric} vs budget")
    ax.legend()
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, metadata={"Software": None})  # no timestamps: same bytes each run
    plt.close(fig)
    return buf.getvalue()


@task(name="report", cache_policy=ContentCache(code_version="report-2"), persist_result=True,
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
    return {"summary": summary, "markdown": table_md, "plot": plot.to_dict(), "report": text.to_dict()}


def publish(results: list[dict[str, Any]], rep: dict[str, Any]) -> None:
    """Prefect markdown + table artifacts of a report, for the run's page in the UI (on cache hits too)."""
    from prefect.artifacts import create_markdown_artifact, create_table_artifact

    create_markdown_artifact(markdown=rep["markdown"] + f"\n\nPlot: `{rep['plot']['uri']}`", key="skmm-report",
                             description="metric vs budget per selection method")
    create_table_artifact(table=[{k: v for k, v in r.items() if not isinstance(v, dict)} for r in results],
                          key="skmm-runs", description="one row per (method, budget, seed)")
