"""TOML configs -> typed, nested dataclasses, with loud errors (DESIGN.md "Config sections").

A config file has one TOML table per section (``[model]``, ``[model.swin]``, ``[solver]``, ...). Every key
has a default in its dataclass, so an empty file is a valid config: the defaults are the official values of
centernet2.md (§1.2 Swin-L, §2 CenterNet, §3 cascade ROI heads, §4 input pipeline and optimisation).

    cfg = load_config("configs/r50.toml", ["solver.lr=2e-4", "model.swin.depths=[2,2,6,2]"])
    save_config(cfg, "runs/x/config.toml")        # load_config reads it back to an equal Config

Unknown sections/keys and wrong types raise ``ConfigError`` naming the dotted key, the file (and the ``--set``
string for overrides), the expected type and the value received. Adding a section is one dataclass plus one
field of ``Config``: parsing, type checks, overrides and saving all follow the dataclass type hints.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import difflib
import math
import os
import re
import tomllib
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


class ConfigError(ValueError):
    """A config file or ``--set`` override that does not match the config dataclasses."""


# ----------------------------------------------------------------------------------------------------
# The schema. Field names are the public interface (model.py, the engine and tests use them);
# defaults = the official values.


@dataclass
class SwinConfig:
    """``[model.swin]``: Swin-L 22k-384 (centernet2.md §1.2); used when ``model.backbone = "swin"``."""

    embed_dim: int = 192
    depths: list[int] = field(default_factory=lambda: [2, 2, 18, 2])
    num_heads: list[int] = field(default_factory=lambda: [6, 12, 24, 48])
    window_size: int = 12
    drop_path_rate: float = 0.3  # linspace over all blocks


@dataclass
class CenterNetConfig:
    """``[model.centernet]``: the class-agnostic CenterNet proposal stage (centernet2.md §2)."""

    num_convs: int = 4  # bbox_tower depth, shared by agn_hm and bbox_pred (§2.1)
    prior_prob: float = 0.01  # agn_hm bias = -log((1 - p) / p) = -4.595
    strides: list[int] = field(default_factory=lambda: [8, 16, 32, 64, 128])
    # Per-level [min, max] of the half box diagonal (§2.2); ranges overlap: a box may be positive at 2 levels.
    sizes_of_interest: list[list[float]] = field(
        default_factory=lambda: [
            [0.0, 80.0],
            [64.0, 160.0],
            [128.0, 320.0],
            [256.0, 640.0],
            [512.0, 10000000.0],
        ]
    )
    hm_min_overlap: float = 0.8  # Gaussian radius² = max(((1-o)/(1+o))²·2·area, min_radius²) (§2.2)
    min_radius: float = 4.0
    focal_alpha: float = 0.25
    focal_beta: float = 4.0
    focal_gamma: float = 2.0
    sigmoid_clamp: float = 1e-4
    ignore_high_fp: float = 0.85  # negatives with p >= this are ignored (§2.3)
    pos_weight: float = 0.5
    neg_weight: float = 0.5
    reg_weight: float = 1.0  # official default 2; every X-Paste/BSGAL/DiverGen config sets 1
    inference_th: float = 1e-4  # on sigmoid(agn_hm), before the sqrt (§2.4)
    pre_nms_topk_train: int = 4000  # per level per image
    post_nms_topk_train: int = 2000
    pre_nms_topk_test: int = 1000
    post_nms_topk_test: int = 256
    nms_thresh_train: float = 0.9
    nms_thresh_test: float = 0.9


@dataclass
class ROIHeadsConfig:
    """``[model.roi_heads]``: 3-stage cascade box heads + class-agnostic mask head (centernet2.md §3)."""

    pooler_resolution: int = 7
    fc_dim: int = 1024
    num_fc: int = 2
    cascade_ious: list[float] = field(default_factory=lambda: [0.6, 0.7, 0.8])
    bbox_reg_weights: list[list[float]] = field(
        default_factory=lambda: [[10.0, 10.0, 5.0, 5.0], [20.0, 20.0, 10.0, 10.0], [30.0, 30.0, 15.0, 15.0]]
    )
    batch_size_per_image: int = 512  # stage-0 sampling only; stages 1-2 keep every proposal
    positive_fraction: float = 0.25
    use_fed_loss: bool = True
    fed_loss_num_cat: int = 50  # counts the background id among the 50 (§3, pitfall 6)
    fed_loss_freq_weight: float = 0.5  # sampling p ∝ image_count ** 0.5
    # "foreground": / 4·N_fg (X-Paste/BSGAL/DiverGen); "sampled": / N_sampled (detectron2/Detic).
    box_loss_norm: str = "foreground"
    mask_on: bool = True
    mask_pooler_resolution: int = 14
    mask_num_conv: int = 4
    mask_conv_dim: int = 256
    score_thresh_test: float = 0.02
    nms_thresh_test: float = 0.5
    detections_per_image: int = 300
    mult_proposal_score: bool = True  # final score = sqrt(mean stage prob · proposal score)
    # Score only the first N classes at test time (0 = all): a DiverGen model trained on LVIS + 250 ImageNet
    # classes (num_classes = 1453) is evaluated on LVIS's 1203, as the official truncates its classifier.
    test_num_classes: int = 0


@dataclass
class ModelConfig:
    """``[model]``: CenterNet2 = backbone + FPN P3-P7 + CenterNet proposals + cascade ROI heads."""

    backbone: str = "resnet50"  # a timm ResNet name ("resnet50"; "resnet18" for tiny configs) or "swin"
    num_classes: int = 1203  # LVIS v1; 1453 for DiverGen (LVIS + 250 ImageNet classes)
    fpn_channels: int = 256  # a multiple of 32: the CenterNet tower uses GroupNorm(32, C)
    pixel_mean: list[float] = field(default_factory=lambda: [123.675, 116.28, 103.53])  # RGB, 0..255
    pixel_std: list[float] = field(default_factory=lambda: [58.395, 57.12, 57.375])
    size_divisibility: int = 32
    # A Detic-format cat-info JSON or an LVIS/COCO annotation JSON; "" = the engine takes it from the dataset.
    fed_loss_cat_info: str = ""
    weights: str = ""  # initial weights (safetensors), loaded by the engine; "" = random init
    # Autocast the proposal and ROI heads too. The official code runs only the backbone in fp16, the heads and
    # losses in fp32 (centernet2.md §4 "FP16"); False reproduces that.
    amp_heads: bool = False
    swin: SwinConfig = field(default_factory=SwinConfig)
    centernet: CenterNetConfig = field(default_factory=CenterNetConfig)
    roi_heads: ROIHeadsConfig = field(default_factory=ROIHeadsConfig)


@dataclass
class DataConfig:
    """``[data]``: LVIS-format datasets and the input pipeline (centernet2.md §4)."""

    train_json: str = "datasets/lvis/lvis_v1_train.json"
    train_image_root: str = "datasets/coco"
    val_json: str = "datasets/lvis/lvis_v1_val.json"
    val_image_root: str = "datasets/coco"
    train_size: int = 640  # EfficientDetResizeCrop output side: 640 (R50) / 896 (Swin-L)
    scale_range: tuple[float, float] = (0.1, 2.0)  # LSJ-style random scale factor range
    test_short_edge: int = 800  # d2's ResizeShortestEdge at test, for R50 and Swin-L alike (§6.9)
    test_max_size: int = 1333
    repeat_factor_threshold: float = 0.001  # LVIS repeat-factor sampling t
    num_workers: int = 4
    filter_empty: bool = True  # drop training images without annotations


@dataclass
class PasteConfig:
    """``[paste]``: generated instances pasted into the training images (divergen.md §2; ``divergen.paste``)."""

    enabled: bool = False
    pool: str = ""  # pool.jsonl, a folder holding one, or an official {"<0-based cat>": ["*x.png", ...]} JSON
    sample_type: str = "cas_random"  # "cas_random" | "random" | "cats_random" (INST_POOL_SAMPLE_TYPE)
    max_samples: int = 20  # n ~ U{0, ..., max_samples - 1} instances per image
    frequencies: list[str] = field(default_factory=lambda: ["r", "c", "f"])  # INST_POOL_FREQ
    min_clip_score: float = -math.inf  # keep pool records with clip_score >= this (-inf = no filter)
    min_inter_similarity: float = -math.inf  # keep records with clip_inter_sim >= this (DiverGen: 0.6)
    generators: list[str] = field(default_factory=list)  # keep only these generators; [] = all
    size_stats: str = ""  # an official area_mean_std2.json; "" = computed from data.train_json
    max_rel_size: float = 0.5  # sqrt(relative area) clipped to [min_size_px / H, max_rel_size]
    min_size_px: float = 10.0
    aspect_jitter: float = 0.2
    min_side: int = 5  # statistics-sized instances with a smaller side are not pasted
    random_scale: bool = False  # always use the random scale (the fallback for classes without statistics)
    random_scale_range: tuple[float, float] = (0.05, 0.3)
    random_scale_min_side: int = 3
    flip_prob: float = 0.5
    blend: list[str] = field(default_factory=lambda: ["basic"])  # "basic" | "alpha" | "gaussian" (CP_METHOD)
    box_moved_thresh: float = 10.0  # occluded instances whose box moved more than this ...
    visible_pixels_thresh: int = 300  # ... and that keep at most this many pixels are dropped


@dataclass
class BSGALConfig:
    """``[bsgal]``: online contribution estimation and selection of the pasted generated instances (bsgal.md).

    Each iteration, on each process (``sync = "local"``, the official) or once for the global batch
    (``"global"``), the pasted batch is accepted or rejected as a whole; a rejected one trains on the same crops
    without the pasted instances. Needs ``[paste] enabled``.
    """

    enabled: bool = False
    # "grad_cache": cosine of a candidate gradient with a cached real-data gradient (BSGAL_R50, bsgal.md §1.2);
    # "lookahead": one SGD step on the pasted batch and one on the original, reference losses compared, weights
    # restored (the loss estimate of BSGAL_SwinL, Algorithm 2, bsgal.md §3): no gradient vector is kept.
    estimator: str = "grad_cache"
    # grad_cache: "paste" = the gradient of the cls loss on RoIs matched to pasted instances vs a threshold (the
    # one-forward simplification A.7, only_paste_τ, bsgal.md §4); "compare" = full-loss gradients of the pasted
    # and of the original batch, paste iff its cosine is not lower (paste_or_ori with grad compare, §1.3).
    candidate: str = "paste"
    # Take the candidate gradient from the forward that trains on the pasted batch when it is accepted; false =
    # the official order, a separate scoring forward (three forward+backward passes per iteration).
    shared_forward: bool = True
    tau: float = -0.05  # fixed threshold: reject iff tau > cosine (ACTIVE_ONCE_MODE only_paste_-0.05)
    dynamic_threshold: bool = False  # threshold = the (1 - r) quantile of the last queue_size scores (A.5)
    accept_rate: float = 0.5  # r, the preset acceptance rate of the dynamic threshold
    accept_rate_end: float = -1.0  # >= 0: r goes linearly from accept_rate to this over train.max_iter
    queue_size: int = 1000
    cache_update: str = "momentum"  # c <- m·c + (1 - m)·g_ref ("momentum") or the running mean ("average")
    momentum: float = 0.1  # m, the weight of the OLD cache (official MOMENTUM0.1: the new gradient gets 0.9)
    cache_dtype: str = "float32"  # or "bfloat16"
    cache_device: str = ""  # "" = the parameters' device; "cpu" = offloaded (Swin-L memory option)
    normalize: bool = True  # cosine (ACTIVE_GRAD_NORM); false = raw dot product
    seed: int = 1  # torch.manual_seed(seed + iteration) before the candidate forward (ACTIVE_SEED); 0 = off
    sync: str = "local"  # "local": each process decides on its own images (official); "global": one decision
    backbone_eval: bool = True  # scoring forwards with the backbone in eval mode (official; drop-path off)
    lookahead_lr: float = 1e-4  # the inner SGD step of the lookahead estimator (ACTIVE_LR)
    # Both lookahead branches and their reference losses on the same RNG stream (the official Swin-L config
    # leaves them unpaired, ACTIVE_SEED = 0, which makes the comparison noisy: bsgal.md §3).
    lookahead_paired: bool = True
    gallery_period: int = (
        0  # every N iterations save the pasted batch (JPEG) for the report gallery; 0 = never
    )


@dataclass
class SolverConfig:
    """``[solver]``: AdamW, warmup + cosine, per-value clipping, EMA (centernet2.md §4)."""

    optimizer: str = "adamw"  # same weight decay for every parameter (norms and biases included)
    lr: float = 1e-4
    weight_decay: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_iters: int = 10000
    warmup_factor: float = 1e-4
    schedule: str = "cosine"  # the cosine runs over the full max_iter, warmup included
    clip_value: float = 1.0  # elementwise clipping by value, after unscaling
    ema_decay: float = 0.999
    ema_enabled: bool = True  # evaluation uses the EMA weights


@dataclass
class TrainConfig:
    """``[train]``: the run itself."""

    output_dir: str = "output"
    max_iter: int = 90000
    batch_size: int = 16  # global images per iteration, over all processes and accumulation steps
    grad_accum_steps: int = 1
    checkpoint_period: int = 10000
    eval_period: int = 0  # 0 = evaluate only at the end
    seed: int = 0
    log_period: int = 20
    max_nonfinite_in_row: int = 10  # abort after this many consecutive non-finite losses


@dataclass
class EvalConfig:
    """``[eval]``: inference over the validation set."""

    batch_size: int = 1  # images per process
    max_dets: int = 300  # LVIS AP uses up to 300 detections per image


@dataclass
class Config:
    """A whole detector config: one field per TOML section."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    paste: PasteConfig = field(default_factory=PasteConfig)
    bsgal: BSGALConfig = field(default_factory=BSGALConfig)
    solver: SolverConfig = field(default_factory=SolverConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


# ----------------------------------------------------------------------------------------------------
# Loading.


def load_config(path: str | os.PathLike, overrides: Sequence[str] = (), *, schema: type = Config) -> Any:
    """Read a TOML config file, apply ``--set`` overrides, check types and constraints.

    Arguments:
        path: the TOML file.
        overrides: ``"section.key=value"`` / ``"section.sub.key=value"`` strings; the value is parsed as TOML
            (``solver.lr=2e-4``, ``model.swin.depths=[2,2,6,2]``, ``train.output_dir="runs/x"``), and str keys
            also take a bare string (``train.output_dir=runs/x``). Applied in order; later ones win.
        schema: the dataclass of the file's top level (``Config``; other CLIs may bring their own).

    Returns an instance of ``schema``. Raises ``ConfigError`` naming the key, file and (for overrides) the
    ``--set`` string on any unknown key, wrong type or violated constraint.
    """
    path = Path(path)
    if not path.is_file():
        resolved = "" if path.is_absolute() else f" (resolved: {path.resolve()})"
        raise ConfigError(f"config file not found: {path}{resolved}")
    try:
        with path.open("rb") as f:
            data = tomllib.load(f)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: invalid TOML: {e}") from e
    cfg = _build(schema, data, prefix="", where=f"in {path}")
    for text in overrides:
        cfg = apply_override(cfg, text, where=f"in --set {text!r} (config {path})")
    validate(cfg, where=f"in {path}" + (f" with --set {' '.join(overrides)}" if overrides else ""))
    return cfg


def parse_config_args(
    parser: argparse.ArgumentParser, argv: Sequence[str] | None = None, *, schema: type = Config
) -> tuple[argparse.Namespace, Any]:
    """The CLIs' ``--config FILE`` and repeated ``--set section.key=value``: parse ``argv``, load the config.

    A bad config exits with status 2 and the ``ConfigError`` message, through ``parser.error``.
    """
    parser.add_argument("--config", required=True, metavar="FILE", help="TOML config file (see configs/)")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override one config key; the value is TOML (repeatable): --set solver.lr=2e-4",
    )
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides, schema=schema)
    except ConfigError as e:
        parser.error(str(e))
    return args, cfg


