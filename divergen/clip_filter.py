"""Stage 4 of the generation pipeline: CLIP filtering of the cutouts (divergen.md §1.3, §7).

Two scores per generated cutout, both with CLIP ViT-L/14 (OpenAI weights; open_clip ``ViT-L-14``/``openai``):

- **CLIP score** (§1.3a, official ``filteration/get_clip_score.py``): cosine between the image, its background set
  to pixel value 1, and the text ``"a photo of a single {name}"``. Returned as a cosine; the official stores
  ``100·cos`` and X-Paste's threshold 21 is 0.21 here. DiverGen computes it but filters nothing with it.
- **CLIP inter-similarity** (§1.3b, the DiverGen filter): ``s(g) = mean_i cos(f_g, f_r_i)`` over every real
  LVIS-train crop ``r_i`` of the same category, computed as ``ĝ · mean_i(r̂_i)`` (identical); keep ``s ≥ 0.6``.

The official scores the whole 256x256 generated image with the background (SAM mask 0) zeroed; we hold the tight
RGBA cutout (stage 3, ``annotate.py``) instead, so ``generated_view`` pads it to a square on black. Same pixels
inside the mask and the same background value, but the object fills the frame instead of sitting in its
original margin, so scores differ slightly from the official ones.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .checkpoint import read_weights, save_weights
from .data import lvis_image_path

logger = logging.getLogger(__name__)

# divergen.md §1.3a: the official CLIP-score prompt (category name with "_" -> " ").
SCORE_PROMPT = "a photo of a single {}"
# divergen.md §1.3b: DATA.md's ``--threshold 0.6``; §7: X-Paste's CLIP-score threshold 21 on the x100 scale.
INTER_SIMILARITY_THRESHOLD = 0.6
CLIP_SCORE_THRESHOLD = 0.21


class ClipScorer:
    """An open_clip model with its eval preprocessing and tokenizer; returns L2-normalised embeddings.

    Arguments:
        model: an ``open_clip`` CLIP model (``encode_image``, ``encode_text``).
        preprocess: PIL image -> ``(3, S, S)`` float tensor (open_clip's eval transform: bicubic resize of the
            short side, centre crop, CLIP mean/std, as the official ``clip.load`` preprocess).
        tokenizer: list of str -> ``(N, L)`` int64 tokens.
        device: where the model runs.
    """

    def __init__(
        self, *, model: torch.nn.Module, preprocess: Any, tokenizer: Any, device: str | torch.device
    ):
        self.model = model.to(device).eval()
        self.preprocess, self.tokenizer, self.device = preprocess, tokenizer, torch.device(device)

    @classmethod
    def load(
        cls, *, model: str = "ViT-L-14", pretrained: str | None = "openai", device: str | torch.device = "cpu"
    ) -> ClipScorer:
        """Build ``model`` with ``pretrained`` weights (a tag such as "openai", a local file, or ``None`` for random
        weights: tests and demos). Without network the tag's weights must already be in the Hugging Face cache;
        otherwise the error says how to fetch them."""
        import open_clip

        if model not in open_clip.list_models():
            raise ValueError(
                f"ClipScorer.load: unknown open_clip model {model!r} (see open_clip.list_models())"
            )
        looks_like_file = pretrained and (
            os.sep in pretrained or pretrained.endswith((".pt", ".bin", ".safetensors"))
        )
        if looks_like_file and not Path(pretrained).expanduser().is_file():
            raise FileNotFoundError(f"ClipScorer.load: CLIP weights file {pretrained} does not exist")
        try:
            net, _, preprocess = open_clip.create_model_and_transforms(
                model, pretrained=pretrained, device=device
            )
        except RuntimeError as e:  # open_clip wraps every failed download in RuntimeError
            cfg = open_clip.get_pretrained_cfg(model, pretrained) if pretrained else {}
            hub = cfg.get("hf_hub", "").rstrip("/")
            how = (
                f"`huggingface-cli download {hub}` on a machine with network (then copy ~/.cache/huggingface)"
            )
            if cfg.get("url"):
                how += f", or download {cfg['url']} and pass its path as pretrained"
            if not cfg:
                how = f"{pretrained!r} is neither a tag of open_clip.list_pretrained() for {model} nor a file"
            raise RuntimeError(
                f"ClipScorer.load: cannot load CLIP {model!r} weights {pretrained!r} ({e}). Offline, fetch them "
                f"first: {how}."
            ) from e
        return cls(model=net, preprocess=preprocess, tokenizer=open_clip.get_tokenizer(model), device=device)

    @torch.no_grad()
    def image_embeddings(self, images: Iterable[Image.Image], *, batch_size: int = 32) -> torch.Tensor:
        """``(N, D)`` float32 CPU, L2-normalised ``encode_image`` of ``images`` (any iterable; read in batches)."""
        chunks, batch = [], []
        for image in images:
            batch.append(self.preprocess(image.convert("RGB")))
            if len(batch) == batch_size:
                chunks.append(self._encode_images(batch))
                batch = []
        if batch:
            chunks.append(self._encode_images(batch))
        if not chunks:
            return torch.zeros(0, self.embed_dim)
        return torch.cat(chunks)

    def _encode_images(self, batch: list[torch.Tensor]) -> torch.Tensor:
        x = torch.stack(batch).to(self.device)
        return F.normalize(self.model.encode_image(x).float(), dim=-1).cpu()

    @torch.no_grad()
    def text_embeddings(self, texts: Sequence[str]) -> torch.Tensor:
        """``(N, D)`` float32 CPU, L2-normalised ``encode_text`` of ``texts``."""
        tokens = self.tokenizer(list(texts)).to(self.device)
        return F.normalize(self.model.encode_text(tokens).float(), dim=-1).cpu()

    @property
    def embed_dim(self) -> int:
        return int(self.model.visual.output_dim)


# ------------------------------------------------------------------------------------------------ views


def _check_rgba(rgba: np.ndarray, name: str) -> np.ndarray:
    rgba = np.asarray(rgba)
    if rgba.ndim != 3 or rgba.shape[2] != 4 or rgba.dtype != np.uint8 or 0 in rgba.shape:
        raise ValueError(
            f"{name}: expected a non-empty (h, w, 4) uint8 RGBA cutout, got {rgba.shape} {rgba.dtype}"
        )
    return rgba


def _square_on(rgba: np.ndarray, background: int) -> Image.Image:
    """The cutout's RGB where alpha > 128 (the official ``mask > 128``), ``background`` elsewhere, centred on a
    square canvas of ``background``: CLIP's centre crop would otherwise cut the ends of an elongated cutout."""
    h, w = rgba.shape[:2]
    side = max(h, w)
    out = np.full((side, side, 3), background, dtype=np.uint8)
    y0, x0 = (side - h) // 2, (side - w) // 2
    inside = rgba[..., 3:] > 128
    out[y0 : y0 + h, x0 : x0 + w] = np.where(inside, rgba[..., :3], np.uint8(background))
    return Image.fromarray(out)


