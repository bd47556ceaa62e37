"""The zero-shot branch on a tiny random CLIP: loading, text matrix + cache, classifier."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file
from sklearn.base import clone
from sklearn.exceptions import NotFittedError
from tinyclip_factory import count_text_encoding, make_tiny_clip, tiny_model_cfg, tiny_state_dict

from hybridcls.errors import (
    CheckpointError,
    ImageDecodeError,
    InputError,
    ParameterError,
    WeightsUnavailableError,
)
from hybridcls.zeroshot import (
    ZeroShotClassifier,
    build_text_classifier,
    load_clip,
    parse_prompts,
)
from hybridcls.zeroshot.text_classifier import text_cache_key, text_cache_path

TEMPLATES = ["a photo of a {}.", "a drawing of the {}.", "itap of my {}."]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    return make_tiny_clip(tmp_path_factory.mktemp("clip") / "tiny", seed=0)


@pytest.fixture(scope="module")
def bundle(tiny_dir):
    return load_clip(f"local-dir:{tiny_dir}")


@pytest.fixture
def no_network(monkeypatch):
    """Fail the test if anything tries to open a network connection."""
    attempts: list[object] = []

    def refuse(*args, **kwargs):
        attempts.append(args)
        raise OSError("network access attempted in a test")

    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)
    return attempts


def write_images(folder: Path, n: int, seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    images = []
    for i in range(n):
        im = Image.fromarray(rng.integers(0, 256, size=(40, 48, 3), dtype=np.uint8))
        im.save(folder / f"img{i}.png")
        images.append(im)
    return images


# ---------------------------------------------------------------- loading


def test_local_dir_loads_with_fingerprint_and_preprocess(bundle, tiny_dir):
    weights = tiny_dir / "open_clip_model.safetensors"
    assert bundle.fingerprint == hashlib.sha256(weights.read_bytes()).hexdigest()
    assert bundle.weights_path == str(weights) and not bundle.random_init
    assert (bundle.embed_dim, bundle.image_size, bundle.pretrained) == (32, (32, 32), None)
    assert not bundle.model.training
    x = bundle.preprocess(Image.new("RGB", (50, 40), "red"))
    assert tuple(x.shape) == (3, 32, 32)
    # The weights on disk are the weights in the model.
    expected = tiny_state_dict(seed=0)
    got = bundle.model.state_dict()
    assert all(torch.equal(got[k], expected[k]) for k in expected)
    assert bundle.tokenizer(["a cat"]).shape == (1, 16)


def test_local_dir_missing_folder_config_or_weights(tmp_path, tiny_dir):
    with pytest.raises(ParameterError, match="clip_model='local-dir:.*nope': folder .* not found"):
        load_clip(f"local-dir:{tmp_path / 'nope'}")
    with pytest.raises(InputError, match="open_clip_config.json is missing"):
        load_clip(f"local-dir:{tmp_path}")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "open_clip_config.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(InputError, match="cannot read"):
        load_clip(f"local-dir:{bad}")
    noweights = tmp_path / "noweights"
    noweights.mkdir()
    shutil.copy(tiny_dir / "open_clip_config.json", noweights)
    with pytest.raises(WeightsUnavailableError, match="no weights file"):
        load_clip(f"local-dir:{noweights}")


@pytest.fixture(scope="module")
def tiny_builtin_name(tmp_path_factory) -> str:
    """A tiny config registered with open_clip like its built-in ones."""
    name = "hybridcls-test-tiny"
    cfg_file = tmp_path_factory.mktemp("cfg") / f"{name}.json"
    cfg_file.write_text(json.dumps(tiny_model_cfg()), encoding="utf-8")
    open_clip.add_model_config(cfg_file)
    return name


def test_builtin_name_with_local_weights_file(tmp_path, tiny_builtin_name, tiny_dir):
    sd = tiny_state_dict(seed=3)
    st_file = tmp_path / "w.safetensors"
    save_file(sd, str(st_file))
    b = load_clip(tiny_builtin_name, pretrained=str(st_file))
    assert b.pretrained == str(st_file) and b.weights_path == str(st_file)
    assert b.fingerprint == hashlib.sha256(st_file.read_bytes()).hexdigest()
    assert torch.equal(b.model.state_dict()["text_projection"], sd["text_projection"])

    pt_file = tmp_path / "w.pt"
    torch.save(sd, pt_file)
    b_pt = load_clip(tiny_builtin_name, pretrained=str(pt_file))
    assert torch.equal(b_pt.model.state_dict()["text_projection"], sd["text_projection"])


def test_builtin_name_random_init_has_a_config_fingerprint(tiny_builtin_name):
    b = load_clip(tiny_builtin_name, pretrained=None)
    assert b.random_init and b.fingerprint.startswith("random:")
    assert b.fingerprint == load_clip(tiny_builtin_name, pretrained="").fingerprint


class _Payload:
    """Unpickling this would write a marker file (arbitrary code execution)."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('pwned')",))