def config_from_dict(data: dict, *, schema: type = Config, where: str = "in <dict>") -> Any:
    """The inverse of ``config_to_dict`` (e.g. the config stored in a checkpoint), with the same checks."""
    cfg = _build(schema, data, prefix="", where=where)
    validate(cfg, where=where)
    return cfg


def apply_override(cfg: Any, text: str, *, where: str | None = None) -> Any:
    """Return a copy of ``cfg`` with one ``"section.key=value"`` override applied (see ``load_config``)."""
    where = where or f"in --set {text!r}"
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"{where}: expected 'section.key=value', got {text!r}")
    parts = key.split(".")
    cfg = copy.deepcopy(cfg)  # the caller's config stays untouched, and shares no list with the result
    # Walk the dataclasses down to the parent of the last key; each step is checked against the schema.
    parent = cfg
    for i, name in enumerate(parts[:-1]):
        _check_known(type(parent), name, ".".join(parts[:i]), where)
        parent = getattr(parent, name)
        if not dataclasses.is_dataclass(parent):
            raise ConfigError(
                f"{where}: {'.'.join(parts[: i + 1])} is a {_type_name(type(parent))} value, not a section"
            )
    name = parts[-1]
    _check_known(type(parent), name, ".".join(parts[:-1]), where)
    tp = typing.get_type_hints(type(parent))[name]
    value = _parse_value(raw, tp, key, where)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: {key} is a section; expected an inline table {{...}}, got {value!r}")
        # An inline table updates the section key by key; unspecified keys keep their current values.
        setattr(parent, name, _build(tp, value, prefix=key, where=where, base=getattr(parent, name)))
    else:
        setattr(parent, name, _convert(value, tp, key, where))
    return cfg


