"""The curation flow: from a pool and a budget to a selected subset, a finetuned model, its evaluation against
the baselines, and lineage — every stage a cached, retried Prefect task exchanging small artifact refs.

    ingest → embed → gradients + sketch → for each (method, budget, seed): select → finetune → evaluate → report

Lineage is written by the flow around each stage (START, then COMPLETE or FAIL), so a rerun served from the
cache still records which artifacts its stages used.
"""

from __future__ import annotations

import itertools
import pathlib
from dataclasses import dataclass, replace
from typing import Any, Literal

from prefect import flow, get_run_logger
from prefect.runtime import flow_run
from pydantic import BaseModel, Field, PositiveInt, model_serializer, model_validator

from flows.faults import check_fault
from flows.runners import task_runner_from_env
from skmm.models.clip import check_model_name, check_precision
from skmm.select import SELECTORS
from skmm.select.moment_matching import AUTO_M_MAX
from storage.artifacts import ArtifactRef
from storage.datasets import DatasetRef, VectorTableRef
from storage.ingest import DEFAULT_MAX_PIXELS
from storage.lineage import LineageRecorder, code_provenance
from storage.runs import record_run_result
from tasks.embed import embed_with_counts
from tasks.evaluate import evaluate
from tasks.finetune import VAL_LIMIT, finetune_last_layers, linear_probe
from tasks.ingest import ingest
from tasks.report import FULL_POOL, publish, report
from tasks.select import select
from tasks.sketch import gradients_sketch
from tasks.sketch_moment import sketch_moment
from tasks.store import DEFAULT_STORE, open_store, result_storage, store_spec

__all__ = ["FinetuneConfig", "ModelConfig", "SourceConfig", "check_methods", "curate", "select_finetune_evaluate",
           "source_config"]


class SourceConfig(BaseModel):
    """Where the pool comes from. ``digits`` is the bundled default (scikit-learn's 1 797 handwritten digits)."""

    kind: Literal["digits", "folder", "manifest", "webdataset", "embeddings"] = "digits"
    path: str | None = None
    image_size: PositiveInt = 32
    val_fraction: float = Field(0.15, ge=0, lt=1)
    test_fraction: float = Field(0.15, gt=0, lt=1)
    seed: int = Field(0, ge=0)
    shard_rows: PositiveInt = 2048  # rows per Parquet shard: the unit the embed stage runs in parallel
    max_pixels: PositiveInt = DEFAULT_MAX_PIXELS  # larger images are quarantined (Pillow's default limit)

    @model_validator(mode="after")
    def _path_needed(self) -> SourceConfig:
        if self.kind != "digits" and not self.path:
            raise ValueError(f"source kind {self.kind!r} needs a path")
        if self.kind == "digits" and self.path:
            raise ValueError("the digits source takes no path")
        if self.val_fraction + self.test_fraction >= 1:
            raise ValueError("val_fraction + test_fraction must leave a train split")
        return self


MANIFEST_SUFFIXES = (".csv", ".tsv", ".parquet")


def _is_webdataset(path: str, local: bool) -> bool:
    """A .tar shard, a brace pattern or glob of them (local or URL), or a local folder of .tar files only."""
    if path.lower().endswith((".tar", ".tar}", ".tar.gz", ".tar.gz}", ".tgz", ".tgz}")):
        return True
    folder = pathlib.Path(path)
    if not local or not folder.is_dir():
        return False
    visible = [p for p in folder.iterdir() if not p.name.startswith(".")]
    return any(p.name.lower().endswith(".tar") and p.is_file() for p in visible) and not any(
        p.is_dir() for p in visible)