def test_pickle_with_code_is_refused_and_never_runs(tmp_path, tiny_builtin_name):
    marker = tmp_path / "marker"
    evil = tmp_path / "evil.pt"
    torch.save({"state_dict": _Payload(str(marker))}, evil)
    with pytest.raises(CheckpointError) as err:
        load_clip(tiny_builtin_name, pretrained=str(evil))
    assert str(evil) in str(err.value) and "refused" in str(err.value)
    assert not marker.exists()


def test_weights_that_do_not_fit_are_a_checkpoint_error(tmp_path, tiny_builtin_name):
    f = tmp_path / "other.safetensors"
    save_file({"something": torch.zeros(2)}, str(f))
    with pytest.raises(CheckpointError, match="cannot load these weights"):
        load_clip(tiny_builtin_name, pretrained=str(f))


def test_unknown_model_tag_or_file_are_input_errors(tmp_path):
    with pytest.raises(ParameterError,
                       match="clip_model='ViT-B-33': not an open_clip model name.*ViT-B-32"):
        load_clip("ViT-B-33", pretrained=None)
    with pytest.raises(
        ParameterError,
        match="clip_pretrained='no_such_tag': neither a pretrained tag of ViT-B-32 .*laion2b",
    ):
        load_clip("ViT-B-32", pretrained="no_such_tag")
    with pytest.raises(ParameterError, match="clip_pretrained='.*missing.safetensors': file not found"):
        load_clip("ViT-B-32", pretrained=str(tmp_path / "missing.safetensors"))


def test_offline_default_model_names_the_local_copy_flags(monkeypatch, tmp_path, no_network):
    from huggingface_hub import constants

    # As if HF_HUB_OFFLINE were set after huggingface_hub was imported.
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(WeightsUnavailableError) as err:
        load_clip("ViT-B-32", "laion2b_s34b_b79k", cache_dir=tmp_path / "empty-cache")
    msg = str(err.value)
    assert "\n" not in msg  # one paragraph
    for needle in (
        "ViT-B-32",
        "laion2b_s34b_b79k",
        "HF_HUB_OFFLINE",
        "clip_model='local-dir:DIR'",
        "clip_pretrained='FILE'",
        "cache_dir='DIR'",
    ):
        assert needle in msg
    assert no_network == []


def test_offline_hf_hub_missing_is_unavailable(monkeypatch, tmp_path, no_network):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(WeightsUnavailableError, match="hf-hub:someone/tiny-clip"):
        load_clip("hf-hub:someone/tiny-clip", cache_dir=tmp_path)
    assert no_network == []


def test_offline_hf_hub_loads_from_a_cache_dir(monkeypatch, tmp_path, tiny_dir, no_network):
    # The Hugging Face cache layout: models--ORG--REPO/{refs/main, snapshots/REV/...}.
    repo = tmp_path / "cache" / "models--someone--tiny-clip"
    rev = "0" * 40
    snap = repo / "snapshots" / rev
    shutil.copytree(tiny_dir, snap)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(rev)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    b = load_clip("hf-hub:someone/tiny-clip", cache_dir=tmp_path / "cache")
    expected = hashlib.sha256((tiny_dir / "open_clip_model.safetensors").read_bytes()).hexdigest()
    assert b.fingerprint == expected and b.embed_dim == 32
    assert no_network == []


def _hub_cache(cache: Path, repo: str, files: Path) -> Path:
    """``files``'s content as huggingface_hub caches ``repo``: models--ORG--REPO/{refs/main, snapshots/REV}."""
    folder = cache / ("models--" + repo.replace("/", "--"))
    rev = "0" * 40
    shutil.copytree(files, folder / "snapshots" / rev)
    (folder / "refs").mkdir()
    (folder / "refs" / "main").write_text(rev)
    return cache


