"""Data-loader throughput (images/s) of the LVIS training pipeline, with masks, on a synthetic LVIS-style set.

    python benchmarks/data.py              # prints a Markdown table
    python benchmarks/data.py --write      # ... and writes the "## data.py" section of benchmarks/RESULTS.md

The set (made in a temp dir, then deleted): 640x480 / 480x640 JPEGs (quality 90, textured background), 10-20
instances each: polygons (32-vertex ellipses, rectangles), ~10% of them as compressed RLE, as in LVIS.
Train = ``train_transform(S)`` (EfficientDet resize-crop, f ~ U(0.1, 2), flip) with masks, through
``build_train_loader`` (repeat-factor sampler, aspect grouping, batch 2). Test = ResizeShortestEdge(800, 1333)
without masks, through ``build_test_loader``. Throughput counts from the first batch on (worker start-up
excluded); "per worker" = total / max(workers, 1). The per-stage split is measured in the main process.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from pycocotools import mask as mask_utils

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from results import write_section  # noqa: E402 (benchmarks/ is on sys.path when run as a script)

from divergen.boxes import nonempty  # noqa: E402
from divergen.data import (  # noqa: E402
    DetectionDataset,
    Geometry,
    RepeatFactorSampler,
    ResizeShortestEdge,
    apply_boxes,
    apply_image,
    build_test_loader,
    build_train_loader,
    decode_masks,
    train_transform,
)


def make_dataset(root: Path, num_images: int, num_classes: int = 20, seed: int = 0) -> Path:
    """Write ``num_images`` JPEGs and an LVIS-format ``train.json`` under ``root``."""
    rng = np.random.default_rng(seed)
    images, anns = [], []
    (root / "train2017").mkdir(parents=True)
    yy, xx = np.mgrid[0:640, 0:640]
    for image_id in range(1, num_images + 1):
        h, w = (480, 640) if image_id % 4 else (640, 480)
        texture = (
            np.sin(xx[:h, :w] / rng.uniform(3, 20)) + np.cos(yy[:h, :w] / rng.uniform(3, 20))
        ) * 40 + 128
        pixels = np.repeat(texture[..., None], 3, axis=2) + rng.normal(0, 8, (h, w, 3))
        for _ in range(rng.integers(10, 21)):
            cx, cy = rng.uniform(0, w), rng.uniform(0, h)
            rx, ry = rng.uniform(8, w / 4), rng.uniform(8, h / 4)
            if rng.random() < 0.5:
                t = np.linspace(0, 2 * np.pi, 32, endpoint=False)
                poly = np.stack([cx + rx * np.cos(t), cy + ry * np.sin(t)], 1)
            else:
                poly = np.array(
                    [[cx - rx, cy - ry], [cx + rx, cy - ry], [cx + rx, cy + ry], [cx - rx, cy + ry]]
                )
            poly = np.clip(poly, 0, [w, h])
            segm = [poly.ravel().round(2).tolist()]
            mask = mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects(segm, h, w))).astype(bool)
            if mask.sum() < 16:
                continue
            pixels[mask] = rng.uniform(0, 255, 3)
            if rng.random() < 0.1:
                rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
                segm = {"size": [h, w], "counts": rle["counts"].decode()}
            x0, y0 = poly.min(0)
            x1, y1 = poly.max(0)
            category = int(min(rng.zipf(1.5), num_classes))  # long-tailed
            bbox = [x0, y0, x1 - x0, y1 - y0]
            anns.append({"id": len(anns) + 1, "image_id": image_id, "category_id": category, "bbox": bbox,
                         "area": float(mask.sum()), "segmentation": segm})  # fmt: skip
        name = f"train2017/{image_id:012d}.jpg"
        Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(root / name, quality=90)
        images.append(
            {"id": image_id, "height": h, "width": w, "coco_url": f"http://images.cocodataset.org/{name}"}
        )
    categories = [{"id": c, "name": f"shape{c}"} for c in range(1, num_classes + 1)]
    path = root / "train.json"
    path.write_text(json.dumps({"images": images, "annotations": anns, "categories": categories}))
    return path


def loader_throughput(make_loader, num_images: int, repeats: int) -> tuple[float, float]:
    """Best-of-``repeats`` images/s, and this process's CPU ms per image in that run (with 0 workers: the
    pipeline's own cost, unaffected by other load on the machine)."""
    best = (0.0, 0.0)
    for _ in range(repeats):
        it = iter(make_loader())
        next(it)  # worker start-up and first batch excluded
        seen, t0, c0 = 0, time.perf_counter(), time.process_time()
        while seen < num_images:
            seen += len(next(it)[0])
        ips = seen / (time.perf_counter() - t0)
        best = max(best, (ips, 1000 * (time.process_time() - c0) / seen))
        del it
    return best


