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

X-Paste's alternative (§1.2) segments each image with several segmenters and keeps, per image, the mask whose
cut-out has the highest CLIP score against the category text. ``ClipSegAnnotator`` is its text-prompted CLIPSeg
member (without X-Paste's MatteFormer refinement); ``SamAnnotator`` and ``ClipSegAnnotator`` share one interface
(``name``, ``__call__(image, category_name) -> Annotation``) and one post-processing (``cut_out``), and
``annotate_with`` runs several of them on an image and keeps the max-CLIP-score cut-out (``choose_by_clip``).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from PIL import Image

from .clip_filter import ClipScorer, clip_scores
from .generators import is_readable_image, save_image_atomic
from .hub import hf_from_pretrained
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
# X-Paste ``segment_methods/reseg.py``: the CLIPSeg text is "a photo of {name}" ("_" -> " "), and its mask is the
# (matting-refined, min-max renormalised) probability map > 128/255, i.e. a 0.5 threshold on the probability.
CLIPSEG_MODEL = "CIDAS/clipseg-rd64-refined"
CLIPSEG_PROMPT = "a photo of {}"
CLIPSEG_THRESHOLD = 0.5
# What PIL raises on a file that is not a decodable image.
READ_ERRORS = (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError)


def load_sam(checkpoint: str | os.PathLike, *, model_type: str = "vit_h", device: str | torch.device) -> Any:
    """Build SAM from a trained checkpoint and wrap it in a ``segment_anything.SamPredictor``.

    Arguments:
        checkpoint: the ``.pth`` state dict (``sam_vit_h_4b8939.pth`` for the official ViT-H).
        model_type: a key of ``segment_anything.sam_model_registry`` ("vit_h", "vit_l", "vit_b"), or "tiny": the
            small SAM of ``divergen.tiny_models.build_tiny_sam`` (demo and tests; ``tiny_models.save_tiny_sam``
            writes its checkpoint).
        device: where the model runs.

    A missing checkpoint raises ``FileNotFoundError``: the official DATA.md omits ``--sam_checkpoint_path`` and
    silently annotates with an *untrained* SAM (divergen.md §6.1); that never happens here. A checkpoint for
    another ``model_type`` raises ``RuntimeError`` naming the file.
    """
    from segment_anything import SamPredictor, sam_model_registry

    from .tiny_models import build_tiny_sam

    builders = {**sam_model_registry, "tiny": build_tiny_sam}
    if model_type not in builders:
        raise ValueError(f"load_sam: model_type {model_type!r} is not one of {sorted(builders)}")
    path = Path(checkpoint) if checkpoint is not None else None
    if path is None or not path.is_file():
        if model_type == "tiny":
            raise FileNotFoundError(
                f"SAM checkpoint {checkpoint!r} not found: write a tiny one with "
                "divergen.tiny_models.save_tiny_sam(path)"
            )
        name = SAM_CHECKPOINTS.get(model_type, SAM_CHECKPOINTS["vit_h"])
        raise FileNotFoundError(
            f"SAM checkpoint {checkpoint!r} not found: download {name} from {SAM_URL}{name} "
            f"(the official DiverGen annotation uses vit_h, {SAM_CHECKPOINTS['vit_h']})"
        )
    # Built without a checkpoint, then loaded onto the CPU first: the builder's own torch.load has no
    # map_location, so a checkpoint saved from a GPU would fail on a CPU-only machine.
    sam = builders[model_type]()
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


def _as_rgb(image: Image.Image | np.ndarray, where: str = "annotate_image") -> np.ndarray:
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"))
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"{where}: expected a PIL image or (H, W, 3) uint8, got {image.shape} {image.dtype}")
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

    The 4 corners are positive clicks; the chosen background is inverted, and ``cut_out`` keeps the largest
    connected component (holes filled), crops it to its tight box, or rejects it by area (``rgba=None``, with
    ``reason`` one of ``REJECT_REASONS``).
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
    return cut_out(rgb, ~masks[index], min_area=min_area, max_area=max_area)