def _parse_value(raw: str, tp: Any, key: str, where: str) -> Any:
    """TOML value of an override; for str fields a bare string (``runs/x``) is taken verbatim."""
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        if tp is str:
            return raw.strip()
        raise ConfigError(
            f"{key} {where}: {raw.strip()!r} is not a TOML value of type {_type_name(tp)}"
        ) from None
    if tp is str and not isinstance(value, str):
        return raw.strip()  # e.g. train.output_dir=2024 means the directory "2024"
    return value


def _check_known(cls: type, name: str, prefix: str, where: str) -> None:
    names = [f.name for f in dataclasses.fields(cls)]
    if name in names:
        return
    full = f"{prefix}.{name}" if prefix else name
    close = difflib.get_close_matches(name, names, n=1, cutoff=0.6)
    hint = f"; did you mean {(prefix + '.' if prefix else '') + close[0]!r}?" if close else "."
    if prefix:
        raise ConfigError(f"unknown key {full!r} {where}{hint} Valid keys of [{prefix}]: {', '.join(names)}")
    raise ConfigError(f"unknown section {full!r} {where}{hint} Valid sections: {', '.join(names)}")


def _build(cls: type, table: Any, *, prefix: str, where: str, base: Any = None) -> Any:
    """A ``cls`` instance from a TOML table: every key checked, missing keys from ``base`` or the defaults."""
    if not isinstance(table, dict):
        raise ConfigError(
            f"{prefix} {where}: expected a table [{prefix}], got {_type_name(type(table))} {table!r}"
        )
    hints = typing.get_type_hints(cls)
    values = {}
    for name, value in table.items():
        _check_known(cls, name, prefix, where)
        key = f"{prefix}.{name}" if prefix else name
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            sub_base = getattr(base, name) if base is not None else None
            values[name] = _build(tp, value, prefix=key, where=where, base=sub_base)
        else:
            values[name] = _convert(value, tp, key, where)
    try:
        return dataclasses.replace(base, **values) if base is not None else cls(**values)
    except ValueError as e:  # a dataclass's own __post_init__ check (e.g. generators.GeneratorSpec)
        raise ConfigError(f"{prefix or 'config'} {where}: {e}") from e


