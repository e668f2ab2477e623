"""LVIS / COCO-format data: categories, dataset, transforms, samplers and loaders (centernet2.md §4).

A sample: record -> image decoded lazily (PIL, RGB) -> one ``Geometry`` drawn by the transform -> image, boxes
and masks mapped through it -> instances with an empty box dropped -> masks decoded for the kept ones only.

Randomness: the training sampler yields ``(index, sample_seed)`` keys, a seed per draw, so batches do not
depend on the number of workers and a resumed run (first batches skipped) replays the same augmentations.

Bad input: an unreadable image makes ``__getitem__`` return ``None`` (logged with the file name, counted in
``DetectionDataset.num_skipped``); ``collate`` drops it. A broken annotation file fails at construction.

BSGAL (reference/bsgal.md §1.2 step 0): with ``return_reference`` every training sample also carries a reference
sample, another real training image chosen through one of the classes pasted into it (``reference_sample``).
"""

from __future__ import annotations

import json
import logging
import math
import os
import pickle
import random
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps
from pycocotools import mask as mask_utils

from .boxes import nonempty

logger = logging.getLogger(__name__)

# detectron2's filter_empty_instances(box_threshold=1e-5): a box this thin after the transform is dropped.
EMPTY_BOX_THRESHOLD = 1e-5
# LVIS frequency groups (LVIS paper §3): rare = 1-10 training images, common = 11-100, frequent = >100.
RARE_MAX_IMAGES, COMMON_MAX_IMAGES = 10, 100
SKIP_COUNTER_SLOTS = 65  # the main process + up to 64 loader workers
# An unreadable reference image is replaced by a new draw (class, then image) this many times in all.
REFERENCE_TRIES = 4


def load_category_image_counts(path: str | os.PathLike, num_classes: int) -> torch.Tensor:
    """``(num_classes,)`` float: per contiguous 0-based category, the number of training images containing it.

    Reads any of: a Detic-format category-info list (``[{"id": 1, "image_count": n}, ...]``, the official
    ``lvis_v1_train_cat_info.json``), an LVIS annotation file (``categories[*].image_count``), or a
    COCO-format annotation file (counted from ``annotations``). Categories are ordered by id, so index c is
    the c-th smallest id (LVIS id c+1). The federated loss samples classes with probability ∝ image_count**0.5
    (centernet2.md §3).
    """
    with open(path) as f:
        data = json.load(f)
    if isinstance(data, list):
        records = data
    elif isinstance(data, dict) and "categories" in data:
        records = data["categories"]
        if any("image_count" not in c for c in records):
            if "annotations" not in data:
                raise ValueError(
                    f"{path}: categories have no 'image_count' and there are no 'annotations' to count"
                )
            images_per_cat: dict[int, set] = defaultdict(set)
            for a in data["annotations"]:
                images_per_cat[a["category_id"]].add(a["image_id"])
            records = [{"id": c["id"], "image_count": len(images_per_cat[c["id"]])} for c in records]
    else:
        raise ValueError(f"{path}: expected a category-info list or an annotation file with 'categories'")
    try:
        records = sorted(records, key=lambda c: c["id"])
        counts = [float(c["image_count"]) for c in records]
    except (KeyError, TypeError) as e:
        raise ValueError(f"{path}: every category record needs 'id' and 'image_count' ({e!r})") from None
    if len(counts) != num_classes:
        raise ValueError(f"{path}: {len(counts)} categories, but the model has num_classes={num_classes}")
    return torch.tensor(counts)


def lvis_image_path(record: dict, image_root: str | os.PathLike) -> Path:
    """The image file of an image record.

    ``file_name`` -> ``image_root/file_name`` (preferred when present, as detectron2's LVIS loader);
    LVIS v1's ``coco_url`` ".../train2017/000000000139.jpg" -> ``image_root/train2017/000000000139.jpg``.
    """
    if "file_name" in record:
        return Path(image_root) / record["file_name"]
    if "coco_url" in record:
        return Path(image_root).joinpath(*record["coco_url"].split("/")[-2:])
    raise ValueError(f"image id {record.get('id')}: expected 'file_name' or 'coco_url' in the image record")


# ------------------------------------------------------------------------------------------------ categories


