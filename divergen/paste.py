"""Instance paste: generated object cutouts pasted into real training images (X-Paste / DiverGen, divergen.md §2).

Per training image, after the resize-crop and flip (the official order, divergen.md §2 step 2):

1. sample n ~ U{0, ..., max_samples - 1} instances from the pool (``cas_random``: a category uniformly among
   the pool's non-empty categories, then an instance uniformly within it; ``random``; ``cats_random``);
2. size each from the category's statistics of sqrt(box area / image area) over the training annotations
   (``size_statistics``), with a ±20% aspect jitter, or a random scale where a category has none (ImageNet
   extras); resize (cv2 bilinear, as the official) and flip;
3. place it with its centre uniformly inside the image, and composite the instances in sampling order: each
   one occludes the masks under it (real and earlier pasted ones), boxes are recomputed from the masks, and an
   instance whose box moved by more than 10 px on some side while keeping <= 300 visible pixels is dropped.

``InstancePaste`` does all three on a ``DetectionDataset`` sample; ``paste_instances`` is step 3 alone, a pure
function of already placed cutouts. ``python -m divergen.paste --config C --show N`` draws a PNG grid.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass

import cv2
import numpy as np
import torch
from PIL import Image, ImageDraw

from .config import Config, PasteConfig, load_config
from .data import CategoryInfo, DetectionDataset, train_transform
from .pool import InstancePool

logger = logging.getLogger(__name__)

SAMPLE_TYPES = ("cas_random", "random", "cats_random")
BLEND_MODES = ("basic", "alpha", "gaussian")


# ------------------------------------------------------------------------------------------- size statistics


def size_statistics(labels: np.ndarray, rel_sizes: np.ndarray, num_classes: int) -> np.ndarray:
    """Per-category mean and std of a = sqrt(box area / image area) (X-Paste ``area_mean_std2.json``).

    Arguments:
        labels: ``(A,)`` int, the 0-based category of each training annotation.
        rel_sizes: ``(A,)`` float, its sqrt(bbox_w · bbox_h / (image_w · image_h)).
        num_classes: rows of the output.

    Returns:
        ``(num_classes, 2)`` float64 ``[mean, std]`` (population std, numpy's default as the official
        notebook); NaN for a category without annotations.
    """
    labels = np.asarray(labels, dtype=np.int64)
    a = np.asarray(rel_sizes, dtype=np.float64)
    count = np.bincount(labels, minlength=num_classes)[:num_classes].astype(np.float64)
    total = np.bincount(labels, weights=a, minlength=num_classes)[:num_classes]
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = total / count
        # Two passes (deviations from the mean), not E[a²] - E[a]²: no cancellation for tight categories.
        dev = np.bincount(labels, weights=(a - mean[labels]) ** 2, minlength=num_classes)[:num_classes]
        std = np.sqrt(dev / count)
    return np.stack([mean, std], axis=1)


def load_size_statistics(
    path: str | os.PathLike, id_to_index: dict[int, int], num_classes: int
) -> np.ndarray:
    """The official ``area_mean_std2.json`` ({"<LVIS id>": [mean, std]}) as ``size_statistics`` returns it."""
    with open(path) as f:
        data = json.load(f)
    out = np.full((num_classes, 2), np.nan)
    for key, value in data.items():
        if not (key.isdigit() and isinstance(value, list) and len(value) == 2):
            raise ValueError(
                f'{path}: expected {{"<category id>": [mean, std], ...}}, got {key!r}: {value!r}'
            )
        label = id_to_index.get(int(key))
        if label is not None and label < num_classes:
            out[label] = value
    return out


# ------------------------------------------------------------------------------------------- compositing


@dataclass
class Cutout:
    """One instance ready to paste: resized, flipped, placed.

    Attributes:
        rgb: ``(h, w, 3)`` uint8.
        alpha: ``(h, w)`` uint8; the instance's mask is ``alpha > 0`` (divergen.md §2, ``_load_RGBA``).
        label: 0-based category.
        x, y: the cutout's top-left corner in image pixels; may be negative or run past the image (clipped).
        blend: "basic" (hard paste), "alpha" (alpha / 255) or "gaussian" (5×5 box-blurred mask).
        pool_index: where it came from in the instance pool (-1: unknown).
    """

    rgb: np.ndarray
    alpha: np.ndarray
    label: int
    x: int
    y: int
    blend: str = "basic"
    pool_index: int = -1


def _mask_box(mask: np.ndarray) -> np.ndarray:
    """``[x0, y0, x1 + 1, y1 + 1]`` of a 2-D bool mask (the official boxes-from-masks), zeros if empty."""
    rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    if len(rows) == 0:
        return np.zeros(4)
    return np.array([cols[0], rows[0], cols[-1] + 1, rows[-1] + 1], dtype=np.float64)


def paste_instances(
    image: np.ndarray,
    boxes: np.ndarray,
    labels: np.ndarray,
    masks: np.ndarray,
    cutouts: Sequence[Cutout],
    *,
    box_moved_thresh: float = 10.0,
    visible_pixels_thresh: int = 300,
) -> dict[str, np.ndarray]:
    """Composite ``cutouts`` in order onto an image and update its instances (X-Paste ``_copy_paste``,
    divergen.md §2 "Sequential compositing").

    For each cutout with mask m: every instance's mask loses m (real and earlier pasted ones alike); boxes are
    recomputed from the masks; an instance is kept iff its box moved by <= ``box_moved_thresh`` px on every side
    or it keeps > ``visible_pixels_thresh`` pixels; then the cutout's pixels are blended in and it becomes an
    instance with the box of its (clipped) mask. Boxes of all instances are mask-derived once something was
    pasted, as in the official code. One deliberate difference: an instance left without any visible pixel is
    always dropped (the official rule keeps a fully hidden object smaller than 10 px).

    Only the pixels under each cutout are touched, and only the instances whose box meets it are recomputed:
    the cost is the cutouts' area, not (instances × image).

    Arguments:
        image: ``(3, H, W)`` uint8, modified in place.
        boxes: ``(N, 4)`` xyxy pixels. labels: ``(N,)``. masks: ``(N, H, W)`` bool.
        cutouts: the instances to paste, in order.

    Returns:
        ``boxes`` (M, 4) float32, ``labels`` (M,) int64, ``masks`` (M, H, W) bool, ``is_pasted`` (M,) bool,
        ``cutout_index`` (M,) int64 (the position in ``cutouts``, -1 for a real instance): the surviving real
        instances first (in their order), then the surviving pasted ones.
    """
    _, height, width = image.shape
    n, p = len(boxes), len(cutouts)
    # Instance i's mask is planes[i] placed at offsets[i] (x, y). Real masks are full planes of ``out``, a copy of
    # ``masks`` that becomes the result; pasted masks stay cutout-sized until the end. np.zeros pages the
    # output in lazily: the pasted instances' planes cost memory only where they are written.
    out = np.zeros((n + p, height, width), dtype=bool)
    out[:n] = masks
    planes: list[np.ndarray] = list(out[:n])
    offsets = [(0, 0)] * n
    cur_boxes = np.zeros((n + p, 4))
    cur_boxes[:n] = boxes
    all_labels = np.concatenate([np.asarray(labels, dtype=np.int64), np.zeros(p, dtype=np.int64)])
    alive = np.zeros(n + p, dtype=bool)
    alive[:n] = True
    cutout_index = np.full(n + p, -1, dtype=np.int64)
    mask_boxes = area = None  # computed at the first paste: until then the boxes are the annotations'
    for j, c in enumerate(cutouts):
        h, w = c.alpha.shape
        x0, y0, x1, y1 = max(c.x, 0), max(c.y, 0), min(c.x + w, width), min(c.y + h, height)
        if x0 >= x1 or y0 >= y1:
            continue
        alpha = c.alpha[y0 - c.y : y1 - c.y, x0 - c.x : x1 - c.x]
        m = alpha > 0
        box = _mask_box(m)
        if box[2] == 0:
            continue
        # Shrink the window to the visible mask's own box.
        bx0, by0, bx1, by1 = box.astype(int)
        x0, y0, x1, y1 = x0 + bx0, y0 + by0, x0 + bx1, y0 + by1
        m, alpha = m[by0:by1, bx0:bx1], alpha[by0:by1, bx0:bx1]
        rgb = c.rgb[y0 - c.y : y1 - c.y, x0 - c.x : x1 - c.x]
        if mask_boxes is None:
            mask_boxes = np.zeros((n + p, 4))
            area = np.zeros(n + p, dtype=np.int64)
            for i in range(n):
                mask_boxes[i] = _mask_box(planes[i])
                area[i] = np.count_nonzero(planes[i])
        old = cur_boxes.copy()
        hit = alive & (mask_boxes[:, 0] < x1) & (mask_boxes[:, 2] > x0) & (mask_boxes[:, 1] < y1)
        hit &= (mask_boxes[:, 3] > y0) & (area > 0)
        for i in np.flatnonzero(hit):
            # The overlap of the cutout's window and instance i's mask box, in image pixels.
            ix0, iy0, ix1, iy1 = mask_boxes[i].astype(int)
            ox0, oy0, ox1, oy1 = max(x0, ix0), max(y0, iy0), min(x1, ix1), min(y1, iy1)
            (px, py), plane = offsets[i], planes[i]
            region = plane[oy0 - py : oy1 - py, ox0 - px : ox1 - px]
            cover = m[oy0 - y0 : oy1 - y0, ox0 - x0 : ox1 - x0]
            covered = np.count_nonzero(region & cover)
            if covered:
                region &= ~cover
                area[i] -= covered
                # A mask only shrinks: its new box lies inside the old one.
                inner = _mask_box(plane[iy0 - py : iy1 - py, ix0 - px : ix1 - px])
                mask_boxes[i] = inner + (np.array([ix0, iy0, ix0, iy0]) if inner[2] > 0 else 0)
        cur_boxes[alive] = mask_boxes[alive]
        moved = (np.abs(cur_boxes - old) > box_moved_thresh).any(1)
        alive &= ~moved | (area > visible_pixels_thresh)
        _blend(image, rgb, m, alpha, x0, y0, c.blend)
        k = len(planes)
        planes.append(m.copy())
        offsets.append((x0, y0))
        cur_boxes[k] = mask_boxes[k] = (x0, y0, x1, y1)
        area[k] = np.count_nonzero(m)
        all_labels[k] = c.label
        cutout_index[k] = j
        alive[k] = True
    if area is None:  # nothing pasted
        return {
            "boxes": cur_boxes[:n].astype(np.float32),
            "labels": all_labels[:n],
            "masks": out[:n],
            "is_pasted": np.zeros(n, dtype=bool),
            "cutout_index": cutout_index[:n],
        }
    keep = np.flatnonzero(alive[: len(planes)] & (area[: len(planes)] > 0))
    # Gather the kept masks into the first len(keep) planes of ``out``: real ones move forward only after a
    # drop; pasted windows are written into a plane, which is cleared first if it held a real mask.
    for j, i in enumerate(keep):
        if i < n:
            if j != i:
                out[j] = out[i]
        else:
            if j < n:
                out[j] = False
            (px, py), plane = offsets[i], planes[i]
            out[j, py : py + plane.shape[0], px : px + plane.shape[1]] = plane
    return {
        "boxes": cur_boxes[keep].astype(np.float32),
        "labels": all_labels[keep],
        "masks": out[: len(keep)],
        "is_pasted": keep >= n,
        "cutout_index": cutout_index[keep],
    }


def _blend(image: np.ndarray, rgb: np.ndarray, m: np.ndarray, alpha: np.ndarray, x0: int, y0: int, mode: str):
    """Blend ``rgb`` ``(h, w, 3)`` into ``image[:, y0:y0+h, x0:x0+w]`` (CP_METHOD, divergen.md §2)."""
    h, w = m.shape
    window = image[:, y0 : y0 + h, x0 : x0 + w]
    src = rgb.transpose(2, 0, 1)
    if mode == "basic":
        np.copyto(window, src, where=m[None])
        return
    if mode == "alpha":
        a = alpha.astype(np.float32) / 255.0
    elif mode == "gaussian":
        # The official blurs the hard mask with a 5×5 box filter over the whole canvas, where the source is 0
        # outside the cutout; here the canvas is the window: the blur of the mask's border stays inside it.
        a = cv2.blur(m.astype(np.float32), (5, 5), borderType=cv2.BORDER_CONSTANT)
    else:
        raise ValueError(f"unknown blend mode {mode!r}; expected one of {BLEND_MODES}")
    out = window.astype(np.float32) * (1.0 - a) + src.astype(np.float32) * a
    window[...] = np.clip(np.rint(out), 0, 255).astype(np.uint8)


# ------------------------------------------------------------------------------------------- the transform


class InstancePaste:
    """Sample, size, place and paste pool instances into one training sample (divergen.md §2).

    Arguments:
        pool: the instances (labels already mapped to the model's 0-based classes).
        size_stats: ``(C, 2)`` [mean, std] of sqrt(relative box area) per class (``size_statistics``); NaN rows
            (and classes >= C) use the random scale.
        sample_type: "cas_random" (class-balanced: a category uniformly among the pool's, then an instance),
            "random" (an instance uniformly) or "cats_random" (categories already in the image).
        max_samples: n ~ U{0, ..., max_samples - 1} instances per image (INST_POOL_MAX_SAMPLES = 20).
        max_rel_size: the sampled sqrt(relative area) is clipped to [min_size_px / H, max_rel_size].
        min_size_px: see ``max_rel_size`` (the official scale_min = 10 px).
        aspect_jitter: the cutout's aspect ratio is multiplied by U(1 - j, 1 + j).
        min_side: a statistics-sized instance with a side below this many pixels is not pasted.
        random_scale: always use the random scale instead of the statistics (RANDOM_SCALE).
        random_scale_range: (min, max) of the random scale factor applied to the cutout's own size.
        random_scale_min_side: a randomly scaled instance with a side below this is not pasted.
        flip_prob: horizontal flip probability of each cutout.
        blend: blend modes; one is drawn uniformly per instance (CP_METHOD).
        box_moved_thresh, visible_pixels_thresh: the occlusion rule of ``paste_instances``.
    """

    def __init__(
        self,
        pool: InstancePool,
        *,
        size_stats: np.ndarray,
        sample_type: str = "cas_random",
        max_samples: int = 20,
        max_rel_size: float = 0.5,
        min_size_px: float = 10.0,
        aspect_jitter: float = 0.2,
        min_side: int = 5,
        random_scale: bool = False,
        random_scale_range: tuple[float, float] = (0.05, 0.3),
        random_scale_min_side: int = 3,
        flip_prob: float = 0.5,
        blend: Sequence[str] = ("basic",),
        box_moved_thresh: float = 10.0,
        visible_pixels_thresh: int = 300,
    ):
        if sample_type not in SAMPLE_TYPES:
            raise ValueError(f"sample_type {sample_type!r}: expected one of {SAMPLE_TYPES}")
        if not blend or any(b not in BLEND_MODES for b in blend):
            raise ValueError(f"blend {list(blend)!r}: expected a non-empty list of {BLEND_MODES}")
        if max_samples < 1:
            raise ValueError(f"max_samples = {max_samples}: expected >= 1 (n is drawn from 0..max_samples-1)")
        self.pool, self.size_stats = pool, np.asarray(size_stats, dtype=np.float64)
        self.sample_type, self.max_samples = sample_type, max_samples
        self.max_rel_size, self.min_size_px, self.aspect_jitter = max_rel_size, min_size_px, aspect_jitter
        self.min_side, self.random_scale = min_side, random_scale
        self.random_scale_range, self.random_scale_min_side = tuple(random_scale_range), random_scale_min_side
        self.flip_prob, self.blend = flip_prob, tuple(blend)
        self.box_moved_thresh, self.visible_pixels_thresh = box_moved_thresh, visible_pixels_thresh
        self._categories = pool.categories

    def sample(self, rng: np.random.Generator, image_labels: Sequence[int] = ()) -> list[int]:
        """Pool indices of the instances to paste into one image (INST_POOL_SAMPLE_TYPE)."""
        n = int(rng.integers(0, self.max_samples))
        if n == 0 or len(self.pool) == 0:
            return []
        if self.sample_type == "random":
            return rng.integers(0, len(self.pool), n).tolist()
        cats = self._categories
        if self.sample_type == "cats_random":
            cats = np.intersect1d(cats, np.asarray(image_labels, dtype=np.int64))
            if len(cats) == 0:
                return []
        out = []
        for c in rng.choice(cats, n):
            members = self.pool.instances_of(int(c))
            out.append(int(members[rng.integers(0, len(members))]))
        return out

    def target_size(
        self, label: int, cutout_hw: tuple[int, int], image_hw: tuple[int, int], rng: np.random.Generator
    ) -> tuple[int, int] | None:
        """``(th, tw)`` pixels of a cutout of ``cutout_hw`` pasted into an image of ``image_hw``, or None when
        the official rules reject it (divergen.md §2 ``_load_RGBA``)."""
        (h, w), (height, width) = cutout_hw, image_hw
        stats = self.size_stats[label] if label < len(self.size_stats) else (np.nan, np.nan)
        if self.random_scale or not np.isfinite(stats[0]):
            s = rng.uniform(*self.random_scale_range)
            tw, th, min_side = int(w * s), int(h * s), self.random_scale_min_side
        else:
            mean, std = stats
            a = float(
                np.clip(mean + std * rng.standard_normal(), self.min_size_px / height, self.max_rel_size)
            )
            area = a * a * height * width
            r = (w / h) * rng.uniform(1.0 - self.aspect_jitter, 1.0 + self.aspect_jitter)
            tw_f = math.sqrt(r * area)
            tw, th, min_side = int(tw_f), int(tw_f / r), self.min_side
        if tw < min_side or th < min_side or tw >= width or th >= height:
            return None
        return th, tw

    def cutouts(self, rng: np.random.Generator, image_hw: tuple[int, int], image_labels=()) -> list[Cutout]:
        """Sampled, loaded, sized, flipped and placed instances for one image. Unreadable pool files (counted in
        ``pool.num_skipped``) and rejected sizes are left out, so fewer than the n drawn may come back."""
        height, width = image_hw
        out = []
        for index in self.sample(rng, image_labels):
            rgba = self.pool.load(index)
            if rgba is None:
                continue
            label = int(self.pool.labels[index])
            size = self.target_size(label, rgba.shape[:2], image_hw, rng)
            if size is None:
                continue
            th, tw = size
            rgba = cv2.resize(rgba, (tw, th), interpolation=cv2.INTER_LINEAR)
            if rng.uniform() < self.flip_prob:
                rgba = rgba[:, ::-1]
            # The cutout's centre lands uniformly inside the image (the official random_start_xy).
            cx, cy = tw // 2, th // 2
            x, y = int(rng.integers(-cx, width - cx)), int(rng.integers(-cy, height - cy))
            blend = (
                self.blend[int(rng.integers(0, len(self.blend)))] if len(self.blend) > 1 else self.blend[0]
            )
            out.append(Cutout(rgba[..., :3], np.ascontiguousarray(rgba[..., 3]), label, x, y, blend, index))
        return out

    def __call__(self, sample: dict, rng: np.random.Generator) -> dict:
        """Paste into a ``DetectionDataset`` sample (``image`` (3, H, W) uint8, ``boxes``, ``labels``,
        ``masks``). Returns a new dict with those keys, ``is_pasted`` (N,) bool and ``pool_index`` (N,) int64
        (each pasted instance's index in the pool, -1 for real ones); the input is not modified, so the caller
        keeps the un-pasted crop (BSGAL trains on it when it rejects the pasted batch)."""
        image = sample["image"]
        labels = sample["labels"]
        cutouts = self.cutouts(rng, tuple(image.shape[1:]), labels.tolist())
        if not cutouts:
            return {
                "image": image,
                "boxes": sample["boxes"],
                "labels": labels,
                "masks": sample["masks"],
                "is_pasted": torch.zeros(len(labels), dtype=torch.bool),
                "pool_index": torch.full((len(labels),), -1, dtype=torch.int64),
            }
        pasted_image = image.numpy().copy()
        out = paste_instances(
            pasted_image,
            sample["boxes"].numpy(),
            labels.numpy(),
            sample["masks"].numpy(),
            cutouts,
            box_moved_thresh=self.box_moved_thresh,
            visible_pixels_thresh=self.visible_pixels_thresh,
        )
        source = out.pop("cutout_index")
        pool_index = np.where(source >= 0, np.array([c.pool_index for c in cutouts] + [-1])[source], -1)
        return {
            "image": torch.from_numpy(pasted_image),
            **{k: torch.from_numpy(v) for k, v in out.items()},
            "pool_index": torch.from_numpy(pool_index),
        }


# ------------------------------------------------------------------------------------------- building


# The official DiverGen metadata gives each of its 250 extra ImageNet classes image_count 2000 and frequency "c"
# (divergen.md §1.1); classes beyond the dataset's are treated the same way here (frequency group, federated-loss
# sampling weight).
EXTRA_CLASS_FREQUENCY = "c"
EXTRA_CLASS_IMAGE_COUNT = 2000


def build_pool(cfg: PasteConfig, categories: CategoryInfo, num_classes: int) -> InstancePool:
    """The ``[paste]`` section's filtered instance pool for a training set's categories.

    Pool labels: LVIS ids through the dataset's categories; ids beyond them continue after its last class
    (LVIS 1203 + ImageNet 1204..1453), up to ``num_classes``. ``paste.frequencies`` keeps the pool categories
    of those LVIS groups; extra classes count as common, as in the official metadata.
    """
    freq = list(categories.frequency) + [EXTRA_CLASS_FREQUENCY] * max(num_classes - categories.num_classes, 0)
    return InstancePool(
        cfg.pool,
        id_to_index=categories.id_to_index,
        num_classes=num_classes,
        min_clip_score=cfg.min_clip_score if math.isfinite(cfg.min_clip_score) else None,
        min_inter_similarity=cfg.min_inter_similarity if math.isfinite(cfg.min_inter_similarity) else None,
        generators=tuple(cfg.generators),
        labels={c for c in range(num_classes) if freq[c] in cfg.frequencies},
    )


def build_instance_paste(cfg: PasteConfig, dataset: DetectionDataset, num_classes: int) -> InstancePaste:
    """The ``[paste]`` section's ``InstancePaste`` for a training set (its category ids and size statistics)."""
    cats = dataset.categories
    pool = build_pool(cfg, cats, num_classes)
    if len(pool) == 0:
        raise ValueError(f"paste.pool = {cfg.pool!r}: no instance left after filtering ({pool.summary()})")
    if cfg.size_stats:
        stats = load_size_statistics(cfg.size_stats, cats.id_to_index, num_classes)
    else:
        stats = dataset.size_stats
    logger.info(f"instance pool: {pool.summary()}")
    return InstancePaste(
        pool,
        size_stats=stats,
        sample_type=cfg.sample_type,
        max_samples=cfg.max_samples,
        max_rel_size=cfg.max_rel_size,
        min_size_px=cfg.min_size_px,
        aspect_jitter=cfg.aspect_jitter,
        min_side=cfg.min_side,
        random_scale=cfg.random_scale,
        random_scale_range=tuple(cfg.random_scale_range),
        random_scale_min_side=cfg.random_scale_min_side,
        flip_prob=cfg.flip_prob,
        blend=tuple(cfg.blend),
        box_moved_thresh=cfg.box_moved_thresh,
        visible_pixels_thresh=cfg.visible_pixels_thresh,
    )


def build_train_dataset(
    cfg: Config, *, return_original: bool = False, return_reference: bool = False
) -> DetectionDataset:
    """The training set of ``cfg``: resize-crop + flip, then instance paste when ``paste.enabled``; with BSGAL's
    un-pasted crops (``return_original``) and reference images (``return_reference``)."""
    dataset = DetectionDataset(
        cfg.data.train_json,
        cfg.data.train_image_root,
        transform=train_transform(cfg.data.train_size, tuple(cfg.data.scale_range)),
        filter_empty=cfg.data.filter_empty,
        load_masks=cfg.model.roi_heads.mask_on or cfg.paste.enabled,
        return_original=return_original,
        return_reference=return_reference,
    )
    if cfg.paste.enabled:
        dataset.paste = build_instance_paste(cfg.paste, dataset, cfg.model.num_classes)
    return dataset


# ------------------------------------------------------------------------------------------- the picture


def draw_samples(samples: Sequence[dict], names: Sequence[str], *, columns: int = 4) -> Image.Image:
    """A grid of training samples: masks tinted, boxes drawn (green = real, red = pasted), class names."""
    tiles = []
    for s in samples:
        image = s["image"].permute(1, 2, 0).numpy().astype(np.float32)
        masks, pasted = (
            s["masks"].numpy(),
            s.get("is_pasted", torch.zeros(len(s["labels"]), dtype=torch.bool)),
        )
        for m, p in zip(masks, pasted.tolist(), strict=True):
            colour = np.array((255, 60, 60) if p else (60, 255, 60), dtype=np.float32)
            image[m] = 0.6 * image[m] + 0.4 * colour
        tile = Image.fromarray(image.astype(np.uint8))
        draw = ImageDraw.Draw(tile)
        for box, label, p in zip(s["boxes"].tolist(), s["labels"].tolist(), pasted.tolist(), strict=True):
            colour = (255, 0, 0) if p else (0, 200, 0)
            draw.rectangle(box, outline=colour, width=1)
            name = names[label] if label < len(names) else f"class {label}"
            draw.text((box[0] + 2, box[1] + 1), name, fill=colour)
        tiles.append(tile)
    tw, th = max(t.width for t in tiles), max(t.height for t in tiles)
    rows = math.ceil(len(tiles) / columns)
    grid = Image.new("RGB", (columns * tw, rows * th), (255, 255, 255))
    for i, t in enumerate(tiles):
        grid.paste(t, ((i % columns) * tw, (i // columns) * th))
    return grid


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description="Write a PNG grid of training samples with generated instances pasted in (divergen.md §2)."
    )
    parser.add_argument("--config", required=True, help="a training config with a [paste] section")
    parser.add_argument("--show", type=int, default=16, metavar="N", help="number of samples")
    parser.add_argument("--out", default="paste_samples.png", help="output PNG")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    cfg = load_config(args.config, ["paste.enabled=true", *args.set])
    dataset = build_train_dataset(cfg)
    rng = np.random.default_rng(args.seed)
    samples = []
    for index in rng.permutation(len(dataset)):
        sample = dataset[(int(index), int(rng.integers(2**31)))]
        if sample is not None:
            samples.append(sample)
        if len(samples) == args.show:
            break
    names = list(dataset.categories.names)
    names += [f"extra {c}" for c in range(len(names), cfg.model.num_classes)]
    draw_samples(samples, names).save(args.out)
    pasted = sum(int(s["is_pasted"].sum()) for s in samples)
    logger.info(f"wrote {args.out}: {len(samples)} samples, {pasted} pasted instances")


if __name__ == "__main__":
    main()
