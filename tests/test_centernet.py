"""divergen/centernet.py: hand-computed cases, slow references, and parity with the official CenterNet2."""

from __future__ import annotations

import math

import pytest
import torch
import torch.distributed as dist

from divergen.centernet import (
    INF,
    CenterNet,
    CenterNetHead,
    assign_fpn_level,
    centernet_losses,
    centernet_targets,
    compute_grids,
    decode_proposals,
    giou_loss_ltrb,
    heatmap_focal_loss,
    positive_indices,
)

from .conftest import assert_close_rel, strip_prefix

STRIDES = (8, 16, 32, 64, 128)
SOI = ((0, 80), (64, 160), (128, 320), (256, 640), (512, 1e7))
LEVELS = ("p3", "p4", "p5", "p6", "p7")


def _shapes(height: int, width: int, strides=STRIDES) -> list[tuple[int, int]]:
    """Feature sizes of a padded (height, width) image (the FPN rounds each level up)."""
    return [(math.ceil(height / s), math.ceil(width / s)) for s in strides]


def _targets(boxes: list[list[float]], height: int = 128, width: int = 128, **kwargs):
    kwargs.setdefault("strides", STRIDES)
    kwargs.setdefault("sizes_of_interest", SOI)
    shapes = _shapes(height, width, kwargs["strides"])
    return centernet_targets([torch.tensor(boxes, dtype=torch.float32).view(-1, 4)], shapes, **kwargs)


def _flat_index(shapes, level: int, x: int, y: int, image: int = 0, num_images: int = 1) -> int:
    """Level-first flat index of cell (x, y) of ``level`` (level, image, row-major)."""
    base = sum(num_images * h * w for h, w in shapes[:level])
    h, w = shapes[level]
    return base + image * h * w + y * w + x


# ------------------------------------------------------------------------------------------------------------
# Head
# ------------------------------------------------------------------------------------------------------------


def test_head_state_dict_keys_and_init():
    torch.manual_seed(0)
    head = CenterNetHead()
    expected = {f"bbox_tower.{i}.{p}" for i in (0, 1, 3, 4, 6, 7, 9, 10) for p in ("weight", "bias")}
    expected |= {f"{m}.{p}" for m in ("bbox_pred", "agn_hm") for p in ("weight", "bias")}
    expected |= {f"scales.{i}.scale" for i in range(5)}
    state = head.state_dict()
    assert set(state) == expected
    assert state["bbox_tower.0.weight"].shape == (256, 256, 3, 3)
    assert isinstance(head.bbox_tower[1], torch.nn.GroupNorm) and head.bbox_tower[1].num_groups == 32
    assert state["agn_hm.weight"].shape == (1, 256, 3, 3) and state["bbox_pred.weight"].shape == (
        4,
        256,
        3,
        3,
    )
    assert state["scales.3.scale"].shape == (1,) and state["scales.3.scale"].item() == 1.0
    assert torch.allclose(state["agn_hm.bias"], torch.tensor([-math.log(99.0)]))
    assert torch.equal(state["bbox_pred.bias"], torch.full((4,), 8.0))
    assert torch.equal(state["bbox_tower.9.bias"], torch.zeros(256))
    for key in ("bbox_tower.0.weight", "bbox_tower.9.weight", "bbox_pred.weight", "agn_hm.weight"):
        assert abs(state[key].std().item() - 0.01) < 0.002, key
    with pytest.raises(ValueError, match="multiple of 32"):
        CenterNetHead(in_channels=48)


def test_head_forward_applies_per_level_scale_and_relu():
    torch.manual_seed(0)
    head = CenterNetHead(in_channels=32, num_convs=2, num_levels=2)
    with torch.no_grad():
        head.bbox_pred.bias.copy_(torch.tensor([-0.5, 0.5, 1.0, 2.0]))
        head.bbox_pred.weight.normal_(std=0.5)
        head.scales[0].scale.fill_(2.0)
        head.scales[1].scale.fill_(-1.0)
    features = [torch.randn(2, 32, 6, 5), torch.randn(2, 32, 3, 3)]
    agn, reg = head(features)
    assert [tuple(a.shape) for a in agn] == [(2, 1, 6, 5), (2, 1, 3, 3)]
    assert [tuple(r.shape) for r in reg] == [(2, 4, 6, 5), (2, 4, 3, 3)]
    for level, scale in enumerate((2.0, -1.0)):
        tower = head.bbox_tower(features[level])
        torch.testing.assert_close(agn[level], head.agn_hm(tower))
        torch.testing.assert_close(reg[level], (scale * head.bbox_pred(tower)).clamp(min=0))
        assert (reg[level] == 0).any() and (reg[level] > 0).any()
    with pytest.raises(ValueError, match="expected 2 feature levels"):
        head(features[:1])