def cut_out(
    rgb: np.ndarray, foreground: np.ndarray, *, min_area: float = MIN_AREA, max_area: float = MAX_AREA
) -> Annotation:
    """The post-processing every annotator shares (divergen.md §1.4): keep the largest connected component of
    ``foreground`` (``pool.largest_component``, holes filled), reject it by area, crop it to its tight box.

    Arguments:
        rgb: ``(H, W, 3)`` uint8, the image.
        foreground: ``(H, W)`` bool, the annotator's raw object mask.
        min_area, max_area: the accepted area fractions, bounds included (see ``annotate_image``).

    Rejected, with ``rgba=None``: an empty foreground ("empty"), one covering every pixel ("full"), or an area
    fraction outside the bounds ("too_small" / "too_large").
    """
    _check_area(min_area, max_area)
    rgb = _as_rgb(rgb, "cut_out")
    foreground = np.asarray(foreground, dtype=bool)
    if foreground.shape != rgb.shape[:2]:
        raise ValueError(f"cut_out: foreground {foreground.shape} does not match the image {rgb.shape[:2]}")
    foreground = largest_component(foreground)
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


# ------------------------------------------------------------------------------------------------ CLIPSeg


def load_clipseg(model: str | os.PathLike = CLIPSEG_MODEL, *, device: str | torch.device) -> tuple[Any, Any]:
    """``(CLIPSegForImageSegmentation, CLIPSegProcessor)`` from a local directory or a Hugging Face hub id.

    Arguments:
        model: a directory written by ``save_pretrained`` (``divergen.tiny_models.save_tiny_clipseg`` for tests)
            or a hub id; the default is the transformers port of CLIPSeg ViT-B/16 with the refined decoder
            (X-Paste used the original repository's ``rd64-uni.pth``, the same architecture without refinement).
        device: where the model runs.

    A local path that does not exist is a ``FileNotFoundError``; a hub id that cannot be fetched (offline) is an
    ``OSError`` that says how to download it first.
    """
    from transformers import CLIPSegForImageSegmentation, CLIPSegProcessor

    net = hf_from_pretrained(CLIPSegForImageSegmentation, model, what="CLIPSeg model")
    processor = hf_from_pretrained(CLIPSegProcessor, model, what="CLIPSeg processor")
    net.to(device).eval()
    logger.info("loaded CLIPSeg %s on %s", model, device)
    return net, processor


@torch.no_grad()
def clipseg_mask(
    model: Any,
    processor: Any,
    image: Image.Image | np.ndarray,
    text: str,
    *,
    threshold: float = CLIPSEG_THRESHOLD,
) -> np.ndarray:
    """``(H, W)`` bool: where CLIPSeg finds ``text`` in ``image``.

    The processor resizes the image to the model's square input (352 px); the ``(352, 352)`` logits are upsampled
    bilinearly to the image's ``(H, W)`` and ``sigmoid(logits) > threshold`` is the mask (X-Paste upsamples the
    probabilities and thresholds at 128/255 after a matting refinement we do not run, divergen.md §1.2).

    Arguments:
        model: a ``CLIPSegForImageSegmentation`` (``load_clipseg``).
        processor: its ``CLIPSegProcessor``.
        image: a PIL image (converted to RGB) or ``(H, W, 3)`` uint8 RGB.
        text: the text prompt, e.g. ``CLIPSEG_PROMPT.format("aerosol can")``.
        threshold: on the probability, in ``(0, 1)``.
    """
    if not 0.0 < threshold < 1.0:
        raise ValueError(f"clipseg_mask: expected 0 < threshold < 1, got {threshold}")
    rgb = _as_rgb(image, "clipseg_mask")
    h, w = rgb.shape[:2]
    inputs = processor(text=[text], images=[Image.fromarray(rgb)], padding=True, return_tensors="pt")
    device = next(model.parameters()).device
    logits = model(**{k: v.to(device) for k, v in inputs.items()}).logits
    # (1, S, S) here; older transformers squeezed a batch of one down to (S, S).
    logits = logits.float().reshape(1, 1, *logits.shape[-2:])
    logits = torch.nn.functional.interpolate(logits, size=(h, w), mode="bilinear", align_corners=False)
    return (torch.sigmoid(logits[0, 0]) > threshold).cpu().numpy()


