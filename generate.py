"""Generate an instance pool for instance-paste training: prompts -> text-to-image -> SAM-background masks
-> CLIP filtering -> RGBA cutouts + pool.jsonl (reference/divergen.md §1).

    python generate.py --config configs/generate_demo.toml
    accelerate launch generate.py --config configs/generate_sd.toml --set output_dir=pools/sd

Not implemented yet: it arrives with the generation issue, which brings its own config schema (a top-level
output_dir and one section per stage); until then --config is checked against the detector schema.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from divergen.config import parse_config_args

log = logging.getLogger("generate")


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s: %(message)s")
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    args, _ = parse_config_args(parser, argv)
    log.error("generate.py is not implemented yet (config %s loaded fine)", args.config)
    return 2


if __name__ == "__main__":
    sys.exit(main())