@pytest.mark.parametrize("filename", [None, "open_clip_pytorch_model.bin", "weights.bin", "weights.pth",
                                      "open_clip_config.json", "weights.safetensors"])
def test_hub_lookups_ask_for_the_files_open_clip_asks_for(monkeypatch, filename):
    import open_clip.pretrained

    from hybridcls.zeroshot.loading import _hub_candidates

    asked = []

    def record(repo_id, filename, **kwargs):
        asked.append(filename)
        raise FileNotFoundError(filename)

    monkeypatch.setattr(open_clip.pretrained, "hf_hub_download", record)
    with pytest.raises(FileNotFoundError):
        open_clip.pretrained.download_pretrained_from_hf("org/repo", filename=filename)
    assert _hub_candidates(filename) == asked and asked


@pytest.fixture
def tiny_tag(monkeypatch, tiny_builtin_name):
    """Give the tiny built-in model a pretrained tag ``tiny`` with the config open_clip would have."""
    cfgs = {}
    real = open_clip.get_pretrained_cfg

    def get_pretrained_cfg(model, tag):
        return dict(cfgs[tag]) if model == tiny_builtin_name and tag in cfgs else real(model, tag)

    monkeypatch.setattr(open_clip, "get_pretrained_cfg", get_pretrained_cfg)
    monkeypatch.setattr(open_clip.factory, "get_pretrained_cfg", get_pretrained_cfg)
    return cfgs


def test_offline_hf_hub_tag_loads_from_the_cache(monkeypatch, tmp_path, tiny_dir, tiny_builtin_name,
                                                tiny_tag, no_network):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)  # set after import, as in a notebook
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    tiny_tag["tiny"] = {"url": "", "hf_hub": "someone/tiny-clip/"}  # the repo's default file
    cache = _hub_cache(tmp_path / "hub", "someone/tiny-clip", tiny_dir)
    b = load_clip(tiny_builtin_name, "tiny", cache_dir=cache)
    assert Path(b.weights_path).name == "open_clip_model.safetensors"  # the .bin's safetensors form
    assert b.fingerprint == hashlib.sha256((tiny_dir / "open_clip_model.safetensors").read_bytes()).hexdigest()
    assert b.pretrained == "tiny"  # the tag goes to open_clip, with its preprocessing
    with pytest.raises(WeightsUnavailableError, match="pretrained tag tiny.*HF_HUB_OFFLINE is set"):
        load_clip(tiny_builtin_name, "tiny", cache_dir=tmp_path / "empty")
    assert constants.HF_HUB_OFFLINE is False  # huggingface_hub's flag as it was
    assert no_network == []


def test_offline_url_tag_is_refused_unless_in_open_clips_download_folder(monkeypatch, tmp_path,
                                                                        tiny_builtin_name, tiny_tag,
                                                                        no_network):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    tiny_tag["tiny"] = {"url": "https://example.org/clip/tiny.pt"}  # no hf_hub: OpenAI's kind
    with pytest.raises(WeightsUnavailableError, match="pretrained tag tiny.*HF_HUB_OFFLINE is set"):
        load_clip(tiny_builtin_name, "tiny", cache_dir=tmp_path)
    torch.save(tiny_state_dict(seed=5), tmp_path / "tiny.pt")  # where open_clip downloads it
    b = load_clip(tiny_builtin_name, "tiny", cache_dir=tmp_path)
    assert b.weights_path == str(tmp_path / "tiny.pt")
    assert torch.equal(b.model.state_dict()["text_projection"], tiny_state_dict(seed=5)["text_projection"])
    assert no_network == []