# ------------------------------------------------------------------------------------------------------------
# Targets: hand cases
# ------------------------------------------------------------------------------------------------------------


def test_compute_grids_by_hand():
    grids = compute_grids([(2, 3), (1, 2)], (8, 16))
    assert grids[0].dtype == torch.float32
    assert grids[0].tolist() == [[4, 4], [12, 4], [20, 4], [4, 12], [12, 12], [20, 12]]
    assert grids[1].tolist() == [[8, 8], [24, 8]]


def test_assign_fpn_level_by_half_diagonal():
    # 3-4-5 boxes: half-diagonals 50, 70, 150, 200 px.
    boxes = torch.tensor(
        [[0, 0, 60, 80], [10, 10, 94, 122], [0, 0, 180, 240], [5, 5, 245, 325]], dtype=torch.float32
    )
    got = assign_fpn_level(boxes, SOI)
    expected = [
        [True, False, False, False, False],  # 50: p3 only
        [True, True, False, False, False],  # 70: overlapping SOI [0, 80] and [64, 160]
        [False, True, True, False, False],  # 150: [64, 160] and [128, 320]
        [False, False, True, False, False],  # 200
    ]
    assert got.tolist() == expected


def test_positive_indices_two_images_by_hand():
    shapes, strides, soi = [(4, 4), (2, 2)], (8, 16), ((0, 12), (10, 1e7))
    # Both boxes 16x16 (half-diagonal 11.3): positive on both levels.
    boxes = [torch.tensor([[0.0, 0, 16, 16]]), torch.tensor([[16.0, 8, 32, 24]])]
    got = positive_indices(boxes, shapes, strides, soi)
    # Level 0 holds 2 x 16 locations, so level 1 starts at 32; image 1 is offset by 16 (level 0), 4 (level 1).
    # Image 0: centre (8, 8) -> cell (1, 1) on level 0, (0, 0) on level 1.
    # Image 1: centre (24, 16) -> cell (3, 2) on level 0, (1, 1) on level 1.
    assert got.tolist() == [0 + 1 * 4 + 1, 32 + 0, 16 + 2 * 4 + 3, 32 + 4 + 1 * 2 + 1]
    assert positive_indices([torch.zeros(0, 4), torch.zeros(0, 4)], shapes, strides, soi).numel() == 0


def test_heatmap_values_by_hand():
    shapes = _shapes(64, 64, (8, 16))
    kwargs = dict(strides=(8, 16), sizes_of_interest=((0, 80), (64, 1e7)))
    # Box (10, 10, 30, 50): area 800, radius2 = 2 * 800 / 81 (above the floor); centre (20, 30).
    _, _, hm = _targets([[10, 10, 30, 50]], 64, 64, **kwargs)
    r2 = 2 * 800 / 81
    assert hm[_flat_index(shapes, 0, 2, 3)].item() == 1.0  # grid (20, 28) is the centre cell: dist2 -> 0
    assert hm[_flat_index(shapes, 0, 3, 3)].item() == pytest.approx(math.exp(-(8**2 + 2**2) / r2), rel=1e-6)
    assert hm[_flat_index(shapes, 0, 1, 4)].item() == pytest.approx(math.exp(-(8**2 + 6**2) / r2), rel=1e-6)
    # Level 1 (stride 16): the centre cell (24, 24) is 1 although its distance is sqrt(52) px, and the box is
    # not assigned to that level (half-diagonal 22.4): the heat map is not level-restricted.
    assert hm[_flat_index(shapes, 1, 1, 1)].item() == 1.0
    assert math.exp(-52 / r2) < 0.1
    # (8, 40) on level 1: exp(-244 / r2) = 4e-6 < 1e-4 is zeroed.
    assert hm[_flat_index(shapes, 1, 0, 2)].item() == 0.0

    # Small box (40, 40, 46, 46): 2 * 36 / 81 < 16, so radius2 = MIN_RADIUS^2 = 16; centre (43, 43).
    _, _, hm_small = _targets([[40, 40, 46, 46]], 64, 64, **kwargs)
    assert hm_small[_flat_index(shapes, 0, 5, 5)].item() == 1.0  # (44, 44)
    assert hm_small[_flat_index(shapes, 0, 6, 5)].item() == pytest.approx(math.exp(-(81 + 1) / 16), rel=1e-6)
    assert hm_small[_flat_index(shapes, 0, 4, 5)].item() == pytest.approx(math.exp(-(49 + 1) / 16), rel=1e-6)

    # Two boxes: exp(-min_n d_n) = max_n exp(-d_n) wherever neither is cut at 1e-4.
    _, _, hm_both = _targets([[10, 10, 30, 50], [40, 40, 46, 46]], 64, 64, **kwargs)
    torch.testing.assert_close(hm_both, torch.maximum(hm, hm_small), rtol=0, atol=0)


