"""Validating the automatic sketch dimension m (issue 10): candidate rules on digits' val split and on the
robustness protocol's validation half — never on a test split or the protocol's test half.

A rule maps the spectrum λ of the pool's m_max-column sketch and the budget n to m
(:func:`skmm.select.spectrum.auto_sketch_dim` with a share and a cap), or is a fixed m. Every rule is applied as
the pipeline applies ``sketch_dim="auto"``: project the m_max-column sketch onto its leading m eigenvectors and
select on that (the "gauss" rules instead draw a Gaussian sketch to m, as ``--sketch-dim M`` does).

Digits (``--part digits``): the pipeline's own inputs — one ``curate`` run (tiny budget, uniform) stores the
dataset, the features and the 256-column LP sketch; then, per rule, budget and seed, convex SkMM and SkMMv2 select
from the train split, a linear probe (C chosen on val) is fit, and the val accuracy (what a rule is chosen by)
and the test accuracy (reported only) are recorded. Protocol (``--part protocol``): the validation half's
configurations of bench/robustness.py, 4 seeds; each rule's convex/greedy risks relative to the configured m's.

    .venv/bin/python bench/auto_m.py --part digits --model ViT-S-32
    .venv/bin/python bench/auto_m.py --part protocol
→ bench/out/auto_m_{digits_<model>,protocol}.json

A rule may also carry selector parameters: ``params`` for both variants, ``by_variant`` for one (the seeding's
``pivoting`` rules of issue 10, bench/README.md "Budgets about equal to the cluster count").
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_HOME", tempfile.mkdtemp(prefix="skmm-bench-prefect-"))
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
sys.path.insert(0, str(Path(__file__).resolve().parent))

RULES: dict[str, dict[str, Any]] = {
    "share0.9_cap0.5": {"share": 0.9, "cap": 0.5},  # the rule shipped before this validation
    "share0.95_cap0.5": {"share": 0.95, "cap": 0.5},
    "share0.99_cap0.5": {"share": 0.99, "cap": 0.5},
    "share0.99_cap1": {"share": 0.99, "cap": 1.0},
    "share0.9_cap1": {"share": 0.9, "cap": 1.0},
    "c0.9_cap1": {"share": 0.9, "cap": 1.0, "centered": True},
    "c0.95_cap1": {"share": 0.95, "cap": 1.0, "centered": True},
    "c0.99_cap1": {"share": 0.99, "cap": 1.0, "centered": True},
    "c0.99_cap0.5": {"share": 0.99, "cap": 0.5, "centered": True},
    "c0.99_cap2": {"share": 0.99, "cap": 2.0, "centered": True},
    "floor64_rank2": {"floor": 64, "rank_mult": 2},
    "floor32_rank2": {"floor": 32, "rank_mult": 2},
    "eig8": {"fixed": 8},
    "eig16": {"fixed": 16},
    "eig32": {"fixed": 32},
    "eig64": {"fixed": 64},
    "eig128": {"fixed": 128},
    "eig256": {"fixed": 256},
    "gauss64": {"gauss": 64},
    # issue 10, budgets about equal to the cluster count: the shipped m with another seeding pivot rule
    # ("params" go to both SkMM variants' constructors)
    "floor64_rank2_greedy": {"floor": 64, "rank_mult": 2, "params": {"pivoting": "greedy"}},
    "floor64_rank2_pow2": {"floor": 64, "rank_mult": 2, "params": {"pivoting": 2.0}},
    "floor64_rank2_pow4": {"floor": 64, "rank_mult": 2, "params": {"pivoting": 4.0}},
    "floor64_rank2_gsignal": {"floor": 64, "rank_mult": 2, "params": {"pivoting": "greedy_signal"}},
    "floor64_rank2_banded": {"floor": 64, "rank_mult": 2, "params": {"pivoting": "banded"}},
    "floor64_rank2_bsignal": {"floor": 64, "rank_mult": 2, "params": {"pivoting": "banded_signal"}},
    "floor64_rank2_dsignal": {"floor": 64, "rank_mult": 2, "params": {"pivoting": "directed_signal"}},
    "floor64_rank2_directed": {"floor": 64, "rank_mult": 2, "params": {"pivoting": "directed"}},
    # per variant ("by_variant": constructor params of convex SkMM / SkMMv2 only)
    "floor64_rank2_convex_gsignal": {"floor": 64, "rank_mult": 2,
                                     "by_variant": {"skmm": {"pivoting": "greedy_signal"}}},
    "floor64_rank2_convex_bsignal": {"floor": 64, "rank_mult": 2,
                                     "by_variant": {"skmm": {"pivoting": "banded_signal"}}},
    "floor64_rank2_convex_dsignal": {"floor": 64, "rank_mult": 2,
                                     "by_variant": {"skmm": {"pivoting": "directed_signal"}}},
    # the old default pivoting for both (to compare once convex SkMM's default changed)
    "floor64_rank2_sampled": {"floor": 64, "rank_mult": 2, "params": {"pivoting": "sampled"}},
    # a third candidate for skmm_best_val's choice on the val sample: convex SkMM with greedy_signal pivots beside
    # the two shipped variants ("extra": name -> (variant, constructor params))
    "floor64_rank2_three": {"floor": 64, "rank_mult": 2,
                            "extra": {"skmm_gsignal": ("skmm", {"pivoting": "greedy_signal"})}},
    # a fourth: SkMM's seeding step alone for the whole budget (randomly pivoted sampling on the reduced sketch)
    "floor64_rank2_four": {"floor": 64, "rank_mult": 2,
                           "extra": {"skmm_gsignal": ("skmm", {"pivoting": "greedy_signal"}),
                                     "pivoted": ("skmm_pivoted", {})}},
    # convex SkMM with pivoting="auto": greedy pivots through the signal rank only when the budget is tight,
    # n < ``tight`` × signal rank (skmm.select.spectrum.pivoting_for), beside the other three candidates
    **{f"floor64_rank2_four_tight{t}": {"floor": 64, "rank_mult": 2, "tight": t,
                                        "by_variant": {"skmm": {"pivoting": "auto"}},
                                        "extra": {"skmm_gsignal": ("skmm", {"pivoting": "greedy_signal"}),
                                                  "pivoted": ("skmm_pivoted", {})}}
       for t in (1.5, 2, 3, 5)},
    # the four candidates with convex SkMM's sampled pivots, its default before pivoting="auto" (rules that name no
    # pivoting run the selectors' defaults of the code that ran them)
    "floor64_rank2_four_sampled": {"floor": 64, "rank_mult": 2, "by_variant": {"skmm": {"pivoting": "sampled"}},
                                   "extra": {"skmm_gsignal": ("skmm", {"pivoting": "greedy_signal"}),
                                             "pivoted": ("skmm_pivoted", {})}},
    # the same for convex SkMM alone (no extra candidates: its own column is the point)
    **{f"floor64_rank2_convex_tight{t}": {"floor": 64, "rank_mult": 2, "tight": t,
                                          "by_variant": {"skmm": {"pivoting": "auto"}}} for t in (2, 5)},
    # … with greedy pivots for the whole seeding at a tight budget, not only through the signal rank
    # (skmm.select.spectrum.TIGHT_PIVOTING; dev d10 n = 40, bench/pivot_coverage.py)
    "floor64_rank2_convex_tight5_greedy": {"floor": 64, "rank_mult": 2, "tight": 5, "tight_pivoting": "greedy",
                                           "by_variant": {"skmm": {"pivoting": "auto"}}},
}


def rule_params(rule: dict[str, Any], variant: str) -> dict[str, Any]:
    """Constructor parameters a rule gives the variant ("skmm" or "skmm_v2")."""
    return {**rule.get("params", {}), **rule.get("by_variant", {}).get(variant, {})}


def centered_spectrum(S: np.ndarray) -> np.ndarray:
    """Eigenvalues (descending) of the sketch's covariance Σ̃ − μμᵀ: the energy of variation, not of the mean."""
    from skmm.select.moment_matching import gram

    mu = S.astype(np.float64).mean(axis=0)
    return np.maximum(np.linalg.eigvalsh(gram(S) / S.shape[0] - np.outer(mu, mu))[::-1], 0.0)


