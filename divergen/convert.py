"""Official detectron2 checkpoints (CenterNet2 / X-Paste / BSGAL / DiverGen) and ImageNet backbones -> safetensors.

Our parameter names are the official ones (centernet2.md §5), so converting a full detector is: pick the weights
(``model_ema`` when present, else ``model``), strip the ``module.`` prefix of the EMA copy, drop what the model
does not hold (BSGAL's ``grad_bank``, the timm classifier ``fc``, Swin's ``relative_position_index``, ...),
truncate a wider classifier (DiverGen's 1453 classes -> LVIS's 1203, as the official
``tools/convert_imgnet_model_to_lvis.py``; divergen.md §3), and check that nothing is missing or left over::

    python -m divergen.convert model_final.pth models/divergen_swinl.safetensors --config configs/swinl.toml
    python evaluate.py --config models/divergen_swinl.toml        # the resolved config written beside it

Backbone-only ImageNet weights (Microsoft/timm Swin-L 22k, MIIL ResNet-50 21k; ``.pth`` or detectron2 ``.pkl``)
go into ``backbone.bottom_up.*`` with ``--backbone-only``; the rest of the model then keeps its initialisation.

Reading is safe by default: ``.pth`` files with ``torch.load(weights_only=True)``, ``.pkl`` files with an
unpickler that admits numpy arrays only. ``--unsafe-pickle`` lifts both restrictions: only for trusted files,
since unpickling may run any code the file holds.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import pickle
import re
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .backbone import relative_position_index
from .checkpoint import save_weights
from .config import config_to_dict, load_config, parse_config_args, save_config

logger = logging.getLogger(__name__)

_CLS_SCORE = re.compile(r"^roi_heads\.box_predictor\.\d+\.cls_score\.(weight|bias)$")
_FREQ_WEIGHT = re.compile(r"^roi_heads\.box_predictor\.\d+\.freq_weight$")
_RELATIVE_INDEX = "relative_position_index"

# Keys an official checkpoint may hold that no divergen module has (centernet2.md §5), with the reason logged.
_DROPPED: tuple[tuple[str, str], ...] = (
    (r"^grad_bank\.", "BSGAL's gradient cache (ACTIVE_GRAD_SAVE), not part of the detector"),
    (r"^backbone\.bottom_up\.base\.fc\.", "the timm ResNet's ImageNet classifier, unused by the detector"),
    (r"(^|\.)relative_position_index$", "Swin's relative position index, recomputed from window_size"),
    (r"(^|\.)attn_mask$", "Swin's shifted-window mask, recomputed for every input size"),
    (r"(^|\.)num_batches_tracked$", "BatchNorm counters; the frozen BatchNorm has none"),
    (r"^(pixel_mean|pixel_std)$", "older detectron2's input-normalisation buffers (model.pixel_mean/std)"),
)
# ImageNet checkpoints: the classifier and the final norm, which the detector replaces by its per-stage out norms
# (centernet2.md §1.2: "No final norm/head").
_DROPPED_BACKBONE: tuple[tuple[str, str], ...] = (
    (r"^(fc|head)\.", "the ImageNet classifier, unused by the detector"),
    (r"^norm\.", "Swin's final norm; the detector has per-stage out norms norm1-3 instead"),
)


@dataclass
class ConversionReport:
    """What a conversion did, for the log and the tests.

    Attributes:
        source: where the weights came from: ``"model_ema"``, ``"model"``, ``"state_dict"`` or ``"state dict"``
            (a bare mapping of tensors).
        stripped: how many keys lost the ``module.`` prefix (the EMA copy of a DDP model).
        dropped: reason -> the keys dropped for it.
        renamed: old key -> new key, where a name changed beyond the ``module.`` prefix.
        truncated: keys whose class rows were cut to the model's classes (+ background).
        filled: keys the checkpoint lacks that were taken from the model (``freq_weight``, training-only).
        left_initialised: model keys the file does not provide (backbone-only conversion: Swin's out norms).
    """

    source: str
    stripped: int = 0
    dropped: dict[str, list[str]] = field(default_factory=dict)
    renamed: dict[str, str] = field(default_factory=dict)
    truncated: list[str] = field(default_factory=list)
    filled: list[str] = field(default_factory=list)
    left_initialised: list[str] = field(default_factory=list)

    def summary(self) -> str:
        lines = [f"weights from {self.source!r}; 'module.' stripped from {self.stripped} keys"]
        lines += [f"dropped {len(keys)} keys ({why}), e.g. {keys[:2]}" for why, keys in self.dropped.items()]
        if self.renamed:
            first = next(iter(self.renamed.items()))
            lines.append(f"renamed {len(self.renamed)} keys, e.g. {first[0]} -> {first[1]}")
        if self.truncated:
            lines.append(f"truncated the classes of {len(self.truncated)} tensors, e.g. {self.truncated[:2]}")
        if self.filled:
            lines.append(f"took {len(self.filled)} training-only buffers from the model: {self.filled[:3]}")
        if self.left_initialised:
            lines.append(
                f"{len(self.left_initialised)} keys left as initialised: {self.left_initialised[:3]}"
            )
        return "\n  ".join(lines)


# ----------------------------------------------------------------------------------------------- reading files


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Admits the globals a pickle of numpy arrays needs (detectron2 ``.pkl`` files) and nothing else."""

    _ALLOWED = {
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "scalar"),
        ("numpy.core.numeric", "_frombuffer"),  # protocol 5 (out-of-band buffers)
        ("numpy._core.numeric", "_frombuffer"),
        ("collections", "OrderedDict"),
        # How protocol-2 pickles store bytes: a str re-encoded (torch's weights_only list admits it too).
        ("_codecs", "encode"),
    }

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"global '{module}.{name}' is not allowed (numpy arrays only)")
        if module.startswith("numpy.core.") and int(__import__("numpy").__version__.split(".")[0]) >= 2:
            # numpy 2 renamed numpy.core (the old name warns); pickles written with numpy 1 name the old one.
            module = "numpy._core." + module[len("numpy.core.") :]
        return super().find_class(module, name)


