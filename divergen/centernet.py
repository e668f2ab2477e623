"""CenterNet proposal stage: the first stage of CenterNet2 (Zhou et al., "Probabilistic two-stage detection").

A class-agnostic heat map ``agn_hm`` scores every FPN location as an object centre and ``bbox_pred``
regresses the distances (l, t, r, b) from the location to the box sides. The top-scoring locations,
decoded into boxes and filtered by NMS, are the proposals of the cascade ROI heads.

Everything follows ``reference/centernet2.md`` §2, which describes the official CenterNet2
``centernet.py`` / ``centernet_head.py`` with the X-Paste / BSGAL / DiverGen settings (``WITH_AGN_HM``,
``ONLY_PROPOSAL``, ``NOT_NORM_REG``). The layout of all flattened tensors is the official one:
level-first, then image, then location in row-major (y, x) order, so for ``B`` images and levels of
size ``H_l x W_l`` there are ``M = B * sum_l H_l * W_l`` rows.

Conventions: boxes are ``(N, 4)`` XYXY in pixels of the padded batch; regressions are ltrb **in units of
the level stride** (centernet2.md §6.3).
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from collections.abc import Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import batched_nms

from divergen.boxes import box_area

# The official "infinity": marks masked distances and invalid regression rows (-INF / stride).
INF = 100000000.0
# Heat-map values below this are set to exactly 0 (official ``_create_agn_heatmaps_from_dist``).
HEATMAP_MIN = 1e-4


class Scale(nn.Module):
    """One learnable scalar multiplying a level's regression (FCOS/CenterNet ``Scale``).

    Arguments:
        init_value: initial value of the parameter ``scale`` (shape ``(1,)``).
    """

    def __init__(self, *, init_value: float = 1.0):
        super().__init__()
        self.scale = nn.Parameter(torch.tensor([float(init_value)]))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.scale


class CenterNetHead(nn.Module):
    """The shared CenterNet head of centernet2.md §2.1 (``ONLY_PROPOSAL``: one tower, no class branch).

    ``bbox_tower`` = ``num_convs`` x [Conv3x3 (bias), GroupNorm(32, C), ReLU], read by both ``agn_hm``
    (the objectness logits) and ``bbox_pred`` (ltrb); the regression is ``ReLU(scales[l] * bbox_pred)``.
    Parameter names equal the official ``proposal_generator.centernet_head.*`` keys (centernet2.md §5).

    Arguments:
        in_channels: channels C of every FPN level (a multiple of 32, for GroupNorm(32, C)).
        num_convs: convolutions in ``bbox_tower`` (``NUM_BOX_CONVS``).
        num_levels: number of FPN levels, i.e. of ``Scale`` parameters.
        prior_prob: initial objectness probability; ``agn_hm`` bias = -log((1 - p) / p) (Focal loss §3.3).
    """

    def __init__(
        self, *, in_channels: int = 256, num_convs: int = 4, num_levels: int = 5, prior_prob: float = 0.01
    ):
        super().__init__()
        if in_channels % 32 != 0:
            raise ValueError(
                f"CenterNetHead: in_channels must be a multiple of 32 for GroupNorm(32, C), got {in_channels}"
            )
        tower: list[nn.Module] = []
        for _ in range(num_convs):
            tower += [
                nn.Conv2d(in_channels, in_channels, kernel_size=3, stride=1, padding=1, bias=True),
                nn.GroupNorm(32, in_channels),
                nn.ReLU(),
            ]
        self.bbox_tower = nn.Sequential(*tower)
        self.agn_hm = nn.Conv2d(in_channels, 1, kernel_size=3, stride=1, padding=1)
        self.bbox_pred = nn.Conv2d(in_channels, 4, kernel_size=3, stride=1, padding=1)
        self.scales = nn.ModuleList([Scale(init_value=1.0) for _ in range(num_levels)])

        for module in [*self.bbox_tower, self.bbox_pred, self.agn_hm]:
            if isinstance(module, nn.Conv2d):
                nn.init.normal_(module.weight, std=0.01)
                nn.init.constant_(module.bias, 0.0)
        # Official init (centernet2.md §2.1): every location starts with a box of 8 strides per side.
        nn.init.constant_(self.bbox_pred.bias, 8.0)
        nn.init.constant_(self.agn_hm.bias, -math.log((1 - prior_prob) / prior_prob))

    def forward(self, features: Sequence[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
        """``[(B, C, H_l, W_l)]`` -> (agn_hm logits ``[(B, 1, H_l, W_l)]``, reg ``[(B, 4, H_l, W_l)]``).

        The regression is (l, t, r, b) >= 0 in units of the level stride.
        """
        if len(features) != len(self.scales):
            raise ValueError(
                f"CenterNetHead: expected {len(self.scales)} feature levels, got {len(features)}"
            )
        agn_hms, regs = [], []
        for level, feature in enumerate(features):
            tower = self.bbox_tower(feature)
            agn_hms.append(self.agn_hm(tower))
            regs.append(F.relu(self.scales[level](self.bbox_pred(tower))))
        return agn_hms, regs


# --- Targets (centernet2.md §2.2) ---------------------------------------------------------------------------


def compute_grids(
    shapes: Sequence[tuple[int, int]], strides: Sequence[int], device: torch.device | str | None = None
) -> list[Tensor]:
    """Location centres of every level: ``[(H_l * W_l, 2)]`` float32 (x, y) pixels, row-major.

    Location (i, j) of a level with stride s sits at (j * s + s // 2, i * s + s // 2) (centernet2.md §2.2).
    """
    grids = []
    for (h, w), s in zip(shapes, strides, strict=True):
        shifts_x = torch.arange(0, w * s, step=s, dtype=torch.float32, device=device)
        shifts_y = torch.arange(0, h * s, step=s, dtype=torch.float32, device=device)
        shift_y, shift_x = torch.meshgrid(shifts_y, shifts_x, indexing="ij")
        grids.append(torch.stack((shift_x.reshape(-1), shift_y.reshape(-1)), dim=1) + s // 2)
    return grids


def assign_fpn_level(boxes: Tensor, sizes_of_interest: Sequence[Sequence[float]]) -> Tensor:
    """``(N, 4)`` boxes -> ``(N, L)`` bool: level l holds a box when SOI[l][0] <= half-diagonal <= SOI[l][1].

    The size ranges overlap, so a box can be assigned to two levels (centernet2.md §2.2).
    """
    size_ranges = boxes.new_tensor(sizes_of_interest).view(-1, 2)
    crit = ((boxes[:, 2:] - boxes[:, :2]) ** 2).sum(dim=1) ** 0.5 / 2
    return (crit[:, None] >= size_ranges[None, :, 0]) & (crit[:, None] <= size_ranges[None, :, 1])


def positive_indices(
    gt_boxes: Sequence[Tensor],
    shapes: Sequence[tuple[int, int]],
    strides: Sequence[int],
    sizes_of_interest: Sequence[Sequence[float]],
) -> Tensor:
    """The heat-map positives: for every GT and every level it is assigned to, the cell floor(centre / s).

    Arguments:
        gt_boxes: per image ``(N_i, 4)`` XYXY pixels.
        shapes: ``(H_l, W_l)`` per level.
        strides, sizes_of_interest: per level.

    Returns ``(P,)`` int64 indices into the level-first flattening (level, image, y, x); ordered by image,
    then GT, then level, as the official ``_get_label_inds``.
    """
    num_images = len(gt_boxes)
    device = gt_boxes[0].device if num_images else None
    loc_per_level = torch.tensor([h * w for h, w in shapes], dtype=torch.long, device=device)
    widths = torch.tensor([w for _, w in shapes], dtype=torch.long, device=device)
    level_bases = torch.cumsum(num_images * loc_per_level, dim=0) - num_images * loc_per_level
    strides_t = torch.tensor(list(strides), dtype=torch.float32, device=device)
    pos_inds = [torch.zeros(0, dtype=torch.long, device=device)]
    for im_i, boxes in enumerate(gt_boxes):
        centers = (boxes[:, :2] + boxes[:, 2:]) / 2  # N x 2
        # .long() truncates toward zero, as the official code (boxes are inside the image, so = floor).
        cells = (centers[:, None, :] / strides_t[None, :, None]).long()  # N x L x 2
        pos_ind = level_bases + im_i * loc_per_level + cells[..., 1] * widths + cells[..., 0]  # N x L
        pos_inds.append(pos_ind[assign_fpn_level(boxes, sizes_of_interest)])
    return torch.cat(pos_inds)


def _single_image_targets(
    boxes: Tensor, grids: Tensor, loc_strides: Tensor, size_ranges: Tensor, *, delta: float, min_radius: float
) -> tuple[Tensor, Tensor]:
    """Regression targets ``(M, 4)`` (pixels, -INF where invalid) and heat map ``(M,)`` of one image.

    ``grids`` ``(M, 2)``, ``loc_strides`` ``(M,)`` and ``size_ranges`` ``(M, 2)`` describe all locations of
    all levels; ``boxes`` is ``(N, 4)``. All ``M x N`` quantities are computed in one shot.
    """
    num_loc, num_gt = grids.shape[0], boxes.shape[0]
    if num_gt == 0:
        return grids.new_full((num_loc, 4), -INF), grids.new_zeros(num_loc)
    gx, gy = grids[:, 0, None], grids[:, 1, None]  # M x 1
    s = loc_strides[:, None]  # M x 1
    l = gx - boxes[None, :, 0]  # M x N
    t = gy - boxes[None, :, 1]
    r = boxes[None, :, 2] - gx
    b = boxes[None, :, 3] - gy
    centers = (boxes[:, :2] + boxes[:, 2:]) / 2  # N x 2
    cx, cy = centers[None, :, 0], centers[None, :, 1]  # 1 x N
    # Discretised centre at each level: the centre of the cell containing the GT centre.
    cdx = ((cx / s).int() * s).float() + s / 2  # M x N
    cdy = ((cy / s).int() * s).float() + s / 2
    is_peak = (gx == cdx) & (gy == cdy)
    is_in_box = (l > 0) & (t > 0) & (r > 0) & (b > 0)
    is_center3x3 = ((gx - cdx).abs() <= s) & ((gy - cdy).abs() <= s) & is_in_box
    # Half-diagonal of the box seen from the location (official ``assign_reg_fpn``).
    crit = ((l + r) ** 2 + (t + b) ** 2) ** 0.5 / 2
    is_cared_in_level = (crit >= size_ranges[:, [0]]) & (crit <= size_ranges[:, [1]])
    reg_mask = is_center3x3 & is_cared_in_level

    dist2 = ((gx - cx) ** 2 + (gy - cy) ** 2).masked_fill(is_peak, 0.0)
    # Gaussian radius (centernet2.md §2.2): delta = (1 - overlap) / (1 + overlap), radius2 >= min_radius^2.
    radius2 = torch.clamp(delta**2 * 2 * box_area(boxes), min=min_radius**2)
    weighted_dist2 = dist2 / radius2[None, :]  # M x N

    # Each regression location regresses the GT with the smallest weighted distance.
    min_dist, min_inds = weighted_dist2.masked_fill(~reg_mask, INF).min(dim=1)
    g = boxes[min_inds]  # M x 4
    reg = torch.stack(
        (grids[:, 0] - g[:, 0], grids[:, 1] - g[:, 1], g[:, 2] - grids[:, 0], g[:, 3] - grids[:, 1]), 1
    )
    reg = reg.masked_fill((min_dist == INF)[:, None], -INF)

    heatmap = torch.exp(-weighted_dist2.min(dim=1).values)
    heatmap = heatmap.masked_fill(heatmap < HEATMAP_MIN, 0.0)
    return reg, heatmap


def centernet_targets(
    gt_boxes: Sequence[Tensor],
    shapes: Sequence[tuple[int, int]],
    *,
    strides: Sequence[int],
    sizes_of_interest: Sequence[Sequence[float]],
    hm_min_overlap: float = 0.8,
    min_radius: float = 4.0,
    grids: Sequence[Tensor] | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Heat-map and regression targets of centernet2.md §2.2 (official ``_get_ground_truth``).

    Arguments:
        gt_boxes: per image ``(N_i, 4)`` float XYXY pixels (``N_i`` may be 0).
        shapes: ``(H_l, W_l)`` of every level.
        strides, sizes_of_interest: per level.
        hm_min_overlap, min_radius: the Gaussian radius (``HM_MIN_OVERLAP``, ``MIN_RADIUS`` in pixels).
        grids: ``compute_grids(shapes, strides)`` if already computed.

    Returns, flattened level-first (level, image, y, x), ``M = B * sum_l H_l * W_l``:
        pos_inds: ``(P,)`` int64, one positive per (GT, assigned level) (``positive_indices``).
        reg_targets: ``(M, 4)`` float32 ltrb in stride units; rows without a GT hold -INF / stride
            (``reg_targets.max(1) >= 0`` selects the valid rows).
        agn_heatmap: ``(M,)`` float32 in [0, 1]; 1 at every level's centre cell (the heat map is not
            restricted to the assigned levels).
    """
    if grids is None:
        grids = compute_grids(shapes, strides, device=gt_boxes[0].device if len(gt_boxes) else None)
    num_loc = [g.shape[0] for g in grids]
    device = grids[0].device
    loc_strides = torch.cat(
        [torch.full((n,), float(s), device=device) for n, s in zip(num_loc, strides, strict=True)]
    )
    size_ranges = torch.cat(
        [
            torch.tensor(soi, dtype=torch.float32, device=device).view(1, 2).expand(n, 2)
            for n, soi in zip(num_loc, sizes_of_interest, strict=True)
        ]
    )
    all_grids = torch.cat(list(grids), dim=0)
    delta = (1 - hm_min_overlap) / (1 + hm_min_overlap)

    regs, hms = [], []
    for boxes in gt_boxes:
        reg, hm = _single_image_targets(
            boxes.to(device=device, dtype=torch.float32),
            all_grids,
            loc_strides,
            size_ranges,
            delta=delta,
            min_radius=min_radius,
        )
        regs.append(reg)
        hms.append(hm)
    # Image-first -> level-first (official ``_transpose``), dividing by the level stride.
    reg_levels = torch.stack(regs).split(num_loc, dim=1)  # [(B, M_l, 4)]
    hm_levels = torch.stack(hms).split(num_loc, dim=1)  # [(B, M_l)]
    reg_targets = torch.cat([r.reshape(-1, 4) / float(s) for r, s in zip(reg_levels, strides, strict=True)])
    agn_heatmap = torch.cat([h.reshape(-1) for h in hm_levels])
    pos_inds = positive_indices(
        [b.to(device=device, dtype=torch.float32) for b in gt_boxes], shapes, strides, sizes_of_interest
    )
    return pos_inds, reg_targets, agn_heatmap


# --- Losses (centernet2.md §2.3) ----------------------------------------------------------------------------


def heatmap_focal_loss(
    logits: Tensor,
    heatmap: Tensor,
    pos_inds: Tensor,
    *,
    alpha: float = 0.25,
    beta: float = 4.0,
    gamma: float = 2.0,
    sigmoid_clamp: float = 1e-4,
    ignore_high_fp: float = 0.85,
) -> tuple[Tensor, Tensor]:
    """Binary heat-map focal loss (CornerNet/CenterNet; official ``binary_heatmap_focal_loss``), summed.

    With p = clamp(sigmoid(logits), c, 1 - c):
        pos = alpha * sum_{pos_inds} -log(p) (1 - p)^gamma
        neg = (1 - alpha) * sum_all -log(1 - p) p^gamma (1 - heatmap)^beta [p < ignore_high_fp]
    (the indicator is dropped when ``ignore_high_fp <= 0``; alpha is not applied when < 0).

    Arguments:
        logits: ``(M,)`` heat-map logits (fp32).
        heatmap: ``(M,)`` Gaussian targets in [0, 1].
        pos_inds: ``(P,)`` int64 indices of the positive locations (may be empty).

    Returns the scalar (pos, neg) sums, not normalised.
    """
    pred = torch.clamp(logits.sigmoid(), min=sigmoid_clamp, max=1 - sigmoid_clamp)
    neg_weights = torch.pow(1 - heatmap, beta)
    pos_pred = pred[pos_inds]
    pos_loss = torch.log(pos_pred) * torch.pow(1 - pos_pred, gamma)
    neg_loss = torch.log(1 - pred) * torch.pow(pred, gamma) * neg_weights
    if ignore_high_fp > 0:
        # LVIS is not exhaustively labelled: a confident "false positive" is often an unlabelled object,
        # so it is not penalised (IGNORE_HIGH_FP, centernet2.md §2.3).
        neg_loss = (pred < ignore_high_fp).float() * neg_loss
    pos_loss = -pos_loss.sum()
    neg_loss = -neg_loss.sum()
    if alpha >= 0:
        pos_loss = alpha * pos_loss
        neg_loss = (1 - alpha) * neg_loss
    return pos_loss, neg_loss


def giou_loss_ltrb(pred: Tensor, target: Tensor) -> Tensor:
    """Per-row 1 - GIoU between two ltrb boxes sharing their anchor point (FCOS ``IOULoss('giou')``).

    ``pred``, ``target``: ``(K, 4)`` (l, t, r, b) >= 0, in stride units. Returns ``(K,)``. IoU is smoothed
    as (I + 1) / (U + 1) in these units (centernet2.md §2.3); the enclosing-box term is unsmoothed.
    """
    pl, pt, pr, pb = pred.unbind(dim=1)
    tl, tt, tr, tb = target.unbind(dim=1)
    target_area = (tl + tr) * (tt + tb)
    pred_area = (pl + pr) * (pt + pb)
    w_inter = torch.min(pl, tl) + torch.min(pr, tr)
    h_inter = torch.min(pb, tb) + torch.min(pt, tt)
    w_enclose = torch.max(pl, tl) + torch.max(pr, tr)
    h_enclose = torch.max(pb, tb) + torch.max(pt, tt)
    area_enclose = w_enclose * h_enclose
    area_inter = w_inter * h_inter
    area_union = target_area + pred_area - area_inter
    ious = (area_inter + 1.0) / (area_union + 1.0)
    gious = ious - (area_enclose - area_union) / area_enclose
    return 1 - gious


_LOCAL_NORMALIZATION = contextvars.ContextVar("centernet_local_normalization", default=False)


@contextlib.contextmanager
def local_loss_normalization():
    """Inside: the CenterNet losses are normalised by this process's own positives, without the all-reduce.

    BSGAL's per-process decisions make processes run different numbers of forward passes (a rejected batch is
    forwarded again without its pasted instances); a collective inside the forward would then deadlock.
    """
    token = _LOCAL_NORMALIZATION.set(True)
    try:
        yield
    finally:
        _LOCAL_NORMALIZATION.reset(token)


def _global_average_counts(num_pos: int, num_reg: int, device: torch.device) -> tuple[float, float]:
    """(num_pos, num_reg) summed over ranks / world size, each at least 1 (official ``reduce_sum``); this
    process's own counts inside ``local_loss_normalization``."""
    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    if world == 1 or _LOCAL_NORMALIZATION.get():
        return max(float(num_pos), 1.0), max(float(num_reg), 1.0)
    counts = torch.tensor([float(num_pos), float(num_reg)], device=device)
    dist.all_reduce(counts)
    total_pos, total_reg = counts.tolist()
    return max(total_pos / world, 1.0), max(total_reg / world, 1.0)


def centernet_losses(
    agn_logits: Tensor,
    reg_pred: Tensor,
    pos_inds: Tensor,
    reg_targets: Tensor,
    agn_heatmap: Tensor,
    *,
    focal_alpha: float = 0.25,
    focal_beta: float = 4.0,
    focal_gamma: float = 2.0,
    sigmoid_clamp: float = 1e-4,
    ignore_high_fp: float = 0.85,
    pos_weight: float = 0.5,
    neg_weight: float = 0.5,
    reg_weight: float = 1.0,
) -> dict[str, Tensor]:
    """The three CenterNet losses of centernet2.md §2.3 (official ``CenterNet.losses``, ONLY_PROPOSAL).

    Arguments (all flattened level-first, ``M`` rows, fp32):
        agn_logits: ``(M,)`` heat-map logits; reg_pred: ``(M, 4)`` ltrb in stride units.
        pos_inds, reg_targets, agn_heatmap: from ``centernet_targets``.

    The heat-map terms are normalised by num_pos_avg = max(#pos over ranks / world, 1); the GIoU term
    by the number of valid regression rows over ranks / world (``NOT_NORM_REG``: weight 1 each).
    """
    reg_inds = torch.nonzero(reg_targets.max(dim=1).values >= 0).squeeze(1)
    num_pos_avg, reg_norm = _global_average_counts(pos_inds.numel(), reg_inds.numel(), agn_logits.device)

    loss_loc = giou_loss_ltrb(reg_pred[reg_inds], reg_targets[reg_inds]).sum()
    pos_loss, neg_loss = heatmap_focal_loss(
        agn_logits,
        agn_heatmap,
        pos_inds,
        alpha=focal_alpha,
        beta=focal_beta,
        gamma=focal_gamma,
        sigmoid_clamp=sigmoid_clamp,
        ignore_high_fp=ignore_high_fp,
    )
    return {
        "loss_centernet_agn_pos": pos_weight * pos_loss / num_pos_avg,
        "loss_centernet_agn_neg": neg_weight * neg_loss / num_pos_avg,
        "loss_centernet_loc": reg_weight * loss_loc / reg_norm,
    }


# --- Decoding (centernet2.md §2.4) --------------------------------------------------------------------------


@torch.no_grad()
def decode_proposals(
    grids: Sequence[Tensor],
    agn_logits: Sequence[Tensor],
    reg_pred: Sequence[Tensor],
    *,
    strides: Sequence[int],
    inference_th: float = 1e-4,
    pre_nms_topk: int = 1000,
    post_nms_topk: int = 256,
    nms_thresh: float = 0.9,
) -> list[dict[str, Tensor]]:
    """Proposals from the heat map and the regression (official ``predict_instances`` + ``nms_and_topK``).

    Runs under ``no_grad``: decoding with autograd on keeps every level's graph alive and leaks memory
    until OOM (CenterNet2 #77, X-Paste #1).

    Arguments:
        grids: ``[(H_l * W_l, 2)]`` location centres (``compute_grids``).
        agn_logits: ``[(B, 1, H_l, W_l)]`` heat-map logits.
        reg_pred: ``[(B, 4, H_l, W_l)]`` ltrb in stride units.
        strides: per level.
        inference_th: keep locations with sigmoid > this; pre_nms_topk: then at most this many per level
            and image; nms_thresh: class-agnostic NMS IoU; post_nms_topk: then keep the scores >= the
            post_nms_topk-th largest (``kthvalue``: ties may keep a few more).

    Returns per image ``{"boxes": (K, 4) XYXY pixels, unclipped, "scores": (K,) = sqrt(sigmoid)}`` in NMS
    order (descending score).
    """
    num_images = agn_logits[0].shape[0]
    boxes_per_image: list[list[Tensor]] = [[] for _ in range(num_images)]
    scores_per_image: list[list[Tensor]] = [[] for _ in range(num_images)]
    for grid, logits, reg, stride in zip(grids, agn_logits, reg_pred, strides, strict=True):
        heat = logits.float().sigmoid().permute(0, 2, 3, 1).reshape(num_images, -1)  # B x HW
        box_reg = (reg.float() * stride).permute(0, 2, 3, 1).reshape(num_images, -1, 4)  # B x HW x 4
        candidates = heat > inference_th
        for i in range(num_images):
            scores = heat[i][candidates[i]]
            locs = candidates[i].nonzero()[:, 0]
            if scores.numel() > pre_nms_topk:
                scores, top = scores.topk(pre_nms_topk, sorted=False)
                locs = locs[top]
            ltrb, g = box_reg[i][locs], grid[locs]
            boxes = torch.stack(
                (g[:, 0] - ltrb[:, 0], g[:, 1] - ltrb[:, 1], g[:, 0] + ltrb[:, 2], g[:, 1] + ltrb[:, 3]), 1
            )
            # Zero-size boxes would break the ROI heads' box coding (log of the width).
            boxes[:, 2] = torch.max(boxes[:, 2], boxes[:, 0] + 0.01)
            boxes[:, 3] = torch.max(boxes[:, 3], boxes[:, 1] + 0.01)
            boxes_per_image[i].append(boxes)
            # WITH_AGN_HM: the proposal score is sqrt(sigmoid) (centernet2.md §2.4).
            scores_per_image[i].append(torch.sqrt(scores))

    proposals = []
    for boxes_list, scores_list in zip(boxes_per_image, scores_per_image, strict=True):
        boxes, scores = torch.cat(boxes_list), torch.cat(scores_list)
        # batched_nms with a single label is the official ``ml_nms`` call, same code path, same order.
        keep = batched_nms(boxes, scores, torch.zeros_like(scores, dtype=torch.long), nms_thresh)
        boxes, scores = boxes[keep], scores[keep]
        num_dets = scores.numel()
        if num_dets > post_nms_topk:
            threshold = torch.kthvalue(scores, num_dets - post_nms_topk + 1).values
            keep = torch.nonzero(scores >= threshold).squeeze(1)
            boxes, scores = boxes[keep], scores[keep]
        proposals.append({"boxes": boxes, "scores": scores})
    return proposals


def _flatten_levels(per_level: Sequence[Tensor]) -> Tensor:
    """``[(B, C, H_l, W_l)]`` -> ``(sum_l B * H_l * W_l, C)`` level-first, then image, then row-major."""
    return torch.cat([x.permute(0, 2, 3, 1).reshape(-1, x.shape[1]) for x in per_level], dim=0)


class CenterNet(nn.Module):
    """The CenterNet proposal stage of CenterNet2 (centernet2.md §2): head, targets, losses, decoding.

    Arguments:
        in_channels: FPN channels; num_convs: tower depth; prior_prob: initial objectness probability.
        strides: stride of each input level (p3..p7).
        sizes_of_interest: per level, the [min, max] half-diagonal (px) of the boxes it is responsible for.
        hm_min_overlap, min_radius: Gaussian radius of the heat map (``HM_MIN_OVERLAP``, ``MIN_RADIUS`` px).
        focal_alpha, focal_beta, focal_gamma: heat-map focal loss; sigmoid_clamp: clamp of its sigmoid;
            ignore_high_fp: no negative loss where p >= this.
        pos_weight, neg_weight, reg_weight: weights of the three losses.
        inference_th: minimum sigmoid of a decoded location.
        pre_nms_topk_train, post_nms_topk_train, pre_nms_topk_test, post_nms_topk_test: per-level pre-NMS
            and per-image post-NMS proposal counts (train mode / eval mode).
        nms_thresh_train, nms_thresh_test: class-agnostic NMS IoU.
    """

    def __init__(
        self,
        *,
        in_channels: int = 256,
        num_convs: int = 4,
        prior_prob: float = 0.01,
        strides: Sequence[int] = (8, 16, 32, 64, 128),
        sizes_of_interest: Sequence[Sequence[float]] = (
            (0, 80),
            (64, 160),
            (128, 320),
            (256, 640),
            (512, 1e7),
        ),
        hm_min_overlap: float = 0.8,
        min_radius: float = 4.0,
        focal_alpha: float = 0.25,
        focal_beta: float = 4.0,
        focal_gamma: float = 2.0,
        sigmoid_clamp: float = 1e-4,
        ignore_high_fp: float = 0.85,
        pos_weight: float = 0.5,
        neg_weight: float = 0.5,
        reg_weight: float = 1.0,
        inference_th: float = 1e-4,
        pre_nms_topk_train: int = 4000,
        post_nms_topk_train: int = 2000,
        pre_nms_topk_test: int = 1000,
        post_nms_topk_test: int = 256,
        nms_thresh_train: float = 0.9,
        nms_thresh_test: float = 0.9,
    ):
        super().__init__()
        if len(sizes_of_interest) != len(strides):
            raise ValueError(
                f"CenterNet: expected one sizes_of_interest range per stride ({len(strides)}), "
                f"got {len(sizes_of_interest)}"
            )
        self.strides = tuple(int(s) for s in strides)
        self.sizes_of_interest = tuple((float(lo), float(hi)) for lo, hi in sizes_of_interest)
        self.hm_min_overlap = hm_min_overlap
        self.min_radius = min_radius
        self.loss_args = dict(
            focal_alpha=focal_alpha,
            focal_beta=focal_beta,
            focal_gamma=focal_gamma,
            sigmoid_clamp=sigmoid_clamp,
            ignore_high_fp=ignore_high_fp,
            pos_weight=pos_weight,
            neg_weight=neg_weight,
            reg_weight=reg_weight,
        )
        self.inference_th = inference_th
        self.pre_nms_topk_train, self.post_nms_topk_train = pre_nms_topk_train, post_nms_topk_train
        self.pre_nms_topk_test, self.post_nms_topk_test = pre_nms_topk_test, post_nms_topk_test
        self.nms_thresh_train, self.nms_thresh_test = nms_thresh_train, nms_thresh_test
        self.centernet_head = CenterNetHead(
            in_channels=in_channels, num_convs=num_convs, num_levels=len(self.strides), prior_prob=prior_prob
        )

    def forward(
        self, features: Sequence[Tensor], targets: Sequence[dict[str, Tensor]] | None = None
    ) -> tuple[list[dict[str, Tensor]], dict[str, Tensor]]:
        """Proposals, and the losses when ``targets`` is given.

        Arguments:
            features: ``[(B, C, H_l, W_l)]`` FPN levels p3..p7 of the padded batch.
            targets: per image ``{"boxes": (N_i, 4) XYXY pixels}`` (``N_i`` may be 0), or None.

        Returns ``(proposals, losses)``: proposals[i] = ``{"boxes": (K, 4), "scores": (K,)}`` detached
        (train-mode top-k when ``self.training``, else test-mode); losses = ``{}`` without targets, else
        ``loss_centernet_agn_pos``, ``loss_centernet_agn_neg``, ``loss_centernet_loc`` (fp32 scalars).
        """
        agn_logits, reg_pred = self.centernet_head(features)
        shapes = [(int(x.shape[-2]), int(x.shape[-1])) for x in agn_logits]
        grids = compute_grids(shapes, self.strides, device=agn_logits[0].device)

        losses: dict[str, Tensor] = {}
        if targets is not None:
            if len(targets) != agn_logits[0].shape[0]:
                raise ValueError(
                    f"CenterNet: got {len(targets)} targets for a batch of {agn_logits[0].shape[0]} images"
                )
            # Targets and losses in fp32 even under bf16/fp16 autocast (centernet2.md §4, FP16).
            with torch.autocast(device_type=agn_logits[0].device.type, enabled=False):
                pos_inds, reg_targets, agn_heatmap = centernet_targets(
                    [t["boxes"] for t in targets],
                    shapes,
                    strides=self.strides,
                    sizes_of_interest=self.sizes_of_interest,
                    hm_min_overlap=self.hm_min_overlap,
                    min_radius=self.min_radius,
                    grids=grids,
                )
                losses = centernet_losses(
                    _flatten_levels(agn_logits).float().squeeze(1),
                    _flatten_levels(reg_pred).float(),
                    pos_inds,
                    reg_targets,
                    agn_heatmap,
                    **self.loss_args,
                )

        proposals = decode_proposals(
            grids,
            [x.detach() for x in agn_logits],
            [x.detach() for x in reg_pred],
            strides=self.strides,
            inference_th=self.inference_th,
            pre_nms_topk=self.pre_nms_topk_train if self.training else self.pre_nms_topk_test,
            post_nms_topk=self.post_nms_topk_train if self.training else self.post_nms_topk_test,
            nms_thresh=self.nms_thresh_train if self.training else self.nms_thresh_test,
        )
        return proposals, losses
