"""Smaller flows that start from existing artifacts instead of the source: re-select and re-evaluate.

Both take an earlier run: its id (or a unique prefix of one), read from the result every curate / reselect /
reevaluate run writes to the store (``runs/<run_id>.json``, see :mod:`storage.runs`), or the result dict itself
(``skmm curate --json > run.json``). They check that every referenced artifact is still in the store (a clear
error names any that is missing), record their own lineage run, and write their own result the same way.

    reselect:   dataset + embeddings + sketch → for each (method, budget, seed): select → finetune → evaluate
    reevaluate: each result's model + embeddings + dataset → evaluate (e.g. after a test-split fix)
"""

from __future__ import annotations

from typing import Any, Literal

from prefect import flow, get_run_logger
from prefect.runtime import flow_run
from pydantic import PositiveInt

from flows.curate import FinetuneConfig, ModelConfig, check_methods, report_stage, select_finetune_evaluate
from storage.artifacts import ArtifactRef, ArtifactStore
from storage.datasets import DatasetRef, VectorTableRef
from storage.errors import ArtifactNotFoundError
from storage.lineage import LineageRecorder, code_provenance
from storage.runs import read_run_result, record_run_result
from tasks.evaluate import evaluate
from tasks.finetune import VAL_LIMIT
from tasks.store import DEFAULT_STORE, open_store, result_storage, store_spec

__all__ = ["reevaluate", "reselect"]


def _check_run(run: dict[str, Any], keys: tuple[str, ...]) -> None:
    for key in keys:  # embeddings may be None (FT gradients + last-layers finetuning need none)
        if key not in run or (run[key] is None and key != "embeddings"):
            raise ValueError(f"the earlier run's result has no {key!r}: pass its run id or what 'skmm curate "
                             "--json' printed")


def _require(st: Any, refs: list[ArtifactRef]) -> None:
    missing = [r.uri for r in refs if not st.exists(r)]
    if missing:
        raise ArtifactNotFoundError(f"{len(missing)} artifact(s) of the earlier run are missing, e.g. {missing[0]}")


def _open(store_url: str, endpoint_url: str | None) -> tuple[dict, ArtifactStore]:
    store = store_spec(store_url, endpoint_url)
    st = open_store(store)
    st.check()
    for gone in st.clean_staging():  # debris of killed writers (a young file may be live)
        get_run_logger().info("removed staging leftover %s (%d bytes)", gone.path, gone.size)
    return store, st


def _earlier(st: ArtifactStore, run: dict[str, Any] | str, keys: tuple[str, ...]) -> dict[str, Any]:
    """The earlier run's result: ``run`` itself, or the one stored for run id (or unique prefix) ``run``."""
    found = read_run_result(st, run) if isinstance(run, str) else run
    _check_run(found, keys)
    return found


def _recorder(st: ArtifactStore, store: dict, config: dict) -> tuple[dict, LineageRecorder]:
    code = code_provenance()  # the code that runs, never the caller's working folder
    rec = LineageRecorder(st, flow_run_id=flow_run.get_id(), git_commit=code.git_commit, skmm_version=code.version,
                          config=config, attempt=flow_run.run_count or None)
    return {"result_storage": result_storage(store)}, rec


