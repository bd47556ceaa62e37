"""The inference engine keeps its promises: same outputs as each branch alone, every input once
and in order, CLIP skipped where lazy routing or the cascade keep an image, clear out-of-memory
errors naming batch_size."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from hybridcls.bench.speed import write_jpegs
from hybridcls.data import expand_inputs, load_image
from hybridcls.device import autocast_dtype
from hybridcls.engine import InferenceEngine
from hybridcls.errors import InputError, ParameterError
from hybridcls.gate import Gate, GateCalibration, fit_cascade, max_softmax
from hybridcls.hybrid import HybridClassifier
from hybridcls.runtime import DECODERS, PRECISIONS, RuntimeSettings
from hybridcls.supervised import build_eval_transform, build_model
from hybridcls.supervised.checkpoint import make_checkpoint_config, save_checkpoint
from tests.imagefactory import make_corrupt_png, make_plain, make_truncated_jpeg, make_zero_byte
from tests.tinyclip_factory import make_tiny_clip

CLASSES = ["red circle", "green square", "blue star", "yellow moon", "violet ring"]
SEEN = ["red_circle", "green_square", "blue_star"]


@pytest.fixture(scope="module")
def hybrid(tmp_path_factory) -> HybridClassifier:
    """A random ``test_convnext`` run (3 seen classes) and a random tiny CLIP (5 classes)."""
    root = tmp_path_factory.mktemp("engine")
    torch.manual_seed(0)
    model, data_cfg = build_model("test_convnext", len(SEEN), weights_source="none", image_size=48,
                                  head="mlp", dropout=0.0, hidden_dim=32)
    config = make_checkpoint_config(model, model_name="test_convnext", classes=SEEN, data_config=data_cfg,
                                    head="mlp", dropout=0.0, hidden_dim=32, weights={"source": "none"})
    save_checkpoint(root / "run", model, config)
    clip_dir = make_tiny_clip(root / "clip")
    return HybridClassifier(clip_model=f"local-dir:{clip_dir}", clip_pretrained=None, prompts=CLASSES,
                            templates=["a photo of a {}."], device="cpu", batch_size=4, workers=0,
                            cache_dir=root / "cache").load_run(root / "run")


@pytest.fixture
def restores_hybrid(hybrid):
    """Put back what a test changes on the shared hybrid: gate, cascade, the run's gate.json and index/."""
    import shutil

    saved = hybrid.gate_, hybrid.cascade
    index_dir, gate_file = hybrid.run_dir_ / "index", hybrid.run_dir_ / "gate.json"
    had = index_dir.exists(), gate_file.exists()
    yield
    hybrid.gate_ = saved[0]
    hybrid.set_params(cascade=saved[1])
    if not had[0]:
        shutil.rmtree(index_dir, ignore_errors=True)
    if not had[1]:
        gate_file.unlink(missing_ok=True)


def _manual(hybrid: HybridClassifier, **fields) -> Gate:
    return Gate.from_calibration(GateCalibration(method="manual", **fields), n_seen=hybrid.n_seen_)


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> list:
    folder = tmp_path_factory.mktemp("images")
    write_jpegs(folder, 9, size=(120, 90), seed=1)
    make_plain(folder, "PNG", "zz_plain")
    return expand_inputs([folder])


def _engine(clf: HybridClassifier, extra_views=(), **kw) -> InferenceEngine:
    settings = RuntimeSettings(device="cpu", batch_size=4, workers=kw.pop("workers", 0), **kw)
    return InferenceEngine(supervised=clf.supervised_, sup_view=clf.engine_.views[0], clip=clf.tower_,
                           settings=settings, extra_views=extra_views)


def _all(engine: InferenceEngine, sources, **kw):
    batches = list(engine.iter_batches(sources, **kw))
    cat = lambda name: np.concatenate([getattr(b.outputs, name) for b in batches if b.ok])
    return batches, cat


