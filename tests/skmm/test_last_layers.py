"""Finetuning the last k layers of the tiny open_clip tower on digits: learning, determinism, serialisation, errors."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from sklearn.datasets import load_digits

from skmm.finetune import LastLayersFinetuner, LinearProbe, model_format
from skmm.gradients.clip_ft import build_ft_model, ft_parameter_names
from skmm.models import TINY_MODEL, ClipSpec
from storage.ingest import render_digit_png

TINY = ClipSpec(TINY_MODEL)
FIT = dict(k=1, epochs=8, lr=1e-3, head_lr=1e-2, batch_size=16, seed=0, device="cpu")


@pytest.fixture(scope="module")
def digits() -> tuple[list[bytes], list[str]]:
    d = load_digits()
    images = [render_digit_png(d.images[i], 32, "nearest") for i in range(160)]
    return images, [str(int(v)) for v in d.target[:160]]


@pytest.fixture(scope="module")
def fitted(digits) -> LastLayersFinetuner:
    images, labels = digits
    return LastLayersFinetuner(TINY, **FIT).fit(images[:120], labels[:120], images[120:], labels[120:])


def rewrite(data: bytes, *, meta: dict | None = None, tensors: dict | None = None) -> bytes:
    """The same file with its metadata JSON and/or tensors changed (as a tampered or mismatched file would be)."""
    header_len = int.from_bytes(data[:8], "little")
    info = json.loads(json.loads(data[8:8 + header_len])["__metadata__"]["skmm"])
    info.update(meta or {})
    ts = st_load(data)
    ts.update(tensors or {})
    return st_save({k: v for k, v in ts.items() if v is not None},
                   metadata={"skmm": json.dumps(info, sort_keys=True, separators=(",", ":"))})


def test_training_beats_chance_and_keeps_the_best_val_epoch(digits, fitted):
    images, labels = digits
    train_acc = float(np.mean(fitted.predict(images[:120]) == np.asarray(labels[:120])))
    assert train_acc >= 0.35  # chance is 0.1 (10 classes); the tiny tower is randomly initialised
    losses = [h["train_loss"] for h in fitted.history_]
    assert losses[-1] < losses[0]
    val = [h["val_accuracy"] for h in fitted.history_]
    assert fitted.best_epoch_ == int(np.argmax(val)) + 1 and fitted.best_val_accuracy_ == max(val)
    val_acc = float(np.mean(fitted.predict(images[120:]) == np.asarray(labels[120:])))
    assert val_acc == pytest.approx(fitted.best_val_accuracy_)
    assert list(fitted.classes_) == [str(i) for i in range(10)]
    assert fitted.decision_function(images[:3]).shape == (3, 10)
    assert fitted.predict([]).shape == (0,)


def test_same_seed_same_bytes_different_seed_different_bytes(digits):
    images, labels = digits
    kw = dict(FIT, epochs=2)
    a = LastLayersFinetuner(TINY, **kw).fit(images[:48], labels[:48]).state_bytes()
    b = LastLayersFinetuner(TINY.to_dict(), **kw).fit(images[:48], labels[:48]).state_bytes()
    assert a == b
    assert LastLayersFinetuner(TINY, **dict(kw, seed=1)).fit(images[:48], labels[:48]).state_bytes() != a


def test_round_trip_gives_identical_predictions(digits, fitted):
    images, _ = digits
    data = fitted.state_bytes()
    assert model_format(data) == "skmm-last-layers/1"
    again = LastLayersFinetuner.from_bytes(data, device="cpu")
    np.testing.assert_array_equal(again.decision_function(images), fitted.decision_function(images))
    np.testing.assert_array_equal(again.predict(images), fitted.predict(images))
    assert again.state_bytes() == data
    assert (again.k, again.best_epoch_, again.seed, again.lr, again.head_lr) == (1, fitted.best_epoch_, 0, 1e-3, 1e-2)
    assert list(again.classes_) == list(fitted.classes_)
    # The base tower may be named anew (e.g. the same weights moved): the stored tensors go on top of it.
    other = LastLayersFinetuner.from_bytes(data, spec=ClipSpec(TINY_MODEL, init_seed=1), device="cpu")
    assert other.spec.init_seed == 1 and other.state_bytes() != data
    assert not np.array_equal(other.decision_function(images[:8]), fitted.decision_function(images[:8]))


def test_only_the_trained_tensors_are_stored(fitted):
    data = fitted.state_bytes()
    tensors = st_load(data)
    fresh, _ = build_ft_model(TINY, 10, 0, "cpu")
    names = ft_parameter_names(fresh, 1)
    assert sorted(tensors) == sorted(names) == sorted(fitted.param_names_)
    assert not any(n.startswith(("visual.transformer.resblocks.0.", "visual.conv1")) for n in tensors)
    header_len = int.from_bytes(data[:8], "little")
    meta = json.loads(data[8:8 + header_len])["__metadata__"]
    assert list(meta) == ["skmm"]
    info = json.loads(meta["skmm"])
    assert info["format"] == "skmm-last-layers/1" and info["spec"] == TINY.to_dict() and info["k"] == 1
    assert info["params"] == names and info["classes"] == [str(i) for i in range(10)]
    assert info["best_epoch"] == fitted.best_epoch_ and info["epochs"] == 8
    # Frozen layers are untouched; trained ones moved.
    trained, frozen = dict(fitted.model_.named_parameters()), dict(fresh.named_parameters())
    torch.testing.assert_close(trained["visual.transformer.resblocks.0.mlp.c_fc.weight"],
                               frozen["visual.transformer.resblocks.0.mlp.c_fc.weight"], rtol=0, atol=0)
    assert not torch.equal(trained["visual.transformer.resblocks.1.mlp.c_fc.weight"],
                           frozen["visual.transformer.resblocks.1.mlp.c_fc.weight"])


def test_mismatched_or_corrupt_files_are_clear_errors(digits, fitted):
    images, labels = digits
    data = fitted.state_bytes()
    k2 = LastLayersFinetuner(TINY, **dict(FIT, k=2, epochs=1)).fit(images[:20], labels[:20]).state_bytes()
    assert LastLayersFinetuner.from_bytes(k2).k == 2
    with pytest.raises(ValueError, match=r"do not match model 'skmm-tiny-vit' with k=1: unexpected tensors"):
        LastLayersFinetuner.from_bytes(rewrite(k2, meta={"k": 1}))
    with pytest.raises(ValueError, match="missing tensors"):
        LastLayersFinetuner.from_bytes(rewrite(data, tensors={"head.bias": None}))
    with pytest.raises(ValueError, match=r"shape mismatch.*head.weight: file \(10, 31\) vs model \(10, 32\)"):
        LastLayersFinetuner.from_bytes(rewrite(data, tensors={"head.weight": torch.zeros(10, 31)}))
    with pytest.raises(ValueError, match="k=3 is more than the 2 blocks"):
        LastLayersFinetuner.from_bytes(rewrite(data, meta={"k": 3}))
    with pytest.raises(ValueError, match="not a safetensors file"):
        LastLayersFinetuner.from_bytes(data[:50])  # cut inside the header
    for cut in (data[: len(data) // 3], data[:-100]):  # cut inside the tensors
        with pytest.raises(ValueError, match="corrupt last-layers model file"):
            LastLayersFinetuner.from_bytes(cut)
    with pytest.raises(ValueError, match="not a safetensors file"):
        LastLayersFinetuner.from_bytes(b"garbage")
    probe = LinearProbe().fit(np.random.default_rng(0).standard_normal((20, 4)), np.arange(20) % 2).to_bytes()
    assert model_format(probe) == "skmm-linear-probe/1"
    with pytest.raises(ValueError, match="not a last-layers model file"):
        LastLayersFinetuner.from_bytes(probe)
    with pytest.raises(ValueError, match="malformed last-layers metadata"):
        LastLayersFinetuner.from_bytes(rewrite(data, meta={"classes": ["a"]}))


def test_bad_arguments_are_clear_errors(digits):
    images, labels = digits
    for kwargs, error, match in [
        ({"k": 0}, ValueError, "k must be a positive integer"),
        ({"epochs": 0}, ValueError, "epochs must be a positive integer"),
        ({"lr": 0.0}, ValueError, "lr must be a finite number > 0"),
        ({"lr": float("nan")}, ValueError, "lr must be a finite number > 0"),
        ({"head_lr": -1.0}, ValueError, "head_lr must be a finite number > 0"),
        ({"batch_size": 0}, ValueError, "batch_size must be a positive integer"),
        ({"weight_decay": -0.1}, ValueError, "weight_decay must be a finite number >= 0"),
        ({"seed": -1}, ValueError, "seed must be a non-negative integer"),
    ]:
        with pytest.raises(error, match=match):
            LastLayersFinetuner(TINY, **kwargs)
    with pytest.raises(TypeError, match="ClipSpec"):
        LastLayersFinetuner("skmm-tiny-vit")
    with pytest.raises(ValueError, match="unknown ClipSpec field"):
        LastLayersFinetuner({"model": TINY_MODEL, "seed": 0})
    ft = LastLayersFinetuner(TINY, epochs=1, device="cpu")
    with pytest.raises(ValueError, match="not fitted yet"):
        ft.predict(images[:2])
    with pytest.raises(ValueError, match="images is empty"):
        ft.fit([], [])
    with pytest.raises(ValueError, match="one label per image"):
        ft.fit(images[:4], labels[:3])
    with pytest.raises(ValueError, match="at least 2 classes"):
        ft.fit(images[:3], ["a", "a", "a"])
    with pytest.raises(TypeError, match="mix strings and integers"):
        ft.fit(images[:2], ["a", 1])
    with pytest.raises(ValueError, match="both val_images and val_labels"):
        ft.fit(images[:4], labels[:4], val_images=images[4:6])
    with pytest.raises(ValueError, match="k=3 is more than the 2 blocks"):
        LastLayersFinetuner(TINY, k=3, epochs=1, device="cpu").fit(images[:4], labels[:4])
    with pytest.raises(ValueError, match="image 1 could not be decoded"):
        ft.fit([images[0], b"nope"], ["a", "b"])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_training_round_trips_and_matches_cpu_closely(digits):
    images, labels = digits
    kw = dict(FIT, epochs=2, device="cuda")
    gpu = LastLayersFinetuner(TINY, **kw).fit(images[:48], labels[:48])
    assert gpu.state_bytes() == LastLayersFinetuner(TINY, **kw).fit(images[:48], labels[:48]).state_bytes()
    cpu = LastLayersFinetuner(TINY, **dict(kw, device="cpu")).fit(images[:48], labels[:48])
    np.testing.assert_allclose(gpu.decision_function(images[:48]), cpu.decision_function(images[:48]),
                               rtol=1e-3, atol=1e-3)
    again = LastLayersFinetuner.from_bytes(gpu.state_bytes(), device="cuda")
    np.testing.assert_array_equal(again.predict(images[:48]), gpu.predict(images[:48]))


def test_given_classes_size_the_head_even_when_the_coreset_misses_some(digits):
    images, labels = digits
    few = [i for i, y in enumerate(labels[:120]) if y in ("0", "1", "2")][:30]
    all_classes = sorted(set(labels))
    ft = LastLayersFinetuner(TINY, **{**FIT, "epochs": 1}).fit([images[i] for i in few], [labels[i] for i in few],
                                                               classes=all_classes)
    assert list(ft.classes_) == all_classes and len(all_classes) == 10
    assert ft.decision_function(images[:3]).shape == (3, 10)
    with pytest.raises(ValueError, match="not among the given classes"):
        LastLayersFinetuner(TINY, **FIT).fit([images[i] for i in few], [labels[i] for i in few],
                                             classes=["0", "1"])


def test_val_tokens_over_the_cache_budget_are_recomputed_with_the_same_result(digits, fitted):
    """A val split whose prefix tokens exceed val_cache_bytes is run through the whole tower each epoch, in the
    same batches: the same val accuracies, best epoch and weights as with the tokens kept."""
    images, labels = digits
    assert fitted.val_tokens_cached_  # 40 tiny-tower images: far below the default budget
    streamed = LastLayersFinetuner(TINY, **FIT, val_cache_bytes=0).fit(images[:120], labels[:120], images[120:],
                                                                        labels[120:])
    assert not streamed.val_tokens_cached_
    assert [h["val_accuracy"] for h in streamed.history_] == [h["val_accuracy"] for h in fitted.history_]
    assert streamed.best_epoch_ == fitted.best_epoch_
    assert streamed.state_bytes() == fitted.state_bytes()
    with pytest.raises(ValueError, match="val_cache_bytes"):
        LastLayersFinetuner(TINY, val_cache_bytes=-1)


def test_decode_workers_change_no_bit_of_the_finetuned_model(digits, fitted, monkeypatch):
    """The finetuner decodes as the FT gradient stage does: in worker processes (or threads) on CUDA. Forced here
    on the CPU (2 for every token pass, the streamed val split included): the same weights and history, bit for
    bit."""
    from skmm.finetune import last_layers

    images, labels = digits
    asked: list[int] = []
    for threads in (False, True):  # processes, or threads where the process may not fork

        def two(requested, total, batch_size, device, threads=threads):
            asked.append(total)
            return 2, threads

        monkeypatch.setattr(last_layers, "_decode_plan", two)
        for cache in (last_layers.VAL_CACHE_BYTES, 0):
            got = LastLayersFinetuner(TINY, **FIT, val_cache_bytes=cache).fit(images[:120], labels[:120],
                                                                               images[120:], labels[120:])
            assert got.state_bytes() == fitted.state_bytes() and got.history_ == fitted.history_
    assert 120 in asked and 40 in asked  # the train and val token passes went through the workers


def test_fit_and_predict_leave_the_global_rng_as_it_was(digits):
    """The head is drawn from its own generator and nothing else draws from torch's process-wide one, so a fit in
    one thread cannot change a seeded tower built in another (skmm.models.clip.load_clip)."""
    images, labels = digits
    before = torch.random.get_rng_state()
    LastLayersFinetuner(TINY, **{**FIT, "epochs": 1}).fit(images[:16], labels[:16]).predict(images[:2])
    assert torch.equal(torch.random.get_rng_state(), before)
