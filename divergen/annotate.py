"""Stage 3 of the generation pipeline: SAM-background annotation (divergen.md §1.2, §1.4, §7).

The official ``segmentation/get_background_sam_mask.py`` clicks the 4 image corners as *positive* points on the
background (generated objects sit on a white background), asks SAM for its 3 multimask outputs, takes ``masks[2]``
as the background and inverts it; the pool builder then keeps the largest connected component (holes filled) and
crops its tight box (§1.4). This module does the same in one step and writes RGBA cutouts (tight crop, alpha 255
inside / 0 outside) that ``pool.jsonl`` can list as they are.

One deliberate difference: the official takes ``masks[2]`` blindly, and SAM's ambiguity outputs are not ordered
"whole background last", so it can invert the object or keep half the background (§6 item 8). Here
``choose_background`` picks the candidate that contains the clicked corners, by predicted IoU among those;
``official_index=True`` restores ``masks[2]``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from .generators import is_readable_image, save_image_atomic
from .pool import largest_component

logger = logging.getLogger(__name__)

# The official checkpoints (segment-anything README); DiverGen uses ViT-H (``build_sam == build_sam_vit_h``).
SAM_CHECKPOINTS = {
    "vit_h": "sam_vit_h_4b8939.pth",
    "vit_l": "sam_vit_l_0b3195.pth",
    "vit_b": "sam_vit_b_01ec64.pth",
}
SAM_URL = "https://dl.fbaipublicfiles.com/segment_anything/"
# Default area bounds: the official pool builder keeps (0.01, 1.0) (divergen.md §1.4); 0.95 as X-Paste's filter.
MIN_AREA, MAX_AREA = 0.01, 0.95
# Reasons an image gives no cutout; ``annotate_to_disk`` counts each under this name.
REJECT_REASONS = ("empty", "full", "too_small", "too_large")
_ANNOTATE_KEYWORDS = {"margin", "min_area", "max_area", "official_index"}
_READ_ERRORS = (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError)


def load_sam(checkpoint: str | os.PathLike, *, model_type: str = "vit_h", device: str | torch.device) -> Any:
    """Build SAM from a trained checkpoint and wrap it in a ``segment_anything.SamPredictor``.

    Arguments:
        checkpoint: the ``.pth`` state dict (``sam_vit_h_4b8939.pth`` for the official ViT-H).
        model_type: a key of ``segment_anything.sam_model_registry`` ("vit_h", "vit_l", "vit_b").
        device: where the model runs.

    A missing checkpoint raises ``FileNotFoundError``: the official DATA.md omits ``--sam_checkpoint_path`` and
    silently annotates with an *untrained* SAM (divergen.md §6.1); that never happens here. A checkpoint for
    another ``model_type`` raises ``RuntimeError`` naming the file.
    """
    from segment_anything import SamPredictor, sam_model_registry

    if model_type not in sam_model_registry:
        raise ValueError(f"load_sam: model_type {model_type!r} is not one of {sorted(sam_model_registry)}")
    path = Path(checkpoint) if checkpoint is not None else None
    if path is None or not path.is_file():
        name = SAM_CHECKPOINTS.get(model_type, SAM_CHECKPOINTS["vit_h"])
        raise FileNotFoundError(
            f"SAM checkpoint {checkpoint!r} not found: download {name} from {SAM_URL}{name} "
            f"(the official DiverGen annotation uses vit_h, {SAM_CHECKPOINTS['vit_h']})"
        )
    # Built without a checkpoint, then loaded onto the CPU first: the builder's own torch.load has no
    # map_location, so a checkpoint saved from a GPU would fail on a CPU-only machine.
    sam = sam_model_registry[model_type]()
    state = torch.load(path, map_location="cpu", weights_only=True)
    try:
        sam.load_state_dict(state)
    except RuntimeError as e:
        raise RuntimeError(f"{path}: not a SAM {model_type} checkpoint ({e})") from e
    sam.to(device).eval()
    return SamPredictor(sam)


def corner_points(height: int, width: int, margin: int = 0) -> np.ndarray:
    """``(4, 2)`` int64 ``(x, y)`` points: the 4 image corners moved ``margin`` px inwards (divergen.md §1.2).

    Order: top-left, top-right, bottom-left, bottom-right. The official lists
    ``[[m, m], [0, W-1-m], [H-1-m, m], [H-1-m, W-1-m]]`` (x/y swapped, and no margin on one x): the same 4 points
    for the square images and ``margin=0`` that DATA.md uses; here x is a column and y a row for any shape.
    """
    if not 0 <= 2 * margin < min(height, width):
        raise ValueError(f"corner_points: margin {margin} does not fit a {width}x{height} image")
    x0, y0, x1, y1 = margin, margin, width - 1 - margin, height - 1 - margin
    return np.array([[x0, y0], [x1, y0], [x0, y1], [x1, y1]], dtype=np.int64)


def choose_background(masks: np.ndarray, scores: np.ndarray, points: np.ndarray) -> int:
    """The index of the SAM candidate that is the background, among ``masks``.

    Arguments:
        masks: ``(K, H, W)`` bool, SAM's candidates for the corner clicks (``K = 3`` with multimask output).
        scores: ``(K,)`` float, SAM's predicted IoU of each candidate.
        points: ``(P, 2)`` int ``(x, y)``, the clicked background points (``corner_points``).

    Rule (the official always takes index 2, divergen.md §6 item 8): rank the candidates by, in order,
    (1) how many clicked points they contain: a background mask must hold every corner, while SAM's smaller
    outputs are often the object or one corner's patch of background; (2) whether they leave any pixel as
    foreground: a mask of the whole image contains every corner but cuts nothing out; (3) predicted IoU.
    Remaining ties go to the lowest index.
    """
    masks = np.asarray(masks, dtype=bool)
    scores = np.asarray(scores, dtype=np.float64)
    points = np.asarray(points)
    if masks.ndim != 3 or scores.shape != masks.shape[:1] or points.ndim != 2 or points.shape[1] != 2:
        raise ValueError(
            f"choose_background: expected masks (K, H, W), scores (K,), points (P, 2), got "
            f"{masks.shape}, {scores.shape}, {points.shape}"
        )
    h, w = masks.shape[1:]
    xs, ys = points[:, 0].astype(np.int64), points[:, 1].astype(np.int64)
    if (xs < 0).any() or (xs >= w).any() or (ys < 0).any() or (ys >= h).any():
        raise ValueError(f"choose_background: points {points.tolist()} fall outside the {w}x{h} masks")
    inside = masks[:, ys, xs].sum(axis=1)
    leaves_foreground = ~masks.reshape(len(masks), -1).all(axis=1)
    keys = [(int(inside[k]), bool(leaves_foreground[k]), float(scores[k]), -k) for k in range(len(masks))]
    return max(range(len(masks)), key=keys.__getitem__)


@dataclass
class Annotation:
    """One image's annotation.

    ``rgba``: ``(h, w, 4)`` uint8 RGBA, the tight crop of the foreground (alpha 255 inside, 0 outside), or
    ``None`` when the image is rejected. ``mask``: ``(H, W)`` bool on the full image, the foreground that was
    measured (largest component, holes filled), kept for rejected images too. ``reason``: ``None`` or one of
    ``REJECT_REASONS``. ``area_fraction``: ``mask.mean()``.
    """

    rgba: np.ndarray | None
    mask: np.ndarray | None
    reason: str | None
    area_fraction: float


def _as_rgb(image: Image.Image | np.ndarray) -> np.ndarray:
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"))
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(
            f"annotate_image: expected a PIL image or (H, W, 3) uint8, got {image.shape} {image.dtype}"
        )
    return image


def _check_area(min_area: float, max_area: float) -> None:
    if not 0.0 <= min_area <= max_area <= 1.0:
        raise ValueError(
            f"annotate_image: expected 0 <= min_area <= max_area <= 1, got {min_area}, {max_area}"
        )


def annotate_image(
    predictor: Any,
    image: Image.Image | np.ndarray,
    *,
    margin: int = 0,
    min_area: float = MIN_AREA,
    max_area: float = MAX_AREA,
    official_index: bool = False,
) -> Annotation:
    """Cut the generated object out of ``image`` with SAM-background (divergen.md §1.2, then §1.4).

    Arguments:
        predictor: a ``SamPredictor`` (or anything with ``set_image(rgb)`` and ``predict(point_coords=,
            point_labels=, multimask_output=True) -> (masks (3, H, W) bool, scores (3,), logits)``).
        image: a PIL image (converted to RGB) or ``(H, W, 3)`` uint8 RGB.
        margin: corner-click inset in px (DATA.md: ``--corner_margin 0``).
        min_area, max_area: keep the foreground only if its area fraction lies in ``[min_area, max_area]``
            (the official pool builder keeps ``(0.01, 1.0)``; 0.95 also drops "everything but a corner" masks,
            as X-Paste's area filter does, §1.2).
        official_index: take ``masks[2]`` as the official does instead of ``choose_background``.

    The 4 corners are positive clicks; the chosen background is inverted; the foreground's largest connected
    component (``pool.largest_component``, holes filled) is kept and cropped to its tight box. Rejected, with
    ``rgba=None``: an empty foreground ("empty"), one covering every pixel ("full"), or an area fraction
    outside the bounds ("too_small" / "too_large").
    """
    _check_area(min_area, max_area)
    rgb = _as_rgb(image)
    h, w = rgb.shape[:2]
    points = corner_points(h, w, margin)
    predictor.set_image(rgb)
    masks, scores, _ = predictor.predict(
        point_coords=points.astype(np.float32),
        point_labels=np.ones(len(points), np.int64),
        multimask_output=True,
    )
    masks = np.asarray(masks, dtype=bool)
    if masks.shape != (3, h, w):
        raise ValueError(
            f"annotate_image: the predictor returned masks {masks.shape}, expected (3, {h}, {w})"
        )
    index = 2 if official_index else choose_background(masks, scores, points)
    foreground = largest_component(~masks[index])
    area = float(foreground.mean())
    reason = None
    if area == 0.0:
        reason = "empty"
    elif area == 1.0:
        reason = "full"
    elif area < min_area:
        reason = "too_small"
    elif area > max_area:
        reason = "too_large"
    if reason is not None:
        return Annotation(rgba=None, mask=foreground, reason=reason, area_fraction=area)
    rows, cols = np.nonzero(foreground.any(axis=1))[0], np.nonzero(foreground.any(axis=0))[0]
    y0, y1, x0, x1 = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
    rgba = np.empty((y1 - y0, x1 - x0, 4), dtype=np.uint8)
    rgba[..., :3] = rgb[y0:y1, x0:x1]
    rgba[..., 3] = foreground[y0:y1, x0:x1] * np.uint8(255)
    return Annotation(rgba=rgba, mask=foreground, reason=None, area_fraction=area)


def annotate_to_disk(
    predictor: Any, items: Iterable[tuple[Path, Path]], *, progress: bool = False, **kw: Any
) -> dict[str, int]:
    """Annotate each ``(generated PNG, output cutout PNG)`` pair, resumably.

    Arguments:
        predictor: as for ``annotate_image``.
        items: ``(input image, output RGBA PNG)`` path pairs.
        progress: show a tqdm bar over items.
        **kw: ``annotate_image`` keywords (``margin``, ``min_area``, ``max_area``, ``official_index``).

    An output that exists and is readable is skipped (a truncated one is redone); cutouts are written atomically
    (temporary file, then ``os.replace``). An input that fails to decode ("unreadable"), a rejected image (one
    count per ``REJECT_REASONS`` entry) or a predictor error ("failed") is logged and counted; the run goes on.
    Rejected images write nothing, so a rerun tries them again. Returns the counts: ``"written"``,
    ``"skipped_existing"``, ``"unreadable"``, ``"failed"`` and each reason, all present.
    """
    # Checked here, not per image: a bad keyword would otherwise count every image as "failed".
    unknown = set(kw) - _ANNOTATE_KEYWORDS
    if unknown:
        raise TypeError(
            f"annotate_to_disk: unknown keywords {sorted(unknown)}, expected {sorted(_ANNOTATE_KEYWORDS)}"
        )
    _check_area(kw.get("min_area", MIN_AREA), kw.get("max_area", MAX_AREA))
    counts = dict.fromkeys(("written", "skipped_existing", "unreadable", "failed", *REJECT_REASONS), 0)
    items = list(items)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(items), desc="annotate")
    for src, dst in items:
        src, dst = Path(src), Path(dst)
        if bar is not None:
            bar.update(1)
        if dst.exists():
            if is_readable_image(dst):
                counts["skipped_existing"] += 1
                continue
            logger.warning("%s is not a readable PNG; annotating %s again", dst, src)
        try:
            with Image.open(src) as f:
                image = np.asarray(f.convert("RGB"))
        except _READ_ERRORS as e:
            logger.warning("%s: cannot decode the image (%s); skipped", src, e)
            counts["unreadable"] += 1
            continue
        try:
            result = annotate_image(predictor, image, **kw)
        except Exception:  # one bad image must not end a run over a million; logged with its traceback
            logger.exception("%s: annotation failed", src)
            counts["failed"] += 1
            continue
        if result.reason is not None:
            logger.info(
                "%s: rejected (%s, foreground %.2f%% of the image)",
                src,
                result.reason,
                100 * result.area_fraction,
            )
            counts[result.reason] += 1
            continue
        save_image_atomic(Image.fromarray(result.rgba), dst)
        counts["written"] += 1
    if bar is not None:
        bar.close()
    logger.info("annotate: %s", counts)
    return counts
