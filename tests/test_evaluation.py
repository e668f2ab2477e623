"""LVIS / COCO evaluation: hand cases, the reference ``lvis`` package (0.5.3, shimmed for numpy 2),
pycocotools called directly, results conversion and inference over a dataset with a fake model."""

from __future__ import annotations

import copy
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pycocotools.mask as mask_util
import pytest
import torch

from divergen.evaluation import (
    AREA_RNGS,
    IOU_THRS,
    LVIS_SUMMARY_KEYS,
    REC_THRS,
    _precision_recall,
    encode_masks,
    evaluate_coco,
    evaluate_lvis,
    format_table,
    greedy_match,
    inference_on_dataset,
    save_metrics,
    to_lvis_results,
)
from tests.lvis_reference import lvis_api_evaluate, patch_lvis_import

# ----------------------------------------------------------------------------------------------------------
# Synthetic LVIS-format ground truth and detections
# ----------------------------------------------------------------------------------------------------------


def _octagon(rng, x, y, w, h):
    """An irregular octagon inside the box (x, y, w, h), as a COCO polygon list."""
    pts = []
    for ang in np.linspace(0, 2 * np.pi, 8, endpoint=False):
        r = rng.uniform(0.6, 1.0)
        pts += [x + w / 2 + r * w / 2 * np.cos(ang), y + h / 2 + r * h / 2 * np.sin(ang)]
    return [[float(p) for p in pts]]


def _rle(poly, h, w):
    rle = mask_util.merge(mask_util.frPyObjects(poly, h, w))
    return {"size": rle["size"], "counts": rle["counts"].decode("ascii")}


def make_lvis_gt(seed: int, num_images: int = 30, num_cats: int = 9) -> dict:
    """Categories r/c/f, image ids not sorted in file order, polygons and compressed RLEs, 0-3 positive
    categories per image (some images empty), neg and not-exhaustive ids, one annotation with area 0."""
    rng = np.random.default_rng(seed)
    cats = [
        {
            "id": 10 + 3 * k,
            "name": f"cat{k}",
            "frequency": "rcf"[k % 3],
            "synonyms": [],
            "def": "",
            "synset": "",
        }
        for k in range(num_cats)
    ]
    cat_ids = [c["id"] for c in cats]
    images, anns = [], []
    for i in range(num_images):
        img_id = 1000 - 7 * i
        h, w = int(rng.integers(60, 260)), int(rng.integers(60, 260))
        pos = [int(c) for c in rng.choice(cat_ids, size=int(rng.integers(0, 4)), replace=False)]
        for c in pos:
            for _ in range(int(rng.integers(1, 4))):
                bw, bh = rng.uniform(4, w * 0.9), rng.uniform(4, h * 0.9)
                x, y = rng.uniform(0, w - bw), rng.uniform(0, h - bh)
                poly = _octagon(rng, x, y, bw, bh)
                rle = _rle(poly, h, w)
                anns.append({
                    "id": len(anns) + 1, "image_id": img_id, "category_id": c,
                    "segmentation": poly if rng.random() < 0.7 else rle,
                    "area": float(mask_util.area(rle)), "bbox": [float(v) for v in mask_util.toBbox(rle)],
                })  # fmt: skip
        rest = [c for c in cat_ids if c not in pos]
        images.append({
            "id": img_id, "width": w, "height": h, "coco_url": f"http://images.cocodataset.org/val2017/{img_id:012d}.jpg",
            "neg_category_ids": [c for c in rest if rng.random() < 0.4],
            "not_exhaustive_category_ids": [c for c in pos if rng.random() < 0.3],
        })  # fmt: skip
    anns[0]["area"] = 0.0  # lvis-api drops annotations with area 0
    return {"images": images, "annotations": anns, "categories": cats}


