"""Cascade ROI heads: pooling, matching, sampling, fed loss, losses, masks, inference, and exact parity with
the official DeticCascadeROIHeads (parity fixtures)."""

from __future__ import annotations

import math

import pytest
import torch
from torchvision.ops import roi_align

from divergen.boxes import Box2BoxTransform, clip_boxes, nonempty, pairwise_iou
from divergen.roi_heads import (
    CascadeROIHeads,
    assign_levels,
    box_reg_loss,
    fed_loss_classes,
    mask_loss,
    mask_targets,
    match_proposals,
    multilevel_roi_align,
    sigmoid_ce_loss,
    subsample_labels,
)

from .conftest import assert_close_rel, strip_prefix

STRIDES = (8, 16, 32)


def _features(batch: int, channels: int, height: int, width: int, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, channels, -(-height // s), -(-width // s), generator=g) for s in STRIDES]


def _random_boxes(n: int, height: int, width: int, seed: int, min_size: float = 4.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(n, 2, generator=g) * torch.tensor([width, height])
    wh = min_size + torch.rand(n, 2, generator=g) * torch.tensor([width, height]) * 0.6
    return torch.cat([xy - wh / 2, xy + wh / 2], dim=1)


def _record_stages(heads: CascadeROIHeads) -> list[tuple]:
    """Wrap ``heads.run_stage`` to record (k, boxes per image, logits, deltas) of every call; it is an
    instance attribute, so ``del heads.run_stage`` restores the method."""
    calls = []
    run_stage = heads.run_stage

    def recording_run_stage(k, features, boxes_per_image):
        logits, deltas = run_stage(k, features, boxes_per_image)
        calls.append((k, [b.clone() for b in boxes_per_image], logits.detach(), deltas.detach()))
        return logits, deltas

    heads.run_stage = recording_run_stage
    return calls


def _tiny_heads(**kwargs) -> CascadeROIHeads:
    torch.manual_seed(0)
    args = dict(num_classes=5, in_channels=8, fc_dim=16, mask_conv_dim=8, fed_loss_num_cat=6)
    return CascadeROIHeads(**(args | kwargs))


# ------------------------------------------------------------------------------------------------ pooling


def test_assign_levels():
    sides = torch.tensor([112.0, 224.0, 448.0, 900.0, 10.0, 111.9, 447.9])
    boxes = torch.stack([torch.zeros(7), torch.zeros(7), sides, sides], dim=1)
    # floor(4 + log2(side / 224)): 3, 4, 5, 6 -> clamp 5, 0 -> clamp 3, 2.99 -> 2 -> clamp 3, 4.99 -> 4.
    assert assign_levels(boxes).tolist() == [0, 1, 2, 2, 0, 0, 1]
    assert assign_levels(boxes, min_level=2, max_level=6).tolist() == [1, 2, 3, 4, 0, 0, 2]


def test_multilevel_roi_align_matches_roi_align_per_box():
    feats = _features(2, 4, 640, 800, seed=1)
    boxes = [
        _random_boxes(9, 640, 800, seed=2, min_size=30),
        _random_boxes(5, 640, 800, seed=3, min_size=200),
    ]
    boxes[0][0] = torch.tensor([-300.0, -200.0, 1100.0, 900.0])  # unclipped, far outside: level p5
    out = multilevel_roi_align(feats, boxes, 7, STRIDES)
    ref = []
    for i, bs in enumerate(boxes):
        for box in bs:
            side = math.sqrt(float((box[2] - box[0]) * (box[3] - box[1])))
            level = min(max(math.floor(4 + math.log2(side / 224 + 1e-8)), 3), 5) - 3
            roi = torch.cat([torch.tensor([0.0]), box])[None]
            ref.append(roi_align(feats[level][i : i + 1], roi, 7, 1.0 / STRIDES[level], 0, True))
    levels = assign_levels(torch.cat(boxes))
    assert set(levels.tolist()) == {0, 1, 2}
    assert torch.equal(out, torch.cat(ref))
    assert multilevel_roi_align(feats, [torch.zeros(0, 4), torch.zeros(0, 4)], 7, STRIDES).shape == (
        0,
        4,
        7,
        7,
    )
    one_empty = multilevel_roi_align(feats, [torch.zeros(0, 4), boxes[1]], 7, STRIDES)
    assert torch.equal(one_empty, torch.cat(ref[9:]))


# -------------------------------------------------------------------------------------- matching, sampling


def test_match_proposals_hand_case():
    gt = torch.tensor([[0.0, 0, 10, 10], [20, 20, 40, 40]])
    labels = torch.tensor([3, 1])
    props = torch.tensor(
        [[0.0, 0, 10, 6], [0, 0, 10, 5.99], [20, 20, 40, 40], [100, 100, 110, 110], [19, 19, 40, 40]]
    )
    assert pairwise_iou(gt[:1], props[:1])[0, 0] == torch.tensor(0.6)  # IoU exactly 0.6 (in fp32)
    matched, classes = match_proposals(props, gt, labels, 0.6, num_classes=5)
    assert matched.tolist() == [0, 0, 1, 0, 1]
    assert classes.tolist() == [3, 5, 1, 5, 1]  # IoU 0.6 is foreground; 0.599 is not; 400/441 = 0.907 is
    matched, classes = match_proposals(props, gt, labels, 0.95, num_classes=5)
    assert classes.tolist() == [5, 5, 1, 5, 5]
    matched, classes = match_proposals(props, torch.zeros(0, 4), torch.zeros(0, dtype=torch.int64), 0.6, 5)
    assert matched.tolist() == [0] * 5 and classes.tolist() == [5] * 5


def test_label_and_sample_appends_gt_and_handles_empty_gt():
    heads = _tiny_heads()
    props = torch.tensor([[0.0, 0, 10, 6], [50, 50, 60, 60], [0, 0, 30, 30]])
    target = {"boxes": torch.tensor([[0.0, 0, 10, 10], [48, 50, 60, 60]]), "labels": torch.tensor([2, 4])}
    empty = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}
    torch.manual_seed(0)
    (boxes, matched, classes), (eboxes, ematched, eclasses) = heads.label_and_sample_proposals(
        [props, props], [target, empty]
    )
    # Five candidates (3 proposals + 2 GT), all taken; foreground first.
    assert len(boxes) == 5
    rows = {tuple(b.tolist()): (int(m), int(c)) for b, m, c in zip(boxes, matched, classes, strict=True)}
    assert rows == {
        (0.0, 0.0, 10.0, 6.0): (0, 2),
        (50.0, 50.0, 60.0, 60.0): (1, 4),  # IoU 100/120
        (0.0, 0.0, 30.0, 30.0): (0, 5),
        (0.0, 0.0, 10.0, 10.0): (0, 2),  # the appended GT boxes
        (48.0, 50.0, 60.0, 60.0): (1, 4),
    }
    assert (classes[:4] != 5).all() and classes[4] == 5
    # No GT: nothing appended, all background.
    assert torch.equal(eboxes.sort(dim=0).values, props.sort(dim=0).values)
    assert (eclasses == 5).all() and (ematched == 0).all()


def test_subsample_counts():
    def labels(num_fg, num_bg, seed=0):
        g = torch.Generator().manual_seed(seed)
        lab = torch.cat([torch.randint(0, 5, (num_fg,), generator=g), torch.full((num_bg,), 5)])
        return lab[torch.randperm(len(lab), generator=g)]

    torch.manual_seed(0)
    for num_fg, num_bg, exp_fg, exp_bg in [
        (300, 1000, 128, 384),
        (10, 1000, 10, 502),
        (5, 20, 5, 20),
        (0, 9, 0, 9),
    ]:
        lab = labels(num_fg, num_bg)
        pos, neg = subsample_labels(lab, 512, 0.25, 5)
        assert (len(pos), len(neg)) == (exp_fg, exp_bg)
        assert (lab[pos] != 5).all() and (lab[neg] == 5).all()
        assert len(torch.cat([pos, neg]).unique()) == exp_fg + exp_bg
    # Many candidates: the stage-0 sample per image is capped at 512 with at most 25 % foreground.
    heads = _tiny_heads()
    gt = _random_boxes(6, 200, 300, seed=4, min_size=20)
    jitter = torch.randn(2000, 4, generator=torch.Generator().manual_seed(5))
    props = gt.repeat(400, 1)[:2000] + jitter * torch.linspace(0.1, 30, 2000)[:, None]
    target = {"boxes": gt, "labels": torch.arange(6) % 5}
    ((boxes, _, classes),) = heads.label_and_sample_proposals([props], [target])
    assert len(boxes) == 512 and (classes != 5).sum() == 128


# --------------------------------------------------------------------------------------------- fed loss


def test_fed_loss_class_set():
    freq = torch.arange(1, 21).float()
    gt = torch.tensor([2, 5, 20, 20, 5])  # background (20) appears
    for seed in range(50):
        torch.manual_seed(seed)
        classes = fed_loss_classes(gt, 6, 20, freq)
        assert len(classes) == 6 and len(classes.unique()) == 6
        assert set(classes[:3].tolist()) == {2, 5, 20}  # bg takes one of the 6 places
        drawn = set(classes[3:].tolist())
        assert not drawn & {2, 5, 20}
    # Enough classes appeared already: no draw.
    assert fed_loss_classes(gt, 3, 20, freq).tolist() == [2, 5, 20]
    # Fewer drawable classes than asked (the official code would raise): all of them.
    assert sorted(fed_loss_classes(torch.tensor([3, 1]), 50, 4, torch.ones(4)).tolist()) == [0, 1, 2, 3]


def test_fed_loss_sampling_follows_image_count_sqrt():
    counts = torch.tensor(
        [1600, 961, 625, 400, 289, 196, 144, 100, 81, 64, 49, 36, 25, 16, 16, 9, 9, 4, 1, 1]
    )
    heads = CascadeROIHeads(num_classes=20, fc_dim=8, mask_on=False)
    heads.set_fed_loss_weights(counts)
    freq = heads.box_predictor[0].freq_weight
    assert torch.equal(freq, counts.float().sqrt())
    torch.manual_seed(0)
    gt = torch.tensor([20])  # only background: one class is drawn per call
    n = 10000
    draws = torch.stack([fed_loss_classes(gt, 2, 20, freq)[1] for _ in range(n)])
    observed = torch.bincount(draws, minlength=20).double()

    def chi2(p):
        expected = n * p / p.sum()
        return float(((observed - expected) ** 2 / expected).sum())

    assert chi2(counts.double().sqrt()) < 43.82  # chi-square, 19 dof, p = 0.001
    assert chi2(counts.double()) > 1000  # proportional to the counts themselves would be rejected
    assert chi2(torch.ones(20, dtype=torch.float64)) > 1000
    with pytest.raises(ValueError, match=r"\(20,\)"):
        heads.set_fed_loss_weights(counts[:19])


# ------------------------------------------------------------------------------------------------ losses


def _naive_bce(x: float, t: float) -> float:
    return max(x, 0.0) - x * t + math.log1p(math.exp(-abs(x)))


def test_sigmoid_ce_loss_vs_naive_loop():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(9, 7, generator=g) * 3
    gt = torch.tensor([0, 6, 6, 3, 5, 6, 1, 3, 6])
    mask = torch.tensor([1.0, 0, 1, 1, 0, 1])
    rows = torch.tensor([1, 0, 0, 1, 1, 0, 0, 1, 0], dtype=torch.bool)
    for m in (None, mask):
        for r in (None, rows):
            ref = 0.0
            for i in range(9):
                for c in range(6):
                    if (m is None or m[c] > 0) and (r is None or r[i]):
                        ref += _naive_bce(float(logits[i, c]), float(gt[i] == c))
            torch.testing.assert_close(
                sigmoid_ce_loss(logits, gt, m, r), torch.tensor(ref / 9), rtol=1e-6, atol=0
            )
    assert sigmoid_ce_loss(torch.zeros(0, 7, requires_grad=True), torch.zeros(0, dtype=torch.int64)) == 0


def test_box_reg_loss_both_normalisations():
    g = torch.Generator().manual_seed(0)
    props = _random_boxes(6, 100, 100, seed=1, min_size=10)
    gts = props + torch.randn(6, 4, generator=g)
    deltas = torch.randn(6, 4, generator=g)
    classes = torch.tensor([1, 3, 3, 0, 3, 2])  # 3 = background
    weights = (20.0, 20.0, 10.0, 10.0)
    ref = 0.0
    for i in (0, 3, 5):
        (x1, y1, x2, y2), (u1, v1, u2, v2) = props[i].tolist(), gts[i].tolist()
        w, h, gw, gh = x2 - x1, y2 - y1, u2 - u1, v2 - v1
        target = [
            20 * ((u1 + gw / 2) - (x1 + w / 2)) / w,
            20 * ((v1 + gh / 2) - (y1 + h / 2)) / h,
            10 * math.log(gw / w),
            10 * math.log(gh / h),
        ]
        ref += sum(abs(float(d) - t) for d, t in zip(deltas[i], target, strict=True))
    box2box = Box2BoxTransform(weights)
    fg = box_reg_loss(deltas, props, gts, classes, box2box=box2box, num_classes=3, norm="foreground")
    sampled = box_reg_loss(deltas, props, gts, classes, box2box=box2box, num_classes=3, norm="sampled")
    torch.testing.assert_close(fg, torch.tensor(ref / 12), rtol=1e-5, atol=0)
    torch.testing.assert_close(sampled, torch.tensor(ref / 6), rtol=1e-5, atol=0)
    d = deltas.clone().requires_grad_()
    none = box_reg_loss(d, props, gts, torch.full((6,), 3), box2box=box2box, num_classes=3)
    none.backward()
    assert none == 0 and torch.equal(d.grad, torch.zeros(6, 4))


def _slow_crop_and_resize(mask: torch.Tensor, box: torch.Tensor, size: int) -> torch.Tensor:
    """ROIAlign (aligned=True, adaptive sampling) of one bitmask, one sample at a time, in float64."""
    height, width = mask.shape
    m = mask.double()
    x1, y1, x2, y2 = (float(v) - 0.5 for v in box)
    bin_w, bin_h = (x2 - x1) / size, (y2 - y1) / size
    grid_w, grid_h = max(math.ceil((x2 - x1) / size), 1), max(math.ceil((y2 - y1) / size), 1)

    def bilinear(y: float, x: float) -> float:
        if y < -1 or y > height or x < -1 or x > width:
            return 0.0
        y, x = max(y, 0.0), max(x, 0.0)
        y0, x0 = int(y), int(x)
        y1_, x1_ = min(y0 + 1, height - 1), min(x0 + 1, width - 1)
        if y0 >= height - 1:
            y0 = y1_ = height - 1
            y = float(y0)
        if x0 >= width - 1:
            x0 = x1_ = width - 1
            x = float(x0)
        ly, lx = y - y0, x - x0
        return float(
            (1 - ly) * (1 - lx) * m[y0, x0]
            + (1 - ly) * lx * m[y0, x1_]
            + ly * (1 - lx) * m[y1_, x0]
            + ly * lx * m[y1_, x1_]
        )

    out = torch.zeros(size, size, dtype=torch.float64)
    for py in range(size):
        for px in range(size):
            acc = 0.0
            for iy in range(grid_h):
                for ix in range(grid_w):
                    y = y1 + py * bin_h + (iy + 0.5) * bin_h / grid_h
                    x = x1 + px * bin_w + (ix + 0.5) * bin_w / grid_w
                    acc += bilinear(y, x)
            out[py, px] = acc / (grid_h * grid_w)
    return out


def test_mask_targets_vs_slow_crop_and_resize():
    height, width = 40, 50
    ys, xs = torch.meshgrid(torch.arange(height) + 0.5, torch.arange(width) + 0.5, indexing="ij")
    masks = torch.stack(
        [
            ((xs - 20) / 12) ** 2 + ((ys - 18) / 9) ** 2 <= 1,
            (xs > 30.2) & (ys > 5) & (ys < 33),
            torch.zeros(height, width, dtype=torch.bool),
        ]
    )
    boxes = torch.tensor(
        [[7.3, 8.1, 33.6, 28.7], [29.1, 4.4, 49.7, 33.9], [2.2, 1.9, 48.3, 37.1], [31.7, 3.3, 52.9, 41.6]]
    )
    matched = torch.tensor([0, 1, 0, 1])  # GT 2 unused: never converted
    out = mask_targets(masks, matched, boxes, 14)
    assert out.shape == (4, 14, 14) and out.dtype == torch.bool
    for i in range(4):
        ref = _slow_crop_and_resize(masks[matched[i]], boxes[i], 14)
        decided = (ref - 0.5).abs() > 1e-5
        assert torch.equal(out[i][decided], (ref >= 0.5)[decided])
        assert 0 < int(out[i].sum()) < 14 * 14
    # Same as detectron2's crop_and_resize, which materialises one full mask per RoI.
    rois = torch.cat([torch.arange(4.0)[:, None], boxes], dim=1)
    d2 = roi_align(masks[matched].float()[:, None], rois, 14, 1.0, 0, True)[:, 0] >= 0.5
    assert torch.equal(out, d2)
    assert mask_targets(masks, torch.zeros(0, dtype=torch.int64), torch.zeros(0, 4), 14).shape == (0, 14, 14)
    logits = torch.randn(4, 1, 14, 14)
    ref = sum(_naive_bce(float(v), float(t)) for v, t in zip(logits.flatten(), out.flatten(), strict=True))
    torch.testing.assert_close(mask_loss(logits, out), torch.tensor(ref / out.numel()), rtol=1e-5, atol=0)


# ---------------------------------------------------------------------------------------------- modules


def test_init_and_state_dict_names():
    heads = CascadeROIHeads(num_classes=7, in_channels=8, fc_dim=16, mask_conv_dim=8, mask_num_conv=2)
    expected = {"freq_weight", "cls_score.weight", "cls_score.bias", "bbox_pred.weight", "bbox_pred.bias"}
    keys = set(heads.state_dict())
    for k in range(3):
        assert {f"box_head.{k}.fc{i}.{p}" for i in (1, 2) for p in ("weight", "bias")} <= keys
        assert {f"box_predictor.{k}.{name}" for name in expected} <= keys
        predictor = heads.box_predictor[k]
        assert torch.allclose(predictor.cls_score.bias, torch.full((8,), -math.log(99)))
        assert predictor.cls_score.weight.shape == (8, 16) and predictor.bbox_pred.weight.shape == (4, 16)
        assert torch.equal(predictor.bbox_pred.bias, torch.zeros(4))
        assert torch.equal(predictor.freq_weight, torch.ones(7))
    mask_keys = {
        f"mask_head.{n}.{p}"
        for n in ("mask_fcn1", "mask_fcn2", "deconv", "predictor")
        for p in ("weight", "bias")
    }
    assert mask_keys <= keys
    assert len(keys) == 3 * (4 + 5) + len(mask_keys)
    assert heads.mask_head.deconv.weight.shape == (8, 8, 2, 2)
    assert heads.mask_head.predictor.weight.std() < 0.01 and torch.equal(
        heads.mask_head.mask_fcn1.bias, torch.zeros(8)
    )
    with pytest.raises(ValueError, match="box_loss_norm"):
        CascadeROIHeads(num_classes=3, box_loss_norm="mean")


def test_gradient_scale_is_one_third():
    heads = _tiny_heads()
    feats = [f.requires_grad_() for f in _features(1, 8, 640, 800, seed=1)]
    big = torch.tensor([[9.0, 5, 610, 630]])
    boxes = [torch.cat([_random_boxes(12, 640, 800, seed=2, min_size=30), big])]
    assert set(assign_levels(boxes[0]).tolist()) == {0, 1, 2}
    logits, deltas = heads.run_stage(1, feats, boxes)
    (logits.sum() + deltas.square().sum()).backward()
    scaled = [f.grad.clone() for f in feats]
    fc1 = heads.box_head[1].fc1.weight.grad.clone()
    for f in feats:
        f.grad = None
    heads.zero_grad()
    pooled = multilevel_roi_align(feats, boxes, 7, STRIDES)
    logits, deltas = heads.box_predictor[1](heads.box_head[1](pooled))
    (logits.sum() + deltas.square().sum()).backward()
    assert scaled[0].abs().sum() > 0
    for s, f in zip(scaled, feats, strict=True):
        torch.testing.assert_close(s * 3, f.grad, rtol=1e-5, atol=1e-7)
    assert torch.equal(fc1, heads.box_head[1].fc1.weight.grad)  # the parameters' own gradients are unscaled


# --------------------------------------------------------------------------------------------- training


def _train_case():
    gts = [_random_boxes(4, 200, 300, seed=11, min_size=30), _random_boxes(3, 180, 260, seed=12, min_size=30)]
    gts = [clip_boxes(b, s) for b, s in zip(gts, [(200, 300), (180, 260)], strict=True)]
    proposals = []
    for i, gt in enumerate(gts):
        g = torch.Generator().manual_seed(20 + i)
        near = gt.repeat(15, 1) + torch.randn(15 * len(gt), 4, generator=g) * 6
        far = _random_boxes(30, 200, 300, seed=30 + i)
        proposals.append({"boxes": torch.cat([near, far]), "scores": torch.rand(len(near) + 30, generator=g)})
    targets = []
    for gt, (h, w) in zip(gts, [(200, 300), (180, 260)], strict=True):
        ys, xs = torch.meshgrid(torch.arange(h) + 0.5, torch.arange(w) + 0.5, indexing="ij")
        masks = torch.stack([(xs > b[0]) & (xs < b[2]) & (ys > b[1]) & (ys < (b[1] + b[3]) / 2) for b in gt])
        targets.append({"boxes": gt, "labels": torch.arange(len(gt)) % 5, "masks": masks})
    targets[0]["is_pasted"] = torch.tensor([True, False, True, True])
    return _features(2, 8, 224, 320, seed=3), proposals, [(200, 300), (180, 260)], targets


@pytest.mark.parametrize("fed_loss_num_cat", [6, 1])
def test_paste_cls_loss_is_the_cls_loss_of_pasted_rows(fed_loss_num_cat):
    # The fed class set is every class when fed_loss_num_cat = C + 1 (with background rows present), and
    # exactly the classes present in the stage's labels when it is 1 (nothing is drawn).
    heads = _tiny_heads(fed_loss_num_cat=fed_loss_num_cat).train()
    feats, proposals, sizes, targets = _train_case()
    calls = _record_stages(heads)
    torch.manual_seed(0)
    losses = heads(feats, proposals, sizes, targets, paste_cls_loss=True)
    assert [c[0] for c in calls] == [0, 1, 2]
    for k, boxes, logits, _ in calls:
        if k > 0:  # stage k's RoIs = stage k-1's regressed boxes, clipped, empties removed
            _, prev_boxes, _, prev_deltas = calls[k - 1]
            pred = heads.box2box[k - 1].apply_deltas(prev_deltas, torch.cat(prev_boxes))
            pred = [
                clip_boxes(p, s) for p, s in zip(pred.split([len(b) for b in prev_boxes]), sizes, strict=True)
            ]
            assert all(torch.equal(b, p[nonempty(p)]) for b, p in zip(boxes, pred, strict=True))
        labels, pasted = [], []
        for bs, target in zip(boxes, targets, strict=True):
            iou = pairwise_iou(target["boxes"], bs)
            for j in range(len(bs)):
                best = int(iou[:, j].argmax())
                fg = float(iou[best, j]) >= heads.cascade_ious[k]
                labels.append(int(target["labels"][best]) if fg else 5)
                # Image 1 has no "is_pasted": none of its RoIs counts.
                pasted.append(fg and "is_pasted" in target and bool(target["is_pasted"][best]))
        row = len(labels)
        assert 0 < sum(label != 5 for label in labels) < row
        classes = range(5) if fed_loss_num_cat == 6 else sorted(set(labels) - {5})
        assert len(classes) < 5 or fed_loss_num_cat == 6
        loss = [
            sum(_naive_bce(float(logits[i, c]), float(labels[i] == c)) for c in classes) for i in range(row)
        ]
        total = sum(loss)
        pasted_total = sum(v for v, p in zip(loss, pasted, strict=True) if p)
        torch.testing.assert_close(losses[f"loss_cls_stage{k}"], torch.tensor(total / row), rtol=1e-5, atol=0)
        paste = losses[f"loss_cls_paste_stage{k}"]
        torch.testing.assert_close(paste, torch.tensor(pasted_total / row), rtol=1e-5, atol=0)
        assert 0 < paste < losses[f"loss_cls_stage{k}"]
    torch.manual_seed(0)
    plain = heads(feats, proposals, sizes, targets)
    keys = [f"loss_{n}_stage{k}" for n in ("box_reg", "cls") for k in range(3)] + ["loss_mask"]
    assert sorted(plain) == keys
    for key, value in plain.items():
        assert torch.equal(value, losses[key])


def test_training_with_empty_gt_and_no_foreground():
    heads = _tiny_heads().train()
    feats, proposals, sizes, targets = _train_case()
    targets[1] = {
        "boxes": torch.zeros(0, 4),
        "labels": torch.zeros(0, dtype=torch.int64),
        "masks": torch.zeros(0, 180, 260),
    }
    losses = heads(feats, proposals, sizes, targets, paste_cls_loss=True)
    total = sum(losses.values())
    assert torch.isfinite(total) and losses["loss_mask"] > 0
    total.backward()
    assert heads.mask_head.predictor.weight.grad.abs().sum() > 0
    # A batch without any GT: no foreground anywhere, box and mask losses are 0 but keep the graph.
    heads.zero_grad()
    losses = heads([f[1:] for f in feats], proposals[1:], sizes[1:], targets[1:])
    assert losses["loss_mask"] == 0 and all(losses[f"loss_box_reg_stage{k}"] == 0 for k in range(3))
    assert losses["loss_cls_stage0"] > 0
    sum(losses.values()).backward()
    assert torch.equal(heads.box_predictor[0].bbox_pred.weight.grad, torch.zeros(4, 16))


# -------------------------------------------------------------------------------------------- inference


def test_inference_batched_equals_unbatched_and_masks_are_wired():
    heads = _tiny_heads(score_thresh_test=0.0, detections_per_image=40).eval()
    feats, proposals, sizes, _ = _train_case()
    batched = heads(feats, proposals, sizes)
    for i in range(2):
        (single,) = heads([f[i : i + 1] for f in feats], proposals[i : i + 1], sizes[i : i + 1])
        for key in ("boxes", "scores", "labels", "mask_probs"):
            torch.testing.assert_close(batched[i][key], single[key], rtol=1e-5, atol=1e-6)
        out = batched[i]
        assert len(out["boxes"]) == 40 and out["mask_probs"].shape == (40, 28, 28)
        assert (out["scores"][:-1] >= out["scores"][1:]).all()
        assert torch.equal(out["boxes"], clip_boxes(out["boxes"], sizes[i]))
    masks = heads.predict_masks(feats, [o["boxes"] for o in batched])
    assert all(torch.equal(m, o["mask_probs"]) for m, o in zip(masks, batched, strict=True))
    empty = heads(
        [f[:1] for f in feats], [{"boxes": torch.zeros(0, 4), "scores": torch.zeros(0)}], sizes[:1]
    )[0]
    assert empty["boxes"].shape == (0, 4) and empty["labels"].dtype == torch.int64
    assert empty["mask_probs"].shape == (0, 28, 28)


def test_inference_scores_formula():
    """score = sqrt(mean_k sigmoid(stage k logits) · proposal score); NMS off, nothing filtered."""
    heads = _tiny_heads(
        score_thresh_test=-1.0, nms_thresh_test=1.0, detections_per_image=-1, mask_on=False
    ).eval()
    feats, proposals, sizes, _ = _train_case()
    proposals, sizes = proposals[:1], sizes[:1]
    feats = [f[:1] for f in feats]
    (out,) = heads(feats, proposals, sizes)
    boxes, probs = [proposals[0]["boxes"]], []
    for k in range(3):
        logits, deltas = heads.run_stage(k, feats, boxes)
        probs.append(logits.sigmoid())
        boxes = [clip_boxes(heads.box2box[k].apply_deltas(deltas, boxes[0]), sizes[0])]
    scores = ((probs[0] + probs[1] + probs[2]) / 3 * proposals[0]["scores"][:, None]).sqrt()[:, :5]
    assert len(out["scores"]) == scores.numel()
    torch.testing.assert_close(
        out["scores"], scores.flatten().sort(descending=True).values, rtol=1e-6, atol=0
    )


def test_test_num_classes_scores_only_the_first_classes():
    """Truncating the classifier (DiverGen's 1453 -> 1203 classes at evaluation) = dropping the extra columns:
    the detections of the kept classes are those of the full model, minus the extras."""
    full = _tiny_heads(score_thresh_test=0.0, detections_per_image=-1).eval()
    truncated = _tiny_heads(score_thresh_test=0.0, detections_per_image=-1, test_num_classes=3).eval()
    truncated.load_state_dict(full.state_dict())
    feats, proposals, sizes, _ = _train_case()
    for a, b in zip(full(feats, proposals, sizes), truncated(feats, proposals, sizes), strict=True):
        keep = a["labels"] < 3
        assert keep.sum() < len(keep) and len(b["labels"]) == int(keep.sum())
        for key in ("boxes", "scores", "labels", "mask_probs"):
            torch.testing.assert_close(b[key], a[key][keep])
    with pytest.raises(ValueError, match="test_num_classes"):
        _tiny_heads(test_num_classes=6)


# ----------------------------------------------------------------------------------------------- parity


@pytest.fixture(scope="module")
def parity_heads(heads_weights):
    heads = CascadeROIHeads(num_classes=20, fc_dim=128, fed_loss_num_cat=21)
    heads.load_state_dict(strip_prefix(heads_weights, "roi_heads."), strict=True)
    return heads


def _parity_inputs(case):
    feats = [case[f"fpn.p{i}"] for i in (3, 4, 5)]
    proposals = [{"boxes": case["proposals.boxes"], "scores": case["proposals.scores"]}]
    return feats, proposals, [tuple(case["input.image_size_hw"].tolist())]


def test_parity_stages(parity_heads, heads_case):
    feats, _, _ = _parity_inputs(heads_case)
    for k in range(3):
        boxes = heads_case[f"stage{k}.input_boxes"]
        with torch.no_grad():
            logits, deltas = parity_heads.run_stage(k, feats, [boxes])
        assert_close_rel(logits, heads_case[f"stage{k}.cls_logits"], 1e-5, f"stage{k}.cls_logits")
        assert_close_rel(deltas, heads_case[f"stage{k}.box_deltas"], 1e-5, f"stage{k}.box_deltas")
        pred = parity_heads.box2box[k].apply_deltas(deltas, boxes)
        torch.testing.assert_close(pred, heads_case[f"stage{k}.pred_boxes"], rtol=0, atol=1e-3)
        if k < 2:
            torch.testing.assert_close(
                clip_boxes(pred, (303, 431)), heads_case[f"stage{k + 1}.input_boxes"], rtol=0, atol=1e-3
            )


def test_parity_inference(parity_heads, heads_case):
    feats, proposals, sizes = _parity_inputs(heads_case)
    (out,) = parity_heads.eval()(feats, proposals, sizes)
    ref_boxes, ref_labels = heads_case["detections.boxes"], heads_case["detections.classes"]
    assert len(out["boxes"]) == len(ref_boxes) == 300
    assert (out["scores"][:-1] >= out["scores"][1:]).all()
    diff = (ref_boxes[:, None] - out["boxes"][None]).abs().amax(dim=2)
    diff[ref_labels[:, None] != out["labels"][None]] = float("inf")
    best, idx = diff.min(dim=1)  # match by (class, box)
    assert (best <= 1e-3).all() and len(idx.unique()) == 300
    assert_close_rel(out["scores"][idx], heads_case["detections.scores"], 1e-5, "detections.scores")
    probs = out["mask_probs"][idx]
    assert_close_rel(probs, heads_case["detections.mask_probs"][:, 0], 1e-4, "detections.mask_probs")


def test_parity_training_losses(parity_heads, heads_case):
    feats, proposals, sizes = _parity_inputs(heads_case)
    target = {
        "boxes": heads_case["target.gt_boxes"],
        "labels": heads_case["target.gt_classes"],
        "masks": heads_case["target.gt_masks"],
    }
    parity_heads.train()
    calls = _record_stages(parity_heads)
    try:
        torch.manual_seed(0)
        losses = parity_heads(feats, proposals, sizes, [target])
    finally:
        del parity_heads.run_stage
    keys = [f"loss_{n}_stage{k}" for k in range(3) for n in ("cls", "box_reg")] + ["loss_mask"]
    assert sorted(losses) == sorted(keys)
    for key in keys:
        assert_close_rel(losses[key].detach(), heads_case[f"train.{key}"], 1e-5, key)

    def rows(boxes):  # the sampled order is RNG-dependent: compare the RoIs as sorted sets
        boxes = boxes.double()
        key = ((boxes[:, 0] * 1e4 + boxes[:, 1]) * 1e4 + boxes[:, 2]) * 1e4 + boxes[:, 3]
        return boxes[key.argsort()]

    for k in range(3):
        ref = heads_case[f"train.stage{k}.proposal_boxes"]
        torch.testing.assert_close(rows(calls[k][1][0]), rows(ref), rtol=0, atol=1e-3)