# ------------------------------------------------------------------------------------------------ annotators


class Annotator(Protocol):
    """What ``annotate_with`` and ``annotate_to_disk`` run: ``name`` (unique among the annotators of one run) and
    ``__call__(image (H, W, 3) uint8 RGB, category_name) -> Annotation``. ``uses_category_name`` says whether
    the category name matters (``annotate_to_disk`` then requires it with every item)."""

    name: str
    uses_category_name: bool

    def __call__(self, image: np.ndarray, category_name: str) -> Annotation: ...


class SamAnnotator:
    """SAM-background (divergen.md §1.2, ``annotate_image``); the category name is not used.

    Arguments:
        predictor: a ``SamPredictor`` (``load_sam``).
        name: the annotator's name in ``AnnotatorChoice`` and the ``annotate_to_disk`` counts.
        margin, min_area, max_area, official_index: as for ``annotate_image``.
    """

    uses_category_name = False

    def __init__(
        self,
        predictor: Any,
        *,
        name: str = "sam",
        margin: int = 0,
        min_area: float = MIN_AREA,
        max_area: float = MAX_AREA,
        official_index: bool = False,
    ):
        _check_area(min_area, max_area)
        self.predictor, self.name = predictor, name
        self.kw = {
            "margin": margin,
            "min_area": min_area,
            "max_area": max_area,
            "official_index": official_index,
        }

    def __call__(self, image: np.ndarray, category_name: str = "") -> Annotation:
        return annotate_image(self.predictor, image, **self.kw)


class ClipSegAnnotator:
    """CLIPSeg with the text ``prompt.format(category name with "_" -> " ")``, then ``cut_out`` (X-Paste's
    text-prompted segmenter, divergen.md §1.2).

    Arguments:
        model, processor: from ``load_clipseg``.
        name: the annotator's name in ``AnnotatorChoice`` and the ``annotate_to_disk`` counts.
        threshold: on CLIPSeg's probability (``clipseg_mask``).
        prompt: a format string with one ``{}`` for the name; X-Paste's "a photo of {}" by default.
        min_area, max_area: as for ``cut_out``.
    """

    uses_category_name = True

    def __init__(
        self,
        model: Any,
        processor: Any,
        *,
        name: str = "clipseg",
        threshold: float = CLIPSEG_THRESHOLD,
        prompt: str = CLIPSEG_PROMPT,
        min_area: float = MIN_AREA,
        max_area: float = MAX_AREA,
    ):
        _check_area(min_area, max_area)
        if not 0.0 < threshold < 1.0:
            raise ValueError(f"ClipSegAnnotator: expected 0 < threshold < 1, got {threshold}")
        if "{}" not in prompt:
            raise ValueError(f"ClipSegAnnotator: prompt {prompt!r} has no '{{}}' for the category name")
        self.model, self.processor, self.name = model, processor, name
        self.threshold, self.prompt, self.min_area, self.max_area = threshold, prompt, min_area, max_area

    def __call__(self, image: np.ndarray, category_name: str) -> Annotation:
        if not category_name:
            raise ValueError(f"{self.name}: CLIPSeg needs the category name as its text prompt, got none")
        rgb = _as_rgb(image, self.name)
        text = self.prompt.format(category_name.replace("_", " "))
        mask = clipseg_mask(self.model, self.processor, rgb, text, threshold=self.threshold)
        return cut_out(rgb, mask, min_area=self.min_area, max_area=self.max_area)


# ------------------------------------------------------------------------------------------------ max-CLIP choice


def annotation_clip_scores(annotations: Sequence[Annotation], scorer: ClipScorer, name: str) -> np.ndarray:
    """``(K,)`` float32: ``clip_filter.clip_scores`` of each annotation's cut-out against ``name`` (the stage-4
    CLIP score: ``score_view``, "a photo of a single {name}"), NaN for a rejected annotation (``rgba is None``).

    X-Paste composites on white and scores against "a photo of {name}" (divergen.md §1.2); we use the score that
    stage 4 records, so the winner's score is its ``clip_score`` in ``pool.jsonl``.
    """
    scores = np.full(len(annotations), np.nan, dtype=np.float32)
    valid = [i for i, a in enumerate(annotations) if a.rgba is not None]
    if valid:
        cutouts = [annotations[i].rgba for i in valid]
        scores[valid] = clip_scores(scorer, cutouts, [name] * len(valid))
    return scores