def test_regression_cells_single_box():
    shapes = _shapes(128, 128)
    # 64x64 box, half-diagonal 45 -> p3 only; centre (52, 52) = centre of cell (6, 6).
    _, reg, _ = _targets([[20, 20, 84, 84]])
    valid = (reg.max(dim=1).values >= 0).nonzero().squeeze(1)
    expected_cells = {_flat_index(shapes, 0, x, y) for x in (5, 6, 7) for y in (5, 6, 7)}
    assert set(valid.tolist()) == expected_cells
    # Cell (5, 5) = grid (44, 44): ltrb (24, 24, 40, 40) px = (3, 3, 5, 5) strides.
    assert reg[_flat_index(shapes, 0, 5, 5)].tolist() == [3.0, 3.0, 5.0, 5.0]
    assert reg[_flat_index(shapes, 0, 7, 6)].tolist() == [5.0, 4.0, 3.0, 4.0]
    # Invalid rows hold -INF / stride.
    assert reg[_flat_index(shapes, 0, 0, 0)].tolist() == [-INF / 8] * 4
    assert reg[_flat_index(shapes, 1, 3, 3)].tolist() == [-INF / 16] * 4

    # Thin box x in (50, 56): of the 3x3 cells, only the column x = 52 lies strictly inside.
    _, reg_thin, _ = _targets([[50, 50, 56, 100]])
    valid_thin = (reg_thin.max(dim=1).values >= 0).nonzero().squeeze(1)
    # Centre (53, 75) -> cell (6, 9): rows 8, 9, 10 of column 6.
    assert set(valid_thin.tolist()) == {_flat_index(shapes, 0, 6, y) for y in (8, 9, 10)}

    # A box whose half-diagonal (~99) sits in [64, 160] only regresses at p4, in stride-16 units.
    _, reg_p4, _ = _targets([[10, 10, 150, 150]])
    valid_p4 = (reg_p4.max(dim=1).values >= 0).nonzero().squeeze(1)
    assert len(valid_p4) == 9 and all(
        _flat_index(shapes, 1, 0, 0) <= i < _flat_index(shapes, 2, 0, 0) for i in valid_p4
    )
    # Centre (80, 80) -> cell (5, 5) at stride 16 = grid (88, 88): ltrb (78, 78, 62, 62) / 16.
    assert reg_p4[_flat_index(shapes, 1, 5, 5)].tolist() == [78 / 16, 78 / 16, 62 / 16, 62 / 16]


def test_regression_smallest_weighted_distance_wins():
    shapes = _shapes(128, 128)
    # A: centre (52, 52), radius2 = 2 * 4096 / 81; B: centre (56, 56) -> cell (7, 7) = grid (60, 60),
    # radius2 = 2 * 1024 / 81. Their 3x3 regions overlap on the 4 cells {52, 60}^2.
    a, b = [20.0, 20, 84, 84], [40.0, 40, 72, 72]
    _, reg, _ = _targets([a, b])
    valid = set((reg.max(dim=1).values >= 0).nonzero().squeeze(1).tolist())
    assert len(valid) == 9 + 9 - 4

    def ltrb(box, gx, gy):
        return [(gx - box[0]) / 8, (gy - box[1]) / 8, (box[2] - gx) / 8, (box[3] - gy) / 8]

    # (52, 52): A is its peak (0) vs B 32 / 25.3 -> A.   (60, 60): A 128 / 101 vs B peak (0) -> B.
    # (52, 60): A 64 / 101 = 0.63 vs B 32 / 25.3 = 1.27 -> A.
    assert reg[_flat_index(shapes, 0, 6, 6)].tolist() == ltrb(a, 52, 52)
    assert reg[_flat_index(shapes, 0, 7, 7)].tolist() == ltrb(b, 60, 60)
    assert reg[_flat_index(shapes, 0, 6, 7)].tolist() == ltrb(a, 52, 60)
    assert reg[_flat_index(shapes, 0, 8, 8)].tolist() == ltrb(b, 68, 68)  # only B's
    # The same with the GT order swapped.
    _, reg_swapped, _ = _targets([b, a])
    assert torch.equal(reg_swapped, reg)


# ------------------------------------------------------------------------------------------------------------
# Targets: against a slow per-location reference written from centernet2.md §2.2
# ------------------------------------------------------------------------------------------------------------


