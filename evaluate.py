"""Evaluate a CenterNet2 checkpoint: LVIS (or COCO) box and mask AP on the config's validation set.

    python evaluate.py --config configs/demo.toml --weights output/demo/checkpoints/0001000
    accelerate launch evaluate.py --config configs/swinl.toml --weights models/swinl.safetensors
    accelerate launch --num_processes 2 evaluate.py --config configs/r50.toml --weights run/ema.safetensors \\
        --set data.val_json=datasets/lvis/lvis_v1_minival.json --output runs/r50/minival

--weights takes a .safetensors file, a checkpoint directory of train.py (<output_dir>/checkpoints/<iteration>,
its EMA weights when present), or a run's output directory (its latest checkpoint).
Each process runs inference on its own shard of data.val_json; the main process writes results.json (LVIS
results: boxes xywh, RLE masks, LVIS category ids, <= eval.max_dets per image) and metrics.json (AP, AP50, AP75,
APs/m/l, APr/c/f per IoU type, and per-category AP) to --output, and prints the table. LVIS-format ground truth
(images with neg_category_ids) gets LVIS's federated evaluation (divergen/lvis_eval.py), COCO-format ground
truth pycocotools' COCOeval.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from divergen.config import parse_config_args

log = logging.getLogger("evaluate")


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s: %(message)s")
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--weights",
        metavar="PATH",
        help="a .safetensors file, a train.py checkpoint directory or run directory (default: model.weights)",
    )
    parser.add_argument(
        "--output",
        metavar="DIR",
        help="where results.json and metrics.json go (default: <train.output_dir>/inference)",
    )
    args, cfg = parse_config_args(parser, argv)
    # Checked before torch is imported and the model built, so that a typo fails in a second.
    weights = args.weights or cfg.model.weights
    if not weights:
        parser.error("no weights to evaluate: pass --weights PATH (or set model.weights in the config)")
    if not Path(weights).exists():
        parser.error(f"--weights {weights}: no such file or checkpoint directory")
    try:
        weights = latest_checkpoint(weights)
    except FileNotFoundError as e:
        parser.error(f"--weights {weights}: {e}")
    if not Path(cfg.data.val_json).is_file():
        parser.error(
            f"data.val_json = {cfg.data.val_json!r} (config {args.config}): the validation annotation file "
            "does not exist; set it with --set data.val_json=PATH"
        )
    output_dir = Path(args.output or Path(cfg.train.output_dir) / "inference")

    import torch
    from accelerate import Accelerator

    from divergen.checkpoint import load_weights
    from divergen.evaluation import format_table, run_evaluation
    from divergen.model import build_model

    # The federated loss's class frequencies only matter for training (and the checkpoint holds them anyway).
    cfg.model = dataclasses.replace(cfg.model, fed_loss_cat_info="", weights="")
    # Several processes on a machine without GPUs (`accelerate launch --multi_gpu` there, torchrun): Accelerate
    # would run each process alone, each evaluating everything, unless told it is a CPU run (gloo); as engine.py.
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    accelerator = Accelerator(cpu=world_size > 1 and not torch.accelerator.is_available())
    model = build_model(cfg.model)
    try:
        metadata = load_weights(model, weights, strict=True)
    except (FileNotFoundError, ValueError) as e:
        log.error("cannot load the weights: %s", e)
        return 1
    log.info("evaluating %s (iteration %s)", weights, metadata.get("iteration", "unknown"))
    model.to(accelerator.device).eval()
    metrics = run_evaluation(model, cfg, accelerator, output_dir)
    if accelerator.is_main_process:
        print(f"AP (%) of {weights} on {cfg.data.val_json}:\n{format_table(metrics)}")
        print(f"results.json and metrics.json (with per-category AP) written to {output_dir}")
    accelerator.end_training()
    return 0


def latest_checkpoint(path: str | Path) -> Path:
    """A run's output directory -> its latest ``checkpoints/<iteration>`` directory; any other path as it is."""
    path = Path(path)
    checkpoints = path / "checkpoints"
    if not checkpoints.is_dir():
        return path
    iterations = sorted(
        (p for p in checkpoints.iterdir() if p.is_dir() and p.name.isdigit()), key=lambda p: int(p.name)
    )
    if not iterations:
        raise FileNotFoundError(f"{checkpoints} holds no checkpoint directory")
    return iterations[-1]


if __name__ == "__main__":
    sys.exit(main())
