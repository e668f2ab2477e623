"""A synthetic "generated" instance pool for the categories of `divergen.synthetic`, with known corruptions.

DiverGen and BSGAL paste generated instances: text-to-image generations of one object on a white background,
cut out as tight RGBA PNGs (divergen.md §1.4). This module draws stand-ins for them: the categories of
`divergen.synthetic.synthetic_categories` (same shape, colour and texture), one object per cutout, in
another style than the real images (a domain gap, as between LVIS photos and generations): directional
"studio" shading, a dark 1-2 px outline, a coarser and softer texture, colour jitter, no pixel noise.

A known share of the instances is corrupted, so that BSGAL's data selection can be tested against ground
truth (``CORRUPTIONS``): ``wrong_label`` (drawn as another category than the recorded one), ``noise`` (the
object drowned in random noise) and ``bad_mask`` (the alpha is a blob beside the object, not its mask).

Layout (DESIGN.md "Data formats")::

    root/pool.jsonl            one record per instance (`divergen.pool.write_pool_index`)
    root/pool_params.json      the parameters, for the up-to-date check
    root/images/<category_id>/<k:05d>.png

A record is ``{"path": "images/3/00012.png", "category_id": <recorded LVIS id>, "generator": "synthetic",
"prompt": ..., "seed": <int>, "corruption": "none"|"wrong_label"|"noise"|"bad_mask",
"true_category_id": <drawn LVIS id>}``; ``render_cutout(categories[true_category_id - 1], seed=seed,
corruption=corruption)`` redraws its pixels. There is no ``clip_score`` / ``clip_inter_sim``: those are
measured by the real generation pipeline, never made up here.
"""

from __future__ import annotations

import logging
import math
import os
import re
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from PIL import Image
from tqdm import tqdm

from .pool import POOL_INDEX_NAME, write_pool_index
from .synthetic import SyntheticCategory, _dump_json, _load_json, _shape_mask, _texture, synthetic_categories

logger = logging.getLogger(__name__)

# Bump whenever the drawn content changes, so that `make_synthetic_pool` regenerates stale pools.
POOL_VERSION = 1
CORRUPTIONS = ("wrong_label", "noise", "bad_mask")
GENERATOR = "synthetic"
PARAMS_FILE = "pool_params.json"
CANVAS_SCALE = 1.5  # canvas side / object diameter: white room around the object for a bad_mask blob
NOISE_BLEND = (0.75, 0.9)  # share of random noise in a "noise" instance's object pixels
# A bad mask keeps at most this share of the object, and at least this share of it is white background.
BAD_MASK_MAX_OBJECT, BAD_MASK_MIN_BACKGROUND = 0.75, 0.25
MAX_BAD_MASK_ATTEMPTS = 100
_PNG_NAME = re.compile(r"\d{5}\.png")


@dataclass
class GeneratedCutout:
    """One drawn instance.

    Attributes:
        rgba: (h, w, 4) uint8 RGBA, the tight crop of the alpha; alpha is 255 inside, 0 outside.
        object_mask: (h, w) bool, the drawn object's pixels in the same crop; equal to ``alpha > 0`` except
            for a ``bad_mask`` instance.
    """

    rgba: np.ndarray
    object_mask: np.ndarray


def pool_prompt(category: SyntheticCategory) -> str:
    """The text-to-image prompt a generator would get for ``category``, in DiverGen's style (divergen.md §1.1)."""
    name = category.name.replace("_", " ")
    return f"a photo of a single {name}, {category.definition}, in a white background"


def instance_seed(seed: int, category_id: int, k: int) -> int:
    """The seed of the k-th instance recorded for LVIS id ``category_id``: a 32-bit int from (seed, id, k)."""
    return int(np.random.SeedSequence([seed, 4, category_id, k]).generate_state(1)[0])


def corruption_counts(n_bad: int, offset: int) -> dict[str, int]:
    """``n_bad`` corruptions split as evenly as possible over ``CORRUPTIONS``.

    The remainder goes to the types starting at index ``offset`` (mod 3), so that rotating the offset over
    the categories also balances the totals of the whole pool.
    """
    base, extra = divmod(n_bad, len(CORRUPTIONS))
    return {c: base + int((j - offset) % len(CORRUPTIONS) < extra) for j, c in enumerate(CORRUPTIONS)}