def _slow_targets(gt_boxes, shapes, strides, soi, hm_min_overlap=0.8, min_radius=4.0):
    delta = (1 - hm_min_overlap) / (1 + hm_min_overlap)
    regs, hms, pos = [], [], []
    base = 0
    for level, ((h, w), s) in enumerate(zip(shapes, strides, strict=True)):
        for image, boxes in enumerate(gt_boxes):
            boxes = boxes.tolist()
            for y in range(h):
                for x in range(w):
                    gx, gy = x * s + s // 2, y * s + s // 2
                    best, best_dist, hm = None, None, 0.0
                    for x0, y0, x1, y1 in boxes:
                        cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
                        cell_x, cell_y = math.floor(cx / s), math.floor(cy / s)
                        d2 = 0.0 if (cell_x, cell_y) == (x, y) else (gx - cx) ** 2 + (gy - cy) ** 2
                        wd = d2 / max(delta**2 * 2 * (x1 - x0) * (y1 - y0), min_radius**2)
                        hm = max(hm, math.exp(-wd))
                        ltrb = (gx - x0, gy - y0, x1 - gx, y1 - gy)
                        half_diag = math.hypot(x1 - x0, y1 - y0) / 2
                        ok = min(ltrb) > 0 and abs(x - cell_x) <= 1 and abs(y - cell_y) <= 1
                        ok = ok and soi[level][0] <= half_diag <= soi[level][1]
                        if ok and (best_dist is None or wd < best_dist):
                            best, best_dist = [v / s for v in ltrb], wd
                    regs.append(best)
                    hms.append(hm if hm >= 1e-4 else 0.0)
            for x0, y0, x1, y1 in boxes:
                if soi[level][0] <= math.hypot(x1 - x0, y1 - y0) / 2 <= soi[level][1]:
                    cell_x, cell_y = math.floor((x0 + x1) / 2 / s), math.floor((y0 + y1) / 2 / s)
                    pos.append(base + image * h * w + cell_y * w + cell_x)
        base += len(gt_boxes) * h * w
    return pos, regs, hms


def _random_boxes(generator, n, height, width, min_size=4.0):
    x0 = torch.rand(n, generator=generator) * (width - min_size)
    y0 = torch.rand(n, generator=generator) * (height - min_size)
    w = min_size + torch.rand(n, generator=generator) * (width - x0 - min_size)
    h = min_size + torch.rand(n, generator=generator) * (height - y0 - min_size)
    return torch.stack((x0, y0, x0 + w, y0 + h), dim=1)


def test_targets_match_slow_reference_batch_of_three():
    gen = torch.Generator().manual_seed(7)
    height, width = 96, 128
    soi = ((0, 20), (16, 40), (32, 80), (64, 160), (128, 1e7))
    boxes = [_random_boxes(gen, 6, height, width), torch.zeros(0, 4), _random_boxes(gen, 3, height, width)]
    # Two almost identical neighbours to exercise the "smallest weighted distance" choice.
    boxes[0][1] = boxes[0][0] + torch.tensor([1.0, 1.0, 3.0, 2.0])
    shapes = _shapes(height, width)
    pos, reg, hm = centernet_targets(boxes, shapes, strides=STRIDES, sizes_of_interest=soi)
    ref_pos, ref_reg, ref_hm = _slow_targets(boxes, shapes, STRIDES, soi)

    assert reg.shape == (len(ref_reg), 4) and hm.shape == (len(ref_hm),)
    assert sorted(pos.tolist()) == sorted(ref_pos) and len(pos) == len(ref_pos)
    valid = reg.max(dim=1).values >= 0
    assert valid.tolist() == [r is not None for r in ref_reg]
    assert valid.sum() > 20
    torch.testing.assert_close(
        reg[valid], torch.tensor([r for r in ref_reg if r is not None]), rtol=0, atol=1e-5
    )
    torch.testing.assert_close(hm, torch.tensor(ref_hm), rtol=0, atol=1e-6)
    # The heat map is 1 at every GT's centre cell on every level, assigned there or not.
    for image, image_boxes in enumerate(boxes):
        for x0, y0, x1, y1 in image_boxes.tolist():
            for level, s in enumerate(STRIDES):
                cell_x, cell_y = int((x0 + x1) / 2 / s), int((y0 + y1) / 2 / s)
                assert hm[_flat_index(shapes, level, cell_x, cell_y, image, num_images=3)] == 1.0