@dataclass(frozen=True)
class CategoryInfo:
    """The categories of an annotation file in contiguous-index order (index c = the c-th smallest id).

    ``image_count`` / ``instance_count`` are counted from the non-crowd annotations, never read from the
    category records. ``frequency`` is the LVIS group by image_count: "r" 1-10, "c" 11-100, "f" > 100. A
    category with 0 images is "r": rarer than rare, and LVIS's zero-shot protocol (rare training annotations
    removed) still reports such categories as APr. From a training file these are LVIS's groups; from a
    validation file they describe that file only.
    """

    ids: tuple[int, ...]
    names: tuple[str, ...]
    image_count: tuple[int, ...]
    instance_count: tuple[int, ...]
    frequency: tuple[str, ...]

    @property
    def num_classes(self) -> int:
        return len(self.ids)

    @property
    def id_to_index(self) -> dict[int, int]:
        """LVIS id -> contiguous index (the inverse is ``ids[index]``)."""
        return {cid: i for i, cid in enumerate(self.ids)}

    @classmethod
    def from_annotations(cls, data: dict, path: str | os.PathLike = "<annotations>") -> CategoryInfo:
        """From a loaded annotation dict; an unknown category_id is a ``ValueError`` naming the annotation."""
        cats = sorted(data.get("categories", []), key=lambda c: c["id"])
        ids = tuple(int(c["id"]) for c in cats)
        if len(set(ids)) != len(ids):
            raise ValueError(f"{path}: duplicate category ids in 'categories'")
        index = {cid: i for i, cid in enumerate(ids)}
        images: list[set] = [set() for _ in ids]
        instances = [0] * len(ids)
        for a in data.get("annotations", []):
            c = _category_index(a, index, path)
            if not a.get("iscrowd", 0):
                images[c].add(a["image_id"])
                instances[c] += 1
        image_count = tuple(len(s) for s in images)
        return cls(
            ids=ids,
            names=tuple(str(c.get("name", c["id"])) for c in cats),
            image_count=image_count,
            instance_count=tuple(instances),
            frequency=tuple(_frequency(n) for n in image_count),
        )


def load_category_info(json_path: str | os.PathLike) -> CategoryInfo:
    """``CategoryInfo`` of an LVIS/COCO annotation file (counted from its annotations; nothing cached)."""
    with open(json_path) as f:
        return CategoryInfo.from_annotations(json.load(f), json_path)


def _frequency(image_count: int) -> str:
    return "r" if image_count <= RARE_MAX_IMAGES else "c" if image_count <= COMMON_MAX_IMAGES else "f"


def _category_index(ann: dict, index: dict[int, int], path) -> int:
    try:
        return index[ann["category_id"]]
    except KeyError:
        raise ValueError(
            f"{path}: annotation id {ann.get('id')} (image id {ann.get('image_id')}) has category_id "
            f"{ann.get('category_id')!r}, which is not among the file's {len(index)} categories"
        ) from None


# ------------------------------------------------------------------------------------------------ transforms


@dataclass(frozen=True)
class Geometry:
    """Where output pixels come from: x' = x·scale_x − offset_x, y' = y·scale_y − offset_y, then x' -> W − x'
    when ``flip``. The image is resized to ``resized``, then cropped at ``offset`` to ``out_size``.
    Sizes are ``(h, w)`` in pixels, ``scale`` is ``(scale_y, scale_x)``, ``offset`` is ``(y, x)``.
    """

    in_size: tuple[int, int]
    resized: tuple[int, int]
    scale: tuple[float, float]
    offset: tuple[int, int]
    out_size: tuple[int, int]
    flip: bool = False

    @classmethod
    def identity(cls, height: int, width: int) -> Geometry:
        return cls((height, width), (height, width), (1.0, 1.0), (0, 0), (height, width))


Transform = Callable[[Geometry, np.random.Generator], Geometry]


def _input_size(name: str, g: Geometry) -> tuple[int, int]:
    if g != Geometry.identity(*g.in_size):
        raise ValueError(f"{name} must be the first transform; it got an already transformed {g}")
    return g.in_size


class ResizeCrop:
    """detectron2/CenterNet2 ``EfficientDetResizeCrop``, the LSJ-style training resize (centernet2.md §4).

    f ~ U(scale_range); scale = min(f·S/h, f·S/w); resize to (int(h·scale), int(w·scale)); where larger than
    S, crop S at offset int(max(0, side − S)·U(0, 1)) (y then x, both drawn always, as the official). No
    padding. Coordinates are scaled by ``scale`` itself, not by the rounded size ratio, as the official.

    Arguments:
        size: S, the output side (640 for R50, 896 for Swin-L).
        scale_range: the range of f.
    """

    def __init__(self, *, size: int = 640, scale_range: tuple[float, float] = (0.1, 2.0)):
        self.size, self.scale_range = size, tuple(scale_range)

    def __call__(self, g: Geometry, rng: np.random.Generator) -> Geometry:
        h, w = _input_size("ResizeCrop", g)
        f = rng.uniform(*self.scale_range)
        scale = min(f * self.size / h, f * self.size / w)
        # max(1, .): an extreme aspect ratio at small f would give a 0-pixel side, which PIL cannot make.
        rh, rw = max(int(h * scale), 1), max(int(w * scale), 1)
        oy = int(max(0.0, float(rh - self.size)) * rng.uniform(0, 1))
        ox = int(max(0.0, float(rw - self.size)) * rng.uniform(0, 1))
        out = (min(rh - oy, self.size), min(rw - ox, self.size))
        return Geometry(g.in_size, (rh, rw), (scale, scale), (oy, ox), out)


