"""BSGAL's reference batch and reference loss (reference/bsgal.md §1.2 steps 0-1): reference sampling in
``DetectionDataset``, ``CascadeROIHeads.reference_cls_loss`` against a slow computation, and
``CenterNet2.reference_cls_loss`` (gradients, backbone in eval mode)."""

from __future__ import annotations

import json
import math
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from divergen.config import load_config
from divergen.data import REFERENCE_TRIES, DetectionDataset, collate, lvis_image_path, train_transform
from divergen.model import build_model
from divergen.roi_heads import CascadeROIHeads
from divergen.synthetic import make_synthetic_lvis

from .test_roi_heads import _naive_bce, _tiny_heads, _train_case

ROOT = Path(__file__).resolve().parents[1]
SIDE = 16  # pixels of the hand-made images


# ------------------------------------------------------------------------------------------------ helpers


def _write_dataset(root: Path, image_labels: list[list[int]], num_categories: int, corrupt=()) -> Path:
    """An LVIS file with one SIDE x SIDE image per entry of ``image_labels`` (image id = position + 1, filled with
    the grey level 10 x id), one square instance per label; category ids 1..num_categories (index = id - 1).
    Images at the positions in ``corrupt`` are written as garbage bytes."""
    images, anns = [], []
    for i, labels in enumerate(image_labels):
        rec = {"id": i + 1, "height": SIDE, "width": SIDE, "coco_url": f"http://x/train2017/{i + 1:012d}.png"}
        images.append(rec)
        path = lvis_image_path(rec, root)
        path.parent.mkdir(parents=True, exist_ok=True)
        if i in corrupt:
            path.write_bytes(b"not an image")
        else:
            Image.fromarray(np.full((SIDE, SIDE, 3), 10 * (i + 1), dtype=np.uint8)).save(path)
        for j, label in enumerate(labels):
            x0, y0 = 1 + j, 2 + j
            anns.append(
                {
                    "id": len(anns) + 1,
                    "image_id": i + 1,
                    "category_id": label + 1,
                    "bbox": [x0, y0, 8, 8],
                    "segmentation": [[x0, y0, x0 + 8, y0, x0 + 8, y0 + 8, x0, y0 + 8]],
                }
            )
    cats = [{"id": c + 1, "name": f"c{c}"} for c in range(num_categories)]
    path = root / "train.json"
    path.write_text(json.dumps({"images": images, "annotations": anns, "categories": cats}))
    return path


class FakePaste:
    """Stands in for ``InstancePaste``: appends one square instance per label of ``labels`` (``is_pasted``) and,
    with ``drop_real``, removes the real instances (as if occluded). Counts its calls."""

    def __init__(self, labels: list[int], drop_real: bool = False):
        self.labels, self.drop_real, self.calls = labels, drop_real, 0

    def __call__(self, sample: dict, rng: np.random.Generator) -> dict:
        self.calls += 1
        n = len(self.labels)
        h, w = sample["image"].shape[1:]
        keep = slice(0, 0) if self.drop_real else slice(None)
        masks = torch.zeros(n, h, w, dtype=torch.bool)
        masks[:, :4, :4] = True
        return {
            "image": sample["image"],
            "boxes": torch.cat([sample["boxes"][keep], torch.tensor([[0.0, 0, 4, 4]] * n).reshape(-1, 4)]),
            "labels": torch.cat([sample["labels"][keep], torch.tensor(self.labels, dtype=torch.int64)]),
            "masks": torch.cat([sample["masks"][keep], masks]),
            "is_pasted": torch.tensor([False] * len(sample["labels"][keep]) + [True] * n),
        }


def _chi2_critical(df: int, z: float = 3.09) -> float:
    """Upper chi-square quantile (Wilson-Hilferty); z = 3.09 is p = 0.001."""
    return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


def _chi2(counts: dict[int, int], probs: dict[int, float], n: int) -> float:
    return sum((counts.get(k, 0) - n * p) ** 2 / (n * p) for k, p in probs.items())


