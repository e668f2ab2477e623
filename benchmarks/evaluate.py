"""Wall time of one evaluation pass on the synthetic val set: inference, then LVIS AP (ours and lvis-api).

    python benchmarks/evaluate.py --weights output/demo           # the demo model trained by `make demo`
    python benchmarks/evaluate.py --weights output/demo --write   # ... and write the section in RESULTS.md

Inference = ``run_evaluation``'s pass over the val split of ``data/synthetic`` (``python -m divergen.synthetic``
defaults: 60 images 256x320, 24 categories) with ``configs/demo.toml``, one process: the model's forward and
the conversion of its detections to LVIS results (boxes, RLE masks at the original size), reported separately.
LVIS AP = ``evaluate_lvis`` (bbox + segm) on those results, timed on its own (best of ``--repeats``); then the
reference evaluator, lvis-api 0.5.3 (``LVISEval``, with the ``np.float`` shim it needs under numpy 2), on the
same results when the ``lvis`` package is installed; both must give the same AP. Both evaluators run again on
the val set tiled ``--tile`` times (images, annotations and detections copied under new image ids), where fixed
costs matter less. Without ``--weights`` the model is random-init, and its detections are not a trained model's.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import io
import json
import logging
import os
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from results import write_section  # noqa: E402 (benchmarks/ is on sys.path when run as a script)

from divergen.config import load_config  # noqa: E402
from divergen.evaluation import evaluate_lvis, run_evaluation  # noqa: E402
from divergen.model import build_model  # noqa: E402
from divergen.synthetic import make_synthetic_lvis  # noqa: E402
from tests.lvis_reference import lvis_api_evaluate as reference_evaluate  # noqa: E402
from tests.lvis_reference import patch_lvis_import  # noqa: E402


def lvis_api_evaluate(gt: dict, results: list[dict], iou_type: str, max_dets: int) -> dict[str, float]:
    """lvis-api 0.5.3 as detectron2's LVISEvaluator calls it (tests/lvis_reference.py), its prints silenced."""
    patch_lvis_import()
    with contextlib.redirect_stdout(io.StringIO()):
        return reference_evaluate(gt, results, iou_type, max_dets)[0]


def tile_dataset(gt: dict, results: list[dict], tile: int) -> tuple[dict, list[dict]]:
    """``tile`` copies of every image, its annotations and its detections, under new ids (a larger set)."""
    if tile == 1:
        return gt, results
    step = max(im["id"] for im in gt["images"]) + 1
    images = [{**im, "id": im["id"] + k * step} for k in range(tile) for im in gt["images"]]
    anns = [
        {**a, "id": i + 1, "image_id": a["image_id"] + k * step}
        for i, (k, a) in enumerate((k, a) for k in range(tile) for a in gt["annotations"])
    ]
    dets = [{**r, "image_id": r["image_id"] + k * step} for k in range(tile) for r in results]
    return {**gt, "images": images, "annotations": anns}, dets


