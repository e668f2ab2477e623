"""CenterNet2 = backbone + FPN, CenterNet proposal stage, cascade ROI heads (Zhou et al., "Probabilistic
two-stage detection", 2021), as X-Paste, BSGAL and DiverGen train it (reference/centernet2.md).

Like torchvision's ``GeneralizedRCNN``, this module only wires prebuilt parts and owns the input/output
conventions (DESIGN.md, "Public API"):

    model.train(); losses = model(images, targets)   # dict of the 10 official loss terms
    model.eval();  outputs = model(images)           # list of dict(boxes, scores, labels, masks)
    losses = model.reference_cls_loss(images, targets)  # BSGAL's reference loss: loss_cls_stage{k}
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from contextlib import nullcontext

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.profiler import record_function

from .backbone import FPN, ResNetTrunk, SwinTransformer
from .boxes import clip_boxes, nonempty
from .centernet import CenterNet
from .config import ModelConfig
from .roi_heads import CascadeROIHeads

LOSS_KEYS = (
    "loss_centernet_agn_pos",
    "loss_centernet_agn_neg",
    "loss_centernet_loc",
    *(f"loss_{kind}_stage{k}" for k in range(3) for kind in ("cls", "box_reg")),
    "loss_mask",
)


class CenterNet2(nn.Module):
    """The detector. Inputs and outputs follow detectron2's conventions.

    Arguments:
        backbone: FPN over a ResNet or Swin trunk, returning [p3, p4, p5, p6, p7].
        proposal_generator: the CenterNet first stage, reading p3-p7.
        roi_heads: the cascade box heads and the mask head, reading p3-p5.
        pixel_mean, pixel_std: RGB normalisation of 0..255 inputs.
        size_divisibility: the batch is zero-padded (after normalisation) to a multiple of this.
        amp_heads: run the proposal and ROI heads under the caller's autocast too. The official code runs only the
            backbone in fp16 and the heads and losses in fp32 (centernet2.md §4 "FP16"); False reproduces that.
    """

    def __init__(
        self,
        *,
        backbone: FPN,
        proposal_generator: CenterNet,
        roi_heads: CascadeROIHeads,
        pixel_mean: Sequence[float],
        pixel_std: Sequence[float],
        size_divisibility: int = 32,
        amp_heads: bool = False,
    ):
        super().__init__()
        self.backbone = backbone
        self.proposal_generator = proposal_generator
        self.roi_heads = roi_heads
        self.size_divisibility = size_divisibility
        self.amp_heads = amp_heads
        # Not in the state dict, as in detectron2 (parity README: "non-persistent pixel mean/std buffers").
        self.register_buffer("pixel_mean", torch.tensor(pixel_mean, dtype=torch.float32).view(3, 1, 1), False)
        self.register_buffer("pixel_std", torch.tensor(pixel_std, dtype=torch.float32).view(3, 1, 1), False)

    @property
    def device(self) -> torch.device:
        return self.pixel_mean.device

    def preprocess(self, images: Sequence[Tensor]) -> tuple[Tensor, list[tuple[int, int]]]:
        """Normalise each ``(3, H_i, W_i)`` 0..255 RGB image, then zero-pad bottom/right into one
        ``(B, 3, H, W)`` batch with H, W multiples of ``size_divisibility`` (detectron2 ``ImageList``)."""
        sizes = [(int(im.shape[-2]), int(im.shape[-1])) for im in images]
        d = self.size_divisibility
        pad_h = int(math.ceil(max(h for h, _ in sizes) / d) * d)
        pad_w = int(math.ceil(max(w for _, w in sizes) / d) * d)
        batch = self.pixel_mean.new_zeros((len(images), 3, pad_h, pad_w))
        for i, (im, (h, w)) in enumerate(zip(images, sizes)):
            batch[i, :, :h, :w] = (im.to(self.device, torch.float32) - self.pixel_mean) / self.pixel_std
        return batch, sizes

    def forward(
        self,
        images: Sequence[Tensor],
        targets: Sequence[dict[str, Tensor]] | None = None,
        *,
        paste_cls_loss: bool = False,
        output_sizes: Sequence[tuple[int, int]] | None = None,
    ) -> dict[str, Tensor] | list[dict[str, Tensor]]:
        """Training (``model.train()``, targets given) -> dict of losses; inference -> per-image detections.

        Arguments:
            images: list of ``(3, H_i, W_i)`` RGB tensors, uint8 or float, values 0..255.
            targets: per image ``boxes`` (N, 4) xyxy pixels, ``labels`` (N,) int64 0-based, ``masks`` (N, H_i, W_i)
                bool/uint8, optional ``is_pasted`` (N,) bool. Boxes with no area are dropped (detectron2's mapper
                does the same).
            paste_cls_loss: also return ``loss_cls_paste_stage{k}``, the classification loss restricted to RoIs
                matched to pasted instances (BSGAL's candidate gradient, reference/bsgal.md §1.2 step 3). These keys
                are parts of ``loss_cls_stage{k}``, not extra terms: do not add them to the training loss.
            output_sizes: inference only: per image (height, width) to report detections at, e.g. the original image
                size before the test-time resize. Boxes are rescaled and masks pasted directly at that size
                (detectron2's ``detector_postprocess``). Default: the input sizes.

        Returns:
            training: the official loss keys (``LOSS_KEYS``), fp32 scalars.
            inference: per image ``boxes`` (K, 4) xyxy pixels, ``scores`` (K,), ``labels`` (K,) 0-based, ``masks``
            (K, H_i, W_i) bool (when the mask head is on), at the input size or ``output_sizes[i]``;
            K <= detections_per_image, by descending score.
        """
        _check_images(images)
        if self.training:
            if targets is None:
                raise ValueError("CenterNet2 in training mode needs targets; call model.eval() for inference")
            targets = _check_targets(
                targets,
                images,
                num_classes=self.roi_heads.num_classes,
                need_masks=self.roi_heads.mask_on,
                device=self.device,
            )
        batch, sizes = self.preprocess(images)
        with record_function("backbone"):
            features = self.backbone(batch)
        # Autocast off for the heads unless amp_heads (a no-op when the caller runs no autocast).
        heads_ctx = nullcontext() if self.amp_heads else torch.autocast(batch.device.type, enabled=False)
        with heads_ctx:
            if not self.amp_heads:
                features = [f.float() for f in features]
            with record_function("proposal_generator"):
                proposals, losses = self.proposal_generator(features, targets if self.training else None)
            with record_function("roi_heads"):
                if self.training:
                    losses.update(
                        self.roi_heads(features[:3], proposals, sizes, targets, paste_cls_loss=paste_cls_loss)
                    )
                    return {k: v.float() for k, v in losses.items()}
                detections = self.roi_heads(features[:3], proposals, sizes)
        with record_function("postprocess"):
            return [
                postprocess(d, size, out_size)
                for d, size, out_size in zip(detections, sizes, output_sizes or sizes)
            ]

    def reference_cls_loss(
        self,
        images: Sequence[Tensor],
        targets: Sequence[dict[str, Tensor]],
        *,
        backbone_eval: bool = True,
    ) -> dict[str, Tensor]:
        """BSGAL's reference loss on a batch of real reference images (reference/bsgal.md §1.2 step 1).

        The input checks and preprocessing of ``forward``, the backbone and FPN, then
        ``CascadeROIHeads.reference_cls_loss`` on p3-p5: the GT boxes are the stage-0 RoIs, the loss is the cls
        loss of each stage over all classes. No proposal stage runs, so its parameters get no gradient (nor does
        the mask head, nor any box regressor). The heads follow ``forward``'s autocast handling (``amp_heads``).

        Arguments:
            images: list of ``(3, H_i, W_i)`` RGB tensors, uint8 or float, values 0..255.
            targets: per image ``boxes`` (N, 4) xyxy pixels and ``labels`` (N,) int64 0-based (``masks`` are not
                needed); boxes with no area are dropped.
            backbone_eval: run the backbone (trunk and FPN) in ``eval()`` mode, as the official scoring forwards
                do: it turns Swin's drop-path off (FrozenBN ResNets do not change). Every backbone module's
                previous mode is restored afterwards, also when the call raises.

        Returns:
            ``loss_cls_stage{k}``, fp32 scalars.
        """
        _check_images(images)
        # Only boxes and labels are used: the masks a reference sample carries are not moved to the device.
        targets = _check_targets(
            [{k: t[k] for k in ("boxes", "labels") if k in t} for t in targets],
            images,
            num_classes=self.roi_heads.num_classes,
            need_masks=False,
            device=self.device,
        )
        modes = [(m, m.training) for m in self.backbone.modules()]
        try:
            if backbone_eval:
                self.backbone.eval()
            batch, sizes = self.preprocess(images)
            with record_function("backbone"):
                features = self.backbone(batch)
            heads_ctx = nullcontext() if self.amp_heads else torch.autocast(batch.device.type, enabled=False)
            with heads_ctx, record_function("roi_heads"):
                if not self.amp_heads:
                    features = [f.float() for f in features]
                losses = self.roi_heads.reference_cls_loss(features[:3], sizes, targets)
            return {k: v.float() for k, v in losses.items()}
        finally:
            for module, mode in modes:
                module.training = mode


def postprocess(
    detections: dict[str, Tensor], input_size: tuple[int, int], output_size: tuple[int, int]
) -> dict[str, Tensor]:
    """detectron2 ``detector_postprocess``: rescale boxes from the input to the output size, clip, drop empty ones,
    paste the ``(K, M, M)`` mask probabilities into ``(K, H_out, W_out)`` bool masks."""
    boxes = detections["boxes"]
    if tuple(output_size) != tuple(input_size):
        scale = boxes.new_tensor([output_size[1] / input_size[1], output_size[0] / input_size[0]]).repeat(2)
        boxes = boxes * scale
    boxes = clip_boxes(boxes, output_size)
    keep = nonempty(boxes)
    out = {"boxes": boxes[keep], "scores": detections["scores"][keep], "labels": detections["labels"][keep]}
    if "mask_probs" in detections:
        out["masks"] = paste_masks_in_image(detections["mask_probs"][keep], out["boxes"], output_size)
    return out


PASTE_CHUNK_BYTES = 1 << 30  # detectron2's GPU_MEM_LIMIT: the float memory of one chunk of whole-image pastes


def paste_masks_in_image(
    masks: Tensor,
    boxes: Tensor,
    image_size: tuple[int, int],
    threshold: float = 0.5,
    *,
    whole_image: bool | None = None,
) -> Tensor:
    """Paste ``(K, M, M)`` mask probabilities into ``(K, H, W)`` bool masks, each inside its box.

    Bilinear resampling with ``grid_sample`` (align_corners=False) at pixel centres, as detectron2's
    ``paste_masks_in_image``, in one of its two ways (same result; ``whole_image`` default: on accelerators):

    - per mask, only over its box's integer bounds plus one pixel (detectron2's CPU path, ``skip_empty``), which
      bounds the work and memory by the box areas instead of K·H·W floats, but costs a few host synchronisations
      per mask: 0.4 s for 300 masks on an H200 (benchmarks/RESULTS.md);
    - in chunks of masks over the whole image (detectron2's GPU path): no synchronisation, K·H·W·12 bytes per
      chunk of at most ``PASTE_CHUNK_BYTES``. Outside the box a sample is at least half a mask pixel away from the
      mask, so its value stays under 0.5 times the border probability and the threshold keeps it out: the same
      masks as the per-box crops for any threshold >= 0.5.
    """
    if whole_image is None:
        whole_image = masks.device.type != "cpu"
    if whole_image:
        return _paste_whole_image(masks, boxes, image_size, threshold)
    h, w = image_size
    out = torch.zeros((len(masks), h, w), dtype=torch.bool, device=masks.device)
    for i, (mask, box) in enumerate(zip(masks, boxes.float())):
        x0 = int(torch.clamp(box[0].floor() - 1, min=0))
        y0 = int(torch.clamp(box[1].floor() - 1, min=0))
        x1 = int(torch.clamp(box[2].ceil() + 1, max=w))
        y1 = int(torch.clamp(box[3].ceil() + 1, max=h))
        if x1 <= x0 or y1 <= y0:
            continue
        ys = torch.arange(y0, y1, device=masks.device, dtype=torch.float32) + 0.5
        xs = torch.arange(x0, x1, device=masks.device, dtype=torch.float32) + 0.5
        gy = (ys - box[1]) / (box[3] - box[1]) * 2 - 1
        gx = (xs - box[0]) / (box[2] - box[0]) * 2 - 1
        grid = torch.stack(torch.broadcast_tensors(gx[None, :], gy[:, None]), dim=-1)
        pasted = F.grid_sample(mask[None, None].float(), grid[None], align_corners=False)
        out[i, y0:y1, x0:x1] = pasted[0, 0] >= threshold
    return out


def _paste_whole_image(masks: Tensor, boxes: Tensor, image_size: tuple[int, int], threshold: float) -> Tensor:
    h, w = image_size
    out = torch.zeros((len(masks), h, w), dtype=torch.bool, device=masks.device)
    ys = torch.arange(h, device=masks.device, dtype=torch.float32) + 0.5
    xs = torch.arange(w, device=masks.device, dtype=torch.float32) + 0.5
    boxes = boxes.float()
    chunk = max(
        1, PASTE_CHUNK_BYTES // (12 * h * w)
    )  # the grid (2 floats) and the samples (1 float) per pixel
    for start in range(0, len(masks), chunk):
        b = boxes[start : start + chunk]
        gy = (ys[None, :] - b[:, 1:2]) / (b[:, 3:4] - b[:, 1:2]) * 2 - 1  # (k, H), as the per-box formula
        gx = (xs[None, :] - b[:, 0:1]) / (b[:, 2:3] - b[:, 0:1]) * 2 - 1  # (k, W)
        grid = torch.stack(torch.broadcast_tensors(gx[:, None, :], gy[:, :, None]), dim=-1)
        pasted = F.grid_sample(masks[start : start + chunk, None].float(), grid, align_corners=False)
        out[start : start + chunk] = pasted[:, 0] >= threshold
    return out


def _check_images(images: Sequence[Tensor]) -> None:
    if isinstance(images, Tensor) and images.dim() == 4:
        raise ValueError(
            "images must be a list of (3, H, W) tensors (they may differ in size), got one batched tensor of "
            f"shape {tuple(images.shape)}; pass list(images)"
        )
    if len(images) == 0:
        raise ValueError("images is empty: expected a list of at least one (3, H, W) tensor")
    for i, im in enumerate(images):
        if (
            not isinstance(im, Tensor)
            or im.dim() != 3
            or im.shape[0] != 3
            or im.shape[1] < 1
            or im.shape[2] < 1
        ):
            shape = tuple(im.shape) if isinstance(im, Tensor) else type(im).__name__
            raise ValueError(f"images[{i}]: expected a (3, H, W) RGB tensor with values 0..255, got {shape}")


def _check_targets(
    targets: Sequence[dict[str, Tensor]],
    images: Sequence[Tensor],
    *,
    num_classes: int,
    need_masks: bool,
    device: torch.device,
) -> list[dict[str, Tensor]]:
    """Validate shapes and drop boxes with no area (with their labels, masks and flags)."""
    if len(targets) != len(images):
        raise ValueError(f"got {len(images)} images but {len(targets)} targets")
    checked = []
    for i, (t, im) in enumerate(zip(targets, images)):
        for key in ("boxes", "labels") + (("masks",) if need_masks else ()):
            if key not in t:
                raise ValueError(f"targets[{i}] has no '{key}' (keys: {sorted(t)})")
        boxes, labels = t["boxes"], t["labels"]
        n = len(labels)
        if boxes.dim() != 2 or boxes.shape != (n, 4):
            raise ValueError(
                f"targets[{i}]['boxes']: expected ({n}, 4) xyxy to match labels, got {tuple(boxes.shape)}"
            )
        if labels.dtype not in (torch.int64, torch.int32):
            raise ValueError(
                f"targets[{i}]['labels']: expected int64 0-based class indices, got {labels.dtype}"
            )
        if n and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
            raise ValueError(
                f"targets[{i}]['labels']: class indices must be in [0, {num_classes}), got "
                f"[{int(labels.min())}, {int(labels.max())}] (labels are 0-based contiguous, not LVIS ids)"
            )
        if need_masks and tuple(t["masks"].shape) != (n, *im.shape[-2:]):
            raise ValueError(
                f"targets[{i}]['masks']: expected ({n}, {im.shape[-2]}, {im.shape[-1]}) (one mask per box at the "
                f"image size), got {tuple(t['masks'].shape)}"
            )
        if "is_pasted" in t and tuple(t["is_pasted"].shape) != (n,):
            raise ValueError(f"targets[{i}]['is_pasted']: expected ({n},), got {tuple(t['is_pasted'].shape)}")
        keep = nonempty(boxes.float())
        target = {k: v.to(device) for k, v in t.items()}
        for key in ("boxes", "labels", "masks", "is_pasted"):
            if key in target:
                target[key] = target[key][keep]
        target["boxes"] = target["boxes"].float()
        target["labels"] = target["labels"].long()
        checked.append(target)
    return checked


def build_backbone(cfg: ModelConfig) -> FPN:
    """ResNet (any timm ResNet name, frozen BN) or the original Swin, under an FPN P3-P7."""
    if cfg.backbone == "swin":
        s = cfg.swin
        trunk = SwinTransformer(
            embed_dim=s.embed_dim,
            depths=s.depths,
            num_heads=s.num_heads,
            window_size=s.window_size,
            drop_path_rate=s.drop_path_rate,
        )
    else:
        trunk = ResNetTrunk(name=cfg.backbone)
    return FPN(trunk, in_channels=trunk.out_channels, out_channels=cfg.fpn_channels)


def build_model(cfg: ModelConfig) -> CenterNet2:
    """The CenterNet2 of ``cfg`` (a ``[model]`` config section) with random weights.

    The federated-loss weights come from ``cfg.fed_loss_cat_info`` when set; otherwise the training engine sets them
    from the training set (``model.roi_heads.set_fed_loss_weights``).
    """
    proposal_generator = CenterNet(in_channels=cfg.fpn_channels, **dataclasses.asdict(cfg.centernet))
    roi_heads = CascadeROIHeads(
        num_classes=cfg.num_classes,
        in_channels=cfg.fpn_channels,
        strides=cfg.centernet.strides[:3],
        **dataclasses.asdict(cfg.roi_heads),
    )
    model = CenterNet2(
        backbone=build_backbone(cfg),
        proposal_generator=proposal_generator,
        roi_heads=roi_heads,
        pixel_mean=cfg.pixel_mean,
        pixel_std=cfg.pixel_std,
        size_divisibility=cfg.size_divisibility,
        amp_heads=cfg.amp_heads,
    )
    if cfg.fed_loss_cat_info:
        from .data import load_category_image_counts

        model.roi_heads.set_fed_loss_weights(
            load_category_image_counts(cfg.fed_loss_cat_info, cfg.num_classes)
        )
    return model