def _unsafe_hint(path: Path, error: Exception) -> str:
    return (
        f"{path}: the safe reader refused the file ({error}). It holds Python objects besides tensors and arrays "
        "(e.g. a config object or a custom class). If you trust the file's origin, re-run with --unsafe-pickle "
        "(load_official_checkpoint(..., unsafe_pickle=True)): unpickling then runs whatever code the file holds. "
        "Otherwise re-save only the weights, torch.save({'model': ckpt['model']}, ...), where you trust it."
    )


def load_official_checkpoint(path: str | os.PathLike, *, unsafe_pickle: bool = False) -> dict[str, Any]:
    """Read an official checkpoint: a ``torch.save`` file (``.pth``) or a detectron2 pickle of numpy arrays
    (``.pkl``), on the CPU.

    Arguments:
        path: the file.
        unsafe_pickle: allow arbitrary Python objects (``torch.load(weights_only=False)`` / plain ``pickle``).
            Unpickling can run any code the file holds: only for files you trust.

    Raises ``ValueError`` with what to do when the safe reader refuses the file.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    if path.suffix == ".pkl":
        with path.open("rb") as f:
            try:
                # latin1: detectron2's model-zoo pickles were written by Python 2.
                loaded = (pickle.Unpickler if unsafe_pickle else _NumpyOnlyUnpickler)(
                    f, encoding="latin1"
                ).load()
            except pickle.UnpicklingError as e:
                raise ValueError(_unsafe_hint(path, e)) from e
    else:
        try:
            loaded = torch.load(path, map_location="cpu", weights_only=not unsafe_pickle)
        except pickle.UnpicklingError as e:
            raise ValueError(_unsafe_hint(path, e)) from e
    if unsafe_pickle:
        logger.warning("%s: read with --unsafe-pickle (the file is trusted)", path)
    if not isinstance(loaded, Mapping):
        raise ValueError(f"{path}: expected a dict of weights, got a {type(loaded).__name__}")
    return dict(loaded)


def unwrap_checkpoint(official: Mapping[str, Any]) -> tuple[dict[str, Any], str]:
    """``(state dict, where it came from)``: ``model_ema`` when present (the weights the papers evaluate), else
    ``model``, else ``state_dict`` (timm / MIIL), else ``official`` itself when it maps names to tensors."""
    for key in ("model_ema", "model", "state_dict"):
        inner = official.get(key)
        if isinstance(inner, Mapping) and inner:
            return dict(inner), key
    if official and all(_is_array(v) for v in official.values()):
        return dict(official), "state dict"
    raise ValueError(
        f"the checkpoint has no 'model_ema', 'model' or 'state_dict' entry and is not a state dict; "
        f"its top-level keys are {sorted(official)[:20]}"
    )


def _is_array(value: Any) -> bool:
    return isinstance(value, Tensor) or type(value).__module__ == "numpy"


def _as_tensor(value: Any, key: str) -> Tensor:
    if isinstance(value, Tensor):
        return value
    if type(value).__module__ == "numpy":
        return torch.as_tensor(value)
    raise ValueError(
        f"checkpoint entry {key!r}: expected a tensor or numpy array, got a {type(value).__name__}"
    )


# ----------------------------------------------------------------------------------------------- conversion


def _own_state(model_state: Mapping[str, Tensor] | nn.Module) -> dict[str, Tensor]:
    return dict(model_state.state_dict() if isinstance(model_state, nn.Module) else model_state)


def _drop_reason(key: str, value: Tensor, rules: Sequence[tuple[str, str]]) -> str | None:
    for pattern, reason in rules:
        if re.search(pattern, key):
            if key.endswith(_RELATIVE_INDEX):
                _check_relative_index(key, value)
            return reason
    return None


def _check_relative_index(key: str, value: Tensor) -> None:
    # Dropping it is safe only if it is the standard index of its window: then our recomputed buffer equals it.
    window = round(value.shape[0] ** 0.5)
    if value.dim() != 2 or value.shape[0] != value.shape[1] or window * window != value.shape[0]:
        raise ValueError(f"{key}: expected a (ws², ws²) index, got shape {tuple(value.shape)}")
    if not torch.equal(value.long(), relative_position_index(window)):
        raise ValueError(f"{key}: not the standard relative position index of window size {window}")


def _strip_and_drop(
    raw: Mapping[str, Any], report: ConversionReport, rules: Sequence[tuple[str, str]]
) -> dict[str, Tensor]:
    state = {}
    for key, value in raw.items():
        value = _as_tensor(value, key)
        if key.startswith("module."):
            key = key[len("module.") :]
            report.stripped += 1
        reason = _drop_reason(key, value, rules)
        if reason is not None:
            report.dropped.setdefault(reason, []).append(key)
        else:
            state[key] = value
    return state


def _fit_classes(
    state: dict[str, Tensor], own: Mapping[str, Tensor], report: ConversionReport, num_classes: int | None
) -> None:
    """Truncate a wider classifier to the model's classes; take ``freq_weight`` from the model when absent."""
    for key, target in own.items():
        if _FREQ_WEIGHT.match(key) and key not in state:
            # Training-only (the federated loss's sampling weights, recomputed by the engine from the data).
            state[key] = target.clone()
            report.filled.append(key)
        if key not in state or not (_CLS_SCORE.match(key) or _FREQ_WEIGHT.match(key)):
            continue
        value, want = state[key], target.shape[0]
        if num_classes is not None:
            model_classes = want - 1 if _CLS_SCORE.match(key) else want
            if model_classes != num_classes:
                raise ValueError(
                    f"{key}: the model has {model_classes} classes but num_classes = {num_classes} was asked; "
                    "build the model with that many classes (CLI: --num-classes sets model.num_classes)"
                )
        if value.shape[0] <= want or value.shape[1:] != target.shape[1:]:
            continue  # equal, or narrower: the shape check names it
        if _CLS_SCORE.match(key):
            # tools/convert_imgnet_model_to_lvis.py (divergen.md §3): the first C class rows and the background
            # row, which is the last one: 1454 -> 1203 + 1.
            state[key] = torch.cat([value[: want - 1], value[-1:]])
        else:
            state[key] = value[:want]
        report.truncated.append(key)
    if report.truncated:
        logger.warning(
            "the checkpoint's classifier is wider than the model's: kept the first %d classes and the background "
            "(as tools/convert_imgnet_model_to_lvis.py)",
            next(v.shape[0] for k, v in own.items() if _FREQ_WEIGHT.match(k)),
        )


