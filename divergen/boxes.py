"""Box operations shared by the proposal stage and the cascade heads.

All boxes are ``(N, 4)`` float tensors in XYXY format, in continuous pixel coordinates of the
(unpadded) input image: x runs over ``[0, W]`` and y over ``[0, H]``, with no "+1" convention
(detectron2's convention, which CenterNet2 inherits).
"""

from __future__ import annotations

import math

import torch
import torchvision
from torch import Tensor

# detectron2's default clamp on dw/dh before exp(): a box can grow at most 1000/16 times per step.
DEFAULT_SCALE_CLAMP = math.log(1000.0 / 16)


def box_area(boxes: Tensor) -> Tensor:
    """``(N, 4)`` XYXY -> ``(N,)`` area (negative widths/heights give negative or zero areas)."""
    return (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])


def pairwise_iou(boxes1: Tensor, boxes2: Tensor) -> Tensor:
    """IoU matrix ``(N, M)`` between two sets of XYXY boxes.

    Pairs that do not intersect get exactly 0, also when a box has zero area (no 0/0), as detectron2's
    ``pairwise_iou``.
    """
    area1, area2 = box_area(boxes1), box_area(boxes2)
    lt = torch.max(boxes1[:, None, :2], boxes2[None, :, :2])
    rb = torch.min(boxes1[:, None, 2:], boxes2[None, :, 2:])
    wh = (rb - lt).clamp(min=0)
    inter = wh[..., 0] * wh[..., 1]
    return torch.where(inter > 0, inter / (area1[:, None] + area2[None, :] - inter), inter.new_zeros(()))


def clip_boxes(boxes: Tensor, image_size: tuple[int, int]) -> Tensor:
    """Clip XYXY boxes to an image of ``(height, width)``: x to ``[0, W]``, y to ``[0, H]``."""
    h, w = image_size
    x1 = boxes[:, 0].clamp(min=0, max=w)
    y1 = boxes[:, 1].clamp(min=0, max=h)
    x2 = boxes[:, 2].clamp(min=0, max=w)
    y2 = boxes[:, 3].clamp(min=0, max=h)
    return torch.stack((x1, y1, x2, y2), dim=-1)


def nonempty(boxes: Tensor, threshold: float = 0.0) -> Tensor:
    """``(N,)`` bool: width and height both strictly greater than ``threshold``."""
    return ((boxes[:, 2] - boxes[:, 0]) > threshold) & ((boxes[:, 3] - boxes[:, 1]) > threshold)


class Box2BoxTransform:
    """The R-CNN box coding of detectron2's ``Box2BoxTransform``, used by every cascade stage.

    deltas = (wx·dx/w, wy·dy/h, ww·log(w'/w), wh·log(h'/h)) between a source box (x, y, w, h) and a
    target box; each cascade stage has its own weights (CenterNet2, Cascade R-CNN §3.2):
    (10, 10, 5, 5), (20, 20, 10, 10), (30, 30, 15, 15).

    Arguments:
        weights: (wx, wy, ww, wh) scaling of the deltas.
        scale_clamp: upper bound on dw/dh before ``exp`` when applying deltas.
    """

    def __init__(self, weights: tuple[float, float, float, float], scale_clamp: float = DEFAULT_SCALE_CLAMP):
        self.weights = tuple(float(w) for w in weights)
        self.scale_clamp = scale_clamp

    def get_deltas(self, src_boxes: Tensor, target_boxes: Tensor) -> Tensor:
        """``(N, 4)`` XYXY source and target boxes -> ``(N, 4)`` deltas (dx, dy, dw, dh)."""
        src_w = src_boxes[:, 2] - src_boxes[:, 0]
        src_h = src_boxes[:, 3] - src_boxes[:, 1]
        src_cx = src_boxes[:, 0] + 0.5 * src_w
        src_cy = src_boxes[:, 1] + 0.5 * src_h
        tgt_w = target_boxes[:, 2] - target_boxes[:, 0]
        tgt_h = target_boxes[:, 3] - target_boxes[:, 1]
        tgt_cx = target_boxes[:, 0] + 0.5 * tgt_w
        tgt_cy = target_boxes[:, 1] + 0.5 * tgt_h
        wx, wy, ww, wh = self.weights
        dx = wx * (tgt_cx - src_cx) / src_w
        dy = wy * (tgt_cy - src_cy) / src_h
        dw = ww * torch.log(tgt_w / src_w)
        dh = wh * torch.log(tgt_h / src_h)
        return torch.stack((dx, dy, dw, dh), dim=1)

    def apply_deltas(self, deltas: Tensor, boxes: Tensor) -> Tensor:
        """``(N, 4)`` deltas applied to ``(N, 4)`` XYXY boxes -> ``(N, 4)`` XYXY boxes (fp32, unclipped)."""
        deltas = deltas.float()
        boxes = boxes.to(deltas.dtype)
        widths = boxes[:, 2] - boxes[:, 0]
        heights = boxes[:, 3] - boxes[:, 1]
        ctr_x = boxes[:, 0] + 0.5 * widths
        ctr_y = boxes[:, 1] + 0.5 * heights
        wx, wy, ww, wh = self.weights
        dx = deltas[:, 0] / wx
        dy = deltas[:, 1] / wy
        dw = (deltas[:, 2] / ww).clamp(max=self.scale_clamp)
        dh = (deltas[:, 3] / wh).clamp(max=self.scale_clamp)
        pred_cx = dx * widths + ctr_x
        pred_cy = dy * heights + ctr_y
        pred_w = torch.exp(dw) * widths
        pred_h = torch.exp(dh) * heights
        return torch.stack(
            (pred_cx - 0.5 * pred_w, pred_cy - 0.5 * pred_h, pred_cx + 0.5 * pred_w, pred_cy + 0.5 * pred_h),
            dim=1,
        )