def choose_m(lam: np.ndarray, n: int, rule: dict[str, Any], lam_c: np.ndarray | None = None) -> int:
    from skmm.select.spectrum import auto_sketch_dim

    if "fixed" in rule:
        return int(min(rule["fixed"], lam.size))
    if "floor" in rule:  # at least ``floor`` directions, more when the spectrum's gap shows more signal ones
        from skmm.select.spectrum import signal_rank

        return int(min(lam.size, max(rule["floor"], rule["rank_mult"] * signal_rank(lam))))
    if rule.get("centered"):  # m from the covariance's energy, plus the mean's direction
        m_c = auto_sketch_dim(lam_c, 10**9, share=rule["share"], cap=1.0, minimum=1)
        return int(min(lam.size, max(8, min(m_c + 1, int(rule["cap"] * n)))))
    return auto_sketch_dim(lam, n, share=rule["share"], cap=rule["cap"])


def reduced(S: np.ndarray, lam: np.ndarray, V: np.ndarray, m: int) -> np.ndarray:
    return (S @ V[:, :m].astype(S.dtype)).astype(S.dtype)


def protocol_sketch(X: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(S, λ, V) for a protocol pool as the library's auto path makes them: the m_max-column Gaussian sketch seeded
    by the selector's first draw of ``seed``, and the eigenpairs (descending) of its moment SᵀS/N."""
    from skmm.select.moment_matching import AUTO_M_MAX, _eigen_moments, sketch_pool

    S, _ = sketch_pool(X, AUTO_M_MAX, int(np.random.default_rng(seed).integers(2**31)))
    lam, V = _eigen_moments(S)
    return S, lam, V


def digits(model: str, seeds: int, budgets: list[int], rules: list[str]) -> dict[str, Any]:
    from flows.curate import ModelConfig, curate
    from skmm.finetune.linear_probe import LinearProbe
    from skmm.gradients.features import normalize_features
    from skmm.select import SkMM, SkMMv2
    from skmm.select.moment_matching import _eigen_moments, sketch_pool
    from skmm.select.sketched_pivots import SketchedPivots
    from storage.datasets import DatasetRef, VectorTableRef, read_vectors
    from tasks.finetune import STRENGTHS
    from tasks.sketch import pool_ids
    from tasks.store import open_store

    store = tempfile.mkdtemp(prefix="skmm-auto-m-")
    res = curate(budgets=[20], methods=["uniform"], seeds=[0], model=ModelConfig(name=model), sketch_dim="auto",
                 store_url=store)
    st = open_store({"url": res["store"]})
    ds = DatasetRef.from_dict(res["dataset"])
    emb, sk = VectorTableRef.from_dict(res["embeddings"]), VectorTableRef.from_dict(res["sketch"])
    train_ids, train_y = pool_ids(st, ds, "train")
    val_ids, val_y = pool_ids(st, ds, "val")
    test_ids, test_y = pool_ids(st, ds, "test")
    _, S = read_vectors(st, sk, sample_ids=train_ids)
    _, F = read_vectors(st, emb, sample_ids=train_ids + val_ids + test_ids)
    F = normalize_features(F)
    Xtr, Xval, Xte = F[:len(train_ids)], F[len(train_ids):len(train_ids) + len(val_ids)], F[-len(test_ids):]
    ytr, yval, yte = np.asarray(train_y), np.asarray(val_y), np.asarray(test_y)
    lam, V = _eigen_moments(S)
    lam_c = centered_spectrum(S)
    rows = []
    for name in rules:
        rule = RULES[name]
        for n in budgets:
            m = None if "gauss" in rule else choose_m(lam, n, rule, lam_c)
            for seed in range(seeds):
                classes = {"skmm": SkMM, "skmm_v2": SkMMv2}
                candidates = [(v, classes[v], rule_params(rule, v)) for v in classes]
                classes["skmm_pivoted"] = SketchedPivots  # only as an "extra" candidate
                candidates += [(extra, classes[v], p) for extra, (v, p) in rule.get("extra", {}).items()]
                for variant, cls, params in candidates:
                    if "gauss" in rule:  # the pipeline's --sketch-dim M: a Gaussian sketch of the features
                        X, _ = sketch_pool(S, rule["gauss"], 0) if S.shape[1] > rule["gauss"] else (S, None)
                        mm = X.shape[1]
                    else:
                        X, mm = reduced(S, lam, V, m), m
                    idx = cls(n, random_state=seed, **params).fit(X).indices_
                    probe = LinearProbe(strengths=list(STRENGTHS)).fit(Xtr[idx], ytr[idx], Xval, yval)
                    rows.append({"rule": name, "n": n, "seed": seed, "variant": variant, "m": int(mm),
                                 "val": float(np.mean(probe.predict(Xval) == yval)),
                                 "test": float(np.mean(probe.predict(Xte) == yte))})
            print(name, n, "m =", m, flush=True)
    return {"model": model, "sketch_columns": int(S.shape[1]), "spectrum": lam.tolist(),
            "centered_spectrum": lam_c.tolist(), "rows": rows}


@contextlib.contextmanager
def tight_budget_rule(rule: dict[str, Any]) -> Iterator[None]:
    """Fit under the rule's own tight-budget multiple and pivots (skmm.select.spectrum's module constants, which
    ``pivoting="auto"`` reads), the shipped ones restored afterwards."""
    from skmm.select import spectrum

    shipped = spectrum.TIGHT_BUDGET_MULTIPLE, spectrum.TIGHT_PIVOTING
    spectrum.TIGHT_BUDGET_MULTIPLE = rule.get("tight", shipped[0])
    spectrum.TIGHT_PIVOTING = rule.get("tight_pivoting", shipped[1])
    try:
        yield
    finally:
        spectrum.TIGHT_BUDGET_MULTIPLE, spectrum.TIGHT_PIVOTING = shipped


def protocol(seeds: int, rules: list[str], max_n: int = 200, halves: tuple[str, ...] = ("val", "paper"),
             seed_offset: int = 0, shuffled_cv: bool = False) -> dict[str, Any]:
    """Each rule on the protocol's validation half and the paper's pool (budgets <= max_n), per (config, n, seed):
    convex and greedy risks and the pipeline's val-sample choice between them (skmm_best_val's rule). Seeds
    ``seed_offset`` … ``seed_offset + seeds - 1`` (another offset: a replicate, bench/seed_replicates.py).
    ``shuffled_cv``: every risk (and the val choice's) with each coreset as a set, its CV folds shuffled by the seed
    (``ridge_risk``'s ``fold_seed``) instead of the authors' contiguous halves."""
    import robustness

    from skmm.select import SkMM, SkMMv2
    from skmm.select.sketched_pivots import SketchedPivots
    from skmm.synthetic.benchmark import validation_rows
    from skmm.synthetic.risk import ridge_risk_on_rows

    configs = [c for c in robustness.all_configs() if c["half"] in halves]
    rows = []
    for cfg in configs:
        pool = robustness.make_pool(cfg)
        start = time.perf_counter()
        for seed in range(seed_offset, seed_offset + seeds):
            S, lam, V = protocol_sketch(pool.X, seed)
            lam_c = centered_spectrum(S)
            val = validation_rows(pool.X.shape[0], 0.1, seed)
            for name in rules:
                for n in [b for b in cfg["budgets"] if b <= max_n]:
                    m = choose_m(lam, n, RULES[name], lam_c)
                    X = reduced(S, lam, V, m)
                    risks = {}
                    classes = {"skmm": SkMM, "skmm_v2": SkMMv2}
                    candidates = [(v, classes[v], rule_params(RULES[name], v)) for v in classes]
                    classes["skmm_pivoted"] = SketchedPivots  # only as an "extra" candidate
                    candidates += [(extra, classes[v], p) for extra, (v, p) in RULES[name].get("extra", {}).items()]
                    folds = seed if shuffled_cv else None
                    for variant, cls, params in candidates:
                        with tight_budget_rule(RULES[name]):
                            idx = cls(n, random_state=seed, **params).fit(X).indices_
                        risks[variant] = ridge_risk_on_rows(pool.X, pool.y, idx, (None, val), fold_seed=folds)[0]
                    chosen = min(risks, key=lambda v: (risks[v][1], v != "skmm"))
                    rows.append({"config": cfg["name"], "half": cfg["half"], "rule": name, "n": n, "seed": seed,
                                 "m": m, "skmm": risks["skmm"][0], "skmm_v2": risks["skmm_v2"][0],
                                 "skmm_best_val": risks[chosen][0], "chosen": chosen})
        print(cfg["name"], f"{time.perf_counter() - start:.0f} s", flush=True)
    return {"rows": rows, "configs": configs}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--part", choices=["digits", "protocol"], required=True)
    parser.add_argument("--model", default="ViT-S-32")
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--budgets", default="50,100,200")
    parser.add_argument("--halves", default="val,paper",
                        help="protocol halves: choose a rule on val (and the paper's pool); test only to report")
    parser.add_argument("--tag", default="", help="suffix of the output file's name")
    parser.add_argument("--rules", default=",".join(RULES))
    parser.add_argument("--seed-offset", type=int, default=0, help="protocol: the first seed (a replicate's seeds)")
    parser.add_argument("--shuffled-cv", action="store_true",
                        help="protocol: the risk of each coreset as a set (shuffled CV folds); the bar is then the "
                             "--best-other run's risk_shuffled_cv column")
    parser.add_argument("--best-other", default="",
                        help="protocol: the robustness run (label) whose other methods set the bar, e.g. a "
                             "replicate's with the same seeds (default: the runs of §14 at seeds 0-3)")
    args = parser.parse_args()
    rules = args.rules.split(",")
    start = time.perf_counter()
    if args.part == "digits":
        out = digits(args.model, args.seeds, [int(b) for b in args.budgets.split(",")], rules)
        name = f"auto_m_digits_{args.model}"
    else:
        if args.shuffled_cv and not args.best_other:
            parser.error("--shuffled-cv needs --best-other: a robustness run with --shuffled-cv")
        out = protocol(args.seeds, rules, halves=tuple(args.halves.split(",")), seed_offset=args.seed_offset,
                       shuffled_cv=args.shuffled_cv)
        out["best_other"] = args.best_other
        out["column"] = "risk_shuffled_cv" if args.shuffled_cv else "risk"
        name = "auto_m_protocol"
    out["wall_s"] = time.perf_counter() - start
    name += args.tag
    path = Path(os.environ.get("SKMM_BENCH_OUT", Path(__file__).parent / "out")) / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=1))
    print(summarise(out) if args.part == "digits" else summarise_protocol(out))
    print("wrote", path)