def make_detections(gt: dict, seed: int, fp_per_image: int = 6, score_decimals: int = 1) -> list[dict]:
    """Noisy copies of the ground truth (0-2 per instance, some with a wrong category), random false positives
    of any category (in and outside the federated sets), scores rounded to make ties; shuffled."""
    rng = np.random.default_rng(seed)
    hw = {im["id"]: (im["height"], im["width"]) for im in gt["images"]}
    cat_ids = [c["id"] for c in gt["categories"]]
    res = []

    def add(img_id, cat, box, poly):
        h, w = hw[img_id]
        res.append({
            "image_id": img_id, "category_id": int(cat), "bbox": [float(v) for v in box],
            "score": float(np.round(rng.random(), score_decimals)), "segmentation": _rle(poly, h, w),
        })  # fmt: skip

    for a in gt["annotations"]:
        x, y, bw, bh = a["bbox"]
        for _ in range(int(rng.integers(0, 3))):
            j = rng.normal(0, 0.08, 4) * [bw, bh, bw, bh]
            cat = a["category_id"] if rng.random() < 0.85 else rng.choice(cat_ids)
            h, w = hw[a["image_id"]]
            poly = [[p + j[k % 2] for k, p in enumerate(_octagon(rng, x, y, bw, bh)[0])]]
            add(a["image_id"], cat, [x + j[0], y + j[1], max(bw + j[2], 1), max(bh + j[3], 1)], poly)
    for im in gt["images"]:
        h, w = hw[im["id"]]
        for _ in range(int(rng.integers(0, fp_per_image + 1))):
            bw, bh = rng.uniform(2, w * 0.8), rng.uniform(2, h * 0.8)
            x, y = rng.uniform(0, w - bw), rng.uniform(0, h - bh)
            add(im["id"], rng.choice(cat_ids), [x, y, bw, bh], _octagon(rng, x, y, bw, bh))
    res[0]["bbox"][2] = 0.0  # a zero-area box: dropped from bbox evaluation
    return [res[i] for i in rng.permutation(len(res))]


def perfect_detections(gt: dict) -> list[dict]:
    hw = {im["id"]: (im["height"], im["width"]) for im in gt["images"]}
    out = []
    for a in gt["annotations"]:
        if a["area"] == 0:  # not in the evaluated ground truth
            continue
        h, w = hw[a["image_id"]]
        seg = a["segmentation"]
        rle = _rle(seg, h, w) if isinstance(seg, list) else seg
        out.append({"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"],
                    "score": 1.0, "segmentation": rle})  # fmt: skip
    return out


# ----------------------------------------------------------------------------------------------------------
# The reference: lvis-api 0.5.3
# ----------------------------------------------------------------------------------------------------------


@pytest.fixture
def lvis_reference(monkeypatch):
    """``run(gt, results, iou_type, max_dets) -> (results dict, precision array)`` with the lvis package,
    called as detectron2's LVISEvaluator calls it (``bbox`` dropped from the results for segm)."""
    if not patch_lvis_import(monkeypatch):
        pytest.skip("the reference evaluator is not installed: pip install --no-deps lvis==0.5.3")

    def run(gt, results, iou_type, max_dets=300):
        summary, precision = lvis_api_evaluate(gt, results, iou_type, max_dets)
        # lvis-api names AR by its fixed params.max_dets (300) whatever the results' cap.
        return {k.replace("@300", f"@{max_dets}"): v for k, v in summary.items()}, precision

    return run


def _ref_per_category(precision, names):
    out = {}
    for k, name in enumerate(names):
        p = precision[:, :, k, 0]
        out[name] = float(np.mean(p[p > -1])) if (p > -1).any() else float("nan")
    return out


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("max_dets", [300, 4])
def test_equals_reference_lvis(lvis_reference, seed, max_dets):
    gt = make_lvis_gt(seed, num_images=20 + 15 * seed)
    dets = make_detections(gt, seed + 100)
    ours = evaluate_lvis(gt, dets, max_dets=max_dets)
    names = [c["name"] for c in sorted(gt["categories"], key=lambda c: c["id"])]
    for iou_type in ("bbox", "segm"):
        ref, precision = lvis_reference(gt, dets, iou_type, max_dets)
        got = ours[iou_type]
        assert set(got) == set(ref) | {"per_category"}
        for key, value in ref.items():
            assert got[key] == pytest.approx(value, abs=1e-6), f"{iou_type} {key}"
        assert 0.01 < got["AP"] < 0.95 and got["APr"] > 0 and got["APc"] > 0 and got["APf"] > 0  # a real test
        ref_cat = _ref_per_category(precision, names)
        for name in names:
            assert got["per_category"][name] == pytest.approx(ref_cat[name], abs=1e-6, nan_ok=True), name


