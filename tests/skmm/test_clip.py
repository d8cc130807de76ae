"""open_clip image features: the tiny registered model, determinism, local weights, and clear errors offline."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import time
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from skmm.models import (
    TINY_MODEL,
    ClipSpec,
    check_model_name,
    clear_model_cache,
    embed_images,
    embed_shards,
    load_clip,
)
from skmm.models import clip as clip_module

TINY = ClipSpec(TINY_MODEL)


def png(seed: int, size: tuple[int, int] = (40, 32), mode: str = "RGB") -> bytes:
    rng = np.random.default_rng(seed)
    channels = {"RGB": 3, "RGBA": 4}.get(mode)
    shape = (size[1], size[0], channels) if channels else (size[1], size[0])
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode=mode).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def images() -> list[bytes]:
    # Mixed sizes and modes: decoding must convert everything to RGB and the preprocess must resize.
    modes = ["RGB", "L", "RGBA"]
    return [png(i, (30 + i % 5, 32 + i % 3), modes[i % 3]) for i in range(23)]


@pytest.fixture(scope="module")
def open_clip_loaded():
    load_clip(TINY)  # pays the one-off ~4 s open_clip import
    import open_clip

    return open_clip


def save_safetensors(model: torch.nn.Module, path) -> None:
    from safetensors.torch import save_file

    save_file({k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}, str(path))


# --------------------------------------------------------------------------------------------------- spec


def test_spec_round_trip_digest_and_validation():
    spec = ClipSpec(TINY_MODEL, init_seed=3)
    assert spec.image_size == 32  # read from our config without importing anything heavy
    assert ClipSpec.from_dict(json.loads(spec.to_json())) == spec
    assert spec.digest == ClipSpec(TINY_MODEL, init_seed=3).digest
    assert spec.digest != ClipSpec(TINY_MODEL, init_seed=4).digest
    assert ClipSpec("ViT-S-32").image_size == 224
    # init_seed does not change pretrained features, so it does not change their identity.
    assert ClipSpec("ViT-B-32", "openai", init_seed=1).digest == ClipSpec("ViT-B-32", "openai", init_seed=2).digest
    local = ClipSpec("local-dir:/models/x")
    assert (local.model, local.pretrained) == ("local-dir", "local-dir:/models/x")
    with pytest.raises(ValueError, match="precision"):
        ClipSpec(TINY_MODEL, precision="fp16")
    with pytest.raises(ValueError, match="init_seed"):
        ClipSpec(TINY_MODEL, init_seed=-1)
    with pytest.raises(ValueError, match="unknown ClipSpec field"):
        ClipSpec.from_dict({"model": TINY_MODEL, "seed": 1})
    with pytest.raises(ValueError, match="weights_sha256 applies only"):
        ClipSpec(TINY_MODEL, weights_sha256="0" * 64)


# --------------------------------------------------------------------------------------------------- loading


def test_tiny_model_loads_well_under_a_second(open_clip_loaded):
    start = time.perf_counter()
    model, preprocess = load_clip(TINY, device="cpu")
    assert time.perf_counter() - start < 0.5
    assert not model.training
    assert preprocess(Image.new("RGB", (50, 40))).shape == (3, 32, 32)


def test_random_init_does_not_touch_the_global_rng(open_clip_loaded, monkeypatch):
    state = torch.get_rng_state()
    seeded = []  # torch.manual_seed also seeds every CUDA device (lazily, at CUDA's start without a device)
    monkeypatch.setattr(torch.cuda, "manual_seed_all", lambda seed: seeded.append(seed))
    load_clip(ClipSpec(TINY_MODEL, init_seed=11), device="cpu")
    assert torch.equal(state, torch.get_rng_state())
    assert seeded == []  # the tower is built on the CPU: only the CPU generator is seeded (and restored)


def test_unknown_model_name_is_a_clear_error(open_clip_loaded):
    with pytest.raises(ValueError, match=r"unknown open_clip model 'ViT-B-33'; did you mean .*ViT-B-32") as info:
        load_clip(ClipSpec("ViT-B-33"))
    assert "\n" not in str(info.value)


def test_missing_and_unreadable_weights_files(open_clip_loaded, tmp_path):
    with pytest.raises(ValueError, match=r"weights file not found: .*nope.safetensors"):
        load_clip(ClipSpec(TINY_MODEL, str(tmp_path / "nope.safetensors")))
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file at all")
    with pytest.raises(ValueError, match=r"could not read weights at .*junk.safetensors"):
        load_clip(ClipSpec(TINY_MODEL, str(junk)))
    with pytest.raises(ValueError, match=r"is a directory; .* use pretrained='local-dir:"):
        load_clip(ClipSpec(TINY_MODEL, str(tmp_path)))


@pytest.mark.parametrize(
    ("change", "expected"),
    [({"layers": 3}, "unexpected keys visual.transformer.resblocks.2"), ({"width": 96}, "shape mismatch")],
)
def test_weights_of_another_config_are_a_clear_mismatch(open_clip_loaded, tmp_path, change, expected):
    open_clip = open_clip_loaded
    cfg = open_clip.get_model_config(TINY_MODEL)
    other = open_clip.CLIP(cfg["embed_dim"], {**cfg["vision_cfg"], **change}, cfg["text_cfg"])
    path = tmp_path / "other.safetensors"
    save_safetensors(other, path)
    pattern = rf"weights at .*other\.safetensors do not match model {TINY_MODEL}: .*{expected}"
    with pytest.raises(ValueError, match=pattern):
        load_clip(ClipSpec(TINY_MODEL, str(path)))


def test_pretrained_tag_offline_fails_fast_and_clearly(open_clip_loaded, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.perf_counter()
    expected = r"not in the local cache and HF_HUB_OFFLINE is set; tags and hub models need network.*local weights"
    with pytest.raises(ValueError, match=expected):
        load_clip(ClipSpec("ViT-B-32", "laion2b_s34b_b79k"))
    assert time.perf_counter() - start < 5


def test_pretrained_tag_without_offline_flag_fails_fast_when_unreachable(open_clip_loaded, monkeypatch):
    # HF_HUB_OFFLINE unset: one bounded reachability probe (stubbed here: no network in tests) instead of ~50 s
    # of huggingface_hub retries.
    import huggingface_hub.constants

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    probed = []
    monkeypatch.setattr(clip_module, "_reachable", lambda host, *a, **k: probed.append(host) or False)
    with pytest.raises(ValueError, match=r"not in the local cache and huggingface\.co cannot be reached"):
        load_clip(ClipSpec("ViT-B-32", "laion2b_s34b_b79k"))
    assert probed == ["huggingface.co"]


def test_hub_model_offline_fails_fast(open_clip_loaded, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.perf_counter()
    with pytest.raises(ValueError, match=r"hub model 'hf-hub:org/nothing-here' cannot be loaded: .*HF_HUB_OFFLINE"):
        load_clip(ClipSpec("hf-hub:org/nothing-here"))
    assert time.perf_counter() - start < 5
    with pytest.raises(ValueError, match="pass a hub model as model="):
        ClipSpec("ViT-B-32", "hf-hub:org/nothing-here")


def test_unknown_tag_lists_the_known_ones(open_clip_loaded):
    with pytest.raises(ValueError, match=r"neither a weights file nor a known tag for model 'ViT-B-32'.*openai"):
        load_clip(ClipSpec("ViT-B-32", "laion9000"))


# --------------------------------------------------------------------------------------------------- embedding


def test_shape_dtype_finite_unit_norm(images):
    X = embed_images(images, TINY, device="cpu")
    assert X.shape == (len(images), 32) and X.dtype == np.float32 and X.flags.c_contiguous
    assert np.isfinite(X).all()
    np.testing.assert_allclose(np.linalg.norm(X, axis=1), 1.0, atol=1e-5)
    raw = embed_images(images, TINY, device="cpu", normalize=False)
    np.testing.assert_allclose(raw / np.linalg.norm(raw, axis=1, keepdims=True), X, atol=1e-6)
    assert embed_images([], TINY, device="cpu").shape == (0, 32)


@pytest.fixture(scope="module")
def pool() -> list[bytes]:
    # More images than one compute block, so blocks are full, partial and padded depending on the split.
    modes = ["RGB", "L", "RGBA"]
    return [png(1000 + i, (28 + i % 7, 30 + i % 4), modes[i % 3]) for i in range(75)]


def test_features_are_bitwise_independent_of_batch_size_order_iterator_and_threads(pool):
    # Row i is a function of image i's bytes alone: any batch size, order or iterator gives the same bits.
    reference = embed_images(pool, TINY, batch_size=64, device="cpu")
    for batch_size in (1, 7, 64, 100):
        assert np.array_equal(embed_images(pool, TINY, batch_size=batch_size, device="cpu"), reference), batch_size
    order = np.random.default_rng(0).permutation(len(pool))
    shuffled = embed_images(iter([pool[i] for i in order]), TINY, batch_size=7, device="cpu")
    assert np.array_equal(shuffled, reference[order])
    assert np.array_equal(embed_images(pool[5:6], TINY, device="cpu"), reference[5:6])  # alone
    for threads in (1, 3):  # the intra-op thread count changes no bit either
        assert np.array_equal(embed_images(pool, TINY, device="cpu", num_threads=threads), reference), threads
    raw = embed_images(pool, TINY, batch_size=64, device="cpu", normalize=False)
    assert np.array_equal(embed_images(pool[::-1], TINY, batch_size=1, device="cpu", normalize=False), raw[::-1])


@pytest.mark.parametrize("shards", [3, 7])
def test_features_are_bitwise_independent_of_the_shard_count(pool, shards):
    reference = embed_shards([pool], TINY, device="cpu")[0]
    parts = embed_shards([list(p) for p in np.array_split(np.array(pool, dtype=object), shards)], TINY, device="cpu")
    assert [len(p) for p in parts] == [len(p) for p in np.array_split(np.arange(len(pool)), shards)]
    assert np.array_equal(np.concatenate(parts), reference)


def test_init_seed_reproducible_and_distinct(images):
    a = embed_images(images, ClipSpec(TINY_MODEL, init_seed=5), device="cpu")
    clear_model_cache()  # rebuild from scratch
    b = embed_images(images, ClipSpec(TINY_MODEL, init_seed=5), device="cpu")
    c = embed_images(images, ClipSpec(TINY_MODEL, init_seed=6), device="cpu")
    np.testing.assert_array_equal(a, b)
    assert np.abs(a - c).max() > 1e-2


def test_local_weights_file_and_local_dir_round_trip(images, tmp_path):
    source = ClipSpec(TINY_MODEL, init_seed=3)
    model, _ = load_clip(source, device="cpu")
    path = tmp_path / "tiny.safetensors"
    save_safetensors(model, path)
    expected = embed_images(images, source, device="cpu")

    from_file = ClipSpec(TINY_MODEL, str(path), init_seed=99)  # init_seed is irrelevant with weights
    np.testing.assert_array_equal(embed_images(images, from_file, device="cpu"), expected)

    export = tmp_path / "export"
    export.mkdir()
    import open_clip

    config = {"model_cfg": open_clip.get_model_config(TINY_MODEL), "preprocess_cfg": {}}
    (export / "open_clip_config.json").write_text(json.dumps(config))
    save_safetensors(model, export / "open_clip_model.safetensors")
    for spec in (ClipSpec(f"local-dir:{export}"), ClipSpec(TINY_MODEL, f"local-dir:{export}")):
        assert spec.image_size == 32
        np.testing.assert_array_equal(embed_images(images, spec, device="cpu"), expected)


def test_pinned_weights_digest_follows_content_not_path(tmp_path):
    model, _ = load_clip(ClipSpec(TINY_MODEL, init_seed=1), device="cpu")
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    save_safetensors(model, a)
    b.write_bytes(a.read_bytes())
    pinned_a = ClipSpec(TINY_MODEL, str(a)).with_weights_digest()
    pinned_b = ClipSpec(TINY_MODEL, str(b)).with_weights_digest()
    assert pinned_a.weights_sha256 == pinned_b.weights_sha256 and pinned_a.digest == pinned_b.digest
    assert pinned_a.digest != ClipSpec(TINY_MODEL, str(a)).digest
    load_clip(pinned_a, device="cpu")  # the check passes
    save_safetensors(load_clip(ClipSpec(TINY_MODEL, init_seed=2), device="cpu")[0], a)
    with pytest.raises(ValueError, match="the spec pins"):
        load_clip(pinned_a, device="cpu")


def test_image_size_override(images):
    X = embed_images(images[:3], ClipSpec(TINY_MODEL, image_size=48), device="cpu")
    assert X.shape == (3, 32) and np.isfinite(X).all()


def test_bad_inputs_name_the_index(images):
    bad = [*images[:2], b"\x89PNG\r\n\x1a\n truncated", images[3]]
    with pytest.raises(ValueError, match=r"image 2 could not be decoded \(18 bytes\)"):
        embed_images(bad, TINY, batch_size=2, device="cpu")
    with pytest.raises(TypeError, match="image 1: expected encoded image bytes, got str"):
        embed_images([images[0], "cat.png"], TINY, device="cpu")
    with pytest.raises(TypeError, match="not a single bytes object"):
        embed_images(images[0], TINY, device="cpu")
    with pytest.raises(ValueError, match="batch_size"):
        embed_images(images, TINY, batch_size=0, device="cpu")


def test_progress_bar_and_thread_count_restored(images, capsys):
    threads = torch.get_num_threads()
    X = embed_images(images, TINY, device="cpu", progress=True, num_threads=1)
    assert X.shape == (len(images), 32)
    assert torch.get_num_threads() == threads
    assert "img" in capsys.readouterr().err


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu_and_is_batch_invariant(images):
    cpu = embed_images(images, TINY, device="cpu")
    gpu = embed_images(images, TINY, device="cuda", batch_size=64)
    np.testing.assert_allclose(gpu, cpu, atol=1e-4)
    np.testing.assert_allclose(embed_images(images, TINY, device="cuda", batch_size=7), gpu, atol=1e-5)
    assert embed_images(images, TINY).shape == gpu.shape  # device=None picks CUDA


def test_check_model_name_fails_fast_without_importing_open_clip():
    """Known names (open_clip's bundled configs and ours) pass without the ~4 s open_clip import; an unknown
    name raises the loader's own error, with close names suggested."""
    code = ("import sys; from skmm.models import check_model_name; check_model_name('ViT-S-32'); "
            "check_model_name('skmm-tiny-vit'); check_model_name('hf-hub:org/model'); "
            "check_model_name('local-dir:/models/export'); "
            "print('open_clip' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "False"
    with pytest.raises(ValueError, match=r"unknown open_clip model 'ViT-S-33'; did you mean ViT-S-32"):
        check_model_name("ViT-S-33")


# --------------------------------------------------------------------------------------------------- decoding modes


def encoded(im: Image.Image, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    im.save(buf, format=fmt)
    return buf.getvalue()


@pytest.fixture(scope="module")
def picture() -> np.ndarray:
    """An 8-bit grey picture (a ramp with noise, every level 0–255 present): the reference of the mode tests."""
    rng = np.random.default_rng(7)
    ramp = np.linspace(0, 255, 40 * 32).reshape(32, 40)
    return np.clip(ramp + rng.integers(-20, 21, ramp.shape), 0, 255).astype(np.uint8)


# mode → (how the same picture is stored in that mode, file format). 16-bit samples are v * 257 (the usual 8 → 16
# expansion) or v * 256 + noise in the low byte: both read back as v (the high byte).
MODE_CASES = {
    "I;16 png": (lambda p: Image.fromarray(p.astype(np.uint16) * 257), "PNG"),
    "I;16 tiff, low byte noise": (lambda p: Image.fromarray(p.astype(np.uint16) * 256 + p[::-1]), "TIFF"),
    "I;16B tiff": (lambda p: Image.frombytes("I;16B", p.shape[::-1], (p.astype(">u2") * 257).tobytes()), "TIFF"),
    "I tiff": (lambda p: Image.fromarray(p.astype(np.int32) * 257), "TIFF"),
    "F tiff": (lambda p: Image.fromarray(p.astype(np.float32) / 255), "TIFF"),
    "LA png": (lambda p: Image.fromarray(np.stack([p, p[::-1]], -1), "LA"), "PNG"),
    "PA tiff": (lambda p: Image.fromarray(p).convert("PA"), "TIFF"),
    "CMYK tiff": (lambda p: Image.fromarray(p).convert("RGB").convert("CMYK"), "TIFF"),
}


def _p_with_transparency(p: np.ndarray) -> Image.Image:
    im = Image.fromarray(p).convert("P")  # grey palette: index i is grey level i
    im.info["transparency"] = bytes(range(256))  # per-entry alpha: Pillow's RGB conversion would warn
    return im


MODE_CASES["P with transparency png"] = (_p_with_transparency, "PNG")


@pytest.mark.parametrize("case", list(MODE_CASES))
def test_every_mode_embeds_like_its_8_bit_picture(picture, case):
    """16-bit, 32-bit integer and float images, alpha modes and CMYK decode to the 8-bit picture they hold."""
    make, fmt = MODE_CASES[case]
    data = encoded(make(picture), fmt)
    with Image.open(io.BytesIO(data)) as im, warnings.catch_warnings():
        warnings.simplefilter("error")  # silently: no warning per image
        assert im.mode == case.split()[0], im.mode  # the file really holds that mode
        rgb = np.asarray(clip_module._to_rgb(im))
    assert rgb.dtype == np.uint8 and rgb.shape == (*picture.shape, 3)
    assert np.array_equal(rgb, np.repeat(picture[..., None], 3, -1)), np.abs(rgb[..., 0] - picture.astype(int)).max()
    reference = encoded(Image.fromarray(picture))  # the same picture as an 8-bit L PNG
    features = embed_images([reference, data], TINY)
    assert np.array_equal(features[0], features[1])


def test_one_bit_images_embed_like_black_and_white_8_bit(picture):
    bits = picture > 127
    features = embed_images([encoded(Image.fromarray(bits)), encoded(Image.fromarray(bits.astype(np.uint8) * 255))],
                            TINY)
    assert np.array_equal(features[0], features[1])


@pytest.mark.parametrize("mode", ["RGB", "L", "P", "RGBA", "1", "CMYK", "LA"])
def test_8_bit_modes_decode_exactly_as_before(mode):
    """The decoding rule changes nothing for modes Pillow already converted faithfully (same pixels, so the same
    features as before): only I;16*, I and F are new (and P with transparency, which is only quieter)."""
    rng = np.random.default_rng(3)
    im = Image.fromarray(rng.integers(0, 256, (24, 20, 3), dtype=np.uint8)).convert(mode)
    with Image.open(io.BytesIO(encoded(im, "TIFF" if mode == "CMYK" else "PNG"))) as decoded:
        assert np.array_equal(np.asarray(clip_module._to_rgb(decoded)), np.asarray(decoded.convert("RGB")))


def test_images_above_the_pixel_limit_name_the_sample():
    import hashlib

    small, large = png(1, (10, 10)), png(2, (40, 30))
    assert embed_images([small], TINY, max_pixels=100).shape == (1, 32)  # at the limit: fine
    with pytest.raises(ValueError) as info:
        embed_images([small, large], TINY, max_pixels=100)
    message = str(info.value)
    assert message.startswith(f"image 1 (sample {hashlib.sha256(large).hexdigest()}) is 40×30 = 1200 pixels, "
                              "above the limit of 100 pixels"), message
    assert "--max-pixels" in message
    assert clip_module.MAX_PIXELS == Image.MAX_IMAGE_PIXELS == 89_478_485  # the default is Pillow's


def test_cuda_and_its_index_share_one_cached_tower(monkeypatch):
    """The model cache keyed "cuda" and "cuda:0" apart: two towers on one device, and two decode pools (a pool
    serves the preprocess object it was made for)."""
    from skmm.models.clip import _device_key

    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)  # no device is touched
    assert _device_key(torch.device("cuda")) == _device_key(torch.device("cuda:0")) == "cuda:0"
    assert _device_key(torch.device("cuda:1")) == "cuda:1" and _device_key(torch.device("cpu")) == "cpu"
