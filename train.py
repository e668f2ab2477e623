"""Train CenterNet2 on LVIS, as X-Paste / BSGAL / DiverGen do (reference/centernet2.md §4).

    python train.py --config configs/tiny.toml                            # one process (CPU or one GPU)
    accelerate launch train.py --config configs/swinl.toml                # every GPU of this machine
    accelerate launch --num_processes 4 train.py --config configs/r50.toml --set train.output_dir=runs/r50
    # two nodes of 8 GPUs: run on each node with its own --machine_rank (0, 1)
    accelerate launch --multi_gpu --num_machines 2 --num_processes 16 --machine_rank 0 \\
        --main_process_ip 10.0.0.1 --main_process_port 29500 train.py --config configs/swinl.toml

Any config key can be overridden: --set solver.lr=2e-4 --set model.swin.depths=[2,2,6,2] --set train.seed=1.
For now this builds the model and reports its size; the training loop arrives with the training issue.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from divergen.config import parse_config_args

log = logging.getLogger("train")


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s: %(message)s")
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    args, cfg = parse_config_args(parser, argv)
    # Imported here so that --help and config errors answer without importing torch.
    from divergen.model import build_model

    model = build_model(cfg.model)
    n_params = sum(p.numel() for p in model.parameters())
    log.info(
        "CenterNet2 from %s: backbone %s, %d classes, %.2f M parameters",
        args.config,
        cfg.model.backbone,
        cfg.model.num_classes,
        n_params / 1e6,
    )
    log.error("the training loop is not implemented yet: it arrives with the training issue")
    return 2


if __name__ == "__main__":
    sys.exit(main())
