"""LVIS AP (box and mask), exactly as the lvis-api evaluator defines it, vectorised (issue 3 item 4).

Our own implementation of ``lvis`` 0.5.3 (``LVISResults`` + ``LVISEval``): that package fails under numpy 2
(``np.float``) and needs ~20 min for LVIS val on one core, in Python loops over (image, category, area range,
threshold, detection, ground truth). Here the greedy matching runs over all (image, category) pairs at once,
one detection rank at a time, with IoUs from the same ``pycocotools.mask.iou``, so every number equals the
reference's (tested against the ``lvis`` package; bit-exact in practice). ``divergen.evaluation`` re-exports
:func:`evaluate_lvis` and runs it on a model's detections.

The LVIS protocol (Gupta et al., "LVIS", CVPR 2019, §4 and lvis-api ``eval.py``), as implemented below:

- Detections are capped to the ``max_dets`` (300) highest-scoring per image, over all categories, before
  anything else (``LVISResults.limit_dets_per_image``).
- Federated evaluation: in an image, only the categories of its positive set (those with a ground-truth
  annotation) and of its ``neg_category_ids`` are evaluated; detections of any other category are dropped.
  Unmatched detections of a category in the image's ``not_exhaustive_category_ids`` are ignored, not false
  positives.
- Greedy matching per (image, category) in descending score order at IoU thresholds 0.50:0.05:0.95; ground
  truth outside the area range is "ignored" (matching it makes the detection ignored, not a TP); unmatched
  detections outside the area range are ignored. Area ranges all / small (< 32²) / medium / large (> 96²).
- Precision at 101 recall points with the interpolated (monotone) precision envelope; AP is the mean over
  thresholds, recall points and the categories with ground truth; APr / APc / APf over the categories whose
  ``frequency`` in the ground-truth file is r / c / f.
- Annotations (and detections) with area 0 are left out, as lvis-api's ``get_ann_ids`` does.
- Mask AP uses each detection's *mask* area for the area ranges: detectron2's ``LVISEvaluator`` (which
  produced the papers' numbers) drops ``bbox`` from the results before ``segm`` evaluation for that reason.

Conventions: metrics are fractions in [0, 1]; a summary number that has no category to average over is -1
(the lvis-api / pycocotools convention); a category without ground truth has per-category AP NaN (``null``
in the JSON written by ``evaluation.save_metrics``).
"""

from __future__ import annotations

import json
import math
import os
from collections import defaultdict
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pycocotools.mask as mask_util

# lvis-api / pycocotools parameters. linspace, not arange: arange's points are slightly off, and AP50 / AP75
# are looked up by equality with these values.
IOU_THRS = np.linspace(0.5, 0.95, int(np.round((0.95 - 0.5) / 0.05)) + 1, endpoint=True)
REC_THRS = np.linspace(0.0, 1.00, int(np.round((1.00 - 0.0) / 0.01)) + 1, endpoint=True)
AREA_RNGS = {
    "all": (0.0, 1e5**2),
    "small": (0.0, 32.0**2),
    "medium": (32.0**2, 96.0**2),
    "large": (96.0**2, 1e5**2),
}
FREQUENCIES = ("r", "c", "f")
LVIS_SUMMARY_KEYS = ("AP", "AP50", "AP75", "APs", "APm", "APl", "APr", "APc", "APf")
IOU_TYPES = ("bbox", "segm")


# ----------------------------------------------------------------------------------------------------------
# LVIS evaluation
# ----------------------------------------------------------------------------------------------------------


def evaluate_lvis(
    gt: str | os.PathLike | Mapping[str, Any],
    results: Sequence[Mapping[str, Any]],
    iou_types: Sequence[str] = IOU_TYPES,
    max_dets: int = 300,
) -> dict[str, dict[str, Any]]:
    """LVIS AP of ``results`` against the LVIS-format ground truth ``gt``; the lvis-api definition exactly.

    Arguments:
        gt: LVIS v1 JSON path or its loaded dict (``images`` with ``neg_category_ids`` and
            ``not_exhaustive_category_ids``, ``annotations`` with ``area``, ``categories`` with
            ``frequency``).
        results: detections as :func:`to_lvis_results` returns them (or loaded from a results JSON).
        iou_types: any of "bbox" and "segm".
        max_dets: detections kept per image (top-scoring, over all categories); negative keeps all.

    Returns:
        per IoU type: ``AP, AP50, AP75, APs, APm, APl, APr, APc, APf``, ``AR@{max_dets}`` and
        ``AR{s,m,l}@...`` as lvis-api reports them, and ``per_category``: {category name: AP} (NaN without
        ground truth).
    """
    gt = _load_json(gt)
    data = _LVISGroundTruth(gt)
    dets = _cap_per_image(list(results), max_dets)
    metrics = {}
    for iou_type in iou_types:
        if iou_type not in IOU_TYPES:
            raise ValueError(f"evaluate_lvis: iou_type must be one of {IOU_TYPES}, got {iou_type!r}")
        metrics[iou_type] = _evaluate_lvis_one(data, dets, iou_type, max_dets)
    return metrics


