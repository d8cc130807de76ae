"""The paper's synthetic table: risk of each selection method against the budget n, over several seeds.

Sequential methods (herding, k-center greedy, adaptive sampling) are run once per seed at the largest budget
and read off by prefix: their first n picks *are* their selection at budget n (same random stream), so this
is exact, not an approximation. Herding draws nothing at random, so it has one value per n.
"""

from __future__ import annotations

import csv
import pathlib
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from skmm.select import make_selector
from skmm.synthetic.gmm import make_gmm
from skmm.synthetic.risk import DEFAULT_ALPHAS, ridge_risk, ridge_risk_on_rows, ridge_risks_by_alpha

__all__ = ["SyntheticConfig", "run_synthetic", "summarize", "write_report"]

PREFIX_METHODS = {"herding", "kcenter", "adaptive"}
SCORE_METHODS = {"leverage", "ridge_leverage"}


def validation_rows(n_samples: int, fraction: float, seed: int) -> np.ndarray:
    """The labelled validation sample for ``skmm_best_val``: ⌈fraction·N⌉ rows drawn with default_rng([seed, 1])."""
    size = max(1, int(np.ceil(fraction * n_samples)))
    return np.sort(np.random.default_rng([seed, 1]).choice(n_samples, size, replace=False))


def _sample_scores(method: str, scores: np.ndarray, n: int, seed: int) -> np.ndarray:
    """The selector's draw from precomputed scores: its random stream, with the SVD's seed draw skipped over."""
    from skmm.select.leverage import _sample

    rng = np.random.default_rng(seed)
    rng.integers(2**31)  # the selector draws its SVD seed first
    return _sample(scores, n, rng)


@dataclass
class SyntheticConfig:
    """SKMM.md §6 defaults: N=3000, r=5000, 10 clusters, std_max=0.04, m=40, 8 seeds."""

    n_samples: int = 3000
    dim: int = 5000
    n_clusters: int = 10
    std_max: float = 0.04
    generator_seed: int = 0
    budgets: Sequence[int] = (48, 64, 80, 120, 200, 400, 800, 1600)
    seeds: Sequence[int] = tuple(range(8))
    sketch_dim: int = 40
    ridge_leverage_alpha: float = 1e4
    # SkMM's discretisation and SkMMv2's ridge and temperature were tuned on validation pools
    # (generator seeds 1 and 2, never the evaluation pool): bench/tune_synthetic.py
    skmm_v2_ridge: float | str = "auto"
    skmm_v2_temperature: float = 0.0
    skmm_discretization: str = "systematic"
    methods: Sequence[str] = ("skmm_best", "skmm", "skmm_v2", "uniform", "herding", "kcenter", "adaptive",
                              "leverage", "ridge_leverage")
    # > 0: also report ``skmm_best_val``, the pipeline's rule — of skmm_best's two candidate coresets keep the one
    # whose ridge fit has the lower risk on a labelled validation sample of this share of the pool (seeded per
    # seed); the ``skmm_best`` row is the label-free proxy rule (SkMMBest's own)
    val_fraction: float = 0.1
    # skmm_best_val's candidates: convex SkMM and SkMMv2, and with True (the pipeline's default) also convex SkMM
    # seeded by greedy pivots through the signal rank (SkMMBest(third_candidate=True))
    third_candidate: bool = True
    # and with True (the pipeline's default) also SkMM's pivoted seeding alone for the whole budget
    # (SkMMBest(pivoted_candidate=True); bench/README.md §14, "A fourth candidate")
    pivoted_candidate: bool = True
    # leverage / ridge leverage: compute the pool's scores once (first seed's SVD draw) and only sample per (n, seed)
    cache_scores: bool = False
    # True: every row also records the coreset's risk at the best α of the ridge's grid (``risk_best_alpha``,
    # ``best_alpha``), beside the risk at the α its 2-fold CV picks (``risk``): an evaluation aid (ridge_risks_by_alpha)
    alpha_grid: bool = False
    # True: every row also records the CV risk of the coreset as a set (``risk_shuffled_cv``, ``alpha_shuffled_cv``):
    # its rows in pool order, the 2-fold CV's folds shuffled with the row's seed (ridge_risk's ``fold_seed``), so
    # that the listing order of a selector does not enter; skmm_best_val's choice is then made with that fit too
    # (``chosen_shuffled_cv``). An evaluation aid beside the authors' risk (bench/README.md §14)
    shuffled_cv: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    def method_params(self, method: str) -> dict[str, Any]:
        m = self.sketch_dim
        return {
            "skmm_best": {
                "sketch_dim": m,
                "ridge": self.skmm_v2_ridge,
                "temperature": self.skmm_v2_temperature,
                "discretization": self.skmm_discretization,
                # the third coreset only serves skmm_best_val's choice: not fitted (nor timed) without it
                **({"third_candidate": True} if self.third_candidate and self.val_fraction > 0 else {}),
                **({"pivoted_candidate": True} if self.pivoted_candidate and self.val_fraction > 0 else {}),
            },
            "skmm": {"sketch_dim": m, "discretization": self.skmm_discretization},
            "skmm_v2": {"sketch_dim": m, "ridge": self.skmm_v2_ridge, "temperature": self.skmm_v2_temperature},
            "leverage": {"rank": m},
            "ridge_leverage": {"alpha": self.ridge_leverage_alpha},
            "sketched_ridge_leverage": {"sketch_dim": m, "alpha": self.ridge_leverage_alpha},
        }.get(method, {})