def _convert(value: Any, tp: Any, key: str, where: str) -> Any:
    """Check ``value`` against the type hint ``tp`` (int -> float allowed; bool is not an int)."""

    def fail() -> typing.NoReturn:
        raise ConfigError(
            f"{key} {where}: expected {_type_name(tp)}, got {_type_name(type(value))} {value!r}"
        )

    if tp is bool:
        if not isinstance(value, bool):
            fail()
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            fail()
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            fail()
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            fail()
        return value
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is list:
        if not isinstance(value, (list, tuple)):
            fail()
        if dataclasses.is_dataclass(args[0]):  # an array of tables: [[generators]] in a generate config
            return [_build(args[0], v, prefix=f"{key}[{i}]", where=where) for i, v in enumerate(value)]
        return [_convert(v, args[0], f"{key}[{i}]", where) for i, v in enumerate(value)]
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            fail()
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_convert(v, args[0], f"{key}[{i}]", where) for i, v in enumerate(value))
        if len(value) != len(args):
            raise ConfigError(f"{key} {where}: expected {len(args)} values ({_type_name(tp)}), got {value!r}")
        return tuple(
            _convert(v, a, f"{key}[{i}]", where) for i, (v, a) in enumerate(zip(value, args, strict=True))
        )
    # A bug in the schema, not in the file.
    raise TypeError(f"config field {key} has an unsupported type hint {tp!r}")


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) is not None:
        args = ", ".join("..." if a is Ellipsis else _type_name(a) for a in typing.get_args(tp))
        return f"{typing.get_origin(tp).__name__}[{args}]"
    if dataclasses.is_dataclass(tp):
        return "table"
    return {dict: "table", list: "list", tuple: "list"}.get(tp, getattr(tp, "__name__", str(tp)))


