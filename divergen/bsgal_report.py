"""``python -m divergen.bsgal report RUN_DIR``: plots and a gallery of BSGAL's decisions in a training run.

Reads ``RUN_DIR/bsgal/decisions_rank*.jsonl`` (one record per process and iteration: score, threshold,
accepted, pasted labels and pool indices) and writes ``RUN_DIR/bsgal/report/``:

- ``acceptance.png``: the acceptance rate over iterations (moving average), per process;
- ``scores.png``: the score histograms of accepted and rejected batches, with the threshold;
- ``categories.png``: the acceptance rate per pasted category (the categories pasted most often);
- ``summary.json``: the counts and rates, and, when the pool records a ``corruption`` per instance (the synthetic
  pool), the acceptance rate of batches by the corruption they contain;
- ``index.html``: all of the above and the gallery of saved pasted batches (``bsgal.gallery_period``), accepted
  and rejected side by side.
"""

from __future__ import annotations

import argparse
import html
import json
import logging
import math
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

import numpy as np

logger = logging.getLogger(__name__)


def read_decisions(run_dir: str | Path) -> list[dict]:
    """All decision records of a run, every process, sorted by (iteration, rank)."""
    files = sorted((Path(run_dir) / "bsgal").glob("decisions_rank*.jsonl"))
    if not files:
        raise FileNotFoundError(
            f"{run_dir}/bsgal has no decisions_rank*.jsonl: was it trained with [bsgal] enabled?"
        )
    records = [json.loads(line) for f in files for line in f.read_text().splitlines() if line.strip()]
    return sorted(records, key=lambda r: (r["iteration"], r["rank"]))


def summarize(records: Sequence[dict], corruption_of: dict[int, str] | None = None) -> dict:
    """Counts and acceptance rates; by corruption type when ``corruption_of`` maps pool index -> type."""
    scored = [r for r in records if r.get("score") is not None]
    accepted = [r for r in scored if r["accepted"]]
    out = {
        "decisions": len(scored),
        "unscored (nothing pasted)": len(records) - len(scored),
        "accept_rate": len(accepted) / len(scored) if scored else math.nan,
        "mean_score_accepted": _mean([r["score"] for r in accepted]),
        "mean_score_rejected": _mean([r["score"] for r in scored if not r["accepted"]]),
    }
    if corruption_of:
        groups: dict[str, list[bool]] = defaultdict(list)
        for r in scored:
            kinds = {corruption_of.get(i, "none") for i in r.get("pool_index", [])}
            bad = kinds - {"none"}
            if not bad:
                groups["clean batches"].append(r["accepted"])
            for kind in bad:
                groups[f"batches with {kind}"].append(r["accepted"])
        out["accept_rate_by_corruption"] = {
            k: {"batches": len(v), "accept_rate": sum(v) / len(v)} for k, v in sorted(groups.items())
        }
        # Per instance: the share of clean / corrupted instances among the accepted ones vs among all pasted.
        fractions = []
        for r in scored:
            idx = r.get("pool_index", [])
            if idx:
                fractions.append(
                    (r["accepted"], sum(corruption_of.get(i, "none") != "none" for i in idx) / len(idx))
                )
        out["corrupted_fraction_accepted"] = _mean([f for a, f in fractions if a])
        out["corrupted_fraction_rejected"] = _mean([f for a, f in fractions if not a])
    return out


def _mean(values: Sequence[float]) -> float:
    return float(np.mean(values)) if len(values) else math.nan


def _corruptions(run_dir: Path, indices: set[int]) -> dict[int, str] | None:
    """Pool index -> ``corruption`` of the run's pool records in ``indices`` (those the decisions name), when
    the pool records one (synthetic pools). The run's pool indices are those of its filtered pool, so the pool
    is built as the run built it."""
    from .config import load_config
    from .data import load_category_info
    from .paste import build_pool

    config = run_dir / "config.toml"
    if not config.is_file():
        return None
    cfg = load_config(config)
    try:
        pool = build_pool(cfg.paste, load_category_info(cfg.data.train_json), cfg.model.num_classes)
    except (OSError, ValueError) as e:
        logger.warning(f"cannot read the run's pool {cfg.paste.pool!r} ({e}); no per-corruption rates")
        return None
    if pool.format != "jsonl" or len(pool) == 0 or "corruption" not in pool.record(0):
        return None
    return {i: pool.record(i).get("corruption", "none") for i in sorted(indices) if i < len(pool)}