@pytest.mark.parametrize("names", [
    ["open_clip_pytorch_model.bin", "model.safetensors", "a.safetensors", "pytorch_model.bin"],
    ["b.safetensors", "a.safetensors", "a.bin"],
    ["z.pth", "y.bin"],
])
def test_local_dir_weights_are_the_file_open_clip_loads(tmp_path, tiny_dir, names):
    from hybridcls.zeroshot.loading import local_dir_weights

    folder = tmp_path / "many"
    folder.mkdir()
    shutil.copy(tiny_dir / "open_clip_config.json", folder)
    weights = {}
    for seed, name in enumerate(names, start=1):
        weights[name] = tiny_state_dict(seed=seed)
        if name.endswith(".safetensors"):
            save_file(weights[name], str(folder / name))
        else:
            torch.save(weights[name], folder / name)
    model, _, _ = open_clip.create_model_and_transforms(f"local-dir:{folder}")
    loaded = [n for n, sd in weights.items()
              if torch.equal(model.state_dict()["text_projection"], sd["text_projection"])]
    assert [Path(local_dir_weights(folder)).name] == loaded
    assert local_dir_weights(tmp_path) is None  # no weights file


def test_model_prefixes_are_the_schemas_open_clip_reads():
    from open_clip.factory import parse_model_name

    from hybridcls.zeroshot.defaults import HF_HUB_PREFIX, LOCAL_DIR_PREFIX, MODEL_PREFIXES

    assert [parse_model_name(prefix + "x") for prefix in (HF_HUB_PREFIX, LOCAL_DIR_PREFIX)] == [
        ("hf-hub", "x"), ("local-dir", "x")]
    assert parse_model_name("ViT-B-32") == (None, "ViT-B-32") and set(MODEL_PREFIXES) == {
        HF_HUB_PREFIX, LOCAL_DIR_PREFIX}


# ---------------------------------------------------------------- text classifier


def test_plain_names_give_open_clips_matrix(bundle, tmp_path):
    names = ["cat", "dog", "grizzly bear"]
    w = build_text_classifier(bundle, names, TEMPLATES, cache_dir=tmp_path, use_cache=False)
    ref = open_clip.build_zero_shot_classifier(bundle.model, bundle.tokenizer, names, TEMPLATES)
    assert w.shape == (32, 3) and torch.allclose(w, ref, rtol=0, atol=1e-5)
    assert torch.allclose(w.norm(dim=0), torch.ones(3))


# Prompts of 3 to 11 tokens (start and end tokens included): within the tiny CLIP's 12.
MIXED_TEMPLATES = ["a photo of a {}.", "{}", "a dark photo of the big {}.", "itap of my {}.", "art of the {}."]
MIXED_NAMES = ["cat", "grizzly bear", "a", "tree frog", "ox", "bat"]


@pytest.mark.parametrize("model", ["tiny", "ViT-B-32"])
def test_the_trimmed_text_encoder_gives_open_clips_matrix_and_cuts_each_batch(model, monkeypatch):
    """The shipped tiny CLIP (12-token context) and a random ViT-B-32 (77): every phrase x
    template through the text tower together, shortest first, each batch cut to its longest."""
    from hybridcls.synth import TINY_CLIP_MODEL_ID
    from hybridcls.zeroshot import text_classifier

    bundle = load_clip(TINY_CLIP_MODEL_ID if model == "tiny" else model, None)
    assert text_classifier.trimmed_text_encoder(bundle.model) is not None  # causal, pooled at EOT
    lengths: list[int] = []
    transformer = bundle.model.transformer
    forward = transformer.forward
    monkeypatch.setattr(transformer, "forward", lambda x, attn_mask=None: (
        lengths.append(x.shape[1]), forward(x, attn_mask=attn_mask))[1])
    monkeypatch.setattr(text_classifier, "_SEQUENCES_PER_BATCH", 8)
    w = build_text_classifier(bundle, MIXED_NAMES, MIXED_TEMPLATES, use_cache=False)
    monkeypatch.undo()
    ref = open_clip.build_zero_shot_classifier(bundle.model, bundle.tokenizer, MIXED_NAMES, MIXED_TEMPLATES)
    assert w.shape == ref.shape == (bundle.embed_dim, len(MIXED_NAMES))
    assert torch.allclose(w, ref, rtol=0, atol=1e-5)
    # 30 texts of 6 classes in batches of 8 by length, each cut to its longest: 7, 8, 9, 11 tokens.
    tokens = bundle.tokenizer([t.format(n) for n in MIXED_NAMES for t in MIXED_TEMPLATES])
    n_tokens = sorted((tokens != 0).sum(dim=1).tolist())
    assert lengths == [max(n_tokens[i:i + 8]) for i in range(0, 30, 8)] == [7, 8, 9, 11]
    assert tokens.shape[1] == (12 if model == "tiny" else 77)