def test_perfect_predictions_give_ap_one(lvis_reference):
    gt = make_lvis_gt(5, num_images=40)
    dets = perfect_detections(gt)
    ours = evaluate_lvis(gt, dets)
    for iou_type in ("bbox", "segm"):
        m = ours[iou_type]
        for key in LVIS_SUMMARY_KEYS:
            assert m[key] == 1.0, f"{iou_type} {key} = {m[key]}"
        present = {a["category_id"] for a in gt["annotations"] if a["area"] > 0}
        for cat in gt["categories"]:
            ap = m["per_category"][cat["name"]]
            assert ap == 1.0 if cat["id"] in present else math.isnan(ap)
        ref, _ = lvis_reference(gt, dets, iou_type)
        assert all(m[k] == v for k, v in ref.items())


# ----------------------------------------------------------------------------------------------------------
# Hand cases (no reference package needed)
# ----------------------------------------------------------------------------------------------------------


def _one_image_gt(neg=(), not_exhaustive=(), frequency="f"):
    """One 200x200 image, category 1 with one 100x100 box (large); category 2 has no annotation here."""
    poly = [[0.0, 0.0, 100.0, 0.0, 100.0, 100.0, 0.0, 100.0]]
    return {
        "images": [{"id": 7, "height": 200, "width": 200, "neg_category_ids": list(neg),
                    "not_exhaustive_category_ids": list(not_exhaustive)}],
        "annotations": [{"id": 1, "image_id": 7, "category_id": 1, "bbox": [0.0, 0.0, 100.0, 100.0],
                         "area": 10000.0, "segmentation": poly}],
        "categories": [{"id": 1, "name": "one", "frequency": frequency},
                       {"id": 2, "name": "two", "frequency": "r"}],
    }  # fmt: skip


def _det(box, score, cat=1):
    rle = mask_util.encode(np.asfortranarray(_box_mask(box)))
    return {"image_id": 7, "category_id": cat, "bbox": box, "score": score,
            "segmentation": {"size": rle["size"], "counts": rle["counts"].decode()}}  # fmt: skip


def _box_mask(box):
    m = np.zeros((200, 200), dtype=np.uint8)
    x, y, w, h = (int(v) for v in box)
    m[y : y + h, x : x + w] = 1
    return m


TP, FP = [0.0, 0.0, 100.0, 100.0], [100.0, 100.0, 100.0, 100.0]  # both "large" (> 96²)


@pytest.mark.parametrize(
    ("dets", "kwargs", "ap"),
    [
        ([_det(TP, 0.9), _det(FP, 0.8)], {}, 1.0),  # the FP ranks below the only TP: precision 1 at recall 1
        ([_det(TP, 0.8), _det(FP, 0.9)], {}, 0.5),  # the FP first: precision 1/2 at every recall point
        (
            [_det(TP, 0.8), _det(FP, 0.9)],
            {"not_exhaustive": [1]},
            1.0,
        ),  # unmatched det, not exhaustive: ignored
        ([_det(TP, 0.8), _det(FP, 0.9, cat=2)], {}, 1.0),  # category 2 neither positive nor negative: dropped
        ([_det(TP, 0.8), _det(FP, 0.9, cat=2)], {"neg": [2]}, 1.0),  # other category's FP: not category 1's
        ([_det(TP, 0.8), _det(FP, 0.9)], {"neg": [2]}, 0.5),
        ([_det(TP, 0.8), _det(TP, 0.9)], {}, 1.0),  # a duplicate: the second is an FP below the TP
        ([_det([0.0, 0.0, 100.0, 72.0], 0.9)], {}, 0.5),  # IoU 0.72: TP at thresholds 0.50 ... 0.70 only
        ([], {}, 0.0),  # no detections: recall 0 (lvis-api itself fails on an empty list)
    ],
)
def test_hand_cases(dets, kwargs, ap):
    gt = _one_image_gt(**kwargs)
    for iou_type in ("bbox", "segm"):
        m = evaluate_lvis(gt, dets, iou_types=(iou_type,))[iou_type]
        assert m["AP"] == pytest.approx(ap, abs=1e-12), iou_type
        assert m["APl"] == pytest.approx(ap, abs=1e-12) and m["APf"] == m["AP"]
        assert m["APs"] == m["APm"] == m["APr"] == m["APc"] == -1  # nothing to average over
        assert m["per_category"]["one"] == m["AP"] and math.isnan(m["per_category"]["two"])


def test_ap50_ap75_hand_case():
    m = evaluate_lvis(_one_image_gt(), [_det([0.0, 0.0, 100.0, 72.0], 0.9)], iou_types=("bbox",))["bbox"]
    assert m["AP50"] == pytest.approx(1.0) and m["AP75"] == 0.0 and m["AR@300"] == pytest.approx(0.5)