# Categories 0..5; category 4 has no image. Image 2 holds classes 0 and 2, so its probability sums both routes.
LABELS = [[0], [0], [0, 2], [2], [3], [3], [3], [3], [1], [5]]


@pytest.fixture()
def hand_dataset(tmp_path):
    return _write_dataset(tmp_path, LABELS, 6), tmp_path


# ------------------------------------------------------------------------------------------ reference sampling


def test_class_image_index_equals_naive_dict(tmp_path):
    paths = make_synthetic_lvis(tmp_path, num_train=40, num_val=1, num_categories=8, image_size=(48, 64))
    ds = DetectionDataset(paths["train_json"], paths["image_root"], transform=None, filter_empty=True)
    naive = defaultdict(list)
    for i in range(len(ds)):
        for c in set(ds.record(i)["labels"]):
            naive[c].append(i)
    assert ds.class_image_indptr.dtype == ds.class_image_indices.dtype == np.int64
    assert ds.class_image_indptr.shape == (9,) and len(ds.class_image_indices) == sum(
        map(len, naive.values())
    )
    for c in range(8):
        assert ds.images_of(c).tolist() == naive[c] and len(naive[c]) == ds.categories.image_count[c]
    assert len(ds.images_of(-1)) == len(ds.images_of(8)) == len(ds.images_of(100)) == 0


def test_reference_class_then_image_uniform(hand_dataset):
    ds = DetectionDataset(*hand_dataset, transform=None, filter_empty=True)
    assert len(ds.images_of(4)) == 0
    rng = np.random.default_rng(0)
    n = 1800
    # Duplicates count once; 4 (no image), 9 (beyond the dataset's classes) and -1 are never chosen.
    pasted = [0, 2, 2, 2, 3, 4, 9, -1]
    counts = Counter(ds.reference_sample(pasted, rng)["image_id"] - 1 for _ in range(n))
    # c ~ U{0, 2, 3}, then an image uniformly among those containing c.
    expected = {0: 1 / 9, 1: 1 / 9, 2: 1 / 9 + 1 / 6, 3: 1 / 6, 4: 1 / 12, 5: 1 / 12, 6: 1 / 12, 7: 1 / 12}
    assert set(counts) <= set(expected)
    assert _chi2(counts, expected, n) < _chi2_critical(len(expected) - 1)
    # The test has the power to tell: classes weighted by their pasted multiplicity (0: 1/5, 2: 3/5, 3: 1/5)
    # or images uniform over the union of the classes' images would fail it.
    weighted = {
        0: 1 / 15,
        1: 1 / 15,
        2: 1 / 15 + 3 / 10,
        3: 3 / 10,
        4: 1 / 20,
        5: 1 / 20,
        6: 1 / 20,
        7: 1 / 20,
    }
    assert _chi2(counts, weighted, n) > 3 * _chi2_critical(len(expected) - 1)
    union = {i: 1 / 8 for i in range(8)}
    assert _chi2(counts, union, n) > 3 * _chi2_critical(len(expected) - 1)


def test_reference_keeps_all_gt_and_is_not_pasted(hand_dataset):
    paste = FakePaste([2])
    ds = DetectionDataset(
        *hand_dataset, transform=None, filter_empty=True, paste=paste, return_reference=True
    )
    for seed in range(20):
        item = ds[(4, seed)]
        ref = item["reference"]
        assert set(ref) == {"image", "boxes", "labels", "masks", "image_id"}
        assert ref["image_id"] in (3, 4)  # the images of class 2
        assert ref["labels"].tolist() == list(ds.record(ref["image_id"] - 1)["labels"])  # all its GT
        assert ref["masks"].shape == (len(ref["labels"]), SIDE, SIDE)
        assert int(ref["image"][0, 0, 0]) == 10 * ref["image_id"]
    assert paste.calls == 20  # once per sample, never on the reference