def _verify(
    state: Mapping[str, Tensor], own: Mapping[str, Tensor], *, allow_missing: Sequence[str] = ()
) -> list[str]:
    """Raise ``ValueError`` naming unexpected, missing (not in ``allow_missing``) or mis-shaped keys; returns
    the allowed missing keys."""
    unexpected = sorted(set(state) - set(own))
    missing = sorted(set(own) - set(state))
    allowed = [k for k in missing if any(re.search(p, k) for p in allow_missing)]
    missing = [k for k in missing if k not in allowed]
    mismatched = [
        f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}"
        for k, v in state.items()
        if k in own and v.shape != own[k].shape
    ]
    problems = []
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected keys (not in the model): {unexpected[:20]}")
    if missing:
        problems.append(f"{len(missing)} model keys missing from the checkpoint: {missing[:20]}")
    if mismatched:
        problems.append(f"{len(mismatched)} tensors with the wrong shape: {mismatched[:20]}")
    if problems:
        raise ValueError(
            "the checkpoint does not match the model built from the config (right backbone, num_classes, "
            "fpn_channels, fc_dim?):\n  " + "\n  ".join(problems)
        )
    return allowed


def _cast(state: Mapping[str, Tensor], own: Mapping[str, Tensor]) -> dict[str, Tensor]:
    return {k: v.to(own[k].dtype) if v.is_floating_point() else v for k, v in state.items()}