def source_config(source: str = "digits", embeddings: bool = False, image_size: int = 32, seed: int = 0,
                  absolute: bool = False, max_pixels: int = DEFAULT_MAX_PIXELS) -> SourceConfig:
    """The SourceConfig a command-line source names: 'digits', an image folder, WebDataset shards (a .tar file,
    a folder of .tar files, a brace pattern like ``shards-{000000..000009}.tar`` or a glob like
    ``s3://bucket/pool/*.tar``), a manifest (.csv/.tsv/.parquet, or an existing local file) or, with
    ``embeddings``, a vector table. ``absolute`` resolves a local path (for scheduled runs, whatever their
    working folder); ``max_pixels``: larger images are quarantined."""
    if source == "digits":
        return SourceConfig(image_size=image_size, seed=seed)
    local = "://" not in source
    path = str(pathlib.Path(source).expanduser().resolve()) if local and absolute else source
    if embeddings:
        return SourceConfig(kind="embeddings", path=path, seed=seed)
    if _is_webdataset(path, local):
        return SourceConfig(kind="webdataset", path=path, seed=seed, max_pixels=max_pixels)
    is_dir = local and pathlib.Path(path).is_dir()
    if not is_dir and not path.lower().endswith(MANIFEST_SUFFIXES) and not (local and pathlib.Path(path).exists()):
        raise ValueError(f"source {source!r} does not exist or is no manifest (expected 'digits', an image folder, "
                         f"WebDataset .tar shards or a manifest {MANIFEST_SUFFIXES})")
    return SourceConfig(kind="folder" if is_dir else "manifest", path=path, image_size=image_size, seed=seed,
                        max_pixels=max_pixels)


class ModelConfig(BaseModel):
    """The open_clip image tower. ``pretrained`` None = random init from ``init_seed`` (no download needed).

    The default, a random-init ViT-S-32, runs offline on a CPU and gives honest features (see bench/README.md);
    with network access or a local file, use a pretrained tower (e.g. ViT-B-32 / laion2b_s34b_b79k).

    ``precision`` of the embed stage's forward pass: "fp32" (IEEE, bitwise reproducible; the default), "tf32"
    (CUDA only) or "bf16" (autocast), recorded in the features' spec (tasks.embed). The dump names it only when
    it is not "fp32", so the default config, its cache keys and its lineage record are what they were."""

    name: str = "ViT-S-32"
    pretrained: str | None = None
    init_seed: int = Field(0, ge=0)
    precision: Literal["fp32", "tf32", "bf16"] = "fp32"

    @model_serializer(mode="wrap")
    def _default_precision_unnamed(self, handler: Any) -> dict[str, Any]:
        data = handler(self)
        if data.get("precision") == "fp32":
            del data["precision"]
        return data


def check_methods(methods: list[str]) -> list[str]:
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


VARIANTS = ("skmm", "skmm_v2")  # what "skmm_best" chooses between
# skmm_best's choice on the val split also tries convex SkMM seeded by greedy pivots through the spectrum's signal
# rank (third_candidate=True, the default since the FT digits table: bench/README.md §14, "A third candidate for the
# validation choice"; third_candidate=False: the two variants only).
GREEDY_PIVOTS = "skmm_greedy_pivots"
# and SkMM's pivoted seeding alone for the whole budget (pivoted_candidate=True, the default since its FT digits
# table: bench/README.md §14, "A fourth candidate"; pivoted_candidate=False: the three before it)
PIVOTED = "skmm_pivoted"
CANDIDATES = {"skmm": ("skmm", {}), "skmm_v2": ("skmm_v2", {}),
              GREEDY_PIVOTS: ("skmm", {"pivoting": "greedy_signal"}),
              PIVOTED: ("skmm_pivoted", {})}  # variant -> (method, selector params)
AUTO_SKETCH_METHODS = ("skmm", "skmm_v2", "skmm_best", "skmm_pivoted")  # the selectors that take sketch_dim="auto"