def stage_split(ds: DetectionDataset, num_images: int) -> dict[str, float]:
    """Mean milliseconds per image of: decode JPEG, image resize/crop/flip, boxes, masks (main process)."""
    totals = dict.fromkeys(("decode", "image", "boxes", "masks"), 0.0)
    rng = np.random.default_rng(0)
    for i in range(num_images):
        r = ds.record(i % len(ds))
        t0 = time.perf_counter()
        image = ds._read_image(ds.image_root / r["file"], r)
        t1 = time.perf_counter()
        g = ds.transform(Geometry.identity(r["height"], r["width"]), rng)
        apply_image(image, g)
        t2 = time.perf_counter()
        boxes = apply_boxes(torch.tensor(r["boxes"], dtype=torch.float64), g)
        keep = nonempty(boxes, 1e-5)
        t3 = time.perf_counter()
        decode_masks([r["segms"][k] for k in keep.nonzero()[:, 0].tolist()], g)
        t4 = time.perf_counter()
        for k, dt in zip(totals, (t1 - t0, t2 - t1, t3 - t2, t4 - t3), strict=True):
            totals[k] += dt
    return {k: 1000 * v / num_images for k, v in totals.items()}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--images", type=int, default=48, help="size of the synthetic set")
    parser.add_argument("--measure", type=int, default=96, help="images timed per configuration")
    parser.add_argument("--repeats", type=int, default=3, help="runs per configuration; the best is kept")
    parser.add_argument("--write", action="store_true", help="write the results into benchmarks/RESULTS.md")
    args = parser.parse_args()
    load_before = os.getloadavg()[0]
    torch.set_num_threads(1)  # as in DataLoader workers; the pipeline is PIL / numpy / pycocotools anyway
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        json_path = make_dataset(Path(tmp), args.images)
        for size in (640, 896):
            ds = DetectionDataset(json_path, tmp, transform=train_transform(size), filter_empty=True)
            split = stage_split(ds, args.measure)
            for workers in (0, 2):

                def make(ds=ds, workers=workers):
                    return build_train_loader(
                        ds, RepeatFactorSampler(ds), batch_size=2, num_workers=workers, seed=0
                    )

                ips, cpu = loader_throughput(make, args.measure, args.repeats)
                rows.append((f"train {size}, masks", workers, ips, cpu, split if workers == 0 else None))
        test = DetectionDataset(
            json_path, tmp, transform=ResizeShortestEdge(), filter_empty=False, load_masks=False
        )
        for workers in (0, 2):
            n = min(args.measure, len(test) - 1)  # the test loader is finite
            ips, cpu = loader_throughput(
                lambda w=workers: build_test_loader(test, num_workers=w), n, args.repeats
            )
            rows.append(("test 800/1333, no masks", workers, ips, cpu, None))
        num_anns = len(json.loads(json_path.read_text())["annotations"])
    lines = [
        "| pipeline | workers | images/s | images/s per worker | main-process CPU ms/image "
        "| ms/image: decode / image / boxes / masks |",
        "|---|---:|---:|---:|---:|---|",
    ]
    for name, workers, ips, cpu, split in rows:
        parts = " / ".join(f"{v:.1f}" for v in split.values()) if split else ""
        lines.append(
            f"| {name} | {workers} | {ips:.1f} | {ips / max(workers, 1):.1f} | {cpu:.1f} | {parts} |"
        )
    table = "\n".join(lines)
    print(table)
    if args.write:
        machine = f"{platform.processor() or platform.machine()}, {len(os.sched_getaffinity(0))} cores"
        header = " ".join([
            "## data.py: LVIS data-loader throughput, CPU\n\n`python benchmarks/data.py",
            f"--images {args.images} --measure {args.measure} --repeats {args.repeats} --write`",
            f"on {machine},",
            f"1 torch thread, torch {torch.__version__}, {time.strftime('%Y-%m-%d')}.",
            f"Synthetic set: {args.images} JPEGs 640x480 / 480x640, {num_anns / args.images:.1f} instances",
            "per image (polygons, ~10% RLE); batch 2; images/s = best of the repeats. Workers 0 = the main",
            "process loads; its CPU ms/image is the pipeline's own cost, which other load does not change.",
            "The ms/image split (main process) leaves out collation and the transfer between processes.",
            f"Load average before the run: {load_before:.1f} (shared machine: images/s move with it).\n\n",
        ])  # fmt: skip
        write_section("## data.py", header + table + "\n")


if __name__ == "__main__":
    main()
