"""The whole detector: parity with the official CenterNet2 end to end, naming, bad input, and an overfit run."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pytest
import torch
from torch import nn

from divergen import model as model_module
from divergen.config import ModelConfig, load_config
from divergen.model import LOSS_KEYS, build_model, paste_masks_in_image

from .conftest import assert_close_rel

ROOT = Path(__file__).resolve().parents[1]


class StoredFeatures(nn.Module):
    """Stands in for the bottom-up trunk: returns the official C3-C5 and records what it was fed."""

    def __init__(self, features: list[torch.Tensor]):
        super().__init__()
        self.features = features
        self.seen: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        self.seen = x
        return [f.clone() for f in self.features]


def parity_config(cat_info: Path) -> ModelConfig:
    """The fixture's shrunk official configuration (parity README §1: 20 classes, FC 128, fed-loss 21, top-k)."""
    cfg = ModelConfig(num_classes=20, fed_loss_cat_info=str(cat_info))
    cfg.roi_heads.fc_dim = 128
    cfg.roi_heads.fed_loss_num_cat = 21
    cfg.centernet.pre_nms_topk_train = 1000
    cfg.centernet.post_nms_topk_train = 256
    return cfg


@pytest.fixture(scope="module")
def parity_model(heads_case, heads_weights, fed_loss_cat_info_path):
    model = build_model(parity_config(fed_loss_cat_info_path))
    missing, unexpected = model.load_state_dict(heads_weights, strict=False)
    assert unexpected == []
    assert missing and all(k.startswith("backbone.bottom_up.") for k in missing)
    # freq_weight comes from the cat-info file and equals the official buffers (image_count ** 0.5).
    for k in range(3):
        torch.testing.assert_close(
            model.roi_heads.box_predictor[k].freq_weight,
            heads_weights[f"roi_heads.box_predictor.{k}.freq_weight"],
        )
    model.backbone.bottom_up = StoredFeatures([heads_case[f"input.bottom_up.layer{i}"] for i in (3, 4, 5)])
    return model


def _match_detections(boxes, labels, ref_boxes, ref_labels, tol=1e-3):
    """Index of our detection matching each reference detection by (class, box)."""
    diff = (ref_boxes[:, None, :] - boxes[None, :, :]).abs().amax(dim=2)
    diff[ref_labels[:, None] != labels[None, :]] = float("inf")
    best, idx = diff.min(dim=1)
    assert (best <= tol).all(), (
        f"{int((best > tol).sum())} reference detections have no match (max {best.max():.3g})"
    )
    assert idx.unique().numel() == len(idx)
    return idx


def test_parity_inference(parity_model, heads_case):
    image = heads_case["input.image"].float()
    parity_model.eval()
    with torch.no_grad():
        (out,) = parity_model([image])
    # Preprocessing: normalised, then zero-padded bottom/right to a multiple of 32 (303x431 -> 320x448).
    seen = parity_model.backbone.bottom_up.seen
    assert tuple(seen.shape) == (1, 3, 320, 448)
    mean = torch.tensor([123.675, 116.28, 103.53]).view(3, 1, 1)
    std = torch.tensor([58.395, 57.12, 57.375]).view(3, 1, 1)
    torch.testing.assert_close(seen[0, :, :303, :431], (image - mean) / std)
    assert seen[0, :, 303:].abs().max() == 0 and seen[0, :, :, 431:].abs().max() == 0

    ref_boxes, ref_scores = heads_case["detections.boxes"], heads_case["detections.scores"]
    ref_labels = heads_case["detections.classes"]
    assert len(out["boxes"]) == len(ref_boxes) == 300
    idx = _match_detections(out["boxes"], out["labels"], ref_boxes, ref_labels)
    assert_close_rel(out["scores"][idx], ref_scores, 1e-5, "scores")
    assert (out["scores"][:-1] >= out["scores"][1:]).all()
    # Pasted masks of the top 3 reference detections: identical up to pixels whose probability is within float
    # noise of the 0.5 threshold (parity README: min |prob - 0.5| = 1e-5).
    ref_masks = heads_case["detections.pasted_masks_top3"]
    ours = out["masks"][idx[:3]]
    assert ours.shape == ref_masks.shape and ours.dtype == torch.bool
    assert (ours != ref_masks).sum() <= 3


