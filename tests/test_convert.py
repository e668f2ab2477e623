"""divergen.convert: official detectron2 checkpoints and ImageNet trunks -> our state dict, safely read."""

from __future__ import annotations

import logging
import os
import pickle
from pathlib import Path

import pytest
import torch

from divergen.backbone import WindowAttention, relative_position_index
from divergen.checkpoint import load_weights, read_weights
from divergen.config import load_config
from divergen.convert import (
    convert_backbone,
    convert_state_dict,
    load_official_checkpoint,
    main,
)
from divergen.model import build_model

from .conftest import assert_close_rel, strip_prefix

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny.toml"


def _model(*overrides: str, seed: int = 0):
    torch.manual_seed(seed)
    return build_model(load_config(TINY, overrides).model)


def official_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The inverse table: ``model``'s weights as the official ``build_model`` dumps them (centernet2.md §5).

    The names are the same; the official dump also holds the timm classifier ``fc`` (ResNet) and every Swin
    block's ``relative_position_index`` buffer.
    """
    state = {k: v.clone() for k, v in model.state_dict().items()}
    for name, module in model.named_modules():
        if isinstance(module, WindowAttention):
            state[f"{name}.relative_position_index"] = module.relative_position_index.clone()
    if "backbone.bottom_up.base.conv1.weight" in state:
        width = state["backbone.fpn_lateral5.weight"].shape[1]
        state["backbone.bottom_up.base.fc.weight"] = torch.randn(1000, width)
        state["backbone.bottom_up.base.fc.bias"] = torch.randn(1000)
    return state


def _assert_same(state: dict[str, torch.Tensor], model: torch.nn.Module) -> None:
    own = model.state_dict()
    assert set(state) == set(own)
    for k, v in own.items():
        assert torch.equal(state[k], v), k


@pytest.fixture(scope="module")
def tiny():
    return _model(seed=0)


def test_round_trip_plain_model(tiny):
    state, report = convert_state_dict({"model": official_state(tiny), "iteration": 90000}, _model(seed=1))
    _assert_same(state, tiny)
    assert report.source == "model" and report.stripped == 0
    (fc,) = [keys for why, keys in report.dropped.items() if "classifier" in why]
    assert sorted(fc) == ["backbone.bottom_up.base.fc.bias", "backbone.bottom_up.base.fc.weight"]
    fresh = _model(seed=2)
    fresh.load_state_dict(state, strict=True)
    _assert_same(fresh.state_dict(), tiny)


def test_prefers_ema_strips_module_and_drops_grad_bank(tiny):
    other = _model(seed=3)
    official = {
        "model": official_state(other),
        "model_ema": {f"module.{k}": v for k, v in official_state(tiny).items()},
        "grad_bank.weight": torch.zeros(5, 1),  # top level: not a weights entry, ignored
    }
    official["model_ema"]["module.grad_bank.weight"] = torch.zeros(11, 1)
    state, report = convert_state_dict(official, other)
    _assert_same(state, tiny)
    assert report.source == "model_ema"
    assert report.stripped == len(official["model_ema"])
    assert ["grad_bank.weight"] in report.dropped.values()


def test_bare_state_dict_and_num_classes_check(tiny):
    state, report = convert_state_dict(official_state(tiny), tiny, num_classes=8)
    _assert_same(state, tiny)
    assert report.source == "state dict"
    with pytest.raises(ValueError, match="num_classes = 5"):
        convert_state_dict(official_state(tiny), tiny, num_classes=5)


def test_wider_classifier_truncated_to_classes_plus_background():
    wide = _model("model.num_classes=11", seed=4)  # as DiverGen's 1453 -> LVIS's 1203
    for k in range(3):
        wide.roi_heads.box_predictor[k].freq_weight.copy_(torch.arange(11.0) + 1)
    official = official_state(wide)
    target = _model(seed=5)
    state, report = convert_state_dict({"model": official}, target, num_classes=8)
    assert len(report.truncated) == 9  # 3 stages x (weight, bias, freq_weight)
    for k in range(3):
        key = f"roi_heads.box_predictor.{k}.cls_score"
        w, b = official[f"{key}.weight"], official[f"{key}.bias"]
        assert state[f"{key}.weight"].shape == (9, 64)
        assert torch.equal(state[f"{key}.weight"], torch.cat([w[:8], w[11:]]))  # rows 0..7 + background (11)
        assert torch.equal(state[f"{key}.bias"], torch.cat([b[:8], b[11:]]))
        assert torch.equal(state[f"roi_heads.box_predictor.{k}.freq_weight"], torch.arange(8.0) + 1)
    target.load_state_dict(state, strict=True)
    # A narrower checkpoint cannot be widened: a shape error naming the tensor.
    with pytest.raises(ValueError, match=r"cls_score\.weight: checkpoint \(9, 64\) vs model \(12, 64\)"):
        convert_state_dict({"model": official_state(target)}, wide)


def test_truncated_model_detects_as_wide_model_scoring_first_classes():
    """Truncation (convert) and model.roi_heads.test_num_classes (no conversion) give the same detections."""
    wide = _model("model.num_classes=11", "model.roi_heads.test_num_classes=8", seed=14).eval()
    with torch.no_grad():
        for p in wide.roi_heads.box_predictor.parameters():
            p.normal_(0, 0.5)  # classifiers that score: detections of many classes
    narrow = _model(seed=15).eval()
    narrow.load_state_dict(convert_state_dict(wide.state_dict(), narrow)[0], strict=True)
    image = torch.randint(
        0, 256, (3, 160, 200), dtype=torch.uint8, generator=torch.Generator().manual_seed(0)
    )
    with torch.no_grad():
        (a,), (b,) = wide([image]), narrow([image])
    assert len(a["labels"]) > 5 and len(a["labels"].unique()) > 2
    assert torch.equal(a["labels"], b["labels"]) and torch.equal(a["masks"], b["masks"])
    torch.testing.assert_close(a["boxes"], b["boxes"])
    torch.testing.assert_close(a["scores"], b["scores"])


def test_missing_freq_weight_taken_from_model(tiny):
    official = {k: v for k, v in official_state(tiny).items() if not k.endswith("freq_weight")}
    state, report = convert_state_dict({"model": official}, tiny)
    _assert_same(state, tiny)
    assert report.filled == [f"roi_heads.box_predictor.{k}.freq_weight" for k in range(3)]


def test_missing_and_unexpected_keys_named(tiny):
    official = official_state(tiny)
    del official["roi_heads.mask_head.deconv.bias"]
    with pytest.raises(
        ValueError, match=r"missing from the checkpoint: \['roi_heads.mask_head.deconv.bias'\]"
    ):
        convert_state_dict({"model": official}, tiny)
    official = official_state(tiny)
    official["roi_heads.box_head.0.fc3.weight"] = torch.zeros(3)
    with pytest.raises(
        ValueError, match=r"unexpected keys \(not in the model\): \['roi_heads.box_head.0.fc3"
    ):
        convert_state_dict({"model": official}, tiny)
    with pytest.raises(ValueError, match="top-level keys are \\['optimizer'\\]"):
        convert_state_dict({"optimizer": {"state": {}}}, tiny)


def test_swin_relative_position_index_dropped_and_checked():
    swin = _model("model.backbone=swin", seed=6)
    official = official_state(swin)
    index_keys = [k for k in official if k.endswith("relative_position_index")]
    assert len(index_keys) == 8
    state, report = convert_state_dict({"model": official}, _model("model.backbone=swin", seed=7))
    _assert_same(state, swin)
    assert sorted(next(v for why, v in report.dropped.items() if "relative position" in why)) == sorted(
        index_keys
    )
    official[index_keys[0]] = official[index_keys[0]].flip(0)
    with pytest.raises(ValueError, match="not the standard relative position index of window size 12"):
        convert_state_dict({"model": official}, swin)


# ----------------------------------------------------------------------------------------------- safe reading


class _Payload:
    """Unpickling this runs os.makedirs(marker): a stand-in for arbitrary code in a malicious checkpoint."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.makedirs, (str(self.marker),)


