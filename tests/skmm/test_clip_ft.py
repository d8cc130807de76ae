"""FT-mode gradients of the tiny open_clip tower: shape, batching/order invariance, pseudo-labels, producer, errors."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from sklearn.datasets import load_digits

from skmm.gradients import per_sample_gradients, pseudo_labels
from skmm.gradients.clip_ft import (
    VisualWithHead,
    build_ft_model,
    decode_images,
    ft_gradient_sketch,
    ft_parameter_names,
    init_head,
)
from skmm.models import TINY_MODEL, ClipSpec, load_clip
from skmm.sketch import make_projector
from storage.datasets import sample_id
from storage.ingest import render_digit_png

TINY = ClipSpec(TINY_MODEL)
N = 20


@pytest.fixture(scope="module")
def pool() -> tuple[list[bytes], list[str]]:
    digits = load_digits()
    images = [render_digit_png(digits.images[i], 32, "nearest") for i in range(N)]
    return images, [sample_id(b) for b in images]


@pytest.fixture(scope="module")
def sketched(pool):
    images, ids = pool
    return ft_gradient_sketch(images, ids, TINY, k=1, num_classes=10, sketch_dim=16, seed=3, batch_size=7,
                              device="cpu")


def test_shape_producer_and_layer_set(pool, sketched):
    S, producer = sketched
    assert S.shape == (N, 16) and S.dtype == np.float32 and np.isfinite(S).all()
    model, _ = build_ft_model(TINY, 10, 3, "cpu")
    names = ft_parameter_names(model, 1)
    params = dict(model.named_parameters())
    r = sum(params[n].numel() for n in names)
    assert producer == {
        "mode": "ft", "model": TINY.to_dict(), "k": 1, "params": names, "r": r, "num_classes": 10,
        "pseudo_label_seed": 3, "head": {"init": "normal(0,1/d),bias=0", "seed": 3, "features": "l2-normalised"},
        "loss": "cross_entropy", "sketch": make_projector("sjlt", r, 16, 3).spec.to_dict(),
    }
    # The last block, the layers after it and the head; never the first block or the patch embedding.
    assert any(n.startswith("visual.transformer.resblocks.1.") for n in names)
    assert not any(n.startswith(("visual.transformer.resblocks.0.", "visual.conv1", "visual.ln_pre")) for n in names)
    assert {"visual.proj", "visual.ln_post.weight", "head.weight", "head.bias"} <= set(names)
    assert len(ft_parameter_names(model, 2)) > len(names)


def test_rows_do_not_depend_on_batch_size_or_order(pool, sketched):
    images, ids = pool
    S, _ = sketched
    order = np.random.default_rng(0).permutation(N)
    S2, _ = ft_gradient_sketch([images[i] for i in order], [ids[i] for i in order], TINY, k=1, num_classes=10,
                               sketch_dim=16, seed=3, batch_size=N, device="cpu")
    np.testing.assert_allclose(S2, S[order], rtol=1e-5, atol=1e-5)
    S1, _ = ft_gradient_sketch(images[:3], ids[:3], TINY, k=1, num_classes=10, sketch_dim=16, seed=3,
                               batch_size=1, device="cpu")
    np.testing.assert_allclose(S1, S[:3], rtol=1e-5, atol=1e-5)


def test_sketch_is_one_projector_applied_to_the_exact_gradients(pool, sketched):
    """Unsketched rows equal autograd on the full model (pixels in) with the ids' pseudo-labels; the sketch is
    that matrix times one seeded projector."""
    images, ids = pool
    S, producer = sketched
    G, prod_raw = ft_gradient_sketch(images[:4], ids[:4], TINY, k=1, num_classes=10, sketch_dim=None, seed=3,
                                     batch_size=3, device="cpu")
    assert prod_raw["sketch"] is None and G.shape == (4, producer["r"])
    np.testing.assert_allclose(make_projector("sjlt", producer["r"], 16, 3).project(G), S[:4], rtol=1e-5, atol=1e-5)
    S_gauss, prod_gauss = ft_gradient_sketch(images[:4], ids[:4], TINY, k=1, num_classes=10, sketch_dim=16, seed=3,
                                             device="cpu", projector_kind="gaussian")
    gauss = make_projector("gaussian", producer["r"], 16, 3)
    assert prod_gauss["sketch"] == gauss.spec.to_dict()
    np.testing.assert_allclose(gauss.project(G), S_gauss, rtol=1e-5, atol=1e-5)

    model, preprocess = build_ft_model(TINY, 10, 3, "cpu")
    names = producer["params"]
    params = dict(model.named_parameters())
    y = pseudo_labels(ids[:4], 10, 3)
    x = decode_images(images[:4], preprocess)
    for i in range(4):
        model.zero_grad()
        F.cross_entropy(model(x[i:i + 1]), torch.tensor([int(y[i])])).backward()
        ref = torch.cat([params[n].grad.reshape(-1) for n in names]).numpy()
        np.testing.assert_allclose(G[i], ref, rtol=1e-4, atol=1e-6)
    # The tower's blocks get non-zero gradients: the head is not zero-initialised.
    block = sum(params[n].numel() for n in names if n.startswith("visual.transformer"))
    start = params["visual.proj"].numel()
    assert np.abs(G[:, start:start + block]).max() > 1e-4


def test_pseudo_labels_follow_sample_ids_not_positions(pool):
    images, _ = pool
    # The same image under two ids: same row iff the ids' pseudo-labels agree.
    keys = [f"key-{i}" for i in range(40)]
    labels = pseudo_labels(keys, 10, 0)
    a = keys[0]
    same = next(k for k, v in zip(keys[1:], labels[1:], strict=True) if v == labels[0])
    other = next(k for k, v in zip(keys[1:], labels[1:], strict=True) if v != labels[0])
    G, _ = ft_gradient_sketch([images[0]] * 3, [a, same, other], TINY, num_classes=10, sketch_dim=8, seed=0,
                              device="cpu")
    np.testing.assert_allclose(G[0], G[1], rtol=1e-5, atol=1e-6)
    assert np.abs(G[0] - G[2]).max() > 1e-3
    # A different seed changes the labels, the head and the projector: a different sketch.
    G2, _ = ft_gradient_sketch([images[0]] * 3, [a, same, other], TINY, num_classes=10, sketch_dim=8, seed=1,
                               device="cpu")
    assert np.abs(G2 - G).max() > 1e-3


def test_prefix_suffix_split_is_the_tower():
    clip, _ = load_clip(TINY, "cpu")
    model = VisualWithHead(clip.visual, init_head(32, 4, 0)).eval()
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        ref = clip.encode_image(x)
        for k in range(model.num_blocks + 1):
            torch.testing.assert_close(model.features(model.prefix(x, k), k), ref, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(model(x), model.head(F.normalize(ref, dim=-1)))
    # init_head is a pure function of its seed.
    torch.testing.assert_close(init_head(32, 4, 0).weight, init_head(32, 4, 0).weight)
    assert not torch.equal(init_head(32, 4, 0).weight, init_head(32, 4, 1).weight)
    assert init_head(32, 4, 0).bias.abs().max() == 0
    with pytest.raises(ValueError, match="k must be an integer"):
        model.prefix(x, 3)


@pytest.mark.filterwarnings("ignore:There is a performance drop")
def test_per_sample_gradients_on_the_suffix_match_the_full_model(pool):
    """The frozen prefix cannot change the trained layers' gradients."""
    images, _ = pool
    model, preprocess = build_ft_model(TINY, 5, 0, "cpu")
    names = ft_parameter_names(model, 2)
    x = decode_images(images[:3], preprocess)
    y = torch.tensor([0, 3, 4])
    full = per_sample_gradients(model, x, y, names)
    from skmm.gradients.clip_ft import _Suffix

    with torch.no_grad():
        tokens = model.prefix(x, 2)
    torch.testing.assert_close(per_sample_gradients(_Suffix(model, 2), tokens, y, names), full,
                               rtol=1e-5, atol=1e-7)