def batched_nms(boxes: Tensor, scores: Tensor, idxs: Tensor, iou_threshold: float) -> Tensor:
    """Class-wise NMS: indices of the kept ``(N, 4)`` boxes, by descending score (``torchvision.ops.batched_nms``).

    Same result as torchvision. On the CPU above 1000 boxes torchvision loops over the classes and builds an
    N-long mask for each; with LVIS's 1203 classes and up to 256 x 1203 candidates per image that loop was most of
    the inference time. Here the boxes are grouped by class with one stable sort, and each class runs NMS on its
    own slice (one quadratic NMS over all classes, torchvision's other strategy, would be far slower at that size).
    """
    if boxes.device.type != "cpu" or boxes.shape[0] <= 1000:
        return torchvision.ops.batched_nms(boxes, scores, idxs, iou_threshold)
    return nms_per_class_slice(boxes, scores, idxs, iou_threshold)


def nms_per_class_slice(boxes: Tensor, scores: Tensor, idxs: Tensor, iou_threshold: float) -> Tensor:
    """``batched_nms`` as one stable sort by class, then one NMS per class slice (the CPU path above)."""
    order = torch.argsort(idxs, stable=True)
    counts = torch.unique_consecutive(idxs[order], return_counts=True)[1].tolist()
    keep_mask = torch.zeros(len(boxes), dtype=torch.bool, device=boxes.device)
    for inds in order.split(counts):
        keep_mask[inds[torchvision.ops.nms(boxes[inds], scores[inds], iou_threshold)]] = True
    keep = keep_mask.nonzero().squeeze(1)
    return keep[scores[keep].sort(descending=True)[1]]


def batched_nms_topk(boxes: Tensor, scores: Tensor, idxs: Tensor, iou_threshold: float, topk: int) -> Tensor:
    """``batched_nms(boxes, scores, idxs, iou_threshold)[:topk]``, computed on the best-scored candidates only.

    Greedy NMS keeps a box unless a better-scored kept box of its class overlaps it, so whether a box is kept
    depends only on the boxes that score at least as high. NMS over the ``m`` best-scored candidates (never
    splitting equal scores) therefore keeps exactly the full run's kept boxes among them, and if ``topk`` of them
    survive they are the full run's first ``topk``; otherwise ``m`` grows 4× and NMS runs again. At inference the
    cascade scores 256 RoIs × 1203 LVIS classes and every pair above 1e-4 enters NMS (300k at random init): the
    full NMS is then 0.25-0.5 s per image on a GPU and most of the time on a CPU (benchmarks/nms.py), while the
    300 detections kept come from the first few thousand.

    Arguments:
        boxes: ``(N, 4)`` XYXY; scores: ``(N,)``; idxs: ``(N,)`` class of each box.
        iou_threshold: suppress same-class boxes with IoU above it.
        topk: detections to return (all when negative).
    """
    n = boxes.shape[0]
    if topk < 0:
        return batched_nms(boxes, scores, idxs, iou_threshold)
    order = scores.argsort(descending=True)
    m = max(4 * topk, 1000)
    while m < n:
        cut = scores[order[m - 1]]
        m = int((scores >= cut).sum())  # every candidate tied with the m-th too
        head = order[:m]
        keep = batched_nms(boxes[head], scores[head], idxs[head], iou_threshold)
        if len(keep) >= topk:
            return head[keep[:topk]]
        m *= 4
    return batched_nms(boxes, scores, idxs, iou_threshold)[:topk]
