"""CenterNet2's second stage: the 3-stage cascade box heads and the class-agnostic mask head.

Detic's ``DeticCascadeROIHeads`` as X-Paste / BSGAL / DiverGen train it (reference/centernet2.md §3).
RoI features are pooled from p3-p5 (ROIAlignV2); each cascade stage has its own FC head and predictor; the
classifier is trained with sigmoid cross-entropy plus the federated loss (Detic §3); regression is
class-agnostic; the final score is the stage-averaged probability times the CenterNet proposal score
(CenterNet2 §4). Boxes are ``(N, 4)`` XYXY in input pixels (the batch is padded bottom/right only).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .boxes import Box2BoxTransform, batched_nms_topk, box_area, clip_boxes, nonempty, pairwise_iou
from .roi_align import roi_align

# ----------------------------------------------------------------------------------------------- pooling


def assign_levels(
    boxes: Tensor, min_level: int = 3, max_level: int = 5, canonical_size: int = 224, canonical_level: int = 4
) -> Tensor:
    """FPN level of each ``(R, 4)`` RoI, 0-based: ``(R,)`` int64 in ``[0, max_level - min_level]`` (FPN eq. 1,
    detectron2 ``assign_boxes_to_levels``; the area of unclipped boxes is taken as it is):
    clamp(floor(canonical_level + log2(sqrt(area) / canonical_size + 1e-8)), min, max) - min_level.
    """
    sizes = torch.sqrt(box_area(boxes))
    levels = torch.floor(canonical_level + torch.log2(sizes / canonical_size + 1e-8))
    return levels.clamp(min=min_level, max=max_level).to(torch.int64) - min_level


def multilevel_roi_align(
    features: list[Tensor], boxes: list[Tensor], output_size: int, strides: Sequence[int]
) -> Tensor:
    """ROIAlignV2 over an FPN (detectron2 ``ROIPooler``): each RoI is pooled from its ``assign_levels`` level.

    ``roi_align`` (torchvision's forward, a fast CPU backward) with ``aligned=True`` (ROIAlignV2), adaptive
    ``sampling_ratio=0`` and ``spatial_scale = 1 / stride``; one call per level for the whole batch.

    Arguments:
        features: per level ``(B, C, H_l, W_l)``, with strides ``strides`` (consecutive powers of two).
        boxes: per image ``(N_i, 4)`` XYXY pixels.
        output_size: S, the side of the pooled grid.

    Returns:
        ``(sum N_i, C, S, S)``, rows in the order of the concatenated boxes.
    """
    if len(features) != len(strides) or len(boxes) != features[0].shape[0]:
        raise ValueError(
            f"multilevel_roi_align: expected one feature map per stride ({len(strides)}, got "
            f"{len(features)}) and one box list per image ({features[0].shape[0]}, got {len(boxes)})"
        )
    min_level = round(math.log2(strides[0]))
    if [2 ** (min_level + i) for i in range(len(strides))] != list(strides):
        raise ValueError(f"strides must be consecutive powers of two, got {tuple(strides)}")
    device, channels = features[0].device, features[0].shape[1]
    batch_idx = [torch.full((len(b), 1), i, dtype=torch.float32, device=device) for i, b in enumerate(boxes)]
    rois = torch.cat([torch.cat(batch_idx), torch.cat([b.float() for b in boxes]).to(device)], dim=1)
    out = features[0].new_zeros((len(rois), channels, output_size, output_size))
    if len(rois) == 0:
        return out
    levels = assign_levels(rois[:, 1:], min_level, min_level + len(strides) - 1)
    for level, (feature, stride) in enumerate(zip(features, strides, strict=True)):
        inds = (levels == level).nonzero()[:, 0]
        if len(inds):
            pooled = roi_align(feature, rois[inds], output_size, 1.0 / stride, 0, True)
            out[inds] = pooled.to(out.dtype)
    return out


class _ScaleGradient(torch.autograd.Function):
    """Identity forward, gradient × ``scale`` backward. Each cascade stage scales its RoI features' gradient
    by 1/num_stages, so the shared FPN gets the stages' average gradient (Cascade R-CNN, detectron2)."""

    @staticmethod
    def forward(ctx, x: Tensor, scale: float) -> Tensor:
        ctx.scale = scale
        return x

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        return grad * ctx.scale, None


# ---------------------------------------------------------------------------------- targets (no_grad)


@torch.no_grad()
def match_proposals(
    proposal_boxes: Tensor, gt_boxes: Tensor, gt_labels: Tensor, iou_threshold: float, num_classes: int
) -> tuple[Tensor, Tensor]:
    """detectron2 ``Matcher([t], [0, 1])`` without low-quality matches, then each RoI's class.

    A RoI is foreground iff its highest IoU with a GT box is ``>= iou_threshold`` (centernet2.md §3).

    Arguments:
        proposal_boxes: ``(K, 4)``; gt_boxes: ``(G, 4)``; gt_labels: ``(G,)`` int64 0-based.

    Returns:
        matched_idxs: ``(K,)`` int64, the highest-IoU GT (0 when G = 0; kept, unused, for background rows).
        gt_classes: ``(K,)`` int64, the matched GT's label, ``num_classes`` (background) where not foreground.
    """
    if len(gt_boxes) == 0:
        zeros = torch.zeros(len(proposal_boxes), dtype=torch.int64, device=proposal_boxes.device)
        return zeros, zeros + num_classes
    matched_vals, matched_idxs = pairwise_iou(gt_boxes, proposal_boxes).max(dim=0)
    gt_classes = gt_labels[matched_idxs].clone()
    gt_classes[matched_vals < iou_threshold] = num_classes
    return matched_idxs, gt_classes


@torch.no_grad()
def subsample_labels(
    gt_classes: Tensor, num_samples: int, positive_fraction: float, bg_label: int
) -> tuple[Tensor, Tensor]:
    """detectron2 ``subsample_labels``: up to ``int(num_samples · positive_fraction)`` foreground rows, the
    rest of ``num_samples`` from the background rows, each taken from a ``torch.randperm`` (global RNG).

    Returns:
        ``(pos_idx, neg_idx)``, int64 indices into ``gt_classes``; the sample is ``cat(pos_idx, neg_idx)``.
    """
    positive = ((gt_classes != -1) & (gt_classes != bg_label)).nonzero()[:, 0]
    negative = (gt_classes == bg_label).nonzero()[:, 0]
    num_pos = min(positive.numel(), int(num_samples * positive_fraction))
    num_neg = min(negative.numel(), num_samples - num_pos)
    perm_pos = torch.randperm(positive.numel(), device=positive.device)[:num_pos]
    perm_neg = torch.randperm(negative.numel(), device=negative.device)[:num_neg]
    return positive[perm_pos], negative[perm_neg]


@torch.no_grad()
def fed_loss_classes(
    gt_classes: Tensor, num_sample_cats: int, num_classes: int, freq_weight: Tensor
) -> Tensor:
    """The class set of the federated loss (Detic §3; CenterNet2 ``get_fed_loss_inds``).

    The classes present in ``gt_classes`` - **including the background index** ``num_classes`` when there
    are background rows, so it takes one of the ``num_sample_cats`` places - plus classes drawn without
    replacement with probability ∝ ``freq_weight`` (image_count^0.5) until the set has ``num_sample_cats``
    members. Where the official code would crash (fewer drawable classes than requested) all are taken.

    Arguments:
        gt_classes: ``(B,)`` int64, ``num_classes`` = background.
        freq_weight: ``(num_classes,)`` sampling weights.

    Returns:
        ``(n,)`` int64 class indices, possibly including ``num_classes``.
    """
    appeared = torch.unique(gt_classes)
    if len(appeared) >= num_sample_cats:
        return appeared
    prob = freq_weight.new_zeros(num_classes + 1).float()
    prob[:num_classes] = freq_weight.float()
    prob[appeared] = 0
    num_more = min(num_sample_cats - len(appeared), int((prob > 0).sum()))
    if num_more == 0:
        return appeared
    return torch.cat([appeared, torch.multinomial(prob, num_more, replacement=False)])


@torch.no_grad()
def mask_targets(gt_masks: Tensor, matched_idxs: Tensor, boxes: Tensor, mask_size: int) -> Tensor:
    """detectron2 ``BitMasks.crop_and_resize``: ROIAlign (aligned, adaptive sampling, scale 1) of each RoI's
    GT bitmask over the RoI box, then ``>= 0.5``. Only the matched GT masks become float; ROIAlign reads them
    through its batch index (= the GT index), so no full-size mask per RoI is materialised.

    Arguments:
        gt_masks: ``(G, H, W)`` bool/uint8 at the unpadded image size.
        matched_idxs: ``(R,)`` int64 into the GT; boxes: ``(R, 4)`` XYXY pixels.

    Returns:
        ``(R, mask_size, mask_size)`` bool.
    """
    if len(boxes) == 0:
        return torch.zeros((0, mask_size, mask_size), dtype=torch.bool, device=boxes.device)
    used, inverse = torch.unique(matched_idxs, return_inverse=True)
    masks = gt_masks[used.to(gt_masks.device)].to(torch.bool).to(torch.float32)[:, None]
    rois = torch.cat([inverse.to(torch.float32)[:, None], boxes.float()], dim=1).to(masks.device)
    return roi_align(masks, rois, mask_size, 1.0, 0, True)[:, 0] >= 0.5


# ------------------------------------------------------------------------------------------------ losses


def sigmoid_ce_loss(
    cls_logits: Tensor, gt_classes: Tensor, class_mask: Tensor | None = None, rows: Tensor | None = None
) -> Tensor:
    """Sigmoid cross-entropy of the classifier (centernet2.md §3 "Cls loss"), summed, / B (all RoIs).

    Target: one-hot of ``gt_classes`` over the C real classes (background rows all zero); the background logit
    is never trained. With the federated loss, ``class_mask`` zeroes the classes outside the sampled set.
    ``rows`` restricts the sum to some RoIs (BSGAL's pasted-RoI loss) while still dividing by all B.

    Arguments:
        cls_logits: ``(B, C + 1)``; gt_classes: ``(B,)`` int64 in ``[0, C]``; class_mask: ``(C,)`` or None;
        rows: ``(B,)`` bool or None.
    """
    b, c = cls_logits.shape[0], cls_logits.shape[1] - 1
    if b == 0:
        return cls_logits.sum() * 0.0
    target = cls_logits.new_zeros(b, c + 1)
    target[torch.arange(b, device=cls_logits.device), gt_classes] = 1
    loss = F.binary_cross_entropy_with_logits(cls_logits[:, :-1], target[:, :c], reduction="none")
    if class_mask is not None:
        loss = loss * class_mask.view(1, c).expand(b, c)
    return (loss if rows is None else loss[rows]).sum() / b


def box_reg_loss(
    box_deltas: Tensor,
    proposal_boxes: Tensor,
    gt_boxes: Tensor,
    gt_classes: Tensor,
    *,
    box2box: Box2BoxTransform,
    num_classes: int,
    norm: str = "foreground",
) -> Tensor:
    """Class-agnostic L1 (smooth-L1, beta 0) between predicted and target deltas of the foreground RoIs.

    Normalisation (centernet2.md §3 "Box loss"): ``"foreground"`` divides by 4·N_fg (X-Paste / BSGAL /
    DiverGen), ``"sampled"`` by the number of RoIs B (detectron2, Detic). 0 without foreground.

    Arguments:
        box_deltas: ``(B, 4)``; proposal_boxes, gt_boxes: ``(B, 4)`` XYXY; gt_classes: ``(B,)``.
    """
    fg = ((gt_classes >= 0) & (gt_classes < num_classes)).nonzero()[:, 0]
    if len(fg) == 0:
        return box_deltas.sum() * 0.0
    with torch.no_grad():
        target = box2box.get_deltas(proposal_boxes[fg], gt_boxes[fg])
    loss = torch.abs(box_deltas[fg] - target).sum()
    return loss / (4 * len(fg)) if norm == "foreground" else loss / len(gt_classes)


def mask_loss(mask_logits: Tensor, targets: Tensor) -> Tensor:
    """Mean BCE-with-logits of ``(R, 1, M, M)`` logits vs ``(R, M, M)`` bool targets; 0 if R = 0."""
    if len(mask_logits) == 0:
        return mask_logits.sum() * 0.0
    return F.binary_cross_entropy_with_logits(mask_logits[:, 0], targets.to(torch.float32), reduction="mean")


# --------------------------------------------------------------------------------------------- inference


def fast_rcnn_inference_single_image(
    boxes: Tensor, scores: Tensor, size: tuple[int, int], score_thresh: float, nms_thresh: float, topk: int
) -> tuple[Tensor, Tensor, Tensor]:
    """detectron2 ``fast_rcnn_inference_single_image`` with class-agnostic boxes.

    Drop non-finite rows and the background column, clip to ``size`` (h, w), keep the (RoI, class) pairs
    scoring > ``score_thresh``, class-wise NMS, then the top ``topk`` (all if negative).

    Arguments:
        boxes: ``(R, 4)`` XYXY; scores: ``(R, C + 1)``.

    Returns:
        boxes ``(K, 4)``, scores ``(K,)``, labels ``(K,)`` int64, by descending score.
    """
    valid = torch.isfinite(boxes).all(dim=1) & torch.isfinite(scores).all(dim=1)
    if not valid.all():
        boxes, scores = boxes[valid], scores[valid]
    scores = scores[:, :-1]
    boxes = clip_boxes(boxes, size)
    filter_mask = scores > score_thresh
    inds = filter_mask.nonzero()  # (roi, class) pairs, row-major
    boxes, scores = boxes[inds[:, 0]], scores[filter_mask]
    keep = batched_nms_topk(boxes.float(), scores, inds[:, 1], nms_thresh, topk)
    return boxes[keep], scores[keep], inds[keep, 1]


# ----------------------------------------------------------------------------------------------- modules


class BoxHead(nn.Module):
    """detectron2 ``FastRCNNConvFCHead`` without convs: flatten, then (fc -> ReLU) × num_fc; c2_xavier init.

    Arguments:
        in_channels: C of the pooled features.
        resolution: side of the pooled grid (7).
        fc_dim: width of every FC layer (1024 officially).
        num_fc: number of FC layers, named ``fc1``, ``fc2``, … (2 officially).
    """

    def __init__(self, *, in_channels: int, resolution: int = 7, fc_dim: int = 1024, num_fc: int = 2):
        super().__init__()
        self.num_fc = num_fc
        dim = in_channels * resolution * resolution
        for i in range(num_fc):
            fc = nn.Linear(dim, fc_dim)
            nn.init.kaiming_uniform_(fc.weight, a=1)  # detectron2 c2_xavier_fill
            nn.init.constant_(fc.bias, 0)
            self.add_module(f"fc{i + 1}", fc)
            dim = fc_dim

    def forward(self, x: Tensor) -> Tensor:
        """``(R, C, S, S)`` -> ``(R, fc_dim)``."""
        x = torch.flatten(x, start_dim=1)
        for i in range(self.num_fc):
            x = F.relu(getattr(self, f"fc{i + 1}")(x))
        return x


class BoxPredictor(nn.Module):
    """A stage's classifier and class-agnostic box regressor (CenterNet2 ``CustomFastRCNNOutputLayers``).

    ``cls_score`` has C + 1 outputs, all biased to the sigmoid prior -log((1 - p) / p) (centernet2.md §3);
    the last (background) one is never trained. The persistent buffer ``freq_weight`` (official key) holds the
    federated loss's class weights image_count^0.5: ones until ``CascadeROIHeads.set_fed_loss_weights``.

    Arguments:
        in_features: width of the box-head output.
        num_classes: C, the number of real classes.
        prior_prob: initial sigmoid probability of every class.
    """

    def __init__(self, *, in_features: int, num_classes: int, prior_prob: float = 0.01):
        super().__init__()
        self.cls_score = nn.Linear(in_features, num_classes + 1)
        self.bbox_pred = nn.Linear(in_features, 4)
        nn.init.normal_(self.cls_score.weight, std=0.01)
        nn.init.constant_(self.cls_score.bias, -math.log((1 - prior_prob) / prior_prob))
        nn.init.normal_(self.bbox_pred.weight, std=0.001)
        nn.init.constant_(self.bbox_pred.bias, 0)
        self.register_buffer("freq_weight", torch.ones(num_classes))

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``(R, D)`` -> cls logits ``(R, C + 1)``, box deltas ``(R, 4)``."""
        return self.cls_score(x), self.bbox_pred(x)


class MaskHead(nn.Module):
    """detectron2 ``MaskRCNNConvUpsampleHead``, class-agnostic (centernet2.md §3 "Mask head"): num_conv ×
    (Conv3×3 + ReLU), ConvTranspose 2×2 s2 + ReLU, Conv1×1 -> 1 channel; msra init, predictor N(0, 0.001).

    Arguments:
        in_channels: C of the pooled features.
        num_conv: number of 3×3 convs, named ``mask_fcn1``, ….
        conv_dim: their width.
    """

    def __init__(self, *, in_channels: int = 256, num_conv: int = 4, conv_dim: int = 256):
        super().__init__()
        self.num_conv = num_conv
        for i in range(num_conv):
            self.add_module(
                f"mask_fcn{i + 1}", nn.Conv2d(in_channels if i == 0 else conv_dim, conv_dim, 3, 1, 1)
            )
        self.deconv = nn.ConvTranspose2d(conv_dim if num_conv else in_channels, conv_dim, 2, stride=2)
        self.predictor = nn.Conv2d(conv_dim, 1, 1)
        for layer in [*self._convs(), self.deconv]:  # detectron2 c2_msra_fill
            nn.init.kaiming_normal_(layer.weight, mode="fan_out", nonlinearity="relu")
            nn.init.constant_(layer.bias, 0)
        nn.init.normal_(self.predictor.weight, std=0.001)
        nn.init.constant_(self.predictor.bias, 0)

    def _convs(self) -> list[nn.Conv2d]:
        return [getattr(self, f"mask_fcn{i + 1}") for i in range(self.num_conv)]

    def forward(self, x: Tensor) -> Tensor:
        """``(R, C, S, S)`` -> logits ``(R, 1, 2S, 2S)``."""
        for conv in self._convs():
            x = F.relu(conv(x))
        return self.predictor(F.relu(self.deconv(x)))


class CascadeROIHeads(nn.Module):
    """Cascade box heads and mask head of CenterNet2 (``DeticCascadeROIHeads``, centernet2.md §3).

    Training: stage 0 takes the proposals plus the GT boxes, matched at IoU 0.6 and subsampled (512 per
    image, ≤ 25 % foreground); stages 1, 2 take the previous stage's boxes (detached, clipped, non-empty),
    re-matched at 0.7 / 0.8, not subsampled. Each stage has a sigmoid-CE + federated classification loss
    and an L1 box loss; the mask head trains on the stage-0 foreground RoIs. Inference: class score
    sqrt(mean_k sigmoid(logit_k) · proposal score) (CenterNet2 §4), the last stage's boxes, class-wise NMS,
    then the mask head on the detections.

    Arguments:
        num_classes: C real classes; background is index C.
        in_channels: FPN width.
        strides: strides of the pooled levels (p3-p5).
        pooler_resolution: side of the box pooler grid (7).
        fc_dim, num_fc: box-head width and depth.
        cascade_ious: foreground IoU of each stage.
        bbox_reg_weights: ``Box2BoxTransform`` weights of each stage.
        batch_size_per_image, positive_fraction: stage-0 RoI sampling.
        use_fed_loss, fed_loss_num_cat, fed_loss_freq_weight: federated loss: size of the class set
            (background included) and exponent of the image counts.
        box_loss_norm: ``"foreground"`` (/ 4·N_fg, X-Paste/BSGAL/DiverGen) or ``"sampled"`` (/ N, Detic).
        mask_on, mask_pooler_resolution, mask_num_conv, mask_conv_dim: the mask head (output 2 × resolution).
        score_thresh_test, nms_thresh_test, detections_per_image: ``fast_rcnn_inference``.
        mult_proposal_score: multiply the stage-averaged probabilities by the proposal score (then sqrt).
        test_num_classes: score only classes ``[0, test_num_classes)`` at test time (0 = all): the official
            DiverGen model, trained on LVIS + 250 ImageNet classes, truncates its classifier to LVIS's before
            evaluation; dropping the columns of a sigmoid classifier is the same thing.
    """

    def __init__(
        self,
        *,
        num_classes: int,
        in_channels: int = 256,
        strides: Sequence[int] = (8, 16, 32),
        pooler_resolution: int = 7,
        fc_dim: int = 1024,
        num_fc: int = 2,
        cascade_ious: Sequence[float] = (0.6, 0.7, 0.8),
        bbox_reg_weights: Sequence[Sequence[float]] = ((10, 10, 5, 5), (20, 20, 10, 10), (30, 30, 15, 15)),
        batch_size_per_image: int = 512,
        positive_fraction: float = 0.25,
        use_fed_loss: bool = True,
        fed_loss_num_cat: int = 50,
        fed_loss_freq_weight: float = 0.5,
        box_loss_norm: str = "foreground",
        mask_on: bool = True,
        mask_pooler_resolution: int = 14,
        mask_num_conv: int = 4,
        mask_conv_dim: int = 256,
        score_thresh_test: float = 0.02,
        nms_thresh_test: float = 0.5,
        detections_per_image: int = 300,
        mult_proposal_score: bool = True,
        test_num_classes: int = 0,
    ):
        super().__init__()
        if len(cascade_ious) != len(bbox_reg_weights):
            raise ValueError(f"{len(cascade_ious)} cascade_ious but {len(bbox_reg_weights)} bbox_reg_weights")
        if box_loss_norm not in ("foreground", "sampled"):
            raise ValueError(f"box_loss_norm must be 'foreground' or 'sampled', got {box_loss_norm!r}")
        self.num_classes = num_classes
        self.strides = tuple(strides)
        self.pooler_resolution = pooler_resolution
        self.num_stages = len(cascade_ious)
        self.cascade_ious = tuple(float(t) for t in cascade_ious)
        self.box2box = [Box2BoxTransform(tuple(w)) for w in bbox_reg_weights]
        self.batch_size_per_image, self.positive_fraction = batch_size_per_image, positive_fraction
        self.use_fed_loss, self.fed_loss_num_cat = use_fed_loss, fed_loss_num_cat
        self.fed_loss_freq_weight = fed_loss_freq_weight
        self.box_loss_norm = box_loss_norm
        self.mask_on, self.mask_pooler_resolution = mask_on, mask_pooler_resolution
        self.score_thresh_test, self.nms_thresh_test = score_thresh_test, nms_thresh_test
        self.detections_per_image = detections_per_image
        self.mult_proposal_score = mult_proposal_score
        if not 0 <= test_num_classes <= num_classes:
            raise ValueError(f"test_num_classes must be in [0, {num_classes}], got {test_num_classes}")
        self.test_num_classes = test_num_classes or num_classes
        self.box_head = nn.ModuleList(
            BoxHead(in_channels=in_channels, resolution=pooler_resolution, fc_dim=fc_dim, num_fc=num_fc)
            for _ in range(self.num_stages)
        )
        self.box_predictor = nn.ModuleList(
            BoxPredictor(in_features=fc_dim, num_classes=num_classes) for _ in range(self.num_stages)
        )
        if mask_on:
            self.mask_head = MaskHead(in_channels=in_channels, num_conv=mask_num_conv, conv_dim=mask_conv_dim)

    @torch.no_grad()
    def set_fed_loss_weights(self, image_counts: Tensor) -> None:
        """Every stage's ``freq_weight`` = ``image_counts ** fed_loss_freq_weight`` (Detic: image_count^0.5).

        Arguments:
            image_counts: ``(num_classes,)`` number of training images of each class.
        """
        if tuple(image_counts.shape) != (self.num_classes,):
            raise ValueError(
                f"image_counts must have shape ({self.num_classes},), got {tuple(image_counts.shape)}"
            )
        weight = image_counts.float() ** self.fed_loss_freq_weight
        for predictor in self.box_predictor:
            predictor.freq_weight.copy_(weight)

    def run_stage(
        self, k: int, features: list[Tensor], boxes_per_image: list[Tensor]
    ) -> tuple[Tensor, Tensor]:
        """Cascade stage ``k`` on given boxes: 7×7 pooling, gradient × 1/num_stages, box head, predictor.

        Returns:
            cls logits ``(R, C + 1)``, box deltas ``(R, 4)``; R = all boxes, in image order.
        """
        x = multilevel_roi_align(features, boxes_per_image, self.pooler_resolution, self.strides)
        x = _ScaleGradient.apply(x, 1.0 / self.num_stages)
        return self.box_predictor[k](self.box_head[k](x))

    def forward(
        self,
        features: list[Tensor],
        proposals: list[dict[str, Tensor]],
        image_sizes: list[tuple[int, int]],
        targets: list[dict[str, Tensor]] | None = None,
        *,
        paste_cls_loss: bool = False,
    ) -> dict[str, Tensor] | list[dict[str, Tensor]]:
        """Losses in training mode with targets, detections otherwise.

        Arguments:
            features: ``[p3, p4, p5]`` of the padded batch, ``(B, C, H_l, W_l)``.
            proposals: per image ``boxes`` ``(K, 4)`` XYXY unclipped and ``scores`` ``(K,)`` (the CenterNet
                proposal score sqrt(sigmoid)).
            image_sizes: per image ``(h, w)`` of the unpadded image.
            targets: per image ``boxes`` ``(N, 4)`` float, ``labels`` ``(N,)`` int64 0-based, ``masks``
                ``(N, h, w)`` bool/uint8 (with ``mask_on``), optional ``is_pasted`` ``(N,)`` bool.
            paste_cls_loss: also return ``loss_cls_paste_stage{k}``: the stage's classification loss summed
                over the foreground RoIs matched to pasted instances, / all RoIs of the stage (BSGAL's
                candidate gradient, reference/bsgal.md §1.2 step 3): a part of ``loss_cls_stage{k}``.

        Returns:
            training: ``loss_cls_stage{k}``, ``loss_box_reg_stage{k}``, ``loss_mask`` (+ the paste terms).
            inference: per image ``boxes`` ``(K, 4)`` clipped, ``scores`` ``(K,)``, ``labels`` ``(K,)`` int64,
            ``mask_probs`` ``(K, M, M)`` (M = 2 × mask_pooler_resolution), by descending score.
        """
        if len(features) != len(self.strides) or not (
            len(proposals) == len(image_sizes) == features[0].shape[0]
        ):
            raise ValueError(
                f"expected {len(self.strides)} feature maps (got {len(features)}) and one proposal set and "
                f"image size per image ({features[0].shape[0]}; got {len(proposals)} and {len(image_sizes)})"
            )
        if self.training and targets is not None:
            if len(targets) != len(proposals):
                raise ValueError(f"{len(targets)} targets for a batch of {len(proposals)} images")
            return self._forward_train(features, proposals, image_sizes, targets, paste_cls_loss)
        return self._forward_inference(features, proposals, image_sizes)

    # ---------------------------------------------------------------------------------------------- training

    @torch.no_grad()
    def label_and_sample_proposals(
        self, proposal_boxes: list[Tensor], targets: list[dict[str, Tensor]]
    ) -> list[tuple[Tensor, Tensor, Tensor]]:
        """Stage-0 RoIs: the proposals with the GT boxes appended, matched at ``cascade_ious[0]``, subsampled.

        Returns:
            per image ``(boxes (R, 4), matched_idxs (R,), gt_classes (R,))``, foreground first.
        """
        out = []
        for boxes, target in zip(proposal_boxes, targets, strict=True):
            boxes = torch.cat([boxes.detach().float(), target["boxes"].float().to(boxes.device)])
            rois = self._match(0, boxes, target)
            pos, neg = subsample_labels(
                rois[2], self.batch_size_per_image, self.positive_fraction, self.num_classes
            )
            keep = torch.cat([pos, neg])
            out.append(tuple(t[keep] for t in rois))
        return out

    def _match(self, k: int, boxes: Tensor, target: dict[str, Tensor]) -> tuple[Tensor, Tensor, Tensor]:
        matched, gt_classes = match_proposals(
            boxes, target["boxes"].float(), target["labels"], self.cascade_ious[k], self.num_classes
        )
        return boxes, matched, gt_classes

    def _forward_train(self, features, proposals, image_sizes, targets, paste_cls_loss) -> dict[str, Tensor]:
        stage0 = self.label_and_sample_proposals([p["boxes"] for p in proposals], targets)
        losses: dict[str, Tensor] = {}
        for k, logits, deltas, rois in self._cascade(features, stage0, image_sizes, targets):
            losses.update(self._stage_losses(k, logits, deltas, rois, targets, paste_cls_loss))
        if self.mask_on:
            losses["loss_mask"] = self._mask_loss(features, stage0, targets)
        return losses

    def reference_cls_loss(
        self, features: list[Tensor], image_sizes: list[tuple[int, int]], targets: list[dict[str, Tensor]]
    ) -> dict[str, Tensor]:
        """BSGAL's reference loss: the cascade's classification losses with the GT boxes as the only RoIs
        (reference/bsgal.md §1.2 step 1: ``ACTIVE_ONLY_GT_TEST``, ``ACTIVE_LOSS='cls'``).

        Stage 0's RoIs are exactly the GT boxes, each labelled with its own class: no proposals, no background
        RoIs, no sampling. Stage k > 0 takes stage k-1's regressed boxes of those RoIs (detached, clipped,
        non-empty) re-matched to the GT at ``cascade_ious[k]``, as in training. Each stage's loss is the sigmoid
        CE over all C classes (no federated class sampling: the official ``no_grad_losses``), summed over the
        RoIs / their number, so it draws no random numbers. An image without GT contributes no RoI (the official
        falls back to proposals and sampling for the whole batch then); with no RoI at all every loss is a zero
        that still backpropagates (into the heads' parameters).

        Arguments:
            features: ``[p3, p4, p5]`` of the padded batch, ``(B, C, H_l, W_l)``.
            image_sizes: per image ``(h, w)`` of the unpadded image.
            targets: per image ``boxes`` ``(N, 4)`` float XYXY (non-empty), ``labels`` ``(N,)`` int64 0-based.

        Returns:
            ``loss_cls_stage{k}`` for every stage, scalars.
        """
        if len(features) != len(self.strides) or not (
            len(targets) == len(image_sizes) == features[0].shape[0]
        ):
            raise ValueError(
                f"expected {len(self.strides)} feature maps (got {len(features)}) and one target and image size "
                f"per image ({features[0].shape[0]}; got {len(targets)} and {len(image_sizes)})"
            )
        rois = []
        for t in targets:
            labels = t["labels"].long()
            gt_index = torch.arange(len(labels), device=labels.device)
            rois.append((t["boxes"].detach().float(), gt_index, labels))
        losses: dict[str, Tensor] = {}
        for k, logits, _, stage_rois in self._cascade(features, rois, image_sizes, targets):
            gt_classes = torch.cat([r[2] for r in stage_rois]).to(logits.device)
            losses[f"loss_cls_stage{k}"] = sigmoid_ce_loss(logits, gt_classes)
        return losses

    def _cascade(self, features, rois, image_sizes, targets):
        """Run the training cascade from stage-0 ``rois``: yields ``(k, logits, deltas, rois_k)`` per stage, stage
        k > 0 on stage k-1's regressed boxes (``_next_stage_rois``)."""
        deltas = None
        for k in range(self.num_stages):
            if k > 0:
                rois = self._next_stage_rois(k, rois, deltas, image_sizes, targets)
            logits, deltas = self.run_stage(k, features, [r[0] for r in rois])
            yield k, logits, deltas, rois

    @torch.no_grad()
    def _next_stage_rois(self, k, rois, deltas, image_sizes, targets) -> list[tuple[Tensor, Tensor, Tensor]]:
        """Stage k trains on stage k-1's regressed boxes: detached, clipped, non-empty, matched at IoU_k."""
        pred = self.box2box[k - 1].apply_deltas(deltas.detach(), torch.cat([r[0] for r in rois]))
        pred = [
            clip_boxes(b, s) for b, s in zip(pred.split([len(r[0]) for r in rois]), image_sizes, strict=True)
        ]
        return [self._match(k, b[nonempty(b)], t) for b, t in zip(pred, targets, strict=True)]

    def _stage_losses(self, k, logits, deltas, rois, targets, paste_cls_loss) -> dict[str, Tensor]:
        """``loss_cls_stage{k}`` (sigmoid CE + fed loss), ``loss_box_reg_stage{k}`` and, if asked,
        ``loss_cls_paste_stage{k}`` (same logits and class set, pasted foreground rows only)."""
        boxes, gt_classes = torch.cat([r[0] for r in rois]), torch.cat([r[2] for r in rois])
        class_mask = None
        if self.use_fed_loss and len(gt_classes):
            weight = self.box_predictor[k].freq_weight
            appeared = fed_loss_classes(gt_classes, self.fed_loss_num_cat, self.num_classes, weight)
            class_mask = logits.new_zeros(self.num_classes + 1)
            class_mask[appeared] = 1
            class_mask = class_mask[: self.num_classes]
        losses = {f"loss_cls_stage{k}": sigmoid_ce_loss(logits, gt_classes, class_mask)}
        if paste_cls_loss:
            pasted = torch.cat([self._pasted(t, r[1]) for t, r in zip(targets, rois, strict=True)])
            pasted &= gt_classes != self.num_classes
            losses[f"loss_cls_paste_stage{k}"] = sigmoid_ce_loss(logits, gt_classes, class_mask, pasted)
        gt_boxes = [
            t["boxes"].float()[r[1]] if len(t["boxes"]) else r[0] for t, r in zip(targets, rois, strict=True)
        ]
        losses[f"loss_box_reg_stage{k}"] = box_reg_loss(
            deltas, boxes, torch.cat(gt_boxes), gt_classes,
            box2box=self.box2box[k], num_classes=self.num_classes, norm=self.box_loss_norm,
        )  # fmt: skip
        return losses

    @staticmethod
    def _pasted(target: dict[str, Tensor], matched: Tensor) -> Tensor:
        """``is_pasted`` of each RoI's matched GT; all False without the key or without GT."""
        if "is_pasted" not in target or len(target["boxes"]) == 0:
            return torch.zeros(len(matched), dtype=torch.bool, device=matched.device)
        return target["is_pasted"].to(device=matched.device, dtype=torch.bool)[matched]

    def _mask_loss(self, features, rois: list[tuple[Tensor, Tensor, Tensor]], targets) -> Tensor:
        """Mask loss on the stage-0 sampled foreground RoIs vs their matched GT masks cropped to the RoI."""
        fg = [r[2] != self.num_classes for r in rois]
        boxes = [r[0][m] for r, m in zip(rois, fg, strict=True)]
        logits = self.mask_head(
            multilevel_roi_align(features, boxes, self.mask_pooler_resolution, self.strides)
        )
        gt = []
        for target, r, m in zip(targets, rois, fg, strict=True):
            if m.any():
                if "masks" not in target:
                    raise ValueError("mask_on: every targets[i] needs 'masks' (N, h, w)")
                gt.append(mask_targets(target["masks"], r[1][m], r[0][m], 2 * self.mask_pooler_resolution))
        return mask_loss(logits, torch.cat(gt).to(logits.device)) if gt else logits.sum() * 0.0

    # --------------------------------------------------------------------------------------------- inference

    @torch.no_grad()
    def _forward_inference(self, features, proposals, image_sizes) -> list[dict[str, Tensor]]:
        boxes = [p["boxes"].float() for p in proposals]
        counts = [len(b) for b in boxes]
        probs = []
        for k in range(self.num_stages):
            logits, deltas = self.run_stage(k, features, boxes)
            probs.append(logits.sigmoid())
            pred = self.box2box[k].apply_deltas(deltas, torch.cat(boxes))
            # Test time: the next stage's boxes are clipped but not filtered: every stage keeps the same rows.
            boxes = [clip_boxes(b, s) for b, s in zip(pred.split(counts), image_sizes, strict=True)]
        # The official expression (python sum, then × 1/num_stages), for bit parity.
        scores = sum(probs) * (1.0 / self.num_stages)
        if self.test_num_classes < self.num_classes:  # keep the background column: it is dropped later
            scores = torch.cat([scores[:, : self.test_num_classes], scores[:, -1:]], dim=1)
        if self.mult_proposal_score:
            proposal_scores = torch.cat([p["scores"].float() for p in proposals])
            scores = (scores * proposal_scores[:, None]) ** 0.5
        results = []
        for b, s, size in zip(pred.split(counts), scores.split(counts), image_sizes, strict=True):
            det_boxes, det_scores, labels = fast_rcnn_inference_single_image(
                b, s, size, self.score_thresh_test, self.nms_thresh_test, self.detections_per_image
            )
            results.append({"boxes": det_boxes, "scores": det_scores, "labels": labels})
        if self.mask_on:
            masks = self.predict_masks(features, [r["boxes"] for r in results])
            for r, m in zip(results, masks, strict=True):
                r["mask_probs"] = m
        return results

    @torch.no_grad()
    def predict_masks(self, features: list[Tensor], boxes_per_image: list[Tensor]) -> list[Tensor]:
        """Mask probabilities of given (detection) boxes: 14×14 pooling, mask head, sigmoid.

        Returns:
            per image ``(K_i, M, M)``, M = 2 × mask_pooler_resolution.
        """
        x = multilevel_roi_align(features, boxes_per_image, self.mask_pooler_resolution, self.strides)
        probs = self.mask_head(x).sigmoid()[:, 0]
        return list(probs.split([len(b) for b in boxes_per_image]))
