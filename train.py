"""Train CenterNet2 on LVIS, as X-Paste / BSGAL / DiverGen do (reference/centernet2.md §4).

    python train.py --config configs/tiny.toml                            # one process (CPU or one GPU)
    accelerate launch train.py --config configs/swinl.toml                # every GPU of this machine
    accelerate launch --num_processes 4 train.py --config configs/r50.toml --set train.output_dir=runs/r50
    accelerate launch --multi_gpu --num_processes 2 train.py --config configs/demo.toml   # also on CPUs (gloo)
    # two nodes of 8 GPUs: run on each node with its own --machine_rank (0, 1)
    accelerate launch --multi_gpu --num_machines 2 --num_processes 16 --machine_rank 0 \\
        --main_process_ip 10.0.0.1 --main_process_port 29500 train.py --config configs/swinl.toml

Any config key can be overridden: --set solver.lr=2e-4 --set model.swin.depths=[2,2,6,2] --set train.seed=1.
Resume after a crash or preemption: add --resume (the newest checkpoint of train.output_dir; starts fresh if there
is none) or --resume runs/r50/checkpoints/0010000. Mixed precision comes from the Accelerate config or
`accelerate launch --mixed_precision bf16`; fp32 when not set (CPU).
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
    parser.add_argument(
        "--resume",
        nargs="?",
        const=True,
        default=False,
        metavar="DIR",
        help="continue from the newest checkpoint of train.output_dir, or from checkpoint directory DIR",
    )
    args, cfg = parse_config_args(parser, argv)
    # Imported here so that --help and config errors answer without importing torch.
    from divergen.engine import train

    summary = train(cfg, resume=args.resume)
    # The final evaluation (of the EMA weights) has printed its table already.
    log.info("finished at iteration %d; last checkpoint %s", summary["iteration"], summary["checkpoint"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