def test_reference_falls_back_to_own_labels(tmp_path):
    # Image 0 holds classes 0 and 1; class 2 has no image; image 3 has no annotation at all.
    json_path = _write_dataset(tmp_path, [[0, 1], [0], [1], []], 4)

    def refs(paste, index, n=60, **kwargs):
        ds = DetectionDataset(
            json_path,
            tmp_path,
            transform=None,
            filter_empty=False,
            paste=paste,
            return_reference=True,
            **kwargs,
        )
        return [ds[(index, seed)]["reference"] for seed in range(n)]

    # Only imageless / extra classes pasted (and the real instances occluded by them): the crop's own labels
    # from before the paste are the candidates.
    for paste in (FakePaste([2, 7], drop_real=True), FakePaste([]), None):
        ids = Counter(r["image_id"] for r in refs(paste, 0))
        assert set(ids) == {1, 2, 3}, paste  # images of class 0 (1, 2) and of class 1 (1, 3)
    # Pasted classes with images take precedence over the own labels.
    assert {r["image_id"] for r in refs(FakePaste([1]), 1)} == {1, 3}
    # No usable pasted class and no own label: no reference.
    assert refs(FakePaste([2]), 3, n=5) == [None] * 5
    assert refs(None, 3, n=5) == [None] * 5
    # The reference of a plain sample does not change the sample.
    plain = DetectionDataset(json_path, tmp_path, transform=train_transform(SIDE), filter_empty=False)
    with_ref = DetectionDataset(
        json_path, tmp_path, transform=train_transform(SIDE), filter_empty=False, return_reference=True
    )
    for seed in range(5):
        a, b = plain[(0, seed)], with_ref[(0, seed)]
        assert (
            "reference" not in a
            and torch.equal(a["image"], b["image"])
            and torch.equal(a["boxes"], b["boxes"])
        )


def test_unreadable_reference_image_is_redrawn(tmp_path):
    # Class 0 lives only in the corrupt image (id 2); class 1 in the images with ids 1 and 3.
    json_path = _write_dataset(tmp_path, [[1], [0], [1]], 2, corrupt={1})
    ds = DetectionDataset(json_path, tmp_path, transform=None, filter_empty=True)
    rng = np.random.default_rng(0)
    n = 200
    refs = [ds.reference_sample([0, 1], rng) for _ in range(n)]
    ids = Counter(None if r is None else r["image_id"] for r in refs)
    assert set(ids) <= {None, 1, 3}  # never the corrupt image (id 2)
    # Without redraws half the samples would be None; with REFERENCE_TRIES draws (1/2)^4 = 1/16 of them.
    assert ids[None] < 0.15 * n and ids[1] + ids[3] > 0.85 * n
    skipped = ds.num_skipped
    assert ds.reference_sample([0], rng) is None
    assert ds.num_skipped == skipped + REFERENCE_TRIES


def test_reference_is_deterministic_and_transformed(tmp_path):
    paths = make_synthetic_lvis(tmp_path, num_train=24, num_val=1, num_categories=6, image_size=(96, 128))

    def dataset():
        return DetectionDataset(
            paths["train_json"],
            paths["image_root"],
            transform=train_transform(64),
            filter_empty=True,
            paste=FakePaste([1, 3]),
            return_original=True,
            return_reference=True,
        )

    a, b = dataset(), dataset()
    index_of = {a.record(i)["id"]: i for i in range(len(a))}
    ids = set()
    for seed in range(12):
        ra, rb = a[(seed, seed)]["reference"], b[(seed, seed)]["reference"]
        assert ra["image_id"] == rb["image_id"] and torch.equal(ra["image"], rb["image"])
        assert torch.equal(ra["boxes"], rb["boxes"]) and torch.equal(ra["masks"], rb["masks"])
        assert max(ra["image"].shape[1:]) <= 64  # the training transform
        # Its file holds a pasted class (the crop may have cut that instance away, as in the official).
        assert set(a.record(index_of[ra["image_id"]])["labels"]) & {1, 3}
        ids.add(ra["image_id"])
    assert len(ids) > 2
    # Through collate: the reference travels in the infos, like the original.
    items = [a[(0, 5)], None, a[(1, 6)]]
    _, targets, infos = collate(items)
    assert len(infos) == 2 and "reference" not in targets[0]
    assert infos[0]["reference"] is items[0]["reference"] and infos[1]["reference"] is items[2]["reference"]
    assert "original" in infos[0]


