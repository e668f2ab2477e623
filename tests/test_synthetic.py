"""The synthetic long-tailed LVIS-format dataset: LVIS fields, frequency groups, exact masks, determinism."""

from __future__ import annotations

import itertools
import json
import math
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_util
from pycocotools.coco import COCO

from divergen.synthetic import (
    COLOURS,
    MAX_CATEGORIES,
    MAX_OBJECTS,
    MIN_AREA,
    SHAPES,
    STAR_NOTCH,
    _shape_mask,
    assign_categories,
    lvis_frequency,
    main,
    make_synthetic_lvis,
    plan_image_counts,
    render_split,
    synthetic_categories,
)

# pycocotools' RLE decoding under numpy 2 warns about its own __array__; not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

# Small enough for a fast test, large enough (> 100 train images) for all three LVIS frequency groups.
PARAMS = {"num_train": 130, "num_val": 30, "num_categories": 12, "image_size": (128, 160), "seed": 7}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("synthetic")
    paths = make_synthetic_lvis(root, **PARAMS)
    with open(paths["train_json"]) as f:
        train = json.load(f)
    with open(paths["val_json"]) as f:
        val = json.load(f)
    return {"paths": paths, "train": train, "val": val}


def _decode(ann: dict) -> np.ndarray:
    return mask_util.decode(ann["segmentation"]).astype(bool)


def _by_image(data: dict) -> dict[int, list[dict]]:
    out = defaultdict(list)
    for ann in data["annotations"]:
        out[ann["image_id"]].append(ann)
    return out


def _fits_colour(pixels: np.ndarray, rgb: np.ndarray, tol: float = 45.0) -> np.ndarray:
    """(P,) bool: pixel = s * rgb + noise for a brightness s in [0.75, 1.25], as drawn (lighting + noise)."""
    s = pixels @ rgb / (rgb @ rgb)
    residual = np.linalg.norm(pixels - s[:, None] * rgb, axis=1)
    return (residual < tol) & (s > 0.75) & (s < 1.25)


# --- categories and frequency groups --------------------------------------------------------------


def test_categories_have_lvis_fields_and_unique_names():
    cats = synthetic_categories(MAX_CATEGORIES)
    assert [c.id for c in cats] == list(range(1, MAX_CATEGORIES + 1))
    assert len({c.name for c in cats}) == MAX_CATEGORIES
    assert len({(c.shape, c.colour, c.texture) for c in cats}) == MAX_CATEGORIES
    for c in cats:
        assert c.synonyms[0] == c.name and len(c.synonyms) >= 2
        assert c.colour in c.definition and c.shape in c.definition and len(c.definition.split()) >= 5
        assert c.synset == f"{c.name}.n.01"
    # The list does not depend on how many categories are asked for.
    assert synthetic_categories(5) == cats[:5]
    for bad in (2, MAX_CATEGORIES + 1):
        with pytest.raises(ValueError, match="num_categories"):
            synthetic_categories(bad)


def test_lvis_frequency_boundaries():
    # LVIS §3: rare 1-10 training images, common 11-100, frequent > 100.
    assert [lvis_frequency(n) for n in (1, 10, 11, 100, 101, 5000)] == ["r", "r", "c", "c", "f", "f"]
    with pytest.raises(ValueError, match="image_count"):
        lvis_frequency(0)


def test_default_plan_is_long_tailed():
    train, val = plan_image_counts(300, 60, 24, np.random.default_rng(0))
    groups = [lvis_frequency(int(n)) for n in train]
    assert (groups.count("f"), groups.count("c"), groups.count("r")) == (4, 10, 10)
    assert train.min() == 1 and train.max() <= 300
    assert (val >= 3).all() and (val <= 60).all()


def test_assign_categories_gives_exact_image_counts():
    rng = np.random.default_rng(1)
    counts, _ = plan_image_counts(300, 60, 24, rng)
    layouts = assign_categories(counts, 300, rng)
    assert all(1 <= len(objs) <= MAX_OBJECTS for objs in layouts)
    per_cat = np.zeros(24, dtype=np.int64)
    for objs in layouts:
        for k in set(objs):
            per_cat[k] += 1
    # Every image got a category during the pass (no empty-image fallback needed), so the counts are exact.
    np.testing.assert_array_equal(per_cat, counts)
    # Too few images for the plan: every category still gets an image, the frequent ones absorb the shortfall.
    counts, _ = plan_image_counts(3, 3, 17, rng)
    layouts = assign_categories(counts, 3, rng)
    assert sorted({k for objs in layouts for k in objs}) == list(range(17))
    assert sum(map(len, layouts)) == 3 * MAX_OBJECTS