def test_errors(pool):
    images, ids = pool
    kw = dict(num_classes=10, sketch_dim=8, device="cpu")
    with pytest.raises(ValueError, match="k must be at least 1"):
        ft_gradient_sketch(images[:2], ids[:2], TINY, k=0, **kw)
    with pytest.raises(ValueError, match="k=3 is more than the 2 blocks"):
        ft_gradient_sketch(images[:2], ids[:2], TINY, k=3, **kw)
    with pytest.raises(TypeError, match="k must be a positive integer"):
        ft_gradient_sketch(images[:2], ids[:2], TINY, k=1.0, **kw)
    with pytest.raises(ValueError, match="num_classes must be at least 2"):
        ft_gradient_sketch(images[:2], ids[:2], TINY, num_classes=1, sketch_dim=8, device="cpu")
    with pytest.raises(ValueError, match="images is empty"):
        ft_gradient_sketch([], [], TINY, **kw)
    with pytest.raises(ValueError, match="2 ids for 3 images"):
        ft_gradient_sketch(images[:3], ids[:2], TINY, **kw)
    with pytest.raises(TypeError, match="not a single bytes"):
        ft_gradient_sketch(images[0], ids[:1], TINY, **kw)
    with pytest.raises(ValueError, match="projector_kind"):
        ft_gradient_sketch(images[:2], ids[:2], TINY, projector_kind="kronecker", **kw)
    with pytest.raises(ValueError, match="sketch_dim must be a positive integer"):
        ft_gradient_sketch(images[:2], ids[:2], TINY, num_classes=10, sketch_dim=0, device="cpu")
    with pytest.raises(ValueError, match="seed must be a non-negative integer"):
        ft_gradient_sketch(images[:2], ids[:2], TINY, seed=-1, **kw)
    with pytest.raises(ValueError, match="image 1 could not be decoded"):
        ft_gradient_sketch([images[0], b"not an image"], ids[:2], TINY, **kw)
    with pytest.raises(TypeError, match="ClipSpec"):
        ft_gradient_sketch(images[:2], ids[:2], "skmm-tiny-vit", **kw)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_rows_match_cpu(pool, sketched):
    images, ids = pool
    S, producer = sketched
    S_gpu, producer_gpu = ft_gradient_sketch(images, ids, TINY, k=1, num_classes=10, sketch_dim=16, seed=3,
                                             batch_size=8, device="cuda")
    assert producer_gpu == producer
    np.testing.assert_allclose(S_gpu, S, rtol=1e-4, atol=1e-4)