class ResizeShortestEdge:
    """detectron2 ``ResizeShortestEdge``, the test resize (centernet2.md §4, §6.9): the short side to
    ``short_edge`` unless the long side would pass ``max_size``; sizes rounded as int(x + 0.5); coordinates
    scaled per axis by new/old size.

    Arguments:
        short_edge: target length of the short side.
        max_size: cap on the long side.
    """

    def __init__(self, *, short_edge: int = 800, max_size: int = 1333):
        self.short_edge, self.max_size = short_edge, max_size

    def __call__(self, g: Geometry, rng: np.random.Generator | None = None) -> Geometry:
        h, w = _input_size("ResizeShortestEdge", g)
        scale = self.short_edge / min(h, w)
        nh, nw = (self.short_edge, scale * w) if h < w else (scale * h, self.short_edge)
        if max(nh, nw) > self.max_size:
            shrink = self.max_size / max(nh, nw)
            nh, nw = nh * shrink, nw * shrink
        nh, nw = int(nh + 0.5), int(nw + 0.5)
        return Geometry(g.in_size, (nh, nw), (nh / h, nw / w), (0, 0), (nh, nw))


class RandomFlip:
    """Horizontal flip with probability ``p`` (detectron2 ``RandomFlip``: flip iff U(0, 1) < p).

    Arguments:
        p: flip probability.
    """

    def __init__(self, *, p: float = 0.5):
        self.p = p

    def __call__(self, g: Geometry, rng: np.random.Generator) -> Geometry:
        return replace(g, flip=g.flip ^ bool(rng.uniform(0, 1) < self.p))


class Compose:
    """Transforms applied in order, starting from an image's identity geometry."""

    def __init__(self, *transforms: Transform):
        self.transforms = transforms

    def __call__(self, g: Geometry, rng: np.random.Generator) -> Geometry:
        for t in self.transforms:
            g = t(g, rng)
        return g


def train_transform(size: int, scale_range: tuple[float, float] = (0.1, 2.0)) -> Compose:
    """The official training augmentation: ``ResizeCrop`` then ``RandomFlip(p=0.5)`` (centernet2.md §4)."""
    return Compose(ResizeCrop(size=size, scale_range=scale_range), RandomFlip(p=0.5))


def apply_image(image: Image.Image, g: Geometry) -> torch.Tensor:
    """PIL RGB image -> ``(3, H, W)`` uint8 through ``g``: bilinear resize of the whole image, then crop and
    flip, the official order (resizing only the crop window would change pixels by float rounding)."""
    if g.resized != g.in_size:
        image = image.resize((g.resized[1], g.resized[0]), Image.Resampling.BILINEAR)
    (oy, ox), (oh, ow) = g.offset, g.out_size
    if (oy, ox, oh, ow) != (0, 0, *g.resized):
        image = image.crop((ox, oy, ox + ow, oy + oh))
    if g.flip:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return torch.from_numpy(np.ascontiguousarray(np.asarray(image).transpose(2, 0, 1)))


def apply_boxes(boxes: torch.Tensor, g: Geometry) -> torch.Tensor:
    """``(N, 4)`` xyxy input pixels -> ``(N, 4)`` float32 xyxy output pixels, clipped to the output image.

    In float64, as detectron2's numpy box transform. Empty boxes are kept: the caller filters (``nonempty``).
    """
    (sy, sx), (oy, ox), (h, w) = g.scale, g.offset, g.out_size
    b = boxes.double() * boxes.new_tensor([sx, sy, sx, sy], dtype=torch.float64)
    b = b - b.new_tensor([ox, oy, ox, oy])
    b = torch.stack(
        [b[:, 0].clamp(0, w), b[:, 1].clamp(0, h), b[:, 2].clamp(0, w), b[:, 3].clamp(0, h)], dim=1
    )
    if g.flip:
        b = torch.stack([w - b[:, 2], b[:, 1], w - b[:, 0], b[:, 3]], dim=1)
    return b.float()


def _nearest_index(n_in: int, n_out: int) -> np.ndarray:
    """``(n_out,)``: the source pixel of each output pixel of a PIL NEAREST resize n_in -> n_out. PIL walks
    the sample centers by repeated addition of n_in / n_out in double; the cumulative sum reproduces it
    exactly."""
    steps = np.full(n_out, n_in / n_out)
    steps[0] = 0.5 * n_in / n_out
    return np.minimum(np.cumsum(steps).astype(np.int64), n_in - 1)