def generated_view(rgba: np.ndarray) -> Image.Image:
    """``(h, w, 4)`` uint8 RGBA cutout -> ``(s, s)`` RGB, s = max(h, w): what CLIP sees for inter-similarity.

    divergen.md §1.3b: the official embeds the whole generated image with the background zeroed (black). We only
    have the tight cutout, so it is padded to a square with black (see the module docstring for the difference).
    """
    return _square_on(_check_rgba(rgba, "generated_view"), 0)


def score_view(rgba: np.ndarray) -> Image.Image:
    """``(h, w, 4)`` uint8 RGBA cutout -> ``(s, s)`` RGB with background pixel value 1, for the CLIP score.

    divergen.md §1.3a: official ``get_clip_score.py`` composites ``image*m + ones*(1-m)`` (value 1, near black);
    X-Paste's ``clean_pool.py`` composited on white. Padded to a square with the same value 1.
    """
    return _square_on(_check_rgba(rgba, "score_view"), 1)


def real_crop(image: np.ndarray, mask: np.ndarray, *, padding: int = 40, blur: int = 10) -> Image.Image:
    """A real instance as the official reference side sees it (``convert_lvis_to_coco_crop.py --mode padding
    --fill blur --padding_width 40``, divergen.md §1.3b).

    Arguments:
        image: ``(H, W, 3)`` uint8 RGB, the whole image.
        mask: ``(H, W)`` bool, the instance (must not be empty).
        padding: px added on each side of the mask's tight box, clamped to the image.
        blur: ``cv2.blur`` kernel size; pixels outside the mask take the blurred image's value.

    Only a window ``blur`` px wider than the crop is blurred: the box filter reaches ``blur`` px at most, so the
    crop is identical to blurring the whole image (as the official does) at a fraction of the cost.
    """
    image, mask = np.asarray(image), np.asarray(mask, dtype=bool)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8 or mask.shape != image.shape[:2]:
        raise ValueError(
            f"real_crop: expected (H, W, 3) uint8 and (H, W) mask, got {image.shape}, {mask.shape}"
        )
    cols, rows = np.flatnonzero(mask.any(0)), np.flatnonzero(mask.any(1))
    if cols.size == 0:
        raise ValueError("real_crop: empty mask")
    h, w = mask.shape
    # Official: x, y = first column / row of the mask; crop (x - p, y - p, x + width + p, y + height + p) clamped.
    x0, y0 = max(cols[0] - padding, 0), max(rows[0] - padding, 0)
    x1, y1 = min(cols[-1] + 1 + padding, w), min(rows[-1] + 1 + padding, h)
    bx0, by0, bx1, by1 = max(x0 - blur, 0), max(y0 - blur, 0), min(x1 + blur, w), min(y1 + blur, h)
    blurred = cv2.blur(np.ascontiguousarray(image[by0:by1, bx0:bx1]), (blur, blur))
    blurred = blurred[y0 - by0 : y1 - by0, x0 - bx0 : x1 - bx0]
    crop = np.where(mask[y0:y1, x0:x1, None], image[y0:y1, x0:x1], blurred)
    return Image.fromarray(np.ascontiguousarray(crop))