# ----------------------------------------------------------------------------------------------------
# Semantic checks: what the types cannot say.

_BACKBONE = re.compile(r"swin|resnet\d+")


def validate(cfg: Any, *, where: str = "") -> None:
    """Raise ``ConfigError`` if a ``Config`` breaks a constraint of centernet2.md (lengths, known names)."""
    if not isinstance(cfg, Config):
        return
    errors = []
    m, cn, roi = cfg.model, cfg.model.centernet, cfg.model.roi_heads
    if not _BACKBONE.fullmatch(m.backbone):
        errors.append(
            f"model.backbone = {m.backbone!r}: expected 'swin' or a plain timm ResNet name such as "
            "'resnet50' or 'resnet18' (the names the official state dict maps onto, centernet2.md §1)"
        )
    if m.num_classes < 1:
        errors.append(f"model.num_classes = {m.num_classes}: expected >= 1")
    if m.fpn_channels <= 0 or m.fpn_channels % 32:
        errors.append(
            f"model.fpn_channels = {m.fpn_channels}: expected a positive multiple of 32 (GroupNorm(32))"
        )
    for name in ("pixel_mean", "pixel_std"):
        if len(getattr(m, name)) != 3:
            errors.append(f"model.{name} = {getattr(m, name)}: expected 3 values (RGB)")
    if any(s <= 0 for s in m.pixel_std):
        errors.append(f"model.pixel_std = {m.pixel_std}: expected positive values")
    if len(m.swin.depths) != len(m.swin.num_heads):
        errors.append(
            f"model.swin.depths has {len(m.swin.depths)} stages but model.swin.num_heads has "
            f"{len(m.swin.num_heads)}: one head count per stage"
        )
    if len(cn.strides) != len(cn.sizes_of_interest):
        errors.append(
            f"model.centernet.strides has {len(cn.strides)} levels but model.centernet.sizes_of_interest has "
            f"{len(cn.sizes_of_interest)}: one [min, max] range per FPN level (centernet2.md §2.2)"
        )
    for i, soi in enumerate(cn.sizes_of_interest):
        if len(soi) != 2 or soi[0] > soi[1]:
            errors.append(
                f"model.centernet.sizes_of_interest[{i}] = {soi}: expected [min, max] with min <= max"
            )
    if len(roi.cascade_ious) != len(roi.bbox_reg_weights):
        errors.append(
            f"model.roi_heads.cascade_ious has {len(roi.cascade_ious)} stages but "
            f"model.roi_heads.bbox_reg_weights has {len(roi.bbox_reg_weights)}: one (wx, wy, ww, wh) per "
            "cascade stage (centernet2.md §3)"
        )
    for i, w in enumerate(roi.bbox_reg_weights):
        if len(w) != 4:
            errors.append(f"model.roi_heads.bbox_reg_weights[{i}] = {w}: expected 4 values (wx, wy, ww, wh)")
    if any(not 0.0 < iou < 1.0 for iou in roi.cascade_ious):
        errors.append(f"model.roi_heads.cascade_ious = {roi.cascade_ious}: expected values in (0, 1)")
    if roi.box_loss_norm not in ("foreground", "sampled"):
        errors.append(
            f"model.roi_heads.box_loss_norm = {roi.box_loss_norm!r}: expected 'foreground' or 'sampled'"
        )
    if roi.test_num_classes < 0 or roi.test_num_classes > m.num_classes:
        errors.append(
            f"model.roi_heads.test_num_classes = {roi.test_num_classes}: expected 0 (all) .. model.num_classes"
        )
    errors += _paste_errors(cfg.paste)
    errors += _bsgal_errors(cfg)
    lo, hi = cfg.data.scale_range
    if not 0.0 < lo <= hi:
        errors.append(f"data.scale_range = {list(cfg.data.scale_range)}: expected 0 < min <= max")
    if not 0.0 <= cfg.solver.ema_decay < 1.0:
        errors.append(f"solver.ema_decay = {cfg.solver.ema_decay}: expected a value in [0, 1)")
    for name in ("max_iter", "batch_size", "grad_accum_steps"):
        if getattr(cfg.train, name) < 1:
            errors.append(f"train.{name} = {getattr(cfg.train, name)}: expected >= 1")
    if errors:
        raise ConfigError(f"invalid config {where}:\n  " + "\n  ".join(errors))