def decode_masks(segmentations: Sequence, g: Geometry) -> torch.Tensor:
    """One image's segmentations (COCO polygons; RLE compressed or not) -> ``(N, H, W)`` bool, ``g``'s output.

    Polygons: coordinates mapped by ``g`` (as detectron2, which transforms polygons, not bitmaps) and
    rasterized by pycocotools on a canvas spanning the polygon's own box, so an instance costs its own size
    and the parts outside the crop do not bend the rest; pasted into the crop. RLE: decoded at the input size,
    then PIL's NEAREST resize reproduced exactly (centernet2.md §4), sampled inside the crop only. Mirrored
    when flipped.
    """
    (h, w), (oy, ox), (sy, sx) = g.out_size, g.offset, g.scale
    out = np.zeros((len(segmentations), h, w), dtype=bool)
    rows = cols = None
    for i, segm in enumerate(segmentations):
        if isinstance(segm, dict):
            if rows is None:
                rows = _nearest_index(g.in_size[0], g.resized[0])[oy : oy + h]
                cols = _nearest_index(g.in_size[1], g.resized[1])[ox : ox + w]
                cols = cols[::-1] if g.flip else cols
            rle = mask_utils.frPyObjects(segm, *segm["size"]) if isinstance(segm["counts"], list) else segm
            out[i] = mask_utils.decode(rle).astype(bool)[np.ix_(rows, cols)]
            continue
        polys = [np.asarray(p, dtype=np.float64).reshape(-1, 2) * (sx, sy) - (ox, oy) for p in segm]
        pts = np.concatenate(polys)
        x0, y0 = np.floor(pts.min(0)).astype(int)
        x1, y1 = np.ceil(pts.max(0)).astype(int) + 1
        cx0, cy0, cx1, cy1 = max(x0, 0), max(y0, 0), min(x1, w), min(y1, h)
        if cx0 >= cx1 or cy0 >= cy1:
            continue
        local = [(p - (x0, y0)).ravel().tolist() for p in polys]
        canvas = mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects(local, y1 - y0, x1 - x0)))
        piece = canvas[cy0 - y0 : cy1 - y0, cx0 - x0 : cx1 - x0]
        if g.flip:  # mirror the raster, not the polygon, so that masks flip pixel for pixel with the image
            out[i, cy0:cy1, w - cx1 : w - cx0] = piece[:, ::-1]
        else:
            out[i, cy0:cy1, cx0:cx1] = piece
    return torch.from_numpy(out)


# ------------------------------------------------------------------------------------------------ dataset


class _SerializedList:
    """Records pickled into one numpy byte buffer, which worker processes share copy-on-write. A list of dicts
    would be copied page by page into every worker by refcounting; LVIS train has ~1.3M polygons (detectron2's
    ``DatasetFromList(serialize=True)`` does this for the same reason)."""

    def __init__(self, records: list):
        blobs = [pickle.dumps(r, protocol=pickle.HIGHEST_PROTOCOL) for r in records]
        self._ends = np.cumsum([len(b) for b in blobs], dtype=np.int64)
        self._buffer = np.frombuffer(b"".join(blobs), dtype=np.uint8)

    def __len__(self) -> int:
        return len(self._ends)

    def __getitem__(self, i: int):
        start = int(self._ends[i - 1]) if i > 0 else 0
        return pickle.loads(memoryview(self._buffer[start : int(self._ends[i])]))


