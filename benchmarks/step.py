"""Train-step and inference time and peak memory of CenterNet2 (LVIS, 1203 classes), on CPU or on a GPU.

    python benchmarks/step.py                       # CPU, R50: train and infer, each in a fresh process; a table
    python benchmarks/step.py --write               # ... and writes the section in benchmarks/RESULTS.md (CPU only)
    python benchmarks/step.py --mode train --profile  # one configuration in this process, with a profiler summary
    python benchmarks/step.py --device cuda --backbone swinl --precision fp32 bf16 --json out.jsonl

Train step = forward + backward of ``--batch`` images of ``--size``² with 10 GT boxes + masks each (the official
training sizes, centernet2.md §4: 640 for R50, 896 for Swin-L; 2 images per GPU = 16 over 8 GPUs). Inference =
``model.eval()`` under ``no_grad`` on ``--infer-batch`` images of ``--infer-size`` (default: 640² on CPU, as the
CPU table always measured; 800×1333 on a GPU, the ResizeShortestEdge(800, 1333) test size, centernet2.md §4).

``--precision bf16|fp16`` wraps ``model.forward`` in ``torch.autocast`` of the device's type, as Accelerate's
``prepare`` does (the backward runs outside it); fp16 scales the loss with a ``GradScaler`` before the backward,
as ``accelerator.backward`` does. The heads and losses stay fp32 unless ``--amp-heads`` (``model.amp_heads``).

CPU: wall time per step; peak memory = the process's peak resident set size (``ru_maxrss``: interpreter, torch,
weights included). CUDA: ``torch.cuda.synchronize()`` around each step; peak memory =
``torch.cuda.max_memory_allocated()`` / ``max_memory_reserved()`` over the timed steps (after
``reset_peak_memory_stats()``), in GiB; ``static`` = what stays allocated between steps (weights, gradients, batch).
Warm-up steps are excluded; times are the median (and min) of ``--iters`` steps. Each configuration runs in a
fresh process, so that peaks do not leak between them; one that fails (out of memory, an error, ``--timeout``)
becomes a row with its error and the others still run. ``--json PATH`` appends one JSON line per configuration;
``--summary PATH`` prints the tables of such a file.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from results import write_section  # noqa: E402 (benchmarks/ is on sys.path when run as a script)

from divergen.config import SwinConfig, load_config  # noqa: E402
from divergen.model import build_model  # noqa: E402

BACKBONES = ("r50", "swin-t", "swinl")
PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
TRAIN_SIZE = {"r50": 640, "swin-t": 640, "swinl": 896}  # centernet2.md §4 (Swin-T: the CPU comparison size)


# ------------------------------------------------------------------------------------- shared with bsgal.py


def make_batch(num_images: int, size: int | tuple[int, int], num_gt: int, num_classes: int, seed: int = 0):
    """Synthetic 0..255 images of ``size`` (an int for square, or (height, width)) with ``num_gt`` box + mask
    targets each (masks = the boxes filled), seeded."""
    h, w = (size, size) if isinstance(size, int) else size
    g = torch.Generator().manual_seed(seed)
    images, targets = [], []
    for _ in range(num_images):
        images.append(torch.rand(3, h, w, generator=g) * 255)
        xy = torch.rand(num_gt, 2, generator=g) * torch.tensor([w, h]) * 0.7
        wh = 16 + torch.rand(num_gt, 2, generator=g) * min(h, w) * 0.3
        boxes = torch.cat([xy, torch.minimum(xy + wh, torch.tensor([w, h]))], dim=1)
        masks = torch.zeros(num_gt, h, w, dtype=torch.bool)
        for m, (x1, y1, x2, y2) in zip(masks, boxes.long().tolist()):
            m[y1:y2, x1:x2] = True
        labels = torch.randint(0, num_classes, (num_gt,), generator=g)
        targets.append({"boxes": boxes, "labels": labels, "masks": masks})
    return images, targets


def build_detector(backbone: str, *, amp_heads: bool = False):
    """CenterNet2 with random weights and random fed-loss weights: ``r50`` = configs/r50.toml, ``swinl`` =
    configs/swinl.toml, ``swin-t`` = swinl.toml's model with Swin-T widths. Returns (model, num_classes)."""
    if backbone not in BACKBONES:
        raise ValueError(f"backbone {backbone!r}: expected one of {BACKBONES}")
    cfg = load_config(ROOT / "configs" / ("r50.toml" if backbone == "r50" else "swinl.toml")).model
    if backbone == "swin-t":  # Swin-T widths: Swin-L does not fit a CPU benchmark's time budget
        cfg = dataclasses.replace(
            cfg, swin=SwinConfig(embed_dim=96, depths=[2, 2, 6, 2], num_heads=[3, 6, 12, 24], window_size=7)
        )
    cfg = dataclasses.replace(cfg, amp_heads=amp_heads)
    torch.manual_seed(0)
    model = build_model(cfg)
    model.roi_heads.set_fed_loss_weights(torch.rand(cfg.num_classes) * 1000 + 1)
    return model, cfg.num_classes