def convert_state_dict(
    official: Mapping[str, Any],
    model_state: Mapping[str, Tensor] | nn.Module,
    *,
    num_classes: int | None = None,
) -> tuple[dict[str, Tensor], ConversionReport]:
    """An official detectron2 checkpoint as the state dict of ``model_state``'s model, checked key by key.

    Arguments:
        official: the loaded checkpoint (``load_official_checkpoint``): a detectron2 dict with ``model`` and
            perhaps ``model_ema`` (preferred; its keys carry ``module.``), or a bare state dict.
        model_state: the target model or its state dict: gives the expected keys, shapes and dtypes, and the
            value of training-only buffers the checkpoint lacks.
        num_classes: if given, the number of classes the model must have (a check on the caller's config).
            A checkpoint with more classes than the model (DiverGen's 1453) is truncated to the model's.

    Returns ``(state dict, report)``; the state dict loads strictly into the model. Raises ``ValueError`` naming
    the (first 20) unexpected, missing and mis-shaped keys.
    """
    own = _own_state(model_state)
    raw, source = unwrap_checkpoint(official)
    report = ConversionReport(source=source)
    state = _strip_and_drop(raw, report, _DROPPED)
    _fit_classes(state, own, report, num_classes)
    _verify(state, own)
    return _cast(state, own), report


def _timm_swin_downsample(key: str, has_official_layout: bool) -> str:
    # timm >= 0.9 puts stage i's PatchMerging at the start of stage i + 1 (timm's checkpoint_filter_fn, the
    # reverse of this; centernet2.md §5).
    if has_official_layout:
        return key
    return re.sub(r"^layers\.(\d+)\.downsample\.", lambda m: f"layers.{int(m.group(1)) - 1}.downsample.", key)


