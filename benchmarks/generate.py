"""Generation-stage throughput: text-to-image, SAM-background annotation, CLIP filtering, pool writing.

    python benchmarks/generate.py --device cpu            # tiny random-weight models; prints a Markdown table
    python benchmarks/generate.py --device cpu --write    # ... and writes "## generate.py:" in benchmarks/RESULTS.md
    python benchmarks/generate.py --device cuda --full --json out.jsonl   # SD 1.5, SAM ViT-H, CLIP ViT-L/14
    python benchmarks/generate.py --device cpu --full --smoke --repeats 1   # the --full code paths at toy sizes
    python benchmarks/generate.py --summarize out.jsonl [--write]   # the table of a --json file (GPU: its section)

Every stage runs the library's own code on random-weight models (throughput does not depend on weight values):

- generate: ``generators.Generator.generate`` on a pipeline from ``tiny_models``, set up as ``load_generator``
  does (SD: DPM-Solver++ multistep, 50 steps, guidance 7.5, divergen.md §1.1; IF: stage I 100 steps at guidance
  7.0, then stage II 50 steps). One timed call = one batch: prompt encoding, sampling, VAE decode, conversion to
  PIL. Every call has prompts not seen before (IF's per-prompt embedding cache never hits). Before each
  (precision, batch) setting a 2-step call at the same batch warms up. ``--full``: SD 1.5's architecture at 512²
  in fp16 and bf16 on a GPU, peak CUDA memory (weights included) per setting. IF runs tiny only: ``tiny_models``
  has no full IF.
- annotate: ``annotate.annotate_image`` with a ``segment_anything.SamPredictor`` (fp32, as the official) on
  white-background images with one object (divergen.md §1.2): set_image, the 4-corner multimask predict and the
  post-processing (background choice, largest component, tight RGBA crop); one timed call = one image = one
  instance.
- CLIP: ``clip_filter.clip_scores`` and ``clip_filter.inter_similarity`` (divergen.md §1.3), each timed on its own
  over all the cut-outs, at two batch sizes; the PIL preprocessing (CPU) is split out. ``ClipScorer`` has no
  precision option (fp32): the fp16 rows wrap the same calls in ``torch.autocast`` from outside.
- pool: one RGBA PNG per record through ``generators.save_image_atomic`` (stage 3's writer), then the index
  through ``pool.write_pool_index``.

Times are medians over ``--repeats`` timed calls after a warm-up, the device synchronised around each call. A
stage (or one setting of it) that raises gives an error row and the rest still runs. ``--json PATH`` appends
one JSON object per row as soon as it is measured, so a run killed by ``timeout`` keeps what it measured.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from results import RESULTS, write_section  # noqa: E402 (benchmarks/ is on sys.path when run as a script)

log = logging.getLogger("benchmarks.generate")

STAGES = ("generate", "annotate", "clip", "pool")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
SHORT = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}
NAMES = ("cat", "traffic_light", "wooden_spoon", "teapot", "bicycle", "sea_turtle", "umbrella")
# Distinct markers: neither is a prefix of the other, so write_section never replaces the wrong section.
CPU_MARKER, GPU_MARKER = "## generate.py:", "## generate.py --full:"


@dataclass(frozen=True)
class Settings:
    """What each stage runs: architectures, sizes, batches and precisions (see ``settings``)."""

    label: str
    sd_arch: str  # tiny_models.build_sd_pipeline arch
    sd_size: int  # generated image side (tiny SD: 32, 64 or 128)
    steps: int
    gen_batches: tuple[int, ...]
    gen_dtypes: tuple[str, ...]
    if_arch: str | None  # tiny_models.build_if_pipelines arch; None: IF not run
    if_steps: tuple[int, int]  # stage I, stage II
    sam: str  # "tiny" or a segment_anything.sam_model_registry key
    sam_images: int
    image_size: int
    clip_model: str | None  # None: tiny_models.TINY_CLIP_MODEL
    clip_cutouts: int
    clip_batches: tuple[int, ...]
    clip_dtypes: tuple[str, ...]
    pool_records: int


def settings(*, full: bool, smoke: bool, device: torch.device) -> Settings:
    """Tiny models (default), the papers' architectures (``full``), or those at toy sizes (``full`` + ``smoke``:
    a CPU check that the ``--full`` code runs; bf16 stands in for fp16, which CPUs lack; numbers meaningless)."""
    gpu = device.type == "cuda"
    if full and smoke:
        return Settings(
            label="full architectures at toy sizes (smoke)", sd_arch="sd15", sd_size=64, steps=2,
            gen_batches=(1, 2), gen_dtypes=("float32", "bfloat16"), if_arch=None, if_steps=(2, 2), sam="vit_b",
            sam_images=2, image_size=128, clip_model="ViT-L-14", clip_cutouts=4, clip_batches=(2, 4),
            clip_dtypes=("float32", "bfloat16"), pool_records=20,
        )  # fmt: skip
    if full:
        return Settings(
            label="SD 1.5 / SAM ViT-H / CLIP ViT-L/14, random weights", sd_arch="sd15", sd_size=512, steps=50,
            gen_batches=(1, 4, 8, 16), gen_dtypes=("float16", "bfloat16") if gpu else ("float32",),
            if_arch=None, if_steps=(100, 50), sam="vit_h", sam_images=8, image_size=512, clip_model="ViT-L-14",
            clip_cutouts=128, clip_batches=(32, 64), clip_dtypes=("float32", "float16") if gpu else ("float32",),
            pool_records=400,
        )  # fmt: skip
    return Settings(
        label="tiny random-weight models", sd_arch="tiny", sd_size=64, steps=50, gen_batches=(1, 4, 8, 16),
        gen_dtypes=("float32",), if_arch="tiny", if_steps=(100, 50), sam="tiny", sam_images=8, image_size=512,
        clip_model=None, clip_cutouts=128, clip_batches=(32, 64), clip_dtypes=("float32",), pool_records=400,
    )  # fmt: skip


# ------------------------------------------------------------------------------------------------ timing


class Clock:
    """Seconds of a call, the device synchronised before and after (CUDA work is asynchronous)."""

    def __init__(self, device: torch.device):
        self.device = device

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def __call__(self, fn: Callable[[], object]) -> float:
        self.sync()
        start = time.perf_counter()
        fn()
        self.sync()
        return time.perf_counter() - start


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_gb(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def short_error(e: BaseException) -> str:
    lines = f"{type(e).__name__}: {e}".strip().splitlines()
    return lines[0][:300]


def per_item_ms(seconds: float, items: int) -> float:
    return 1000.0 * seconds / max(items, 1)


class Recorder:
    """Collects result rows; each is logged and, with ``path``, appended to a JSON-lines file at once."""

    def __init__(self, path: Path | None):
        self.rows: list[dict] = []
        self.path = path

    def add(self, row: dict) -> None:
        self.rows.append(row)
        if row["kind"] == "row":
            log.info("%s", format_row(row))
        if self.path is not None:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps(row) + "\n")

    def result(self, stage: str, model: str, precision: str = "-", batch: int | str = "-", **kw) -> None:
        """One row. Keywords: ``unit``, ``items`` (per timed call), ``times`` (the calls' seconds), ``peak``
        (GB), ``split`` (name -> ms per item), ``note``, ``error``."""
        times = kw.get("times") or []
        median = statistics.median(times) if times else None
        items = kw.get("items", 0)
        self.add({
            "kind": "row", "stage": stage, "model": model, "precision": precision, "batch": batch,
            "unit": kw.get("unit", "items"), "items": items, "repeats": len(times), "median_s": median,
            "rate": items / median if median else None, "peak_gb": kw.get("peak"),
            "split_ms": kw.get("split") or {}, "note": kw.get("note", ""), "error": kw.get("error"),
        })  # fmt: skip


# ------------------------------------------------------------------------------------------------ inputs


def object_image(size: int, rng: np.random.Generator) -> np.ndarray:
    """``(size, size, 3)`` uint8: a textured blob on a white background, as the generation prompts ask for."""
    yy, xx = np.mgrid[0:size, 0:size] / size
    cx, cy, r = *rng.uniform(0.35, 0.65, 2), rng.uniform(0.15, 0.3)
    radius = r * (1 + 0.15 * np.sin(3 * np.arctan2(yy - cy, xx - cx) + rng.uniform(0, 6)))
    inside = (xx - cx) ** 2 + (yy - cy) ** 2 <= radius**2
    colour = rng.uniform(40, 220, 3) + 30 * np.sin(xx * rng.uniform(10, 40))[..., None]
    return np.where(inside[..., None], colour, 255).clip(0, 255).astype(np.uint8)


def cutouts(n: int, rng: np.random.Generator, *, low: int = 80, high: int = 400) -> list[np.ndarray]:
    """``n`` RGBA cut-outs ``(h, w, 4)`` uint8, sides in ``[low, high)``: a textured body, a blob-shaped alpha."""
    out = []
    for _ in range(n):
        h, w = (int(v) for v in rng.integers(low, high, 2))
        yy, xx = np.mgrid[0:h, 0:w]
        u, v = (xx - w / 2) / (w / 2), (yy - h / 2) / (h / 2)
        radius = 0.8 + 0.15 * np.sin(3 * np.arctan2(v, u) + rng.uniform(0, 6))
        alpha = np.where(u * u + v * v <= radius**2, 255, 0).astype(np.uint8)
        rgb = (np.sin(xx / rng.uniform(3, 15))[..., None] * 60 + rng.uniform(60, 200, 3)).clip(0, 255)
        out.append(np.dstack([rgb.astype(np.uint8), alpha]))
    return out


class Prompts:
    """Hands out jobs with prompts never handed out before, so no timed call reuses an earlier prompt."""

    def __init__(self):
        self.n = 0

    def jobs(self, batch: int) -> list:
        from divergen.prompts import GenerationJob

        out = []
        for n in range(self.n, self.n + batch):
            name = NAMES[n % len(NAMES)]
            prompt = f"a photo of a single {name.replace('_', ' ')}, take {n}"
            out.append(GenerationJob(category_id=1 + n % len(NAMES), prompt=prompt, prompt_index=n,
                                     sample_index=0, seed=n))  # fmt: skip
        self.n += batch
        return out


# ------------------------------------------------------------------------------------------------ stages


def build_pipelines(kind: str, arch: str, device: torch.device) -> tuple:
    """``(pipe, stage2 or None)`` from ``tiny_models``, with ``load_generator``'s scheduler and no progress bars."""
    import diffusers

    from divergen import tiny_models

    if kind == "sd":
        # sd15 is built (on the GPU: much faster than on a CPU) at its 512 px config, and runs at any size.
        size = 64 if arch == "tiny" else None
        try:
            pipe = tiny_models.build_sd_pipeline(arch=arch, image_size=size, seed=0, device=device)
        except Exception:  # building under a CUDA default device is the fast path, not the only one
            log.warning("building SD %s on %s failed; building it on the CPU", arch, device, exc_info=True)
            pipe = tiny_models.build_sd_pipeline(arch=arch, image_size=size, seed=0, device="cpu")
        # As load_generator: X-Paste's DPM-Solver++ multistep (divergen.md §1.1).
        pipe.scheduler = diffusers.DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
        stage2 = None
    else:
        pipe, stage2 = tiny_models.build_if_pipelines(arch=arch, seed=0)
        stage2.set_progress_bar_config(disable=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe, stage2


def _generate(generator, jobs) -> bool:
    """``generator.generate(jobs)``; True when random weights gave non-finite pixels, which ``Generator`` refuses
    after the pipeline ran (the time then lacks only the few-ms conversion to PIL)."""
    try:
        generator.generate(jobs)
    except ValueError as e:
        if "non-finite" not in str(e):
            raise
        return True
    return False


def bench_generate(
    s: Settings, device: torch.device, rec: Recorder, *, repeats: int, deadline: float
) -> None:
    """Images/s of SD (and IF where ``s.if_arch``) per precision and batch size; peak CUDA memory."""
    import diffusers

    from divergen.generators import Generator, GeneratorSpec

    diffusers.utils.logging.set_verbosity_error()  # its warning on every pipe.to(dtype) of random weights
    clock, prompts = Clock(device), Prompts()
    models = [("sd", s.sd_arch)] + ([("if", s.if_arch)] if s.if_arch else [])
    if s.if_arch is None:
        rec.result(
            "generate", "IF", error="not run: tiny_models has IF only tiny (no IF-I-XL / IF-II-L offline)"
        )
    for kind, arch in models:
        name = f"{kind.upper()} {arch}"
        start = time.perf_counter()
        try:
            pipe, stage2 = build_pipelines(kind, arch, device)
        except Exception as e:  # reported as a row; the other models and stages still run
            log.exception("building %s failed", name)
            rec.result("generate", name, error=short_error(e))
            continue
        log.info("built %s in %.1f s", name, time.perf_counter() - start)
        size = s.sd_size if kind == "sd" else stage2.unet.config.sample_size
        model = f"{name} {size}²"
        per_image = None  # seconds per image of the last setting, to predict the next one's time
        for batch in s.gen_batches:
            # Precisions inside batch sizes: a run cut short by the budget still compares them at each size.
            for precision in s.gen_dtypes:
                row = dict(unit="images", items=batch)
                predicted = per_image * batch * (repeats + 0.2) if per_image else 0.0
                if time.perf_counter() + predicted > deadline:
                    rec.result(
                        "generate", model, SHORT[precision], batch, error="skipped: over --budget-s", **row
                    )
                    continue
                spec = GeneratorSpec(
                    kind=kind, model="random", model_stage2="random" if kind == "if" else "", dtype=precision,
                    steps=s.steps if kind == "sd" else s.if_steps[0], guidance=7.5 if kind == "sd" else 7.0,
                    size=size, steps_stage2=s.if_steps[1], batch_size=batch,
                )  # fmt: skip
                try:
                    for p in (pipe, stage2):
                        if p is not None:
                            p.to(device=device, dtype=DTYPES[precision])
                    reset_peak(device)
                    warm = Generator(spec=replace(spec, steps=2, steps_stage2=2), pipe=pipe, stage2=stage2,
                                     device=device)  # fmt: skip
                    _generate(warm, prompts.jobs(batch))
                    gen = Generator(spec=spec, pipe=pipe, stage2=stage2, device=device)
                    times, flags = [], []
                    for jobs in [prompts.jobs(batch) for _ in range(repeats)]:
                        times.append(clock(lambda: flags.append(_generate(gen, jobs))))  # noqa: B023
                    per_image = statistics.median(times) / batch
                    note = (
                        f"{spec.steps} steps" if kind == "sd" else f"{spec.steps}+{spec.steps_stage2} steps"
                    )
                    if any(flags):
                        note += f"; non-finite pixels (random weights) in {sum(flags)} call(s)"
                    rec.result("generate", model, SHORT[precision], batch, times=times, peak=peak_gb(device),
                               note=note, **row)  # fmt: skip
                except Exception as e:  # e.g. out of memory at one batch size: the next setting still runs
                    log.exception("%s %s batch %d failed", name, precision, batch)
                    rec.result("generate", model, SHORT[precision], batch, error=short_error(e), **row)
        del pipe, stage2
        reset_peak(device)


class TimedPredictor:
    """A SamPredictor whose ``set_image`` and ``predict`` are timed (device synchronised)."""

    def __init__(self, predictor, clock: Clock):
        self.predictor, self.clock = predictor, clock
        self.seconds = {"set_image": 0.0, "predict": 0.0}

    def set_image(self, image):
        self.seconds["set_image"] += self.clock(lambda: self.predictor.set_image(image))

    def predict(self, **kw):
        out = []
        self.seconds["predict"] += self.clock(lambda: out.append(self.predictor.predict(**kw)))
        return out[0]


def bench_annotate(s: Settings, device: torch.device, rec: Recorder, *, repeats: int) -> None:
    """SAM-background instances/s, one image per timed call; split into set_image / predict / post-processing."""
    from segment_anything import SamPredictor, sam_model_registry

    from divergen import tiny_models
    from divergen.annotate import annotate_image

    torch.manual_seed(0)
    sam = tiny_models.build_tiny_sam() if s.sam == "tiny" else sam_model_registry[s.sam]()
    clock = Clock(device)
    predictor = TimedPredictor(SamPredictor(sam.to(device).eval()), clock)
    rng = np.random.default_rng(0)
    images = [object_image(s.image_size, rng) for _ in range(s.sam_images)]
    reset_peak(device)
    annotate_image(predictor, images[0])  # warm-up
    predictor.seconds = dict.fromkeys(predictor.seconds, 0.0)
    times, kept = [], []
    for image in images * repeats:
        times.append(clock(lambda: kept.append(annotate_image(predictor, image).rgba is not None)))  # noqa: B023
    split = {k: per_item_ms(v, len(times)) for k, v in predictor.seconds.items()}
    split["post"] = per_item_ms(sum(times), len(times)) - split["set_image"] - split["predict"]
    model = "SAM tiny" if s.sam == "tiny" else f"SAM ViT-{s.sam.removeprefix('vit_').upper()}"
    rec.result("annotate", f"{model}, {s.image_size}² images", "fp32", 1, unit="instances", items=1, times=times,
               peak=peak_gb(device), split=split, note=f"{sum(kept)}/{len(kept)} images gave a cut-out")  # fmt: skip


def bench_clip(s: Settings, device: torch.device, rec: Recorder, *, repeats: int) -> None:
    """Cut-outs/s of the CLIP score and of the inter-similarity, per precision and batch size."""
    import torch.nn.functional as F

    from divergen import tiny_models
    from divergen.clip_filter import ClipScorer, clip_scores, inter_similarity

    model = s.clip_model
    if model is None:
        tiny_models.register_tiny_clip()
        model = tiny_models.TINY_CLIP_MODEL
    torch.manual_seed(0)
    scorer = ClipScorer.load(model=model, pretrained=None, device=device)
    preprocess, pre_seconds = scorer.preprocess, [0.0]

    def timed_preprocess(image):
        start = time.perf_counter()
        out = preprocess(image)
        pre_seconds[0] += time.perf_counter() - start
        return out

    scorer.preprocess = timed_preprocess  # a probe on the benchmark's own scorer
    cuts = cutouts(s.clip_cutouts, np.random.default_rng(0))
    ids = [1 + i % len(NAMES) for i in range(len(cuts))]
    names = [NAMES[c - 1] for c in ids]
    g = torch.Generator().manual_seed(0)
    refs = {c: F.normalize(torch.randn(scorer.embed_dim, generator=g), dim=0) for c in set(ids)}
    calls = {  # (number of cut-outs, batch size) -> scores
        "clip_scores": lambda n, b: clip_scores(scorer, cuts[:n], names[:n], batch_size=b),
        "inter_similarity": lambda n, b: inter_similarity(scorer, cuts[:n], ids[:n], refs, batch_size=b),
    }
    clock = Clock(device)
    label = f"CLIP {model}" if s.clip_model else "CLIP tiny"
    for precision in s.clip_dtypes:
        for batch in s.clip_batches:
            for what, call in calls.items():
                row = dict(unit="cut-outs", items=len(cuts))
                try:
                    autocast = precision != "float32"
                    ctx = (
                        torch.autocast(device.type, dtype=DTYPES[precision])
                        if autocast
                        else contextlib.nullcontext()
                    )
                    reset_peak(device)
                    with ctx:
                        call(batch, batch)  # warm-up: one batch of the same shape
                        pre_seconds[0] = 0.0
                        times = [clock(lambda: call(len(cuts), batch)) for _ in range(repeats)]  # noqa: B023
                    split = {"preprocess": per_item_ms(pre_seconds[0], len(cuts) * repeats)}
                    note = "fp32 model under torch.autocast" if autocast else ""
                    rec.result("clip", f"{label}: {what}", SHORT[precision], batch, times=times,
                               peak=peak_gb(device), split=split, note=note, **row)  # fmt: skip
                except Exception as e:  # one precision or batch size failing leaves the others
                    log.exception("CLIP %s %s batch %d failed", what, precision, batch)
                    rec.result(
                        "clip", f"{label}: {what}", SHORT[precision], batch, error=short_error(e), **row
                    )


def bench_pool(s: Settings, device: torch.device, rec: Recorder, *, repeats: int) -> None:
    """Records/s of writing a pool: one RGBA PNG each (atomic, as stage 3 writes them), then pool.jsonl."""
    from PIL import Image

    from divergen.generators import save_image_atomic
    from divergen.pool import write_pool_index

    cuts = cutouts(s.pool_records, np.random.default_rng(0))
    times, png, index = [], 0.0, 0.0
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(repeats + 1):  # run 0 warms up
            root, records = Path(tmp) / f"run{r}", []
            start = time.perf_counter()
            for i, rgba in enumerate(cuts):
                path = f"images/{1 + i % 40}/{i:05d}.png"
                save_image_atomic(Image.fromarray(rgba), root / path)
                records.append({"path": path, "category_id": 1 + i % 40, "generator": "sd15",
                                "prompt": "a photo of a single cat", "clip_score": 0.25,
                                "clip_inter_sim": 0.7, "seed": i})  # fmt: skip
            mid = time.perf_counter()
            write_pool_index(records, root)
            end = time.perf_counter()
            if r:
                times.append(end - start)
                png, index = png + mid - start, index + end - mid
    n = len(cuts) * repeats
    rec.result("pool", "RGBA PNG + pool.jsonl (CPU)", unit="records", items=len(cuts), times=times,
               split={"png": per_item_ms(png, n), "jsonl": per_item_ms(index, n)},
               note="cut-outs 80-400 px a side")  # fmt: skip


# ------------------------------------------------------------------------------------------------ report


def meta(device: torch.device, s: Settings) -> dict:
    """The machine, library versions and settings, recorded once per run."""
    import importlib.metadata as md

    argv = sys.argv[1:]
    if "--json" in argv:  # where the rows went is no part of the command a reader reruns
        i = argv.index("--json")
        argv = argv[:i] + argv[i + 2 :]

    versions = {}
    for pkg in ("torch", "diffusers", "transformers", "open_clip_torch", "segment_anything", "pycocotools"):
        try:
            versions[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            versions[pkg] = None
    return {
        "kind": "meta", "argv": " ".join(argv), "device": device.type,
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" and torch.cuda.is_available() else None,
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "threads": torch.get_num_threads(), "versions": versions, "settings": s.label,
        "tf32_matmul": torch.backends.cuda.matmul.allow_tf32, "load_average": os.getloadavg()[0],
        "date": time.strftime("%Y-%m-%d"),
    }  # fmt: skip


def format_row(r: dict) -> str:
    def num(v: float | None, digits: int) -> str:
        return "" if v is None or not math.isfinite(v) else f"{v:.{digits}f}"

    split = " / ".join(f"{k} {v:.1f}" if v >= 0.1 else f"{k} {v:.3f}" for k, v in r["split_ms"].items())
    if r["error"]:
        cells = ["", "", "", "", r["error"]]
    else:
        rate = f"{num(r['rate'], 3 if r['rate'] < 1 else 1)} {r['unit']}/s"
        ms = per_item_ms(r["median_s"], r["items"])
        cells = [rate, num(ms, 1), num(r["peak_gb"], 2), split, r["note"]]
    return "| " + " | ".join([r["stage"], r["model"], r["precision"], str(r["batch"]), *cells]) + " |"


def table(rows: list[dict]) -> str:
    lines = [
        "| stage | model | precision | batch | rate | ms / item | peak CUDA GB | split (ms / item) | note |",
        "|---|---|---|---:|---:|---:|---:|---|---|",
    ]
    return "\n".join(lines + [format_row(r) for r in rows if r["kind"] == "row"])


def section(rows: list[dict]) -> tuple[str, str]:
    """``(marker, text)`` of a RESULTS.md section for ``rows`` (their meta rows give the header)."""
    metas = [r for r in rows if r["kind"] == "meta"]
    # A GPU run's CPU-only part (pool) does not make it a CPU section.
    m = next((x for x in metas if x["device"] == "cuda"), metas[0] if metas else None)
    m = m or {"device": "?", "gpu": "?", "versions": {}, "machine": "?", "date": "?"}
    v = m["versions"]
    libs = ", ".join(
        f"{k} {v[k]}" for k in ("torch", "diffusers", "open_clip_torch", "segment_anything") if v.get(k)
    )
    gpu = m["device"] == "cuda"
    if gpu:
        where = f"{m['gpu'] or 'no GPU'} (TF32 matmul {'on' if m.get('tf32_matmul') else 'off'})"
    else:
        where = (
            f"{m['machine']}, {m.get('threads')} torch thread(s), load average {m.get('load_average', 0):.1f}"
        )
    commands = "; ".join(
        f"`python benchmarks/generate.py {c}`" for c in dict.fromkeys(x["argv"] for x in metas)
    )
    text = (
        f"{GPU_MARKER if gpu else CPU_MARKER} generation-stage throughput, {'GPU' if gpu else 'CPU'} "
        f"({m.get('settings', '?')})\n\n"
        f"{commands} on {where}; {libs}; {m['date']}. Random weights (throughput does not depend on their "
        "values). Rate = items per timed call / median seconds of the calls, after a warm-up. generate: one call "
        "= one batch (prompt encoding, sampling, VAE decode, PIL); annotate: one image (set_image, 4-corner "
        "predict, post-processing); CLIP: all the cut-outs (80-400 px a side), the PIL preprocessing (CPU) split "
        "out; pool: one PNG per record, then pool.jsonl. Peak CUDA memory includes the weights.\n\n"
        f"{table(rows)}\n"
    )
    return (GPU_MARKER if gpu else CPU_MARKER), text


# ------------------------------------------------------------------------------------------------ main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    parser.add_argument("--full", action="store_true", help="the papers' architectures (random weights)")
    parser.add_argument(
        "--smoke", action="store_true", help="with --full: toy sizes, to check the code on a CPU"
    )
    parser.add_argument("--stages", nargs="+", choices=STAGES, default=list(STAGES))
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per setting (their median)")
    parser.add_argument("--budget-s", type=float, default=None, help="generate: start no setting predicted to "
                        "end later than this many seconds after the start")  # fmt: skip
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: 1 on CPU)")
    parser.add_argument("--json", type=Path, default=None, help="append one JSON object per row to this file")
    parser.add_argument("--summarize", type=Path, default=None, help="print the section of a --json file")
    parser.add_argument("--write", action="store_true", help="write the section into benchmarks/RESULTS.md")
    parser.add_argument(
        "--results", type=Path, default=RESULTS, help=argparse.SUPPRESS
    )  # tests: another file
    args = parser.parse_args(argv)
    # Our rows at INFO; other libraries' INFO chatter (open_clip logs every model build) stays out.
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s: %(message)s")
    log.setLevel(logging.INFO)
    if args.summarize is not None:
        if not args.summarize.is_file():
            print(f"{args.summarize}: no such file (no part wrote a row)")
            return 1
        rows = [json.loads(line) for line in args.summarize.read_text().splitlines() if line.strip()]
    else:
        start = time.perf_counter()
        device = torch.device(args.device)
        # One thread on CPU: the tiny models' small kernels lose far more than they gain from a second thread
        # whenever other processes keep the cores busy (as paste.py, the rate of one worker).
        if args.threads or device.type == "cpu":
            torch.set_num_threads(args.threads or 1)
        s = settings(full=args.full, smoke=args.smoke, device=device)
        rec = Recorder(args.json)
        rec.add(meta(device, s))
        deadline = start + args.budget_s if args.budget_s else math.inf
        runs = {
            "generate": lambda: bench_generate(s, device, rec, repeats=args.repeats, deadline=deadline),
            "annotate": lambda: bench_annotate(s, device, rec, repeats=args.repeats),
            "clip": lambda: bench_clip(s, device, rec, repeats=args.repeats),
            "pool": lambda: bench_pool(s, device, rec, repeats=args.repeats),
        }
        for stage in args.stages:
            if device.type == "cuda" and not torch.cuda.is_available() and stage != "pool":
                rec.result(stage, "-", error="CUDA is not available (torch.cuda.is_available() is False)")
                continue
            try:
                runs[stage]()
            except Exception as e:  # a missing package or a broken stage: reported, and the next stage runs
                log.exception("stage %s failed", stage)
                rec.result(stage, "-", error=short_error(e))
            reset_peak(device)
        rows = rec.rows
    marker, text = section(rows)
    print(text)
    if args.write:
        write_section(marker, text, args.results)
    # Exit 1 when a setting failed ("not run" and "skipped" rows are by design), so that scripts can tell.
    failed = [
        r
        for r in rows
        if r["kind"] == "row" and r["error"] and not r["error"].startswith(("not run", "skipped"))
    ]
    return 1 if failed and args.summarize is None else 0


if __name__ == "__main__":
    sys.exit(main())