def autocast_forward(model: torch.nn.Module, device: str, precision: str, *, methods=("forward",)) -> None:
    """Wrap ``model.<method>`` in ``torch.autocast(device, dtype)`` for each method, as Accelerate's ``prepare``
    wraps ``forward`` (and only it: other methods, such as ``reference_cls_loss``, run in fp32 there)."""
    dtype = PRECISIONS[precision]
    if dtype is None:
        return
    for name in methods:
        setattr(model, name, torch.autocast(device, dtype=dtype)(getattr(model, name)))


def grad_scaler(device: str, precision: str):
    """The fp16 loss scaler (``accelerator.backward`` scales the loss with one); None for fp32/bf16."""
    return torch.amp.GradScaler(device) if precision == "fp16" else None


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2  # Linux: KiB


def measure(step: Callable[[int], None], *, device: str, iters: int, warmup: int) -> dict:
    """Run ``step(i)`` ``warmup`` times, then time ``iters`` steps (synchronised on CUDA); peak memory of the
    timed steps. Returns median_s, min_s, peak_rss_gb and, on CUDA, static/peak allocated/reserved GiB."""
    cuda = device == "cuda"
    for i in range(warmup):
        step(i)
    out = {}
    if cuda:
        torch.cuda.synchronize()
        # Allocated between two steps: weights, the last step's gradients, the batch (and BSGAL's cache).
        out["static_gib"] = torch.cuda.memory_allocated() / 1024**3
        torch.cuda.reset_peak_memory_stats()
    times = []
    for i in range(iters):
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        step(warmup + i)
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    out.update(median_s=statistics.median(times), min_s=min(times), peak_rss_gb=peak_rss_gb())
    if cuda:
        out["peak_alloc_gib"] = torch.cuda.max_memory_allocated() / 1024**3
        out["peak_reserved_gib"] = torch.cuda.max_memory_reserved() / 1024**3
    return out


def environment(device: str) -> dict:
    """What a result row needs to be read later: torch version, device name, matmul precision."""
    env = {"torch": torch.__version__, "device": device}
    if device == "cuda":
        env["device_name"] = torch.cuda.get_device_name()
        env["matmul_precision"] = torch.get_float32_matmul_precision()  # "highest" = no TF32 matmuls
    else:
        env["device_name"] = platform.processor() or platform.machine()
        env["threads"] = torch.get_num_threads()
    return env


def run_configs(
    configs: list[tuple[dict, list[str]]], *, timeout: float | None, json_path: str | None
) -> list:
    """Run each configuration's command (a fresh process printing one JSON line) and collect the results. A
    failure (exit status, timeout, no JSON) becomes ``{**config, "error": ...}``; each result is appended to
    ``json_path`` as soon as it exists, so that a later crash loses nothing."""
    results = []
    for config, args in configs:
        cmd = [sys.executable, *args]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
            lines = [ln for ln in proc.stdout.strip().splitlines() if ln.startswith("{")]
            if proc.returncode == 0 and lines:
                result = {**config, **json.loads(lines[-1])}
            else:
                err = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
                result = {**config, "error": f"exit {proc.returncode}: " + (err[-1] if err else "no output")}
                sys.stderr.write(proc.stderr)  # the whole traceback, for the log
        except subprocess.TimeoutExpired:
            result = {**config, "error": f"timeout after {timeout:.0f} s"}
        if "error" in result:
            result["error"] = result["error"][:300].replace("|", "/")  # a Markdown table cell
        results.append(result)
        print(json.dumps(result), flush=True)
        if json_path:
            with open(json_path, "a") as f:
                f.write(json.dumps(result) + "\n")
    return results