def convert_backbone(
    official: Mapping[str, Any], model_state: Mapping[str, Tensor] | nn.Module
) -> tuple[dict[str, Tensor], ConversionReport]:
    """ImageNet weights of the trunk (timm / MIIL ResNet, Microsoft or timm Swin) as ``backbone.bottom_up.*``.

    Arguments:
        official: the loaded checkpoint: ``model`` / ``state_dict`` or a bare state dict, under the trunk's own
            names (``conv1.weight``, ``layers.0.blocks.0...``); keys already under ``backbone.bottom_up.`` are
            taken as they are.
        model_state: the target detector or its state dict.

    Returns ``(state dict of the trunk only, report)``, to be loaded with ``strict=False`` (the engine does):
    the FPN and heads keep their initialisation, and so do Swin's out norms ``norm1-3``, which ImageNet
    checkpoints lack (as in the official training). Raises ``ValueError`` on any other missing, unexpected or
    mis-shaped key.
    """
    own = {k: v for k, v in _own_state(model_state).items() if k.startswith("backbone.bottom_up.")}
    if not own:
        raise ValueError("the model has no backbone.bottom_up.* parameters")
    is_resnet = any(k.startswith("backbone.bottom_up.base.") for k in own)
    prefix = "backbone.bottom_up.base." if is_resnet else "backbone.bottom_up."
    raw, source = unwrap_checkpoint(official)
    report = ConversionReport(source=source)
    stripped = _strip_and_drop(raw, report, _DROPPED_BACKBONE + _DROPPED)
    official_layout = is_resnet or any(re.match(r"layers\.0\.downsample\.", k) for k in stripped)
    state = {}
    for key, value in stripped.items():
        if key.startswith("backbone.bottom_up."):
            new = key
        else:
            new = prefix + _timm_swin_downsample(key, official_layout)
            report.renamed[key] = new
        state[new] = value
    report.left_initialised = _verify(state, own, allow_missing=() if is_resnet else (r"\.norm[123]\.",))
    return _cast(state, own), report


# ----------------------------------------------------------------------------------------------- command line


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s: %(message)s")
    parser = argparse.ArgumentParser(
        prog="python -m divergen.convert",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("input", metavar="IN", help="official checkpoint (.pth or detectron2 .pkl)")
    parser.add_argument(
        "output", metavar="OUT.safetensors", help="converted weights; OUT.toml is written beside"
    )
    parser.add_argument(
        "--num-classes",
        type=int,
        metavar="N",
        help="set model.num_classes; a wider checkpoint classifier is truncated (1453 -> 1203 for LVIS)",
    )
    parser.add_argument(
        "--backbone-only", action="store_true", help="ImageNet trunk weights -> backbone.bottom_up.* only"
    )
    parser.add_argument(
        "--unsafe-pickle",
        action="store_true",
        help="trust the file: allow arbitrary pickled objects (unpickling can run code from the file)",
    )
    args, cfg = parse_config_args(parser, argv)
    output = Path(args.output)
    if output.suffix != ".safetensors":
        parser.error(f"OUT {output}: expected a .safetensors path")
    if args.num_classes is not None:
        overrides = [*args.overrides, f"model.num_classes={args.num_classes}"]
        if cfg.model.roi_heads.test_num_classes >= args.num_classes:
            overrides.append("model.roi_heads.test_num_classes=0")  # now all the classes are scored
        cfg = load_config(args.config, overrides)

    from .model import build_model  # the model's modules, only once the arguments are known good

    try:
        official = load_official_checkpoint(args.input, unsafe_pickle=args.unsafe_pickle)
        model = build_model(cfg.model)
        if args.backbone_only:
            state, report = convert_backbone(official, model)
        else:
            state, report = convert_state_dict(official, model, num_classes=args.num_classes)
    except (OSError, ValueError) as e:
        logger.error("%s", e)
        return 1
    logger.info("%s -> %s:\n  %s", args.input, output, report.summary())
    # The saved config names the converted file, so that `evaluate.py --config OUT.toml` (and train.py, for
    # backbone-only weights) picks it up without --weights.
    cfg.model = dataclasses.replace(cfg.model, weights=str(output))
    metadata = {
        "source": str(args.input),
        "source_entry": report.source,
        "converted_by": "divergen.convert" + (" --backbone-only" if args.backbone_only else ""),
        "config": json.dumps(config_to_dict(cfg)),
    }
    if isinstance(official.get("iteration"), int):
        metadata["iteration"] = str(official["iteration"])
    save_weights(state, output, metadata)
    save_config(cfg, output.with_suffix(".toml"))
    logger.info("wrote %d tensors to %s and the config %s", len(state), output, output.with_suffix(".toml"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
