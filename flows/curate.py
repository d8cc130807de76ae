"""The curation flow: from a pool and a budget to a selected subset, a finetuned model, its evaluation against
the baselines, and lineage — every stage a cached, retried Prefect task exchanging small artifact refs.

    ingest → embed → gradients + sketch → for each (method, budget, seed): select → finetune → evaluate → report

Lineage is written by the flow around each stage (START, then COMPLETE or FAIL), so a rerun served from the
cache still records which artifacts its stages used.
"""

from __future__ import annotations

import itertools
from typing import Any, Literal

from prefect import flow, get_run_logger
from prefect.runtime import flow_run
from pydantic import BaseModel, Field, PositiveInt, model_validator

from skmm.select import SELECTORS
from storage.artifacts import ArtifactRef
from storage.datasets import DatasetRef, VectorTableRef
from storage.lineage import LineageRecorder, git_commit
from tasks.embed import embed
from tasks.evaluate import evaluate
from tasks.finetune import finetune_last_layers, linear_probe
from tasks.ingest import ingest
from tasks.report import publish, report
from tasks.select import select
from tasks.sketch import sketch
from tasks.store import DEFAULT_STORE, open_store, result_storage_path, store_spec

__all__ = ["FinetuneConfig", "ModelConfig", "SourceConfig", "curate"]


class SourceConfig(BaseModel):
    """Where the pool comes from. ``digits`` is the bundled default (scikit-learn's 1 797 handwritten digits)."""

    kind: Literal["digits", "folder", "manifest", "embeddings"] = "digits"
    path: str | None = None
    image_size: PositiveInt = 32
    val_fraction: float = Field(0.15, ge=0, lt=1)
    test_fraction: float = Field(0.15, gt=0, lt=1)
    seed: int = Field(0, ge=0)
    shard_rows: PositiveInt = 2048  # rows per Parquet shard: the unit the embed stage runs in parallel

    @model_validator(mode="after")
    def _path_needed(self) -> SourceConfig:
        if self.kind != "digits" and not self.path:
            raise ValueError(f"source kind {self.kind!r} needs a path")
        if self.kind == "digits" and self.path:
            raise ValueError("the digits source takes no path")
        if self.val_fraction + self.test_fraction >= 1:
            raise ValueError("val_fraction + test_fraction must leave a train split")
        return self


class ModelConfig(BaseModel):
    """The open_clip image tower. ``pretrained`` None = random init from ``init_seed`` (no download needed).

    The default, a random-init ViT-S-32, runs offline on a CPU and gives honest features (see bench/README.md);
    with network access or a local file, use a pretrained tower (e.g. ViT-B-32 / laion2b_s34b_b79k)."""

    name: str = "ViT-S-32"
    pretrained: str | None = None
    init_seed: int = Field(0, ge=0)


def _methods_known(methods: list[str]) -> list[str]:
    unknown = sorted(set(methods) - set(SELECTORS))
    if unknown:
        raise ValueError(f"unknown selection method(s) {unknown}; expected some of {sorted(SELECTORS)}")
    return methods


class FinetuneConfig(BaseModel):
    """How the selected samples are used: a linear probe on frozen features, or the last k tower blocks + head."""

    kind: Literal["linear_probe", "last_layers"] = "linear_probe"
    layers: PositiveInt = 1
    epochs: PositiveInt = 5
    lr: float = Field(1e-4, gt=0)
    head_lr: float = Field(1e-2, gt=0)


def select_finetune_evaluate(rec: LineageRecorder, opts: dict, store: dict, dataset: dict, emb: dict | None, sk: dict,
                             methods: list[str], budgets: list[int], seeds: list[int],
                             class_balanced: bool = False, finetune: FinetuneConfig | None = None,
                             model: dict[str, Any] | None = None,
                             task: str = "classification") -> list[dict[str, Any]]:
    """For each (method, budget, seed): select → finetune → evaluate, each a recorded stage."""
    finetune = finetune or FinetuneConfig()
    features = [VectorTableRef.from_dict(emb).artifact] if emb is not None else []
    sk_ref = VectorTableRef.from_dict(sk).artifact
    head_seed = seeds[0]  # FT: finetune from the head the sketched gradients were taken at
    results = []
    for method, n, seed in itertools.product(methods, budgets, seeds):
        tag = f"{method}.n{n}.s{seed}"
        with rec.stage(f"select.{tag}", [sk_ref]):
            sel = select.with_options(**opts)(sk, dataset, store, method, n, seed, class_balanced=class_balanced)
            sel_ref = ArtifactRef.from_dict(sel["selection"])
            rec.complete(f"select.{tag}", selection=sel_ref)
        with rec.stage(f"finetune.{tag}", [sel_ref, *features]):
            if finetune.kind == "last_layers":
                fit = finetune_last_layers.with_options(**opts)(
                    dataset, sel["selection"], store, model, k=finetune.layers, epochs=finetune.epochs,
                    lr=finetune.lr, head_lr=finetune.head_lr, seed=head_seed)
            else:
                fit = linear_probe.with_options(**opts)(emb, dataset, sel["selection"], store, task=task)
            model_ref = ArtifactRef.from_dict(fit["model"])
            rec.complete(f"finetune.{tag}", selection=sel_ref, model=model_ref)
        with rec.stage(f"evaluate.{tag}", [model_ref]):
            metrics = evaluate.with_options(**opts)(fit["model"], emb, dataset, store)
            rec.complete(f"evaluate.{tag}", metrics=metrics)
        results.append({"method": method, "n": n, "seed": seed, **metrics,
                        "selection": sel["selection"], "model": fit["model"]})
    return results


