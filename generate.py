"""Generate an instance pool for instance-paste training: prompts -> text-to-image -> SAM-background masks
-> CLIP filtering -> RGBA cutouts + pool.jsonl (reference/divergen.md §1; the stages: divergen/generation.py).

    python generate.py --config configs/generate_demo.toml
    accelerate launch generate.py --config configs/generate_if.toml --set output_dir=pools/if
    python generate.py --config configs/generate_if.toml --stage pool --set filter.min_inter_similarity=0.65

Every stage skips the work it finds done, so the same command resumes an interrupted run. Under
``accelerate launch`` each process takes whole categories and the first one merges them into the pool.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Sequence

from divergen.config import ConfigError, parse_config_args, save_config
from divergen.generation import STAGES, GenerateConfig, generate_config_errors, run

log = logging.getLogger("generate")


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s: %(message)s")
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--stage",
        dest="stages",
        action="append",
        choices=STAGES,
        help=f"run only this stage (repeatable; default: all, in the order {', '.join(STAGES)})",
    )
    parser.add_argument("--no-progress", action="store_true", help="no tqdm bars")
    args, cfg = parse_config_args(parser, argv, schema=GenerateConfig)
    errors = generate_config_errors(cfg)
    if errors:
        parser.error(str(ConfigError(f"in {args.config}:\n  " + "\n  ".join(errors))))

    import torch
    from accelerate import PartialState

    # Several processes on a machine without GPUs (`accelerate launch --multi_gpu`, torchrun): Accelerate would run
    # each process alone unless told it is a CPU run (gloo), as train.py and evaluate.py do.
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    state = PartialState(cpu=world_size > 1 and not torch.accelerator.is_available())
    if state.num_processes != world_size:
        log.error(
            "launched as %d processes (WORLD_SIZE) but Accelerate runs %d", world_size, state.num_processes
        )
        return 2
    if state.is_main_process:
        save_config(cfg, f"{cfg.output_dir}/config.toml")
    results = run(
        cfg,
        args.stages or STAGES,
        rank=state.process_index,
        world_size=state.num_processes,
        device=cfg.device or state.device,
        barrier=state.wait_for_everyone,
        progress=not args.no_progress,
    )
    if state.is_main_process:
        log.info("done: %s", json.dumps(results, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
