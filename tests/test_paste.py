"""Instance paste (divergen.md §2): compositing against a direct translation of the official code, hand-built
occlusion cases, size statistics, sizing and sampling distributions, and the dataset integration."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from divergen.data import DetectionDataset, collate, train_transform
from divergen.paste import (
    Cutout,
    InstancePaste,
    load_size_statistics,
    paste_instances,
    size_statistics,
)
from divergen.synthetic import make_synthetic_lvis


@pytest.fixture(scope="module")
def synthetic_root(tmp_path_factory):
    """10 train / 3 val images of 96x128, 6 categories."""
    root = tmp_path_factory.mktemp("synthetic")
    make_synthetic_lvis(root, num_train=10, num_val=3, num_categories=6, image_size=(96, 128), seed=1)
    return root


def official_copy_paste(image, boxes, labels, masks, cutouts, box_thr=10, px_thr=300):
    """The official X-Paste ``_copy_paste`` on whole canvases (divergen.md §2), slow and literal: each cutout is
    placed on an H×W canvas, every mask is cut by it, every box is recomputed from its mask, then the keep rule.
    Plus the one deliberate difference of ``paste_instances``: instances without any pixel are dropped at the end.
    """
    _, height, width = image.shape
    image = image.astype(np.float64)
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    labels, masks = list(labels), np.asarray(masks, dtype=bool).reshape(-1, height, width)
    pasted = [False] * len(labels)
    for c in cutouts:
        m = np.zeros((height, width), dtype=bool)
        rgb = np.zeros((height, width, 3))
        for yy in range(c.alpha.shape[0]):
            for xx in range(c.alpha.shape[1]):
                y, x = c.y + yy, c.x + xx
                if 0 <= y < height and 0 <= x < width:
                    m[y, x] = c.alpha[yy, xx] > 0
                    rgb[y, x] = c.rgb[yy, xx]
        if not m.any():
            continue
        masks = np.where(m, False, masks)
        new_boxes = np.array([box_of(mm) for mm in masks]).reshape(-1, 4)
        keep = (np.abs(new_boxes - boxes) <= box_thr).all(1) | (masks.sum((1, 2)) > px_thr)
        image = image * (1 - m[None]) + rgb.transpose(2, 0, 1) * m[None]
        boxes = np.concatenate([new_boxes[keep], [box_of(m)]])
        masks = np.concatenate([masks[keep], m[None]])
        labels = [lab for lab, k in zip(labels, keep, strict=True) if k] + [c.label]
        pasted = [p for p, k in zip(pasted, keep, strict=True) if k] + [True]
    if cutouts and len(masks):
        visible = masks.any((1, 2))
        boxes, masks = boxes[visible], masks[visible]
        labels = [lab for lab, v in zip(labels, visible, strict=True) if v]
        pasted = [p for p, v in zip(pasted, visible, strict=True) if v]
    return (
        image.astype(np.uint8),
        boxes,
        np.array(labels, dtype=np.int64),
        masks,
        np.array(pasted, dtype=bool),
    )


def box_of(mask):
    ys, xs = np.nonzero(mask)
    return [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1] if len(ys) else [0, 0, 0, 0]


def square(height, width, x0, y0, x1, y1):
    m = np.zeros((height, width), dtype=bool)
    m[y0:y1, x0:x1] = True
    return m


def solid_cutout(h, w, x, y, label=7, value=200, alpha=None):
    rgb = np.full((h, w, 3), value, dtype=np.uint8)
    return Cutout(rgb, np.full((h, w), 255, dtype=np.uint8) if alpha is None else alpha, label, x, y)


def run(image, boxes, labels, masks, cutouts):
    image = image.copy()
    out = paste_instances(image, np.asarray(boxes, dtype=np.float32).reshape(-1, 4), np.asarray(labels),
                          masks, cutouts)  # fmt: skip
    return image, out


# ------------------------------------------------------------------------------------------- compositing


def test_partial_occlusion_trims_mask_and_box():
    h, w = 64, 80
    masks = square(h, w, 10, 10, 50, 50)[None]
    image, out = run(
        np.zeros((3, h, w), np.uint8), [[10, 10, 50, 50]], [3], masks, [solid_cutout(40, 20, 30, 10)]
    )
    assert out["labels"].tolist() == [3, 7] and out["is_pasted"].tolist() == [False, True]
    assert out["boxes"].tolist() == [[10, 10, 30, 50], [30, 10, 50, 50]]
    assert out["masks"][0].sum() == 20 * 40 and not out["masks"][0][:, 30:].any()
    assert (image[:, 10:50, 30:50] == 200).all() and (image[:, :, :30] == 0).all()


def test_heavy_occlusion_drops_small_instances_only():
    h, w = 64, 64
    small = square(h, w, 10, 10, 25, 25)  # 225 px <= 300
    large = square(h, w, 30, 10, 60, 40)  # 900 px
    masks = np.stack([small, large])
    # Covers rows 10..22 of both: the small one's top moves by 12 px > 10 and keeps 45 px -> dropped; the large
    # one's top moves by 12 px too but keeps 30 * 18 = 540 px > 300 -> kept with the trimmed box.
    cut = solid_cutout(12, 60, 2, 10)
    _, out = run(np.zeros((3, h, w), np.uint8), [box_of(small), box_of(large)], [1, 2], masks, [cut])
    assert out["labels"].tolist() == [2, 7]
    assert out["boxes"][0].tolist() == [30, 22, 60, 40]
    # The same cover by 10 rows moves the small one's top by exactly 10: kept.
    _, out = run(
        np.zeros((3, h, w), np.uint8), [box_of(small)], [1], small[None], [solid_cutout(10, 60, 2, 10)]
    )
    assert out["labels"].tolist() == [1, 7] and out["boxes"][0].tolist() == [10, 20, 25, 25]


def test_fully_hidden_small_instance_is_dropped():
    """The official rule would keep it (its zero box is within 10 px of a box at the origin); we drop it."""
    h, w = 32, 32
    tiny = square(h, w, 2, 2, 6, 6)
    _, out = run(np.zeros((3, h, w), np.uint8), [box_of(tiny)], [1], tiny[None], [solid_cutout(10, 10, 0, 0)])
    assert out["labels"].tolist() == [7] and out["is_pasted"].tolist() == [True]


def test_pasted_over_pasted_and_clipping():
    h, w = 40, 40
    first = solid_cutout(20, 20, -5, -5, label=4, value=100)  # clipped at the top-left corner
    second = solid_cutout(10, 30, 0, 5, label=5, value=50)  # covers rows 5..15 of the first
    image, out = run(
        np.zeros((3, h, w), np.uint8), np.zeros((0, 4)), [], np.zeros((0, h, w), bool), [first, second]
    )
    assert out["labels"].tolist() == [4, 5] and out["is_pasted"].all()
    # The first keeps rows 0..5: its bottom moved by exactly 10 px, so it stays though it has 75 px left.
    assert out["boxes"].tolist() == [[0, 0, 15, 5], [0, 5, 30, 15]]
    assert out["masks"][0].sum() == 15 * 5
    assert (image[:, 5:15, :30] == 50).all() and (image[:, :5, :15] == 100).all()


def test_cutout_outside_or_transparent_is_skipped():
    h, w = 20, 20
    m = square(h, w, 2, 2, 8, 8)[None]
    transparent = solid_cutout(5, 5, 1, 1, alpha=np.zeros((5, 5), np.uint8))
    _, out = run(
        np.zeros((3, h, w), np.uint8),
        [[2.5, 2.5, 7.5, 7.5]],
        [1],
        m,
        [solid_cutout(5, 5, 20, 3), transparent],
    )
    # Nothing was pasted: the annotation box is kept as it was (not replaced by the mask's).
    assert out["labels"].tolist() == [1] and out["boxes"].tolist() == [[2.5, 2.5, 7.5, 7.5]]


@pytest.mark.parametrize("seed", range(6))
def test_equals_official_copy_paste_on_random_cases(seed):
    rng = np.random.default_rng(seed)
    h, w = 48, 56
    n = int(rng.integers(0, 6))
    masks = np.zeros((n, h, w), dtype=bool)
    for i in range(n):
        x0, y0 = rng.integers(0, w - 4), rng.integers(0, h - 4)
        x1, y1 = rng.integers(x0 + 1, w + 1), rng.integers(y0 + 1, h + 1)
        masks[i, y0:y1, x0:x1] = rng.random((y1 - y0, x1 - x0)) < 0.8
    boxes = np.array([box_of(m) if m.any() else [0, 0, 1, 1] for m in masks], dtype=np.float32).reshape(-1, 4)
    boxes += rng.uniform(-2, 2, boxes.shape).astype(np.float32)  # annotation boxes differ from the masks'
    labels = rng.integers(0, 10, n)
    cutouts = []
    for _ in range(int(rng.integers(1, 8))):
        ch, cw = int(rng.integers(3, 30)), int(rng.integers(3, 30))
        alpha = np.where(rng.random((ch, cw)) < 0.7, rng.integers(1, 256, (ch, cw)), 0).astype(np.uint8)
        rgb = rng.integers(0, 256, (ch, cw, 3)).astype(np.uint8)
        cutouts.append(
            Cutout(rgb, alpha, int(rng.integers(0, 10)), int(rng.integers(-cw, w)), int(rng.integers(-ch, h)))
        )
    image = rng.integers(0, 256, (3, h, w)).astype(np.uint8)
    ref_image, ref_boxes, ref_labels, ref_masks, ref_pasted = official_copy_paste(
        image, boxes, labels, masks, cutouts
    )
    got_image, out = run(image, boxes, labels, masks, cutouts)
    np.testing.assert_array_equal(got_image, ref_image)
    np.testing.assert_allclose(out["boxes"], ref_boxes, atol=1e-5)
    np.testing.assert_array_equal(out["labels"], ref_labels)
    np.testing.assert_array_equal(out["masks"], ref_masks)
    np.testing.assert_array_equal(out["is_pasted"], ref_pasted)


def test_alpha_and_gaussian_blends():
    h, w = 16, 16
    alpha = np.zeros((8, 8), np.uint8)
    alpha[2:6, 2:6] = 128
    cut = Cutout(np.full((8, 8, 3), 200, np.uint8), alpha, 1, 4, 4, blend="alpha")
    image, out = run(
        np.full((3, h, w), 100, np.uint8), np.zeros((0, 4)), [], np.zeros((0, h, w), bool), [cut]
    )
    assert out["masks"][0].sum() == 16
    np.testing.assert_array_equal(image[:, 6:10, 6:10], round(100 + (200 - 100) * 128 / 255))
    assert (image[:, :6] == 100).all()
    alpha[:] = 255
    cut = Cutout(np.full((8, 8, 3), 200, np.uint8), alpha, 1, 4, 4, blend="gaussian")
    image, _ = run(np.full((3, h, w), 100, np.uint8), np.zeros((0, 4)), [], np.zeros((0, h, w), bool), [cut])
    assert (image[:, 6:10, 6:10] == 200).all()  # the interior, 2 px from the border, is fully the cutout
    edge = image[0, 4, 4:12]
    assert edge.min() > 100 and edge.max() < 200  # the border is feathered


# ------------------------------------------------------------------------------------------- size statistics


def test_size_statistics_matches_direct_numpy():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 6, 300)
    labels[labels == 4] = 0  # class 4 has no annotation
    a = rng.uniform(0.01, 0.6, 300)
    stats = size_statistics(labels, a, num_classes=7)
    for c in range(7):
        if c in (4, 6):
            assert np.isnan(stats[c]).all()
        else:
            np.testing.assert_allclose(stats[c], [a[labels == c].mean(), a[labels == c].std()], rtol=1e-12)


def test_dataset_size_stats_from_annotations(synthetic_root):
    import json

    path = synthetic_root / "lvis_v1_train.json"
    data = json.loads(path.read_text())
    sizes = {im["id"]: (im["height"], im["width"]) for im in data["images"]}
    ds = DetectionDataset(path, synthetic_root, transform=None, filter_empty=True, load_masks=False)
    index = ds.categories.id_to_index
    per_class: dict[int, list] = {}
    for ann in data["annotations"]:
        h, w = sizes[ann["image_id"]]
        per_class.setdefault(index[ann["category_id"]], []).append(
            math.sqrt(ann["bbox"][2] * ann["bbox"][3] / (h * w))
        )
    for c, values in per_class.items():
        np.testing.assert_allclose(ds.size_stats[c], [np.mean(values), np.std(values)], rtol=1e-10)


def test_load_official_size_statistics(tmp_path):
    path = tmp_path / "area_mean_std2.json"
    path.write_text('{"1": [0.1, 0.02], "3": [0.3, 0.05], "9": [0.5, 0.1]}')
    stats = load_size_statistics(path, {1: 0, 3: 1, 4: 2}, num_classes=4)
    np.testing.assert_array_equal(stats[:2], [[0.1, 0.02], [0.3, 0.05]])
    assert np.isnan(stats[2:]).all()
    path.write_text('{"a": [1, 2]}')
    with pytest.raises(ValueError, match="area_mean_std2.json"):
        load_size_statistics(path, {1: 0}, num_classes=1)


# ------------------------------------------------------------------------------------------- sizing, sampling


class FakePool:
    """The ``InstancePool`` interface over in-memory cutouts."""

    def __init__(self, counts: dict[int, int], size=(40, 20)):
        self.labels = np.repeat(np.array(list(counts), dtype=np.int64), list(counts.values()))
        self.categories = np.array(sorted(counts), dtype=np.int64)
        self.size, self.loads = size, 0

    def __len__(self):
        return len(self.labels)

    def instances_of(self, label):
        return np.flatnonzero(self.labels == label)

    def load(self, i):
        self.loads += 1
        rgba = np.full((*self.size, 4), 255, dtype=np.uint8)
        rgba[..., 0] = i % 256
        return rgba


def test_statistics_size_follows_the_official_formula():
    stats = np.array([[0.2, 0.05], [np.nan, np.nan]])
    paste = InstancePaste(FakePool({0: 1}), size_stats=stats)
    for seed in range(20):
        got = paste.target_size(0, (40, 20), (100, 160), np.random.default_rng(seed))
        rng = np.random.default_rng(seed)
        a = min(max(0.2 + 0.05 * rng.standard_normal(), 10 / 100), 0.5)
        r = (20 / 40) * rng.uniform(0.8, 1.2)
        tw = math.sqrt(r * a * a * 100 * 160)
        want = (
            (int(tw / r), int(tw))
            if min(int(tw / r), int(tw)) >= 5 and int(tw) < 160 and int(tw / r) < 100
            else None
        )
        assert got == want
    # No statistics (NaN row, or a class past the table): the random scale of the cutout's own size.
    for label in (1, 5):
        got = paste.target_size(label, (300, 200), (400, 500), np.random.default_rng(3))
        s = np.random.default_rng(3).uniform(0.05, 0.3)
        assert got == (int(300 * s), int(200 * s))
    # ... whose sides below 3 px are rejected.
    assert paste.target_size(1, (40, 20), (400, 500), np.random.default_rng(3)) is None


def test_sizes_are_clipped_and_rejected():
    paste = InstancePaste(FakePool({0: 1}), size_stats=np.array([[5.0, 0.0]]))  # a huge mean: clipped to 0.5
    th, tw = paste.target_size(0, (10, 10), (100, 100), np.random.default_rng(0))
    assert abs(th * tw - 0.25 * 100 * 100) < 0.2 * 2500
    paste = InstancePaste(FakePool({0: 1}), size_stats=np.array([[0.0, 0.0]]))  # clipped up to 10 px / H
    for seed in range(5):
        th, tw = paste.target_size(0, (10, 10), (100, 100), np.random.default_rng(seed))
        assert 9 <= th <= 11 and 9 <= tw <= 11  # sqrt(area) = 10 px, aspect jitter ±20%
    # A 1:10 cutout at sqrt(area) = 10 px has a ~3 px side: below min_side = 5, rejected.
    assert paste.target_size(0, (10, 100), (100, 100), np.random.default_rng(0)) is None


def chi_square(observed, expected):
    observed, expected = np.asarray(observed, float), np.asarray(expected, float)
    return float(((observed - expected) ** 2 / expected).sum())


# Upper 0.1% points of the chi-square distribution: a correct sampler fails one seed in a thousand.
CHI2_999 = {1: 10.83, 2: 13.82, 3: 16.27, 19: 43.82}


def test_number_of_instances_is_uniform_below_max_samples():
    paste = InstancePaste(FakePool({0: 5}), size_stats=np.zeros((1, 2)), max_samples=20)
    rng = np.random.default_rng(0)
    counts = np.bincount([len(paste.sample(rng)) for _ in range(6000)], minlength=20)
    assert len(counts) == 20 and chi_square(counts, np.full(20, 300)) < CHI2_999[19]


@pytest.mark.parametrize("sample_type", ["cas_random", "random", "cats_random"])
def test_sampling_distributions(sample_type):
    pool = FakePool({0: 1, 3: 9, 5: 30, 8: 60})
    paste = InstancePaste(pool, size_stats=np.zeros((9, 2)), sample_type=sample_type, max_samples=20)
    rng = np.random.default_rng(1)
    drawn = np.concatenate([paste.sample(rng, image_labels=[3, 8, 11]) for _ in range(1500)]).astype(int)
    labels = pool.labels[drawn]
    if sample_type == "cas_random":  # every category equally often, then uniform within
        cats = np.array([(labels == c).sum() for c in (0, 3, 5, 8)])
        assert chi_square(cats, np.full(4, len(labels) / 4)) < CHI2_999[3]
        within = np.bincount(drawn[labels == 3] - 1, minlength=9)
        assert chi_square(within, np.full(9, within.sum() / 9)) < 27.88  # df 8
    elif sample_type == "random":  # proportional to the pool's counts
        cats = np.array([(labels == c).sum() for c in (0, 3, 5, 8)])
        assert chi_square(cats, len(labels) * np.array([1, 9, 30, 60]) / 100) < CHI2_999[3]
    else:  # only the image's categories that the pool has (3 and 8), equally
        assert set(labels.tolist()) == {3, 8}
        assert chi_square([(labels == 3).sum(), (labels == 8).sum()], [len(labels) / 2] * 2) < CHI2_999[1]
        # An image without any of the pool's categories gets nothing.
        assert all(paste.sample(rng, image_labels=[1, 2]) == [] for _ in range(20))


def test_call_keeps_the_input_and_flags_pasted():
    h, w = 96, 128
    pool = FakePool({2: 4}, size=(30, 30))
    paste = InstancePaste(pool, size_stats=np.array([[0, 0], [0, 0], [0.2, 0.0]]), max_samples=6)
    mask = square(h, w, 10, 10, 40, 40)
    sample = {
        "image": torch.zeros(3, h, w, dtype=torch.uint8),
        "boxes": torch.tensor([[10.0, 10, 40, 40]]),
        "labels": torch.tensor([0]),
        "masks": torch.from_numpy(mask[None]),
    }
    before = {k: v.clone() for k, v in sample.items()}
    seen = 0
    for seed in range(10):
        out = paste(sample, np.random.default_rng(seed))
        for k, v in before.items():
            assert torch.equal(sample[k], v), k
        assert out["is_pasted"].dtype == torch.bool and len(out["is_pasted"]) == len(out["labels"])
        assert set(out["labels"][out["is_pasted"]].tolist()) <= {2}
        assert torch.equal(out["pool_index"] >= 0, out["is_pasted"])
        assert set(out["pool_index"][out["is_pasted"]].tolist()) <= set(pool.instances_of(2).tolist())
        assert out["masks"].shape[1:] == (h, w) and out["image"].shape == (3, h, w)
        seen += int(out["is_pasted"].sum())
    assert seen > 0


def test_dataset_with_paste_returns_flags_and_original(synthetic_root):
    pool = FakePool({1: 3, 4: 3}, size=(24, 24))
    ds = DetectionDataset(
        synthetic_root / "lvis_v1_train.json", synthetic_root, transform=train_transform(128, (0.5, 1.0)),
        filter_empty=True,
    )  # fmt: skip
    ds.paste = InstancePaste(pool, size_stats=ds.size_stats, max_samples=8)
    ds.return_original = True
    items = [ds[(i, 100 + i)] for i in range(6)]
    images, targets, infos = collate(items)
    assert all("is_pasted" in t for t in targets) and any(t["is_pasted"].any() for t in targets)
    for item, t, info in zip(items, targets, infos, strict=True):
        orig = info["original"]
        assert orig["image"].shape == item["image"].shape
        assert len(orig["labels"]) >= int((~t["is_pasted"]).sum())  # occluded real instances may be dropped
        # The same crop: the pixels under no pasted mask are unchanged.
        outside = ~t["masks"][t["is_pasted"]].any(0)
        assert torch.equal(orig["image"][:, outside], item["image"][:, outside])
    # Same key, same sample: paste randomness follows the sample seed.
    again = ds[(2, 102)]
    assert torch.equal(again["image"], items[2]["image"]) and torch.equal(again["boxes"], items[2]["boxes"])


# ------------------------------------------------------------------------------------------- training, CLI


def test_training_with_paste_and_extra_classes(tmp_path):
    """The tiny model trains on the synthetic data with a pool of 2 extra categories (labels 8, 9), as DiverGen
    trains LVIS + ImageNet classes; the extras get the official image count 2000 in the federated loss."""
    from divergen import engine
    from divergen.checkpoint import MODEL_FILE
    from divergen.config import load_config
    from divergen.synthetic_pool import make_synthetic_pool

    from .test_engine import TINY, base_overrides, read_metrics, reset_accelerate

    data = make_synthetic_lvis(
        tmp_path / "data", num_train=8, num_val=2, num_categories=8, image_size=(128, 128)
    )
    pool = make_synthetic_pool(tmp_path / "pool", num_categories=10, per_category=3, size_range=(24, 48))
    overrides = [
        *base_overrides(data, tmp_path / "run"),
        "model.num_classes=10",
        "model.roi_heads.test_num_classes=8",
        "paste.enabled=true",
        f"paste.pool={pool}",
        "train.max_iter=3",
        "train.batch_size=2",
    ]
    torch.set_num_threads(1)
    reset_accelerate()
    try:
        engine.train(load_config(TINY, overrides))
    finally:
        reset_accelerate()
    records = read_metrics(tmp_path / "run")
    assert sum(r["pasted_per_image"] for r in records) > 0
    assert all(math.isfinite(r["total_loss"]) and r["skipped_pool_files"] == 0 for r in records)
    from safetensors.torch import load_file

    weights = load_file(tmp_path / "run" / "checkpoints" / "0000003" / MODEL_FILE)
    freq = weights["roi_heads.box_predictor.0.freq_weight"]
    assert freq.shape == (10,) and torch.allclose(freq[8:], torch.full((2,), 2000.0**0.5))
    # More model classes than the dataset's without paste: an error naming both.
    with pytest.raises(ValueError, match="8 categories but model.num_classes = 10"):
        engine.train(load_config(TINY, [*overrides[:-4], "train.max_iter=1"]))
    reset_accelerate()


def test_show_writes_a_png_grid(tmp_path):
    from PIL import Image

    from divergen.paste import main
    from divergen.synthetic_pool import make_synthetic_pool

    data = make_synthetic_lvis(
        tmp_path / "data", num_train=6, num_val=1, num_categories=5, image_size=(64, 96)
    )
    pool = make_synthetic_pool(tmp_path / "pool", num_categories=5, per_category=2, size_range=(16, 32))
    config = tmp_path / "c.toml"
    config.write_text(
        f'[model]\nnum_classes = 5\n[data]\ntrain_json = "{data["train_json"]}"\n'
        f'train_image_root = "{data["image_root"]}"\ntrain_size = 96\n[paste]\npool = "{pool}"\n'
    )
    main(
        [
            "--config",
            str(config),
            "--show",
            "5",
            "--out",
            str(tmp_path / "grid.png"),
            "--set",
            "paste.max_samples=4",
        ]
    )
    with Image.open(tmp_path / "grid.png") as im:
        grid = np.asarray(im.convert("RGB"))
    assert grid.shape[0] < grid.shape[1] <= 4 * 96  # 5 tiles of at most 96 px: 4 columns, 2 rows
    assert (grid == (255, 0, 0)).all(-1).any()  # a pasted instance's box (real ones are green)