def test_frequency_fields_recomputed_from_annotations(dataset):
    train = dataset["train"]
    images, instances = defaultdict(set), defaultdict(int)
    for ann in train["annotations"]:
        images[ann["category_id"]].add(ann["image_id"])
        instances[ann["category_id"]] += 1
    for cat in train["categories"]:
        assert cat["image_count"] == len(images[cat["id"]]), cat["name"]
        assert cat["instance_count"] == instances[cat["id"]], cat["name"]
        n = cat["image_count"]
        assert cat["frequency"] == ("r" if 1 <= n <= 10 else "c" if 11 <= n <= 100 else "f"), cat["name"]
    assert {c["frequency"] for c in train["categories"]} == {"r", "c", "f"}
    assert dataset["val"]["categories"] == train["categories"]


# --- geometry and masks ---------------------------------------------------------------------------


def _circle_intersection(r1: float, r2: float, d: float) -> float:
    """Area of the intersection of two discs with radii r1, r2 and centre distance d (lens formula)."""
    a1 = r1 * r1 * math.acos((d * d + r1 * r1 - r2 * r2) / (2 * d * r1))
    a2 = r2 * r2 * math.acos((d * d + r2 * r2 - r1 * r1) / (2 * d * r2))
    return a1 + a2 - 0.5 * math.sqrt((-d + r1 + r2) * (d + r1 - r2) * (d - r1 + r2) * (d + r1 + r2))


def test_shape_areas_match_closed_forms():
    n = 1201
    axis = np.linspace(-1.05, 1.05, n)
    v, u = np.meshgrid(axis, axis, indexing="ij")
    cell = (axis[1] - axis[0]) ** 2
    expected = {
        "disc": math.pi,
        "ring": math.pi * (1 - 0.5**2),
        "ellipse": math.pi * 0.5,
        "square": 1.4**2,
        "diamond": 2 * 1.0 * 0.6,
        "triangle": 3 * math.sqrt(3) / 4,  # circumradius 1
        "hexagon": 3 * math.sqrt(3) / 2,
        "cross": 2 * (0.6 * 1.9) - 0.6**2,
        "crescent": math.pi - _circle_intersection(1.0, 0.8, 0.5),
        # 10 triangles (origin, tip, notch) with sides 1 and STAR_NOTCH at angle pi/5.
        "star": 10 * 0.5 * STAR_NOTCH * math.sin(math.pi / 5),
    }
    assert set(expected) == set(SHAPES)
    for shape, area in expected.items():
        inside = _shape_mask(shape, u, v)
        assert inside.sum() * cell == pytest.approx(area, rel=5e-3), shape
        assert not inside[u * u + v * v > 1.0 + 1e-9].any(), f"{shape} leaves the unit disc"


def test_masks_are_the_drawn_pixels(dataset):
    """Stored RLE == the renderer's visible masks; the JPEG has the object colour inside, not around it."""
    cats = synthetic_categories(PARAMS["num_categories"])
    root = dataset["paths"]["image_root"]
    inside_fit, inside_total, ring_fit, ring_total = 0, 0, 0, 0
    for split in ("train", "val"):
        data = dataset[split]
        anns = _by_image(data)
        drawn = render_split(split, **PARAMS)
        for image, out in zip(data["images"], drawn, strict=True):
            got = anns[image["id"]]
            assert [a["category_id"] - 1 for a in got] == out.labels.tolist()
            stored = np.stack([_decode(a) for a in got])
            np.testing.assert_array_equal(stored, out.masks)
            assert not (stored.sum(0) > 1).any(), "visible masks overlap"
            jpeg = np.asarray(Image.open(root / f"{split}2017" / f"{image['id']:012d}.jpg").convert("RGB"))
            # JPEG q95 4:4:4 barely changes the drawn image.
            assert np.abs(jpeg.astype(np.float32) - out.image).mean() < 4.0  # ~3: the pixel noise
            union = stored.any(0)
            for ann, mask in zip(got, stored, strict=True):
                cat = cats[ann["category_id"] - 1]
                if cat.texture != "solid":
                    continue
                rgb = np.asarray(COLOURS[cat.colour], dtype=np.float64)
                px = out.image[mask].astype(np.float64)
                inside_fit += int(_fits_colour(px, rgb).sum())
                inside_total += len(px)
                # 1-pixel ring around the mask, away from every annotated object: background, not the object.
                grown = mask.copy()
                grown[1:] |= mask[:-1]
                grown[:-1] |= mask[1:]
                grown[:, 1:] |= mask[:, :-1]
                grown[:, :-1] |= mask[:, 1:]
                ring = grown & ~union
                ring_fit += int(_fits_colour(jpeg[ring].astype(np.float64), rgb).sum())
                ring_total += int(ring.sum())
    assert inside_total > 1000 and ring_total > 500
    assert inside_fit / inside_total > 0.995
    assert ring_fit / ring_total < 0.05