def _paste_errors(p: PasteConfig) -> list[str]:
    from .paste import BLEND_MODES, SAMPLE_TYPES

    errors = []
    if p.enabled and not p.pool:
        errors.append("paste.enabled = true but paste.pool is empty: set it to a pool.jsonl or pool JSON")
    if p.sample_type not in SAMPLE_TYPES:
        errors.append(f"paste.sample_type = {p.sample_type!r}: expected one of {list(SAMPLE_TYPES)}")
    if p.max_samples < 1:
        errors.append(
            f"paste.max_samples = {p.max_samples}: expected >= 1 (n is drawn from 0..max_samples-1)"
        )
    if not p.frequencies or any(f not in ("r", "c", "f") for f in p.frequencies):
        errors.append(f"paste.frequencies = {p.frequencies}: expected a non-empty subset of ['r', 'c', 'f']")
    if not p.blend or any(b not in BLEND_MODES for b in p.blend):
        errors.append(f"paste.blend = {p.blend}: expected a non-empty list of {list(BLEND_MODES)}")
    lo, hi = p.random_scale_range
    if not 0.0 < lo <= hi:
        errors.append(f"paste.random_scale_range = {list(p.random_scale_range)}: expected 0 < min <= max")
    if not 0.0 < p.max_rel_size <= 1.0:
        errors.append(f"paste.max_rel_size = {p.max_rel_size}: expected a value in (0, 1]")
    if not 0.0 <= p.aspect_jitter < 1.0:
        errors.append(f"paste.aspect_jitter = {p.aspect_jitter}: expected a value in [0, 1)")
    if not 0.0 <= p.flip_prob <= 1.0:
        errors.append(f"paste.flip_prob = {p.flip_prob}: expected a probability")
    return errors