def write_report(run_dir: str | Path) -> Path:
    """Write ``RUN_DIR/bsgal/report/`` (see the module docstring); returns its ``index.html``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    records = read_decisions(run_dir)
    out = run_dir / "bsgal" / "report"
    out.mkdir(parents=True, exist_ok=True)
    scored = [r for r in records if r.get("score") is not None]

    fig, ax = plt.subplots(figsize=(7, 3.5))
    window = max(1, min(50, len(scored) // 5))
    for rank in sorted({r["rank"] for r in scored}):
        mine = [r for r in scored if r["rank"] == rank]
        acc = np.array([r["accepted"] for r in mine], dtype=float)
        k = min(window, len(acc))
        ax.plot(
            [r["iteration"] for r in mine][k - 1 :],
            np.convolve(acc, np.ones(k) / k, "valid"),
            label=f"rank {rank}",
        )
    ax.set(xlabel="iteration", ylabel=f"acceptance rate ({window}-decision mean)", ylim=(-0.02, 1.02))
    if scored:
        ax.legend(loc="best")
    fig.tight_layout()
    fig.savefig(out / "acceptance.png", dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 3.5))
    acc_scores = [r["score"] for r in scored if r["accepted"]]
    rej_scores = [r["score"] for r in scored if not r["accepted"]]
    bins = np.linspace(min([0.0, *acc_scores, *rej_scores]), max([0.0, *acc_scores, *rej_scores]) + 1e-9, 41)
    ax.hist(
        [acc_scores, rej_scores], bins=bins, label=["accepted", "rejected"], color=["tab:green", "tab:red"]
    )
    thresholds = [r["threshold"] for r in scored if r.get("threshold") is not None]
    if thresholds:
        ax.axvline(float(np.median(thresholds)), color="k", linestyle="--", label="threshold (median)")
    ax.set(
        xlabel="score (cosine with the cached real-data gradient, or reference-loss gain)", ylabel="batches"
    )
    ax.legend(loc="best")
    fig.tight_layout()
    fig.savefig(out / "scores.png", dpi=110)
    plt.close(fig)

    per_cat: dict[int, list[bool]] = defaultdict(list)
    for r in scored:
        for label in r.get("pasted_labels", []):
            per_cat[label].append(r["accepted"])
    top = sorted(per_cat, key=lambda c: -len(per_cat[c]))[:40]
    fig, ax = plt.subplots(figsize=(max(6, 0.25 * len(top)), 3.5))
    ax.bar(np.arange(len(top)), [np.mean(per_cat[c]) for c in top], color="tab:blue")
    ax.set_xticks(np.arange(len(top)), [str(c) for c in top], rotation=90, fontsize=7)
    ax.set(xlabel="pasted category (0-based label)", ylabel="acceptance rate", ylim=(0, 1))
    fig.tight_layout()
    fig.savefig(out / "categories.png", dpi=110)
    plt.close(fig)

    used = {i for r in records for i in r.get("pool_index", [])}
    summary = summarize(records, _corruptions(run_dir, used))
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")

    gallery = [r for r in records if r.get("gallery")]
    cells = {
        kind: "".join(
            f'<figure><img src="../gallery/{html.escape(r["gallery"])}" width="480"><figcaption>iteration '
            f"{r['iteration']}, rank {r['rank']}, score {r['score']:.4f}, threshold {r['threshold']:.4f}"
            f"</figcaption></figure>"
            for r in gallery
            if r["accepted"] == (kind == "accepted") and r.get("score") is not None
        )
        for kind in ("accepted", "rejected")
    }
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>BSGAL report: {html.escape(str(run_dir))}</title>
<style>body{{font-family:sans-serif;margin:1em}} .cols{{display:flex;gap:2em}} .cols>div{{flex:1}}
figure{{margin:0 0 1em 0}} pre{{background:#f4f4f4;padding:.5em}}</style></head><body>
<h1>BSGAL decisions: {html.escape(str(run_dir))}</h1>
<pre>{html.escape(json.dumps(summary, indent=2))}</pre>
<img src="acceptance.png"> <img src="scores.png"><br><img src="categories.png">
<h2>Pasted batches (real instances green, pasted red)</h2>
<div class="cols"><div><h3>accepted</h3>{cells["accepted"] or "<p>none saved</p>"}</div>
<div><h3>rejected</h3>{cells["rejected"] or "<p>none saved</p>"}</div></div>
</body></html>
"""
    (out / "index.html").write_text(page)
    logger.info(
        f"wrote {out}/index.html: {summary['decisions']} decisions, accept rate {summary['accept_rate']:.3f}"
    )
    return out / "index.html"


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m divergen.bsgal", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    report = sub.add_parser("report", help="plots and a gallery of a run's decisions")
    report.add_argument("run_dir", help="a training run's output directory")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    write_report(args.run_dir)