def test_text_towers_without_a_causal_mask_keep_the_full_context(tmp_path):
    from hybridcls.zeroshot.text_classifier import trimmed_text_encoder

    cfg = tiny_model_cfg()
    cfg["text_cfg"] = {**cfg["text_cfg"], "no_causal_mask": True}
    model = open_clip.CLIP(**cfg)
    assert trimmed_text_encoder(model) is None  # a bidirectional tower sees the padding
    coca_text = {**cfg["text_cfg"], "embed_cls": True}
    custom = open_clip.CustomTextCLIP(embed_dim=cfg["embed_dim"], vision_cfg=cfg["vision_cfg"], text_cfg=coca_text)
    assert trimmed_text_encoder(custom) is None  # a class token after the text
    plain = open_clip.CustomTextCLIP(embed_dim=cfg["embed_dim"], vision_cfg=cfg["vision_cfg"],
                                     text_cfg=tiny_model_cfg()["text_cfg"])
    assert trimmed_text_encoder(plain) is not None
    assert trimmed_text_encoder(torch.nn.Linear(2, 2)) is None


def test_synonyms_and_description_are_averaged_into_the_class(bundle, tmp_path):
    ps = parse_prompts("moose: a large deer | elk\nwolf")
    w = build_text_classifier(bundle, ps, TEMPLATES, cache_dir=tmp_path, use_cache=False)
    phrases = ["moose", "elk", "moose, a large deer", "wolf"]
    ref = open_clip.build_zero_shot_classifier(bundle.model, bundle.tokenizer, phrases, TEMPLATES)
    moose = ref[:, :3].mean(dim=1)
    assert torch.allclose(w[:, 0], moose / moose.norm(), atol=1e-6)
    assert torch.allclose(w[:, 1], ref[:, 3], atol=1e-6)
    assert torch.allclose(w.norm(dim=0), torch.ones(2), atol=1e-6)


def test_second_build_reads_the_cache_without_the_text_encoder(monkeypatch, tmp_path, tiny_dir):
    prompts = parse_prompts("moose: a large deer | elk\nwolf\nbat")
    first = load_clip(f"local-dir:{tiny_dir}")
    calls = count_text_encoding(monkeypatch)
    w1 = build_text_classifier(first, prompts, TEMPLATES, cache_dir=tmp_path)
    assert calls, "the first build must encode text"

    path = text_cache_path(tmp_path, text_cache_key(first, prompts, TEMPLATES))
    assert path.parent == tmp_path / "text" and path.is_file()
    with safe_open(str(path), framework="pt") as fh:
        meta = fh.metadata()
    assert json.loads(meta["classes"]) == ["moose", "wolf", "bat"]
    assert meta["fingerprint"] == first.fingerprint and meta["n_templates"] == "3"

    second = load_clip(f"local-dir:{tiny_dir}")  # a fresh model, as in a second run
    calls.clear()
    calls2 = calls
    w2 = build_text_classifier(second, prompts, TEMPLATES, cache_dir=tmp_path)
    assert calls2 == [] and torch.equal(w1, w2)


@pytest.mark.parametrize("change", ["template", "description", "order", "weights"])
def test_changed_inputs_invalidate_the_cache(monkeypatch, tmp_path, bundle, change):
    prompts = parse_prompts("moose: a large deer | elk\nwolf")
    build_text_classifier(bundle, prompts, TEMPLATES, cache_dir=tmp_path)
    templates, target = list(TEMPLATES), bundle
    if change == "template":
        templates[0] = "a good photo of a {}."
    elif change == "description":
        prompts = parse_prompts("moose: a very large deer | elk\nwolf")
    elif change == "order":
        prompts = parse_prompts("wolf\nmoose: a large deer | elk")
    else:
        target = load_clip(f"local-dir:{make_tiny_clip(tmp_path / 'other', seed=1)}")
    calls = count_text_encoding(monkeypatch)
    build_text_classifier(target, prompts, templates, cache_dir=tmp_path)
    assert calls, f"changing the {change} must re-encode"