def fixture_target(heads_case) -> dict[str, torch.Tensor]:
    """The parity case's 6 GT instances in the model's target format."""
    return {
        "boxes": heads_case["target.gt_boxes"],
        "labels": heads_case["target.gt_classes"],
        "masks": heads_case["target.gt_masks"],
    }


def test_parity_training_losses(parity_model, heads_case):
    image = heads_case["input.image"].float()
    target = fixture_target(heads_case)
    parity_model.train()
    torch.manual_seed(0)
    losses = parity_model([image], [target])
    assert sorted(losses) == sorted(LOSS_KEYS)
    for key in LOSS_KEYS:
        assert_close_rel(losses[key].detach(), heads_case[f"train.{key}"], 1e-5, key)


def test_paste_cls_loss_is_part_of_cls_loss(parity_model, heads_case):
    """With every instance marked pasted, the pasted-RoI cls loss is the foreground share of loss_cls."""
    image = heads_case["input.image"].float()
    n = len(heads_case["target.gt_classes"])
    target = fixture_target(heads_case)
    parity_model.train()
    torch.manual_seed(0)
    none = parity_model(
        [image], [target | {"is_pasted": torch.zeros(n, dtype=torch.bool)}], paste_cls_loss=True
    )
    torch.manual_seed(0)
    some = parity_model([image], [target | {"is_pasted": torch.arange(n) % 2 == 0}], paste_cls_loss=True)
    for k in range(3):
        assert none[f"loss_cls_paste_stage{k}"] == 0
        assert 0 < some[f"loss_cls_paste_stage{k}"] < some[f"loss_cls_stage{k}"]
        torch.testing.assert_close(some[f"loss_cls_stage{k}"], none[f"loss_cls_stage{k}"])


def _official_keys_and_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    with torch.device("meta"):
        model = build_model(cfg)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def test_state_dict_names_match_official_r50(heads_weights):
    """centernet2.md §5: R50 has 347 official keys; ours are the same minus the unused timm classifier fc.*."""
    shapes = _official_keys_and_shapes(ModelConfig())
    assert len(shapes) == 347 - 2
    assert not any(k.startswith("backbone.bottom_up.base.fc.") for k in shapes)
    heads = {k for k in shapes if not k.startswith("backbone.bottom_up.")}
    assert heads == set(heads_weights)
    assert shapes["roi_heads.box_predictor.0.cls_score.weight"] == (1204, 1024)
    assert shapes["roi_heads.box_predictor.2.freq_weight"] == (1203,)
    assert shapes["roi_heads.box_head.1.fc1.weight"] == (1024, 12544)
    assert shapes["backbone.fpn_lateral5.weight"] == (256, 2048, 1, 1)
    assert shapes["backbone.bottom_up.base.layer4.2.bn3.running_var"] == (2048,)


def test_state_dict_names_match_official_swinl():
    """Swin-L: 435 official keys, minus the 24 relative_position_index buffers (recomputed, not stored)."""
    shapes = _official_keys_and_shapes(ModelConfig(backbone="swin"))
    assert len(shapes) == 435 - 24
    assert shapes["backbone.bottom_up.patch_embed.proj.weight"] == (192, 3, 4, 4)
    assert shapes["backbone.bottom_up.layers.2.blocks.17.attn.relative_position_bias_table"] == (529, 24)
    assert shapes["backbone.bottom_up.layers.2.downsample.reduction.weight"] == (1536, 3072)
    assert shapes["backbone.bottom_up.norm3.weight"] == (1536,)
    assert shapes["backbone.fpn_lateral3.weight"] == (256, 384, 1, 1)


# ---------------------------------------------------------------------------------------------- tiny model


@pytest.fixture(scope="module")
def tiny_cfg() -> ModelConfig:
    return load_config(ROOT / "configs" / "tiny.toml").model