def test_bbox_area_and_segmentation_fields(dataset):
    h, w = PARAMS["image_size"]
    for split in ("train", "val"):
        for ann in dataset[split]["annotations"]:
            mask = _decode(ann)
            assert ann["segmentation"]["size"] == [h, w] and isinstance(ann["segmentation"]["counts"], str)
            assert ann["area"] == float(mask.sum()) >= MIN_AREA
            ys, xs = np.nonzero(mask)
            tight = [xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1]
            assert ann["bbox"] == [float(t) for t in tight]
            np.testing.assert_array_equal(mask_util.toBbox(ann["segmentation"]), ann["bbox"])


def test_object_sizes_and_counts_at_the_default_size():
    """Objects span COCO's small (< 32^2 px), medium and large areas; 1-6 annotated objects per image."""
    defaults = {"num_train": 300, "num_val": 60, "num_categories": 24, "image_size": (256, 320), "seed": 0}
    outs = list(itertools.islice(render_split("train", **defaults), 40))
    areas = np.concatenate([out.masks.sum((1, 2)) for out in outs])
    assert (areas < 32**2).sum() > 10 and ((areas >= 32**2) & (areas < 96**2)).sum() > 10
    assert (areas >= 96**2).sum() > 3
    counts = [len(out.labels) for out in outs]
    assert min(counts) >= 1 and max(counts) <= MAX_OBJECTS and len(set(counts)) >= 3


# --- LVIS / COCO format ---------------------------------------------------------------------------


def test_lvis_layout_and_federated_fields(dataset):
    root = dataset["paths"]["image_root"]
    train, val = dataset["train"], dataset["val"]
    assert dataset["paths"]["train_json"] == root / "lvis_v1_train.json"
    cats = synthetic_categories(PARAMS["num_categories"])
    drawn = {}
    for split in ("train", "val"):
        outs = render_split(split, **PARAMS)
        for image, out in zip(dataset[split]["images"], outs, strict=True):
            drawn[image["id"]] = {cats[c].id for c in out.drawn}
    for split, data in (("train", train), ("val", val)):
        anns = _by_image(data)
        assert len(data["images"]) == PARAMS[f"num_{split}"]
        for image in data["images"]:
            name = f"{image['id']:012d}.jpg"
            assert image["coco_url"] == f"http://images.cocodataset.org/{split}2017/{name}"
            assert (root / f"{split}2017" / name).is_file()
            assert (image["height"], image["width"]) == PARAMS["image_size"]
            positives = {a["category_id"] for a in anns[image["id"]]}
            assert positives, "every image has an annotation"
            negatives = set(image["neg_category_ids"])
            # Verified absent: no annotation and not even an occluded, unannotated sliver of the category.
            assert negatives and not negatives & drawn[image["id"]]
            assert set(image["not_exhaustive_category_ids"]) <= positives
    image_ids = [im["id"] for im in train["images"] + val["images"]]
    ann_ids = [a["id"] for a in train["annotations"] + val["annotations"]]
    assert len(set(image_ids)) == len(image_ids) and len(set(ann_ids)) == len(ann_ids)
    train_cats = {a["category_id"] for a in train["annotations"]}
    val_cats = {a["category_id"] for a in val["annotations"]}
    assert val_cats <= train_cats
    # Every category, rare ones included, is evaluated: >= 3 val images each.
    val_images = defaultdict(set)
    for a in val["annotations"]:
        val_images[a["category_id"]].add(a["image_id"])
    assert all(len(val_images[c.id]) >= 3 for c in cats)