@dataclass
class _Stages:
    """One run's recorded select / finetune / evaluate stages (each a cached Prefect task)."""

    rec: LineageRecorder
    opts: dict
    store: dict
    dataset: dict
    emb: dict | None
    sk: dict
    class_balanced: bool
    finetune: FinetuneConfig
    model: dict[str, Any] | None
    head_seed: int  # FT: finetune from the head the sketched gradients were taken at
    auto_sketch: bool = False  # SkMM picks its m from the (m_max-column) sketch's spectrum
    moment: dict | None = None  # auto_sketch: the sketch's moment and N × m reduction (tasks.sketch_moment), once
    val_limit: int | None = VAL_LIMIT  # choices (C, FT epoch, skmm_best's variant) on the val split's smallest ids
    third_candidate: bool = True  # skmm_best's val choice also tries GREEDY_PIVOTS
    pivoted_candidate: bool = True  # and PIVOTED

    def select(self, tag: str, method: str, n: int, seed: int, extra: dict | None = None) -> dict:
        """Select with ``method`` (``extra``: more selector params, e.g. a pivot rule); a recorded stage."""
        sk_ref = VectorTableRef.from_dict(self.sk).artifact
        auto = self.auto_sketch and method in AUTO_SKETCH_METHODS
        params = {**({"sketch_dim": "auto"} if auto else {}), **(extra or {})} or None
        if auto and self.moment is None:  # two streamed passes over the sketch for all (method, budget, seed)
            with self.rec.stage("sketch_moment", [sk_ref]) as record:
                self.moment = sketch_moment.with_options(**self.opts)(self.sk, self.dataset, self.store)
                record.outputs = [ArtifactRef.from_dict(self.moment["moment"]),
                                  VectorTableRef.from_dict(self.moment["reduced"]).artifact]
                record.metrics = {"sketch_dim": self.moment["m"]}
        inputs = [sk_ref, ArtifactRef.from_dict(self.moment["moment"]),
                  VectorTableRef.from_dict(self.moment["reduced"]).artifact] if auto else [sk_ref]
        with self.rec.stage(f"select.{tag}", inputs) as record:
            sel = select.with_options(**self.opts)(self.sk, self.dataset, self.store, method, n, seed, params=params,
                                                   class_balanced=self.class_balanced,
                                                   moment=self.moment if auto else None)
            record.selection = ArtifactRef.from_dict(sel["selection"])
            if "sketch_dim" in sel:  # the automatic m, in the run's lineage
                record.metrics = {"sketch_dim": sel["sketch_dim"]}
        return sel["selection"]

    def fit(self, tag: str, selection: dict, task: str, trained: dict | None = None) -> dict:
        """Finetune on ``selection``; ``trained``: the model already trained on it (recorded, not retrained)."""
        sel_ref = ArtifactRef.from_dict(selection)
        features = [VectorTableRef.from_dict(self.emb).artifact] if self.emb is not None else []
        with self.rec.stage(f"finetune.{tag}", [sel_ref, *features]) as record:
            check_fault("finetune")  # test-only (flows.faults): inert unless SKMM_FAULT_FILE is set
            ft = self.finetune
            record.selection = sel_ref
            if trained is not None:
                record.model = ArtifactRef.from_dict(trained)
                return trained
            if ft.kind == "last_layers":
                fit = finetune_last_layers.with_options(**self.opts)(
                    self.dataset, selection, self.store, self.model, k=ft.layers, epochs=ft.epochs, lr=ft.lr,
                    head_lr=ft.head_lr, seed=self.head_seed, val_limit=self.val_limit)
            else:
                fit = linear_probe.with_options(**self.opts)(self.emb, self.dataset, selection, self.store, task=task,
                                                             val_limit=self.val_limit)
            record.model = ArtifactRef.from_dict(fit["model"])
        return fit["model"]

    def evaluate(self, tag: str, model: dict, split: str = "test") -> dict:
        stage = f"{'evaluate' if split == 'test' else 'validate'}.{tag}"
        with self.rec.stage(stage, [ArtifactRef.from_dict(model)]) as record:
            check_fault(stage)
            limit = {"val_limit": self.val_limit} if split == "val" else {}  # the test split: always all of it
            metrics = evaluate.with_options(**self.opts)(model, self.emb, self.dataset, self.store, split=split,
                                                         **limit)
            record.metrics = metrics
        return metrics

    def choose_on_validation(self, tag: str, n: int, seed: int, task: str) -> tuple[dict, dict, dict]:
        """skmm_best's variant chosen on the val split: select with each variant, finetune, score on val, keep the
        best (higher accuracy, or lower MAE; ties go to the convex form). The test split plays no part.
        Returns the kept (selection, model trained on it, info)."""
        variants = (*VARIANTS, *((GREEDY_PIVOTS,) if self.third_candidate else ()),
                    *((PIVOTED,) if self.pivoted_candidate else ()))
        candidates = {}
        for variant in variants:
            ctag = f"{tag}.{variant}"
            method, extra = CANDIDATES[variant]
            selection = self.select(ctag, method, n, seed, extra)
            model = self.fit(ctag, selection, task)
            candidates[variant] = (selection, self.evaluate(ctag, model, split="val"), model)

        def score(variant: str) -> tuple[float, ...]:
            val = candidates[variant][1]
            return (-val["mae"],) if "mae" in val else (val["accuracy"], val["macro_f1"])

        chosen = max(variants, key=score)  # max keeps the first (convex) on ties
        info = {"chosen": chosen, "rule": "val", "val": {v: candidates[v][1] for v in variants}}
        with self.rec.stage(f"select.{tag}", [ArtifactRef.from_dict(c[0]) for c in candidates.values()]) as record:
            flat = {f"{v}.val_{k}": x for v in variants for k, x in candidates[v][1].items()}
            record.selection = ArtifactRef.from_dict(candidates[chosen][0])
            record.metrics = {"chosen": chosen, **flat}
        return candidates[chosen][0], candidates[chosen][2], info