def test_init_head_and_the_ft_path_leave_the_global_rng_as_it_was(pool):
    """The FT path's seeded tower build holds a lock over torch's process-wide generator; any draw from that
    generator outside it (nn.Linear's own init was one) can land inside another thread's build and change its
    tower. So nothing else on the path may draw from it."""
    images, ids = pool
    before = torch.random.get_rng_state()
    init_head(8, 3, seed=0)
    assert torch.equal(torch.random.get_rng_state(), before)
    ft_gradient_sketch(images[:4], ids[:4], TINY, k=1, num_classes=10, sketch_dim=16, seed=3, device="cpu")
    assert torch.equal(torch.random.get_rng_state(), before)


def test_concurrent_calls_give_the_rows_of_calls_one_at_a_time(pool):
    """The FT sketch stage runs shard tasks in threads of one process: each call's random-init tower and rows must
    be those of a call alone (they were not: one thread's head init drew from the generator inside another's
    seeded build, so that shard's rows came from another tower)."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    images, ids = pool
    parts = [(images[i::3], ids[i::3]) for i in range(3)]

    def call(part, barrier=None):
        if barrier is not None:
            barrier.wait()
        return ft_gradient_sketch(part[0], part[1], TINY, k=1, num_classes=10, sketch_dim=16, seed=3,
                                  device="cpu")[0]

    alone = [call(part) for part in parts]
    for _ in range(3):
        barrier = threading.Barrier(len(parts))
        with ThreadPoolExecutor(len(parts)) as pool_:
            together = list(pool_.map(call, parts, [barrier] * len(parts)))
        for a, b in zip(alone, together, strict=True):
            assert np.array_equal(a, b)


def test_at_one_batch_size_rows_are_bitwise_independent_of_order_and_shards(pool, sketched):
    """Every batch is zero-padded to ``batch_size`` images, so every gradient pass has one shape and a row's bits
    do not depend on which shard, or which part of a shard's last batch, it fell in (they did: a shorter last
    batch computed other bits, so a re-sharded or grown pool changed its rows)."""
    images, ids = pool
    S, _ = sketched  # batch_size=7: batches of 7, 7 and 6
    order = np.random.default_rng(1).permutation(N)
    shuffled, _ = ft_gradient_sketch([images[i] for i in order], [ids[i] for i in order], TINY, k=1, num_classes=10,
                                     sketch_dim=16, seed=3, batch_size=7, device="cpu")
    assert np.array_equal(shuffled, S[order])
    parts = [ft_gradient_sketch(images[a:b], ids[a:b], TINY, k=1, num_classes=10, sketch_dim=16, seed=3,
                                batch_size=7, device="cpu")[0] for a, b in ((0, 3), (3, 11), (11, N))]
    assert np.array_equal(np.concatenate(parts), S)


def test_every_batch_runs_the_tower_in_eval_mode(pool):
    """The gradients' wrapper of the tower was a new module, in train mode; per_sample_gradients puts its model back
    in the mode it found, so after a call's first batch the shared tower ran in train mode (MHA's fast path off,
    other bits; dropout on where a tower has any). A row then depended on whether its batch came first."""
    from skmm.gradients.clip_ft import _Suffix

    images, ids = pool
    model, preprocess = build_ft_model(TINY, 10, 3, "cpu")
    tokens = model.prefix(decode_images(images[:2], preprocess), 1).detach()
    per_sample_gradients(_Suffix(model, 1), tokens, torch.tensor([1, 2]), ft_parameter_names(model, 1))
    assert not model.training and not any(m.training for m in model.modules())

    kwargs = dict(k=1, num_classes=10, sketch_dim=16, seed=3, batch_size=1, device="cpu")
    rows, _ = ft_gradient_sketch([images[0], images[0], images[1]], [ids[0], ids[0], ids[1]], TINY, **kwargs)
    alone, _ = ft_gradient_sketch(images[1:2], ids[1:2], TINY, **kwargs)
    assert np.array_equal(rows[0], rows[1]) and np.array_equal(rows[2], alone[0])


def test_batches_are_padded_to_one_shape_on_the_cpu_and_to_a_power_of_two_on_cuda():
    from skmm.gradients.clip_ft import _padded_rows

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert [_padded_rows(r, 32, cpu) for r in (1, 5, 31, 32)] == [32] * 4
    assert [_padded_rows(r, 1024, cuda) for r in (1, 2, 3, 50, 513, 1024)] == [1, 2, 4, 64, 1024, 1024]
    assert _padded_rows(50, 48, cuda) == 48  # never past the batch size