def _draw_object(
    category: SyntheticCategory, rng: np.random.Generator, size_range: tuple[float, float]
) -> tuple[np.ndarray, np.ndarray]:
    """The clean "generated" rendering: (S, S, 3) float32 RGB canvas, white outside, and (S, S) bool mask."""
    d = float(rng.uniform(*size_range))
    r = d / 2
    side = math.ceil(CANVAS_SCALE * d) + 4
    c = side / 2
    theta = rng.uniform(0, 2 * np.pi)
    yy, xx = np.mgrid[0:side, 0:side].astype(np.float32) + 0.5  # pixel centres
    dx, dy = xx - c, yy - c
    a = dx * math.cos(theta) + dy * math.sin(theta)
    b = -dx * math.sin(theta) + dy * math.cos(theta)
    mask = _shape_mask(category.shape, a / r, b / r)

    # Colour jitter: brightness and a small per-channel (hue) shift, the same over the whole object.
    base = category.rgb * rng.uniform(0.92, 1.08) + rng.uniform(-10, 10, 3).astype(np.float32)
    # Studio lighting from one side, in the image frame: lifted toward white on the lit side, darker on the
    # other. Linear in position, so neighbouring pixels differ by at most ~3 levels (no pixel noise).
    phi = rng.uniform(0, 2 * np.pi)
    t = np.clip((dx * math.cos(phi) + dy * math.sin(phi)) / r, -1.0, 1.0)[mask]
    colour = np.broadcast_to(base, (t.size, 3)) * (1.0 - 0.3 * np.clip(-t, 0, 1))[:, None]
    colour = colour + (255.0 - colour) * (0.35 * np.clip(t, 0, 1))[:, None]
    # The category's texture, coarser (period d/4..d/6, the real images use d/6 clipped to 6..14 px) and
    # softer (dark = 0.45 x colour, the real images 0.3 x).
    period = max(8.0, d / rng.uniform(4.0, 6.0))
    dark = _texture(category.texture, a[mask] + rng.uniform(0, period), b[mask], period)
    colour[dark] *= 0.45
    canvas = np.full((side, side, 3), 255.0, dtype=np.float32)
    canvas[mask] = colour
    # A dark outline 1-2 px wide, inside the mask, so that alpha = mask still holds.
    width = int(rng.integers(1, 3))
    inner = cv2.erode(mask.astype(np.uint8), np.ones((3, 3), np.uint8), iterations=width).astype(bool)
    canvas[mask & ~inner] = base * 0.25
    return canvas, mask