# --------------------------------------------------------------------------------------------- the heads


def _hand_decode(box2box, deltas: torch.Tensor, boxes: torch.Tensor) -> list[list[float]]:
    """Box2BoxTransform.apply_deltas in python floats (double)."""
    wx, wy, ww, wh = box2box.weights
    out = []
    for (dx, dy, dw, dh), (x0, y0, x1, y1) in zip(deltas.tolist(), boxes.tolist(), strict=True):
        w, h = x1 - x0, y1 - y0
        cx, cy = x0 + w / 2 + dx / wx * w, y0 + h / 2 + dy / wy * h
        pw, ph = (
            math.exp(min(dw / ww, math.log(1000 / 16))) * w,
            math.exp(min(dh / wh, math.log(1000 / 16))) * h,
        )
        out.append([cx - pw / 2, cy - ph / 2, cx + pw / 2, cy + ph / 2])
    return out


def _hand_iou(a: list[float], b: list[float]) -> float:
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if inter > 0 else 0.0


def _slow_reference_loss(
    heads: CascadeROIHeads, feats, sizes, targets
) -> tuple[list[float], list[list[int]]]:
    """Per stage: the loss computed box by box, and the RoI labels (C = background)."""
    num_classes = heads.num_classes
    boxes = [t["boxes"].tolist() for t in targets]
    labels = [t["labels"].tolist() for t in targets]
    losses, all_labels, deltas = [], [], []
    for k in range(heads.num_stages):
        if k > 0:
            new_boxes, new_labels = [], []
            for i, (h, w) in enumerate(sizes):
                decoded = _hand_decode(
                    heads.box2box[k - 1], deltas[i], torch.tensor(boxes[i], dtype=torch.float64)
                )
                kept = []
                for x0, y0, x1, y1 in decoded:
                    x0, x1 = min(max(x0, 0), w), min(max(x1, 0), w)
                    y0, y1 = min(max(y0, 0), h), min(max(y1, 0), h)
                    if x1 > x0 and y1 > y0:
                        kept.append([x0, y0, x1, y1])
                gts = targets[i]["boxes"].tolist()
                roi_labels = []
                for b in kept:
                    ious = [_hand_iou(g, b) for g in gts]
                    best = max(range(len(gts)), key=lambda j: (ious[j], -j))
                    fg = ious[best] >= heads.cascade_ious[k]
                    roi_labels.append(int(targets[i]["labels"][best]) if fg else num_classes)
                new_boxes.append(kept)
                new_labels.append(roi_labels)
            boxes, labels = new_boxes, new_labels
        with torch.no_grad():
            logits, d = heads.run_stage(
                k, feats, [torch.tensor(b, dtype=torch.float32).reshape(-1, 4) for b in boxes]
            )
        deltas = list(d.split([len(b) for b in boxes]))
        flat = [c for image_labels in labels for c in image_labels]
        total = sum(
            _naive_bce(float(logits[r, c]), float(flat[r] == c))
            for r in range(len(flat))
            for c in range(num_classes)
        )
        losses.append(total / len(flat))
        all_labels.append(flat)
    return losses, all_labels