def test_area_range_bounds_are_inclusive():
    gt = _one_image_gt()
    gt["annotations"][0].update(
        bbox=[0.0, 0.0, 32.0, 32.0], area=1024.0, segmentation=[[0, 0, 32, 0, 32, 32, 0, 32]]
    )
    m = evaluate_lvis(gt, [_det([0.0, 0.0, 32.0, 32.0], 0.9)], iou_types=("bbox",))["bbox"]
    # Area exactly 32² is both small and medium (lvis-api / pycocotools compare with < and >).
    assert m["APs"] == pytest.approx(1.0) and m["APm"] == pytest.approx(1.0) and m["APl"] == -1


def test_max_dets_cap_is_per_image_over_all_categories():
    gt = _one_image_gt()
    dets = [_det(FP, 0.95, cat=2), _det(TP, 0.5)]  # category 2 is not evaluated in this image, yet it counts
    assert evaluate_lvis(gt, dets, max_dets=2)["bbox"]["AP"] == pytest.approx(1.0)  # 1 / (1 + eps)
    assert evaluate_lvis(gt, dets, max_dets=1)["bbox"]["AP"] == 0.0
    assert evaluate_lvis(gt, dets, max_dets=-1)["bbox"]["AP"] == pytest.approx(1.0)


def test_max_dets_equals_capping_by_hand():
    gt = make_lvis_gt(3, num_images=25)
    dets = make_detections(gt, 7, fp_per_image=12)
    capped = []
    for img in gt["images"]:
        mine = [d for d in dets if d["image_id"] == img["id"]]
        capped += sorted(mine, key=lambda d: -d["score"])[:5]  # stable: ties keep results order
    a, b = evaluate_lvis(gt, dets, max_dets=5), evaluate_lvis(gt, capped, max_dets=-1)
    assert a["bbox"]["AP"] != evaluate_lvis(gt, dets, max_dets=300)["bbox"]["AP"]
    for iou_type in ("bbox", "segm"):
        assert {k: v for k, v in a[iou_type].items() if k != "per_category"} == {
            k.replace("@-1", "@5"): v for k, v in b[iou_type].items() if k != "per_category"
        }


def test_detections_outside_federated_sets_are_ignored():
    gt = make_lvis_gt(4, num_images=25)
    dets = make_detections(gt, 9)
    base = evaluate_lvis(gt, dets)
    cat_ids = [c["id"] for c in gt["categories"]]
    pos = {(a["image_id"], a["category_id"]) for a in gt["annotations"] if a["area"] > 0}
    extra = []
    rng = np.random.default_rng(0)
    for img in gt["images"]:
        for c in cat_ids:
            if (img["id"], c) not in pos and c not in img["neg_category_ids"]:
                for d in rng.choice(dets, size=2):
                    extra.append({**d, "image_id": img["id"], "category_id": c, "score": 0.99})
    assert len(extra) > 50
    _assert_same_metrics(evaluate_lvis(gt, dets + extra), base)
    # ... whereas the same detections as a category of the image's negative set do count (as FPs).
    neg = [{**d, "category_id": img["neg_category_ids"][0]} for img in gt["images"] if img["neg_category_ids"]
           for d in dets if d["image_id"] == img["id"]]  # fmt: skip
    assert evaluate_lvis(gt, dets + neg)["bbox"]["AP"] < base["bbox"]["AP"]


def _assert_same_metrics(a, b):
    assert a.keys() == b.keys()
    for iou_type in a:
        for key, v in {**a[iou_type], **a[iou_type].pop("per_category")}.items():
            w = b[iou_type][key] if key in b[iou_type] else b[iou_type]["per_category"][key]
            assert v == w or (math.isnan(v) and math.isnan(w)), (iou_type, key)


def test_results_for_unknown_images_or_missing_fields_are_errors():
    gt = _one_image_gt()
    with pytest.raises(ValueError, match="not in the ground truth"):
        evaluate_lvis(gt, [{**_det(TP, 0.9), "image_id": 8}])
    with pytest.raises(ValueError, match="'segmentation'"):
        evaluate_lvis(gt, [{k: v for k, v in _det(TP, 0.9).items() if k != "segmentation"}])
    bad = copy.deepcopy(gt)
    del bad["categories"][0]["frequency"]
    with pytest.raises(ValueError, match="category 1 needs 'frequency'"):
        evaluate_lvis(bad, [])