def _bsgal_errors(cfg: Config) -> list[str]:
    b, errors = cfg.bsgal, []
    choices = {
        "estimator": ("grad_cache", "lookahead"),
        "candidate": ("paste", "compare"),
        "cache_update": ("momentum", "average"),
        "cache_dtype": ("float32", "bfloat16"),
        "cache_device": ("", "cpu"),
        "sync": ("local", "global"),
    }
    for name, allowed in choices.items():
        if getattr(b, name) not in allowed:
            errors.append(f"bsgal.{name} = {getattr(b, name)!r}: expected one of {list(allowed)}")
    if b.enabled and not cfg.paste.enabled:
        errors.append("bsgal.enabled = true needs paste.enabled = true: BSGAL selects among pasted batches")
    if b.enabled and cfg.train.grad_accum_steps != 1:
        errors.append(
            f"bsgal.enabled = true needs train.grad_accum_steps = 1, got {cfg.train.grad_accum_steps}"
        )
    if not 0.0 <= b.momentum < 1.0:
        errors.append(f"bsgal.momentum = {b.momentum}: expected a value in [0, 1)")
    for name in ("accept_rate",) + (("accept_rate_end",) if b.accept_rate_end >= 0 else ()):
        if not 0.0 < getattr(b, name) <= 1.0:
            errors.append(f"bsgal.{name} = {getattr(b, name)}: expected an acceptance rate in (0, 1]")
    if b.queue_size < 1:
        errors.append(f"bsgal.queue_size = {b.queue_size}: expected >= 1")
    return errors