def _shapes_image(h: int, w: int, objects: list[tuple[int, tuple[int, int, int, int]]], seed: int):
    """A noisy background with solid objects: (label, (x1, y1, x2, y2)); even labels rectangles, odd ellipses."""
    g = torch.Generator().manual_seed(seed)
    image = 60 + 40 * torch.rand(3, h, w, generator=g)
    boxes, labels, masks = [], [], []
    ys, xs = torch.meshgrid(torch.arange(h) + 0.5, torch.arange(w) + 0.5, indexing="ij")
    for label, (x1, y1, x2, y2) in objects:
        if label % 2 == 0:
            mask = (xs >= x1) & (xs < x2) & (ys >= y1) & (ys < y2)
        else:
            cx, cy, rx, ry = (x1 + x2) / 2, (y1 + y2) / 2, (x2 - x1) / 2, (y2 - y1) / 2
            mask = ((xs - cx) / rx) ** 2 + ((ys - cy) / ry) ** 2 <= 1
        colour = torch.tensor(
            [(37 * label) % 256, (91 * label + 80) % 256, (151 * label + 160) % 256]
        ).float()
        image[:, mask] = colour[:, None]
        boxes.append([x1, y1, x2, y2])
        labels.append(label)
        masks.append(mask)
    target = {
        "boxes": torch.tensor(boxes).float().reshape(-1, 4),
        "labels": torch.tensor(labels, dtype=torch.int64),
        "masks": torch.stack(masks) if masks else torch.zeros(0, h, w, dtype=torch.bool),
    }
    return image, target


def test_bad_input_gives_clear_errors(tiny_cfg):
    torch.manual_seed(0)
    model = build_model(tiny_cfg)
    image, target = _shapes_image(96, 128, [(1, (10, 10, 60, 50))], seed=0)
    with pytest.raises(ValueError, match="list of"):
        model(image[None])
    with pytest.raises(ValueError, match=r"images\[0\]"):
        model([image[:1]])
    model.train()
    with pytest.raises(ValueError, match="needs targets"):
        model([image])
    with pytest.raises(ValueError, match=r"targets\[0\]\['masks'\]"):
        model([image], [target | {"masks": target["masks"][:, :50]}])
    with pytest.raises(ValueError, match=r"targets\[0\]\['boxes'\]"):
        model([image], [target | {"boxes": target["boxes"][:, :2]}])
    with pytest.raises(ValueError, match=r"class indices must be in \[0, 8\)"):
        model([image], [target | {"labels": torch.tensor([8])}])


def test_training_edge_cases_stay_finite(tiny_cfg):
    """Empty targets, degenerate boxes and odd image sizes: finite losses, gradients, no crash."""
    torch.manual_seed(0)
    model = build_model(tiny_cfg)
    model.train()
    a, ta = _shapes_image(97, 141, [(2, (5, 7, 80, 66)), (3, (70, 20, 71, 90))], seed=1)  # 2nd box: 1 px wide
    b, tb = _shapes_image(64, 75, [], seed=2)
    degenerate = ta | {
        "boxes": torch.tensor([[5.0, 7, 80, 66], [30, 30, 30, 50]])
    }  # zero-width box is dropped
    for images, targets in (([a, b], [ta, tb]), ([b], [tb]), ([a], [degenerate])):
        losses = model(images, targets)
        assert sorted(losses) == sorted(LOSS_KEYS)
        total = sum(losses.values())
        assert torch.isfinite(total)
        model.zero_grad()
        total.backward()
        assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_inference_zero_detections_and_odd_sizes(tiny_cfg):
    torch.manual_seed(0)
    model = build_model(tiny_cfg).eval()
    a, _ = _shapes_image(97, 141, [(2, (5, 7, 80, 66))], seed=1)
    b, _ = _shapes_image(33, 250, [], seed=2)
    with torch.no_grad():
        outs = model([a, b])
        for out, im in zip(outs, (a, b)):
            assert out["masks"].shape[1:] == im.shape[1:]
            assert len(out["boxes"]) <= tiny_cfg.roi_heads.detections_per_image
            assert (out["boxes"][:, 2] <= im.shape[2]).all() and (out["boxes"][:, 3] <= im.shape[1]).all()
        model.roi_heads.score_thresh_test = 1.0  # nothing passes
        (out,) = model([a])
    assert out["boxes"].shape == (0, 4) and out["scores"].shape == (0,) and out["labels"].shape == (0,)
    assert out["masks"].shape == (0, 97, 141)