def _reference_case():
    """_train_case's features, sizes and targets (4 + 3 GT), two GT of image 0 overlapping with other labels,
    and box regressors scaled up so that some regressed RoIs of stages 1 and 2 fall to background."""
    heads = _tiny_heads(fed_loss_num_cat=2)  # a federated loss would keep 2 of the 6 classes
    feats, _, sizes, targets = _train_case()
    targets = [{k: v for k, v in t.items() if k in ("boxes", "labels")} for t in targets]
    b = targets[0]["boxes"][0]
    targets[0]["boxes"] = torch.cat([targets[0]["boxes"], (b + torch.tensor([3.0, 2, 3, 2]))[None]])
    targets[0]["labels"] = torch.cat([targets[0]["labels"], torch.tensor([4])])
    with torch.no_grad():
        for predictor in heads.box_predictor:
            predictor.bbox_pred.weight.mul_(1200)
    return heads.train(), feats, sizes, targets


def test_reference_cls_loss_vs_slow_computation():
    heads, feats, sizes, targets = _reference_case()
    losses = heads.reference_cls_loss(feats, sizes, targets)
    assert sorted(losses) == [f"loss_cls_stage{k}" for k in range(3)]
    expected, labels = _slow_reference_loss(heads, feats, sizes, targets)
    assert labels[0] == targets[0]["labels"].tolist() + targets[1]["labels"].tolist()  # GT boxes, own labels
    for k in (1, 2):  # the case exercises both outcomes of the re-matching
        assert 0 < sum(c == heads.num_classes for c in labels[k]) < len(labels[k]), labels[k]
    for k in range(3):
        torch.testing.assert_close(losses[f"loss_cls_stage{k}"].item(), expected[k], rtol=1e-6, atol=0)


def test_reference_cls_loss_draws_nothing_and_ignores_fed_loss():
    heads, feats, sizes, targets = _reference_case()
    torch.manual_seed(1)
    state = torch.get_rng_state()
    first = heads.reference_cls_loss(feats, sizes, targets)
    assert torch.equal(torch.get_rng_state(), state)  # no RoI or class sampling
    for predictor in heads.box_predictor:
        predictor.freq_weight.copy_(torch.tensor([100.0, 1e-3, 5, 0.0, 2]))
    torch.manual_seed(2)
    second = heads.reference_cls_loss(feats, sizes, targets)
    heads.use_fed_loss = False
    third = heads.reference_cls_loss(feats, sizes, targets)
    for k in first:
        assert torch.equal(first[k], second[k]) and torch.equal(first[k], third[k])


def test_reference_cls_loss_images_without_gt():
    heads, feats, sizes, targets = _reference_case()
    empty = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}
    both = heads.reference_cls_loss(feats, sizes, targets)
    # An image without GT adds no RoI: the loss over the other image is unchanged.
    one = heads.reference_cls_loss([f[1:] for f in feats], sizes[1:], targets[1:])
    with_empty = heads.reference_cls_loss(feats, sizes, [empty, targets[1]])
    for k in both:
        torch.testing.assert_close(with_empty[k], one[k], rtol=1e-6, atol=0)
        assert not torch.equal(both[k], one[k])
    # No GT anywhere: zeros that still backpropagate (into the heads, nothing else).
    feats = [f.clone().requires_grad_() for f in feats]
    losses = heads.reference_cls_loss(feats, sizes, [empty, empty])
    assert all(v.item() == 0 and v.requires_grad for v in losses.values())
    sum(losses.values()).backward()
    assert heads.box_predictor[0].cls_score.weight.grad.abs().sum() == 0
    with pytest.raises(ValueError, match="one target and image size per image"):
        heads.reference_cls_loss(feats, sizes, [empty])


# --------------------------------------------------------------------------------------------- the model


@pytest.fixture(scope="module")
def tiny_cfg():
    return load_config(ROOT / "configs" / "tiny.toml").model


def _images_and_targets():
    g = torch.Generator().manual_seed(0)
    images = [torch.randint(0, 256, (3, 64, 96), generator=g, dtype=torch.uint8) for _ in range(2)]
    targets = [
        {"boxes": torch.tensor([[4.0, 6, 40, 50], [30, 10, 90, 60]]), "labels": torch.tensor([1, 6])},
        {"boxes": torch.tensor([[10.0, 12, 60, 40], [20, 20, 20, 30]]), "labels": torch.tensor([3, 2])},
    ]  # the last box has no area: dropped
    return images, targets