def _first_max(scores: np.ndarray) -> int | None:
    if np.isnan(scores).all():
        return None
    return int(np.nanargmax(scores))  # the first index on a tie


def choose_by_clip(annotations: Sequence[Annotation], scorer: ClipScorer, name: str) -> int | None:
    """The index of the annotation whose cut-out has the highest CLIP score against ``name`` (X-Paste's per-image
    choice among segmenters, divergen.md §1.2); the first one on a tie; ``None`` when every one is rejected.
    Scores as ``annotation_clip_scores``."""
    return _first_max(annotation_clip_scores(annotations, scorer, name))


@dataclass
class AnnotatorChoice:
    """``annotate_with``'s result for one image.

    ``annotation``: the chosen one; when every annotator rejected the image, the first annotator's (rejected)
    one. ``annotator``: the winner's name, ``None`` when all rejected. ``scores``: ``{annotator name: CLIP
    score}`` (NaN for a rejection; empty when one annotator ran without a scorer). ``annotations``: every
    annotator's result, by name.
    """

    annotation: Annotation
    annotator: str | None
    scores: dict[str, float] = field(default_factory=dict)
    annotations: dict[str, Annotation] = field(default_factory=dict)


def annotate_with(
    annotators: Sequence[Annotator],
    image: Image.Image | np.ndarray,
    category_name: str,
    *,
    scorer: ClipScorer | None = None,
) -> AnnotatorChoice:
    """Run every annotator on ``image`` and keep the cut-out with the highest CLIP score (``choose_by_clip``).

    Arguments:
        annotators: one or more annotators with distinct names, in priority order (ties go to the first).
        image: a PIL image (converted to RGB) or ``(H, W, 3)`` uint8 RGB.
        category_name: the category's name (LVIS form, ``"_"`` allowed); CLIPSeg's text and the CLIP text.
        scorer: the CLIP model; required with several annotators, optional with one (its score is then
            reported, and nothing is chosen).
    """
    names = _check_annotators(annotators)
    if len(annotators) > 1 and scorer is None:
        raise ValueError(f"annotate_with: choosing among {names} needs a CLIP scorer, got scorer=None")
    rgb = _as_rgb(image, "annotate_with")
    results = [a(rgb, category_name) for a in annotators]
    if scorer is None:
        winner = 0 if results[0].rgba is not None else None
        scores = {}
    else:
        values = annotation_clip_scores(results, scorer, category_name)
        winner = _first_max(values)
        scores = {n: float(v) for n, v in zip(names, values)}
    chosen = results[0] if winner is None else results[winner]
    return AnnotatorChoice(
        annotation=chosen,
        annotator=None if winner is None else names[winner],
        scores=scores,
        annotations=dict(zip(names, results)),
    )


def _check_annotators(annotators: Sequence[Annotator]) -> list[str]:
    if not annotators:
        raise ValueError("expected at least one annotator, got none")
    names = [a.name for a in annotators]
    if len(set(names)) != len(names):
        raise ValueError(f"annotator names must be distinct, got {names}")
    return names


# ------------------------------------------------------------------------------------------------ to disk


