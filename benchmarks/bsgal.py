"""BSGAL step time and peak memory on CPU: the plain step against the official three-pass order, the fused
shared-forward estimator (accepted and rejected iterations), and the lookahead (memory-saving) estimator.

    python benchmarks/bsgal.py                        # R50, every mode in a fresh process; a Markdown table
    python benchmarks/bsgal.py --write                # ... and the "## bsgal.py" section of benchmarks/RESULTS.md
    python benchmarks/bsgal.py --backbone swin-t      # a Swin-T CenterNet2 (the memory-saving comparison)

A step = what one training iteration computes before the optimizer: forward(s) + backward(s) + the selection,
on a batch of 2 images of 640² with 10 GT each (4 of them pasted), 2 un-pasted originals and 2 reference images
(the official R50 setting per GPU, halved as in the official 2-image CPU measurement, bsgal.md §10). Modes:

- ``plain``: forward + backward of the pasted batch (no selection);
- ``official``: grad cache, only-paste candidate, ``shared_forward = false``: reference pass, a separate scoring
  pass, then the training pass (accepted);
- ``fused-accept`` / ``fused-reject``: grad cache, shared forward; τ forced so that the batch is accepted (two
  passes) or rejected (plus a forward + backward of the originals);
- ``lookahead``: one SGD step per branch, reference losses, weights restored, then the training pass.

Peak memory is the process's peak resident set size (``ru_maxrss``); the cache of the grad-cache modes is one
fp32 copy of the trainable parameters.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from results import write_section  # noqa: E402 (benchmarks/ is on sys.path when run as a script)
from step import make_batch, peak_rss_gb  # noqa: E402

from divergen.bsgal_step import Selector  # noqa: E402
from divergen.config import BSGALConfig, SwinConfig, load_config  # noqa: E402
from divergen.model import build_model  # noqa: E402

MODES = ("plain", "official", "fused-accept", "fused-reject", "lookahead")


def build(backbone: str):
    cfg = load_config(ROOT / "configs" / ("r50.toml" if backbone == "r50" else "swinl.toml")).model
    if backbone == "swin-t":  # Swin-T widths: Swin-L does not fit a CPU benchmark's time budget
        cfg = dataclasses.replace(
            cfg, swin=SwinConfig(embed_dim=96, depths=[2, 2, 6, 2], num_heads=[3, 6, 12, 24], window_size=7)
        )
    torch.manual_seed(0)
    model = build_model(cfg)
    model.roi_heads.set_fed_loss_weights(torch.rand(cfg.num_classes) * 1000 + 1)
    return model.train(), cfg.num_classes


def run(mode: str, backbone: str, iters: int, warmup: int) -> dict:
    model, num_classes = build(backbone)
    images, targets = make_batch(2, 640, 10, num_classes, seed=0)
    for t in targets:
        t["is_pasted"] = torch.arange(10) >= 6
    originals = [{k: v[~t["is_pasted"]] for k, v in t.items() if k != "is_pasted"} for t in targets]
    ref_images, ref_targets = make_batch(2, 640, 10, num_classes, seed=1)
    infos = [
        {"original": {"image": im, **o}, "reference": {"image": ri, **rt}}
        for im, o, ri, rt in zip(images, originals, ref_images, ref_targets, strict=True)
    ]
    selector = None
    if mode != "plain":
        cfg = BSGALConfig(
            enabled=True,
            estimator="lookahead" if mode == "lookahead" else "grad_cache",
            shared_forward=mode != "official",
            tau={"fused-reject": 2.0}.get(mode, -2.0),  # cosines lie in [-1, 1]
        )
        selector = Selector(
            cfg, model, max_iter=100, rank=0, world_size=1, output_dir=Path(tempfile.mkdtemp())
        )

    def step(iteration: int):
        model.zero_grad(set_to_none=True)
        if selector is None:
            losses = model(images, targets)
        else:
            losses, record = selector.select(model, images, targets, infos, iteration)
            assert record["accepted"] == (mode != "fused-reject") or mode == "lookahead", record
        sum(losses.values()).backward()

    for i in range(warmup):
        step(i)
    times = []
    for i in range(iters):
        t0 = time.perf_counter()
        step(warmup + i)
        times.append(time.perf_counter() - t0)
    params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {
        "mode": mode,
        "median_s": statistics.median(times),
        "min_s": min(times),
        "peak_rss_gb": peak_rss_gb(),
        "param_gb": params * 4 / 1024**3,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--mode", choices=MODES, help="run one mode in this process")
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--backbone", choices=["r50", "swin-t"], default="r50")
    parser.add_argument("--iters", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--write", action="store_true", help="write the results into benchmarks/RESULTS.md")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.mode:
        print(json.dumps(run(args.mode, args.backbone, args.iters, args.warmup)))
        return
    results = []
    for mode in args.modes:  # each in a fresh process, so that peak RSS is per mode
        cmd = [
            sys.executable,
            __file__,
            "--mode",
            mode,
            "--backbone",
            args.backbone,
            "--iters",
            str(args.iters),
        ]
        cmd += ["--warmup", str(args.warmup), "--threads", str(args.threads)]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        results.append(json.loads(out.strip().splitlines()[-1]))
        print(results[-1], flush=True)
    plain = next((r for r in results if r["mode"] == "plain"), None)
    lines = ["| mode | median s | × plain | peak RSS GB | extra GB vs plain |", "|---|---:|---:|---:|---:|"]
    for r in results:
        ratio = f"{r['median_s'] / plain['median_s']:.2f}" if plain else "-"
        extra = f"{r['peak_rss_gb'] - plain['peak_rss_gb']:+.2f}" if plain else "-"
        lines.append(f"| {r['mode']} | {r['median_s']:.2f} | {ratio} | {r['peak_rss_gb']:.2f} | {extra} |")
    table = "\n".join(lines)
    print(table)
    if args.write:
        cpu = platform.processor() or platform.machine()
        name = {"r50": "R50", "swin-t": "Swin-T"}[args.backbone]
        marker = f"## bsgal.py: {name}"
        header = (
            f"{marker} CenterNet2, CPU, {args.threads} threads\n\n"
            f"`python benchmarks/bsgal.py --backbone {args.backbone} --iters {args.iters} --write` on {cpu}, "
            f"torch {torch.__version__}, {time.strftime('%Y-%m-%d')}. Batch 2 × 640², 10 GT each (4 pasted), "
            f"2 reference images; one fp32 parameter copy = {results[0]['param_gb']:.2f} GB.\n\n"
        )
        write_section(marker, header + table + "\n")


if __name__ == "__main__":
    main()
