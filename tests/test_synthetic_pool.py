"""The synthetic generated instance pool: cutout format, corruptions with ground truth, style, determinism."""

from __future__ import annotations

import itertools
import json
from collections import Counter
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from divergen.pool import InstancePool
from divergen.synthetic import COLOURS, main, render_split, synthetic_categories
from divergen.synthetic_pool import (
    CORRUPTIONS,
    _plan_category,
    corruption_counts,
    instance_seed,
    make_synthetic_pool,
    pool_prompt,
    render_cutout,
)

# 5 categories x 6 instances, round(6 * 0.6) = 4 corrupted each: 2 + 1 + 1, the 2 rotating over the types.
SMALL = {"num_categories": 5, "per_category": 6, "corrupt_fraction": 0.6, "size_range": (32, 64), "seed": 3}
RECORD_KEYS = {"path", "category_id", "generator", "prompt", "seed", "corruption", "true_category_id"}
WHITE = np.array([255, 255, 255], dtype=np.uint8)


def _records(index: Path) -> list[dict]:
    return [json.loads(line) for line in index.read_text().splitlines()]


def _snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _rgba(root: Path, record: dict) -> np.ndarray:
    with Image.open(root / record["path"]) as im:
        assert im.mode == "RGBA", record["path"]
        return np.asarray(im)


