"""A procedural, long-tailed LVIS-format instance-segmentation dataset, for the demo and the tests.

Objects are coloured shapes with a texture (``red_disc``, ``blue_striped_star``, ...) drawn on noisy textured
backgrounds. The files follow LVIS v1 exactly (DESIGN.md "Data formats")::

    root/lvis_v1_train.json  root/lvis_v1_val.json  root/train2017/000000000001.jpg  root/val2017/...

Images carry ``coco_url`` ".../train2017/<12-digit id>.jpg", as LVIS does, and the readers map it to
``root/train2017/``. Per category the train split has a planned number of images chosen so that the
categories fall into LVIS's frequency groups (LVIS paper §3: rare = 1-10 training images, common = 11-100,
frequent = >100); ``image_count``, ``instance_count`` and ``frequency`` are recomputed from the written
annotations. Masks are the visible pixels of each object after later objects are painted over it, stored
as compressed COCO RLE; ``bbox`` is the tight box of that mask (pycocotools ``toBbox`` convention) and
``area`` its pixel count.

Command line::

    python -m divergen.synthetic --root data/synthetic --num-train 300 --num-val 60
    python -m divergen.synthetic --root data/synthetic --pool-per-category 40 --pool-corrupt-fraction 0.3

``--pool-per-category N`` (default 0: none) also writes a "generated" instance pool of the same categories
and seed to ``<root>/pool``, with ``--pool-corrupt-fraction`` of it corrupted (`divergen.synthetic_pool`).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import time
from collections import Counter, defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from pycocotools import mask as mask_util
from tqdm import tqdm

logger = logging.getLogger(__name__)

# Bump whenever the drawn content changes, so that `make_synthetic_lvis` regenerates stale data.
GENERATOR_VERSION = 1
MAX_OBJECTS = 6  # objects drawn per image, before dropping the ones occluded below MIN_AREA
MIN_AREA = 20  # visible pixels an object needs to be annotated
JPEG_QUALITY = 95
MAX_LAYOUT_ATTEMPTS = 50
STAR_NOTCH = 0.45  # inner radius of the star (0.38 would be a regular pentagram)

# Saturated colours only: backgrounds are low-saturation, so colour separates objects from background.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "orange": (235, 130, 30),
    "yellow": (225, 205, 40),
    "green": (40, 170, 60),
    "cyan": (40, 190, 205),
    "blue": (40, 80, 220),
    "purple": (130, 60, 200),
    "magenta": (210, 50, 190),
}
# shape -> (synonyms, definition). Every shape lies inside the unit disc of its local frame (`_shape_mask`).
SHAPES: dict[str, tuple[tuple[str, ...], str]] = {
    "disc": (("circle", "round_disk"), "a flat filled circle"),
    "square": (("quadrate", "box_shape"), "a four-sided figure with equal sides and right angles"),
    "triangle": (("trigon", "three_sided_shape"), "a figure with three equal straight sides"),
    "ring": (("annulus", "hoop"), "a circular band with a round hole in the middle"),
    "star": (("five_pointed_star", "pentagram_shape"), "a five-pointed star"),
    "cross": (("plus_sign", "cruciform"), "a plus sign made of two equal crossing bars"),
    "ellipse": (("oval", "ovoid_shape"), "an elongated oval, about twice as long as it is wide"),
    "diamond": (("rhombus", "lozenge"), "a rhombus whose one diagonal is longer than the other"),
    "hexagon": (("six_sided_shape", "hex"), "a figure with six equal straight sides"),
    "crescent": (("half_moon", "sickle_shape"), "a curved sliver shaped like a waxing moon"),
}
# texture -> (name infix, adjective for the definition, what the pattern looks like)
TEXTURES: dict[str, tuple[str, str, str]] = {
    "solid": ("", "solid", "of a single even colour"),
    "stripes": ("striped_", "striped", "with parallel dark stripes"),
    "dots": ("dotted_", "polka-dotted", "covered in a grid of dark dots"),
    "checker": ("checkered_", "checkered", "with a dark checkerboard pattern"),
}
MAX_CATEGORIES = len(SHAPES) * len(TEXTURES)  # (shape, texture) pairs are unique, which keeps names unique


@dataclass(frozen=True)
class SyntheticCategory:
    """One category: its LVIS record fields and how to draw it. ``id`` is the 1-based LVIS id."""

    id: int
    name: str
    shape: str
    colour: str
    texture: str
    synonyms: tuple[str, ...]
    definition: str
    synset: str

    @property
    def rgb(self) -> np.ndarray:
        return np.asarray(COLOURS[self.colour], dtype=np.float32)


def synthetic_categories(num_categories: int) -> list[SyntheticCategory]:
    """The first ``num_categories`` categories, ids 1..num_categories; independent of the seed.

    Category i has shape i mod 10, texture i // 10, and a colour that shifts by 3 per texture round, so that
    categories share shapes and colours and a detector has to combine shape, colour and texture.
    """
    if not 3 <= num_categories <= MAX_CATEGORIES:
        raise ValueError(f"num_categories must be in [3, {MAX_CATEGORIES}], got {num_categories}")
    shapes, colours, textures = list(SHAPES), list(COLOURS), list(TEXTURES)
    out = []
    for i in range(num_categories):
        shape = shapes[i % len(shapes)]
        texture = textures[i // len(shapes)]
        colour = colours[(i + 3 * (i // len(shapes))) % len(colours)]
        infix, adjective, pattern = TEXTURES[texture]
        synonyms, shape_def = SHAPES[shape]
        name = f"{colour}_{infix}{shape}"
        out.append(
            SyntheticCategory(
                id=i + 1,
                name=name,
                shape=shape,
                colour=colour,
                texture=texture,
                synonyms=(name, *(f"{colour}_{infix}{s}" for s in synonyms)),
                definition=f"a {adjective} {colour} {shape} {pattern}: {shape_def}",
                synset=f"{name}.n.01",
            )
        )
    return out


def lvis_frequency(image_count: int) -> str:
    """LVIS frequency group of a category from its number of training images (LVIS §3): "r", "c" or "f"."""
    if image_count < 1:
        raise ValueError(f"a category needs at least one training image, got image_count={image_count}")
    return "r" if image_count <= 10 else "c" if image_count <= 100 else "f"


def plan_image_counts(
    num_train: int, num_val: int, num_categories: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Planned images per category, ``(num_categories,)`` int64 each for train and val.

    About 1/6 of the categories are frequent (110 to 0.6 * num_train images; only when num_train > 100),
    5/12 rare (10 down to 1 image) and the rest common (0.3 * num_train, at most 90, down to 12),
    geometrically spaced, then shuffled over the category ids. Val keeps the train proportions but gives every
    category at least 3 images (or num_val), so that rare categories are evaluated too.
    """
    n_f = max(1, round(num_categories / 6)) if num_train > 100 else 0
    n_r = max(1, round(num_categories * 5 / 12))
    n_c = num_categories - n_f - n_r
    lo_f = min(num_train, 110)
    hi_f = max(lo_f, min(num_train, round(0.6 * num_train)))
    hi_c = min(num_train, max(11, min(90, round(0.3 * num_train))))
    counts = np.concatenate(
        [
            np.geomspace(hi_f, lo_f, n_f),
            np.geomspace(hi_c, min(12, hi_c), n_c),
            np.geomspace(min(10, num_train), 1, n_r),
        ]
    )
    train = np.rint(counts).astype(np.int64)[rng.permutation(num_categories)]
    val = np.clip(np.maximum(3, np.rint(train * num_val / num_train)), 1, num_val).astype(np.int64)
    return train, val