def lvis_real_crops(
    annotations: str | os.PathLike, image_root: str | os.PathLike, *, max_per_category: int | None = None
) -> dict[int, Iterator[Image.Image]]:
    """LVIS-format training annotations -> ``{LVIS category id: lazy iterator of real_crop}`` (divergen.md §1.3b:
    every annotation of every frequency; annotations without segmentation or with an empty mask are skipped, as
    the official). Each crop reads its image when the iterator reaches it, so memory stays one image deep.
    """
    from pycocotools.coco import COCO

    coco = COCO(str(annotations))

    def crops(category_id: int) -> Iterator[Image.Image]:
        n = 0
        for ann in coco.loadAnns(coco.getAnnIds(catIds=[category_id], iscrowd=None)):
            if max_per_category is not None and n >= max_per_category:
                return
            if not ann.get("segmentation"):
                continue
            mask = coco.annToMask(ann).astype(bool)
            if not mask.any():
                continue
            path = lvis_image_path(coco.imgs[ann["image_id"]], image_root)
            with Image.open(path) as im:
                rgb = np.asarray(im.convert("RGB"))
            if rgb.shape[:2] != mask.shape:
                raise ValueError(f"{annotations}: annotation {ann['id']} mask {mask.shape} != image {path}")
            n += 1
            yield real_crop(rgb, mask)

    return {int(c): crops(int(c)) for c in sorted(coco.cats)}


# ------------------------------------------------------------------------------------------------ scores


def clip_scores(
    scorer: ClipScorer, cutouts: Sequence[np.ndarray], names: Sequence[str], *, batch_size: int = 32
) -> np.ndarray:
    """``(N,)`` float32 cosine between ``score_view(cutouts[i])`` and ``"a photo of a single {names[i]}"`` with
    ``_`` -> space (divergen.md §1.3a; ×100 gives the official ``logits_per_text``)."""
    if len(cutouts) != len(names):
        raise ValueError(f"clip_scores: {len(cutouts)} cutouts but {len(names)} names")
    if not cutouts:
        return np.zeros(0, dtype=np.float32)
    images = scorer.image_embeddings((score_view(c) for c in cutouts), batch_size=batch_size)
    unique = sorted(set(names))
    texts = scorer.text_embeddings([SCORE_PROMPT.format(n.replace("_", " ")) for n in unique])
    rows = torch.tensor([unique.index(n) for n in names])
    return (images * texts[rows]).sum(-1).numpy().astype(np.float32)


def category_reference_embeddings(
    scorer: ClipScorer, crops_by_category: Mapping[int, Iterable[Image.Image]], *, batch_size: int = 32
) -> dict[int, torch.Tensor]:
    """``{category id: (D,) float32}`` mean of the L2-normalised real-crop embeddings, *not* renormalised, so that
    ``ĝ · mean_i(r̂_i) = mean_i cos(g, r_i)``, the official score (divergen.md §1.3b). Categories with no crop
    are left out (``inter_similarity`` gives them NaN). Iterables are consumed batch by batch (any size)."""
    refs = {}
    for cid, crops in crops_by_category.items():
        total, count, batch = torch.zeros(scorer.embed_dim, dtype=torch.float64), 0, []
        for crop in [*crops, None]:
            if crop is not None:
                batch.append(crop)
            if batch and (crop is None or len(batch) == batch_size):
                total += scorer.image_embeddings(batch, batch_size=batch_size).double().sum(0)
                count, batch = count + len(batch), []
        if count:
            refs[int(cid)] = (total / count).float()
        else:
            logger.info("category %d has no real crop: no inter-similarity reference", cid)
    return refs


