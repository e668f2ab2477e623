"""Instance-paste throughput on one core: images/s with 20 pasted instances per image (masks included).

    python benchmarks/paste.py              # prints a Markdown table
    python benchmarks/paste.py --write      # ... and writes the "## paste.py" section of benchmarks/RESULTS.md

The pool (made in a temp dir, then deleted): 400 RGBA PNG cutouts of 40 categories, tight crops of blob-shaped
objects 80-250 px a side, as cut from 256² DeepFloyd-IF / 512² SD generations. Each image: a textured S×S crop
with 10 real instances (bool masks), then exactly 20 pool instances pasted by ``InstancePaste`` with size
statistics mean 0.15, std 0.08 of sqrt(relative area) (LVIS-like), the official geometry and hard paste.
One thread (torch and OpenCV): the rate one loader worker gets. The split: ``load`` = PNG decode of the
cutouts, ``size`` = sizing + cv2 resize + flip + placement, ``composite`` = ``paste_instances`` (occlusion
bookkeeping, box updates, pixel copy). Median over ``--runs`` runs of ``--images`` images each.
"""

from __future__ import annotations

import argparse
import platform
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from results import write_section  # noqa: E402 (benchmarks/ is on sys.path when run as a script)

from divergen.paste import InstancePaste, paste_instances  # noqa: E402
from divergen.pool import InstancePool, write_pool_index  # noqa: E402

NUM_PASTED = 20
NUM_REAL = 10


def make_pool(root: Path, num_categories: int = 40, per_category: int = 10, seed: int = 0) -> Path:
    """RGBA cutouts with a blob-shaped alpha and a textured body, plus their pool.jsonl."""
    rng = np.random.default_rng(seed)
    records = []
    for c in range(1, num_categories + 1):
        (root / "images" / str(c)).mkdir(parents=True)
        for k in range(per_category):
            h, w = rng.integers(80, 251, 2)
            yy, xx = np.mgrid[0:h, 0:w]
            u, v = (xx - w / 2) / (w / 2), (yy - h / 2) / (h / 2)
            angle = np.arctan2(v, u)
            radius = 0.8 + 0.15 * np.sin(3 * angle + rng.uniform(0, 6)) + 0.05 * np.cos(7 * angle)
            alpha = np.where(u * u + v * v <= radius**2, 255, 0).astype(np.uint8)
            rgb = (np.sin(xx / rng.uniform(3, 15))[..., None] * 60 + rng.uniform(60, 200, 3)).clip(0, 255)
            path = root / "images" / str(c) / f"{k:05d}.png"
            Image.fromarray(np.dstack([rgb.astype(np.uint8), alpha])).save(path)
            records.append({"path": str(path.relative_to(root)), "category_id": c, "generator": "bench"})
    return write_pool_index(records, root / "pool.jsonl")


def make_sample(size: int, rng: np.random.Generator) -> dict:
    """A textured ``size``² image with NUM_REAL elliptical real instances."""
    yy, xx = np.mgrid[0:size, 0:size]
    image = (np.sin(xx / 7.0) * 40 + np.cos(yy / 11.0) * 40 + 128).astype(np.uint8)
    masks, boxes = [], []
    for _ in range(NUM_REAL):
        cx, cy, rx, ry = *rng.uniform(0, size, 2), *rng.uniform(10, size / 5, 2)
        m = ((xx - cx) / rx) ** 2 + ((yy - cy) / ry) ** 2 <= 1
        ys, xs = np.nonzero(m)
        masks.append(m)
        boxes.append([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])
    return {
        "image": torch.from_numpy(np.repeat(image[None], 3, 0)),
        "boxes": torch.tensor(boxes, dtype=torch.float32),
        "labels": torch.arange(NUM_REAL),
        "masks": torch.from_numpy(np.stack(masks)),
    }


class TimedPool:
    """Times ``load`` of the wrapped pool."""

    def __init__(self, pool: InstancePool):
        self.pool, self.seconds = pool, 0.0
        self.labels, self.categories = pool.labels, pool.categories

    def __len__(self):
        return len(self.pool)

    def instances_of(self, label):
        return self.pool.instances_of(label)

    def load(self, i):
        t = time.perf_counter()
        out = self.pool.load(i)
        self.seconds += time.perf_counter() - t
        return out


def run(pool: InstancePool, size: int, num_images: int, seed: int) -> dict[str, float]:
    """Seconds per image: total and its split, over ``num_images`` pastes of exactly NUM_PASTED instances."""
    timed = TimedPool(pool)
    paste = InstancePaste(timed, size_stats=np.tile([0.15, 0.08], (pool.categories.max() + 1, 1)))
    rng = np.random.default_rng(seed)
    # Exactly NUM_PASTED draws per image (the transform draws n ~ U{0..19}; the benchmark fixes the worst case).
    paste.sample = lambda r, labels=(): r.choice(len(pool), NUM_PASTED).tolist()
    samples = [make_sample(size, rng) for _ in range(4)]
    sizing = composite = total = 0.0
    pasted = 0
    for i in range(num_images):
        sample = samples[i % len(samples)]
        t0 = time.perf_counter()
        load_before = timed.seconds
        cutouts = paste.cutouts(rng, (size, size), sample["labels"].tolist())
        t1 = time.perf_counter()
        image = sample["image"].numpy().copy()
        out = paste_instances(image, sample["boxes"].numpy(), sample["labels"].numpy(), sample["masks"].numpy(),
                              cutouts)  # fmt: skip
        result = {"image": torch.from_numpy(image), **{k: torch.from_numpy(v) for k, v in out.items()}}
        t2 = time.perf_counter()
        sizing += (t1 - t0) - (timed.seconds - load_before)
        composite += t2 - t1
        total += t2 - t0
        pasted += int(result["is_pasted"].sum())
    return {
        "total": total / num_images,
        "load": timed.seconds / num_images,
        "size": sizing / num_images,
        "composite": composite / num_images,
        "pasted": pasted / num_images,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[640, 896])
    parser.add_argument("--images", type=int, default=60, help="images per run")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--write", action="store_true", help="write the section of benchmarks/RESULTS.md")
    args = parser.parse_args()
    torch.set_num_threads(1)
    cv2.setNumThreads(1)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        pool = InstancePool(make_pool(Path(tmp)))
        for size in args.sizes:
            runs = [run(pool, size, args.images, seed) for seed in range(args.runs)]
            med = {k: float(np.median([r[k] for r in runs])) for k in runs[0]}
            rows.append(
                f"| {size}² | {1.0 / med['total']:.1f} | {1000 * med['total']:.1f} | {1000 * med['load']:.1f} | "
                f"{1000 * med['size']:.1f} | {1000 * med['composite']:.1f} | {med['pasted']:.1f} |"
            )
            print(rows[-1], flush=True)
    table = "\n".join(
        [
            "| image | images/s (1 core) | ms / image | load (PNG) | size + resize | composite | kept |",
            "|---|---:|---:|---:|---:|---:|---:|",
            *rows,
        ]
    )
    text = (
        "## paste.py — instance paste, 20 instances per image, one core\n\n"
        f"`python benchmarks/paste.py --images {args.images} --runs {args.runs} --write` "
        f"({platform.processor() or platform.machine()}, torch {torch.__version__}, OpenCV {cv2.__version__}, "
        f"1 thread; median of {args.runs} runs of {args.images} images; the time columns are ms per image).\n\n"
        f"{table}\n"
    )
    print(text)
    if args.write:
        write_section("## paste.py", text)


if __name__ == "__main__":
    main()