def assign_categories(
    counts: np.ndarray, num_images: int, rng: np.random.Generator, max_objects: int = MAX_OBJECTS
) -> list[list[int]]:
    """Per image, the 0-based categories of its objects (1..max_objects of them, in random order).

    Category k goes to ``counts[k]`` distinct images (fewer only if the images run out of room), picked at
    random with weights favouring images with room left and a per-image "busyness"; then empty images get the
    most frequent category, and images get a few repeated instances of categories they already contain.
    """
    load = np.zeros(num_images, dtype=np.int64)
    members: list[list[int]] = [[] for _ in range(num_images)]
    busyness = rng.uniform(0.3, 1.7, num_images)
    # Rarest first, each leaving one slot per category still to come: when slots run short (tiny datasets),
    # the frequent categories absorb the shortfall and every category still gets an image.
    order = np.argsort(counts, kind="stable")
    for rank, k in enumerate(order):
        free = np.flatnonzero(load < max_objects)
        slots = int((max_objects - load).sum())
        n = min(int(counts[k]), free.size, slots - (len(order) - rank - 1))
        if n <= 0:
            continue
        w = busyness[free] * (max_objects - load[free]) * np.where(load[free] == 0, 4.0, 1.0)
        chosen = rng.choice(free, size=n, replace=False, p=w / w.sum())
        for i in chosen:
            members[i].append(int(k))
        load[chosen] += 1
    for i in np.flatnonzero(load == 0):
        members[i].append(int(np.argmax(counts)))
        load[i] += 1
    extra = rng.binomial(max_objects - load, 0.12)
    for i in range(num_images):
        objs = members[i] + [int(c) for c in rng.choice(members[i], size=extra[i])]
        members[i] = [objs[j] for j in rng.permutation(len(objs))]
    return members