def inter_similarity(
    scorer: ClipScorer,
    cutouts: Sequence[np.ndarray],
    category_ids: Sequence[int],
    references: Mapping[int, torch.Tensor],
    *,
    batch_size: int = 32,
) -> np.ndarray:
    """``(N,)`` float32 ``ĝ_i · references[category_ids[i]]`` with ``ĝ_i`` the embedding of
    ``generated_view(cutouts[i])`` (divergen.md §1.3b); NaN where the category has no reference."""
    if len(cutouts) != len(category_ids):
        raise ValueError(f"inter_similarity: {len(cutouts)} cutouts but {len(category_ids)} category ids")
    out = np.full(len(cutouts), np.nan, dtype=np.float32)
    idx = [i for i, c in enumerate(category_ids) if int(c) in references]
    if idx:
        emb = scorer.image_embeddings((generated_view(cutouts[i]) for i in idx), batch_size=batch_size)
        ref = torch.stack([references[int(category_ids[i])].float() for i in idx])
        out[idx] = (emb * ref).sum(-1).numpy()
    return out


def save_references(references: Mapping[int, torch.Tensor], path: str | os.PathLike) -> None:
    """Cache ``category_reference_embeddings`` as safetensors: ``category_ids`` (K,) int64, ``embeddings`` (K, D)."""
    ids = sorted(references)
    if not ids:
        raise ValueError(f"save_references: no reference to save to {path}")
    tensors = {
        "category_ids": torch.tensor(ids, dtype=torch.int64),
        "embeddings": torch.stack([references[c].float() for c in ids]),
    }
    save_weights(tensors, path, metadata={"format": "divergen.clip_filter.references"})


def load_references(path: str | os.PathLike) -> dict[int, torch.Tensor]:
    """The ``{category id: (D,) float32}`` written by ``save_references``."""
    tensors, _ = read_weights(path)
    if set(tensors) != {"category_ids", "embeddings"} or len(tensors["category_ids"]) != len(
        tensors["embeddings"]
    ):
        raise ValueError(
            f"{path}: expected tensors 'category_ids' (K,) and 'embeddings' (K, D), got {set(tensors)}"
        )
    return {int(c): e for c, e in zip(tensors["category_ids"].tolist(), tensors["embeddings"], strict=True)}


def keep_mask(
    clip_score: np.ndarray | None,
    inter_sim: np.ndarray | None,
    *,
    min_clip_score: float | None = None,
    min_inter_similarity: float | None = None,
    keep_without_reference: bool = True,
) -> np.ndarray:
    """``(N,)`` bool: which cutouts pass. A ``None`` threshold disables its test (and its scores may be ``None``).

    - CLIP score (§1.3a): keep ``clip_score >= min_clip_score``; a NaN score fails.
    - Inter-similarity (§1.3b): keep ``inter_sim >= min_inter_similarity``. A NaN means the category has no real
      crop (the 250 ImageNet extras): the official drops them silently from the filtered pool and rebuilds them
      unfiltered in a separate pool (divergen.md §6.5); here ``keep_without_reference`` decides (default: keep,
      which is what the official's merged pool ends up with).
    """
    arrays = [np.asarray(a, dtype=np.float64) for a in (clip_score, inter_sim) if a is not None]
    if not arrays or any(a.ndim != 1 or a.shape != arrays[0].shape for a in arrays):
        raise ValueError(
            f"keep_mask: expected 1-d score arrays of one length, got {[a.shape for a in arrays]}"
        )
    keep = np.ones(len(arrays[0]), dtype=bool)
    with np.errstate(invalid="ignore"):  # NaN >= t is False, which is what a NaN CLIP score should give
        if min_clip_score is not None:
            keep &= _required(clip_score, "clip_score") >= min_clip_score
        if min_inter_similarity is not None:
            sim = _required(inter_sim, "inter_sim")
            keep &= np.where(np.isnan(sim), keep_without_reference, sim >= min_inter_similarity)
    return keep


def _required(value: np.ndarray | None, name: str) -> np.ndarray:
    if value is None:
        raise ValueError(f"keep_mask: a threshold is set for {name} but {name} is None")
    return np.asarray(value, dtype=np.float64)