def test_batched_targets_are_level_first_copies():
    gen = torch.Generator().manual_seed(3)
    shapes = _shapes(96, 128)
    boxes = _random_boxes(gen, 5, 96, 128)
    pos1, reg1, hm1 = centernet_targets([boxes], shapes, strides=STRIDES, sizes_of_interest=SOI)
    pos2, reg2, hm2 = centernet_targets(
        [boxes, boxes.clone()], shapes, strides=STRIDES, sizes_of_interest=SOI
    )
    sizes = [h * w for h, w in shapes]
    for level, (r1, r2, h1, h2) in enumerate(
        zip(
            reg1.split(sizes),
            reg2.split([2 * s for s in sizes]),
            hm1.split(sizes),
            hm2.split([2 * s for s in sizes]),
            strict=True,
        )
    ):
        assert torch.equal(r2, torch.cat([r1, r1])), level
        assert torch.equal(h2, torch.cat([h1, h1])), level
    # Image 1's positive at level l is image 0's shifted by that level's location count.
    level_of = torch.bucketize(pos1, torch.tensor(sizes).cumsum(0), right=True)
    bases1 = torch.tensor([0, *sizes]).cumsum(0)[level_of]
    bases2 = 2 * bases1
    expected = torch.cat([pos1 - bases1 + bases2, pos1 - bases1 + bases2 + torch.tensor(sizes)[level_of]])
    assert pos2.tolist() == expected.tolist()


# ------------------------------------------------------------------------------------------------------------
# Losses
# ------------------------------------------------------------------------------------------------------------


def _slow_giou_loss(p, t):
    """1 - GIoU of the boxes (-l, -t, r, b) around a shared anchor, +1-smoothed IoU, in python floats."""
    pb, tb = (-p[0], -p[1], p[2], p[3]), (-t[0], -t[1], t[2], t[3])

    def area(box):
        return (box[2] - box[0]) * (box[3] - box[1])

    inter = (min(pb[2], tb[2]) - max(pb[0], tb[0])) * (min(pb[3], tb[3]) - max(pb[1], tb[1]))
    union = area(pb) + area(tb) - inter
    enclose = (max(pb[2], tb[2]) - min(pb[0], tb[0])) * (max(pb[3], tb[3]) - min(pb[1], tb[1]))
    return 1 - ((inter + 1) / (union + 1) - (enclose - union) / enclose)


def test_giou_loss_ltrb_vs_slow_reference():
    # (1,1,1,1) inside (2,2,2,2): I = 4, U = 16, C = 16 -> 1 - 5/17.
    assert giou_loss_ltrb(torch.ones(1, 4), torch.full((1, 4), 2.0)).item() == pytest.approx(12 / 17)
    same = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    assert giou_loss_ltrb(same, same).item() == pytest.approx(0.0, abs=1e-7)
    gen = torch.Generator().manual_seed(0)
    pred = torch.rand(64, 4, generator=gen) * 6
    target = torch.rand(64, 4, generator=gen) * 6 + 0.1
    pred[:8] = 0  # the ReLU can output zeros
    got = giou_loss_ltrb(pred, target)
    expected = torch.tensor(
        [_slow_giou_loss(p, t) for p, t in zip(pred.tolist(), target.tolist(), strict=True)]
    )
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    assert (got > 0).all() and (got < 2).all()


def test_heatmap_focal_loss_vs_naive_loop():
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(300, generator=gen) * 3
    logits[:4] = torch.tensor([30.0, -30.0, 2.0, 1.5])  # both clamps, and around IGNORE_HIGH_FP = 0.85
    heatmap = torch.rand(300, generator=gen) * (torch.rand(300, generator=gen) < 0.3)
    pos_inds = torch.tensor([0, 1, 5, 17, 42])
    heatmap[pos_inds] = 1.0
    pos, neg = heatmap_focal_loss(logits, heatmap, pos_inds, alpha=0.25, beta=4.0, gamma=2.0)

    ref_pos, ref_neg = 0.0, 0.0
    for i, (z, y) in enumerate(zip(logits.tolist(), heatmap.tolist(), strict=True)):
        p = min(max(1 / (1 + math.exp(-z)), 1e-4), 1 - 1e-4)
        if i in pos_inds.tolist():
            ref_pos += -math.log(p) * (1 - p) ** 2
        if p < 0.85:
            ref_neg += -math.log(1 - p) * p**2 * (1 - y) ** 4
    assert pos.item() == pytest.approx(0.25 * ref_pos, rel=1e-5)
    assert neg.item() == pytest.approx(0.75 * ref_neg, rel=1e-5)
    # Without IGNORE_HIGH_FP the confident location (p = 1 - 1e-4) dominates the negative term.
    _, neg_all = heatmap_focal_loss(logits, heatmap, pos_inds, ignore_high_fp=-1.0)
    assert neg_all.item() > neg.item() + 0.75 * -math.log(1e-4) * (1 - 1e-4) ** 2 * (1 - 1.0) ** 4