def test_moved_local_dir_keeps_its_cache(monkeypatch, tmp_path, tiny_dir, bundle):
    build_text_classifier(bundle, ["cat", "dog"], TEMPLATES, cache_dir=tmp_path / "cache")
    moved = load_clip(f"local-dir:{shutil.copytree(tiny_dir, tmp_path / 'moved')}")
    calls = count_text_encoding(monkeypatch)
    build_text_classifier(moved, ["cat", "dog"], TEMPLATES, cache_dir=tmp_path / "cache")
    assert calls == []


def test_corrupt_or_mismatched_cache_file_is_rebuilt(monkeypatch, tmp_path, bundle):
    names = ["cat", "dog"]
    w = build_text_classifier(bundle, names, TEMPLATES, cache_dir=tmp_path)
    path = text_cache_path(tmp_path, text_cache_key(bundle, parse_prompts("cat\ndog"), TEMPLATES))
    calls = count_text_encoding(monkeypatch)
    path.write_bytes(b"garbage")
    assert torch.equal(build_text_classifier(bundle, names, TEMPLATES, cache_dir=tmp_path), w)
    assert len(calls) > 0
    # A well-formed file stored under the key but holding another key's matrix.
    save_file({"text_features": torch.zeros(32, 2)}, str(path), metadata={"key": "something-else"})
    n = len(calls)
    assert torch.equal(build_text_classifier(bundle, names, TEMPLATES, cache_dir=tmp_path), w)
    assert len(calls) > n


def test_random_init_and_use_cache_false_write_nothing(tmp_path, bundle, tiny_builtin_name):
    build_text_classifier(bundle, ["cat"], TEMPLATES, cache_dir=tmp_path, use_cache=False)
    build_text_classifier(
        load_clip(tiny_builtin_name, None), ["cat"], TEMPLATES, cache_dir=tmp_path
    )
    assert not (tmp_path / "text").exists()


# ---------------------------------------------------------------- classifier


@pytest.fixture(scope="module")
def clf(tiny_dir, tmp_path_factory):
    return ZeroShotClassifier(
        f"local-dir:{tiny_dir}",
        prompts=["cat", "moose: a large deer | elk", "grizzly bear", "wolf"],
        templates=TEMPLATES,
        device="cpu",
        batch_size=2,
        cache_dir=tmp_path_factory.mktemp("cache"),
    ).fit()


def test_not_fitted_error_before_fit(tiny_dir):
    c = ZeroShotClassifier(f"local-dir:{tiny_dir}", prompts=["cat"])
    with pytest.raises(NotFittedError):
        c.predict(torch.zeros(1, 3, 32, 32))
    assert clone(c).get_params()["clip_model"] == f"local-dir:{tiny_dir}"
    with pytest.raises(InputError, match="no prompts"):
        ZeroShotClassifier(f"local-dir:{tiny_dir}").fit()


def test_fit_sets_classes_text_and_scale(clf, bundle):
    assert list(clf.classes_) == ["cat", "moose", "grizzly bear", "wolf"]
    assert clf.text_features_.shape == (32, 4)
    assert clf.logit_scale_ == pytest.approx(float(bundle.model.logit_scale.detach().exp()))


def test_predict_proba_rows_sum_to_one_with_columns_in_prompts_order(clf, tiny_dir, tmp_path):
    images = [Image.new("RGB", (40, 30), c) for c in ("red", "green", "blue")]
    p = clf.predict_proba(images)
    assert p.shape == (3, 4) and np.allclose(p.sum(axis=1), 1.0)
    # Same classes listed in another order: the columns follow that order.
    shuffled = ZeroShotClassifier(
        f"local-dir:{tiny_dir}",
        prompts=["wolf", "cat", "grizzly bear", "moose: a large deer | elk"],
        templates=TEMPLATES,
        device="cpu",
        cache_dir=tmp_path,
    ).fit()
    q = shuffled.predict_proba(images)
    assert np.allclose(q, p[:, [3, 0, 2, 1]], atol=1e-6)
    assert list(clf.predict(images)) == list(clf.classes_[p.argmax(axis=1)])


def test_logits_are_scaled_cosine_similarities(clf):
    x = torch.randn(5, 3, 32, 32)  # preprocessed images
    emb = clf.encode_images(x)
    assert emb.shape == (5, 32) and torch.allclose(emb.norm(dim=1), torch.ones(5), atol=1e-5)
    ref = clf.bundle_.model.encode_image(x, normalize=True).detach()
    assert torch.allclose(emb, ref, atol=1e-5)
    logits = clf.logits_from_embeddings(emb)
    assert np.allclose(logits.numpy(), (clf.logit_scale_ * ref @ clf.text_features_).numpy(), atol=1e-4)