class DetectionDataset(torch.utils.data.Dataset):
    """An LVIS v1 / COCO-format instance-segmentation dataset (JSON + image root), images loaded lazily.

    ``dataset[index]`` or ``dataset[(index, sample_seed)]`` -> ``None`` if the image is unreadable, else a
    dict: ``image`` (3, H, W) uint8 RGB; ``boxes`` (N, 4) float32 xyxy output pixels; ``labels`` (N,) int64,
    0-based contiguous; ``masks`` (N, H, W) bool (absent without ``load_masks``); ``image_id`` int;
    ``file_name`` str; ``orig_size`` (h, w) of the file; ``scale`` (scale_y, scale_x), file pixels -> output
    pixels (at test, outputs map back by dividing by it; at train a crop offset applies too).

    At construction: crowd annotations (iscrowd=1) are dropped, as detectron2's mapper does; an annotation
    with a category_id not in the file's categories raises ``ValueError`` naming the annotation id, image id
    and file; polygon parts with fewer than 3 points are dropped, and an instance left without any is dropped
    and counted in ``num_invalid_segmentations`` (detectron2's COCO loader); ``filter_empty`` drops images
    left without annotations (training, ``FILTER_EMPTY_ANNOTATIONS``).

    Arguments:
        json_path: LVIS/COCO annotation file.
        image_root: folder the image records resolve against (``lvis_image_path``).
        transform: a ``Transform`` (``train_transform(640)``, ``ResizeShortestEdge()``); ``None`` = identity.
        filter_empty: drop images without (non-crowd) annotations.
        load_masks: decode masks (training); evaluation reads its ground truth from the JSON instead.
        paste: applied to every sample after the transform (``divergen.paste.InstancePaste``, needs masks):
            the sample gains ``is_pasted`` (N,) bool and ``pool_index`` (N,) int64 (-1 for real instances).
        return_original: with ``paste``, also return the same crop without the pasted instances, as
            ``original`` = {image, boxes, labels, masks} (BSGAL trains on it when it rejects a pasted batch).
        return_reference: also return ``reference``, BSGAL's reference sample of this image
            (``reference_sample``; ``None`` when there is none), drawn with the sample's own generator.

    ``size_stats``: ``(C, 2)`` [mean, std] of sqrt(box area / image area) per category over the non-crowd
    annotations, the statistics instance paste sizes its instances from (``divergen.paste.size_statistics``).

    ``class_image_indptr`` ``(C + 1,)`` int64 and ``class_image_indices`` int64: the images containing each
    category in CSR form, ascending (``images_of``). Two numpy arrays rather than a dict of lists, so that
    loader workers share them copy-on-write at LVIS scale (100k images, 1203 classes).
    """

    def __init__(
        self,
        json_path: str | os.PathLike,
        image_root: str | os.PathLike,
        *,
        transform: Transform | None,
        filter_empty: bool,
        load_masks: bool = True,
        paste: Callable[[dict, np.random.Generator], dict] | None = None,
        return_original: bool = False,
        return_reference: bool = False,
    ):
        if paste is not None and not load_masks:
            raise ValueError("instance paste needs the masks: load_masks=True")
        self.json_path, self.image_root = str(json_path), Path(image_root)
        self.transform, self.load_masks = transform, load_masks
        self.paste, self.return_original, self.return_reference = paste, return_original, return_reference
        with open(json_path) as f:
            data = json.load(f)
        self.categories = CategoryInfo.from_annotations(data, json_path)
        index = self.categories.id_to_index
        sizes = {img["id"]: [img["height"], img["width"]] for img in data["images"]}
        anns_per_image: dict[int, list] = defaultdict(list)
        self.num_invalid_segmentations = 0
        size_labels, rel_sizes = [], []
        for a in data.get("annotations", []):
            label = _category_index(a, index, json_path)
            if a["image_id"] not in sizes:
                raise ValueError(
                    f"{json_path}: annotation id {a.get('id')} has unknown image id {a['image_id']}"
                )
            if a.get("iscrowd", 0):
                continue
            x, y, bw, bh = a["bbox"]
            h, w = sizes[a["image_id"]]
            size_labels.append(label)
            rel_sizes.append(math.sqrt(max(bw * bh, 0.0) / (h * w)))
            segm = _checked_segmentation(a, sizes[a["image_id"]], json_path) if load_masks else None
            if load_masks and segm is None:
                self.num_invalid_segmentations += 1
                continue
            anns_per_image[a["image_id"]].append((label, [x, y, x + bw, y + bh], segm))
        from .paste import size_statistics  # paste -> pool -> data: imported here, not at the top

        self.size_stats = size_statistics(
            np.array(size_labels), np.array(rel_sizes), self.categories.num_classes
        )
        if self.num_invalid_segmentations:
            logger.warning(
                f"{json_path}: dropped {self.num_invalid_segmentations} instances without a polygon"
            )
        records = []
        for img in data["images"]:
            anns = anns_per_image.get(img["id"], [])
            if anns or not filter_empty:
                labels, boxes, segms = zip(*anns, strict=True) if anns else ((), (), ())
                file = str(lvis_image_path(img, ""))
                records.append(dict(id=img["id"], file=file, height=img["height"], width=img["width"],
                                    labels=labels, boxes=boxes, segms=segms))  # fmt: skip
        # Per-image category sets and orientation, for the repeat-factor sampler and aspect-ratio grouping.
        self.image_categories = [sorted(set(r["labels"])) for r in records]
        self.is_wide = np.array([r["width"] > r["height"] for r in records], dtype=bool)
        self.class_image_indptr, self.class_image_indices = _class_image_index(
            self.image_categories, self.categories.num_classes
        )
        self._records = _SerializedList(records)
        # A counter slot per process (0 = main, w + 1 = worker w) in shared memory: the workers' counts show
        # here under fork and spawn alike, and within a loader no two processes write the same slot.
        self._skipped = torch.zeros(SKIP_COUNTER_SLOTS, dtype=torch.int64).share_memory_()
        self._rng: np.random.Generator | None = None

    def __len__(self) -> int:
        return len(self._records)

    @property
    def num_skipped(self) -> int:
        """Samples skipped so far (missing / corrupt image), summed over all worker processes."""
        return int(self._skipped.sum())

    def record(self, index: int) -> dict:
        """The stored record of image ``index``: id, file, height, width, labels, boxes (xyxy), segms."""
        return self._records[index]

    def images_of(self, category: int) -> np.ndarray:
        """``(n,)`` int64, ascending: the images (dataset indices) that contain ``category``; empty for a
        category without training images or outside ``[0, num_classes)`` (e.g. a pasted extra class)."""
        if not 0 <= category < self.categories.num_classes:
            return self.class_image_indices[:0]
        return self.class_image_indices[
            self.class_image_indptr[category] : self.class_image_indptr[category + 1]
        ]

    def reseed(self, seed: int) -> None:
        """Seed the generator used for integer keys (``worker_init_fn`` calls it in every worker)."""
        self._rng = np.random.default_rng(seed)

    def __getitem__(self, key: int | tuple[int, int]) -> dict | None:
        if isinstance(key, tuple):
            index, rng = key[0], np.random.default_rng(key[1])
        else:
            if self._rng is None:
                self.reseed(torch.initial_seed())
            index, rng = key, self._rng
        return self._load(index, rng, paste=True)

    def reference_sample(
        self, labels: Sequence[int], rng: np.random.Generator, *, fallback_labels: Sequence[int] = ()
    ) -> dict | None:
        """BSGAL's reference sample (reference/bsgal.md §1.2 step 0, ``ACTIVE_TEST='select'``).

        A class c uniformly among the distinct ``labels`` (the classes pasted into the training image), then a
        training image uniformly among those containing c (``images_of``), through the same ``transform`` (a new
        draw from ``rng``), with all its GT and nothing pasted. Classes without a training image (pasted extra
        classes) are not candidates; when none is left, the distinct ``fallback_labels`` (the image's own) are;
        when none of those either, ``None``. An unreadable image is replaced by a new draw of class and image,
        ``REFERENCE_TRIES`` times in all, then ``None``. (The official redraws a class among all 1203 where this
        falls back to the image's own labels, and takes the classes of all the sampled pool instances where
        ``labels`` are those of the pasted instances that survived.)

        Returns:
            ``image`` (3, H, W) uint8, ``boxes`` (N, 4) float32 xyxy, ``labels`` (N,) int64, ``masks`` (N, H, W)
            bool (with ``load_masks``), ``image_id``; or ``None``.
        """
        candidates = self._reference_classes(labels)
        if len(candidates) == 0:
            candidates = self._reference_classes(fallback_labels)
        if len(candidates) == 0:
            return None
        for _ in range(REFERENCE_TRIES):
            images = self.images_of(int(candidates[rng.integers(0, len(candidates))]))
            item = self._load(int(images[rng.integers(0, len(images))]), rng, paste=False)
            if item is not None:
                return {k: item[k] for k in ("image", "boxes", "labels", "masks", "image_id") if k in item}
        return None

    def _reference_classes(self, labels: Sequence[int]) -> np.ndarray:
        """The distinct ``labels`` that have at least one training image, ascending."""
        labels = np.unique(np.asarray(labels, dtype=np.int64))
        labels = labels[(labels >= 0) & (labels < self.categories.num_classes)]
        return labels[self.class_image_indptr[labels + 1] > self.class_image_indptr[labels]]

    def _load(self, index: int, rng: np.random.Generator, *, paste: bool) -> dict | None:
        """Image ``index`` through the transform (drawn from ``rng``); ``None`` if unreadable.

        ``paste``: a training sample: paste into it (keeping ``original`` with ``return_original``) and draw its
        ``reference`` (with ``return_reference``). ``False``: the plain sample (a reference itself).
        """
        r = self._records[index]
        path = self.image_root / r["file"]
        image = self._read_image(path, r)
        if image is None:
            return None
        g = Geometry.identity(r["height"], r["width"])
        if self.transform is not None:
            g = self.transform(g, rng)
        boxes = apply_boxes(torch.tensor(r["boxes"], dtype=torch.float64).reshape(-1, 4), g)
        keep = nonempty(boxes, EMPTY_BOX_THRESHOLD)
        item = {
            "image": apply_image(image, g),
            "boxes": boxes[keep],
            "labels": torch.tensor(r["labels"], dtype=torch.int64)[keep],
            "image_id": r["id"],
            "file_name": str(path),
            "orig_size": (r["height"], r["width"]),
            "scale": g.scale,
        }
        if self.load_masks:
            item["masks"] = decode_masks([r["segms"][i] for i in keep.nonzero()[:, 0].tolist()], g)
        if not paste:
            return item
        # The crop's own labels before paste (paste may drop occluded ones): the reference's fallback classes.
        own_labels = item["labels"].tolist()
        if self.paste is not None:
            pasted = self.paste(item, rng)
            if self.return_original:
                item["original"] = {k: item[k] for k in ("image", "boxes", "labels", "masks")}
            item.update(pasted)
        if self.return_reference:
            is_pasted = item.get("is_pasted")
            pasted_labels = item["labels"][is_pasted].tolist() if is_pasted is not None else []
            item["reference"] = self.reference_sample(pasted_labels, rng, fallback_labels=own_labels)
        return item

    def _read_image(self, path: Path, r: dict) -> Image.Image | None:
        try:
            with Image.open(path) as f:
                image = ImageOps.exif_transpose(f).convert("RGB")  # as detectron2's read_image
            if image.size == (r["width"], r["height"]):
                return image
            reason = f"decoded size {image.size[1]}x{image.size[0]} != annotated {r['height']}x{r['width']}"
        except (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError) as e:
            reason = f"{type(e).__name__}: {e}"
        worker = torch.utils.data.get_worker_info()
        self._skipped[0 if worker is None else 1 + worker.id % (SKIP_COUNTER_SLOTS - 1)] += 1
        logger.warning(f"skipping image id {r['id']} ({path}): {reason}")
        return None