def annotate_to_disk(
    annotator: Annotator | Sequence[Annotator] | Any,
    items: Iterable[tuple[Path, Path] | tuple[Path, Path, str]],
    *,
    scorer: ClipScorer | None = None,
    progress: bool = False,
    **kw: Any,
) -> dict[str, int]:
    """Annotate each ``(generated PNG, output cutout PNG[, category name])`` item, resumably.

    Arguments:
        annotator: an annotator (``SamAnnotator``, ``ClipSegAnnotator``), several of them (the max-CLIP choice of
            ``annotate_with``, which needs ``scorer``), or a bare SAM predictor as for ``annotate_image`` (it is
            wrapped in a ``SamAnnotator`` with the keywords ``kw``).
        items: ``(input image, output RGBA PNG)`` path pairs, or triples with the category name, which CLIPSeg
            and the max-CLIP choice need.
        scorer: the CLIP model for the choice among several annotators.
        progress: show a tqdm bar over items.
        **kw: with a bare predictor only, ``annotate_image`` keywords (``margin``, ``min_area``, ``max_area``,
            ``official_index``); annotators carry their own.

    An output that exists and is readable is skipped (a truncated one is redone); cutouts are written atomically
    (temporary file, then ``os.replace``). An input that fails to decode ("unreadable"), a rejected image (one
    count per ``REJECT_REASONS`` entry; with several annotators, the first one's reason when all reject) or an
    annotator error ("failed") is logged and counted; the run goes on. Rejected images write nothing, so a rerun
    tries them again. Returns the counts: ``"written"``, ``"skipped_existing"``, ``"unreadable"``, ``"failed"``
    and each reason, all present; with several annotators also ``"chosen_<name>"`` for each.
    """
    if hasattr(annotator, "set_image") and hasattr(annotator, "predict"):
        # Checked here, not per image: a bad keyword would otherwise count every image as "failed".
        unknown = set(kw) - _ANNOTATE_KEYWORDS
        if unknown:
            raise TypeError(
                f"annotate_to_disk: unknown keywords {sorted(unknown)}, expected {sorted(_ANNOTATE_KEYWORDS)}"
            )
        annotators = [SamAnnotator(annotator, **kw)]
    else:
        if kw:
            raise TypeError(
                f"annotate_to_disk: keywords {sorted(kw)} apply to a bare SAM predictor only; set them on the "
                "annotator"
            )
        annotators = list(annotator) if isinstance(annotator, Sequence) else [annotator]
    names = _check_annotators(annotators)
    multi = len(annotators) > 1
    if multi and scorer is None:
        raise ValueError(f"annotate_to_disk: choosing among {names} needs a CLIP scorer, got scorer=None")
    needs_name = multi or any(getattr(a, "uses_category_name", True) for a in annotators)
    items = [_check_item(item, needs_name) for item in items]
    counts = dict.fromkeys(("written", "skipped_existing", "unreadable", "failed", *REJECT_REASONS), 0)
    if multi:
        counts.update({f"chosen_{n}": 0 for n in names})
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(items), desc="annotate")
    for src, dst, category_name in items:
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
        except READ_ERRORS as e:
            logger.warning("%s: cannot decode the image (%s); skipped", src, e)
            counts["unreadable"] += 1
            continue
        try:
            choice = annotate_with(annotators, image, category_name, scorer=scorer if multi else None)
        except Exception:  # one bad image must not end a run over a million; logged with its traceback
            logger.exception("%s: annotation failed", src)
            counts["failed"] += 1
            continue
        result = choice.annotation
        if choice.annotator is None:
            logger.info(
                "%s: rejected (%s, foreground %.2f%% of the image)",
                src,
                result.reason,
                100 * result.area_fraction,
            )
            counts[result.reason] += 1
            continue
        if multi:
            counts[f"chosen_{choice.annotator}"] += 1
            logger.debug("%s: %s chosen, CLIP scores %s", src, choice.annotator, choice.scores)
        save_image_atomic(Image.fromarray(result.rgba), dst)
        counts["written"] += 1
    if bar is not None:
        bar.close()
    logger.info("annotate: %s", counts)
    return counts


def _check_item(item: Any, needs_name: bool) -> tuple[Path, Path, str]:
    if isinstance(item, (str, bytes)) or not isinstance(item, Sequence) or len(item) not in (2, 3):
        raise ValueError(
            f"annotate_to_disk: expected (image, output) or (image, output, name) items, got {item!r}"
        )
    name = item[2] if len(item) == 3 else ""
    if needs_name and not (isinstance(name, str) and name):
        raise ValueError(
            f"annotate_to_disk: item {item!r} has no category name, which CLIPSeg and the max-CLIP choice need "
            "(pass (image, output, category name))"
        )
    return Path(item[0]), Path(item[1]), name