# ----------------------------------------------------------------------------------------------------
# Saving.


def config_to_dict(cfg: Any) -> dict:
    """A plain nested dict of ``cfg`` (tuples as lists), for logging, JSON and checkpoints."""

    def plain(v: Any) -> Any:
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        if dataclasses.is_dataclass(v):
            return config_to_dict(v)
        return v

    return {
        f.name: config_to_dict(getattr(cfg, f.name))
        if dataclasses.is_dataclass(getattr(cfg, f.name))
        else plain(getattr(cfg, f.name))
        for f in dataclasses.fields(cfg)
    }


def save_config(cfg: Any, path: str | os.PathLike) -> None:
    """Write ``cfg`` as TOML (every key, resolved); ``load_config(path)`` returns an equal config."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = ["# Resolved config, written by divergen.config.save_config; every key is listed."]
    _emit_table(config_to_dict(cfg), "", lines)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def _emit_table(table: dict, prefix: str, lines: list[str]) -> None:
    # A table's own keys must come before its sub-tables: after a [header] every key belongs to that header.
    scalars = {k: v for k, v in table.items() if not isinstance(v, dict)}
    if prefix and (scalars or not table):
        lines += ["", f"[{prefix}]"]
    lines += [f"{k} = {_toml_value(v)}" for k, v in scalars.items()]
    for k, v in table.items():
        if isinstance(v, dict):
            _emit_table(v, f"{prefix}.{k}" if prefix else k, lines)


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        if math.isinf(v):
            return "inf" if v > 0 else "-inf"
        # The shortest repr that round-trips, always a valid TOML float: '0.0001', '1e-05', '10000000.0'.
        return repr(v)
    if isinstance(v, str):
        return _toml_string(v)
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, dict):  # an element of an array of tables, written inline
        return "{" + ", ".join(f"{k} = {_toml_value(x)}" for k, x in v.items()) + "}"
    raise TypeError(f"cannot write {type(v).__name__} {v!r} as TOML")


def _toml_string(s: str) -> str:
    escapes = {'"': '\\"', "\\": "\\\\", "\b": "\\b", "\t": "\\t", "\n": "\\n", "\f": "\\f", "\r": "\\r"}
    out = []
    for ch in s:
        if ch in escapes:
            out.append(escapes[ch])
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:  # control characters are not allowed raw in TOML strings
            out.append(f"\\u{ord(ch):04x}")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'