def test_losses_normalisation_and_distributed_counts(monkeypatch):
    gen = torch.Generator().manual_seed(2)
    logits = torch.randn(50, generator=gen)
    reg_pred = torch.rand(50, 4, generator=gen) * 4
    reg_targets = torch.full((50, 4), -INF / 8)
    reg_targets[:6] = torch.rand(6, 4, generator=gen) * 4 + 0.5
    heatmap = torch.rand(50, generator=gen) * 0.5
    pos_inds = torch.tensor([0, 3, 7])
    pos_sum, neg_sum = heatmap_focal_loss(logits, heatmap, pos_inds)
    giou_sum = giou_loss_ltrb(reg_pred[:6], reg_targets[:6]).sum()

    losses = centernet_losses(logits, reg_pred, pos_inds, reg_targets, heatmap)
    assert set(losses) == {"loss_centernet_agn_pos", "loss_centernet_agn_neg", "loss_centernet_loc"}
    assert losses["loss_centernet_agn_pos"].item() == pytest.approx(0.5 * pos_sum.item() / 3, rel=1e-6)
    assert losses["loss_centernet_agn_neg"].item() == pytest.approx(0.5 * neg_sum.item() / 3, rel=1e-6)
    assert losses["loss_centernet_loc"].item() == pytest.approx(giou_sum.item() / 6, rel=1e-6)

    # Two ranks: the other one has 5 positives and 10 regression rows -> normalisers (3+5)/2 and (6+10)/2.
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda *args, **kwargs: 2)
    other = {"counts": torch.tensor([5.0, 10.0])}
    monkeypatch.setattr(dist, "all_reduce", lambda tensor, *args, **kwargs: tensor.add_(other["counts"]))
    losses = centernet_losses(logits, reg_pred, pos_inds, reg_targets, heatmap)
    assert losses["loss_centernet_agn_pos"].item() == pytest.approx(0.5 * pos_sum.item() / 4, rel=1e-6)
    assert losses["loss_centernet_agn_neg"].item() == pytest.approx(0.5 * neg_sum.item() / 4, rel=1e-6)
    assert losses["loss_centernet_loc"].item() == pytest.approx(giou_sum.item() / 8, rel=1e-6)
    # Averages below 1 are clamped to 1: (0 + 1) / 2 positives.
    other["counts"] = torch.tensor([1.0, 0.0])
    losses = centernet_losses(logits, reg_pred, pos_inds[:0], reg_targets, heatmap)
    assert losses["loss_centernet_agn_neg"].item() == pytest.approx(0.5 * neg_sum.item(), rel=1e-6)
    assert losses["loss_centernet_agn_pos"].item() == 0.0


def _small_model(**kwargs) -> CenterNet:
    torch.manual_seed(0)
    kwargs = {"in_channels": 64, "num_convs": 2, **kwargs}
    return CenterNet(**kwargs)


def _features(batch: int, height: int, width: int, channels: int = 64, seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, channels, h, w, generator=gen) for h, w in _shapes(height, width)]


def test_empty_targets_give_finite_losses():
    model = _small_model().train()
    features = _features(2, 64, 96)
    _, losses = model([f[:1] for f in features], [{"boxes": torch.zeros(0, 4)}])
    assert all(torch.isfinite(v) for v in losses.values())
    assert losses["loss_centernet_agn_pos"].item() == 0.0 and losses["loss_centernet_loc"].item() == 0.0
    assert losses["loss_centernet_agn_neg"].item() > 0
    sum(losses.values()).backward()

    box = torch.tensor([[10.0, 12.0, 50.0, 40.0]])
    _, losses2 = model(features, [{"boxes": torch.zeros(0, 4)}, {"boxes": box}])
    assert all(torch.isfinite(v) and v.dtype == torch.float32 for v in losses2.values())
    assert all(v.item() > 0 for v in losses2.values())


def test_batch_of_identical_images_equals_single_image():
    model = _small_model().train()
    features = _features(1, 96, 128)
    boxes = torch.tensor([[10.0, 12.0, 50.0, 40.0], [60.0, 20.0, 120.0, 90.0], [5.0, 50.0, 20.0, 70.0]])
    _, single = model(features, [{"boxes": boxes}])
    _, double = model([torch.cat([f, f]) for f in features], [{"boxes": boxes}, {"boxes": boxes}])
    for key, value in single.items():
        assert double[key].item() == pytest.approx(value.item(), rel=1e-5), key


def test_losses_are_fp32_under_bf16_autocast():
    model = _small_model().train()
    features = [f.bfloat16() for f in _features(1, 64, 64)]
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        proposals, losses = model(features, [{"boxes": torch.tensor([[8.0, 8.0, 40.0, 30.0]])}])
    assert all(v.dtype == torch.float32 and torch.isfinite(v) for v in losses.values())
    assert proposals[0]["boxes"].dtype == torch.float32