def run_synthetic(config: SyntheticConfig, progress: Callable[[dict], None] | None = None) -> dict[str, Any]:
    """Run every (method, n, seed); return {"rows": [...], "full_data_risk": float, "config": dict}."""
    pool = make_gmm(config.n_samples, config.dim, config.n_clusters, config.std_max, config.generator_seed)
    budgets = sorted(int(n) for n in config.budgets)
    if budgets[-1] > config.n_samples:
        raise ValueError(f"budget n={budgets[-1]} is larger than the pool (N={config.n_samples})")
    full_risk, full_alpha = ridge_risk(pool.X, pool.y)
    rows: list[dict[str, Any]] = []
    for method in config.methods:
        params = config.method_params(method)
        seeds = [config.seeds[0]] if method == "herding" else list(config.seeds)
        scores = None
        for seed in seeds:
            prefix = None
            if config.cache_scores and method in SCORE_METHODS and scores is None:
                start = time.perf_counter()
                scores = make_selector(method, budgets[0], random_state=seed, **params).fit(pool.X).scores_
                score_seconds = time.perf_counter() - start
            if method in PREFIX_METHODS:
                start = time.perf_counter()
                prefix = make_selector(method, budgets[-1], random_state=seed, **params).fit(pool.X).indices_
                prefix_seconds = time.perf_counter() - start
            for n in budgets:
                start = time.perf_counter()
                if prefix is not None:
                    indices, info = prefix[:n], {}
                    select_seconds = prefix_seconds * n / budgets[-1]
                elif scores is not None:
                    indices, info = _sample_scores(method, scores, n, seed), {}
                    select_seconds = score_seconds + time.perf_counter() - start
                else:
                    sel = make_selector(method, n, random_state=seed, **params).fit(pool.X)
                    indices, info = sel.indices_, sel.selection_.info
                    select_seconds = time.perf_counter() - start
                risk, alpha = ridge_risk(pool.X, pool.y, indices)
                row = {"method": method, "n": n, "seed": seed, "risk": risk, "alpha": alpha,
                       "select_seconds": round(select_seconds, 4),
                       "clusters_covered": int(np.unique(pool.cluster[indices]).size),
                       "chosen": info.get("chosen", "")}
                if config.alpha_grid:
                    row.update(_best_alpha(pool, indices))
                if config.shuffled_cv:
                    row.update(_shuffled_cv(pool, indices, seed))
                rows.append(row)
                if progress:
                    progress(row)
                if method == "skmm_best" and config.val_fraction > 0:
                    row = _val_choice_row(pool, info, config.val_fraction, row, indices, config.alpha_grid,
                                          config.shuffled_cv)
                    rows.append(row)
                    if progress:
                        progress(row)
    return {"rows": rows, "full_data_risk": full_risk, "full_data_alpha": full_alpha, "config": asdict(config)}


def _best_alpha(pool, indices: np.ndarray) -> dict[str, float]:
    risks = ridge_risks_by_alpha(pool.X, pool.y, indices)
    best = int(np.argmin(risks))
    return {"risk_best_alpha": float(risks[best]), "best_alpha": float(DEFAULT_ALPHAS[best])}


def _shuffled_cv(pool, indices: np.ndarray, seed: int) -> dict[str, float]:
    risk, alpha = ridge_risk(pool.X, pool.y, indices, fold_seed=seed)
    return {"risk_shuffled_cv": risk, "alpha_shuffled_cv": alpha}


def _choose_on_val(pool, candidates: dict[str, Any], val: np.ndarray, fold_seed: int | None = None
                   ) -> tuple[str, np.ndarray, float, float]:
    """The candidate whose ridge fit (``ridge_risk``'s folds: ``fold_seed``) has the lowest risk on the ``val`` rows,
    the first listed on ties: (its name, its rows, the same fit's risk on the whole pool, its α)."""
    best = None
    for variant, rows in candidates.items():
        idx = np.asarray(rows)
        (val_risk, risk), alpha = ridge_risk_on_rows(pool.X, pool.y, idx, (val, None), fold_seed=fold_seed)
        if best is None or val_risk < best[0]:
            best = (val_risk, variant, idx, risk, alpha)
    return best[1:]


