"""Forward + backward time of ROIAlign on CPU: torchvision vs ``divergen.roi_align`` (vectorised backward).

    python benchmarks/roi_align.py                # 2 threads; prints a Markdown table
    python benchmarks/roi_align.py --threads 2 1 --write  # ... per thread count, into RESULTS.md "## roi_align.py"
    python benchmarks/roi_align.py --crossover    # backward alone for few RoIs: where torchvision's is faster

The shapes of one R50 CenterNet2 training step (batch 2 x 640², centernet2.md §3): FPN p3-p5 features
(2, 256, 80/40/20, 80/40/20) that require grad; box pooler = 1024 RoIs (512 per image, batch indices interleaved)
pooled 7x7, once per cascade stage; mask pooler = 256 foreground RoIs pooled 14x14. RoIs are synthetic:
sqrt(area) log-uniform in [16, 640] px, aspect ratio exp(U(-1, 1)), clipped to the image, each pooled from the
level of the FPN rule (``assign_levels``), one call per level, like ``multilevel_roi_align``. Each time is the
sum over the levels; "step" = 3 box poolings + 1 mask pooling. Times are the min (and median) of the repeats.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torchvision

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from results import write_section  # noqa: E402 (benchmarks/ is on sys.path when run as a script)

from divergen import roi_align as ra  # noqa: E402
from divergen.roi_align import roi_align, roi_align_backward  # noqa: E402
from divergen.roi_heads import assign_levels  # noqa: E402

STRIDES = (8, 16, 32)


def make_case(num_rois: int, output_size: int, seed: int, size: int = 640, channels: int = 256):
    g = torch.Generator().manual_seed(seed)
    features = [torch.randn(2, channels, size // s, size // s, generator=g) for s in STRIDES]
    side = torch.exp(torch.empty(num_rois).uniform_(math.log(16), math.log(size), generator=g))
    aspect = torch.exp(torch.empty(num_rois).uniform_(-1, 1, generator=g))
    wh = torch.stack([side * aspect.sqrt(), side / aspect.sqrt()], dim=1)
    centre = torch.rand(num_rois, 2, generator=g) * size
    boxes = torch.cat([centre - wh / 2, centre + wh / 2], dim=1).clamp(0, size)
    batch = (torch.arange(num_rois) % 2).float()[:, None]
    levels = assign_levels(boxes)
    per_level = [torch.cat([batch, boxes], dim=1)[levels == i] for i in range(len(STRIDES))]
    weights = [torch.randn(len(r), channels, output_size, output_size, generator=g) for r in per_level]
    return features, per_level, weights


def pool_once(fn, features, rois, weights, output_size: int) -> tuple[float, float, list[torch.Tensor]]:
    """Forward + backward over the levels; returns (total s, backward s, feature grads)."""
    feats = [f.detach().requires_grad_(True) for f in features]
    t0 = time.perf_counter()
    levels = [i for i, r in enumerate(rois) if len(r)]
    outs = [fn(feats[i], rois[i], output_size, 1.0 / STRIDES[i], 0, True) for i in levels]
    t1 = time.perf_counter()
    torch.autograd.backward(outs, [weights[i] for i in levels])  # = d/dfeatures of sum(weights * outs)
    t2 = time.perf_counter()
    return t2 - t0, t2 - t1, [f.grad for f in feats]


def measure(num_rois: int, output_size: int, repeats: int, seed: int) -> dict:
    features, rois, weights = make_case(num_rois, output_size, seed)
    fns = {"torchvision": torchvision.ops.roi_align, "ours": roi_align}
    times = {name: ([], []) for name in fns}
    grads = {}
    for name, fn in fns.items():  # warm-up
        grads[name] = pool_once(fn, features, rois, weights, output_size)[2]
    for _ in range(repeats):  # interleaved, so that load from other processes hits both alike
        for name, fn in fns.items():
            total, backward, _ = pool_once(fn, features, rois, weights, output_size)
            times[name][0].append(total)
            times[name][1].append(backward)
    err = max(float((a - b).abs().max() / b.abs().max()) for a, b in zip(grads["ours"], grads["torchvision"]))
    result = {
        "rois": f"{num_rois} x {output_size}x{output_size} ({'/'.join(str(len(r)) for r in rois)} on p3/p4/p5)",
        "max_rel_grad_diff": err,
    }
    for name, (total, backward) in times.items():
        result[f"{name}_total"], result[f"{name}_bwd"] = min(total), min(backward)
        result[f"{name}_total_median"] = statistics.median(total)
    return result


def crossover(repeats: int) -> None:
    """Backward alone, torchvision vs ours (forced), for 1-128 RoIs on a (2, C, 80, 80) map at stride 8."""
    print("| C | RoIs | work | torchvision ms | ours ms | rule picks |\n|---:|---:|---:|---:|---:|---|")
    for channels in (256, 64, 16):
        for num_rois in (1, 4, 16, 64, 128):
            features, rois, weights = make_case(4 * num_rois, 7, seed=num_rois, channels=channels)
            shape = tuple(features[0].shape)
            rois, grad = rois[0][:num_rois], weights[0][:num_rois]
            grid = ra._sample_grid(rois, (7, 7), 1 / 8, 0, True)
            work = channels * 49 * int((grid[2] * grid[5]).sum())
            args = (grad, rois, 1 / 8, 7, 7, *shape, 0, True)
            fns = {
                "torchvision": lambda args=args: torch.ops.torchvision._roi_align_backward(*args),
                "ours": lambda args=(grad, rois, shape, 1 / 8): roi_align_backward(*args),
            }
            best = {}
            prefer = ra._prefer_torchvision
            ra._prefer_torchvision = lambda work, input_numel: False
            try:
                for name, fn in fns.items():
                    fn()
                    best[name] = min(_timed(fn) for _ in range(repeats))
            finally:
                ra._prefer_torchvision = prefer
            pick = "torchvision" if prefer(work, math.prod(shape)) else "ours"
            print(f"| {channels} | {len(rois)} | {work} | {best['torchvision'] * 1e3:.2f} | {best['ours'] * 1e3:.2f} "
                  f"| {pick} |")  # fmt: skip


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--threads", type=int, nargs="+", default=[2], help="one table per thread count")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--write", action="store_true", help="write the section in benchmarks/RESULTS.md")
    parser.add_argument("--crossover", action="store_true", help="only the few-RoI backward table")
    args = parser.parse_args()
    if args.crossover:
        for threads in args.threads:
            torch.set_num_threads(threads)
            print(f"{threads} threads")
            crossover(args.repeats)
        return
    tables = []
    for threads in args.threads:
        torch.set_num_threads(threads)
        load = os.getloadavg()[0]
        box = measure(1024, 7, args.repeats, seed=0)
        mask = measure(256, 14, args.repeats, seed=1)
        tables.append(f"{threads} thread(s), load average {load:.1f} before the run:\n\n" + _table(box, mask))
        print(tables[-1] + "\n")
    if args.write:
        cpu = platform.processor() or platform.machine()
        threads = " ".join(map(str, args.threads))
        header = (
            "## roi_align.py: ROIAlign forward + backward, CPU\n\n"
            f"`python benchmarks/roi_align.py --threads {threads} --repeats {args.repeats} --write` on {cpu}, "
            f"{os.cpu_count()} cores, torch {torch.__version__}, torchvision {torchvision.__version__}, "
            f"{time.strftime('%Y-%m-%d')}. Features (2, 256, 80/40/20, 80/40/20) fp32; synthetic RoIs, one call per "
            "FPN level; times summed over the levels, min of the repeats. The forward is torchvision's in both; "
            "only the backward differs. A shared machine: while other processes keep the cores busy, torch's "
            "2-thread parallel ops (ours) lose much more than torchvision's serial loop, hence the 1-thread "
            "table.\n\n"
        )
        write_section("## roi_align.py", header + "\n\n".join(tables) + "\n")


def _table(box: dict, mask: dict) -> str:
    lines = [
        "| RoIs | torchvision fwd+bwd ms | ours fwd+bwd ms | speedup | torchvision bwd ms | ours bwd ms "
        "| median fwd+bwd ms tv / ours | max rel grad diff |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in (box, mask):
        lines.append(
            f"| {r['rois']} | {r['torchvision_total'] * 1e3:.0f} | {r['ours_total'] * 1e3:.0f} "
            f"| {r['torchvision_total'] / r['ours_total']:.1f}x | {r['torchvision_bwd'] * 1e3:.0f} "
            f"| {r['ours_bwd'] * 1e3:.0f} | {r['torchvision_total_median'] * 1e3:.0f} / "
            f"{r['ours_total_median'] * 1e3:.0f} | {r['max_rel_grad_diff']:.1e} |"
        )
    step = {n: 3 * box[f"{n}_total"] + mask[f"{n}_total"] for n in ("torchvision", "ours")}
    lines.append(
        f"| step: 3 x box + 1 x mask | {step['torchvision'] * 1e3:.0f} | {step['ours'] * 1e3:.0f} "
        f"| {step['torchvision'] / step['ours']:.1f}x | | | | |"
    )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