class _LVISGroundTruth:
    """Index of an LVIS-format ground truth: images and categories sorted by id, annotations as arrays."""

    def __init__(self, gt: Mapping[str, Any]):
        for key in ("images", "annotations", "categories"):
            if key not in gt:
                raise ValueError(f"LVIS ground truth: missing top-level key {key!r}")
        self.img_ids = np.unique([img["id"] for img in gt["images"]])
        self.img_index = {int(i): k for k, i in enumerate(self.img_ids)}
        cats = sorted(gt["categories"], key=lambda c: c["id"])
        self.cat_ids = [c["id"] for c in cats]
        self.cat_names = [c.get("name", str(c["id"])) for c in cats]
        self.cat_index = {c: k for k, c in enumerate(self.cat_ids)}
        self.freq_groups: list[list[int]] = [[] for _ in FREQUENCIES]
        for k, cat in enumerate(cats):
            if cat.get("frequency") not in FREQUENCIES:
                raise ValueError(
                    f"LVIS ground truth: category {cat['id']} needs 'frequency' in {FREQUENCIES}, got "
                    f"{cat.get('frequency')!r}"
                )
            self.freq_groups[FREQUENCIES.index(cat["frequency"])].append(k)
        num_cats = len(cats)
        # (image, category) pairs as one int key: img_index * num_cats + cat_index.
        self.num_cats = num_cats
        self.neg_keys, self.nel_keys = [], []
        img_hw = {}
        for img in gt["images"]:
            for name, out in (
                ("neg_category_ids", self.neg_keys),
                ("not_exhaustive_category_ids", self.nel_keys),
            ):
                if name not in img:
                    raise ValueError(f"LVIS ground truth: image {img['id']} has no {name!r} (a COCO file?)")
                ii = self.img_index[int(img["id"])]
                out.extend(ii * num_cats + self.cat_index[c] for c in img[name] if c in self.cat_index)
            img_hw[int(img["id"])] = (img["height"], img["width"])
        self.img_hw = img_hw
        # lvis-api get_ann_ids keeps annotations of known images and categories with 0 < area < inf.
        anns = [
            a
            for a in gt["annotations"]
            if int(a["image_id"]) in self.img_index
            and a["category_id"] in self.cat_index
            and 0 < a["area"] < math.inf
        ]
        self.anns = anns
        self.gt_key = np.array(
            [self.img_index[int(a["image_id"])] * num_cats + self.cat_index[a["category_id"]] for a in anns],
            dtype=np.int64,
        )
        self.gt_area = np.array([a["area"] for a in anns], dtype=np.float64)
        self.gt_ignore = np.array([bool(a.get("ignore", 0)) for a in anns], dtype=bool)
        self.pos_keys = np.unique(self.gt_key)
        self._gt_rles: list[dict[str, Any]] | None = None

    def gt_regions(self, iou_type: str) -> np.ndarray | list[dict[str, Any]]:
        """Annotation boxes ``(N, 4)`` xywh float64 or RLEs, in ``self.anns`` order."""
        if iou_type == "bbox":
            return np.array([a["bbox"] for a in self.anns], dtype=np.float64).reshape(-1, 4)
        if self._gt_rles is None:
            self._gt_rles = [self._to_rle(a) for a in self.anns]
        return self._gt_rles

    def _to_rle(self, ann: Mapping[str, Any]) -> dict[str, Any]:
        """lvis-api ``ann_to_rle``: polygons (merged) or uncompressed RLE -> compressed RLE."""
        h, w = self.img_hw[int(ann["image_id"])]
        segm = ann["segmentation"]
        if isinstance(segm, list):
            return mask_util.merge(mask_util.frPyObjects(segm, h, w))
        if isinstance(segm["counts"], list):
            return mask_util.frPyObjects(segm, h, w)
        return segm


def _cap_per_image(results: list[Mapping[str, Any]], max_dets: int) -> list[Mapping[str, Any]]:
    """lvis-api ``limit_dets_per_image``: the ``max_dets`` top-scoring detections of each image (stable on
    ties), results regrouped by image in order of first appearance."""
    by_image: dict[int, list[Mapping[str, Any]]] = defaultdict(list)
    for r in results:
        by_image[r["image_id"]].append(r)
    out = []
    for dets in by_image.values():
        if 0 <= max_dets < len(dets):
            dets = sorted(dets, key=lambda r: r["score"], reverse=True)[:max_dets]
        out.extend(dets)
    return out