def test_gradients_reach_every_parameter_and_proposals_carry_none():
    # Smaller SOI: a 256 px image then has regression targets on all five levels (so every Scale gets a grad).
    model = _small_model(sizes_of_interest=((0, 16), (12, 32), (24, 64), (48, 128), (96, 1e7))).train()
    features = [f.requires_grad_() for f in _features(1, 256, 256)]
    boxes = torch.tensor(
        [
            [100, 100, 114, 114],
            [20, 20, 56, 56],
            [120, 30, 190, 100],
            [10, 100, 150, 240],
            [20, 20, 236, 236],
        ],
        dtype=torch.float32,
    )
    proposals, losses = model(features, [{"boxes": boxes}])
    sum(losses.values()).backward()
    for name, param in model.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name
    for key in ("boxes", "scores"):
        assert not proposals[0][key].requires_grad and proposals[0][key].grad_fn is None


# ------------------------------------------------------------------------------------------------------------
# Decoding
# ------------------------------------------------------------------------------------------------------------


def _decode(logits, reg, strides=(8,), **kwargs):
    shapes = [tuple(x.shape[-2:]) for x in logits]
    return decode_proposals(compute_grids(shapes, strides), logits, reg, strides=strides, **kwargs)


def test_decode_scores_boxes_and_min_size():
    logits = torch.tensor([[[[0.0, 2.0, -1.0], [3.0, -12.0, 1.0]]]])  # sigmoid(-12) = 6e-6 < 1e-4: dropped
    reg = torch.zeros(1, 4, 2, 3)
    reg[0, :, 0, 1] = torch.tensor([1.0, 0.5, 2.0, 1.5])
    (out,) = _decode([logits], [reg])
    assert len(out["scores"]) == 5
    expected_scores = torch.sigmoid(torch.tensor([3.0, 2.0, 1.0, 0.0, -1.0])).sqrt()
    torch.testing.assert_close(out["scores"], expected_scores)  # NMS order: descending
    # Location (1, 0) has centre (12, 4): (12 - 8, 4 - 4, 12 + 16, 4 + 12).
    assert out["boxes"][1].tolist() == [4.0, 0.0, 28.0, 16.0]
    # Zero regression -> a point box, widened to 0.01 px.
    torch.testing.assert_close(out["boxes"][0], torch.tensor([4.0, 12.0, 4.01, 12.01]))
    # Nothing above INFERENCE_TH: no proposals, with the right shapes.
    (empty,) = _decode([torch.full((1, 1, 2, 3), -20.0)], [reg])
    assert empty["boxes"].shape == (0, 4) and empty["scores"].shape == (0,)


def test_decode_nms_pre_and_post_topk():
    # Two locations, one box: centre (4, 4) with ltrb (1, 1, 2, 1) x 8, centre (12, 4) with (2, 1, 1, 1) x 8.
    logits = torch.tensor([[[[1.0, 2.0]]]])
    reg = torch.tensor([[1.0, 2.0], [1.0, 1.0], [2.0, 1.0], [1.0, 1.0]]).view(1, 4, 1, 2)
    (out,) = _decode([logits], [reg])
    assert len(out["boxes"]) == 1 and out["scores"].item() == pytest.approx(
        torch.sigmoid(torch.tensor(2.0)).sqrt().item()
    )

    # 20 disjoint boxes on a 4 x 5 map (zero regression), distinct scores; then two levels in one batch of 2.
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 1, 4, 5, generator=gen)
    reg = torch.zeros(2, 4, 4, 5)
    outs = _decode([logits], [reg], pre_nms_topk=7, post_nms_topk=100)
    for i, out in enumerate(outs):
        expected = torch.sigmoid(logits[i].flatten()).topk(7).values.sqrt()
        torch.testing.assert_close(out["scores"], expected)
    outs = _decode([logits, logits[..., :2, :2]], [reg, reg[..., :2, :2]], strides=(8, 16), post_nms_topk=6)
    assert [len(o["scores"]) for o in outs] == [6, 6]
    for i, out in enumerate(outs):
        all_scores = torch.cat([logits[i].flatten(), logits[i, :, :2, :2].flatten()]).sigmoid().sqrt()
        torch.testing.assert_close(out["scores"], all_scores.topk(6).values)

    # kthvalue semantics: a tie at the post-NMS cut keeps both tied boxes.
    logits = torch.tensor([[[[3.0, 2.0, 1.0, 1.0, 0.0, -1.0]]]])
    (out,) = _decode([logits], [torch.zeros(1, 4, 1, 6)], post_nms_topk=3)
    assert len(out["scores"]) == 4