def read_jsonl(path: str, bench: str) -> list[dict]:
    """The rows of ``bench`` in a ``--json`` file (other benchmarks' rows and torn lines are skipped)."""
    rows = []
    for line in Path(path).read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if row.get("bench") == bench:
            rows.append(row)
    return rows


def fmt(value, spec: str = ".2f") -> str:
    return "-" if value is None else format(value, spec)


# ------------------------------------------------------------------------------------------ this benchmark


def run(
    *,
    mode: str,
    backbone: str,
    device: str,
    precision: str,
    batch: int,
    size: tuple[int, int],
    iters: int,
    warmup: int,
    amp_heads: bool,
    profile: bool,
) -> dict:
    model, num_classes = build_detector(backbone, amp_heads=amp_heads)
    model.to(device)
    autocast_forward(model, device, precision)
    scaler = grad_scaler(device, precision)
    if mode == "train":
        model.train()
        images, targets = make_batch(batch, size, 10, num_classes)
        images = [im.to(device) for im in images]
        targets = [{k: v.to(device) for k, v in t.items()} for t in targets]

        def step(_: int):
            model.zero_grad(set_to_none=True)  # as after the optimizer step: no gradient alive in the forward
            total = sum(model(images, targets).values())
            (scaler.scale(total) if scaler else total).backward()

    else:
        model.eval()
        images = [im.to(device) for im in make_batch(batch, size, 0, num_classes)[0]]

        def step(_: int):
            with torch.no_grad():
                model(images)

    result = dict(bench="step", mode=mode, backbone=backbone, precision=precision, amp_heads=amp_heads)
    result.update(batch=batch, height=size[0], width=size[1], iters=iters, warmup=warmup)
    result.update(environment(device))
    result.update(measure(step, device=device, iters=iters, warmup=warmup))
    result["images_per_s"] = batch / result["median_s"]
    if profile:
        from torch.profiler import ProfilerActivity
        from torch.profiler import profile as torch_profile

        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
        with torch_profile(activities=activities) as prof:
            step(0)
        # On CUDA both: the kernels that cost device time, and the host-side work that keeps the GPU waiting.
        for sort in ("device_time_total", "self_cpu_time_total") if device == "cuda" else ("cpu_time_total",):
            print(prof.key_averages().table(sort_by=sort, row_limit=25), file=sys.stderr)
    return result


def cpu_table(results: list[dict]) -> str:
    """The CPU table as RESULTS.md has always had it (one row per mode)."""
    lines = ["| what | median s | min s | peak RSS GB |", "|---|---:|---:|---:|"]
    for r in results:
        if "error" in r:
            lines.append(f"| {r['mode']} | {r['error']} | | |")
        else:
            lines.append(f"| {r['mode']} | {r['median_s']:.2f} | {r['min_s']:.2f} | {r['peak_rss_gb']:.2f} |")
    return "\n".join(lines)