# ----------------------------------------------------------------------------------------------------------
# The two formulas against slow loops
# ----------------------------------------------------------------------------------------------------------


def _slow_match(ious, gt_ig, thr):
    """lvis-api ``evaluate_img``'s matching loop for one area range (gt given in any order)."""
    order = np.argsort(gt_ig, kind="mergesort")  # non-ignored first
    ious, gt_ig = ious[:, order], gt_ig[order]
    gt_m = np.zeros(len(gt_ig), dtype=bool)
    dt_m, dt_ig = np.zeros(len(ious), dtype=bool), np.zeros(len(ious), dtype=bool)
    for d in range(len(ious)):
        iou, m = min(thr, 1 - 1e-10), -1
        for g in range(len(gt_ig)):
            if gt_m[g]:
                continue
            if m > -1 and not gt_ig[m] and gt_ig[g]:
                break
            if ious[d, g] < iou:
                continue
            iou, m = ious[d, g], g
        if m > -1:
            gt_m[m], dt_m[d], dt_ig[d] = True, True, gt_ig[m]
    return dt_m, dt_ig


def test_greedy_match_equals_slow_loop():
    rng = np.random.default_rng(0)
    ious, ignore, offsets, n = [], [], [], 0
    for _ in range(300):
        d, g = int(rng.integers(1, 12)), int(rng.integers(1, 20))
        # Coarse values: many exact ties, many at the thresholds.
        ious.append(np.round(rng.uniform(0.3, 1.0, (d, g)) * 20) / 20)
        ignore.append(rng.random((len(AREA_RNGS), g)) < 0.3)
        offsets.append(n)
        n += d
    matched, matched_ig = greedy_match(ious, ignore, offsets, n + 3)
    assert not matched[n:].any()
    for p, (iou, ig, off) in enumerate(zip(ious, ignore, offsets, strict=True)):
        for a in range(len(AREA_RNGS)):
            for t, thr in enumerate(IOU_THRS):
                dt_m, dt_ig = _slow_match(iou, ig[a], thr)
                rows = slice(off, off + len(iou))
                assert (matched[rows, a, t] == dt_m).all(), (p, a, t)
                assert (matched_ig[rows, a, t] == dt_ig).all(), (p, a, t)
    assert matched.mean() > 0.2 and matched_ig.any()


def test_precision_recall_hand_computed():
    # Detections by score: TP, FP, TP, ignored, FP; 4 ground truths.
    tps = np.array([[1, 0, 1, 0, 0]], dtype=bool)
    fps = np.array([[0, 1, 0, 0, 1]], dtype=bool)
    q, rc = _precision_recall(tps, fps, 4)
    # recall steps 1/4 (precision 1) and 2/4 (precision 2/3): interpolated precision 1 up to 0.25, 2/3 to 0.5.
    expected = np.where(REC_THRS <= 0.25, 1.0, np.where(REC_THRS <= 0.5, 2 / 3, 0.0))
    np.testing.assert_allclose(q[0], expected, rtol=1e-12)
    assert rc[0] == 0.5
    q0, rc0 = _precision_recall(np.zeros((10, 0), dtype=bool), np.zeros((10, 0), dtype=bool), 3)
    assert (q0 == 0).all() and (rc0 == 0).all()


# ----------------------------------------------------------------------------------------------------------
# COCO
# ----------------------------------------------------------------------------------------------------------


def test_coco_equals_pycocotools_called_directly():
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    gt = make_lvis_gt(6, num_images=30)
    for img in gt["images"]:
        del img["neg_category_ids"], img["not_exhaustive_category_ids"]
    for k, a in enumerate(gt["annotations"]):
        a["area"] = max(a["area"], 1.0)
        a["iscrowd"] = int(k % 17 == 5)
    dets = make_detections(gt, 11)
    ours = evaluate_coco(gt, dets)
    for iou_type in ("bbox", "segm"):
        coco_gt = COCO()
        coco_gt.dataset = copy.deepcopy(gt)
        coco_gt.createIndex()
        d = copy.deepcopy(dets)
        if iou_type == "segm":
            for r in d:
                del r["bbox"]
        ev = COCOeval(coco_gt, coco_gt.loadRes(d), iou_type)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
        got = ours[iou_type]
        assert [got[k] for k in ("AP", "AP50", "AP75", "APs", "APm", "APl")] == [
            float(v) for v in ev.stats[:6]
        ]
        assert got["AR@100"] == ev.stats[8] and 0.05 < got["AP"] < 0.95
        p = ev.eval["precision"][:, :, 0, 0, -1]
        assert got["per_category"]["cat0"] == pytest.approx(float(np.mean(p[p > -1])), abs=0)
    perfect = evaluate_coco(gt, perfect_detections(gt))
    assert perfect["bbox"]["AP"] == 1.0 and perfect["segm"]["AP"] == 1.0
    assert evaluate_coco(gt, [])["bbox"]["AP"] == 0.0


