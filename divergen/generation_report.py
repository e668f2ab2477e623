"""What the generation pipeline's ``pool`` stage reports: per-category counts and contact sheets.

``category_rows`` counts, per category, the images planned and generated, the cut-outs annotated and those rejected
by annotation (by reason), the cut-outs scored and those kept by the CLIP filters; ``write_csv`` writes them.
``draw_sheet`` draws one category's kept cut-outs above its rejected ones, so a glance shows what a threshold
throws away.
"""

from __future__ import annotations

import csv
import logging
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from .annotate import READ_ERRORS, REJECT_REASONS
from .prompts import PromptCategory

logger = logging.getLogger(__name__)

COUNTS = ("planned", "generated", "annotated", "rejected_annotation", "scored", "kept")
KEPT_COLOUR, REJECTED_COLOUR = (0, 160, 0), (200, 0, 0)


def category_rows(
    categories: Sequence[PromptCategory],
    *,
    planned: Mapping[int, int],
    generated: Mapping[int, int],
    annotations: Iterable[dict],
    scored: Sequence[dict],
    keep: np.ndarray,
) -> list[dict]:
    """One row per category: ``category_id``, ``name``, ``frequency``, the ``COUNTS`` and ``rejected_<reason>``
    for each of ``annotate.REJECT_REASONS``.

    Arguments:
        categories: the run's categories, in row order.
        planned, generated: images per category id (over all generators).
        annotations: the annotation records (one per image: ``cutout`` or ``reason``).
        scored, keep: the score records and which of them the filters keep.
    """
    annotated, reasons = Counter(), {c.category_id: Counter() for c in categories}
    for r in annotations:
        if r["cutout"]:
            annotated[r["category_id"]] += 1
        elif r["category_id"] in reasons:
            reasons[r["category_id"]][r["reason"]] += 1
    n_scored, n_kept = Counter(), Counter()
    for r, k in zip(scored, keep, strict=True):
        n_scored[r["category_id"]] += 1
        n_kept[r["category_id"]] += int(k)
    return [
        {
            "category_id": c.category_id,
            "name": c.name,
            "frequency": c.frequency,
            "planned": planned.get(c.category_id, 0),
            "generated": generated.get(c.category_id, 0),
            "annotated": annotated[c.category_id],
            "rejected_annotation": sum(reasons[c.category_id].values()),
            **{f"rejected_{k}": reasons[c.category_id][k] for k in REJECT_REASONS},
            "scored": n_scored[c.category_id],
            "kept": n_kept[c.category_id],
        }
        for c in categories
    ]


def write_csv(rows: Sequence[dict], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def draw_sheet(
    kept: Sequence[Path], rejected: Sequence[Path], *, columns: int, rows: int, cell: int, title: str
) -> Image.Image:
    """A contact sheet: a title line, then ``rows`` rows of kept cut-outs (green frames) and ``rows`` rows of
    rejected ones (red frames); each cut-out is fitted into a ``cell``-px square on mid grey (alpha-composited).
    A file that does not decode stays an empty grey cell."""
    head = 16
    sheet = Image.new("RGB", (columns * cell, head + 2 * rows * cell), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    draw.text((4, 2), title, fill=(0, 0, 0))
    inner = cell - 4
    for block, (paths, colour) in enumerate(((kept, KEPT_COLOUR), (rejected, REJECTED_COLOUR))):
        for i, path in enumerate(paths[: columns * rows]):
            x, y = (i % columns) * cell, head + (block * rows + i // columns) * cell
            tile = Image.new("RGB", (inner, inner), (128, 128, 128))
            try:
                with Image.open(path) as im:
                    im = im.convert("RGBA")
                    scale = inner / max(im.width, im.height)  # small cut-outs are enlarged too
                    im = im.resize((max(1, round(im.width * scale)), max(1, round(im.height * scale))))
                    tile.paste(im, ((inner - im.width) // 2, (inner - im.height) // 2), im)
            except READ_ERRORS as e:
                logger.warning("contact sheet: cannot draw %s (%s)", path, e)
            sheet.paste(tile, (x + 2, y + 2))
            draw.rectangle([x, y, x + cell - 1, y + cell - 1], outline=colour, width=2)
    return sheet
