"""One canonical-JSON helper for the code base, byte for byte what each call site wrote before it existed: the
bytes feed content hashes, cache keys, sample ids and model headers, so any change would orphan stored data."""

from __future__ import annotations

import hashlib
import json
import math
import pathlib
import re
from types import SimpleNamespace

import numpy as np
import pytest

from skmm.canonical_json import canonical_json

REPO = pathlib.Path(__file__).resolve().parents[2]

VALUES = [
    {}, [], None, True, 0, -7, 10**20, 1.5, 0.1 + 0.2, 1e-300, -0.0, "", "plain", "é ünï 漢字 \u2028 \x00 \"q\" \\",
    {"b": 1, "a": [3, 2, {"z": None, "y": "ü"}], "c": {"nested": {"k": 1.25, "j": [True, False]}}},
    {"ü": 1, "u": 2, "U": 3, "10": 4, "9": 5},
    [{"b": 2, "a": 1}, [1.0, 2.0], "x"],
]
# The flags of each call site before the helper (ensure_ascii, allow_nan); sites without a flag used json's default.
SITE_FLAGS = {
    "sketch spec, clip spec/digest, finetune headers, dataset manifest, cache key": {},
    "producer digest, feature catalog entry": {"allow_nan": False},
    "lineage events and config hash, selection params": {"ensure_ascii": False, "allow_nan": False},
}


@pytest.mark.parametrize("flags", SITE_FLAGS.values(), ids=SITE_FLAGS.keys())
@pytest.mark.parametrize("value", VALUES)
def test_same_bytes_as_the_json_dumps_each_site_used(value, flags):
    assert canonical_json(value, **flags) == json.dumps(value, sort_keys=True, separators=(",", ":"), **flags)


def test_run_results_keep_their_numpy_encoder():
    def scalar(obj):
        if hasattr(obj, "item") and getattr(obj, "shape", None) == ():
            return obj.item()
        raise TypeError(f"{type(obj).__name__} is not JSON-serialisable")

    value = {"b": np.float32(1.5), "a": "é", "c": [np.int64(3), None]}
    text = canonical_json(value, ensure_ascii=False, allow_nan=False, default=scalar)
    assert text == json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False,
                              default=scalar)
    assert text == '{"a":"é","b":1.5,"c":[3,null]}'


def test_nan_is_kept_or_refused_as_the_site_asks():
    assert canonical_json({"x": math.nan, "y": math.inf}) == '{"x":NaN,"y":Infinity}'
    with pytest.raises(ValueError):
        canonical_json({"x": math.nan}, allow_nan=False)
    with pytest.raises(TypeError):
        canonical_json({"x": object()})


def _sha(data: bytes | str) -> str:
    return hashlib.sha256(data if isinstance(data, bytes) else data.encode()).hexdigest()


def test_site_outputs_are_unchanged(tmp_path):
    """Hashes of each site's output, computed with the code as it was before the helper (pinned)."""
    from skmm.finetune.linear_probe import LinearProbe
    from skmm.models.clip import ClipSpec
    from skmm.sketch.spec import SketchSpec
    from storage.artifacts import ArtifactStore
    from storage.datasets import producer_digest
    from storage.lineage import config_hash
    from storage.runs import _encode
    from storage.selections import write_selection
    from tasks.cache import ContentCache

    assert _sha(SketchSpec(kind="gaussian", input_dim=512, output_dim=64, seed=3).to_json()) == (
        "36327fc2aa6551dea13f18eb8bafa1964b3d87e0cc41efe8626f603e931c4c73")
    tiny = ClipSpec(model="skmm-tiny-vit", init_seed=1)
    assert _sha(tiny.to_json()) == "0091af13fb335c9a16e8c32325bd02f9beec26b51f832a3349aabcadc12a7a90"
    assert tiny.digest == "83e82985a8a1ad563f1ee22ce882484db4448299cb968ff6fc14259a3d73d9e6"
    pre = ClipSpec(model="ViT-B-32", pretrained="laion2b_s34b_b79k")
    assert _sha(pre.to_json()) == "98ca26eb910835e7a7e28835fe2271beab0757ab46355ea43f079d7fb8191ff7"
    assert pre.digest == "bc421a8a4af09d2e215b35c82d6c0a2a188833bbc90d7a9d9fb494cf65d068cb"
    assert producer_digest({"model": "tiny", "init_seed": 0, "note": "é ünï", "x": [1.5, None, True, 10**20]}) == (
        "942fd2a14d8ccf4f6188a03c5b3a2e8620720ae3f95e7d039dc18b13ea7e054c")
    assert config_hash({"b": [1, 2.5], "a": "é", "n": None}) == (
        "30b50f0c9651999e4eca84222c975a98f5102c60407d42a243f03b58874e85ea")
    # A probe's learned state set by hand: a fitted one's last bits depend on the CPU's BLAS kernels (the
    # hash pinned from a fit failed on an AVX2-only AMD EPYC), and this pins the serialisation, not the solver.
    probe = LinearProbe()
    probe.coef_ = (np.arange(2, dtype=np.float64).reshape(1, 2) - 0.75) / 8
    probe.intercept_, probe.mean_, probe.scale_ = np.array([0.125]), np.array([3.0, 2.5]), np.array([2.0, 1.75])
    probe.classes_, probe.strength_ = np.array([0, 1]), 1.0
    assert _sha(probe.to_bytes()) == "a25d0d6f82803d2e80c20914ba1033f4fdba99c1c50bba51b097d5a1be128e7d"
    ctx = SimpleNamespace(task=SimpleNamespace(name="embed"))
    inputs = {"a": {"uri": "file:///x", "sha256": "0" * 64, "size": 3, "kind": "model"}, "n": 5, "s": "é"}
    assert ContentCache(code_version="7").compute_key(ctx, inputs, {}) == (
        "2459499f870396fdf553ca595b11a60a8de75c4e0446731214f6eaba47d46f7b")
    sel = write_selection(ArtifactStore(tmp_path / "store"), ["a", "b", "c"], method="skmm",
                          params={"m": 8, "ünï": "é", "w": 0.25})
    assert sel.sha256 == "1fe17557aef2db47f58bbc3cab705e80cf27c1c0f65649797dacd25aed07734c"
    assert _sha(_encode({"b": np.float32(1.5), "a": "é", "c": [np.int64(3), None]})) == (
        "cc0da35e77ff1e4eb0368d145e0294663391b3e7422e9ce59eaaff62458a9054")


def test_no_other_canonical_json_in_the_code_base():
    """Sorted, compact JSON is written in one place; tasks/store.py's key (default separators) and the lineage
    CLI's display are other encodings, kept as they were."""
    pattern = re.compile(r"sort_keys\s*=\s*True")
    found = {str(p.relative_to(REPO)) for pkg in ("skmm", "storage", "tasks", "flows", "deployments", "bench")
             for p in (REPO / pkg).rglob("*.py") if pattern.search(p.read_text(encoding="utf-8"))}
    assert found <= {"skmm/canonical_json.py", "tasks/store.py", "flows/lineage_cli.py"}, found
