"""divergen.config: TOML -> dataclasses, overrides, loud errors, save/load round trip; configs/; CLIs."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import tomllib
from pathlib import Path

import pytest

from divergen.config import (
    CenterNetConfig,
    Config,
    ConfigError,
    ModelConfig,
    ROIHeadsConfig,
    SwinConfig,
    apply_override,
    config_from_dict,
    config_to_dict,
    load_config,
    save_config,
)

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"


def write(tmp_path: Path, text: str, name: str = "cfg.toml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


# ----------------------------------------------------------------------------------------------------
# Defaults and round trips


def test_defaults_are_the_official_values():
    """Spot checks against centernet2.md (§1.2, §2, §3, §4), written out independently of config.py."""
    cfg = Config()
    assert cfg.model.backbone == "resnet50" and cfg.model.num_classes == 1203
    assert cfg.model.swin == SwinConfig(
        embed_dim=192, depths=[2, 2, 18, 2], num_heads=[6, 12, 24, 48], window_size=12, drop_path_rate=0.3
    )
    cn = cfg.model.centernet
    assert cn.sizes_of_interest == [[0, 80], [64, 160], [128, 320], [256, 640], [512, 1e7]]
    assert (cn.pre_nms_topk_train, cn.post_nms_topk_train, cn.pre_nms_topk_test, cn.post_nms_topk_test) == (
        4000,
        2000,
        1000,
        256,
    )
    assert (cn.reg_weight, cn.pos_weight, cn.neg_weight, cn.ignore_high_fp) == (1.0, 0.5, 0.5, 0.85)
    roi = cfg.model.roi_heads
    assert roi.bbox_reg_weights == [[10, 10, 5, 5], [20, 20, 10, 10], [30, 30, 15, 15]]
    assert roi.box_loss_norm == "foreground" and roi.fed_loss_num_cat == 50
    assert cfg.solver.betas == (0.9, 0.999) and cfg.data.scale_range == (0.1, 2.0)
    # Mutable defaults are per instance: editing one config never leaks into another.
    cfg.model.swin.depths.append(2)
    assert Config().model.swin.depths == [2, 2, 18, 2]


def test_empty_file_is_the_defaults(tmp_path):
    assert load_config(write(tmp_path, "")) == Config()
    assert load_config(write(tmp_path, "# only a comment\n[model]\n[model.swin]\n")) == Config()


def test_float_fields_hold_floats_even_when_written_as_ints(tmp_path):
    cfg = load_config(
        write(
            tmp_path,
            "[solver]\nlr = 1\n[model.centernet]\nsizes_of_interest = [[0, 8], [4, 9]]\nstrides = [8, 16]\n",
        )
    )
    assert cfg.solver.lr == 1.0 and type(cfg.solver.lr) is float
    assert cfg.model.centernet.sizes_of_interest == [[0.0, 8.0], [4.0, 9.0]]
    assert all(type(v) is float for row in cfg.model.centernet.sizes_of_interest for v in row)
    assert type(Config().model.centernet.sizes_of_interest[0][0]) is float


def _nondefault_config() -> Config:
    """Every leaf differs from its default, including awkward floats and strings."""
    cfg = Config()
    cfg.model.backbone = "swin"
    cfg.model.fed_loss_cat_info = 'we"ird\\path\twith ü and \x01 and é.json'
    cfg.model.pixel_mean = [0.1 + 0.2, 1e-300, 123456789.123]
    cfg.model.swin.depths = [1, 2, 3]
    cfg.model.swin.num_heads = [1, 2, 3]
    cfg.model.centernet.sizes_of_interest = [[0.0, 1e7], [-0.0, float("inf")]]
    cfg.model.centernet.strides = [4, 8]
    cfg.model.centernet.inference_th = 1e-5
    cfg.model.roi_heads.use_fed_loss = False
    cfg.model.roi_heads.cascade_ious = [0.5]
    cfg.model.roi_heads.bbox_reg_weights = [[1.0, 2.0, 3.0, 4.0]]
    cfg.data.scale_range = (0.5, 0.5)
    cfg.solver.betas = (0.8, 0.99)
    cfg.train.output_dir = ""
    cfg.eval.max_dets = 7
    return cfg


@pytest.mark.parametrize("make", [Config, _nondefault_config], ids=["defaults", "non-defaults"])
def test_save_load_round_trip(tmp_path, make):
    cfg = make()
    path = tmp_path / "sub" / "resolved.toml"
    save_config(cfg, path)
    back = load_config(path)
    assert back == cfg
    # Bit-exact floats: repr tells -0.0 from 0.0 (== does not) and prints the shortest round-trip digits.
    assert repr(config_to_dict(back)) == repr(config_to_dict(cfg))
    # The file is plain TOML: any reader sees the same nested dict as config_to_dict.
    assert tomllib.loads(path.read_text(encoding="utf-8")) == config_to_dict(cfg)


def test_config_to_dict_is_plain_and_json_serialisable():
    d = config_to_dict(Config())
    assert d["model"]["swin"]["depths"] == [2, 2, 18, 2]
    assert d["solver"]["betas"] == [0.9, 0.999]  # tuples become lists
    assert set(d) == {f.name for f in dataclasses.fields(Config)}
    assert config_from_dict(json.loads(json.dumps(d))) == Config()


# ----------------------------------------------------------------------------------------------------
# The shipped configs


@pytest.mark.parametrize(
    "name", ["r50", "swinl", "tiny", "demo", "divergen_swinl", "bsgal_r50", "bsgal_swinl"]
)
def test_shipped_configs_load(name):
    cfg = load_config(CONFIGS / f"{name}.toml")
    assert isinstance(cfg, Config)


def test_shipped_configs_hold_the_variants():
    """centernet2.md §0: the values that define each variant."""
    r50, swinl, tiny = (load_config(CONFIGS / f"{n}.toml") for n in ("r50", "swinl", "tiny"))
    for cfg, size, iters in ((r50, 640, 90000), (swinl, 896, 180000)):
        assert cfg.data.train_size == size and cfg.train.max_iter == iters
        assert (cfg.train.batch_size, cfg.solver.lr, cfg.solver.ema_decay) == (16, 1e-4, 0.999)
        assert cfg.model.num_classes == 1203 and cfg.model.roi_heads == ROIHeadsConfig()
        assert cfg.model.centernet == CenterNetConfig()
        assert (cfg.data.test_short_edge, cfg.data.test_max_size) == (800, 1333)
    assert r50.model.backbone == "resnet50"
    assert swinl.model.backbone == "swin" and swinl.model.swin == SwinConfig()
    assert (
        tiny.model.backbone == "resnet18"
        and tiny.model.num_classes == 8
        and tiny.model.fpn_channels % 32 == 0
    )
    assert tiny.model.roi_heads.fed_loss_num_cat < tiny.model.num_classes + 1
    assert not r50.paste.enabled and not swinl.paste.enabled and not tiny.paste.enabled


def test_shipped_paste_configs():
    """divergen.md §2-§3, bsgal.md §6: the baselines plus instance paste; DiverGen adds 250 classes."""
    r50, swinl = load_config(CONFIGS / "r50.toml"), load_config(CONFIGS / "swinl.toml")
    divergen, bsgal_r50, bsgal_swinl = (
        load_config(CONFIGS / f"{n}.toml") for n in ("divergen_swinl", "bsgal_r50", "bsgal_swinl")
    )
    for cfg, base in ((divergen, swinl), (bsgal_r50, r50), (bsgal_swinl, swinl)):
        p = cfg.paste
        assert (
            p.enabled and p.pool and (p.sample_type, p.max_samples, p.blend) == ("cas_random", 20, ["basic"])
        )
        assert cfg.data == base.data and cfg.solver == base.solver and cfg.model.swin == base.model.swin
    assert (divergen.model.num_classes, divergen.model.roi_heads.test_num_classes) == (1453, 1203)
    assert divergen.paste.min_inter_similarity == 0.6
    assert bsgal_r50.model == r50.model and bsgal_swinl.model == swinl.model
    assert not divergen.bsgal.enabled and not r50.bsgal.enabled
    b = bsgal_r50.bsgal  # bsgal.md §2, BSGAL_R50.yaml
    assert b.enabled and (b.estimator, b.candidate, b.tau, b.momentum, b.seed) == (
        "grad_cache",
        "paste",
        -0.05,
        0.1,
        1,
    )
    assert (b.cache_update, b.sync, b.normalize) == ("momentum", "local", True)
    assert bsgal_swinl.bsgal.enabled and bsgal_swinl.bsgal.estimator == "lookahead"


# ----------------------------------------------------------------------------------------------------
# Overrides


def test_overrides_nested_list_str_bool_float(tmp_path):
    path = write(tmp_path, "[model]\nnum_classes = 5\n")
    cfg = load_config(
        path,
        [
            "model.num_classes=20",
            "model.swin.depths=[2,2,6,2]",
            'train.output_dir="runs/x"',
            "data.val_image_root=images/val 2017",  # bare string with a space
            "model.roi_heads.use_fed_loss=false",
            "solver.lr=2",  # int literal for a float field
            "model.centernet.sizes_of_interest=[[0,64],[32,128],[96,256],[192,512],[384,1e8]]",
            "solver.betas=[0.9, 0.95]",
        ],
    )
    assert cfg.model.num_classes == 20
    assert cfg.model.swin.depths == [2, 2, 6, 2] and cfg.model.swin.num_heads == [6, 12, 24, 48]
    assert cfg.train.output_dir == "runs/x" and cfg.data.val_image_root == "images/val 2017"
    assert cfg.model.roi_heads.use_fed_loss is False
    assert cfg.solver.lr == 2.0 and type(cfg.solver.lr) is float
    assert cfg.model.centernet.sizes_of_interest[-1] == [384.0, 1e8]
    assert cfg.solver.betas == (0.9, 0.95)
    # Untouched keys keep the file's or the default values.
    assert cfg.model.roi_heads.fc_dim == 1024


def test_override_bare_string_and_numeric_looking_string(tmp_path):
    path = write(tmp_path, "")
    cfg = load_config(path, ["train.output_dir=runs/x", "model.backbone=swin", "train.output_dir=2024"])
    assert cfg.model.backbone == "swin"
    assert cfg.train.output_dir == "2024"  # later overrides win; a str field keeps the text


def test_override_inline_table_updates_a_section(tmp_path):
    cfg = load_config(
        write(tmp_path, ""), ["model.swin={embed_dim=96, depths=[2,2,6,2], num_heads=[3,6,12,24]}"]
    )
    assert cfg.model.swin == SwinConfig(embed_dim=96, depths=[2, 2, 6, 2], num_heads=[3, 6, 12, 24])


def test_apply_override_leaves_the_input_untouched():
    cfg = Config()
    new = apply_override(cfg, "model.roi_heads.fc_dim=64")
    assert new.model.roi_heads.fc_dim == 64 and cfg.model.roi_heads.fc_dim == 1024
    new.model.swin.depths.append(2)  # the result shares no mutable state with the input
    assert cfg.model.swin.depths == [2, 2, 18, 2]


# ----------------------------------------------------------------------------------------------------
# Errors


def test_unknown_key_names_key_file_and_suggests(tmp_path):
    path = write(tmp_path, "[model.roi_heads]\nfc_dm = 64\n")
    with pytest.raises(ConfigError) as e:
        load_config(path)
    msg = str(e.value)
    assert "'model.roi_heads.fc_dim'" in msg.split("did you mean")[1]
    assert "model.roi_heads.fc_dm" in msg and str(path) in msg
    assert "pooler_resolution" in msg  # the valid keys are listed


def test_unknown_section_lists_the_sections(tmp_path):
    path = write(tmp_path, "[modle]\nnum_classes = 3\n")
    with pytest.raises(ConfigError, match=r"unknown section 'modle'.*did you mean 'model'") as e:
        load_config(path)
    assert str(path) in str(e.value) and "solver" in str(e.value)


def test_unknown_key_without_close_match_lists_the_valid_keys(tmp_path):
    with pytest.raises(
        ConfigError, match=r"unknown key 'eval\.zzz'.*Valid keys of \[eval\]: batch_size, max_dets"
    ):
        load_config(write(tmp_path, "[eval]\nzzz = 1\n"))


def test_unknown_override_names_the_set_string(tmp_path):
    path = write(tmp_path, "")
    with pytest.raises(ConfigError) as e:
        load_config(path, ["solver.lr=1e-3", "model.centernet.nms_thres_test=0.7"])
    msg = str(e.value)
    assert "--set 'model.centernet.nms_thres_test=0.7'" in msg and str(path) in msg
    assert "'model.centernet.nms_thresh_test'" in msg
    with pytest.raises(ConfigError, match=r"--set 'modle\.num_classes=3'.*did you mean 'model'"):
        load_config(path, ["modle.num_classes=3"])
    with pytest.raises(ConfigError, match="expected 'section.key=value'"):
        load_config(path, ["model.num_classes"])
    with pytest.raises(ConfigError, match=r"model\.num_classes is a int value, not a section"):
        load_config(path, ["model.num_classes.x=3"])


@pytest.mark.parametrize(
    ("text", "key", "expected", "got"),
    [
        ('[model]\nnum_classes = "20"\n', "model.num_classes", "expected int", "got str '20'"),
        ("[model]\nnum_classes = true\n", "model.num_classes", "expected int", "got bool True"),
        ("[model]\nnum_classes = 20.0\n", "model.num_classes", "expected int", "got float 20.0"),
        ("[solver]\nlr = true\n", "solver.lr", "expected float", "got bool True"),
        ("[model.roi_heads]\nmask_on = 1\n", "model.roi_heads.mask_on", "expected bool", "got int 1"),
        ('[model]\npixel_mean = ["1", "2", "3"]\n', "model.pixel_mean[0]", "expected float", "got str '1'"),
        ("[model]\npixel_mean = 1.0\n", "model.pixel_mean", "expected list[float]", "got float 1.0"),
        ("[model.swin]\ndepths = [2, 2.5]\n", "model.swin.depths[1]", "expected int", "got float 2.5"),
        (
            "[model.centernet]\nsizes_of_interest = [[0, 80], [64, 'x']]\n",
            "model.centernet.sizes_of_interest[1][1]",
            "expected float",
            "got str 'x'",
        ),
        (
            "[model.centernet]\nsizes_of_interest = [0, 80]\n",
            "model.centernet.sizes_of_interest[0]",
            "expected list[float]",
            "got int 0",
        ),
        (
            "[data]\nscale_range = [0.1, 2.0, 3.0]\n",
            "data.scale_range",
            "expected 2 values",
            "[0.1, 2.0, 3.0]",
        ),
        ("[train]\noutput_dir = 3\n", "train.output_dir", "expected str", "got int 3"),
        ("model = 3\n", "model", "expected a table [model]", "got int 3"),
    ],
)
def test_wrong_type_names_key_file_expected_and_received(tmp_path, text, key, expected, got):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as e:
        load_config(path)
    msg = str(e.value)
    assert msg.startswith(f"{key} in {path}"), msg
    assert expected in msg and got in msg, msg


def test_wrong_type_in_override(tmp_path):
    path = write(tmp_path, "")
    with pytest.raises(
        ConfigError, match=r"model\.num_classes in --set 'model\.num_classes=true'.*expected int"
    ):
        load_config(path, ["model.num_classes=true"])
    with pytest.raises(
        ConfigError, match=r"solver\.lr in --set 'solver\.lr=fast'.*not a TOML value of type float"
    ):
        load_config(path, ["solver.lr=fast"])
    with pytest.raises(ConfigError, match=r"model\.swin\.depths\[0\] in --set"):
        load_config(path, ['model.swin.depths=["2"]'])


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="config file not found: .*nope.toml"):
        load_config(tmp_path / "nope.toml")


def test_invalid_toml_names_the_file(tmp_path):
    path = write(tmp_path, "[model\nnum_classes = 3\n")
    with pytest.raises(ConfigError, match="invalid TOML") as e:
        load_config(path)
    assert str(path) in str(e.value)


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        (["model.centernet.strides=[8, 16, 32]"], r"strides has 3 levels but .*sizes_of_interest has 5"),
        (
            ["model.roi_heads.cascade_ious=[0.5, 0.6]"],
            r"cascade_ious has 2 stages but .*bbox_reg_weights has 3",
        ),
        (["model.roi_heads.bbox_reg_weights=[[1,1,1],[2,2,2,2],[3,3,3,3]]"], r"bbox_reg_weights\[0\]"),
        (["model.centernet.sizes_of_interest=[[80,0],[0,1],[0,1],[0,1],[0,1]]"], r"sizes_of_interest\[0\]"),
        (
            ["model.backbone=resnet50d"],
            r"model\.backbone = 'resnet50d': expected 'swin' or a plain timm ResNet",
        ),
        (["model.backbone=vit"], "model.backbone = 'vit'"),
        (["model.fpn_channels=48"], "multiple of 32"),
        (["model.swin.num_heads=[1, 2]"], r"depths has 4 stages but model\.swin\.num_heads has 2"),
        (["model.roi_heads.box_loss_norm=mean"], "'foreground' or 'sampled'"),
        (["solver.ema_decay=1"], r"ema_decay = 1\.0"),
        (["train.batch_size=0"], "train.batch_size = 0"),
        (["paste.enabled=true"], "paste.pool is empty"),
        (["paste.sample_type=uniform"], "paste.sample_type = 'uniform'"),
        (["paste.blend=['poisson']"], r"paste\.blend"),
        (["paste.frequencies=['x']"], r"paste\.frequencies"),
        (["paste.max_samples=0"], "paste.max_samples = 0"),
        (["model.roi_heads.test_num_classes=2000"], "test_num_classes = 2000"),
    ],
)
def test_semantic_constraints(tmp_path, overrides, match):
    path = write(tmp_path, "")
    with pytest.raises(ConfigError, match=match) as e:
        load_config(path, overrides)
    assert str(path) in str(e.value) and overrides[0] in str(e.value)


def test_semantic_constraints_accept_the_valid_neighbours(tmp_path):
    """The checks above reject exactly what they should: the same keys with valid values load."""
    cfg = load_config(
        write(tmp_path, ""),
        [
            "model.backbone=resnet18",
            "model.fpn_channels=64",
            "model.centernet.strides=[8, 16, 32]",
            "model.centernet.sizes_of_interest=[[0, 64], [64, 128], [128, 1e8]]",
            "model.roi_heads.cascade_ious=[0.5]",
            "model.roi_heads.bbox_reg_weights=[[10, 10, 5, 5]]",
            "model.roi_heads.box_loss_norm=sampled",
            "solver.ema_decay=0",
        ],
    )
    assert len(cfg.model.centernet.strides) == 3 and cfg.model.roi_heads.box_loss_norm == "sampled"


def test_config_from_dict_checks_like_a_file():
    d = config_to_dict(Config())
    d["model"]["num_clases"] = 3
    with pytest.raises(ConfigError, match=r"unknown key 'model\.num_clases' in <dict>"):
        config_from_dict(d)


def test_model_section_alone_matches_model_config():
    """model.py takes ``cfg.model``: a ModelConfig built directly equals the one from TOML."""
    assert Config().model == ModelConfig()


# ----------------------------------------------------------------------------------------------------
# The CLIs


def _cli(name: str):
    spec = importlib.util.spec_from_file_location(f"_cli_{name}", ROOT / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("name", ["train", "evaluate"])
def test_clis_report_config_errors_with_exit_2(name, capsys):
    with pytest.raises(SystemExit) as e:
        _cli(name).main(["--config", str(CONFIGS / "tiny.toml"), "--set", "model.num_clases=3"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "--set 'model.num_clases=3'" in err and "did you mean 'model.num_classes'" in err