def _evaluate_lvis_one(
    data: _LVISGroundTruth, results: list[Mapping[str, Any]], iou_type: str, max_dets: int
) -> dict[str, Any]:
    num_cats = data.num_cats
    num_areas, num_thrs = len(AREA_RNGS), len(IOU_THRS)
    areas = np.array(list(AREA_RNGS.values()))  # (A, 2)

    # ---- detections: arrays, filtered as lvis-api's LVISResults + get_ann_ids + federated _prepare ----
    unknown = {r["image_id"] for r in results} - set(data.img_index)
    if unknown:
        raise ValueError(
            f"evaluate_lvis: results for images not in the ground truth, e.g. {sorted(unknown)[:5]}"
        )
    field = "bbox" if iou_type == "bbox" else "segmentation"
    if results and any(field not in r for r in results):
        raise ValueError(f"evaluate_lvis: {iou_type} evaluation needs {field!r} in every result")
    keep = [i for i, r in enumerate(results) if r["category_id"] in data.cat_index]
    dt_regions: np.ndarray | list[dict[str, Any]]
    if iou_type == "bbox":
        dt_regions = np.array([results[i]["bbox"] for i in keep], dtype=np.float64).reshape(-1, 4)
        dt_area = dt_regions[:, 2] * dt_regions[:, 3]
    else:
        dt_regions = [results[i]["segmentation"] for i in keep]
        dt_area = _mask_areas(dt_regions)
    dt_img = np.array([data.img_index[results[i]["image_id"]] for i in keep], dtype=np.int64)
    dt_cat = np.array([data.cat_index[results[i]["category_id"]] for i in keep], dtype=np.int64)
    dt_key = dt_img * num_cats + dt_cat
    dt_score = np.array([results[i]["score"] for i in keep], dtype=np.float64)
    federated = np.isin(dt_key, data.pos_keys) | np.isin(dt_key, np.asarray(data.neg_keys, dtype=np.int64))
    sel = np.flatnonzero(federated & (dt_area > 0) & (dt_area < math.inf))
    # Evaluation order: by pair, then descending score, then results order (lvis-api sorts with mergesort).
    sel = sel[np.lexsort((sel, -dt_score[sel], dt_key[sel]))]
    dt_key, dt_score, dt_area = dt_key[sel], dt_score[sel], dt_area[sel]
    dt_regions = dt_regions[sel] if iou_type == "bbox" else [dt_regions[i] for i in sel]

    gt_order = np.argsort(data.gt_key, kind="stable")
    gt_key = data.gt_key[gt_order]
    gt_all = data.gt_regions(iou_type)
    gt_regions = gt_all[gt_order] if iou_type == "bbox" else [gt_all[i] for i in gt_order]
    gt_area, gt_ign = data.gt_area[gt_order], data.gt_ignore[gt_order]
    # (G, A): ground truth ignored in each area range (lvis-api evaluate_img; bounds inclusive).
    gt_ignore = gt_ign[:, None] | (gt_area[:, None] < areas[:, 0]) | (gt_area[:, None] > areas[:, 1])

    # ---- per (image, category) pair: IoU with pycocotools, then greedy matching of all pairs at once ----
    pair_keys = np.union1d(gt_key, dt_key)
    dt_start, dt_end = np.searchsorted(dt_key, pair_keys, "left"), np.searchsorted(dt_key, pair_keys, "right")
    gt_start, gt_end = np.searchsorted(gt_key, pair_keys, "left"), np.searchsorted(gt_key, pair_keys, "right")
    both = np.flatnonzero((dt_end > dt_start) & (gt_end > gt_start))
    ious = []
    for p in both:
        d, g = slice(dt_start[p], dt_end[p]), slice(gt_start[p], gt_end[p])
        iou = mask_util.iou(dt_regions[d], gt_regions[g], [0] * (g.stop - g.start))  # no crowd in LVIS
        ious.append(np.asarray(iou, dtype=np.float64).reshape(d.stop - d.start, g.stop - g.start))
    dt_matched, dt_ignored = greedy_match(
        ious, [gt_ignore[gt_start[p] : gt_end[p]].T for p in both], dt_start[both], len(dt_key)
    )

    # Unmatched detections outside the area range, or of a not-exhaustively annotated category, are ignored.
    dt_out_of_range = (dt_area[:, None] < areas[:, 0]) | (dt_area[:, None] > areas[:, 1])  # (D, A)
    not_exhaustive = np.isin(dt_key, np.asarray(data.nel_keys, dtype=np.int64))
    dt_ignored |= ~dt_matched & (dt_out_of_range | not_exhaustive[:, None])[:, :, None]
    tps = dt_matched & ~dt_ignored  # (D, A, T)
    fps = ~dt_matched & ~dt_ignored

    # ---- accumulate per category and area range (lvis-api accumulate) ----
    dt_cat, gt_cat = dt_key % num_cats, gt_key % num_cats
    dt_img = dt_key // num_cats
    # Within a category: descending score, then image id, then results order (lvis-api concatenates per image
    # and then sorts stably).
    order = np.lexsort((sel, dt_img, -dt_score, dt_cat))
    cat_start = np.searchsorted(dt_cat[order], np.arange(num_cats + 1))
    num_gt = np.zeros((num_cats, num_areas), dtype=np.int64)
    np.add.at(num_gt, gt_cat, ~gt_ignore)
    precision = -np.ones((num_thrs, len(REC_THRS), num_cats, num_areas))
    recall = -np.ones((num_thrs, num_cats, num_areas))
    for k in range(num_cats):
        idx = order[cat_start[k] : cat_start[k + 1]]
        for a in range(num_areas):
            if num_gt[k, a] == 0:
                continue
            precision[:, :, k, a], recall[:, k, a] = _precision_recall(
                tps[idx, a].T, fps[idx, a].T, num_gt[k, a]
            )

    return _summarize_lvis(precision, recall, data, max_dets)