def test_engine_matches_each_branch_alone(hybrid, images):
    _batches, cat = _all(_engine(hybrid), images)
    tf = build_eval_transform(hybrid.checkpoint_config_)
    with torch.inference_mode():
        x = torch.stack([tf(load_image(s.path)) for s in images])
        sup_logits, _ = hybrid.supervised_.eval().forward_with_features(x)
    np.testing.assert_allclose(cat("sup_logits"), sup_logits.numpy(), rtol=1e-4, atol=1e-4)
    # open_clip's own preprocess and encoder, one image at a time
    tower = hybrid.tower_
    with torch.inference_mode():
        x = torch.stack([tower.bundle.preprocess(load_image(s.path)) for s in images])
        emb = torch.nn.functional.normalize(tower.bundle.model.encode_image(x).float(), dim=-1)
    clip_logits = tower.logit_scale * (emb @ tower.text_features)
    np.testing.assert_allclose(cat("clip_logits"), clip_logits.numpy(), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("workers", [0, 2])
def test_every_input_once_in_order(hybrid, images, tmp_path, workers):
    bad = [make_truncated_jpeg(tmp_path), make_zero_byte(tmp_path), make_corrupt_png(tmp_path)]
    sources = list(images[:5]) + expand_inputs([str(p) for p in bad]) + list(images[5:])
    engine = _engine(hybrid, workers=workers)
    batches = list(engine.iter_batches(sources))
    assert [i for b in batches for i in b.indices] == list(range(len(sources)))
    errors = {i for b in batches for i in b.errors}
    assert errors == {5, 6, 7}
    assert [i for b in batches for i in b.ok] == [i for i in range(len(sources)) if i not in errors]


def test_device_decode_falls_back_to_cpu_and_keeps_errors(hybrid, images, tmp_path):
    # On the CPU, decode="device" runs the same code as on CUDA, with torchvision's CPU JPEG decoder.
    bad = [make_zero_byte(tmp_path), make_corrupt_png(tmp_path)]
    sources = list(images) + expand_inputs([str(p) for p in bad])
    engine = _engine(hybrid, decode="device")
    batches, cat = _all(engine, sources)
    assert [i for b in batches for i in b.indices] == list(range(len(sources)))
    assert {i for b in batches for i in b.errors} == {len(images), len(images) + 1}
    assert engine.device_decoded == 9  # the JPEGs; the PNG took the CPU path
    _, ref = _all(_engine(hybrid), images)
    # Tensor resize (antialiased) vs PIL resize: close, not identical.
    np.testing.assert_allclose(cat("sup_logits"), ref("sup_logits"), atol=0.15)


def test_extra_views_come_from_the_same_decode(hybrid, images, tmp_path):
    from hybridcls.audit.pixels import ThumbnailTransform, thumbnail_of_image

    sources = list(images[:4]) + expand_inputs([str(make_zero_byte(tmp_path))]) + list(images[4:])
    batches, cat = _all(_engine(hybrid, extra_views=[ThumbnailTransform()]), sources)
    thumbs = np.concatenate([b.extra_views[0] for b in batches if b.ok])
    # what a separate decode of each readable file gives, and the towers' outputs are unchanged
    np.testing.assert_array_equal(thumbs, np.stack([thumbnail_of_image(load_image(s.path)) for s in images]))
    _, ref = _all(_engine(hybrid), images)
    # (not bit-equal: the unreadable file shifts which images share a batch)
    np.testing.assert_allclose(cat("clip_embeddings"), ref("clip_embeddings"), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(cat("sup_logits"), ref("sup_logits"), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="decode='device': extra views need decode='cpu'"):
        _engine(hybrid, decode="device", extra_views=[ThumbnailTransform()])


@pytest.mark.parametrize("size", [(1, 16000), (16000, 1)], ids=["tall", "wide"])
def test_a_thin_strip_is_an_ok_row_on_both_decoders(hybrid, tmp_path, size):
    # Issue 12: both geometries cut a strip to 16:1 around its centre before resizing its shorter
    # side, on PIL images and on the device decoder's tensors. What the towers see of a uniform
    # strip is then the uniform crop a square of its colour gives.
    from PIL import Image

    for name, shape in (("strip.jpg", size), ("square.jpg", (64, 64))):
        Image.new("RGB", shape, (200, 30, 30)).save(tmp_path / name, quality=100, subsampling=0)
    sources = expand_inputs([str(tmp_path / "strip.jpg"), str(tmp_path / "square.jpg")])
    for decode in DECODERS:
        engine = _engine(hybrid, decode=decode)
        batches, cat = _all(engine, sources)
        assert [i for b in batches for i in b.ok] == [0, 1]
        for name in ("sup_logits", "clip_logits"):  # row 0 the strip, row 1 the square
            np.testing.assert_allclose(cat(name)[0], cat(name)[1], atol=1e-4)
        assert engine.device_decoded == (0 if decode == "cpu" else 2)


# The registry, not a list typed here: every precision runs on the CPU, in its own type.
@pytest.mark.parametrize("precision", PRECISIONS)
def test_every_precision_computes_in_its_type_close_to_float32(hybrid, images, precision):
    _, ref = _all(_engine(hybrid, precision="fp32"), images[:4])
    engine = _engine(hybrid, precision=precision)
    _, got = _all(engine, images[:4])
    for name, tower in (("sup_logits", "supervised"), ("clip_logits", "clip")):
        dtype = autocast_dtype(torch.device("cpu"), precision, tower=tower)
        # float32 itself gives the same numbers; an autocast type rounds (so it acted), within
        # a few of its units in the last place of the largest logit; int8 rounds each Linear
        # layer's weights to 1/254 and its inputs to 1/255 of their range: a few percent at most
        scale = np.abs(ref(name)).max()
        tol = (0.05 * scale if precision == "int8" else 0.0 if dtype is None
               else 8 * torch.finfo(dtype).eps * scale)
        np.testing.assert_allclose(got(name), ref(name), rtol=0, atol=tol)
        assert np.array_equal(got(name), ref(name)) == (dtype is None and precision != "int8"), name
    weights = {"int8": "int8 linear", "bf16": "bfloat16"}.get(precision, "float32")
    if precision == "auto":  # the CLIP tower's bfloat16 runs as a copy of its weights
        weights = "bfloat16" if autocast_dtype(torch.device("cpu"), "auto", tower="clip") else "float32"
    assert engine.applied["weights"] == {"supervised": "int8 linear" if precision == "int8" else "float32",
                                         "clip": weights}


def test_reduced_copies_leave_the_classifiers_models_in_float32(hybrid, images):
    """On the CPU, bf16 runs the CLIP image tower as a bfloat16 copy outside autocast (torch's
    attention keeps its fused path), int8 both towers as copies with int8 Linear layers."""
    from torch.ao.nn.quantized.dynamic import Linear as DynamicInt8Linear

    bf16 = _engine(hybrid, precision="bf16")
    assert {p.dtype for p in bf16._clip_visual.parameters()} == {torch.bfloat16}
    autocast_seen = []
    visual_forward = bf16._clip_visual.forward
    bf16._clip_visual.forward = lambda x: (autocast_seen.append(torch.is_autocast_enabled("cpu")),
                                           visual_forward(x))[1]
    _all(bf16, images[:2])
    assert autocast_seen == [False]
    int8 = _engine(hybrid, precision="int8")
    assert any(isinstance(m, DynamicInt8Linear) for m in int8._clip_visual.modules())
    assert any(isinstance(m, DynamicInt8Linear) for m in int8._sup_forward.__self__.modules())
    for module in (hybrid.supervised_, hybrid.tower_.bundle.model):
        assert {p.dtype for p in module.parameters()} == {torch.float32}
        assert not any(isinstance(m, DynamicInt8Linear) for m in module.modules())


def test_int8_runs_on_the_cpu_only_and_auto_follows_the_cpus_bfloat16(monkeypatch):
    from hybridcls import device

    for tower in device.TOWERS:
        with pytest.raises(ParameterError, match=r"precision='int8': int8 dynamic quantisation runs on "
                                                 r"the CPU only, not on cuda; use precision='auto'"):
            autocast_dtype(torch.device("cuda"), "int8", tower=tower)
    # the measured rule (docs/benchmarks.md): under auto, the supervised CNN in bfloat16 on a CPU
    # that computes it natively, the CLIP image tower in float32 (97.9% zero-shot agreement)
    import conftest

    assert conftest.SHIPPED_AUTO_BF16_CPU_TOWERS == {"supervised"}
    cpu = torch.device("cpu")
    monkeypatch.setattr(device, "AUTO_BF16_CPU_TOWERS", frozenset({"supervised"}))  # conftest empties it
    for native in (True, False):
        monkeypatch.setattr(device, "cpu_native_bf16", lambda native=native: native)
        assert autocast_dtype(cpu, "auto", tower="supervised") == (torch.bfloat16 if native else None)
        assert autocast_dtype(cpu, "auto", tower="clip") is None
        for tower in device.TOWERS:
            assert autocast_dtype(cpu, "fp32", tower=tower) is None
            assert autocast_dtype(cpu, "bf16", tower=tower) == torch.bfloat16
    assert autocast_dtype(torch.device("meta"), "auto", tower="supervised") is None  # no rule there


def test_auto_on_a_native_bfloat16_cpu_runs_the_cnn_in_bfloat16_and_clip_in_float32(hybrid, images,
                                                                                    monkeypatch):
    from hybridcls import device

    monkeypatch.setattr(device, "AUTO_BF16_CPU_TOWERS", frozenset({"supervised"}))
    monkeypatch.setattr(device, "cpu_native_bf16", lambda: True)
    engine = _engine(hybrid, precision="auto")
    assert engine.applied["autocast"] == {"supervised": "bfloat16", "clip": None}
    assert engine.applied["weights"] == {"supervised": "float32", "clip": "float32"}
    _, ref = _all(_engine(hybrid, precision="fp32"), images[:4])
    _, got = _all(engine, images[:4])
    assert np.array_equal(got("clip_logits"), ref("clip_logits"))
    assert not np.array_equal(got("sup_logits"), ref("sup_logits"))  # rounded in bfloat16: it acted
    monkeypatch.setattr(device, "cpu_native_bf16", lambda: False)
    assert _engine(hybrid, precision="auto").applied["autocast"] == {"supervised": None, "clip": None}


@pytest.mark.parametrize(("machine", "checks", "mkldnn", "native"), [
    ("x86_64", {"_is_avx512_bf16_supported": True, "_is_amx_tile_supported": False}, True, True),
    ("x86_64", {"_is_avx512_bf16_supported": False, "_is_amx_tile_supported": True}, True, True),
    # AVX-512 without BF16: oneDNN emulates bfloat16 (its check says yes), no faster than float32
    ("x86_64", {"_is_avx512_bf16_supported": False, "_is_amx_tile_supported": False}, True, False),
    ("aarch64", {"_is_avx512_bf16_supported": False, "_is_amx_tile_supported": False}, True, True),
    ("arm64", {"_is_avx512_bf16_supported": False, "_is_amx_tile_supported": False}, False, False),
])
def test_native_bfloat16_is_read_from_the_cpus_features(monkeypatch, machine, checks, mkldnn, native):
    import platform

    from hybridcls import device

    monkeypatch.setattr(platform, "machine", lambda: machine)
    for name, value in checks.items():
        monkeypatch.setattr(torch.cpu, name, lambda value=value: value)
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: mkldnn, raising=False)
    assert device.cpu_native_bf16() is native


def test_the_cnn_runs_channels_last_on_the_cpu(hybrid, images):
    engine = _engine(hybrid, precision="fp32")
    assert engine.applied["channels_last"] is True
    convs = [m.weight for m in hybrid.supervised_.modules() if isinstance(m, torch.nn.Conv2d)]
    assert convs and all(w.is_contiguous(memory_format=torch.channels_last) for w in convs)
    seen = []
    forward = engine._sup_forward
    engine._sup_forward = lambda x: (seen.append(x.is_contiguous(memory_format=torch.channels_last)),
                                     forward(x))[1]
    _all(engine, images[:4])
    assert seen == [True]


def test_large_jpegs_are_decoded_at_a_reduced_scale_for_both_towers(hybrid, tmp_path):
    import math

    camera = write_jpegs(tmp_path / "camera", 2, size=(1600, 1200), seed=5)
    sources = expand_inputs([str(p) for p in camera])
    engine = _engine(hybrid, precision="fp32")
    # the larger of the two resizes: the supervised view's floor(48 / crop_pct), CLIP's 32
    crop_pct = hybrid.checkpoint_config_["data_config"]["crop_pct"]
    assert engine.target_side == engine.applied["draft_target_side"] == max(math.floor(48 / crop_pct), 32)
    # 1200 // (2 * target side) >= 8: decoded at 1/8 of each side
    assert engine.load(sources[0]).size == (200, 150)
    full = _engine(hybrid, precision="fp32", draft=False)
    assert full.target_side is None and full.load(sources[0]).size == (1600, 1200)
    _, small_cat = _all(engine, sources)
    _, full_cat = _all(full, sources)
    for name in ("sup_logits", "clip_logits"):
        # the same top class and nearly the same logits (random towers: tiny margins)
        np.testing.assert_allclose(small_cat(name), full_cat(name), rtol=0,
                                   atol=0.05 * np.abs(full_cat(name)).max())
    from hybridcls.audit.pixels import ThumbnailTransform

    assert _engine(hybrid, extra_views=[ThumbnailTransform()]).target_side is None


def test_compiled_shapes_are_fixed(hybrid, images, monkeypatch):
    engine = _engine(hybrid)
    # exercise the padding without paying for a real compile on the CPU
    engine.settings = engine.settings.replace(compile=True)
    seen_rows = []
    forward = engine._sup_forward

    def spy(x):
        seen_rows.append(len(x))
        return forward(x)

    engine._sup_forward = spy
    _, cat = _all(engine, images)  # 10 images at batch 4: the last batch (2) is padded
    assert set(seen_rows) == {4}
    _, ref = _all(_engine(hybrid), images)
    np.testing.assert_allclose(cat("sup_logits"), ref("sup_logits"), rtol=1e-4, atol=1e-4)


def test_out_of_memory_halves_then_names_batch_size(hybrid, images):
    engine = _engine(hybrid)
    forward = engine._sup_forward

    def small_device(x):
        if len(x) > 2:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return forward(x)

    engine._sup_forward = small_device
    with pytest.warns(RuntimeWarning, match="batch_size=4"):
        _, cat = _all(engine, images)
    _, ref = _all(_engine(hybrid), images)
    np.testing.assert_allclose(cat("sup_logits"), ref("sup_logits"), rtol=1e-4, atol=1e-4)

    def no_device(x):
        raise torch.OutOfMemoryError("CUDA out of memory")

    engine._sup_forward = no_device
    with pytest.warns(RuntimeWarning), pytest.raises(InputError, match="batch_size=4"):
        list(engine.iter_batches(images))


def test_lazy_and_cascade_skip_clip(hybrid, images, restores_hybrid):
    feats = hybrid.extract_features(images)
    msp = max_softmax(feats.sup_logits)
    median = float(np.median(msp))
    # Lazy: a hard gate on a supervised score encodes only the routed images.
    hybrid.gate_ = _manual(hybrid, score="msp", mode="hard", threshold=-median)
    before = hybrid.engine_.clip_images_encoded
    lazy = hybrid.predict_proba(images)
    assert hybrid.engine_.clip_images_encoded - before == int((msp < median).sum()) < len(images)
    assert np.allclose(lazy.sum(axis=1), 1.0)

    # Cascade: a CLIP-side soft gate; CLIP runs only at or below the cascade threshold.
    hybrid.gate_ = _manual(hybrid, score="clip_margin", mode="soft", threshold=0.0, soft_scale=1.0)
    full = hybrid.predict_proba(images)
    hybrid.gate_ = _manual(hybrid, score="clip_margin", mode="soft", threshold=0.0, soft_scale=1.0,
                           cascade_msp=median)
    hybrid.set_params(cascade=True)
    before = hybrid.engine_.clip_images_encoded
    casc = hybrid.predict_proba(images)
    ran = msp <= median
    assert hybrid.engine_.clip_images_encoded - before == int(ran.sum()) < len(images)
    np.testing.assert_allclose(casc[ran], full[ran], rtol=1e-5, atol=1e-6)
    S = hybrid.n_seen_
    assert (casc[~ran, S:] == 0).all() and np.allclose(casc[~ran, :S].sum(axis=1), 1.0)


def test_cascade_with_a_supervised_score_gate_keeps_skipped_images_supervised(hybrid, images, restores_hybrid):
    """A soft gate on a supervised-only score must not route an image CLIP skipped."""
    feats = hybrid.extract_features(images)
    msp = max_softmax(feats.sup_logits)
    median = float(np.median(msp))
    # threshold below every score: without the fix, every skipped image would be routed
    hybrid.gate_ = _manual(hybrid, score="energy", mode="soft", threshold=-1e9, soft_scale=1.0,
                           cascade_msp=median)
    hybrid.set_params(cascade=True)
    probs = hybrid.predict_proba(images)
    kept = msp > median
    S = hybrid.n_seen_
    assert kept.any() and np.isfinite(probs).all()
    assert (probs[kept, S:] == 0).all()
    assert (probs[kept, :S].argmax(axis=1) == feats.sup_logits[kept].argmax(axis=1)).all()
    assert (probs[~kept, S:].sum(axis=1) > 0.99).all()  # the others follow the gate: zero-shot


def test_cascade_sends_images_far_from_the_training_features_to_clip(hybrid, images, restores_hybrid):
    """A confident image whose backbone features lie away from every training image reaches CLIP."""
    import shutil

    from hybridcls.errors import CheckpointError
    from hybridcls.index import EmbeddingIndex

    feats = hybrid.extract_features(images)
    indexed = np.arange(len(images)) % 2 == 0  # half the images play the training set
    index_dir = hybrid.run_dir_ / "index"
    EmbeddingIndex(meta=hybrid._index_meta("backbone")).add(feats.sup_features[indexed]).save(index_dir)
    # every MSP passes; k=1: an indexed image is at distance 0, the others farther
    gate = GateCalibration(score="clip_margin", mode="soft", threshold=0.0, soft_scale=1.0, method="manual",
                           cascade_msp=-1.0, cascade_distance=1e-3, cascade_k=1)
    gate.to_json(hybrid.run_dir_)

    def reload() -> Gate:  # as load_run reads a run: the backbone index is loaded on first use
        return Gate.load(hybrid.run_dir_, n_seen=hybrid.n_seen_,
                         backbone_meta=lambda: hybrid._index_meta("backbone"))

    hybrid.gate_ = reload()
    hybrid.set_params(cascade=True)
    assert (hybrid.cascade_skips_clip(feats) == indexed).all()
    before = hybrid.engine_.clip_images_encoded
    probs = hybrid.predict_proba(images)
    assert hybrid.engine_.clip_images_encoded - before == int((~indexed).sum())
    S = hybrid.n_seen_
    assert (probs[indexed, S:] == 0).all()
    assert (probs[~indexed, S:].sum(axis=1) > 0).all()  # the soft gate mixed CLIP in

    # an index built for other weights is refused, and the error names the field
    EmbeddingIndex(meta={**hybrid._index_meta("backbone"), "fingerprint": "0" * 64}).add(
        feats.sup_features).save(index_dir)
    hybrid.gate_ = reload()
    with pytest.raises(CheckpointError, match="fingerprint"):
        hybrid.predict_proba(images)
    shutil.rmtree(index_dir)
    hybrid.gate_ = reload()
    with pytest.raises(CheckpointError, match="backbone.faiss.*calibrate"):
        hybrid.predict_proba(images)


def test_cascade_threshold_fits_and_round_trips(tmp_path):
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(400, 3)) * 3
    full = logits.argmax(axis=1).copy()
    unsure = max_softmax(logits) < 0.6
    full[unsure] = 4  # the hybrid sent the unsure ones to an unseen class
    t = fit_cascade(logits, full)
    kept = max_softmax(logits) > t
    assert kept.any() and np.mean(full[kept] == logits.argmax(axis=1)[kept]) >= 0.99
    gate = GateCalibration(score="clip_margin", threshold=0.0, cascade_msp=t)
    path = gate.to_json(tmp_path / "gate.json")
    assert GateCalibration.from_json(path).cascade_msp == t
    old = json.loads(path.read_text())
    del old["cascade_msp"], old["cascade_distance"], old["cascade_k"]  # written before the cascade existed
    path.write_text(json.dumps(old))
    assert GateCalibration.from_json(path).cascade_msp is None
    assert GateCalibration.from_json(path).cascade_distance is None


def test_int8_leaves_linear_layers_whose_owner_reads_their_weights_in_float32():
    """open_clip's ResNet attention pooling hands q_proj.weight to F.multi_head_attention_forward:
    a quantised q_proj (whose weight is a method) would break it; a plain MLP is quantised."""
    from torch.ao.nn.quantized.dynamic import Linear as DynamicInt8Linear

    from hybridcls.device import int8_linear_copy
    from hybridcls.synth import TINY_CLIP_MODEL_ID
    from hybridcls.zeroshot import load_clip

    visual = load_clip(TINY_CLIP_MODEL_ID, None).model.visual  # a ModifiedResNet
    copy = int8_linear_copy(visual)
    assert all(type(getattr(copy.attnpool, n)) is torch.nn.Linear for n in ("q_proj", "k_proj", "v_proj", "c_proj"))
    x = torch.rand(2, 3, 32, 32)
    with torch.inference_mode():
        assert torch.equal(copy(x), visual(x))  # nothing else to quantise there
    mlp = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.GELU(), torch.nn.Linear(8, 2))
    assert [type(m) for m in int8_linear_copy(mlp)[::2]] == [DynamicInt8Linear, DynamicInt8Linear]