@flow(name="reselect", log_prints=True)
def reselect(
    run: dict[str, Any] | str,
    budgets: list[PositiveInt],
    methods: list[str] = ["skmm_best", "uniform"],  # noqa: B006
    seeds: list[int] = [0],  # noqa: B006
    class_balanced: bool = False,
    finetune: FinetuneConfig = FinetuneConfig(),  # noqa: B008
    model: ModelConfig = ModelConfig(),  # noqa: B008 - used by finetune.kind == "last_layers"
    task: str = "classification",
    variant_choice: Literal["val", "proxy"] = "val",
    val_limit: PositiveInt | None = VAL_LIMIT,
    third_candidate: bool = True,
    pivoted_candidate: bool = True,
    store_url: str = DEFAULT_STORE,
    endpoint_url: str | None = None,
) -> dict[str, Any]:
    """Select again from an earlier run's sketch, finetune, evaluate, report. ``run``: the earlier run's id (or a
    unique prefix of one) in the store, or its result dict. ``val_limit``, ``third_candidate``,
    ``pivoted_candidate``: as in ``curate``."""
    check_methods(methods)
    store, st = _open(store_url, endpoint_url)
    run = _earlier(st, run, ("dataset", "embeddings", "sketch"))
    dataset, emb, sk = DatasetRef.from_dict(run["dataset"]), run["embeddings"], run["sketch"]
    config = {"reselect": run.get("run_id"), "budgets": budgets, "methods": methods, "seeds": seeds,
              "variant_choice": variant_choice}
    if val_limit != VAL_LIMIT:  # named only when not the default, as in curate
        config["val_limit"] = val_limit
    if third_candidate:
        config["third_candidate"] = True
    if pivoted_candidate:
        config["pivoted_candidate"] = True
    opts, rec = _recorder(st, store, config)
    get_run_logger().info("run %s: re-selecting from run %s", rec.run_id, run.get("run_id"))
    with rec.stage("check-inputs") as record:
        inputs = [dataset.manifest, VectorTableRef.from_dict(sk).artifact]
        if emb is not None:  # None when the earlier run used FT gradients + last-layers finetuning
            inputs.append(VectorTableRef.from_dict(emb).artifact)
        _require(st, inputs)
        record.outputs = inputs
    auto_sketch = run.get("sketch_dim") == "auto"  # the earlier sketch has AUTO_M_MAX columns: m chosen again
    results = select_finetune_evaluate(rec, opts, store, run["dataset"], emb, sk, methods, budgets, seeds,
                                       class_balanced, finetune, model.model_dump(), task, variant_choice,
                                       auto_sketch=auto_sketch, val_limit=val_limit, third_candidate=third_candidate,
                                       pivoted_candidate=pivoted_candidate)
    rep = report_stage(rec, opts, store, results)
    return record_run_result(rec, {"run_id": rec.run_id, "store": st.url, "dataset": run["dataset"],
                                   "quarantined": 0, "embeddings": emb, "sketch": sk,
                                   "sketch_dim": run.get("sketch_dim"), "results": results, "report": rep})


@flow(name="reevaluate", log_prints=True)
def reevaluate(run: dict[str, Any] | str, store_url: str = DEFAULT_STORE,
               endpoint_url: str | None = None) -> dict[str, Any]:
    """Evaluate an earlier run's models again on its dataset's test split, and report. ``run``: the earlier run's
    id (or a unique prefix of one) in the store, or its result dict."""
    store, st = _open(store_url, endpoint_url)
    run = _earlier(st, run, ("dataset", "embeddings", "results"))
    opts, rec = _recorder(st, store, {"reevaluate": run.get("run_id")})
    features = [VectorTableRef.from_dict(run["embeddings"]).artifact] if run["embeddings"] else []
    results = []
    for r in run["results"]:
        tag = f"{r['method']}.n{r['n']}.s{r['seed']}"
        model_ref = ArtifactRef.from_dict(r["model"])
        with rec.stage(f"evaluate.{tag}", [model_ref, *features]) as record:
            _require(st, [model_ref, *features, DatasetRef.from_dict(run["dataset"]).manifest])
            metrics = evaluate.with_options(**opts)(r["model"], run["embeddings"], run["dataset"], store)
            record.metrics = metrics
        kept = ("method", "n", "seed", "selection", "model", "chosen", "val")  # chosen/val: skmm_best's choice
        results.append({**{k: r[k] for k in kept if k in r}, **metrics})
    rep = report_stage(rec, opts, store, results)
    return record_run_result(rec, {"run_id": rec.run_id, "store": st.url, "dataset": run["dataset"],
                                   "quarantined": 0, "embeddings": run["embeddings"], "sketch": run.get("sketch"),
                                   "results": results, "report": rep})