def _mask_areas(rles: list[dict[str, Any]]) -> np.ndarray:
    """``(N,)`` float64 pixel areas of RLEs. In chunks of 255: pycocotools 2.0.x ``area`` overflows a uint8
    scratch array for longer lists under numpy 2."""
    chunks = [mask_util.area(rles[i : i + 255]) for i in range(0, len(rles), 255)]
    return np.concatenate(chunks).astype(np.float64) if chunks else np.zeros(0)


def greedy_match(
    ious: Sequence[np.ndarray], gt_ignore: Sequence[np.ndarray], dt_offsets: Sequence[int], num_dets: int
) -> tuple[np.ndarray, np.ndarray]:
    """COCO / LVIS greedy matching of many (image, category) pairs at once, at every area range and threshold.

    Per pair, per area range and IoU threshold t, detections in descending score order each take the unmatched
    ground truth with the highest IoU >= t; a non-ignored ground truth beats any ignored one; among equal IoUs
    the later ground truth wins (lvis-api / pycocotools ``evaluateImg`` loops exactly so). Pairs are grouped
    by their number of ground truths (padded to a power of two) and stepped through one detection rank at a
    time, vectorised over the pairs, area ranges and thresholds.

    Arguments:
        ious: per pair ``(D_p, G_p)`` IoU, detections by descending score, D_p, G_p >= 1.
        gt_ignore: per pair ``(A, G_p)`` bool, the ground truth ignored in each area range.
        dt_offsets: per pair, the index of its first detection in the flat output (its D_p rows follow).
        num_dets: rows of the output.

    Returns:
        ``matched`` and ``matched_ignored`` ``(num_dets, A, T)`` bool: detection matched at (area range,
        threshold), and matched to an ignored ground truth. Rows of no pair stay False.
    """
    num_areas, num_thrs = len(AREA_RNGS), len(IOU_THRS)
    thrs = np.minimum(IOU_THRS, 1 - 1e-10)
    matched_out = np.zeros((num_dets, num_areas, num_thrs), dtype=bool)
    ignored_out = np.zeros_like(matched_out)
    if not len(ious):
        return matched_out, ignored_out
    num_gt = np.array([x.shape[1] for x in ious])
    num_dt = np.array([x.shape[0] for x in ious])
    padded = 1 << np.ceil(np.log2(num_gt)).astype(np.int64)
    for width in np.unique(padded):
        pairs = np.flatnonzero(padded == width)
        pairs = pairs[np.argsort(-num_dt[pairs], kind="stable")]  # longest first: active pairs are a prefix
        lengths = num_dt[pairs]
        starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
        rows = np.full((lengths.sum(), width), -1.0)  # padding IoU -1 never reaches a threshold
        ignore = np.zeros((len(pairs), num_areas, width), dtype=bool)
        for j, p in enumerate(pairs):
            d, g = ious[p].shape
            rows[starts[j] : starts[j] + d, :g] = ious[p]
            ignore[j, :, :g] = gt_ignore[p]
        out_rows = np.concatenate([np.arange(dt_offsets[p], dt_offsets[p] + num_dt[p]) for p in pairs])
        taken = np.zeros((len(pairs), num_areas, num_thrs, width), dtype=bool)
        active = np.searchsorted(-lengths, -np.arange(lengths[0]), side="left")  # pairs with > r detections
        for r, n in enumerate(active):
            iou = rows[starts[:n] + r][:, None, None, :]  # (n, 1, 1, W)
            ok = ~taken[:n] & (iou >= thrs[:, None])  # (n, A, T, W)
            ign = ignore[:n, :, None, :]
            regular = ok & ~ign
            cand = np.where(regular.any(-1, keepdims=True), regular, ok & ign)
            # argmax over the reversed axis: the last of equal IoUs.
            best = width - 1 - np.argmax(np.where(cand, iou, -2.0)[..., ::-1], axis=-1)  # (n, A, T)
            found = cand.any(-1)
            i, a, t = np.nonzero(found)
            taken[i, a, t, best[i, a, t]] = True
            dst = out_rows[starts[:n] + r]
            matched_out[dst] = found
            ignored_out[dst] = found & np.take_along_axis(ignore[:n], best, axis=-1)
    return matched_out, ignored_out