def test_loads_with_pycocotools(dataset):
    coco = COCO(str(dataset["paths"]["val_json"]))
    assert sorted(coco.getCatIds()) == list(range(1, PARAMS["num_categories"] + 1))
    ann = coco.loadAnns(coco.getAnnIds(imgIds=[dataset["val"]["images"][0]["id"]]))[0]
    np.testing.assert_array_equal(coco.annToMask(ann).astype(bool), _decode(ann))


# --- determinism, idempotence, CLI ----------------------------------------------------------------

TINY = {"num_train": 12, "num_val": 5, "num_categories": 6, "image_size": (64, 80)}


def _snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_same_bytes_other_seed_other_data(tmp_path):
    make_synthetic_lvis(tmp_path / "a", seed=3, **TINY)
    make_synthetic_lvis(tmp_path / "b", seed=3, **TINY)
    make_synthetic_lvis(tmp_path / "c", seed=4, **TINY)
    a, b, c = (_snapshot(tmp_path / x) for x in "abc")
    assert len(a) == 2 + TINY["num_train"] + TINY["num_val"]
    assert a == b
    assert a.keys() == c.keys()
    assert all(a[k] != c[k] for k in a if k.endswith(".jpg"))


def test_idempotent_overwrite_and_stale_images(tmp_path):
    paths = make_synthetic_lvis(tmp_path, **TINY)
    first = _snapshot(tmp_path)
    mtimes = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*") if p.is_file()}
    make_synthetic_lvis(tmp_path, **TINY)
    assert {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*") if p.is_file()} == mtimes
    # A missing image makes the dataset out of date.
    victim = tmp_path / "train2017" / "000000000003.jpg"
    victim.unlink()
    make_synthetic_lvis(tmp_path, **TINY)
    assert _snapshot(tmp_path) == first
    make_synthetic_lvis(tmp_path, overwrite=True, **TINY)
    assert _snapshot(tmp_path) == first
    assert victim.stat().st_mtime_ns != mtimes[victim]
    # Other parameters regenerate, and images of the old run that the new one lacks are removed.
    make_synthetic_lvis(tmp_path, **{**TINY, "num_train": 8})
    with open(paths["train_json"]) as f:
        assert json.load(f)["info"]["params"]["num_train"] == 8
    assert len(list((tmp_path / "train2017").glob("*.jpg"))) == 8
    assert sorted(p.name for p in (tmp_path / "val2017").glob("*.jpg")) == [
        f"{i:012d}.jpg" for i in range(9, 9 + TINY["num_val"])
    ]


def test_refuses_to_overwrite_foreign_annotations(tmp_path):
    (tmp_path / "lvis_v1_train.json").write_text(json.dumps({"info": {"description": "LVIS"}, "images": []}))
    with pytest.raises(FileExistsError, match="lvis_v1_train.json"):
        make_synthetic_lvis(tmp_path, **TINY)
    make_synthetic_lvis(tmp_path, overwrite=True, **TINY)
    assert (tmp_path / "val2017").is_dir()


def test_bad_arguments_name_the_parameter(tmp_path):
    with pytest.raises(ValueError, match="num_val"):
        make_synthetic_lvis(tmp_path, **{**TINY, "num_val": 0})
    with pytest.raises(ValueError, match="num_train=2"):
        make_synthetic_lvis(tmp_path, **{**TINY, "num_train": 2, "num_categories": 13})
    with pytest.raises(ValueError, match="image_size"):
        make_synthetic_lvis(tmp_path, **{**TINY, "image_size": (16, 16)})
    assert not any(tmp_path.iterdir())


def test_cli(tmp_path):
    main(["--root", str(tmp_path), "--num-train", "6", "--num-val", "3", "--num-categories", "4",
          "--image-size", "64", "80", "--seed", "1"])  # fmt: skip
    with open(tmp_path / "lvis_v1_train.json") as f:
        params = json.load(f)["info"]["params"]
    assert params == {
        "generator_version": params["generator_version"],
        "num_train": 6,
        "num_val": 3,
        "num_categories": 4,
        "image_size": [64, 80],
        "seed": 1,
    }
    assert len(list((tmp_path / "train2017").glob("*.jpg"))) == 6