def test_decision_function_is_the_logits_of_the_images(clf):
    # images as tensors (torchvision's layout, floats in [0, 1]): preprocessed by open_clip's own
    # transform, they give the logits decision_function returns, and predict_proba their softmax
    images = torch.rand(3, 3, 40, 30, generator=torch.Generator().manual_seed(0))
    pil = [Image.fromarray((im.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)) for im in images]
    x = torch.stack([clf.bundle_.preprocess(im) for im in pil])
    expected = clf.logits_from_embeddings(clf.encode_images(x)).numpy()
    logits = clf.decision_function(images)
    np.testing.assert_allclose(logits, expected, atol=1e-4)
    np.testing.assert_allclose(clf.predict_proba(images),
                               torch.softmax(torch.from_numpy(logits).double(), 1), atol=1e-6)


def test_paths_folders_and_images_agree(clf, tmp_path):
    images = write_images(tmp_path / "photos", 3)
    by_folder = clf.predict_proba(tmp_path / "photos")
    by_images = clf.predict_proba(
        [Image.open(tmp_path / "photos" / f"img{i}.png") for i in range(3)]
    )
    assert by_folder.shape == (3, 4) and np.allclose(by_folder, by_images, atol=1e-6)
    assert len(images) == 3
    assert clf.predict([]).shape == (0,)


def test_bad_images_raise_listing_every_failed_file(clf, tmp_path):
    write_images(tmp_path / "photos", 2)
    (tmp_path / "photos" / "broken.png").write_bytes(b"not a png")
    (tmp_path / "photos" / "empty.jpg").write_bytes(b"")
    with pytest.raises(ImageDecodeError) as err:
        clf.predict(tmp_path / "photos")
    msg = str(err.value)
    assert "broken.png" in msg and "empty.jpg" in msg and "1 more could not be read" in msg


def test_iter_predictions_streams_errors_as_rows(clf, tmp_path):
    write_images(tmp_path / "photos", 3)
    (tmp_path / "photos" / "img1b.png").write_bytes(b"junk")
    batches = list(clf.iter_predictions([tmp_path / "photos"]))
    indices = [i for b, _ in batches for i in b.indices]
    assert indices == list(range(4)) and len(batches) == 2  # batch_size=2
    ok = [i for b, _ in batches for i in b.ok]
    errors = {i: r for b, _ in batches for i, r in b.errors.items()}
    # Code-point order: img0, img1, img1b (junk), img2.
    assert ok == [0, 1, 3] and list(errors) == [2]
    for b, res in batches:
        assert res.probs.shape == (len(b.ok), 4) and np.allclose(res.probs.sum(axis=1), 1.0)
        assert b.outputs.clip_embeddings.shape == (len(b.ok), 32)
        assert set(res.branch) == {"zeroshot"}


def test_mixed_inputs_keep_their_order(clf, tmp_path):
    # issue 13: paths, PIL images, arrays and tensors in one list, every input once, in order
    write_images(tmp_path / "photos", 2)
    red = Image.new("RGB", (8, 8), (200, 30, 30))
    array = np.asarray(red)
    tensor = torch.from_numpy(array).permute(2, 0, 1)
    inputs = [red, tmp_path / "photos", array, tensor, torch.stack([tensor, tensor])]
    rows = [r for batch in clf.rows(inputs) for r in batch]
    assert [r.path for r in rows] == ["<image 0>", str(tmp_path / "photos" / "img0.png"),
                                      str(tmp_path / "photos" / "img1.png"), "<image 3>", "<image 4>",
                                      "<image 5>", "<image 6>"]
    probs = clf.predict_proba(inputs)
    # the same red square, given four ways, has one answer
    np.testing.assert_allclose(probs[[3, 4, 5, 6]], np.repeat(probs[[0]], 4, axis=0), atol=1e-6)


def test_inputs_of_another_kind_name_their_position(clf):
    with pytest.raises(ParameterError, match=r"inputs='<dict at position 1>': expected paths"):
        clf.predict([Image.new("RGB", (8, 8)), {"a": 1}])
    with pytest.raises(ParameterError, match=r"<tensor of shape \(4, 8, 8\) at position 0>.*\[3, H, W\]"):
        clf.predict([torch.zeros(4, 8, 8)])