def report_stage(rec: LineageRecorder, opts: dict, store: dict, results: list[dict[str, Any]]) -> dict[str, Any]:
    """The report stage: plot + table in the store, published as Prefect artifacts (accuracy, or MAE)."""
    metric = "accuracy" if all("accuracy" in r for r in results) else "mae"
    with rec.stage("report"):
        rep = report.with_options(**opts)(results, store, metric=metric)
        publish(results, rep)
        rec.complete("report", outputs=[ArtifactRef.from_dict(rep["plot"]), ArtifactRef.from_dict(rep["report"])])
    return rep


@flow(name="curate", log_prints=True)
def curate(
    source: SourceConfig = SourceConfig(),  # noqa: B008 - pydantic defaults are immutable in practice
    budgets: list[PositiveInt] = [50, 100, 200],  # noqa: B006
    methods: list[str] = ["skmm_best", "uniform"],  # noqa: B006
    seeds: list[int] = [0],  # noqa: B006
    model: ModelConfig = ModelConfig(),  # noqa: B008
    sketch_dim: PositiveInt | None = 64,
    gradients: Literal["lp", "ft"] = "lp",
    finetune: FinetuneConfig = FinetuneConfig(),  # noqa: B008
    task: Literal["classification", "regression"] = "classification",
    class_balanced: bool = False,
    store_url: str = DEFAULT_STORE,
    endpoint_url: str | None = None,
    batch_size: PositiveInt = 64,
) -> dict[str, Any]:
    """Select ``budgets`` samples with each method and seed, finetune on each selection (a linear probe, or the
    last layers of the tower), evaluate on the test split, and report. Returns refs and metrics (small JSON).

    ``task``: "classification" (logistic probe; accuracy, macro-F1) or "regression" (numeric labels; ridge probe;
    MAE). ``gradients``: "lp" (normalised features) or "ft" (per-sample gradients of the last ``finetune.layers``
    tower blocks with random pseudo-labels); the sketch uses the first seed, selections every seed."""
    logger = get_run_logger()
    _methods_known(methods)
    if task == "regression" and (class_balanced or finetune.kind != "linear_probe"):
        raise ValueError("regression labels need finetune kind 'linear_probe' (a ridge probe) and no class balancing")
    store = store_spec(store_url, endpoint_url)
    st = open_store(store)
    st.check()
    results_path = result_storage_path(store)
    opts = {"result_storage": results_path}
    config = {"source": source.model_dump(), "budgets": budgets, "methods": methods, "seeds": seeds,
              "model": model.model_dump(), "sketch_dim": sketch_dim, "class_balanced": class_balanced,
              "gradients": gradients, "finetune": finetune.model_dump(), "task": task}
    rec = LineageRecorder(st, flow_run_id=flow_run.get_id(), git_commit=git_commit(), config=config)
    logger.info("run %s: store %s", rec.run_id, st)

    with rec.stage("ingest"):
        ing = ingest.with_options(**opts)(source.model_dump(), store)
        dataset = DatasetRef.from_dict(ing["dataset"])
        outputs = [dataset.manifest] + ([ArtifactRef.from_dict(ing["quarantine"])] if ing.get("quarantine") else [])
        rec.complete("ingest", outputs=outputs, metrics={"samples": ing["n_samples"],
                                                         "quarantined": ing["n_quarantined"]})
    if ing["n_quarantined"]:
        logger.warning("%d file(s) quarantined (unreadable); see %s", ing["n_quarantined"], ing["quarantine"]["uri"])

    needs_features = gradients == "lp" or finetune.kind == "linear_probe"
    emb, emb_inputs = None, [dataset.manifest]
    if needs_features:  # FT gradients + last-layers finetuning work on the images alone
        with rec.stage("embed", [dataset.manifest]):
            if ing.get("vectors"):
                emb = ing["vectors"]
            else:
                emb = embed(ing["dataset"], model.model_dump(), store, opts, batch_size=batch_size)
            emb_inputs = [VectorTableRef.from_dict(emb).artifact]
            rec.complete("embed", outputs=emb_inputs)

    with rec.stage("sketch", emb_inputs):
        sk = sketch.with_options(**opts)(emb, ing["dataset"], store, sketch_dim=sketch_dim, seed=seeds[0],
                                         mode=gradients, model=model.model_dump(), k=finetune.layers)
        sk_ref = VectorTableRef.from_dict(sk).artifact
        rec.complete("sketch", outputs=[sk_ref])

    results = select_finetune_evaluate(rec, opts, store, ing["dataset"], emb, sk, methods, budgets, seeds,
                                       class_balanced, finetune, model.model_dump(), task)
    rep = report_stage(rec, opts, store, results)
    return {"run_id": rec.run_id, "store": st.url, "dataset": ing["dataset"], "quarantined": ing["n_quarantined"],
            "embeddings": emb, "sketch": sk, "results": results, "report": rep}
