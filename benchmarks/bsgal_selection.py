"""Does BSGAL reject corrupted generated instances? Acceptance rates by corruption type on the synthetic data.

    python benchmarks/bsgal_selection.py --weights output/demo/checkpoints/0000200/model.safetensors --write

The synthetic "generated" pool (``python -m divergen.synthetic --pool-per-category 40``) records each instance's
corruption (none, wrong_label, noise, bad_mask). This script splits it into one pool per corruption type, then for
each runs BSGAL's grad-cache selection (``configs/demo.toml`` with paste and ``[bsgal]`` on: the one-forward
only-paste candidate, τ = -0.05) on the same sequence of training samples (same images, crops and sampling seeds)
with the given weights, which stay fixed (no optimizer step), and reports per pool the mean cosine, the
acceptance rate at τ, and the acceptance rate at one threshold common to all pools (the median of all scores).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from results import write_section  # noqa: E402 (benchmarks/ is on sys.path when run as a script)

from divergen.bsgal_step import Selector  # noqa: E402
from divergen.checkpoint import load_weights  # noqa: E402
from divergen.config import load_config  # noqa: E402
from divergen.data import collate  # noqa: E402
from divergen.model import build_model  # noqa: E402
from divergen.paste import build_train_dataset  # noqa: E402
from divergen.pool import write_pool_index  # noqa: E402

KINDS = ("none", "wrong_label", "noise", "bad_mask")


def split_pool(pool_jsonl: Path, out: Path) -> dict[str, Path]:
    """One pool.jsonl per corruption type (absolute paths to the same PNGs)."""
    records = [json.loads(line) for line in pool_jsonl.read_text().splitlines() if line.strip()]
    paths = {}
    for kind in KINDS:
        mine = [
            {**r, "path": str((pool_jsonl.parent / r["path"]).resolve())}
            for r in records
            if r["corruption"] == kind
        ]
        if not mine:
            raise ValueError(f"{pool_jsonl} has no instance with corruption {kind!r}")
        paths[kind] = write_pool_index(mine, out / kind / "pool.jsonl")
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", default=str(ROOT / "configs" / "demo.toml"))
    parser.add_argument("--weights", required=True, help="the detector's weights (a safetensors file)")
    parser.add_argument("--pool", default=str(ROOT / "data" / "synthetic" / "pool" / "pool.jsonl"))
    parser.add_argument("--batches", type=int, default=40)
    parser.add_argument("--write", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    base = load_config(args.config, ["paste.enabled=true", "bsgal.enabled=true"])
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        pools = split_pool(Path(args.pool), Path(tmp))
        for kind, pool in pools.items():
            cfg = dataclasses.replace(base, paste=dataclasses.replace(base.paste, pool=str(pool)))
            dataset = build_train_dataset(cfg, return_original=True, return_reference=True)
            torch.manual_seed(0)
            model = build_model(cfg.model)
            load_weights(model, args.weights)
            model.train()
            selector = Selector(
                cfg.bsgal, model, max_iter=args.batches, rank=0, world_size=1, output_dir=Path(tmp)
            )
            rng = np.random.default_rng(0)  # the same samples for every pool
            scores, accepted = [], []
            for it in range(args.batches):
                keys = [(int(rng.integers(len(dataset))), int(rng.integers(2**31))) for _ in range(4)]
                images, targets, infos = collate([dataset[k] for k in keys])
                _, record = selector.select(model, images, targets, infos, it)
                model.zero_grad(set_to_none=True)
                if record["score"] is not None:
                    scores.append(record["score"])
                    accepted.append(record["accepted"])
            rows.append((kind, np.array(scores), np.array(accepted)))
            print(kind, len(scores), np.mean(accepted), np.mean(scores), flush=True)
    # A common threshold, the median of every pool's scores (what a dynamic threshold at r = 0.5 would settle
    # on for a pool mixing the four in equal parts): which kinds fall below it.
    common = float(np.median(np.concatenate([s for _, s, _ in rows])))
    lines = [
        f"| pool | batches | mean cosine | accepted, τ = {base.bsgal.tau} | accepted, median {common:+.3f} |",
        "|---|---:|---:|---:|---:|",
    ]
    lines += [
        f"| {k} | {len(s)} | {s.mean():+.3f} | {a.mean():.2f} | {(s >= common).mean():.2f} |"
        for k, s, a in rows
    ]
    table = "\n".join(lines)
    print(table)
    if args.write:
        text = (
            "## bsgal_selection.py — acceptance by corruption type, synthetic data\n\n"
            f"`python benchmarks/bsgal_selection.py --weights {args.weights} --batches {args.batches} --write` "
            f"({platform.processor() or platform.machine()}, torch {torch.__version__}, "
            f"{time.strftime('%Y-%m-%d')}): the demo detector's weights fixed, batches of 4 training images with "
            "0-19 instances pasted from a pool of one corruption type each (the same images, crops and draws for "
            "every pool), BSGAL's one-forward grad-cache selection.\n\n" + table + "\n"
        )
        write_section("## bsgal_selection.py", text)


if __name__ == "__main__":
    main()