def _class_image_index(
    image_categories: Sequence[Sequence[int]], num_classes: int
) -> tuple[np.ndarray, np.ndarray]:
    """Per-image category lists -> CSR ``(indptr (C + 1,), indices)`` int64: the images of class c are
    ``indices[indptr[c]:indptr[c + 1]]``, ascending (a stable sort of the flattened lists by class)."""
    counts = np.fromiter((len(c) for c in image_categories), dtype=np.int64, count=len(image_categories))
    classes = np.fromiter(
        (c for cats in image_categories for c in cats), dtype=np.int64, count=int(counts.sum())
    )
    images = np.repeat(np.arange(len(image_categories), dtype=np.int64), counts)
    indptr = np.zeros(num_classes + 1, dtype=np.int64)
    np.cumsum(np.bincount(classes, minlength=num_classes), out=indptr[1:])
    return indptr, images[np.argsort(classes, kind="stable")]


def _checked_segmentation(a: dict, image_size: list[int], path) -> list | dict | None:
    """The annotation's RLE, or its valid polygon parts (None if there are none)."""
    if "segmentation" not in a:
        raise ValueError(
            f"{path}: annotation id {a.get('id')} (image id {a['image_id']}) has no 'segmentation'"
        )
    segm = a["segmentation"]
    if isinstance(segm, dict):
        if "counts" not in segm or "size" not in segm:
            raise ValueError(f"{path}: annotation id {a.get('id')}: an RLE needs 'counts' and 'size'")
        if list(segm["size"]) != image_size:
            raise ValueError(
                f"{path}: annotation id {a.get('id')}: RLE size {segm['size']} != the image's (h, w) "
                f"{image_size} (image id {a['image_id']})"
            )
        return segm
    return [p for p in segm if len(p) % 2 == 0 and len(p) >= 6] or None


