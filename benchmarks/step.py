"""Train-step and inference time and peak memory of the R50 CenterNet2 (LVIS, 1203 classes) on CPU.

    python benchmarks/step.py                       # both, each in a fresh process; prints a Markdown table
    python benchmarks/step.py --write               # ... and writes the section in benchmarks/RESULTS.md
    python benchmarks/step.py --mode train --profile  # one mode in this process, with a torch.profiler summary

Train step = forward + backward of a batch of 2 images of 640x640 with 10 GT boxes + masks each (the official
R50 training size, centernet2.md §4); inference = one 640x640 image, ``model.eval()`` under ``no_grad``.
Peak memory is the process's peak resident set size (``ru_maxrss``), which includes the Python interpreter,
torch and the weights (about 0.4 GB before the first forward).
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from results import write_section  # noqa: E402 (benchmarks/ is on sys.path when run as a script)

from divergen.config import load_config  # noqa: E402
from divergen.model import build_model  # noqa: E402


def make_batch(num_images: int, size: int, num_gt: int, num_classes: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    images, targets = [], []
    for _ in range(num_images):
        images.append(torch.rand(3, size, size, generator=g) * 255)
        xy = torch.rand(num_gt, 2, generator=g) * size * 0.7
        wh = 16 + torch.rand(num_gt, 2, generator=g) * size * 0.3
        boxes = torch.cat([xy, (xy + wh).clamp(max=size)], dim=1)
        masks = torch.zeros(num_gt, size, size, dtype=torch.bool)
        for m, (x1, y1, x2, y2) in zip(masks, boxes.long().tolist()):
            m[y1:y2, x1:x2] = True
        labels = torch.randint(0, num_classes, (num_gt,), generator=g)
        targets.append({"boxes": boxes, "labels": labels, "masks": masks})
    return images, targets


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2  # Linux: KiB


def run(mode: str, iters: int, warmup: int, profile: bool) -> dict:
    torch.manual_seed(0)
    cfg = load_config(ROOT / "configs" / "r50.toml").model
    model = build_model(cfg)
    model.roi_heads.set_fed_loss_weights(torch.rand(cfg.num_classes) * 1000 + 1)
    if mode == "train":
        model.train()
        images, targets = make_batch(2, 640, 10, cfg.num_classes)

        def step():
            losses = model(images, targets)
            model.zero_grad(set_to_none=True)
            sum(losses.values()).backward()

    else:
        model.eval()
        images, _ = make_batch(1, 640, 0, cfg.num_classes)

        def step():
            with torch.no_grad():
                model(images)

    for _ in range(warmup):
        step()
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    result = {
        "mode": mode,
        "median_s": statistics.median(times),
        "min_s": min(times),
        "peak_rss_gb": peak_rss_gb(),
    }
    if profile:
        from torch.profiler import ProfilerActivity
        from torch.profiler import profile as torch_profile

        with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
            step()
        print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=25))
    return result


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--mode", choices=["train", "infer"], help="run one mode in this process")
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--profile", action="store_true", help="print a torch.profiler table (with --mode)")
    parser.add_argument("--write", action="store_true", help="write the results into benchmarks/RESULTS.md")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.mode:
        print(json.dumps(run(args.mode, args.iters, args.warmup, args.profile)))
        return
    results = []
    for mode in ("train", "infer"):  # each in a fresh process, so that peak RSS is per mode
        cmd = [
            sys.executable,
            __file__,
            "--mode",
            mode,
            "--iters",
            str(args.iters),
            "--warmup",
            str(args.warmup),
            "--threads",
            str(args.threads),
        ]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        results.append(json.loads(out.strip().splitlines()[-1]))
    lines = [
        "| what | median s | min s | peak RSS GB |",
        "|---|---:|---:|---:|",
        *(
            f"| {r['mode']} | {r['median_s']:.2f} | {r['min_s']:.2f} | {r['peak_rss_gb']:.2f} |"
            for r in results
        ),
    ]
    table = "\n".join(lines)
    print(table)
    if args.write:
        cpu = platform.processor() or platform.machine()
        header = (
            f"## step.py: R50 CenterNet2, CPU, {args.threads} threads\n\n"
            f"`python benchmarks/step.py --iters {args.iters} --write` on {cpu}, "
            f"torch {torch.__version__}, {time.strftime('%Y-%m-%d')}. Train: batch 2 x 640², 10 GT each, fwd+bwd. "
            "Infer: 1 x 640², no_grad.\n\n"
        )
        write_section("## step.py", header + table + "\n")


if __name__ == "__main__":
    main()
