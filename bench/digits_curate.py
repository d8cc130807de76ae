"""SkMM against uniform on digits through the real curation flow (Prefect, open_clip features, linear probe).

Budgets n = 50, 100, 200; 5 selection seeds; accuracy and macro-F1 on the held-out test split. The acceptance
bar: SkMM no worse than uniform by more than one standard deviation at each budget. Run:
    .venv/bin/python bench/digits_curate.py [--model ViT-S-32] [--methods skmm_best,skmm,uniform]
        [--variant-choice val|proxy] [--gradients ft --finetune last_layers] [--sketch-dim auto|M]
        [--third-candidate] [--pivoted-candidate]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

from _common import record

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_HOME", tempfile.mkdtemp(prefix="skmm-bench-prefect-"))
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="ViT-S-32")
    parser.add_argument("--methods", default="skmm_best,skmm,skmm_v2,uniform")
    parser.add_argument("--budgets", default="50,100,200")
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--sketch-dim", default="64", help="m, or 'auto' (chosen per budget from the spectrum)")
    parser.add_argument("--gradients", default="lp", choices=["lp", "ft"],
                        help="lp: normalised features; ft: per-sample gradients of the last --layers blocks")
    parser.add_argument("--finetune", default="linear_probe", choices=["linear_probe", "last_layers"])
    parser.add_argument("--layers", type=int, default=1, help="tower blocks finetuned (and sketched, with ft)")
    parser.add_argument("--epochs", type=int, default=5, help="last_layers finetuning epochs (val picks the best)")
    parser.add_argument("--lr", type=float, default=1e-4, help="last_layers: the tower blocks' learning rate")
    parser.add_argument("--head-lr", type=float, default=1e-2, help="last_layers: the head's learning rate")
    parser.add_argument("--class-balanced", action="store_true")
    parser.add_argument("--variant-choice", default="val", choices=["val", "proxy"],
                        help="how skmm_best picks convex SkMM or SkMMv2 (val split, or the variance proxy)")
    parser.add_argument("--third-candidate", action="store_true",
                        help="skmm_best's val choice also tries convex SkMM with greedy_signal pivots")
    parser.add_argument("--pivoted-candidate", action="store_true",
                        help="and SkMM's pivoted seeding alone (a fourth candidate)")
    parser.add_argument("--tag", default="", help="suffix of the result file's name")
    parser.add_argument("--store", default=None, help="store URL (default: a temporary folder)")
    args = parser.parse_args()

    from flows.curate import FinetuneConfig, ModelConfig, curate
    from tasks.report import markdown, summarize_metrics

    store = args.store or tempfile.mkdtemp(prefix="skmm-bench-store-")
    sketch_dim = args.sketch_dim if args.sketch_dim == "auto" else int(args.sketch_dim)
    start = time.perf_counter()
    finetune = FinetuneConfig(kind=args.finetune, layers=args.layers, epochs=args.epochs, lr=args.lr,
                              head_lr=args.head_lr)
    result = curate(budgets=[int(b) for b in args.budgets.split(",")], methods=args.methods.split(","),
                    seeds=list(range(args.seeds)), model=ModelConfig(name=args.model), sketch_dim=sketch_dim,
                    gradients=args.gradients, finetune=finetune, class_balanced=args.class_balanced,
                    variant_choice=args.variant_choice, third_candidate=args.third_candidate,
                    pivoted_candidate=args.pivoted_candidate, store_url=store)
    wall = time.perf_counter() - start
    rows = [{**{k: r[k] for k in ("method", "n", "seed", "accuracy", "macro_f1")},
             **({"chosen": r["chosen"], "val": r["val"]} if "chosen" in r else {})} for r in result["results"]]
    acc, f1 = summarize_metrics(rows, "accuracy"), summarize_metrics(rows, "macro_f1")
    print(markdown(acc, "accuracy"))
    print(markdown(f1, "macro_f1"))
    verdict = {}
    for n in sorted({r["n"] for r in rows}):
        uni = next((s for s in acc if s["method"] == "uniform" and s["n"] == n), None)
        if uni is None:  # uniform not run: no verdict
            continue
        for s in acc:
            if s["n"] == n and s["method"].startswith("skmm"):
                verdict[f"{s['method']}@{n}"] = bool(s["mean"] >= uni["mean"] - uni["std"])
    ft = f"_ft{args.layers}_{args.finetune}_e{args.epochs}" if args.gradients == "ft" else ""
    name = f"digits_curate_{args.model}{ft}{'_balanced' if args.class_balanced else ''}"
    name += ("_proxy" if args.variant_choice == "proxy" else "") + ("_three" if args.third_candidate else "")
    name += "_four" if args.pivoted_candidate else ""
    record(name + args.tag, {
        "model": args.model, "sketch_dim": sketch_dim, "gradients": args.gradients, "finetune": args.finetune,
        "layers": args.layers, "epochs": args.epochs, "lr": args.lr, "head_lr": args.head_lr,
        "class_balanced": args.class_balanced,
        "variant_choice": args.variant_choice, "third_candidate": args.third_candidate,
        "pivoted_candidate": args.pivoted_candidate,
        "wall_s": round(wall, 1), "accuracy": acc, "macro_f1": f1,
        "skmm_not_worse_than_uniform_minus_1std": verdict, "runs": rows})


if __name__ == "__main__":
    main()