def _bad_mask(mask: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """(S, S) bool: an ellipse or rectangle offset from the object, covering white background, missing parts."""
    side = mask.shape[0]
    rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    cy, cx = (rows[0] + rows[-1] + 1) / 2, (cols[0] + cols[-1] + 1) / 2
    d = max(rows[-1] + 1 - rows[0], cols[-1] + 1 - cols[0])
    yy, xx = np.mgrid[0:side, 0:side].astype(np.float32) + 0.5
    area = mask.sum()
    for _ in range(MAX_BAD_MASK_ATTEMPTS):
        angle, dist = rng.uniform(0, 2 * np.pi), rng.uniform(0.3, 0.5) * d
        ox, oy = cx + dist * math.cos(angle), cy + dist * math.sin(angle)
        ax, ay, rot = *rng.uniform(0.25, 0.5, 2) * d, rng.uniform(0, np.pi)
        u = ((xx - ox) * math.cos(rot) + (yy - oy) * math.sin(rot)) / ax
        v = (-(xx - ox) * math.sin(rot) + (yy - oy) * math.cos(rot)) / ay
        blob = u * u + v * v <= 1 if rng.random() < 0.5 else np.maximum(np.abs(u), np.abs(v)) <= 1
        n = blob.sum()
        covered = (blob & mask).sum()
        if n > 0 and covered <= BAD_MASK_MAX_OBJECT * area and n - covered >= BAD_MASK_MIN_BACKGROUND * n:
            return blob
    raise RuntimeError(f"no bad mask found in {MAX_BAD_MASK_ATTEMPTS} attempts; this is a bug in {__name__}")


def render_cutout(
    category: SyntheticCategory,
    *,
    seed: int,
    size_range: tuple[float, float] = (48, 128),
    corruption: str = "none",
) -> GeneratedCutout:
    """Draw one generated instance of ``category`` (the drawn, true category) and cut it out.

    The clean object depends on ``seed`` only, the corruption on a second stream of the same seed, so the
    same seed with ``corruption="none"`` gives the clean version of a corrupted instance.

    Arguments:
        category: what to draw.
        seed: the instance seed (`instance_seed`; a pool record's ``seed``).
        size_range: (min, max) object diameter in pixels, drawn uniformly.
        corruption: "none", or one of ``CORRUPTIONS``. "wrong_label" concerns the record only and is drawn
            clean; "noise" blends the object pixels with >= 75% uniform random noise; "bad_mask" replaces the
            alpha by an ellipse or rectangle offset from the object (<= 75% of the object inside it, >= 25%
            of it white background).

    Returns:
        The tight RGBA crop of the alpha and the object's mask in that crop.
    """
    if corruption != "none" and corruption not in CORRUPTIONS:
        raise ValueError(f"unknown corruption {corruption!r}; expected 'none' or one of {list(CORRUPTIONS)}")
    canvas, mask = _draw_object(category, np.random.default_rng([seed, 0]), size_range)
    rng = np.random.default_rng([seed, 1])
    alpha = mask
    if corruption == "noise":
        beta = rng.uniform(*NOISE_BLEND)
        noise = rng.uniform(0, 255, (int(mask.sum()), 3)).astype(np.float32)
        canvas[mask] = (1 - beta) * canvas[mask] + beta * noise
    elif corruption == "bad_mask":
        alpha = _bad_mask(mask, rng)
    rows, cols = np.flatnonzero(alpha.any(1)), np.flatnonzero(alpha.any(0))
    window = (slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1))
    rgba = np.empty((*alpha[window].shape, 4), dtype=np.uint8)
    rgba[..., :3] = np.clip(np.rint(canvas[window]), 0, 255)
    rgba[..., 3] = np.where(alpha[window], 255, 0)
    return GeneratedCutout(rgba=rgba, object_mask=mask[window].copy())


def _plan_category(
    index: int, categories: Sequence[SyntheticCategory], per_category: int, corrupt_fraction: float, seed: int
) -> list[tuple[str, int]]:
    """Per instance of category ``index`` (0-based): (corruption, drawn 0-based category)."""
    n_bad = round(per_category * corrupt_fraction)
    rng = np.random.default_rng([seed, 5, categories[index].id])
    kinds = [c for c, n in corruption_counts(n_bad, index).items() for _ in range(n)]
    plan = [("none", index)] * per_category
    for k, kind in zip(rng.permutation(per_category)[:n_bad], kinds, strict=True):
        drawn = index
        if kind == "wrong_label":
            # Uniform over the other categories: the generator was asked for `index` and drew another one.
            drawn = int(rng.integers(len(categories) - 1))
            drawn += drawn >= index
        plan[k] = (kind, drawn)
    return plan