def test_malicious_pth_refused_unless_trusted(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    torch.save({"model": {"w": torch.zeros(2)}, "cfg": _Payload(marker)}, path)
    with pytest.raises(ValueError, match="--unsafe-pickle"):
        load_official_checkpoint(path)
    assert not marker.exists()
    loaded = load_official_checkpoint(path, unsafe_pickle=True)  # the explicit opt-in runs the file's code
    assert marker.exists() and torch.equal(loaded["model"]["w"], torch.zeros(2))


@pytest.mark.parametrize("protocol", [2, pickle.HIGHEST_PROTOCOL])
def test_pkl_numpy_read_safely_and_malicious_pkl_refused(tmp_path, tiny, protocol):
    path = tmp_path / "model_final.pkl"
    official = {k: v.numpy() for k, v in official_state(tiny).items()}
    with path.open("wb") as f:
        pickle.dump({"model": official, "__author__": "detectron2", "matching_heuristics": True}, f, protocol)
    state, _ = convert_state_dict(load_official_checkpoint(path), tiny)
    _assert_same(state, tiny)

    marker = tmp_path / "pwned"
    with path.open("wb") as f:
        pickle.dump({"model": {"w": _Payload(marker)}}, f, protocol)
    with pytest.raises(ValueError, match=r"posix\.makedirs' is not allowed|os\.makedirs' is not allowed"):
        load_official_checkpoint(path)
    assert not marker.exists()


def test_cli_writes_weights_and_config_that_evaluate_loads(tmp_path, tiny, caplog):
    caplog.set_level(logging.INFO)
    src = tmp_path / "model_final.pth"
    torch.save({"model": official_state(tiny), "iteration": 1234}, src)
    out = tmp_path / "models" / "tiny.safetensors"
    assert main([str(src), str(out), "--config", str(TINY), "--set", "data.num_workers=0"]) == 0
    state, metadata = read_weights(out)
    assert metadata["source"] == str(src) and metadata["iteration"] == "1234"
    cfg = load_config(out.with_suffix(".toml"))
    assert cfg.model.weights == str(out)
    model = build_model(cfg.model)
    load_weights(model, out, strict=True)  # as evaluate.py --weights does
    _assert_same(model.state_dict(), tiny)
    assert "dropped 2 keys" in caplog.text
    # A checkpoint that does not fit the config: exit status 1 and the keys named.
    assert main([str(src), str(out), "--config", str(TINY), "--set", "model.roi_heads.fc_dim=32"]) == 1
    assert "fc1.weight: checkpoint (64, 3136) vs model (32, 3136)" in caplog.text


def test_cli_num_classes_truncates(tmp_path):
    wide = _model("model.num_classes=11", seed=8)
    src = tmp_path / "divergen.pth"
    torch.save({"model": official_state(wide)}, src)
    out = tmp_path / "lvis.safetensors"
    args = [str(src), str(out), "--config", str(TINY), "--set", "model.num_classes=11", "--num-classes", "8"]
    assert main(args) == 0
    assert load_config(out.with_suffix(".toml")).model.num_classes == 8
    assert read_weights(out)[0]["roi_heads.box_predictor.2.cls_score.bias"].shape == (9,)


# ----------------------------------------------------------------------------------------------- backbones


def test_backbone_resnet_timm_names(tiny):
    trunk = {k: v for k, v in strip_prefix(official_state(tiny), "backbone.bottom_up.base.").items()}
    trunk["bn1.num_batches_tracked"] = torch.tensor(7)  # timm BatchNorm2d state
    state, report = convert_backbone({"state_dict": trunk}, _model(seed=9))
    assert set(state) == {k for k in tiny.state_dict() if k.startswith("backbone.bottom_up.")}
    for k, v in state.items():
        assert torch.equal(v, tiny.state_dict()[k]), k
    assert report.renamed["conv1.weight"] == "backbone.bottom_up.base.conv1.weight"
    assert report.left_initialised == []
    fresh = _model(seed=10)
    load = fresh.load_state_dict(state, strict=False)
    assert load.unexpected_keys == [] and all(
        not k.startswith("backbone.bottom_up") for k in load.missing_keys
    )


def test_backbone_swin_microsoft_and_timm_layouts():
    swin = _model("model.backbone=swin", seed=11)
    trunk = strip_prefix(official_state(swin), "backbone.bottom_up.")
    out_norms = {k for k in trunk if k.startswith(("norm1.", "norm2.", "norm3."))}
    # Microsoft's ImageNet checkpoint: a final norm and a classifier head, no out norms, shift masks.
    microsoft = {k: v for k, v in trunk.items() if k not in out_norms}
    microsoft.update({"norm.weight": torch.ones(192), "head.weight": torch.zeros(5, 192)})
    microsoft["layers.0.blocks.1.attn_mask"] = torch.zeros(4, 144, 144)
    target = _model("model.backbone=swin", seed=12)
    state, report = convert_backbone({"model": microsoft}, target)
    assert sorted(report.left_initialised) == sorted(f"backbone.bottom_up.{k}" for k in out_norms)
    for k, v in state.items():
        assert torch.equal(v, swin.state_dict()[k]), k
    # timm >= 0.9: stage i's PatchMerging stored as layers.{i+1}.downsample.
    timm = {}
    for k, v in microsoft.items():
        if ".downsample." in k:
            i = int(k.split(".")[1])
            k = k.replace(f"layers.{i}.downsample.", f"layers.{i + 1}.downsample.")
        timm[k] = v
    state_timm, report_timm = convert_backbone(timm, target)
    assert report_timm.renamed["layers.1.downsample.reduction.weight"] == (
        "backbone.bottom_up.layers.0.downsample.reduction.weight"
    )
    assert state_timm.keys() == state.keys()
    assert all(torch.equal(state_timm[k], state[k]) for k in state)


# ----------------------------------------------------------------------------------------------- parity fixtures


def test_parity_heads_weights_convert(heads_weights):
    """The 80 official head entries (parity README §1), completed with a trunk, convert to themselves."""
    from divergen.config import ModelConfig

    cfg = ModelConfig(num_classes=20)
    cfg.roi_heads.fc_dim = 128
    model = build_model(cfg)
    trunk = {k: v for k, v in model.state_dict().items() if k.startswith("backbone.bottom_up.")}
    official = {"model_ema": {f"module.{k}": v for k, v in {**heads_weights, **trunk}.items()}}
    state, report = convert_state_dict(official, model)
    assert report.dropped == {} and report.filled == []
    for k, v in heads_weights.items():
        assert torch.equal(state[k], v), k
    model.load_state_dict(state, strict=True)


def test_parity_swin_weights_reproduce_outputs(swin_weights, swin_case):
    """The official tiny Swin's weights through convert_backbone reproduce its stored outputs (README §2)."""
    swin = _model("model.backbone=swin", seed=13)
    state, report = convert_backbone({"model": swin_weights}, swin)
    assert report.left_initialised == []
    swin.load_state_dict(state, strict=False)
    trunk = swin.backbone.bottom_up.eval()
    with torch.no_grad():
        outs = trunk(swin_case["input.x"])
    for i, out in enumerate(outs, start=1):
        assert_close_rel(out, swin_case[f"output.swin{i}"], rel=1e-4, name=f"swin{i}")


@pytest.mark.parametrize(
    "config, official_config, keys",
    [
        ("r50.toml", "r50.toml", 347),  # centernet2.md §5: 347 keys (with fc), 435 (with 24 index buffers)
        ("swinl.toml", "swinl.toml", 435),
        ("swinl.toml", "divergen_swinl.toml", 435),  # DiverGen's 1453 classes -> LVIS's 1203
    ],
)
def test_paper_size_key_sets(config, official_config, keys):
    """The official key sets of the released models (shapes only: meta tensors) convert to the paper configs."""
    with torch.device("meta"):
        target = build_model(load_config(ROOT / "configs" / config).model)
        source = build_model(load_config(ROOT / "configs" / official_config).model)
    official = {}
    for k, v in source.state_dict().items():
        official[f"module.{k}"] = v
    for name, module in source.named_modules():
        if isinstance(module, WindowAttention):  # real values: the converter checks them
            official[f"module.{name}.relative_position_index"] = relative_position_index(module.window_size)
    if "resnet" in source.backbone.bottom_up.__class__.__name__.lower():
        official["module.backbone.bottom_up.base.fc.weight"] = torch.empty(
            11221, 2048, device="meta"
        )  # MIIL 21k
        official["module.backbone.bottom_up.base.fc.bias"] = torch.empty(11221, device="meta")
    assert len(official) == keys
    state, report = convert_state_dict({"model_ema": official, "grad_bank.weight": torch.zeros(1)}, target)
    assert {k: v.shape for k, v in state.items()} == {k: v.shape for k, v in target.state_dict().items()}
    assert len(report.truncated) == (9 if official_config == "divergen_swinl.toml" else 0)


def test_cli_backbone_only(tmp_path, tiny):
    src = tmp_path / "resnet.pkl"
    with src.open("wb") as f:  # a detectron2 .pkl of a timm trunk: numpy arrays under bare names
        trunk = strip_prefix(official_state(tiny), "backbone.bottom_up.base.")
        pickle.dump({"model": {k: v.numpy() for k, v in trunk.items()}, "__author__": "third_party"}, f)
    out = tmp_path / "trunk.safetensors"
    assert main([str(src), str(out), "--config", str(TINY), "--backbone-only"]) == 0
    state, metadata = read_weights(out)
    assert metadata["converted_by"] == "divergen.convert --backbone-only"
    assert set(state) == {k for k in tiny.state_dict() if k.startswith("backbone.bottom_up.")}
    model = _model(seed=16)
    load_weights(model, out, strict=False)  # as the engine loads model.weights
    assert torch.equal(model.backbone.bottom_up.base.conv1.weight, tiny.backbone.bottom_up.base.conv1.weight)