# ----------------------------------------------------------------------------------------------------------
# Results conversion, reporting
# ----------------------------------------------------------------------------------------------------------


def test_to_lvis_results():
    g = torch.Generator().manual_seed(0)
    masks = torch.rand(5, 30, 40, generator=g) > 0.5
    out = {
        "boxes": torch.tensor([[1.0, 2, 11, 22], [0, 0, 5, 5], [3, 3, 4, 9], [10, 0, 40, 30], [2, 2, 3, 3]]),
        "scores": torch.tensor([0.3, 0.9, 0.5, 0.9, 0.1]),
        "labels": torch.tensor([0, 2, 1, 2, 0]),
        "masks": masks,
    }
    res = to_lvis_results([out], [42], category_ids=[5, 8, 13], max_dets=3)
    assert [r["score"] for r in res] == pytest.approx([0.9, 0.9, 0.5])  # top 3, ties in output order
    assert [r["category_id"] for r in res] == [13, 13, 8] and all(r["image_id"] == 42 for r in res)
    assert res[0]["bbox"] == [0.0, 0.0, 5.0, 5.0] and res[2]["bbox"] == [3.0, 3.0, 1.0, 6.0]
    for r, i in zip(res, [1, 3, 2], strict=True):
        assert isinstance(r["segmentation"]["counts"], str)
        assert (mask_util.decode(r["segmentation"]) == masks[i].numpy()).all()
    json.dumps(res)  # JSON-ready
    assert (
        "segmentation"
        not in to_lvis_results([{k: v for k, v in out.items() if k != "masks"}], [1], [5, 8, 13])[0]
    )
    empty = {"boxes": torch.zeros(0, 4), "scores": torch.zeros(0), "labels": torch.zeros(0, dtype=torch.long),
             "masks": torch.zeros(0, 30, 40, dtype=torch.bool)}  # fmt: skip
    assert to_lvis_results([empty], [1], [5]) == [] and encode_masks(empty["masks"]) == []
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 2\)"):
        to_lvis_results([out], [42], category_ids=[5, 8])


def test_format_table_and_save_metrics(tmp_path):
    gt = _one_image_gt()
    metrics = evaluate_lvis(gt, [_det(TP, 0.8), _det(FP, 0.9)])
    table = format_table(metrics)
    lines = table.splitlines()
    assert lines[0].split()[:4] == ["AP", "AP50", "AP75", "APs"] and lines[2].split()[:3] == [
        "bbox",
        "50.00",
        "50.00",
    ]
    assert lines[3].startswith("segm") and " - " in lines[2]  # APs is undefined here
    save_metrics(metrics, tmp_path / "out" / "metrics.json")
    loaded = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert loaded["bbox"]["per_category"] == {"one": 0.5, "two": None} and loaded["segm"]["AP"] == 0.5


# ----------------------------------------------------------------------------------------------------------
# Inference over a dataset
# ----------------------------------------------------------------------------------------------------------