def select_finetune_evaluate(rec: LineageRecorder, opts: dict, store: dict, dataset: dict, emb: dict | None, sk: dict,
                             methods: list[str], budgets: list[int], seeds: list[int],
                             class_balanced: bool = False, finetune: FinetuneConfig | None = None,
                             model: dict[str, Any] | None = None, task: str = "classification",
                             variant_choice: str = "val", full_pool: int | None = None,
                             auto_sketch: bool = False, val_limit: int | None = VAL_LIMIT,
                             third_candidate: bool = True, pivoted_candidate: bool = True) -> list[dict[str, Any]]:
    """For each (method, budget, seed): select → finetune → evaluate on the test split, each a recorded stage.

    ``variant_choice``: how ``skmm_best`` picks between convex SkMM and greedy SkMMv2 — "val" (finetune on both
    selections, keep the better on the val split) or "proxy" (the label-free variance proxy, before finetuning).
    ``full_pool``: the train split's size, to add the full-pool reference (method "full": a model finetuned on
    every train sample, the first seed) that the report draws as a reference row and line. ``auto_sketch``: the
    sketch has ``AUTO_M_MAX`` columns and SkMM chooses its m from its spectrum (recorded). ``val_limit``: the
    choices on the val split (the probe's C, the FT epoch, skmm_best's variant) use its ``val_limit`` smallest
    sample ids (None: all of it; tasks.finetune.VAL_LIMIT). ``third_candidate``: with ``variant_choice="val"``,
    skmm_best also tries convex SkMM seeded by greedy pivots (``GREEDY_PIVOTS``): one more coreset and finetune per
    budget; ``pivoted_candidate``: and SkMM's pivoted seeding alone (``PIVOTED``; the default), one more again."""
    if variant_choice not in ("val", "proxy"):
        raise ValueError(f"variant_choice must be 'val' or 'proxy'; got {variant_choice!r}")
    stages = _Stages(rec, opts, store, dataset, emb, sk, class_balanced, finetune or FinetuneConfig(), model,
                     head_seed=seeds[0], auto_sketch=auto_sketch, val_limit=val_limit,
                     third_candidate=third_candidate, pivoted_candidate=pivoted_candidate)
    results = []
    for method, n, seed in itertools.product(methods, budgets, seeds):
        tag = f"{method}.n{n}.s{seed}"
        extra: dict[str, Any] = {}
        trained = None
        if method == "skmm_best" and variant_choice == "val":
            selection, trained, extra = stages.choose_on_validation(tag, n, seed, task)
        else:
            selection = stages.select(tag, method, n, seed)
        model_ref = stages.fit(tag, selection, task, trained)
        metrics = stages.evaluate(tag, model_ref)
        results.append({"method": method, "n": n, "seed": seed, **metrics, **extra,
                        "selection": selection, "model": model_ref})
    if full_pool:  # every train sample: uniform at n = the train split, never class-balanced
        whole, tag = replace(stages, class_balanced=False), f"{FULL_POOL}.n{full_pool}.s{seeds[0]}"
        selection = whole.select(tag, "uniform", full_pool, seeds[0])
        model_ref = whole.fit(tag, selection, task)
        results.append({"method": FULL_POOL, "n": full_pool, "seed": seeds[0], **whole.evaluate(tag, model_ref),
                        "selection": selection, "model": model_ref})
    return results


def report_stage(rec: LineageRecorder, opts: dict, store: dict, results: list[dict[str, Any]]) -> dict[str, Any]:
    """The report stage: plot + table in the store, published as Prefect artifacts (accuracy, or MAE)."""
    metric = "accuracy" if all("accuracy" in r for r in results) else "mae"
    with rec.stage("report") as record:
        rep = report.with_options(**opts)(results, store, metric=metric)
        publish(results, rep, store)
        record.outputs = [ArtifactRef.from_dict(rep["plot"]), ArtifactRef.from_dict(rep["report"])]
    return rep