def table(results: list[dict]) -> str:
    """Every configuration, GPU memory columns included ("-" on CPU)."""
    lines = [
        "| mode | backbone | precision | batch × size | median s | min s | images/s | static GiB "
        "| peak alloc GiB | peak reserved GiB | peak RSS GB |",
        "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        prec = r["precision"] + (" heads" if r.get("amp_heads") else "")
        what = f"| {r['mode']} | {r['backbone']} | {prec} | {r['batch']} × {r['height']}×{r['width']} |"
        if "error" in r:
            lines.append(f"{what} {r['error']} | | | | | | |")
            continue
        lines.append(
            f"{what} {r['median_s']:.3f} | {r['min_s']:.3f} | {r['images_per_s']:.1f} "
            f"| {fmt(r.get('static_gib'))} | {fmt(r.get('peak_alloc_gib'))} | {fmt(r.get('peak_reserved_gib'))} "
            f"| {r['peak_rss_gb']:.2f} |"
        )
    return "\n".join(lines)


def add_run_arguments(parser: argparse.ArgumentParser, *, bench: str, unit: str) -> None:
    """The options step.py and bsgal.py share: threads, per-run timeout, JSON output and summary, --write."""
    parser.add_argument(
        "--threads", type=int, help="torch CPU threads (default 2 on CPU, torch's own on CUDA)"
    )
    parser.add_argument("--timeout", type=float, help=f"seconds per {unit} before it counts as failed")
    parser.add_argument("--json", metavar="PATH", help=f"append one JSON line per {unit} to PATH")
    parser.add_argument(
        "--summary", metavar="PATH", help=f"only print the table of the {bench} rows of a --json file"
    )
    parser.add_argument(
        "--write", action="store_true", help="write the results into benchmarks/RESULTS.md (CPU)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--mode", choices=["train", "infer"], help="run one configuration in this process")
    parser.add_argument("--modes", nargs="+", choices=["train", "infer"], default=["train", "infer"])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--precision", nargs="+", choices=list(PRECISIONS), default=["fp32"])
    parser.add_argument("--backbone", choices=BACKBONES, default="r50")
    parser.add_argument("--batch", type=int, nargs="+", default=[2], help="training images per step")
    parser.add_argument("--size", type=int, help="training side (default 640 R50 and Swin-T, 896 Swin-L)")
    parser.add_argument(
        "--infer-size", type=int, nargs=2, metavar=("H", "W"), help="default 640² CPU, 800×1333 GPU"
    )
    parser.add_argument("--infer-batch", type=int, nargs="+", help="default 1 on CPU, 1 and 8 on a GPU")
    parser.add_argument("--amp-heads", action="store_true", help="autocast the heads too (model.amp_heads)")
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    add_run_arguments(parser, bench="step", unit="configuration")
    parser.add_argument("--profile", action="store_true", help="print a torch.profiler table (with --mode)")
    args = parser.parse_args()
    if args.summary:
        print(table(read_jsonl(args.summary, "step")))
        return
    default_cpu = (args.device, args.backbone, args.precision, args.batch) == ("cpu", "r50", ["fp32"], [2])
    if args.write and not (default_cpu and args.size in (None, 640) and not args.amp_heads):
        parser.error("--write records the default CPU table (R50, fp32, batch 2 × 640²); others go to --json")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch.cuda.is_available() is False")
    threads = args.threads or (2 if args.device == "cpu" else None)
    if threads:
        torch.set_num_threads(threads)
    size = args.size or TRAIN_SIZE[args.backbone]
    cpu = args.device == "cpu"
    infer_size = tuple(args.infer_size) if args.infer_size else ((size, size) if cpu else (800, 1333))
    if args.mode:
        if len(args.precision) != 1 or len(args.batch) != 1:
            parser.error("--mode runs one configuration: give one --precision and one --batch")
        result = run(
            mode=args.mode,
            backbone=args.backbone,
            device=args.device,
            precision=args.precision[0],
            batch=args.batch[0],
            size=(size, size) if args.mode == "train" else infer_size,
            iters=args.iters,
            warmup=args.warmup,
            amp_heads=args.amp_heads,
            profile=args.profile,
        )
        print(json.dumps(result))
        return
    configs = []
    common = ["--backbone", args.backbone, "--device", args.device, "--iters", str(args.iters)]
    common += ["--warmup", str(args.warmup), "--size", str(size), "--infer-size", *map(str, infer_size)]
    common += ["--threads", str(threads)] if threads else []
    common += ["--amp-heads"] if args.amp_heads else []
    for mode in args.modes:  # each configuration in a fresh process, so that peaks are its own
        batches = args.batch if mode == "train" else (args.infer_batch or ([1] if cpu else [1, 8]))
        h, w = (size, size) if mode == "train" else infer_size
        for precision in args.precision:
            for batch in batches:
                config = {"bench": "step", "mode": mode, "backbone": args.backbone, "precision": precision}
                config.update(amp_heads=args.amp_heads, batch=batch, height=h, width=w, device=args.device)
                cmd = [__file__, "--mode", mode, "--precision", precision, "--batch", str(batch), *common]
                configs.append((config, cmd))
    results = run_configs(configs, timeout=args.timeout, json_path=args.json)
    print(table(results))
    if args.write:
        lines = cpu_table(results)
        print(lines)
        cpu_name = platform.processor() or platform.machine()
        header = (
            f"## step.py: R50 CenterNet2, CPU, {threads} threads\n\n"
            f"`python benchmarks/step.py --iters {args.iters} --write` on {cpu_name}, "
            f"torch {torch.__version__}, {time.strftime('%Y-%m-%d')}. Train: batch 2 x 640², 10 GT each, fwd+bwd. "
            "Infer: 1 x 640², no_grad.\n\n"
        )
        write_section("## step.py", header + lines + "\n")


if __name__ == "__main__":
    main()