def test_bad_options_name_the_parameter(tiny_dir):
    with pytest.raises(ParameterError, match="precision='fp8': expected one of auto, fp32, bf16, fp16"):
        ZeroShotClassifier(f"local-dir:{tiny_dir}", prompts=["cat"], precision="fp8").fit()
    with pytest.raises(ParameterError, match="batch_size=0: expected a positive integer"):
        ZeroShotClassifier(f"local-dir:{tiny_dir}", prompts=["cat"], batch_size=0).fit()
    if not torch.cuda.is_available():
        with pytest.raises(ParameterError, match="device='cuda': CUDA is not available"):
            ZeroShotClassifier(f"local-dir:{tiny_dir}", prompts=["cat"], device="cuda").fit()


@pytest.mark.skipif(
    os.environ.get("HYBRIDCLS_CACHE_DIR") is not None, reason="cache dir pinned by env"
)
def test_default_text_cache_goes_to_hybridcls_cache_dir(monkeypatch, tmp_path, tiny_dir):
    monkeypatch.setenv("HYBRIDCLS_CACHE_DIR", str(tmp_path / "hc"))
    ZeroShotClassifier(
        f"local-dir:{tiny_dir}", prompts=["cat"], templates=TEMPLATES, device="cpu"
    ).fit()
    assert len(list((tmp_path / "hc" / "text").glob("*.safetensors"))) == 1


def test_list_pretrained_weights_marks_what_the_cache_holds(monkeypatch, tmp_path, tiny_dir, no_network,
                                                           capsys):
    from hybridcls.cli import main
    from hybridcls.zeroshot.loading import cached_hub_models, list_pretrained_weights

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)  # offline by itself, not by the setting
    # the default tag's hub repo (open_clip asks for its .safetensors first) and an hf-hub: model
    repo = open_clip.get_pretrained_cfg("ViT-B-32", "laion2b_s34b_b79k")["hf_hub"].rstrip("/")
    weights_only = tmp_path / "weights_only"
    weights_only.mkdir()
    shutil.copy(tiny_dir / "open_clip_model.safetensors", weights_only)
    cache = _hub_cache(tmp_path / "hub", repo, weights_only)
    _hub_cache(cache, "someone/tiny-clip", tiny_dir)
    _hub_cache(cache, "someone/not-open-clip", weights_only)  # no open_clip_config.json

    entries = list_pretrained_weights(cache)
    assert [(e.model, e.pretrained) for e in entries] == open_clip.list_pretrained()
    cached = [e for e in entries if e.path]
    assert [(e.model, e.pretrained) for e in cached] == [("ViT-B-32", "laion2b_s34b_b79k")]
    assert Path(cached[0].path).read_bytes() == (tiny_dir / "open_clip_model.safetensors").read_bytes()
    assert Path(cached[0].path).is_relative_to(cache / ("models--" + repo.replace("/", "--")))
    hub = cached_hub_models(cache)
    assert [(h.model, Path(h.path).name) for h in hub] == [("hf-hub:someone/tiny-clip",
                                                          "open_clip_model.safetensors")]
    assert cached_hub_models(tmp_path / "no_cache_here") == []
    assert no_network == []

    assert main(["models", "--cache-dir", str(cache), "--cached"]) == 0
    out, err = capsys.readouterr()
    lines = out.splitlines()
    assert lines[0].split() == ["MODEL", "PRETRAINED", "CACHED"] and len(lines) == 3
    assert lines[1].split() == ["ViT-B-32", "laion2b_s34b_b79k", "(default)", cached[0].path]
    assert lines[2].split() == ["hf-hub:someone/tiny-clip", "-", hub[0].path]
    assert f"2 of {len(entries) + 1} in the cache" in err
    assert main(["models", "--cache-dir", str(cache), "--filter", "vit-b-32"]) == 0
    rows = capsys.readouterr().out.splitlines()[1:]
    assert [r.split()[0] for r in rows] == [  # case-insensitive, every tag of those models
        m for m, _ in open_clip.list_pretrained() if "vit-b-32" in m.lower()]
    assert sum(r.split()[-1] != "-" for r in rows) == 1
    assert no_network == []