@pytest.fixture(scope="module")
def pool(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("pool")
    index = make_synthetic_pool(root, **SMALL)
    return {"root": root, "index": index, "records": _records(index)}


def _inner(mask: np.ndarray, width: int) -> np.ndarray:
    """``mask`` eroded by ``width`` px, with outside-the-crop counted as outside (cv2 pads with "inside")."""
    padded = np.pad(mask.astype(np.uint8), width + 1)
    eroded = cv2.erode(padded, np.ones((3, 3), np.uint8), iterations=width)
    return eroded[width + 1 : -width - 1, width + 1 : -width - 1].astype(bool)


def _neighbour_steps(image: np.ndarray, region: np.ndarray) -> np.ndarray:
    """Max-over-channels absolute difference of every horizontal / vertical pixel pair inside ``region``."""
    img = image.astype(np.int32)
    dx = np.abs(img[:, 1:] - img[:, :-1]).max(-1)[region[:, 1:] & region[:, :-1]]
    dy = np.abs(img[1:] - img[:-1]).max(-1)[region[1:] & region[:-1]]
    return np.concatenate([dx, dy])


# --- index and files ------------------------------------------------------------------------------------


def test_records_and_layout(pool):
    cats = synthetic_categories(SMALL["num_categories"])
    records = pool["records"]
    assert pool["index"] == pool["root"] / "pool.jsonl"
    assert len(records) == SMALL["num_categories"] * SMALL["per_category"]
    for r in records:
        cat = cats[r["category_id"] - 1]
        k = int(Path(r["path"]).stem)
        assert r["path"] == f"images/{cat.id}/{k:05d}.png"
        assert set(r) == RECORD_KEYS
        assert r["generator"] == "synthetic"
        # The prompt is for the recorded category, even when another one was drawn.
        assert r["prompt"] == pool_prompt(cat)
        assert r["prompt"].startswith(f"a photo of a single {cat.name.replace('_', ' ')}, {cat.definition}")
        assert r["prompt"].endswith(", in a white background")
        assert r["seed"] == instance_seed(SMALL["seed"], cat.id, k)
    assert sorted(p.relative_to(pool["root"]).as_posix() for p in pool["root"].glob("images/*/*")) == sorted(
        r["path"] for r in records
    )
    assert len({r["seed"] for r in records}) == len(records)


def test_corruption_counts_are_exact(pool):
    assert corruption_counts(4, 0) == {"wrong_label": 2, "noise": 1, "bad_mask": 1}
    assert corruption_counts(4, 1) == {"wrong_label": 1, "noise": 2, "bad_mask": 1}
    assert corruption_counts(5, 2) == {"wrong_label": 2, "noise": 1, "bad_mask": 2}
    assert corruption_counts(0, 1) == dict.fromkeys(CORRUPTIONS, 0)
    n_bad = round(SMALL["per_category"] * SMALL["corrupt_fraction"])
    per_cat: dict[int, Counter] = {}
    for r in pool["records"]:
        per_cat.setdefault(r["category_id"], Counter())[r["corruption"]] += 1
    for i, (cid, counts) in enumerate(sorted(per_cat.items())):
        assert counts["none"] == SMALL["per_category"] - n_bad, cid
        assert {c: counts[c] for c in CORRUPTIONS} == corruption_counts(n_bad, i), cid
    # The remainder rotates over the types, so the pool totals are balanced too (7 / 7 / 6).
    totals = Counter(r["corruption"] for r in pool["records"])
    assert sorted(totals[c] for c in CORRUPTIONS) == [6, 7, 7]


def test_wrong_label_is_recorded_with_another_category(pool):
    for r in pool["records"]:
        if r["corruption"] == "wrong_label":
            assert r["true_category_id"] != r["category_id"]
            assert 1 <= r["true_category_id"] <= SMALL["num_categories"]
        else:
            assert r["true_category_id"] == r["category_id"]
    # Drawn categories are uniform over the other categories.
    cats = synthetic_categories(6)
    plan = _plan_category(2, cats, per_category=3000, corrupt_fraction=0.9, seed=0)
    drawn = Counter(d for kind, d in plan if kind == "wrong_label")
    assert sum(drawn.values()) == 900 and set(drawn) == {0, 1, 3, 4, 5}
    assert all(140 < n < 220 for n in drawn.values()), drawn  # 180 each expected


def test_cutouts_are_tight_binary_rgba(pool):
    root, lo, hi = pool["root"], *SMALL["size_range"]
    for r in pool["records"]:
        rgba = _rgba(root, r)
        alpha = rgba[..., 3]
        assert rgba.dtype == np.uint8 and rgba.ndim == 3 and rgba.shape[2] == 4
        assert set(np.unique(alpha).tolist()) <= {0, 255} and alpha.any()
        inside = alpha > 0
        # Tight: the alpha touches all four borders.
        assert inside[0].any() and inside[-1].any() and inside[:, 0].any() and inside[:, -1].any(), r["path"]
        if r["corruption"] != "bad_mask":
            # The object lies in the disc of its diameter d ~ U(size_range), and spans at least ~d / 2.
            assert max(rgba.shape[:2]) <= hi + 1 and max(rgba.shape[:2]) >= lo / 2, (r["path"], rgba.shape)


def test_records_redraw_their_png(pool):
    cats = synthetic_categories(SMALL["num_categories"])
    for r in pool["records"]:
        cutout = render_cutout(
            cats[r["true_category_id"] - 1],
            seed=r["seed"],
            size_range=SMALL["size_range"],
            corruption=r["corruption"],
        )
        np.testing.assert_array_equal(cutout.rgba, _rgba(pool["root"], r))
        if r["corruption"] != "bad_mask":
            np.testing.assert_array_equal(cutout.object_mask, cutout.rgba[..., 3] > 0)
    with pytest.raises(ValueError, match="unknown corruption 'blur'"):
        render_cutout(cats[0], seed=0, corruption="blur")


# --- corruptions against the clean drawing of the same seed ----------------------------------------------


def _clean_and(record: dict, corruption: str):
    cat = synthetic_categories(SMALL["num_categories"])[record["true_category_id"] - 1]
    args = {"seed": record["seed"], "size_range": SMALL["size_range"]}
    return render_cutout(cat, **args), render_cutout(cat, corruption=corruption, **args)


def test_bad_mask_alpha_misses_the_object(pool):
    bad_records = [r for r in pool["records"] if r["corruption"] == "bad_mask"]
    assert len(bad_records) >= 5
    for r in bad_records:
        clean, bad = _clean_and(r, "bad_mask")
        np.testing.assert_array_equal(bad.rgba, _rgba(pool["root"], r))
        alpha = bad.rgba[..., 3] > 0
        white = (bad.rgba[..., :3] == WHITE).all(-1)
        # At least a quarter of the alpha is white canvas, and at least a quarter of the object is missing.
        assert (white & alpha).sum() >= 0.25 * alpha.sum(), r["path"]
        assert (~white & alpha).sum() <= 0.75 * (clean.rgba[..., 3] > 0).sum(), r["path"]
    # A clean cutout has no white canvas inside its alpha.
    for r in pool["records"]:
        if r["corruption"] != "bad_mask":
            rgba = _rgba(pool["root"], r)
            assert not ((rgba[..., :3] == WHITE).all(-1) & (rgba[..., 3] > 0)).any(), r["path"]


def test_noise_drowns_the_object(pool):
    noisy_records = [r for r in pool["records"] if r["corruption"] == "noise"]
    assert len(noisy_records) >= 5
    for r in noisy_records:
        clean, noisy = _clean_and(r, "noise")
        np.testing.assert_array_equal(noisy.rgba[..., 3], clean.rgba[..., 3])  # same mask, other pixels
        inside = clean.rgba[..., 3] > 0
        diff = np.abs(noisy.rgba[..., :3].astype(np.int32) - clean.rgba[..., :3])[inside]
        assert diff.mean() > 40, r["path"]
        # Pixel noise: neighbouring pixels jump, where the clean rendering is smooth.
        inner = _inner(inside, 3)
        assert np.median(_neighbour_steps(noisy.rgba[..., :3], inner)) > 40, r["path"]


# --- the "generated" style ----------------------------------------------------------------------------


def test_style_is_smooth_and_outlined_unlike_the_real_images():
    cats = synthetic_categories(24)
    solid = [c for c in cats if c.texture == "solid"]
    gen_steps, outline_ratio = [], []
    for cat, s in itertools.product(solid, range(3)):
        rgba = render_cutout(cat, seed=s, size_range=(48, 128)).rgba
        inside = rgba[..., 3] > 0
        gen_steps.append(_neighbour_steps(rgba[..., :3], _inner(inside, 3)))
        # The outermost pixel ring of the object is the dark outline.
        luma = rgba[..., :3].astype(np.float64).mean(-1)
        outline_ratio.append(luma[inside & ~_inner(inside, 1)].mean() / luma[_inner(inside, 3)].mean())
    gen_steps = np.concatenate(gen_steps)
    real_steps = []
    for out in itertools.islice(
        render_split("train", num_train=300, num_val=60, num_categories=24, image_size=(256, 320), seed=0), 12
    ):
        for mask, label in zip(out.masks, out.labels, strict=True):
            if cats[label].texture == "solid":
                real_steps.append(_neighbour_steps(out.image, _inner(mask, 3)))
    real_steps = np.concatenate(real_steps)
    assert gen_steps.size > 10_000 and real_steps.size > 1000
    # Generated: shading only (<= ~3 levels a pixel). Real: pixel noise of std 3-9 on every pixel.
    assert (gen_steps <= 4).mean() > 0.97
    assert (real_steps <= 4).mean() < 0.5
    assert max(outline_ratio) < 0.5


def _colour_of(pixels: np.ndarray) -> str:
    """The COLOURS entry whose chroma (colour minus its grey level) points closest to the pixels' mean chroma."""
    chroma = pixels.astype(np.float64).mean(0)
    chroma -= chroma.mean()
    names = list(COLOURS)
    refs = np.array([COLOURS[n] for n in names], dtype=np.float64)
    refs -= refs.mean(1, keepdims=True)
    cosine = refs @ chroma / np.linalg.norm(refs, axis=1) / np.linalg.norm(chroma)
    return names[int(np.argmax(cosine))]


def test_category_stays_recognisable():
    """Colour and texture of the category survive the style: the object's hue, and a dark pattern share."""
    for cat in synthetic_categories(40):
        dark_share = []
        for s in range(2):
            rgba = render_cutout(cat, seed=s).rgba
            inner = _inner(rgba[..., 3] > 0, 3)
            luma = np.where(inner, rgba[..., :3].astype(np.float32).mean(-1), 0)
            # Dark pattern: under 0.6 x the brightest object pixel within 12 px (the texture is 0.45 x the
            # shaded colour; the shading alone changes the brightness by < 20% over 12 px).
            dark = inner & (luma < 0.6 * cv2.dilate(luma, np.ones((25, 25), np.uint8)))
            dark_share.append(dark.sum() / inner.sum())
            assert _colour_of(rgba[..., :3][inner & ~dark]) == cat.colour, (cat.name, s)
        if cat.texture == "solid":
            assert max(dark_share) < 0.01, cat.name
        else:
            assert min(dark_share) > 0.1, cat.name


# --- determinism, up-to-date check, arguments, reader, CLI ------------------------------------------------


def test_same_arguments_same_bytes_other_seed_other_pixels(tmp_path, pool):
    make_synthetic_pool(tmp_path / "a", **SMALL)
    make_synthetic_pool(tmp_path / "b", **{**SMALL, "seed": 4})
    a, b = _snapshot(tmp_path / "a"), _snapshot(pool["root"])
    assert a == b
    c = _snapshot(tmp_path / "b")
    assert a.keys() == c.keys()
    assert all(a[k] != c[k] for k in a if k.endswith(".png"))


def test_up_to_date_check_and_stale_files(tmp_path):
    index = make_synthetic_pool(tmp_path, **SMALL)
    first = _snapshot(tmp_path)
    mtimes = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*") if p.is_file()}
    make_synthetic_pool(tmp_path, **SMALL)
    assert {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*") if p.is_file()} == mtimes
    # A missing cutout, or a run that stopped halfway, makes the pool out of date.
    victim = tmp_path / "images" / "2" / "00003.png"
    victim.unlink()
    make_synthetic_pool(tmp_path, **SMALL)
    assert _snapshot(tmp_path) == first
    params = json.loads((tmp_path / "pool_params.json").read_text())
    (tmp_path / "pool_params.json").write_text(json.dumps({**params, "complete": False}))
    make_synthetic_pool(tmp_path, **SMALL)
    assert _snapshot(tmp_path) == first  # complete again, so regenerated
    make_synthetic_pool(tmp_path, overwrite=True, **SMALL)
    assert _snapshot(tmp_path) == first and victim.stat().st_mtime_ns != mtimes[victim]
    # Other parameters regenerate, and the previous pool's PNGs that the new one lacks are removed; files that
    # are not named like ours stay.
    keep = tmp_path / "images" / "5" / "notes.txt"
    keep.write_text("mine")
    make_synthetic_pool(tmp_path, **{**SMALL, "num_categories": 4, "per_category": 4})
    assert len(_records(index)) == 16
    pngs = sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.glob("images/*/*.png"))
    assert pngs == [f"images/{c}/{k:05d}.png" for c in range(1, 5) for k in range(4)]
    assert keep.read_text() == "mine"
    assert json.loads((tmp_path / "pool_params.json").read_text())["params"]["per_category"] == 4
    make_synthetic_pool(tmp_path, **{**SMALL, "corrupt_fraction": 0.0})
    assert {r["corruption"] for r in _records(index)} == {"none"}


def test_refuses_to_overwrite_a_foreign_pool(tmp_path):
    (tmp_path / "pool.jsonl").write_text(json.dumps({"path": "x.png", "category_id": 1}) + "\n")
    with pytest.raises(FileExistsError, match="pool.jsonl"):
        make_synthetic_pool(tmp_path, **SMALL)
    make_synthetic_pool(tmp_path, overwrite=True, **SMALL)
    assert len(_records(tmp_path / "pool.jsonl")) == 30


@pytest.mark.parametrize(
    "bad, match",
    [
        ({"per_category": 0}, "per_category"),
        ({"per_category": 2.0}, "per_category"),
        ({"corrupt_fraction": 1.0}, "corrupt_fraction"),
        ({"corrupt_fraction": -0.1}, "corrupt_fraction"),
        ({"size_range": (8, 64)}, "size_range"),
        ({"size_range": (64, 32)}, "size_range"),
        ({"size_range": (32,)}, "size_range"),
        ({"num_categories": 2}, "num_categories"),
    ],
)
def test_bad_arguments_name_the_parameter(tmp_path, bad, match):
    with pytest.raises(ValueError, match=match):
        make_synthetic_pool(tmp_path / "pool", **{**SMALL, **bad})
    assert not (tmp_path / "pool").exists()


def test_reads_back_through_instance_pool(pool):
    cats = synthetic_categories(SMALL["num_categories"])
    reader = InstancePool(pool["index"], id_to_index={c.id: c.id - 1 for c in cats})
    records = pool["records"]
    assert len(reader) == len(records)
    np.testing.assert_array_equal(reader.labels, [r["category_id"] - 1 for r in records])
    for label in range(SMALL["num_categories"]):
        assert len(reader.instances_of(label)) == SMALL["per_category"]
    for i in (0, 7, len(records) - 1):
        rec = reader.record(i)
        assert rec["corruption"] == records[i]["corruption"] and rec["seed"] == records[i]["seed"]
        np.testing.assert_array_equal(reader.load(i), _rgba(pool["root"], records[i]))
    assert reader.num_skipped == 0


def test_cli_writes_the_pool(tmp_path):
    argv = ["--root", str(tmp_path), "--num-train", "6", "--num-val", "3", "--num-categories", "4",
            "--image-size", "64", "80", "--seed", "2"]  # fmt: skip
    main(argv)
    assert not (tmp_path / "pool").exists()  # the default is no pool
    main([*argv, "--pool-per-category", "3", "--pool-corrupt-fraction", "0.4"])
    params = json.loads((tmp_path / "pool" / "pool_params.json").read_text())["params"]
    assert {k: params[k] for k in ("num_categories", "per_category", "corrupt_fraction", "seed")} == {
        "num_categories": 4,
        "per_category": 3,
        "corrupt_fraction": 0.4,
        "seed": 2,
    }
    records = _records(tmp_path / "pool" / "pool.jsonl")
    assert len(records) == 12 and Counter(r["corruption"] for r in records)["none"] == 4 * 2
    for bad in (["--pool-corrupt-fraction", "1"], ["--pool-per-category", "-1"]):
        with pytest.raises(SystemExit):
            main([*argv, "--pool-per-category", "2", *bad])