def collate(batch: Sequence[dict | None]) -> tuple[list[torch.Tensor], list[dict], list[dict]]:
    """Samples -> (images, targets, infos), each image at its own size (the model pads the batch).

    images: (3, H_i, W_i) uint8; targets: ``boxes``, ``labels``, ``masks`` (when loaded), ``is_pasted`` (with
    instance paste); infos: ``image_id``, ``file_name``, ``orig_size``, ``scale``, ``pool_index`` (with instance
    paste), ``original`` (the un-pasted crop) and ``reference`` (BSGAL's reference sample, possibly ``None``) when
    the dataset returns them. Skipped samples (``None``) are dropped: a batch may come out short, or empty if none
    of it was readable.
    """
    kept = [b for b in batch if b is not None]
    return (
        [b["image"] for b in kept],
        [{k: b[k] for k in ("boxes", "labels", "masks", "is_pasted") if k in b} for b in kept],
        [
            {
                k: b[k]
                for k in (
                    "image_id",
                    "file_name",
                    "orig_size",
                    "scale",
                    "original",
                    "pool_index",
                    "reference",
                )
                if k in b
            }
            for b in kept
        ],
    )


# ------------------------------------------------------------------------------------------------ samplers


def repeat_factors(image_categories: Sequence[Sequence[int]], threshold: float) -> torch.Tensor:
    """``(num_images,)`` float32 repeat factors (LVIS paper §4.3, detectron2 ``RepeatFactorTrainingSampler``).

    f_c = fraction of the images that contain category c; r_c = max(1, sqrt(t / f_c)); r_img = max of r_c over
    the image's categories (1 for an image without any).
    """
    num_images = len(image_categories)
    image_count: dict[int, int] = defaultdict(int)
    for cats in image_categories:
        for c in set(cats):
            image_count[c] += 1
    r_cat = {c: max(1.0, math.sqrt(threshold / (n / num_images))) for c, n in image_count.items()}
    factors = [max((r_cat[c] for c in cats), default=1.0) for cats in image_categories]
    return torch.tensor(factors, dtype=torch.float32)