class _OracleModel(torch.nn.Module):
    """Returns the ground truth of the image whose id is written in pixel (0, 0, 0), at ``output_sizes``."""

    def __init__(self, gt: dict):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(()))
        self.by_image: dict[int, list] = {}
        for a in gt["annotations"]:
            self.by_image.setdefault(a["image_id"], []).append(a)
        self.cat_index = {c["id"]: k for k, c in enumerate(sorted(gt["categories"], key=lambda c: c["id"]))}

    def forward(self, images, *, output_sizes):
        assert not self.training and not torch.is_grad_enabled()
        outs = []
        for im, (h, w) in zip(images, output_sizes, strict=True):
            anns = self.by_image.get(int(im[0, 0, 0]), [])
            boxes = torch.tensor(
                [[x, y, x + bw, y + bh] for x, y, bw, bh in (a["bbox"] for a in anns)]
            ).reshape(-1, 4)
            masks = [mask_util.decode(_rle(a["segmentation"], h, w) if isinstance(a["segmentation"], list)
                                      else a["segmentation"]) for a in anns]  # fmt: skip
            outs.append({
                "boxes": boxes, "scores": torch.ones(len(anns)),
                "labels": torch.tensor([self.cat_index[a["category_id"]] for a in anns], dtype=torch.long),
                "masks": torch.from_numpy(np.stack(masks)).bool() if masks
                         else torch.zeros(0, h, w, dtype=torch.bool),
            })  # fmt: skip
        return outs


def test_inference_on_dataset_with_oracle_model():
    from accelerate import Accelerator

    gt = make_lvis_gt(8, num_images=12)
    model = _OracleModel(gt)
    model.train()
    infos = [
        {"image_id": im["id"], "orig_size": (im["height"], im["width"]), "scale": 0.5} for im in gt["images"]
    ]
    # Test-resized images (half size); the first image again at the end, as a sampler padding a shard would.
    samples = [(torch.full((3, im["height"] // 2, im["width"] // 2), float(im["id"])), info)
               for im, info in zip(gt["images"], infos, strict=True)]  # fmt: skip
    samples.append(samples[0])
    loader = [
        ([s[0] for s in samples[i : i + 3]], [{}] * 3, [s[1] for s in samples[i : i + 3]])
        for i in range(0, 13, 3)
    ]
    loader.insert(2, ([], [], []))  # a batch whose samples were all unreadable
    timings = {}
    cat_ids = sorted(c["id"] for c in gt["categories"])
    results = inference_on_dataset(model, loader, Accelerator(cpu=True), cat_ids, timings=timings)
    assert model.training  # mode restored
    assert timings["images"] == 13 and timings["model_s"] > 0 and timings["evaluator_s"] > 0
    num_anns = len(gt["annotations"])
    assert len(results) == num_anns  # the repeated image once
    assert {r["image_id"] for r in results} <= {im["id"] for im in gt["images"]}
    m = evaluate_lvis(gt, results)
    assert m["bbox"]["AP"] == 1.0 and m["segm"]["AP"] == 1.0


_TWO_RANKS = """
import json, sys
import torch
from accelerate import Accelerator
from test_evaluation import _OracleModel, make_lvis_gt
from divergen.evaluation import inference_on_dataset

acc = Accelerator(cpu=True)
gt = make_lvis_gt(8, num_images=11)
ims = gt["images"]
# Rank r takes images r, r + 2, ...: 6 and 5, so rank 1 repeats image 0 as a distributed sampler pads a shard.
mine = ims[acc.process_index :: 2] + ([ims[0]] if acc.process_index == 1 else [])
loader = [([torch.full((3, im["height"], im["width"]), float(im["id"]))], [{}],
           [{"image_id": im["id"], "orig_size": (im["height"], im["width"])}]) for im in mine]
res = inference_on_dataset(_OracleModel(gt), loader, acc, sorted(c["id"] for c in gt["categories"]))
with open(sys.argv[1] + f".{acc.process_index}", "w") as f:
    json.dump({"world": acc.num_processes, "results": res}, f)
# Tear gloo down in step on both ranks: a rank exiting while the other still holds the group can abort.
acc.wait_for_everyone()
torch.distributed.destroy_process_group()
"""


@pytest.mark.slow
def test_inference_gathers_two_ranks_without_duplicates(tmp_path):
    script = tmp_path / "two_ranks.py"
    script.write_text(_TWO_RANKS)
    here = Path(__file__).resolve().parent
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(here), str(here.parent)])}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        str(script),
    ]
    proc = subprocess.run([*cmd, str(tmp_path / "out")], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rank0 = json.loads((tmp_path / "out.0").read_text())
    rank1 = json.loads((tmp_path / "out.1").read_text())
    assert rank0["world"] == 2 and rank1["results"] is None
    gt = make_lvis_gt(8, num_images=11)
    assert len(rank0["results"]) == len(gt["annotations"])  # every image once, the padded repeat dropped
    m = evaluate_lvis(gt, rank0["results"])
    assert m["bbox"]["AP"] == 1.0 and m["segm"]["AP"] == 1.0