@dataclass
class DrawnImage:
    """One rendered image.

    Attributes:
        image: (H, W, 3) uint8 RGB.
        masks: (K, H, W) bool, the visible pixels of each annotated object (>= MIN_AREA pixels).
        labels: (K,) int64, 0-based categories of the annotated objects, in drawing order.
        drawn: 0-based categories of every object drawn, annotated or not.
        partial: 0-based categories that have an annotated object and also an object dropped by occlusion.
    """

    image: np.ndarray
    masks: np.ndarray
    labels: np.ndarray
    drawn: set[int]
    partial: set[int]


def _shape_mask(shape: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Inside-test of ``shape`` at local coordinates (u, v), the unit disc being its circumscribed circle."""
    r2 = u * u + v * v
    if shape == "disc":
        return r2 <= 1.0
    if shape == "ring":
        return (r2 <= 1.0) & (r2 >= 0.5**2)
    if shape == "ellipse":
        return u * u + (v / 0.5) ** 2 <= 1.0
    if shape == "square":
        return np.maximum(np.abs(u), np.abs(v)) <= 0.7
    if shape == "diamond":
        return np.abs(u) + np.abs(v) / 0.6 <= 1.0
    if shape in ("triangle", "hexagon"):
        # Regular polygon with circumradius 1: inside every edge's half-plane, at the inradius cos(pi / n).
        n = 3 if shape == "triangle" else 6
        angles = np.pi / 2 + np.pi / n + 2 * np.pi * np.arange(n) / n
        inside = np.ones(u.shape, dtype=bool)
        for a in angles:
            inside &= u * math.cos(a) + v * math.sin(a) <= math.cos(math.pi / n)
        return inside
    if shape == "star":
        # Five tips at radius 1 and five notches at STAR_NOTCH; fold the angle into the half-sector between a
        # tip (alpha = 0) and a notch (alpha = pi/5), then test the side of the straight tip-notch edge.
        sector = 2 * math.pi / 5
        alpha = np.abs((np.arctan2(v, u) - math.pi / 2) % sector - sector / 2)
        alpha = sector / 2 - alpha
        rho = np.sqrt(r2)
        px, py = rho * np.cos(alpha), rho * np.sin(alpha)
        nx, ny = STAR_NOTCH * math.cos(sector / 2), STAR_NOTCH * math.sin(sector / 2)
        # Inside = same side of the edge as the origin: cross product (N - T) x (P - T) >= 0, tip T = (1, 0).
        return (nx - 1.0) * py - ny * (px - 1.0) >= 0
    if shape == "cross":
        au, av = np.abs(u), np.abs(v)
        return ((au <= 0.3) & (av <= 0.95)) | ((av <= 0.3) & (au <= 0.95))
    if shape == "crescent":
        return (r2 <= 1.0) & ((u - 0.5) ** 2 + v * v > 0.8**2)
    raise ValueError(f"unknown shape {shape!r}; expected one of {list(SHAPES)}")


def _texture(texture: str, a: np.ndarray, b: np.ndarray, period: float) -> np.ndarray:
    """Where the dark secondary colour goes, at local pixel coordinates (a, b) along the object's axes."""
    half = period / 2
    if texture == "solid":
        return np.zeros(a.shape, dtype=bool)
    if texture == "stripes":
        return np.floor(a / half) % 2 == 1
    if texture == "checker":
        return (np.floor(a / half) + np.floor(b / half)) % 2 == 1
    if texture == "dots":
        return (a % period - half) ** 2 + (b % period - half) ** 2 <= (0.3 * period) ** 2
    raise ValueError(f"unknown texture {texture!r}; expected one of {list(TEXTURES)}")


def _background(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """(H, W, 3) float32: a low-saturation gradient, optional stripes, and grey distractor blobs."""
    yy, xx = np.ogrid[0:height, 0:width]
    yy, xx = yy.astype(np.float32) + 0.5, xx.astype(np.float32) + 0.5  # pixel centres, broadcastable
    c1 = rng.uniform(60, 190) + rng.uniform(-25, 25, 3)
    c2 = rng.uniform(60, 190) + rng.uniform(-25, 25, 3)
    angle = rng.uniform(0, 2 * np.pi)
    t = xx * math.cos(angle) + yy * math.sin(angle)
    t = (t - t.min()) / max(float(t.max() - t.min()), 1e-6)
    img = (c1 + (c2 - c1) * t[..., None]).astype(np.float32)
    if rng.random() < 0.6:
        angle, period, phase = rng.uniform(0, 2 * np.pi), rng.uniform(8, 40), rng.uniform(0, 2 * np.pi)
        wave = np.sin(2 * np.pi * (xx * math.cos(angle) + yy * math.sin(angle)) / period + phase)
        if rng.random() < 0.5:
            wave = np.sign(wave)
        img += (rng.uniform(6, 22) * wave)[..., None]
    for _ in range(rng.integers(0, 4)):
        # Grey ellipses and rectangles: object-like clutter that no (saturated) category matches.
        cx, cy = rng.uniform(0, width), rng.uniform(0, height)
        ax, ay, angle = rng.uniform(5, 40), rng.uniform(5, 40), rng.uniform(0, np.pi)
        r = math.hypot(ax, ay)
        y0, y1 = max(0, math.floor(cy - r)), min(height, math.ceil(cy + r))
        x0, x1 = max(0, math.floor(cx - r)), min(width, math.ceil(cx + r))
        du, dv = xx[:, x0:x1] - cx, yy[y0:y1] - cy
        u = (du * math.cos(angle) + dv * math.sin(angle)) / ax
        v = (-du * math.sin(angle) + dv * math.cos(angle)) / ay
        blob = u * u + v * v <= 1 if rng.random() < 0.5 else np.maximum(np.abs(u), np.abs(v)) <= 1
        img[y0:y1, x0:x1][blob] = rng.uniform(50, 200) + rng.uniform(-15, 15, 3)
    return img


def draw_image(
    rng: np.random.Generator,
    labels: Sequence[int],
    categories: Sequence[SyntheticCategory],
    image_size: tuple[int, int],
) -> DrawnImage:
    """Render one image with one object per entry of ``labels`` (0-based categories).

    Objects are painted in order of decreasing (jittered) size, so later, mostly smaller objects occlude
    earlier ones. The layout is resampled until every category of ``labels`` keeps an object with >= MIN_AREA
    visible pixels, which makes the planned image counts exact.
    """
    height, width = image_size
    background = _background(rng, height, width)
    # Object diameter, log-uniform: spans COCO's small (< 32^2), medium and large areas at 256x320.
    d_min, d_max = max(10.0, 0.045 * min(height, width)), 0.6 * min(height, width)
    needed = set(labels)
    for _attempt in range(MAX_LAYOUT_ATTEMPTS):
        n = len(labels)
        diam = np.exp(rng.uniform(math.log(d_min), math.log(d_max), n))
        order = np.argsort(-diam * rng.lognormal(0.0, 0.4, n), kind="stable")
        owner = np.full((height, width), -1, dtype=np.int64)
        objects = []
        for j in order:
            d = float(diam[j])
            # Centre keeps at least about half of the object inside the frame.
            cx = rng.uniform(d / 4, max(width - d / 4, d / 4 + 1))
            cy = rng.uniform(d / 4, max(height - d / 4, d / 4 + 1))
            theta = rng.uniform(0, 2 * np.pi)
            r = d / 2
            y0, y1 = max(0, math.floor(cy - r) - 1), min(height, math.ceil(cy + r) + 1)
            x0, x1 = max(0, math.floor(cx - r) - 1), min(width, math.ceil(cx + r) + 1)
            yy, xx = np.mgrid[y0:y1, x0:x1].astype(np.float32) + 0.5  # pixel centres
            a = (xx - cx) * math.cos(theta) + (yy - cy) * math.sin(theta)
            b = -(xx - cx) * math.sin(theta) + (yy - cy) * math.cos(theta)
            inside = _shape_mask(categories[labels[j]].shape, a / r, b / r)
            owner[y0:y1, x0:x1][inside] = len(objects)
            objects.append((labels[j], (slice(y0, y1), slice(x0, x1)), inside, a, b, d))
        visible = np.bincount(owner.ravel() + 1, minlength=len(objects) + 1)[1:]
        kept = visible >= MIN_AREA
        if needed <= {obj[0] for obj, keep in zip(objects, kept, strict=True) if keep}:
            break
    else:
        raise RuntimeError(
            f"could not place categories {sorted(needed)} in a {height}x{width} image with each keeping "
            f">= {MIN_AREA} visible pixels after {MAX_LAYOUT_ATTEMPTS} layouts; use a larger image_size"
        )
    img = background
    for label, window, inside, a, b, d in objects:
        cat = categories[label]
        # Soft lighting gradient across the object, then the texture's dark secondary colour.
        g = rng.uniform(-0.1, 0.1)
        shade = 1.0 + g * a[inside] / (d / 2)
        colour = cat.rgb * shade[:, None]
        period = float(np.clip(d / 6, 6, 14))
        dark = _texture(cat.texture, a[inside] + rng.uniform(0, period), b[inside], period)
        colour[dark] *= 0.3
        img[window][inside] = colour
    img += rng.standard_normal((height, width, 3), dtype=np.float32) * rng.uniform(3, 9)
    image = np.clip(np.rint(img), 0, 255).astype(np.uint8)
    annotated = np.flatnonzero(kept)
    labels_drawn = [obj[0] for obj in objects]
    dropped = {labels_drawn[i] for i in np.flatnonzero(~kept)}
    ann_labels = np.asarray([labels_drawn[i] for i in annotated], dtype=np.int64)
    return DrawnImage(
        image=image,
        masks=owner[None] == annotated[:, None, None],
        labels=ann_labels,
        drawn=set(labels_drawn),
        partial=dropped & set(ann_labels.tolist()),
    )


def render_split(
    split: str, *, num_train: int, num_val: int, num_categories: int, image_size: tuple[int, int], seed: int
) -> Iterator[DrawnImage]:
    """Yield the images of ``split`` ("train" or "val") in order, as `make_synthetic_lvis` draws them.

    Val's per-category plan derives from train's (`plan_image_counts`), hence both sizes. Each image has its
    own generator, seeded by (seed, split, index).
    """
    split_id = {"train": 0, "val": 1}[split]
    categories = synthetic_categories(num_categories)
    plan = plan_image_counts(num_train, num_val, num_categories, np.random.default_rng([seed, 2]))
    num_images = num_train if split == "train" else num_val
    layouts = assign_categories(plan[split_id], num_images, np.random.default_rng([seed, split_id, 1]))
    for index, labels in enumerate(layouts):
        yield draw_image(np.random.default_rng([seed, split_id, 0, index]), labels, categories, image_size)


def _tight_bbox(mask: np.ndarray) -> list[float]:
    """[x, y, w, h] of the smallest pixel box holding ``mask``, as pycocotools ``toBbox``."""
    rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    return [float(cols[0]), float(rows[0]), float(cols[-1] + 1 - cols[0]), float(rows[-1] + 1 - rows[0])]


def _write_split(
    root: Path, split: str, params: dict, first_image_id: int, first_ann_id: int, progress: bool
) -> dict:
    """Draw ``split``, write its JPEGs to root/<split>2017/, return its LVIS images and annotations."""
    folder = f"{split}2017"
    (root / folder).mkdir(parents=True, exist_ok=True)
    num_images = params[f"num_{split}"]
    categories = synthetic_categories(params["num_categories"])
    images, annotations = [], []
    keys = ("num_train", "num_val", "num_categories", "seed")
    drawn = render_split(split, image_size=tuple(params["image_size"]), **{k: params[k] for k in keys})
    for index, out in enumerate(tqdm(drawn, total=num_images, desc=split, disable=not progress)):
        image_id = first_image_id + index
        file_name = f"{image_id:012d}.jpg"
        # 4:4:4 chroma keeps colour edges where the masks put them (4:2:0 would smear them by a pixel).
        Image.fromarray(out.image).save(root / folder / file_name, quality=JPEG_QUALITY, subsampling=0)
        rles = mask_util.encode(np.asfortranarray(out.masks.transpose(1, 2, 0).astype(np.uint8)))
        for mask, rle, label in zip(out.masks, rles, out.labels, strict=True):
            annotations.append(
                {
                    "id": first_ann_id + len(annotations),
                    "image_id": image_id,
                    "category_id": categories[label].id,
                    "segmentation": {
                        "size": [int(s) for s in rle["size"]],
                        "counts": rle["counts"].decode("ascii"),
                    },
                    "area": float(mask.sum()),
                    "bbox": _tight_bbox(mask),
                    "iscrowd": 0,  # not LVIS, but pycocotools' COCOeval reads it
                }
            )
        # LVIS federated labels: negatives are categories verified absent (not even an occluded sliver);
        # a positive category is not exhaustive when an object of it was dropped as too occluded.
        rng = np.random.default_rng([params["seed"], 3, image_id])
        absent = np.asarray(sorted(set(range(len(categories))) - out.drawn), dtype=np.int64)
        negatives = rng.choice(absent, size=min(absent.size, int(rng.integers(3, 9))), replace=False)
        images.append(
            {
                "id": image_id,
                "width": params["image_size"][1],
                "height": params["image_size"][0],
                "coco_url": f"http://images.cocodataset.org/{folder}/{file_name}",
                "license": 1,
                "neg_category_ids": sorted(categories[c].id for c in negatives),
                "not_exhaustive_category_ids": sorted(categories[c].id for c in out.partial),
            }
        )
    return {"images": images, "annotations": annotations}


def _category_records(params: dict, train_annotations: list[dict]) -> list[dict]:
    """LVIS category records, with image/instance counts and frequency counted from the train annotations."""
    images = defaultdict(set)
    instances = Counter(ann["category_id"] for ann in train_annotations)
    for ann in train_annotations:
        images[ann["category_id"]].add(ann["image_id"])
    return [
        {
            "id": cat.id,
            "name": cat.name,
            "synonyms": list(cat.synonyms),
            "def": cat.definition,
            "synset": cat.synset,
            "frequency": lvis_frequency(len(images[cat.id])),
            "image_count": len(images[cat.id]),
            "instance_count": instances[cat.id],
        }
        for cat in synthetic_categories(params["num_categories"])
    ]


def _dump_json(data: dict, path: Path) -> None:
    """Write then rename, so that a half-written file never passes the up-to-date check."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        json.dump(data, f)
    os.replace(tmp, path)


def _load_json(path: Path) -> dict | None:
    """The file's JSON object, or None if it is missing or unreadable (then it is simply rewritten)."""
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError):
        return None


def _image_path(root: Path, image: dict) -> Path:
    """root/<split>2017/<file>.jpg from the LVIS ``coco_url``."""
    return root / Path(image["coco_url"]).parent.name / Path(image["coco_url"]).name


def make_synthetic_lvis(
    root: str | os.PathLike,
    *,
    num_train: int = 300,
    num_val: int = 60,
    num_categories: int = 24,
    image_size: tuple[int, int] = (256, 320),
    seed: int = 0,
    overwrite: bool = False,
    progress: bool = False,
) -> dict[str, Path]:
    """Write the synthetic dataset under ``root`` (layout in the module docstring) and return its paths.

    Arguments:
        root: output folder; created if missing.
        num_train: train images. Frequent categories (> 100 images) exist only when num_train > 100.
        num_val: val images, drawn with other seeds; every category gets >= min(3, num_val) of them (when
            they have room: up to 6 objects per image).
        num_categories: 3..40 categories (`synthetic_categories`).
        image_size: (height, width) of every image, pixels.
        seed: everything drawn follows from it; the same seed gives the same JSON and JPEG bytes.
        overwrite: regenerate even if ``root`` already holds this dataset with the same parameters.
        progress: show tqdm progress bars.

    Returns:
        {"train_json", "val_json", "image_root"}: the two annotation files and ``root`` (images resolve
        through their ``coco_url`` to ``image_root/<split>2017/<12-digit id>.jpg``).
    """
    root = Path(root)
    if num_train < 1 or num_val < 1:
        raise ValueError(f"num_train and num_val must be >= 1, got {num_train} and {num_val}")
    if len(image_size) != 2 or min(image_size) < 32:
        raise ValueError(f"image_size must be (height, width) with both >= 32, got {image_size}")
    synthetic_categories(num_categories)  # validates num_categories
    if num_train * MAX_OBJECTS < num_categories:
        raise ValueError(
            f"num_train={num_train} images cannot hold one image of each of {num_categories} categories"
        )
    params = {
        "generator_version": GENERATOR_VERSION,
        "num_train": int(num_train),
        "num_val": int(num_val),
        "num_categories": int(num_categories),
        "image_size": [int(image_size[0]), int(image_size[1])],
        "seed": int(seed),
    }
    paths = {
        "train_json": root / "lvis_v1_train.json",
        "val_json": root / "lvis_v1_val.json",
        "image_root": root,
    }
    old = {k: _load_json(paths[k]) for k in ("train_json", "val_json")}
    if (
        not overwrite
        and all(d is not None and d.get("info", {}).get("params") == params for d in old.values())
        and all(_image_path(root, im).is_file() for d in old.values() for im in d["images"])
    ):
        logger.info("synthetic dataset in %s is up to date (%s)", root, params)
        return paths
    for key, data in old.items():
        if data is not None and "params" not in data.get("info", {}) and not overwrite:
            raise FileExistsError(
                f"{paths[key]} exists and is not a divergen synthetic dataset; pass overwrite=True"
            )

    start = time.perf_counter()
    train = _write_split(root, "train", params, first_image_id=1, first_ann_id=1, progress=progress)
    val = _write_split(
        root,
        "val",
        params,
        first_image_id=num_train + 1,  # ids unique across splits, as in LVIS
        first_ann_id=len(train["annotations"]) + 1,
        progress=progress,
    )
    categories = _category_records(params, train["annotations"])
    val_cats = {a["category_id"] for a in val["annotations"]}
    missing = sorted(val_cats - {c["id"] for c in categories if c["image_count"] > 0})
    if missing:  # guaranteed by the plan; a failure here is a bug in this module
        raise AssertionError(f"val categories {missing} have no train image")
    info = {
        "description": "divergen synthetic long-tailed LVIS-format dataset (procedurally drawn shapes)",
        "version": str(GENERATOR_VERSION),
        "params": params,
    }
    licenses = [{"id": 1, "name": "CC0 1.0 (procedurally generated)", "url": ""}]
    new_images = set()
    for key, split in (("train_json", train), ("val_json", val)):
        data = {"info": info, "licenses": licenses, **split, "categories": categories}
        _dump_json(data, paths[key])
        new_images |= {_image_path(root, im) for im in split["images"]}
    # Remove images of a previous synthetic run that this run did not rewrite (only files that run listed).
    for data in old.values():
        if data is not None and "params" in data.get("info", {}):
            for im in data.get("images", []):
                stale = _image_path(root, im)
                if stale not in new_images:
                    stale.unlink(missing_ok=True)
    groups = {g: sum(cat["frequency"] == g for cat in categories) for g in "rcf"}
    logger.info(
        "wrote %d/%d train/val images, %d/%d instances, %d categories (r/c/f %d/%d/%d) to %s in %.1fs",
        *(num_train, num_val, len(train["annotations"]), len(val["annotations"]), num_categories),
        *groups.values(),
        *(root, time.perf_counter() - start),
    )
    return paths


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", required=True, help="output folder")
    parser.add_argument("--num-train", type=int, default=300)
    parser.add_argument("--num-val", type=int, default=60)
    parser.add_argument("--num-categories", type=int, default=24)
    parser.add_argument("--image-size", type=int, nargs=2, default=(256, 320), metavar=("HEIGHT", "WIDTH"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--overwrite", action="store_true", help="regenerate even if up to date")
    parser.add_argument(
        "--pool-per-category",
        type=int,
        default=0,
        metavar="N",
        help="also write a generated instance pool with N instances per category to <root>/pool (0: none)",
    )
    parser.add_argument(
        "--pool-corrupt-fraction",
        type=float,
        default=0.3,
        metavar="F",
        help="fraction of the pool's instances corrupted (wrong label / noise / bad mask), in [0, 1)",
    )
    args = vars(parser.parse_args(argv))
    pool_per_category = args.pop("pool_per_category")
    pool_corrupt_fraction = args.pop("pool_corrupt_fraction")
    # Checked before drawing the dataset, so that a typo does not cost a full dataset run first.
    if pool_per_category < 0:
        parser.error(f"--pool-per-category must be >= 0, got {pool_per_category}")
    if not 0 <= pool_corrupt_fraction < 1:
        parser.error(f"--pool-corrupt-fraction must be in [0, 1), got {pool_corrupt_fraction}")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    args["image_size"] = tuple(args["image_size"])
    root = args.pop("root")
    paths = make_synthetic_lvis(root, progress=True, **args)
    if pool_per_category > 0:
        # Imported here: synthetic_pool builds on this module (its categories and drawing helpers).
        from .synthetic_pool import make_synthetic_pool

        paths["pool"] = make_synthetic_pool(
            Path(root) / "pool",
            num_categories=args["num_categories"],
            per_category=pool_per_category,
            corrupt_fraction=pool_corrupt_fraction,
            seed=args["seed"],
            overwrite=args["overwrite"],
            progress=True,
        )
    for key, path in paths.items():
        logger.info("%s: %s", key, path)


if __name__ == "__main__":
    main()