class RepeatFactorSampler(torch.utils.data.Sampler):
    """Infinite stream of this rank's ``(index, sample_seed)`` keys with LVIS repeat-factor sampling.

    Epoch e: a generator seeded by (seed, e) draws the stochastic rounding of every repeat factor (int part +
    [U < fractional part]), a permutation of the resulting list (``shuffle``) and one augmentation seed per
    entry; rank r takes entries r, r + world_size, ... The ranks' shares are disjoint, their union is the
    epoch's list, and everything depends on (seed, epoch) only. Shares may differ in length by one, so ranks
    drift apart by at most one sample per epoch, which nothing downstream depends on.

    Arguments:
        image_categories: per image, its category indices, or the dataset (its ``image_categories``).
        threshold: t of the repeat factor (0.001 for LVIS).
        seed: the same on every rank.
        rank, world_size: this process's place in the data-parallel group.
        shuffle: permute each epoch (off: dataset order with repeats).
    """

    def __init__(
        self,
        image_categories: Sequence[Sequence[int]] | DetectionDataset,
        *,
        threshold: float = 0.001,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        shuffle: bool = True,
    ):
        if isinstance(image_categories, DetectionDataset):
            image_categories = image_categories.image_categories
        if not 0 <= rank < world_size:
            raise ValueError(f"expected 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        self.factors = repeat_factors(image_categories, threshold)
        self.seed, self.rank, self.world_size, self.shuffle = seed, rank, world_size, shuffle
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """The epoch the next iterator starts from (then epoch + 1, ...)."""
        self.epoch = epoch

    def epoch_keys(self, epoch: int) -> list[tuple[int, int]]:
        """All ranks' ``(index, sample_seed)`` keys of ``epoch``; this rank takes every world_size-th."""
        state = np.random.SeedSequence([self.seed, epoch]).generate_state(1, np.uint64)[0]
        g = torch.Generator().manual_seed(int(state >> np.uint64(1)))
        int_part = self.factors.trunc()
        reps = int_part + (torch.rand(len(self.factors), generator=g) < self.factors - int_part).float()
        indices = torch.repeat_interleave(torch.arange(len(self.factors)), reps.long())
        if self.shuffle:
            indices = indices[torch.randperm(len(indices), generator=g)]
        seeds = torch.randint(0, 2**62, (len(indices),), generator=g)
        return list(zip(indices.tolist(), seeds.tolist(), strict=True))

    def __iter__(self) -> Iterator[tuple[int, int]]:
        epoch = self.epoch
        while True:
            yield from self.epoch_keys(epoch)[self.rank :: self.world_size]
            epoch += 1


class InferenceSampler(torch.utils.data.Sampler):
    """0..num_images-1 in contiguous shards, one per rank, with no duplicates and no padding (detectron2
    ``InferenceSampler``): the first num_images % world_size ranks get one image more.

    Arguments:
        num_images: dataset length.
        rank, world_size: this process's place in the group.
    """

    def __init__(self, num_images: int, *, rank: int = 0, world_size: int = 1):
        if not 0 <= rank < world_size:
            raise ValueError(f"expected 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        base, extra = divmod(num_images, world_size)
        self.begin = rank * base + min(rank, extra)
        self.end = self.begin + base + int(rank < extra)

    def __len__(self) -> int:
        return self.end - self.begin

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.begin, self.end))


class AspectRatioGroupedBatchSampler(torch.utils.data.Sampler):
    """Batches of ``batch_size`` keys whose images share orientation (w > h or not), so batches pad less
    (detectron2 ``ASPECT_RATIO_GROUPING``, on in the official configs). detectron2 groups by the transformed
    size; this groups by the annotated size, which is known before loading.

    Arguments:
        sampler: yields ``index`` or ``(index, seed)`` keys.
        is_wide: ``(num_images,)`` bool, ``DetectionDataset.is_wide``.
        batch_size: images per batch on this rank.
    """

    def __init__(self, sampler: torch.utils.data.Sampler, *, is_wide: np.ndarray, batch_size: int):
        self.sampler, self.is_wide, self.batch_size = sampler, is_wide, batch_size

    def __iter__(self) -> Iterator[list]:
        buckets: tuple[list, list] = ([], [])
        for key in self.sampler:
            bucket = buckets[int(self.is_wide[key[0] if isinstance(key, tuple) else key])]
            bucket.append(key)
            if len(bucket) == self.batch_size:
                yield bucket[:]
                bucket.clear()


# ------------------------------------------------------------------------------------------------ loaders


def worker_init_fn(worker_id: int) -> None:
    """Own, reproducible generators per worker: torch seeds worker w with base_seed + w (base_seed drawn from
    the loader's seeded generator); ``random``, numpy's global state and the dataset's generator follow."""
    info = torch.utils.data.get_worker_info()
    random.seed(info.seed)
    np.random.seed(info.seed % 2**32)  # noqa: NPY002 -- for third-party code that uses the global state
    if isinstance(info.dataset, DetectionDataset):
        info.dataset.reseed(info.seed)


def _loader(dataset, num_workers: int, seed: int, **kwargs) -> torch.utils.data.DataLoader:
    return torch.utils.data.DataLoader(
        dataset,
        num_workers=num_workers,
        collate_fn=collate,
        pin_memory=torch.cuda.is_available(),
        persistent_workers=num_workers > 0,
        worker_init_fn=worker_init_fn,
        generator=torch.Generator().manual_seed(seed),
        **kwargs,
    )


def build_train_loader(
    dataset: DetectionDataset,
    sampler: torch.utils.data.Sampler,
    *,
    batch_size: int,
    num_workers: int,
    seed: int,
    aspect_ratio_grouping: bool = True,
) -> torch.utils.data.DataLoader:
    """Infinite loader of ``collate`` batches of ``batch_size`` images per rank (the sampler shards)."""
    if aspect_ratio_grouping:
        batches = AspectRatioGroupedBatchSampler(sampler, is_wide=dataset.is_wide, batch_size=batch_size)
        return _loader(dataset, num_workers, seed, batch_sampler=batches)
    return _loader(dataset, num_workers, seed, sampler=sampler, batch_size=batch_size, drop_last=True)


def build_test_loader(
    dataset: DetectionDataset, *, batch_size: int = 1, num_workers: int, rank: int = 0, world_size: int = 1
) -> torch.utils.data.DataLoader:
    """This rank's contiguous shard of ``dataset`` (``InferenceSampler``) in order, as ``collate`` batches."""
    sampler = InferenceSampler(len(dataset), rank=rank, world_size=world_size)
    return _loader(dataset, num_workers, 0, sampler=sampler, batch_size=batch_size)