def make_synthetic_pool(
    root: str | os.PathLike,
    *,
    num_categories: int = 24,
    per_category: int = 40,
    corrupt_fraction: float = 0.3,
    size_range: tuple[float, float] = (48, 128),
    seed: int = 0,
    overwrite: bool = False,
    progress: bool = False,
) -> Path:
    """Write the synthetic generated pool under ``root`` (layout in the module docstring); return the index.

    Arguments:
        root: output folder; created if missing.
        num_categories: 3..40, the categories of `divergen.synthetic.synthetic_categories` (LVIS ids 1..n).
        per_category: instances recorded per category, >= 1.
        corrupt_fraction: in [0, 1). Per category ``round(per_category * corrupt_fraction)`` instances
            (Python's round, half to even) are corrupted, split as evenly as possible over ``CORRUPTIONS``;
            which ones follows from the seed.
        size_range: (min, max) object diameter in pixels, 16 <= min <= max <= 1024.
        seed: everything drawn follows from it; the same arguments give the same PNG and jsonl bytes.
        overwrite: regenerate even if ``root`` already holds this pool with the same parameters.
        progress: show a tqdm progress bar.

    Returns:
        ``root/pool.jsonl``.
    """
    root = Path(root)
    categories = synthetic_categories(num_categories)  # validates num_categories
    if isinstance(per_category, bool) or not isinstance(per_category, int | np.integer) or per_category < 1:
        raise ValueError(f"per_category must be an int >= 1, got {per_category!r}")
    if not 0 <= corrupt_fraction < 1:
        raise ValueError(f"corrupt_fraction must be in [0, 1), got {corrupt_fraction!r}")
    if len(size_range) != 2 or not 16 <= size_range[0] <= size_range[1] <= 1024:
        raise ValueError(
            f"size_range must be (min, max) diameters, 16 <= min <= max <= 1024; got {size_range}"
        )
    params = {
        "pool_version": POOL_VERSION,
        "num_categories": int(num_categories),
        "per_category": int(per_category),
        "corrupt_fraction": float(corrupt_fraction),
        "size_range": [float(size_range[0]), float(size_range[1])],
        "seed": int(seed),
    }
    index_path, params_path = root / POOL_INDEX_NAME, root / PARAMS_FILE
    files = [f"images/{cat.id}/{k:05d}.png" for cat in categories for k in range(per_category)]
    old = _load_json(params_path)
    if (
        not overwrite
        and old is not None
        and old.get("params") == params
        and old.get("complete") is True
        and index_path.is_file()
        and all((root / f).is_file() for f in files)
    ):
        logger.info("synthetic pool in %s is up to date (%s)", root, params)
        return index_path
    ours = old is not None and "params" in old
    if index_path.exists() and not ours and not overwrite:
        raise FileExistsError(
            f"{index_path} exists and is not a divergen synthetic pool; pass overwrite=True"
        )

    start = time.perf_counter()
    root.mkdir(parents=True, exist_ok=True)
    # Marked incomplete first: a run stopped halfway never passes the up-to-date check, and the next run
    # still knows that the PNGs under root/images are ours to clean up.
    _dump_json({"params": params, "complete": False}, params_path)
    records = []
    bar = tqdm(total=len(files), desc="pool", disable=not progress)
    for index, cat in enumerate(categories):
        (root / "images" / str(cat.id)).mkdir(parents=True, exist_ok=True)
        plan = _plan_category(index, categories, per_category, corrupt_fraction, seed)
        for k, (corruption, drawn) in enumerate(plan):
            s = instance_seed(seed, cat.id, k)
            cutout = render_cutout(categories[drawn], seed=s, size_range=size_range, corruption=corruption)
            path = f"images/{cat.id}/{k:05d}.png"
            Image.fromarray(cutout.rgba).save(root / path)
            records.append(
                {
                    "path": path,
                    "category_id": cat.id,
                    "generator": GENERATOR,
                    "prompt": pool_prompt(cat),
                    "seed": s,
                    "corruption": corruption,
                    "true_category_id": categories[drawn].id,
                }
            )
            bar.update()
    bar.close()
    write_pool_index(records, index_path)
    if ours:
        # PNGs of a previous synthetic pool (same naming scheme, under our own root) that this run did not write.
        keep = set(files)
        for folder in (root / "images").iterdir():
            if not (folder.is_dir() and folder.name.isdigit()):
                continue
            for png in folder.iterdir():
                if _PNG_NAME.fullmatch(png.name) and f"images/{folder.name}/{png.name}" not in keep:
                    png.unlink()
            if not any(folder.iterdir()):
                folder.rmdir()
    _dump_json({"params": params, "complete": True}, params_path)
    counts = Counter(r["corruption"] for r in records)
    logger.info(
        "wrote %d generated instances (%s) of %d categories to %s in %.1fs",
        *(len(records), ", ".join(f"{c} {counts[c]}" for c in ("none", *CORRUPTIONS))),
        *(num_categories, root, time.perf_counter() - start),
    )
    return index_path