def test_model_uses_train_or_test_topk():
    model = _small_model(
        pre_nms_topk_train=50, post_nms_topk_train=40, pre_nms_topk_test=10, post_nms_topk_test=7
    )
    features = _features(2, 96, 128)
    model.eval()
    proposals, losses = model(features)
    assert losses == {} and [len(p["boxes"]) for p in proposals] == [7, 7]
    model.train()
    proposals, _ = model(features)
    assert [len(p["boxes"]) for p in proposals] == [40, 40]
    with pytest.raises(ValueError, match="targets for a batch of 2"):
        model(features, [{"boxes": torch.zeros(0, 4)}])


# ------------------------------------------------------------------------------------------------------------
# Parity with the official CenterNet2 (parity README, heads_case)
# ------------------------------------------------------------------------------------------------------------


@pytest.fixture()
def official(heads_case, heads_weights):
    # The fixture's overrides: PRE_NMS_TOPK_TRAIN 1000, POST_NMS_TOPK_TRAIN 256.
    model = CenterNet(pre_nms_topk_train=1000, post_nms_topk_train=256)
    model.load_state_dict(strip_prefix(heads_weights, "proposal_generator."), strict=True)
    features = [heads_case[f"fpn.{name}"] for name in LEVELS]
    return model, features


def _match_proposals(ours, ref_boxes, ref_scores):
    assert ours["boxes"].shape == ref_boxes.shape
    # Match as sets (1-thread reruns can reorder near-ties, min adjacent gap 1.6e-6), one to one.
    dist_px = (ours["boxes"][:, None, :] - ref_boxes[None, :, :]).abs().amax(dim=2)
    nearest = dist_px.argmin(dim=0)
    assert len(set(nearest.tolist())) == len(ref_boxes)
    assert dist_px[nearest, torch.arange(len(ref_boxes))].max() <= 1e-3
    assert_close_rel(ours["scores"][nearest], ref_scores, rel=1e-5, name="proposal scores")
    assert (ours["scores"][1:] <= ours["scores"][:-1]).all()


def test_parity_head_outputs(official, heads_case):
    model, features = official
    with torch.no_grad():
        agn, reg = model.centernet_head(features)
    for level, name in enumerate(LEVELS):
        assert_close_rel(
            agn[level], heads_case[f"centernet.agn_hm_logits.{name}"], rel=1e-5, name=f"agn {name}"
        )
        assert_close_rel(reg[level], heads_case[f"centernet.reg_pred.{name}"], rel=1e-5, name=f"reg {name}")


def test_parity_test_time_proposals(official, heads_case):
    model, features = official
    model.eval()
    with torch.no_grad():
        proposals, losses = model(features)
    assert losses == {} and len(proposals) == 1
    _match_proposals(proposals[0], heads_case["proposals.boxes"], heads_case["proposals.scores"])


def test_parity_train_targets(official, heads_case):
    model, features = official
    shapes = [tuple(f.shape[-2:]) for f in features]
    pos, reg, hm = centernet_targets(
        [heads_case["target.gt_boxes"]],
        shapes,
        strides=model.strides,
        sizes_of_interest=model.sizes_of_interest,
    )
    ref_pos = heads_case["train.centernet.pos_inds"]
    assert sorted(pos.tolist()) == sorted(ref_pos.tolist()) and len(pos) == len(ref_pos) == 9
    ref_reg = heads_case["train.centernet.reg_targets"]
    valid, ref_valid = reg.max(dim=1).values >= 0, ref_reg.max(dim=1).values >= 0
    assert torch.equal(valid, ref_valid) and valid.sum() == 73
    assert (reg[valid] - ref_reg[valid]).abs().max() <= 1e-6
    assert (hm - heads_case["train.centernet.agn_heatmap"]).abs().max() <= 1e-6


def test_parity_train_losses_and_proposals(official, heads_case):
    model, features = official
    model.eval()
    with torch.no_grad():
        test_proposals, _ = model(features)
    model.train()
    proposals, losses = model(features, [{"boxes": heads_case["target.gt_boxes"]}])
    assert set(losses) == {"loss_centernet_agn_pos", "loss_centernet_agn_neg", "loss_centernet_loc"}
    for key, value in losses.items():
        assert_close_rel(value.detach(), heads_case[f"train.{key}"], rel=1e-5, name=key)
    # With the fixture's top-k overrides, train-time proposals equal the test-time ones.
    assert torch.equal(proposals[0]["boxes"], test_proposals[0]["boxes"])
    assert torch.equal(proposals[0]["scores"], test_proposals[0]["scores"])
