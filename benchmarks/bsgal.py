"""BSGAL step time and peak memory, on CPU or on a GPU: the plain step against the official three-pass order, the
fused shared-forward estimator (accepted and rejected iterations), and the lookahead (memory-saving) estimator.

    python benchmarks/bsgal.py                        # R50 on CPU, every mode in a fresh process; a Markdown table
    python benchmarks/bsgal.py --write                # ... and the "## bsgal.py" section of benchmarks/RESULTS.md
    python benchmarks/bsgal.py --backbone swin-t      # a Swin-T CenterNet2 (the memory-saving comparison on CPU)
    python benchmarks/bsgal.py --device cuda --backbone swinl --precision bf16 --json out.jsonl

A step = what one training iteration computes before the optimizer: forward(s) + backward(s) + the selection,
on a batch of ``--batch`` images of ``--size``² (default 2 × 640², Swin-L 2 × 896²: the official setting per GPU,
centernet2.md §4) with 10 GT each (4 of them pasted), the un-pasted originals and one reference image per
training image (halved from the official 4 as in the official 2-image CPU measurement, bsgal.md §10). Modes:

- ``plain``: forward + backward of the pasted batch (no selection);
- ``official``: grad cache, only-paste candidate, ``shared_forward = false``: reference pass, a separate scoring
  pass, then the training pass (accepted);
- ``fused-accept`` / ``fused-reject``: grad cache, shared forward; τ forced so that the batch is accepted (two
  passes) or rejected (plus a forward + backward of the originals);
- ``lookahead``: one SGD step per branch, reference losses, weights restored, then the training pass.

The point on a GPU (bsgal.md §3): the grad cache keeps a parameter-sized fp32 vector and a retained graph, the
lookahead one weight snapshot but more passes; the paper chose the lookahead for Swin-L for its memory.

``--precision bf16|fp16`` wraps ``model.forward`` and the selector's reference pass (``reference_cls_loss``) in
``torch.autocast``, as train.py does (``--autocast all``, the default); ``--autocast forward`` wraps only
``model.forward``, which is what Accelerate alone does and what train.py did before the selector ran under
``accelerator.autocast()`` (the reference pass then ran in fp32). fp16 scales the training loss with a
``GradScaler`` (the selector's own gradients are unscaled, as in train.py). Memory: CPU = peak RSS
(``ru_maxrss``); CUDA = peak allocated / reserved over the timed steps (see ``step.py``). Each mode runs in a
fresh process; a failed one is a row with its error.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from results import write_section  # noqa: E402 (benchmarks/ is on sys.path when run as a script)
from step import (  # noqa: E402
    BACKBONES,
    PRECISIONS,
    TRAIN_SIZE,
    add_run_arguments,
    autocast_forward,
    build_detector,
    environment,
    fmt,
    grad_scaler,
    make_batch,
    measure,
    read_jsonl,
    run_configs,
)

from divergen.bsgal_step import Selector  # noqa: E402
from divergen.config import BSGALConfig  # noqa: E402

MODES = ("plain", "official", "fused-accept", "fused-reject", "lookahead")
NAMES = {"r50": "R50", "swin-t": "Swin-T", "swinl": "Swin-L"}


def run(
    *,
    mode: str,
    backbone: str,
    device: str,
    precision: str,
    batch: int,
    size: int,
    iters: int,
    warmup: int,
    autocast_all: bool,
) -> dict:
    model, num_classes = build_detector(backbone)
    model.to(device).train()
    methods = ("forward", "reference_cls_loss") if autocast_all else ("forward",)
    autocast_forward(model, device, precision, methods=methods)
    scaler = grad_scaler(device, precision)
    images, targets = make_batch(batch, size, 10, num_classes, seed=0)
    for t in targets:
        t["is_pasted"] = torch.arange(10) >= 6
    originals = [{k: v[~t["is_pasted"]] for k, v in t.items() if k != "is_pasted"} for t in targets]
    ref_images, ref_targets = make_batch(batch, size, 10, num_classes, seed=1)
    # As in train.py: the training batch on the device, originals and references on the host (the selector
    # moves them when a branch needs them).
    infos = [
        {"original": {"image": im, **o}, "reference": {"image": ri, **rt}}
        for im, o, ri, rt in zip(images, originals, ref_images, ref_targets, strict=True)
    ]
    images = [im.to(device) for im in images]
    targets = [{k: v.to(device) for k, v in t.items()} for t in targets]
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
    accepted = []

    def step(iteration: int):
        model.zero_grad(set_to_none=True)
        if selector is None:
            losses = model(images, targets)
        else:
            losses, record = selector.select(model, images, targets, infos, iteration)
            assert record["accepted"] == (mode != "fused-reject") or mode == "lookahead", record
            accepted.append(bool(record["accepted"]))
        total = sum(losses.values())
        (scaler.scale(total) if scaler else total).backward()

    result = dict(bench="bsgal", mode=mode, backbone=backbone, precision=precision)
    result.update(autocast="all" if autocast_all else "forward", batch=batch, size=size, iters=iters)
    result.update(warmup=warmup, **environment(device))
    result.update(measure(step, device=device, iters=iters, warmup=warmup))
    params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    result["param_gb"] = params * 4 / 1024**3
    if selector is not None and mode != "lookahead":
        result["cache_gib"] = selector.cache.nbytes / 1024**3
    result["accepted"] = sum(accepted)
    return result


def table(results: list[dict]) -> str:
    """One row per mode; "× plain" and "extra" against the plain row of the same backbone, precision, batch and
    size. Memory = peak allocated GiB on CUDA, peak RSS GB on CPU."""

    def key(r):
        return (r["backbone"], r["precision"], r["batch"], r["size"], r.get("device"))

    def memory(r):
        return r.get("peak_alloc_gib", r.get("peak_rss_gb"))

    plain = {key(r): r for r in results if r["mode"] == "plain" and "error" not in r}
    cuda = any("peak_alloc_gib" in r for r in results)
    mem = (
        "peak alloc GiB | extra GiB vs plain | peak reserved GiB"
        if cuda
        else "peak RSS GB | extra GB vs plain"
    )
    lines = [
        f"| backbone | precision | batch × size | mode | median s | × plain | {mem} |",
        "|---|---|---|---|---:|---:|---:|---:|" + ("---:|" if cuda else ""),
    ]
    for r in results:
        # --autocast forward (train.py before the fix): the reference pass ran in fp32 under a bf16/fp16 forward.
        old = r.get("autocast") == "forward" and r["precision"] != "fp32"
        prec = r["precision"] + (" (reference pass fp32)" if old else "")
        what = f"| {NAMES.get(r['backbone'], r['backbone'])} | {prec} | {r['batch']} × {r['size']}² | {r['mode']} |"
        if "error" in r:
            lines.append(f"{what} {r['error']} | | | |" + (" |" if cuda else ""))
            continue
        p = plain.get(key(r))
        ratio = f"{r['median_s'] / p['median_s']:.2f}" if p else "-"
        extra = f"{memory(r) - memory(p):+.2f}" if p else "-"
        row = f"{what} {r['median_s']:.3f} | {ratio} | {fmt(memory(r))} | {extra} |"
        lines.append(row + (f" {fmt(r.get('peak_reserved_gib'))} |" if cuda else ""))
    copies = {NAMES.get(r["backbone"], r["backbone"]): r["param_gb"] for r in results if "param_gb" in r}
    if copies:  # what the grad cache adds (one fp32 copy of the trainable parameters), for reading "extra"
        lines += [
            "",
            "One fp32 parameter copy: " + ", ".join(f"{k} {v:.2f} GiB" for k, v in copies.items()) + ".",
        ]
    return "\n".join(lines)


def cpu_table(results: list[dict]) -> str:
    """The CPU table as RESULTS.md has always had it."""
    plain = next((r for r in results if r["mode"] == "plain" and "error" not in r), None)
    lines = ["| mode | median s | × plain | peak RSS GB | extra GB vs plain |", "|---|---:|---:|---:|---:|"]
    for r in results:
        if "error" in r:
            lines.append(f"| {r['mode']} | {r['error']} | | | |")
            continue
        ratio = f"{r['median_s'] / plain['median_s']:.2f}" if plain else "-"
        extra = f"{r['peak_rss_gb'] - plain['peak_rss_gb']:+.2f}" if plain else "-"
        lines.append(f"| {r['mode']} | {r['median_s']:.2f} | {ratio} | {r['peak_rss_gb']:.2f} | {extra} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--mode", choices=MODES, help="run one mode in this process")
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--precision", choices=list(PRECISIONS), default="fp32")
    parser.add_argument("--autocast", choices=["forward", "all"], default="all",
                        help="all: as train.py (the reference pass too); forward: model.forward only")  # fmt: skip
    parser.add_argument("--backbone", choices=BACKBONES, default="r50")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--size", type=int, help="image side (default 640 R50 and Swin-T, 896 Swin-L)")
    parser.add_argument("--iters", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    add_run_arguments(parser, bench="bsgal", unit="mode")
    args = parser.parse_args()
    if args.summary:
        print(table(read_jsonl(args.summary, "bsgal")))
        return
    size = args.size or TRAIN_SIZE[args.backbone]
    default_cpu = (args.device, args.precision, args.batch, size) == ("cpu", "fp32", 2, 640)
    if args.write and not (default_cpu and args.backbone in ("r50", "swin-t")):
        parser.error(
            "--write records the default CPU tables (R50 / Swin-T, fp32, 2 × 640²); others go to --json"
        )
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch.cuda.is_available() is False")
    threads = args.threads or (2 if args.device == "cpu" else None)
    if threads:
        torch.set_num_threads(threads)
    if args.mode:
        result = run(
            mode=args.mode,
            backbone=args.backbone,
            device=args.device,
            precision=args.precision,
            batch=args.batch,
            size=size,
            iters=args.iters,
            warmup=args.warmup,
            autocast_all=args.autocast == "all",
        )
        print(json.dumps(result))
        return
    configs = []
    for mode in args.modes:  # each in a fresh process, so that peak memory is per mode
        config = {"bench": "bsgal", "mode": mode, "backbone": args.backbone, "precision": args.precision}
        config.update(autocast=args.autocast, batch=args.batch, size=size, device=args.device)
        cmd = [__file__, "--mode", mode, "--backbone", args.backbone, "--device", args.device]
        cmd += ["--precision", args.precision, "--autocast", args.autocast, "--batch", str(args.batch)]
        cmd += ["--size", str(size), "--iters", str(args.iters), "--warmup", str(args.warmup)]
        cmd += ["--threads", str(threads)] if threads else []
        configs.append((config, cmd))
    results = run_configs(configs, timeout=args.timeout, json_path=args.json)
    text = table(results)
    print(text)
    if args.write:
        ok = [r for r in results if "error" not in r]
        if not ok:
            sys.exit("every mode failed: RESULTS.md left as it was")
        cpu = platform.processor() or platform.machine()
        marker = f"## bsgal.py: {NAMES[args.backbone]}"
        header = (
            f"{marker} CenterNet2, CPU, {threads} threads\n\n"
            f"`python benchmarks/bsgal.py --backbone {args.backbone} --iters {args.iters} --write` on {cpu}, "
            f"torch {torch.__version__}, {time.strftime('%Y-%m-%d')}. Batch 2 × 640², 10 GT each (4 pasted), "
            f"2 reference images; one fp32 parameter copy = {ok[0]['param_gb']:.2f} GB.\n\n"
        )
        write_section(marker, header + cpu_table(results) + "\n")


if __name__ == "__main__":
    main()
