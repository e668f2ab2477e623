"""Class-wise NMS strategies at LVIS sizes: the ROI heads' last step at inference (``boxes.batched_nms``).

    python benchmarks/nms.py --device cuda          # a Markdown table; --json PATH appends one line per row

Per image the cascade scores up to 256 proposals x 1203 classes; every (RoI, class) pair above the score
threshold (1e-4) enters a class-wise NMS (IoU 0.5). How many pass depends on the model: a random-init model passes
them all (~300k), a trained one far fewer. Candidates here: ``N`` boxes drawn around 256 "proposals" (so boxes
of a proposal overlap across classes, as in the real case), classes drawn with a long tail over 1203, scores
uniform. Strategies: torchvision's ``batched_nms`` (which on CUDA loops over the classes above 20000 coordinates,
one synchronising ``where`` per class), its coordinate trick (one NMS over all boxes, offset per class), and
``divergen.boxes.batched_nms`` (one sort, one NMS per class slice on the CPU; torchvision's choice elsewhere).
Every strategy must keep the same boxes. Last column: ``divergen.boxes.batched_nms_topk`` with ``topk = 300``
(what the ROI heads run: NMS on the best-scored candidates first), checked against the first 300 of the others.
Times: median of ``--repeats`` after a warm-up, device synchronised.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torchvision
from torchvision.ops import boxes as tv_boxes

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from divergen.boxes import batched_nms, batched_nms_topk, nms_per_class_slice  # noqa: E402


def candidates(n: int, *, num_classes: int = 1203, proposals: int = 256, device: str, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    centre = torch.rand(proposals, 2, generator=g) * torch.tensor([1333.0, 800.0])
    size = torch.exp(torch.rand(proposals, 2, generator=g) * 4 + 2)  # 7-400 px
    owner = torch.randint(proposals, (n,), generator=g)
    jitter = 1 + 0.1 * torch.randn(n, 4, generator=g)
    half = size[owner].repeat(1, 2) * 0.5 * jitter
    boxes = torch.cat([centre[owner], centre[owner]], 1) + torch.cat([-half[:, :2], half[:, 2:]], 1)
    weights = 1.0 / torch.arange(1, num_classes + 1).float()  # a long tail: class k drawn ~ 1/k
    labels = torch.multinomial(weights, n, replacement=True, generator=g)
    scores = torch.rand(n, generator=g)
    return boxes.to(device), scores.to(device), labels.to(device)


STRATEGIES = {
    "torchvision batched_nms": torchvision.ops.batched_nms,
    "coordinate trick": tv_boxes._batched_nms_coordinate_trick,
    "one NMS per class slice": nms_per_class_slice,  # divergen's CPU path, here on any device
}


def timed(fn, *args, device: str, repeats: int) -> tuple[float, torch.Tensor]:
    out = fn(*args)
    times = []
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = fn(*args)
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--sizes", type=int, nargs="+", default=[5000, 30000, 100000, 300000])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", metavar="PATH")
    args = parser.parse_args()
    print(f"| N | {' | '.join(STRATEGIES)} | divergen.boxes.batched_nms | batched_nms_topk (300) |")
    print("|---:|" + "---:|" * (len(STRATEGIES) + 2))
    for n in args.sizes:
        boxes, scores, labels = candidates(n, device=args.device)
        row, reference = {"bench": "nms", "device": args.device, "n": n}, None
        for name, fn in [*STRATEGIES.items(), ("divergen.boxes.batched_nms", batched_nms)]:
            seconds, keep = timed(fn, boxes, scores, labels, 0.5, device=args.device, repeats=args.repeats)
            kept = set(keep.tolist())
            if reference is None:
                reference = kept
            row[name] = {"ms": 1000 * seconds, "same_result": kept == reference, "kept": len(kept)}
            if name == "divergen.boxes.batched_nms":
                first = keep[:300]
        seconds, top = timed(
            batched_nms_topk, boxes, scores, labels, 0.5, 300, device=args.device, repeats=args.repeats
        )
        row["batched_nms_topk (300)"] = {
            "ms": 1000 * seconds,
            "same_result": torch.equal(top, first),
            "kept": 300,
        }
        print(
            f"| {n} | "
            + " | ".join(f"{v['ms']:.1f} ms{'' if v['same_result'] else ' (DIFFERS)'}" for k, v in row.items()
                         if isinstance(v, dict))
            + " |"
        )  # fmt: skip
        if args.json:
            with open(args.json, "a") as f:
                f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