def test_model_reference_cls_loss_reaches_heads_and_backbone_only(tiny_cfg, monkeypatch):
    torch.manual_seed(0)
    model = build_model(tiny_cfg).train()
    images, targets = _images_and_targets()
    targets[0]["masks"] = torch.zeros(2, 1, 1, dtype=torch.bool)  # not needed, so not checked

    def no_proposals(*args, **kwargs):
        raise AssertionError("the proposal stage must not run")

    monkeypatch.setattr(model.proposal_generator, "forward", no_proposals)
    losses = model.reference_cls_loss(images, targets)
    assert sorted(losses) == [f"loss_cls_stage{k}" for k in range(3)]
    assert all(v.dtype == torch.float32 and v > 0 for v in losses.values())
    sum(losses.values()).backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    for prefix in (
        "backbone.bottom_up.",
        "backbone.",
        "roi_heads.box_head.2.",
        "roi_heads.box_predictor.0.cls_score",
    ):
        assert any(g is not None and g.abs().sum() > 0 for n, g in grads.items() if n.startswith(prefix)), (
            prefix
        )
    for n, g in grads.items():
        if n.startswith(("proposal_generator.", "roi_heads.mask_head.")) or ".bbox_pred." in n:
            assert g is None, n
    # The same as the heads' loss on p3-p5 of the normalised, padded batch, with the zero-area box dropped.
    with torch.no_grad():
        batch, sizes = model.preprocess(images)
        feats = model.backbone(batch)[:3]
        kept = [targets[0], {"boxes": targets[1]["boxes"][:1], "labels": targets[1]["labels"][:1]}]
        direct = model.roi_heads.reference_cls_loss(feats, sizes, kept)
    for k, v in direct.items():
        torch.testing.assert_close(losses[k].detach(), v, rtol=1e-6, atol=0)
    # Same input checks as forward; heads in fp32 under autocast.
    with pytest.raises(ValueError, match=r"class indices must be in \[0, 8\)"):
        model.reference_cls_loss(images[:1], [{"boxes": torch.zeros(1, 4) + 1, "labels": torch.tensor([8])}])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        amp = model.reference_cls_loss(images, targets)
    assert all(v.dtype == torch.float32 and torch.isfinite(v) for v in amp.values())


def test_backbone_eval_turns_drop_path_off_and_restores_modes(monkeypatch):
    cfg = load_config(ROOT / "configs" / "tiny.toml", overrides=("model.backbone=swin",)).model
    cfg.swin.drop_path_rate = 0.5
    torch.manual_seed(0)
    model = build_model(cfg).train()
    model.backbone.bottom_up.patch_embed.eval()  # a module already in eval mode stays so
    modes = {n: m.training for n, m in model.named_modules()}
    images, targets = _images_and_targets()
    torch.manual_seed(1)
    a = model.reference_cls_loss(images, targets)
    torch.manual_seed(2)
    b = model.reference_cls_loss(images, targets)
    assert all(torch.equal(a[k], b[k]) for k in a)  # drop path off: no randomness
    assert {n: m.training for n, m in model.named_modules()} == modes
    torch.manual_seed(1)
    c = model.reference_cls_loss(images, targets, backbone_eval=False)
    torch.manual_seed(2)
    d = model.reference_cls_loss(images, targets, backbone_eval=False)
    assert not all(torch.equal(c[k], d[k]) for k in c)  # drop path on: the check above can fail
    assert {n: m.training for n, m in model.named_modules()} == modes

    def fail(*args, **kwargs):
        assert not model.backbone.training and not model.backbone.bottom_up.training
        assert model.roi_heads.training  # the heads stay in training mode
        raise RuntimeError("boom")

    monkeypatch.setattr(model.roi_heads, "reference_cls_loss", fail)
    with pytest.raises(RuntimeError, match="boom"):
        model.reference_cls_loss(images, targets)
    assert {n: m.training for n, m in model.named_modules()} == modes