def _val_choice_row(pool, info: dict[str, Any], fraction: float, proxy_row: dict[str, Any],
                    proxy_indices: np.ndarray, alpha_grid: bool = False, shuffled_cv: bool = False
                    ) -> dict[str, Any]:
    """The pipeline's rule on skmm_best's candidates (two, or three with ``third_candidate``): lower ridge risk on
    the validation rows wins (the first listed, convex SkMM, on ties), reported as method ``skmm_best_val``. With
    ``shuffled_cv`` the same rule runs again with the set's fit (shuffled folds) for ``risk_shuffled_cv``. The
    proxy row's best-α risk is reused where the choice is the proxy's own coreset."""
    val = validation_rows(pool.X.shape[0], fraction, proxy_row["seed"])
    variant, idx, risk, alpha = _choose_on_val(pool, info["candidates"], val)
    row = {**proxy_row, "method": "skmm_best_val", "risk": risk, "alpha": alpha,
           "clusters_covered": int(np.unique(pool.cluster[idx]).size), "chosen": variant}
    if alpha_grid and not np.array_equal(idx, proxy_indices):
        row.update(_best_alpha(pool, idx))
    if shuffled_cv:
        variant_s, _, risk_s, alpha_s = _choose_on_val(pool, info["candidates"], val, fold_seed=proxy_row["seed"])
        row.update({"risk_shuffled_cv": risk_s, "alpha_shuffled_cv": alpha_s, "chosen_shuffled_cv": variant_s})
    return row


def summarize(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean ± std (population, as the authors report) of the risk per (method, n)."""
    out = []
    keys = sorted({(r["method"], r["n"]) for r in rows}, key=lambda k: (k[1], k[0]))
    for method, n in keys:
        risks = np.array([r["risk"] for r in rows if r["method"] == method and r["n"] == n])
        out.append({"method": method, "n": n, "mean": float(risks.mean()), "std": float(risks.std()),
                    "runs": int(risks.size)})
    return out


def markdown_table(summary: list[dict[str, Any]], full_risk: float, methods: Sequence[str]) -> str:
    """n × method table; the lowest mean per n in bold."""
    budgets = sorted({s["n"] for s in summary})
    cell = {(s["method"], s["n"]): s for s in summary}
    best = {n: min((s for s in summary if s["n"] == n), key=lambda s: s["mean"])["method"] for n in budgets}
    lines = ["| method | " + " | ".join(f"n={n}" for n in budgets) + " |",
             "|---|" + "---|" * len(budgets)]
    for method in methods:
        cells = []
        for n in budgets:
            s = cell.get((method, n))
            if s is None:
                cells.append("")
                continue
            text = f"{s['mean']:.3g} ± {s['std']:.2g}"
            cells.append(f"**{text}**" if best[n] == method else text)
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    lines.append(f"\nFull-data ridge risk: {full_risk:.3g}")
    return "\n".join(lines)


def write_report(result: dict[str, Any], out_dir: str | pathlib.Path) -> dict[str, pathlib.Path]:
    """Write runs.csv, summary.csv, table.md and risk_vs_n.png under out_dir; return their paths."""
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows, summary = result["rows"], summarize(result["rows"])
    paths = {"runs": out / "runs.csv", "summary": out / "summary.csv", "table": out / "table.md",
             "plot": out / "risk_vs_n.png"}
    for key, data in (("runs", rows), ("summary", summary)):
        tmp = paths[key].with_suffix(".csv.tmp")
        with tmp.open("w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=list(data[0]))
            writer.writeheader()
            writer.writerows(data)
        tmp.replace(paths[key])
    methods = list(dict.fromkeys(r["method"] for r in rows))
    paths["table"].write_text(markdown_table(summary, result["full_data_risk"], methods) + "\n")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8.5, 4.5))
    for method in methods:
        pts = [s for s in summary if s["method"] == method]
        ns = [s["n"] for s in pts]
        means = np.array([s["mean"] for s in pts])
        stds = np.array([s["std"] for s in pts])
        lower = np.minimum(stds, 0.9 * means)  # a log axis cannot show mean − std <= 0
        ax.errorbar(ns, means, yerr=[lower, stds], label=method, marker="o", capsize=2, linewidth=1)
    ax.axhline(result["full_data_risk"], color="k", linestyle=":", label="full data")
    ax.set(xscale="log", yscale="log", xlabel="budget n", ylabel="risk L_D(θ_S)",
           title=f"Synthetic GMM (N={result['config']['n_samples']}, r={result['config']['dim']})")
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    tmp = paths["plot"].with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    tmp.replace(paths["plot"])
    return paths