# The task runner: Prefect's thread pool, unless SKMM_DASK_* in the environment (e.g. a deployment's job variables)
# ask for Dask (flows.runners); the CLI's --dask-* options set it per run with curate.with_options.
@flow(name="curate", log_prints=True, task_runner=task_runner_from_env())
def curate(
    source: SourceConfig = SourceConfig(),  # noqa: B008 - pydantic defaults are immutable in practice
    budgets: list[PositiveInt] = [50, 100, 200],  # noqa: B006
    methods: list[str] = ["skmm_best", "uniform"],  # noqa: B006
    seeds: list[int] = [0],  # noqa: B006
    model: ModelConfig = ModelConfig(),  # noqa: B008
    sketch_dim: PositiveInt | Literal["auto"] | None = "auto",
    gradients: Literal["lp", "ft"] = "lp",
    finetune: FinetuneConfig = FinetuneConfig(),  # noqa: B008
    task: Literal["classification", "regression"] = "classification",
    class_balanced: bool = False,
    variant_choice: Literal["val", "proxy"] = "val",
    full_pool_reference: bool = False,
    val_limit: PositiveInt | None = VAL_LIMIT,
    third_candidate: bool = True,
    pivoted_candidate: bool = True,
    store_url: str = DEFAULT_STORE,
    endpoint_url: str | None = None,
    batch_size: PositiveInt = 64,
    progress: bool = False,
) -> dict[str, Any]:
    """Select ``budgets`` samples with each method and seed, finetune on each selection (a linear probe, or the
    last layers of the tower), evaluate on the test split, and report. Returns refs and metrics (small JSON).

    ``task``: "classification" (logistic probe; accuracy, macro-F1) or "regression" (numeric labels; ridge probe;
    MAE). ``gradients``: "lp" (normalised features) or "ft" (per-sample gradients of the last ``finetune.layers``
    tower blocks with random pseudo-labels); the sketch uses the first seed, selections every seed.
    ``sketch_dim``: m, or "auto" (the default): sketch once to ``AUTO_M_MAX`` columns and let SkMM choose m from
    that sketch's spectrum (skmm.select.spectrum.auto_sketch_dim; recorded in each selection's params
    and its select stage's lineage metrics). ``variant_choice``: how ``skmm_best`` picks convex SkMM or greedy
    SkMMv2 per budget — "val" (the better finetuned model on the val split) or "proxy" (the label-free variance
    proxy). ``full_pool_reference``: also finetune on the whole train split (opt-in: the whole split's features
    in memory, and a full finetune) and show it in the report as the reference the budgets are measured against.
    ``val_limit``: choices on the val split use its ``val_limit`` smallest sample ids (a content-determined
    sample; None: the whole split), so that they cost the same on any pool; the test split is always evaluated
    in full. ``third_candidate``: skmm_best's choice on the val split also tries convex SkMM seeded by greedy
    pivots (the default: a third coreset and finetune per budget; False: the two variants; bench/README.md §14);
    ``pivoted_candidate``: and SkMM's pivoted seeding alone (the default: a fourth coreset and finetune per budget;
    False: the three before it).
    ``progress``: a progress bar per embedded shard on stderr (the CLI turns it on in a terminal)."""
    logger = get_run_logger()
    check_methods(methods)
    if task == "regression" and (class_balanced or finetune.kind != "linear_probe"):
        raise ValueError("regression labels need finetune kind 'linear_probe' (a ridge probe) and no class balancing")
    store = store_spec(store_url, endpoint_url)
    st = open_store(store)
    st.check()
    for gone in st.clean_staging():  # debris of killed writers (a young file may be live)
        logger.info("removed staging leftover %s (%d bytes)", gone.path, gone.size)
    opts = {"result_storage": result_storage(store)}
    config = {"source": source.model_dump(), "budgets": budgets, "methods": methods, "seeds": seeds,
              "model": model.model_dump(), "sketch_dim": sketch_dim, "class_balanced": class_balanced,
              "gradients": gradients, "finetune": finetune.model_dump(), "task": task,
              "variant_choice": variant_choice}
    if full_pool_reference:  # named only when on: the default config (and its hash) stays what it was
        config["full_pool_reference"] = True
    if val_limit != VAL_LIMIT:  # likewise: named only when not the default
        config["val_limit"] = val_limit
    if third_candidate:  # named when on (runs before it became the default lack it and had two candidates)
        config["third_candidate"] = True
    if pivoted_candidate:  # named when on (runs before it became the default lack it and had three candidates)
        config["pivoted_candidate"] = True
    code = code_provenance()  # the code that runs, never the caller's working folder
    rec = LineageRecorder(st, flow_run_id=flow_run.get_id(), git_commit=code.git_commit, skmm_version=code.version,
                          config=config, attempt=flow_run.run_count or None)  # Prefect's run count: 2 on a retry
    logger.info("run %s: store %s", rec.run_id, st)

    if source.kind != "embeddings":  # the tower will be loaded: an unknown name fails before any ingest work
        with rec.stage("check-inputs"):
            check_model_name(model.name)
            check_precision(model.precision)  # tf32 off CUDA fails here, before any ingest work

    with rec.stage("ingest") as record:
        ing = ingest.with_options(**opts)(source.model_dump(), store)
        dataset = DatasetRef.from_dict(ing["dataset"])
        quarantine = [ArtifactRef.from_dict(ing["quarantine"])] if ing.get("quarantine") else []
        record.outputs = [dataset.manifest, *quarantine]
        # reused: files unchanged since the store's last ingest of this source, so not read (their bytes came
        # from that dataset's shards; storage/ingest/reuse.py); kept: samples in that dataset's shards kept as
        # they are (not written again; storage/ingest/writer.py)
        record.metrics = {"samples": ing["n_samples"], "quarantined": ing["n_quarantined"],
                          "reused": ing.get("n_reused", 0), "kept": ing.get("n_kept", 0)}
    if ing["n_quarantined"]:
        logger.warning("%d file(s) quarantined (unreadable); see %s", ing["n_quarantined"], ing["quarantine"]["uri"])

    if variant_choice == "val" and "skmm_best" in methods and not ing["split_counts"].get("val"):
        logger.warning("the dataset has no val split: skmm_best picks its variant with the label-free proxy")
        variant_choice = "proxy"

    needs_features = gradients == "lp" or finetune.kind == "linear_probe"
    emb, emb_inputs = None, [dataset.manifest]
    if needs_features:  # FT gradients + last-layers finetuning work on the images alone
        with rec.stage("embed", [dataset.manifest]) as record:
            counts = None  # precomputed embeddings: nothing to count
            if ing.get("vectors"):
                emb = ing["vectors"]
            else:
                emb, counts = embed_with_counts(ing["dataset"], model.model_dump(), store, opts,
                                                batch_size=batch_size, progress=progress,
                                                max_pixels=source.max_pixels)
            emb_inputs = [VectorTableRef.from_dict(emb).artifact]
            record.outputs, record.metrics = emb_inputs, counts

    with rec.stage("sketch", emb_inputs) as record:
        stage_dim = AUTO_M_MAX if sketch_dim == "auto" else sketch_dim  # "auto": SkMM reduces it in each select
        sk = gradients_sketch(emb, ing["dataset"], store, opts, sketch_dim=stage_dim, seed=seeds[0], mode=gradients,
                              model=model.model_dump(), k=finetune.layers, num_classes=len(ing["classes"]))
        record.outputs = [VectorTableRef.from_dict(sk).artifact]

    results = select_finetune_evaluate(rec, opts, store, ing["dataset"], emb, sk, methods, budgets, seeds,
                                       class_balanced, finetune, model.model_dump(), task, variant_choice,
                                       full_pool=ing["split_counts"]["train"] if full_pool_reference else None,
                                       auto_sketch=sketch_dim == "auto", val_limit=val_limit,
                                       third_candidate=third_candidate, pivoted_candidate=pivoted_candidate)
    rep = report_stage(rec, opts, store, results)
    # The result also goes to the store (runs/<run_id>.json), so a scheduled run can be re-selected by its id.
    return record_run_result(rec, {"run_id": rec.run_id, "store": st.url, "dataset": ing["dataset"],
                                   "quarantined": ing["n_quarantined"], "embeddings": emb, "sketch": sk,
                                   "sketch_dim": sketch_dim, "results": results, "report": rep})