def best_of(repeats: int, fn):
    """(shortest wall time of ``repeats`` calls, the last call's result)."""
    times, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return min(times), out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", default="configs/demo.toml")
    parser.add_argument("--weights", help="weights file, checkpoint or run directory; default: random init")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each evaluator; the best is kept")
    parser.add_argument("--tile", type=int, default=20, help="also evaluate the val set repeated this often")
    parser.add_argument("--write", action="store_true", help="write the results into benchmarks/RESULTS.md")
    args = parser.parse_args()
    os.chdir(ROOT)  # the config's relative data paths
    logging.basicConfig(level=logging.WARNING)
    from accelerate import Accelerator

    from divergen.checkpoint import load_weights

    sys.path.insert(0, str(ROOT))
    from evaluate import latest_checkpoint

    cfg = load_config(args.config)
    if not Path(cfg.data.val_json).is_file():  # `python -m divergen.synthetic --root data/synthetic`
        make_synthetic_lvis(Path(cfg.data.val_json).parent)
    model = build_model(cfg.model)
    if args.weights:
        load_weights(model, latest_checkpoint(args.weights))
    model.eval()
    accelerator = Accelerator(cpu=True)
    out = Path("output") / "benchmark_evaluate"
    run_evaluation(model, cfg, accelerator, out)  # warm-up: first-call allocations, loader start
    timings: dict[str, float] = {}
    run_evaluation(model, cfg, accelerator, out, timings=timings)
    gt = json.loads(Path(cfg.data.val_json).read_text())
    results = json.loads((out / "results.json").read_text())
    has_ref = importlib.util.find_spec("lvis") is not None
    n = int(timings["images"])
    lines = [
        "| stage | images | detections | wall time (s) | per image (ms) |",
        "|---|---:|---:|---:|---:|",
        f"| inference: model forward | {n} | {len(results)} | {timings['model_s']:.2f} "
        f"| {1000 * timings['model_s'] / n:.0f} |",
        f"| inference: detections -> LVIS results (RLE) | {n} | {len(results)} | {timings['evaluator_s']:.2f} "
        f"| {1000 * timings['evaluator_s'] / n:.1f} |",
    ]
    speedups = []
    for tile in (1, args.tile):
        tiled_gt, tiled_results = tile_dataset(gt, results, tile)
        ours_s, ours = best_of(
            args.repeats, lambda g=tiled_gt, r=tiled_results: evaluate_lvis(g, r, max_dets=cfg.eval.max_dets)
        )
        rows = [("ours (`evaluate_lvis`)", ours_s)]
        if has_ref:
            ref_s, ref = best_of(
                args.repeats if tile == 1 else 1,
                lambda g=tiled_gt, r=tiled_results: {
                    t: lvis_api_evaluate(g, r, t, cfg.eval.max_dets) for t in ("bbox", "segm")
                },
            )
            for t in ref:  # the same numbers, or the timing compares different computations
                assert abs(ref[t]["AP"] - ours[t]["AP"]) < 1e-12, (t, ref[t]["AP"], ours[t]["AP"])
            rows.append(("lvis-api 0.5.3", ref_s))
            speedups.append(f"{ref_s / ours_s:.0f}x on {len(tiled_gt['images'])} images")
        if tile == 1:
            metrics = ours
        m = len(tiled_gt["images"])
        for name, sec in rows:
            lines.append(
                f"| LVIS AP (bbox + segm), {name} | {m} | {len(tiled_results)} | {sec:.3f} | {1000 * sec / m:.1f} |"
            )
    table = "\n".join(lines)
    speedup = f" Ours is {' and '.join(speedups)} faster than lvis-api, with the same AP." if speedups else ""
    summary = (
        f"{'The trained' if args.weights else 'A random-init'} model's box AP {100 * metrics['bbox']['AP']:.1f}, "
        f"mask AP {100 * metrics['segm']['AP']:.1f}."
        f"{speedup} The {args.tile * n}-image case is the val set tiled {args.tile} times (new image ids)."
    )
    print(table)
    print(summary)
    if args.write:
        machine = f"{platform.processor() or platform.machine()}, {len(os.sched_getaffinity(0))} cores"
        weights = f" --weights {args.weights}" if args.weights else ""
        header = " ".join([
            "## evaluate.py: one evaluation pass on the synthetic val set, CPU\n\n`python benchmarks/evaluate.py",
            f"--config {args.config}{weights} --write` on {machine}, {torch.get_num_threads()} torch thread(s),",
            f"torch {torch.__version__}, {time.strftime('%Y-%m-%d')}. One process (`run_evaluation`), eval",
            f"batch {cfg.eval.batch_size}, test size {cfg.data.test_short_edge}/{cfg.data.test_max_size},",
            f"at most {cfg.eval.max_dets} detections per image; best of {args.repeats} runs (lvis-api on the tiled",
            f"set: one run). {summary} Shared machine: times move with",
            f"its load (load average before the run: {LOAD_BEFORE:.1f}).\n\n",
        ])  # fmt: skip
        write_section("## evaluate.py", header + table + "\n")


LOAD_BEFORE = os.getloadavg()[0]

if __name__ == "__main__":
    main()
