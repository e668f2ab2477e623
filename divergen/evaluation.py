"""Inference over a dataset, LVIS results JSON, and LVIS / COCO AP of the detector's outputs (issue 3 item 4).

LVIS AP is :func:`divergen.lvis_eval.evaluate_lvis`, our exact and fast reimplementation of the lvis-api
evaluator (federated: only the categories of an image's positive and negative sets count; 300 detections per
image; APr / APc / APf), re-exported here. COCO AP is pycocotools' ``COCOeval`` as it is.
:func:`run_evaluation` is one evaluation pass over the configured validation set (``evaluate.py`` and the
training engine call it).

Conventions: metrics are fractions in [0, 1]; a summary number that has no category to average over is -1
(the lvis-api / pycocotools convention); a category without ground truth has per-category AP NaN (``null``
in the JSON written by :func:`save_metrics`).
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import logging
import math
import os
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pycocotools.mask as mask_util
import torch
from torch import Tensor

# Re-exported: the LVIS evaluator lives in lvis_eval.py; callers and tests import it from here too.
from .lvis_eval import AREA_RNGS as AREA_RNGS
from .lvis_eval import FREQUENCIES as FREQUENCIES
from .lvis_eval import IOU_THRS as IOU_THRS
from .lvis_eval import IOU_TYPES as IOU_TYPES
from .lvis_eval import LVIS_SUMMARY_KEYS as LVIS_SUMMARY_KEYS
from .lvis_eval import REC_THRS as REC_THRS
from .lvis_eval import _load_json, _per_category_ap
from .lvis_eval import _precision_recall as _precision_recall
from .lvis_eval import evaluate_lvis as evaluate_lvis
from .lvis_eval import greedy_match as greedy_match

logger = logging.getLogger(__name__)

COCO_SUMMARY_KEYS = ("AP", "AP50", "AP75", "APs", "APm", "APl")


# ----------------------------------------------------------------------------------------------------------
# Detections -> results JSON
# ----------------------------------------------------------------------------------------------------------


def to_lvis_results(
    outputs: Sequence[Mapping[str, Tensor]],
    image_ids: Sequence[int],
    category_ids: Sequence[int],
    max_dets: int = 300,
) -> list[dict[str, Any]]:
    """The model's per-image detections as LVIS / COCO results (one dict per detection).

    Arguments:
        outputs: per image ``boxes`` (K, 4) xyxy pixels of the image the ids refer to, ``scores`` (K,),
            ``labels`` (K,) 0-based contiguous, optional ``masks`` (K, H, W) bool at that image's size.
        image_ids: the dataset's image id of each output.
        category_ids: the dataset category id of each contiguous label (``category_ids[label]``).
        max_dets: keep the ``max_dets`` highest-scoring detections per image (ties keep the earlier one).

    Returns:
        ``{"image_id", "category_id", "bbox": [x, y, w, h], "score", "segmentation": RLE}`` per detection, RLE
        ``counts`` as str (JSON-ready); no ``segmentation`` when the outputs have no ``masks``.
    """
    if len(outputs) != len(image_ids):
        raise ValueError(f"to_lvis_results: {len(outputs)} outputs but {len(image_ids)} image ids")
    cat_ids = [int(c) for c in category_ids]
    results: list[dict[str, Any]] = []
    for out, image_id in zip(outputs, image_ids, strict=True):
        scores = out["scores"].detach().float().cpu()
        order = torch.argsort(scores, descending=True, stable=True)[: max(max_dets, 0)]
        labels = out["labels"].detach().cpu()[order].tolist()
        if labels and not 0 <= min(labels) <= max(labels) < len(cat_ids):
            raise ValueError(
                f"to_lvis_results: image {image_id}: labels must lie in [0, {len(cat_ids)}) (one per "
                f"category id), got {min(labels)}..{max(labels)}"
            )
        boxes = out["boxes"].detach().float().cpu()[order]
        xywh = torch.cat([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], dim=1).tolist()
        rles: list[dict[str, Any]] | None = None
        if "masks" in out:
            rles = encode_masks(out["masks"].detach().cpu()[order])
        for i, (label, box, score) in enumerate(zip(labels, xywh, scores[order].tolist(), strict=True)):
            res = {"image_id": int(image_id), "category_id": cat_ids[label], "bbox": box, "score": score}
            if rles is not None:
                res["segmentation"] = rles[i]
            results.append(res)
    return results


def encode_masks(masks: Tensor) -> list[dict[str, Any]]:
    """``(K, H, W)`` bool masks -> K compressed COCO RLEs ``{"size": [H, W], "counts": str}``."""
    if masks.ndim != 3:
        raise ValueError(f"encode_masks: expected (K, H, W) masks, got shape {tuple(masks.shape)}")
    if len(masks) == 0:
        return []
    # pycocotools reads column-major uint8 (H, W, K).
    rles = mask_util.encode(np.asfortranarray(masks.to(torch.uint8).permute(1, 2, 0).numpy()))
    for rle in rles:
        rle["counts"] = rle["counts"].decode("ascii")
    return rles


def save_results(results: list[dict[str, Any]], path: str | os.PathLike) -> None:
    """Write LVIS / COCO results JSON atomically (write, then rename)."""
    _write_json_atomic(results, Path(path))


# ----------------------------------------------------------------------------------------------------------
# COCO evaluation
# ----------------------------------------------------------------------------------------------------------


def evaluate_coco(
    gt: str | os.PathLike | Mapping[str, Any],
    results: Sequence[Mapping[str, Any]],
    iou_types: Sequence[str] = IOU_TYPES,
    max_dets: int = 100,
) -> dict[str, dict[str, Any]]:
    """COCO AP of ``results`` via pycocotools ``COCOeval`` (COCO-format data: no federated fields).

    Arguments:
        gt: COCO JSON path or its loaded dict.
        results: detections as :func:`to_lvis_results` returns them.
        iou_types: any of "bbox" and "segm".
        max_dets: the largest of COCOeval's ``maxDets`` (1, 10, max_dets); AP is reported at it.

    Returns:
        per IoU type ``AP, AP50, AP75, APs, APm, APl``, ``AR@1``, ``AR@10``, ``AR@{max_dets}``,
        ``AR{s,m,l}@...`` and ``per_category``: {category name: AP} (NaN without ground truth).
    """
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    gt = _load_json(gt)
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress
        coco_gt = COCO()
        coco_gt.dataset = copy.deepcopy(dict(gt))  # COCOeval rewrites annotations in place
        coco_gt.createIndex()
    metrics = {}
    for iou_type in iou_types:
        if iou_type not in IOU_TYPES:
            raise ValueError(f"evaluate_coco: iou_type must be one of {IOU_TYPES}, got {iou_type!r}")
        dets = [dict(r) for r in results]
        if iou_type == "segm":
            # As detectron2's COCOEvaluator: without "bbox", the mask area decides small / medium / large.
            for r in dets:
                r.pop("bbox", None)
        with contextlib.redirect_stdout(io.StringIO()):
            if dets:
                coco_dt = coco_gt.loadRes(dets)
            else:  # loadRes cannot take an empty list
                coco_dt = COCO()
                coco_dt.dataset = {"images": gt["images"], "categories": gt["categories"], "annotations": []}
                coco_dt.createIndex()
            ev = COCOeval(coco_gt, coco_dt, iou_type)
            ev.params.maxDets = [1, 10, max_dets]
            ev.evaluate()
            ev.accumulate()
            ev.summarize()
        s = ev.stats
        out: dict[str, Any] = dict(zip(COCO_SUMMARY_KEYS, map(float, s[:6]), strict=True))
        for key, v in zip(("AR@1", "AR@10", f"AR@{max_dets}"), s[6:9], strict=True):
            out[key] = float(v)
        for key, v in zip(("ARs", "ARm", "ARl"), s[9:12], strict=True):
            out[f"{key}@{max_dets}"] = float(v)
        names = [coco_gt.cats[c].get("name", str(c)) for c in ev.params.catIds]
        out["per_category"] = _per_category_ap(ev.eval["precision"][:, :, :, 0, -1], names)
        metrics[iou_type] = out
    return metrics


# ----------------------------------------------------------------------------------------------------------
# Reporting
# ----------------------------------------------------------------------------------------------------------


def format_table(metrics: Mapping[str, Mapping[str, Any]]) -> str:
    """A readable table: one row per IoU type, one column per summary metric, in percent ("-": undefined)."""
    keys: list[str] = []
    for m in metrics.values():
        keys += [k for k in m if k != "per_category" and k not in keys]
    rows = [["", *keys]]
    for iou_type, m in metrics.items():
        rows.append([iou_type, *(_pct(m.get(k)) for k in keys)])
    widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]))]
    lines = ["  ".join(cell.rjust(w) for cell, w in zip(r, widths, strict=True)) for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _pct(v: float | None) -> str:
    return "-" if v is None or v < 0 or math.isnan(v) else f"{100 * v:.2f}"


def save_metrics(metrics: Mapping[str, Any], path: str | os.PathLike) -> None:
    """Write the metrics (per-category AP included) as JSON, NaN as ``null``; atomic (write, then rename)."""
    _write_json_atomic(_nan_to_none(metrics), Path(path))


def _nan_to_none(x: Any) -> Any:
    if isinstance(x, Mapping):
        return {k: _nan_to_none(v) for k, v in x.items()}
    if isinstance(x, float) and math.isnan(x):
        return None
    return x


def _write_json_atomic(obj: Any, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        json.dump(obj, f, allow_nan=False)
    os.replace(tmp, path)


# ----------------------------------------------------------------------------------------------------------
# Inference over a dataset
# ----------------------------------------------------------------------------------------------------------


@torch.no_grad()
def inference_on_dataset(
    model: torch.nn.Module,
    loader: Iterable[tuple[list[Tensor], list[Any], list[Mapping[str, Any]]]],
    accelerator: Any,
    category_ids: Sequence[int],
    *,
    max_dets: int = 300,
    timings: dict[str, float] | None = None,
) -> list[dict[str, Any]] | None:
    """Run the detector over this rank's shard of a dataset; the LVIS / COCO results of all ranks on rank 0.

    Detections are reported at each image's original size: the model is asked for them there
    (``output_sizes``), i.e. boxes rescaled per axis and masks pasted from the mask head's probabilities
    directly at the original resolution, as detectron2's ``detector_postprocess`` (the official evaluation)
    does, rather than a resize of masks binarised at the test resolution.

    Arguments:
        model: the detector; run in eval mode (its previous mode is restored afterwards).
        loader: batches ``(images, targets, infos)``: ``images`` (3, H, W) test-resized, ``infos[i]`` with
            ``image_id`` and ``orig_size`` (height, width); ``targets`` are not used.
        accelerator: ``accelerate.Accelerator`` (device, rank, gathering).
        category_ids: dataset category id of each contiguous label.
        max_dets: detections kept per image.
        timings: if given, filled with this rank's ``model_s`` (forward, device synchronised), ``evaluator_s``
            (conversion to results, mask encoding), ``images`` and ``gather_s``.

    Returns:
        On the main process the results of every image of every rank, each image once (samples repeated to
        even out the ranks' shards are dropped by image id); None on the other processes.
    """
    from tqdm.auto import tqdm

    device = accelerator.device
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    was_training = model.training
    model.eval()
    per_image: list[tuple[int, list[dict[str, Any]]]] = []
    model_s = evaluator_s = 0.0
    try:
        progress = tqdm(loader, desc="inference", disable=not accelerator.is_main_process, dynamic_ncols=True)
        for images, _targets, infos in progress:
            if not images:  # every sample of the batch was unreadable (the collate drops them)
                continue
            sizes = [tuple(int(v) for v in info["orig_size"]) for info in infos]
            images = [im.to(device, non_blocking=True) for im in images]
            sync()
            t0 = time.perf_counter()
            outputs = model(images, output_sizes=sizes)
            sync()
            t1 = time.perf_counter()
            for out, info in zip(outputs, infos, strict=True):
                image_id = int(info["image_id"])
                per_image.append((image_id, to_lvis_results([out], [image_id], category_ids, max_dets)))
            t2 = time.perf_counter()
            model_s += t1 - t0
            evaluator_s += t2 - t1
            progress.set_postfix(model_s=f"{model_s / len(per_image):.3f}/img", refresh=False)
    finally:
        model.train(was_training)
    t3 = time.perf_counter()
    gathered = _gather_on_main(per_image, accelerator)
    gather_s = time.perf_counter() - t3
    n = len(per_image)
    logger.info(
        "inference: %d images on this rank, model %.3f s/img, evaluator %.3f s/img, gather %.1f s",
        n, model_s / max(n, 1), evaluator_s / max(n, 1), gather_s,
    )  # fmt: skip
    if timings is not None:
        timings.update(model_s=model_s, evaluator_s=evaluator_s, images=float(n), gather_s=gather_s)
    if gathered is None:
        return None
    by_image: dict[int, list[dict[str, Any]]] = {}
    for image_id, res in gathered:
        by_image.setdefault(image_id, res)  # the first copy of an image seen twice
    return [r for res in by_image.values() for r in res]


def _gather_on_main(obj: list[Any], accelerator: Any) -> list[Any] | None:
    """Concatenate every rank's list on the main process (None elsewhere).

    ``torch.distributed.gather_object`` to rank 0 rather than Accelerate's ``gather_object`` (an all-gather):
    the results of LVIS val (~6M detections with RLEs, GBs pickled) then exist once, not once per rank.
    """
    import torch.distributed as dist

    if accelerator.num_processes == 1 or not (dist.is_available() and dist.is_initialized()):
        return obj
    parts: list[Any] | None = [None] * accelerator.num_processes if accelerator.is_main_process else None
    dist.gather_object(obj, parts, dst=0)
    if not accelerator.is_main_process:
        return None
    return [x for part in parts for x in part]


# ----------------------------------------------------------------------------------------------------------
# One evaluation pass over the configured validation set
# ----------------------------------------------------------------------------------------------------------


def run_evaluation(
    model: torch.nn.Module,
    cfg: Any,
    accelerator: Any,
    output_dir: str | os.PathLike,
    *,
    timings: dict[str, float] | None = None,
) -> dict[str, dict[str, Any]] | None:
    """Evaluate ``model`` on ``cfg.data.val_json``: sharded inference, results and metrics files, AP.

    The validation set is read without masks (the evaluator takes its ground truth from the JSON), resized as
    at test time (``ResizeShortestEdge(cfg.data.test_short_edge, cfg.data.test_max_size)``), and split into
    one contiguous shard per process (``build_test_loader``); detections are reported at the original image
    size (:func:`inference_on_dataset`). The ground truth decides the protocol: LVIS (federated,
    :func:`evaluate_lvis`) when its images carry ``neg_category_ids``, else COCO (:func:`evaluate_coco`, at
    COCO's 100 detections per image).

    Arguments:
        model: the detector, possibly wrapped by ``accelerator.prepare`` (unwrapped here; its train / eval
            mode is restored afterwards).
        cfg: a ``Config``: ``data.val_json``, ``data.val_image_root``, ``data.test_short_edge``,
            ``data.test_max_size``, ``data.num_workers``, ``eval.batch_size`` (images per process),
            ``eval.max_dets``, ``model.roi_heads.mask_on`` (evaluate ``segm`` too).
        accelerator: ``accelerate.Accelerator``; every process must call this function.
        output_dir: where the main process writes ``results.json`` (LVIS results) and ``metrics.json``.
        timings: if given, filled on the main process with ``model_s``, ``evaluator_s``, ``images``,
            ``gather_s`` (:func:`inference_on_dataset`, this rank) and ``eval_s`` (the AP computation).

    Returns:
        On the main process ``{iou_type: metrics}`` as :func:`evaluate_lvis` / :func:`evaluate_coco` return
        them; None on the other processes. All processes return together.
    """
    from .data import DetectionDataset, ResizeShortestEdge, build_test_loader

    val_json = Path(cfg.data.val_json)
    if not val_json.is_file():
        raise FileNotFoundError(f"data.val_json: the validation annotation file {val_json} does not exist")
    dataset = DetectionDataset(
        val_json,
        cfg.data.val_image_root,
        transform=ResizeShortestEdge(short_edge=cfg.data.test_short_edge, max_size=cfg.data.test_max_size),
        filter_empty=False,  # every image counts: false positives on an image without objects are errors too
        load_masks=False,
    )
    model = accelerator.unwrap_model(model)
    num_classes = getattr(getattr(model, "roi_heads", None), "test_num_classes", None)
    if num_classes is not None and num_classes != dataset.categories.num_classes:
        raise ValueError(
            f"the model scores {num_classes} classes at test time but {val_json} has "
            f"{dataset.categories.num_classes} categories (labels are indices into the file's categories sorted "
            "by id): set model.num_classes, or model.roi_heads.test_num_classes for a model trained on extra "
            "classes"
        )
    loader = build_test_loader(
        dataset,
        batch_size=cfg.eval.batch_size,
        num_workers=cfg.data.num_workers,
        rank=accelerator.process_index,
        world_size=accelerator.num_processes,
    )
    run_timings: dict[str, float] = {}
    results = inference_on_dataset(
        model, loader, accelerator, dataset.categories.ids, max_dets=cfg.eval.max_dets, timings=run_timings
    )
    if dataset.num_skipped:
        logger.warning(
            "evaluation: %d unreadable images skipped (no detections for them)", dataset.num_skipped
        )
    metrics = None
    if results is not None:
        t0 = time.perf_counter()
        output_dir = Path(output_dir)
        save_results(results, output_dir / "results.json")
        gt = _load_json(val_json)
        iou_types = ("bbox", "segm") if cfg.model.roi_heads.mask_on else ("bbox",)
        if gt["images"] and all("neg_category_ids" in img for img in gt["images"]):
            metrics = evaluate_lvis(gt, results, iou_types, max_dets=cfg.eval.max_dets)
            protocol = "LVIS"
        else:
            metrics = evaluate_coco(gt, results, iou_types, max_dets=100)
            protocol = "COCO"
        save_metrics(metrics, output_dir / "metrics.json")
        run_timings["eval_s"] = time.perf_counter() - t0
        logger.info(
            "%s AP of %s on %d images (%.1f s inference, %.1f s evaluation), written to %s:\n%s",
            protocol, val_json, len(dataset), run_timings["model_s"], run_timings["eval_s"], output_dir,
            format_table(metrics),
        )  # fmt: skip
        if timings is not None:
            timings.update(run_timings)
    accelerator.wait_for_everyone()
    return metrics