def _precision_recall(tps: np.ndarray, fps: np.ndarray, num_gt: int) -> tuple[np.ndarray, np.ndarray]:
    """``(T, D)`` TP / FP flags of one category's detections (descending score) -> precision ``(T, R)`` at the
    101 recall points (interpolated, 0 beyond the last recall) and final recall ``(T,)`` (lvis-api)."""
    tp_sum = np.cumsum(tps, axis=1).astype(np.float64)
    fp_sum = np.cumsum(fps, axis=1).astype(np.float64)
    num_dt = tps.shape[1]
    if num_dt == 0:
        return np.zeros((len(tps), len(REC_THRS))), np.zeros(len(tps))
    rc = tp_sum / num_gt
    pr = tp_sum / (fp_sum + tp_sum + np.spacing(1))
    pr = np.maximum.accumulate(pr[:, ::-1], axis=1)[:, ::-1]  # precision envelope: max to the right
    q = np.zeros((len(tps), len(REC_THRS)))
    for t in range(len(tps)):
        i = np.searchsorted(rc[t], REC_THRS, side="left")
        q[t] = np.where(i < num_dt, pr[t, np.minimum(i, num_dt - 1)], 0.0)
    return q, rc[:, -1]


def _summarize_lvis(
    precision: np.ndarray, recall: np.ndarray, data: _LVISGroundTruth, max_dets: int
) -> dict[str, Any]:
    """lvis-api ``summarize``: means over the entries > -1 of the precision / recall arrays."""
    area_idx = {name: [i] for i, name in enumerate(AREA_RNGS)}

    def mean(s: np.ndarray) -> float:
        s = s[s > -1]
        return float(np.mean(s)) if s.size else -1.0

    out: dict[str, Any] = {
        "AP": mean(precision[:, :, :, area_idx["all"]]),
        "AP50": mean(precision[np.where(IOU_THRS == 0.50)[0]][:, :, :, area_idx["all"]]),
        "AP75": mean(precision[np.where(IOU_THRS == 0.75)[0]][:, :, :, area_idx["all"]]),
        "APs": mean(precision[:, :, :, area_idx["small"]]),
        "APm": mean(precision[:, :, :, area_idx["medium"]]),
        "APl": mean(precision[:, :, :, area_idx["large"]]),
    }
    for name, group in zip(FREQUENCIES, data.freq_groups, strict=True):
        out[f"AP{name}"] = mean(precision[:, :, group, area_idx["all"]])
    out[f"AR@{max_dets}"] = mean(recall[:, :, area_idx["all"]])
    for area in ("small", "medium", "large"):
        out[f"AR{area[0]}@{max_dets}"] = mean(recall[:, :, area_idx[area]])
    out["per_category"] = _per_category_ap(precision[..., 0], data.cat_names)
    return out


def _per_category_ap(precision: np.ndarray, names: Sequence[str]) -> dict[str, float]:
    """``(T, R, K)`` precision (area "all") -> {name: AP}, NaN for a category without ground truth."""
    out = {}
    for k, name in enumerate(names):
        p = precision[:, :, k]
        p = p[p > -1]
        out[name] = float(np.mean(p)) if p.size else float("nan")
    return out


def _load_json(gt: str | os.PathLike | Mapping[str, Any]) -> Mapping[str, Any]:
    if isinstance(gt, Mapping):
        return gt
    with open(gt) as f:
        return json.load(f)
