"""Box ops: IoU against a hand computation, clipping, and the cascade box coding."""

from __future__ import annotations

import math

import pytest
import torch
import torchvision

from divergen import boxes as boxes_module
from divergen.boxes import (
    DEFAULT_SCALE_CLAMP,
    Box2BoxTransform,
    batched_nms,
    batched_nms_topk,
    box_area,
    clip_boxes,
    nonempty,
    pairwise_iou,
)


def test_pairwise_iou_hand_computed():
    a = torch.tensor([[0.0, 0, 10, 10], [5, 5, 6, 6], [3, 3, 3, 8]])  # last one has zero area
    b = torch.tensor([[5.0, 5, 15, 15], [0, 0, 10, 10]])
    iou = pairwise_iou(a, b)
    assert iou[0, 0] == pytest.approx(25 / (100 + 100 - 25))
    assert iou[0, 1] == 1
    assert iou[1, 0] == pytest.approx(1 / 100) and iou[1, 1] == pytest.approx(1 / 100)
    assert (iou[2] == 0).all()  # no 0/0 for a degenerate box
    assert torch.isfinite(iou).all()


def test_clip_and_nonempty():
    boxes = torch.tensor([[-5.0, -2, 50, 40], [10, 10, 10, 20], [30, 35, 60, 70]])
    clipped = clip_boxes(boxes, (32, 48))  # (height, width)
    torch.testing.assert_close(clipped, torch.tensor([[0.0, 0, 48, 32], [10, 10, 10, 20], [30, 32, 48, 32]]))
    assert nonempty(clipped).tolist() == [True, False, False]
    torch.testing.assert_close(box_area(clipped), torch.tensor([48.0 * 32, 0, 0]))


@pytest.mark.parametrize("weights", [(10, 10, 5, 5), (20, 20, 10, 10), (30, 30, 15, 15)])
def test_box_coding_round_trip(weights):
    g = torch.Generator().manual_seed(0)
    xy = torch.rand(50, 2, generator=g) * 300
    src = torch.cat([xy, xy + 4 + torch.rand(50, 2, generator=g) * 200], dim=1)
    xy = torch.rand(50, 2, generator=g) * 300
    tgt = torch.cat([xy, xy + 4 + torch.rand(50, 2, generator=g) * 200], dim=1)
    coder = Box2BoxTransform(weights)
    deltas = coder.get_deltas(src, tgt)
    torch.testing.assert_close(coder.apply_deltas(deltas, src), tgt, atol=1e-3, rtol=1e-5)


def test_box_coding_hand_computed_and_clamp():
    coder = Box2BoxTransform((10, 10, 5, 5))
    src = torch.tensor([[0.0, 0, 10, 20]])  # centre (5, 10), size 10 x 20
    tgt = torch.tensor([[2.0, 4, 22, 24]])  # centre (12, 14), size 20 x 20
    expected = torch.tensor([[10 * 7 / 10, 10 * 4 / 20, 5 * math.log(2), 5 * math.log(1)]])
    torch.testing.assert_close(coder.get_deltas(src, tgt), expected)
    # dw/dh are clamped at log(1000/16) before exp: a huge delta grows the box at most 62.5x.
    huge = coder.apply_deltas(torch.tensor([[0.0, 0, 1e4, 1e4]]), src)
    w, h = huge[0, 2] - huge[0, 0], huge[0, 3] - huge[0, 1]
    assert w == pytest.approx(10 * math.exp(DEFAULT_SCALE_CLAMP)) and h == pytest.approx(20 * 62.5)


def test_batched_nms_equals_per_class_nms():
    """Grouped per-class NMS == torchvision's per-class loop (what it runs above 1000 CPU boxes)."""
    g = torch.Generator().manual_seed(0)
    n = 3000
    xy = torch.rand(n, 2, generator=g) * 600 - 50
    boxes = torch.cat([xy, xy + 5 + torch.rand(n, 2, generator=g) * 150], dim=1)
    scores = torch.rand(n, generator=g)
    classes = torch.randint(0, 40, (n,), generator=g)
    ours = batched_nms(boxes, scores, classes, 0.5)
    reference = torchvision.ops.boxes._batched_nms_vanilla(boxes, scores, classes, 0.5)
    assert torch.equal(ours, reference)
    assert batched_nms(torch.zeros(0, 4), torch.zeros(0), torch.zeros(0, dtype=torch.int64), 0.5).shape == (
        0,
    )


@pytest.mark.parametrize("topk", [0, 1, 50, 300, -1])
def test_batched_nms_topk_equals_the_full_nms_prefix(topk, monkeypatch):
    """On overlapping LVIS-like candidates (many classes per RoI) where the best-scored ones all belong to one
    crowded class and suppress each other, so that the prefix must grow before 300 survive."""
    g = torch.Generator().manual_seed(1)
    rois = torch.rand(64, 2, generator=g) * 500
    owner = torch.randint(64, (20000,), generator=g)
    boxes = torch.cat([rois[owner], rois[owner] + 40], 1) + torch.randn(20000, 4, generator=g) * 4
    scores = torch.rand(20000, generator=g)
    classes = torch.randint(0, 1203, (20000,), generator=g)
    crowd = torch.arange(20000) < 12000  # most candidates: one class, heavily overlapping
    classes[crowd] = 7
    scores[crowd] += 1.0
    full = batched_nms(boxes, scores, classes, 0.5)
    assert len(full) > 300
    expected = full if topk < 0 else full[:topk]
    sizes = []

    def spy(b, *args):
        sizes.append(len(b))
        return batched_nms(b, *args)

    monkeypatch.setattr(boxes_module, "batched_nms", spy)
    assert torch.equal(batched_nms_topk(boxes, scores, classes, 0.5, topk), expected)
    if topk == 300:
        assert sizes[0] == 1200 and len(sizes) > 1  # the first prefix kept too few: it grew
    few = torch.arange(30)
    assert torch.equal(
        batched_nms_topk(boxes[few], scores[few], classes[few], 0.5, topk),
        batched_nms(boxes[few], scores[few], classes[few], 0.5)[: topk if topk >= 0 else None],
    )