def summarise(out: dict[str, Any]) -> str:
    rows = out["rows"]
    keys = sorted({(r["rule"], r["n"]) for r in rows})
    lines = ["| rule | n | m | skmm val | skmm_v2 val | best-of val | skmm test | skmm_v2 test | best-of test |",
             "|---|---|---|---|---|---|---|---|---|"]
    for rule, n in keys:
        sub = [r for r in rows if r["rule"] == rule and r["n"] == n]
        by = {v: [r for r in sub if r["variant"] == v] for v in ("skmm", "skmm_v2")}
        seeds = sorted({r["seed"] for r in sub})
        best = [max((r for r in sub if r["seed"] == s), key=lambda r: r["val"]) for s in seeds]
        cells = [f"{np.mean([r['val'] for r in by['skmm']]):.3f}", f"{np.mean([r['val'] for r in by['skmm_v2']]):.3f}",
                 f"{np.mean([r['val'] for r in best]):.3f}", f"{np.mean([r['test'] for r in by['skmm']]):.3f}",
                 f"{np.mean([r['test'] for r in by['skmm_v2']]):.3f}", f"{np.mean([r['test'] for r in best]):.3f}"]
        lines.append(f"| {rule} | {n} | {sub[0]['m']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def best_other(label: str = "", column: str = "risk") -> dict[tuple[str, int], float]:
    """(config, n) → the lowest mean risk of every other method (robustness.py's "best other"): the baseline run's
    non-SkMM rows and the current run's convex SkMM and SkMMv2 at the configuration's own m; with ``label``, every
    non-skmm_best row of that robustness run (e.g. a replicate at other seeds; "A+B" as
    ``robustness.read_label``), its ``column``."""
    import robustness

    if label:
        return robustness.best_other_means(robustness.read_label(label), column)

    rows = [r for r in robustness.read_runs(robustness.RESULTS / "baseline" / "runs.csv")
            if r["method"] not in ("skmm", "skmm_v2", *robustness.SKMM_BEST_ROWS)]
    rows += [r for r in robustness.read_runs(robustness.RESULTS / "now" / "runs.csv")
             if r["method"] in ("skmm", "skmm_v2")]
    # the development family: every other method (convex SkMM and SkMMv2 at the configured m included) in one run
    rows += [r for r in robustness.read_runs(robustness.RESULTS / "dev" / "runs.csv")
             if r["method"] not in robustness.SKMM_BEST_ROWS]
    return robustness.best_other_means(rows)


def summarise_protocol(out: dict[str, Any]) -> str:
    """Per rule and half: the share of (config, n <= 200) cells where the val-choice row is within 1.1× the best
    other method, its worst ratio, and convex SkMM's worst ratio."""
    import robustness

    best = best_other(out.get("best_other", ""), out.get("column", "risk"))
    rows = out["rows"]
    lines = ["| rule | half | cells | skmm_best_val <= 1.1x | worst | median | convex worst | greedy worst | m range |",
             "|---|---|---|---|---|---|---|---|---|"]
    for rule in sorted({r["rule"] for r in rows}):
        for half in ("val", "dev", "paper", "test"):
            sub = [r for r in rows if r["rule"] == rule and r["half"] == half]
            if not sub:
                continue
            ratio = robustness.mean_ratios(sub, best, ("skmm_best_val", "skmm", "skmm_v2"))
            keys = list(ratio)
            vals = np.array([ratio[k]["skmm_best_val"] for k in keys])
            ms = [r["m"] for r in sub]
            lines.append(f"| {rule} | {half} | {len(keys)} | {np.mean(vals <= 1.1):.0%} | {vals.max():.2f} | "
                         f"{np.median(vals):.2f} | {max(ratio[k]['skmm'] for k in keys):.2f} | "
                         f"{max(ratio[k]['skmm_v2'] for k in keys):.2f} | {min(ms)}–{max(ms)} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