@pytest.mark.parametrize("whole_image", [False, True])
def test_paste_masks_against_slow_reference(whole_image):
    """Bilinear paste at pixel centres, computed here one pixel at a time; per-box crops and whole-image chunks."""
    g = torch.Generator().manual_seed(0)
    masks = torch.rand(2, 28, 28, generator=g)
    boxes = torch.tensor([[3.3, 4.7, 20.2, 17.9], [0.0, 10.5, 31.0, 24.0]])
    pasted = paste_masks_in_image(masks, boxes, (25, 31), whole_image=whole_image)
    for m, box, out in zip(masks, boxes, pasted):
        x0, y0, x1, y1 = box.tolist()
        ref = torch.zeros(25, 31, dtype=torch.bool)
        for y in range(25):
            for x in range(31):
                # Continuous position in mask pixels (align_corners=False), then bilinear with zero padding.
                u = (x + 0.5 - x0) / (x1 - x0) * 28 - 0.5
                v = (y + 0.5 - y0) / (y1 - y0) * 28 - 0.5
                u0, v0 = math.floor(u), math.floor(v)
                val = 0.0
                for dv in (0, 1):
                    for du in (0, 1):
                        uu, vv = u0 + du, v0 + dv
                        if 0 <= uu < 28 and 0 <= vv < 28:
                            val += (1 - abs(u - uu)) * (1 - abs(v - vv)) * float(m[vv, uu])
                ref[y, x] = val >= 0.5
        assert (out != ref).sum() == 0


def test_paste_masks_whole_image_equals_per_box_crops(monkeypatch):
    """Many masks of every size (boxes smaller and much larger than the 28² mask, some at the borders), pasted
    in several chunks: the same masks as the per-box path, at the 0.5 threshold and above."""
    g = torch.Generator().manual_seed(1)
    masks = torch.rand(60, 28, 28, generator=g) ** 0.5
    xy = torch.rand(60, 2, generator=g) * torch.tensor([200.0, 150.0]) - 20
    wh = torch.exp(torch.rand(60, 2, generator=g) * 5) + 0.5  # 1.5 to 150 px
    boxes = torch.cat([xy, xy + wh], 1).clamp(min=0).minimum(torch.tensor([199.0, 149.0, 199.0, 149.0]))
    boxes = boxes[(boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])]
    masks = masks[: len(boxes)]
    monkeypatch.setattr(model_module, "PASTE_CHUNK_BYTES", 12 * 150 * 200 * 7)  # chunks of 7 masks
    for threshold in (0.5, 0.8):
        crops = paste_masks_in_image(masks, boxes, (150, 200), threshold, whole_image=False)
        whole = paste_masks_in_image(masks, boxes, (150, 200), threshold, whole_image=True)
        assert crops.any() and torch.equal(whole, crops)


@pytest.mark.slow
def test_overfit_two_images(tiny_cfg):
    """Gradients reach every part: the tiny model memorises 2 images and then detects both objects."""
    torch.manual_seed(0)
    cfg = dataclasses.replace(tiny_cfg)
    model = build_model(cfg)
    model.roi_heads.set_fed_loss_weights(torch.ones(cfg.num_classes))
    a, ta = _shapes_image(128, 128, [(3, (20, 30, 90, 100))], seed=3)
    b, tb = _shapes_image(128, 128, [(6, (50, 16, 120, 70))], seed=4)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    model.train()
    totals = []
    for _ in range(120):
        losses = model([a, b], [ta, tb])
        total = sum(losses.values())
        totals.append(total.item())
        opt.zero_grad()
        total.backward()
        opt.step()
    # Averages over 10 steps: the last step's box losses (/ 4·N_fg, few foreground RoIs) are noisy.
    first, last = sum(totals[:10]) / 10, sum(totals[-10:]) / 10
    assert last < 0.35 * first, (first, last, {k: round(v.item(), 4) for k, v in losses.items()})
    model.eval()
    with torch.no_grad():
        outs = model([a, b])
    from divergen.boxes import pairwise_iou

    for out, t in zip(outs, (ta, tb)):
        top = out["scores"].argmax()
        assert out["labels"][top] == t["labels"][0]
        assert pairwise_iou(out["boxes"][top : top + 1], t["boxes"])[0, 0] > 0.7
        mask_iou = (out["masks"][top] & t["masks"][0]).sum() / (out["masks"][top] | t["masks"][0]).sum()
        assert mask_iou > 0.7
