"""Evaluate a CenterNet2 checkpoint on LVIS v1 val (box and mask AP, results JSON).

    python evaluate.py --config configs/tiny.toml --set model.weights=output/tiny/model_final.safetensors
    accelerate launch evaluate.py --config configs/swinl.toml --set model.weights=models/swinl.safetensors

Not implemented yet: it arrives with the evaluation issue.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from divergen.config import parse_config_args

log = logging.getLogger("evaluate")


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s: %(message)s")
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    args, _ = parse_config_args(parser, argv)
    log.error("evaluate.py is not implemented yet (config %s loaded fine)", args.config)
    return 2


if __name__ == "__main__":
    sys.exit(main())
