"""The DiverGen generation pipeline as resumable stages: category list -> filtered instance pool (divergen.md §1).

    python generate.py --config configs/generate_demo.toml                   # every stage, in order
    accelerate launch generate.py --config configs/generate_if.toml          # one process per GPU
    python generate.py --config configs/generate_if.toml --stage pool --set filter.min_inter_similarity=0.65

Stages (``STAGES``), each a separate step that skips the work it finds done:

1. ``prompts``: one file per category, ``prompts/<lvis id>.txt`` (the official layout, one prompt per line), taken
   from ``prompts.prompt_dir`` when it has the category, else written by a local LLM (``prompts.llm_model``), else
   the category's template prompt. What was used stays on disk, so later stages and resumes plan the same jobs.
2. ``generate``: every generator of ``[[generators]]`` renders its jobs to ``images/<generator>/<id>/<p>_<s>.png``.
3. ``annotate``: SAM-background (and/or CLIPSeg) cut-outs to ``cutouts/<generator>/<id>/<p>_<s>.png`` (RGBA,
   tight crop), one record per image in ``annotations/*.jsonl`` (rejections included, with their reason).
4. ``filter``: CLIP score and CLIP inter-similarity of every cut-out, one record each in ``scores/*.jsonl``; the
   real-crop reference embeddings are cached per category in ``references/``.
5. ``pool``: the thresholds applied to the scores -> ``pool.jsonl`` (DESIGN.md "Instance pool"; paths relative to
   ``output_dir``), ``report/categories.csv`` (per category: planned, generated, annotated, rejected by reason,
   scored, kept), ``report/summary.json`` and contact sheets ``report/sheets/<id>.png`` (kept above, rejected
   below). Thresholds can change and ``--stage pool`` rerun without re-scoring anything.

Resuming: every file is written atomically (a temporary name, then ``os.replace``), so an image that exists is
not redone, and not decoded either (4-6 ms per 512² PNG: an hour per million images at every resume); one that
turns out not to decode is removed by the ``annotate`` stage and made again by the next run. ``annotations/`` and
``scores/`` are append-only JSON lines flushed per batch, so a crash loses at most the batch in flight (a torn
last line is cut off before the next append). Several processes (``accelerate launch``) split the work by whole
categories (``prompts.shard_jobs``); each appends to its own ``rank<r>.jsonl``, and after a barrier the first
process merges. A rerun may use another number of processes.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections import Counter, defaultdict
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from . import annotate, clip_filter, prompts
from . import generation_report as report
from .config import ConfigError, load_config
from .generators import GeneratorSpec, image_path
from .hub import model_source
from .pool import write_pool_index

logger = logging.getLogger(__name__)

STAGES = ("prompts", "generate", "annotate", "filter", "pool")
ANNOTATORS = ("sam", "clipseg")


# ------------------------------------------------------------------------------------------------ config


@dataclass
class PromptsConfig:
    """``[prompts]``: which categories, which prompts, how many images (divergen.md §1.1)."""

    annotations: str = ""  # LVIS/COCO annotation file: category names, definitions, synonyms, frequencies
    extra_categories: str = (
        ""  # optional JSON list of extra categories (the 250 ImageNet ones of the 1453 setting)
    )
    category_ids: list[int] = field(default_factory=list)  # only these LVIS ids; empty = every category
    frequencies: list[str] = field(default_factory=list)  # only these groups ("r", "c", "f"); empty = all
    template: str = "divergen"  # prompts.TEMPLATES key, for categories without a prompt file
    prompt_dir: str = ""  # official per-category prompt files <lvis id>.txt (e.g. the ChatGPT lists)
    images_per_category: int = 1024
    llm_model: str = ""  # local path / hub id of a causal LM that writes prompts; "" = off (the default)
    llm_prompts_per_category: int = 128


@dataclass
class AnnotateConfig:
    """``[annotate]``: cut the object out of each generated image (divergen.md §1.2, §1.4)."""

    annotators: list[str] = field(default_factory=lambda: ["sam"])  # several: keep the max-CLIP-score cut-out
    sam_checkpoint: str = "weights/sam_vit_h_4b8939.pth"
    sam_model_type: str = "vit_h"
    clipseg_model: str = "CIDAS/clipseg-rd64-refined"
    clipseg_threshold: float = 0.5
    margin: int = 0  # SAM corner-click inset, px
    min_area: float = annotate.MIN_AREA
    max_area: float = annotate.MAX_AREA
    official_index: bool = False  # SAM: take masks[2] blindly, as the official code


@dataclass
class FilterConfig:
    """``[filter]``: CLIP scores and their thresholds (divergen.md §1.3). A non-finite threshold is off."""

    clip_model: str = "ViT-L-14"
    clip_pretrained: str = "openai"  # an open_clip tag, a weights file, or "" for random weights (tests)
    clip_model_config: str = ""  # an open_clip model-config JSON to register first (a custom or tiny model)
    min_clip_score: float = -math.inf  # X-Paste keeps >= 0.21; DiverGen's commands filter nothing on it
    min_inter_similarity: float = 0.6  # DiverGen: mean cosine to the category's real crops >= 0.6
    keep_without_reference: bool = True  # categories with no real crop (the ImageNet extras) skip that test
    real_annotations: str = ""  # real training annotations for the crops; "" = prompts.annotations
    real_image_root: str = ""
    max_real_crops_per_category: int = 0  # 0 = every annotation, as the official
    batch_size: int = 32


@dataclass
class ReportConfig:
    """``[report]``: what the pool stage draws."""

    sheet_columns: int = 8  # instances per row of a contact sheet (kept row(s), then rejected row(s))
    sheet_rows: int = 1  # rows of kept and rows of rejected instances
    sheet_cell: int = 96  # px
    max_sheets: int = 200  # categories drawn (the first by id); 0 = none


@dataclass
class GenerateConfig:
    """A generate.py config: a top-level ``output_dir`` and one section per stage (DESIGN.md "Config sections")."""

    output_dir: str = "output/generate"
    seed: int = 0
    device: str = ""  # "" = the process's accelerator (accelerate's PartialState().device)
    prompts: PromptsConfig = field(default_factory=PromptsConfig)
    generators: list[GeneratorSpec] = field(default_factory=lambda: [GeneratorSpec()])
    annotate: AnnotateConfig = field(default_factory=AnnotateConfig)
    filter: FilterConfig = field(default_factory=FilterConfig)
    report: ReportConfig = field(default_factory=ReportConfig)


def load_generate_config(path: str | os.PathLike, overrides: Sequence[str] = ()) -> GenerateConfig:
    """``load_config`` with the generate schema, plus the checks its types cannot express."""
    cfg = load_config(path, overrides, schema=GenerateConfig)
    errors = generate_config_errors(cfg)
    if errors:
        raise ConfigError(f"in {path}:\n  " + "\n  ".join(errors))
    return cfg


def generate_config_errors(cfg: GenerateConfig) -> list[str]:
    errors = []
    if not cfg.prompts.annotations:
        errors.append("prompts.annotations: required (the LVIS/COCO file that names the categories)")
    if cfg.prompts.images_per_category < 1:
        errors.append(f"prompts.images_per_category = {cfg.prompts.images_per_category}: expected >= 1")
    if cfg.prompts.template not in prompts.TEMPLATES:
        errors.append(
            f"prompts.template = {cfg.prompts.template!r}: expected one of {list(prompts.TEMPLATES)}"
        )
    bad = sorted(set(cfg.prompts.frequencies) - set(prompts.FREQUENCIES))
    if bad:
        errors.append(f"prompts.frequencies: {bad} are not frequency groups {list(prompts.FREQUENCIES)}")
    if not cfg.generators:
        errors.append("generators: expected at least one [[generators]] table")
    names = [g.name for g in cfg.generators]
    if len(set(names)) != len(names):
        errors.append(f"generators: names must be distinct (they name the output folders), got {names}")
    a = cfg.annotate
    if not a.annotators or set(a.annotators) - set(ANNOTATORS) or len(set(a.annotators)) != len(a.annotators):
        errors.append(
            f"annotate.annotators = {a.annotators}: expected distinct names from {list(ANNOTATORS)}"
        )
    if not 0.0 <= a.min_area <= a.max_area <= 1.0:
        errors.append(
            f"annotate.min_area/max_area = {a.min_area}/{a.max_area}: expected 0 <= min <= max <= 1"
        )
    if cfg.filter.batch_size < 1 or cfg.filter.max_real_crops_per_category < 0:
        errors.append("filter.batch_size must be >= 1 and filter.max_real_crops_per_category >= 0")
    return errors


def missing_inputs(cfg: GenerateConfig, stages: Iterable[str]) -> list[str]:
    """The input files and folders that ``stages`` need and do not exist, each named by its config key, so that a
    run fails before hours of work instead of at the stage that needs the file."""
    stages, problems = set(stages), []

    def need(key: str, value: str, *, folder: bool = False) -> None:
        path = Path(value).expanduser()
        if not (path.is_dir() if folder else path.is_file()):
            problems.append(f"{key} = {value!r}: no such {'folder' if folder else 'file'}")

    p, a, f = cfg.prompts, cfg.annotate, cfg.filter
    need("prompts.annotations", p.annotations)
    if p.extra_categories:
        need("prompts.extra_categories", p.extra_categories)
    if "prompts" in stages and p.prompt_dir:
        need("prompts.prompt_dir", p.prompt_dir, folder=True)
    if "generate" in stages:
        for i, g in enumerate(cfg.generators):
            for key in ("model", "model_stage2"):
                try:
                    if getattr(g, key):
                        model_source(getattr(g, key), what=f"generators[{i}].{key}")
                except FileNotFoundError as e:
                    problems.append(str(e))
    if "annotate" in stages and "sam" in a.annotators:
        need("annotate.sam_checkpoint", a.sam_checkpoint)
    if "filter" in stages or ("annotate" in stages and len(a.annotators) > 1):
        if f.clip_model_config:
            need("filter.clip_model_config", f.clip_model_config)
        if f.clip_pretrained and Path(f.clip_pretrained).suffix in (".pt", ".bin", ".pth", ".safetensors"):
            need("filter.clip_pretrained", f.clip_pretrained)
    if "filter" in stages:
        if f.real_annotations:
            need("filter.real_annotations", f.real_annotations)
        need("filter.real_image_root", f.real_image_root or ".", folder=True)
    return problems


# ------------------------------------------------------------------------------------------------ layout


class Layout:
    """Where each stage writes, under ``root`` (the config's ``output_dir``; see the module docstring)."""

    FOLDERS = ("prompts", "images", "cutouts", "annotations", "scores", "references", "report")

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)
        (
            self.prompts,
            self.images,
            self.cutouts,
            self.annotations,
            self.scores,
            self.references,
            self.report,
        ) = (self.root / name for name in self.FOLDERS)
        self.pool = self.root / "pool.jsonl"

    def rel(self, path: Path) -> str:
        return path.relative_to(self.root).as_posix()


@dataclass(frozen=True)
class Plan:
    """The categories and jobs of a run (identical on every process)."""

    categories: list[prompts.PromptCategory]
    jobs: list[prompts.GenerationJob]

    @property
    def names(self) -> dict[int, str]:
        return {c.category_id: c.name for c in self.categories}


def load_categories(cfg: PromptsConfig) -> list[prompts.PromptCategory]:
    """Every category of ``cfg.annotations`` plus ``cfg.extra_categories``."""
    return prompts.load_categories(cfg.annotations, extra=cfg.extra_categories or None)


def select_categories(
    cfg: PromptsConfig, categories: Sequence[prompts.PromptCategory]
) -> list[prompts.PromptCategory]:
    """``categories`` narrowed to ``cfg.category_ids`` and ``cfg.frequencies``."""
    if cfg.category_ids:
        known = {c.category_id for c in categories}
        unknown = sorted(set(cfg.category_ids) - known)
        if unknown:
            raise ValueError(f"prompts.category_ids: {unknown} are not categories of {cfg.annotations}")
        wanted = set(cfg.category_ids)
        categories = [c for c in categories if c.category_id in wanted]
    if cfg.frequencies:
        categories = [c for c in categories if c.frequency in cfg.frequencies]
    if not categories:
        raise ValueError(
            f"no category of {cfg.annotations} is selected by prompts.category_ids / frequencies"
        )
    return categories


def make_plan(cfg: GenerateConfig, layout: Layout, every: Sequence[prompts.PromptCategory]) -> Plan:
    """The jobs of the selected categories among ``every`` (``load_categories``), from the prompt files the
    ``prompts`` stage wrote (an error names a missing one)."""
    categories = select_categories(cfg.prompts, every)
    missing = [c.category_id for c in categories if not (layout.prompts / f"{c.category_id}.txt").is_file()]
    if missing:
        raise FileNotFoundError(
            f"{layout.prompts}: no prompt file for categories {missing[:10]}{'...' if len(missing) > 10 else ''};"
            " run the 'prompts' stage first"
        )
    lines = {
        c.category_id: prompts.read_prompt_file(layout.prompts / f"{c.category_id}.txt") for c in categories
    }
    jobs = prompts.plan_jobs(
        categories,
        prompts=lines,
        template=cfg.prompts.template,
        images_per_category=cfg.prompts.images_per_category,
        seed=cfg.seed,
    )
    return Plan(categories, jobs)


# ------------------------------------------------------------------------------------------------ JSON lines


def read_records(folder: Path) -> Iterator[dict]:
    """Every record of ``folder/*.jsonl`` (sorted file names); a line that does not parse (torn by a crash) is
    skipped with a warning."""
    for path in sorted(folder.glob("*.jsonl")):
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    yield json.loads(line)
                except json.JSONDecodeError:
                    logger.warning("%s:%d: not a JSON record (a torn write?); skipped", path, n)


def latest_annotations(layout: Layout) -> list[dict]:
    """One annotation record per image: the last one (an image annotated again after a crash has two)."""
    return list({r["image"]: r for r in read_records(layout.annotations)}.values())


class RecordWriter:
    """Appends JSON records to ``path``, flushed and fsync-ed per ``flush()``. A torn last line left by a crash
    is cut off first, so the next record starts on its own line."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.exists():
            data = path.read_bytes()
            end = data.rfind(b"\n") + 1
            if end != len(data):
                logger.warning("%s: cutting a torn last line (%d bytes)", path, len(data) - end)
                with open(path, "r+b") as f:
                    f.truncate(end)
        self.path = path
        self._f = open(path, "a", encoding="utf-8")  # noqa: SIM115 (closed by close())

    def write(self, record: dict) -> None:
        self._f.write(json.dumps(record, ensure_ascii=False, allow_nan=False) + "\n")

    def flush(self) -> None:
        self._f.flush()
        os.fsync(self._f.fileno())

    def close(self) -> None:
        self.flush()
        self._f.close()

    def __enter__(self) -> RecordWriter:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _batches(items: Sequence, size: int) -> Iterator[Sequence]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _progress(total: int, desc: str, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, disable=not enabled, dynamic_ncols=True)


def _finite(x: float) -> float | None:
    return float(x) if math.isfinite(x) else None


# ------------------------------------------------------------------------------------------------ stages


@dataclass
class Context:
    """One process's view of a run: config, paths, plan, and its share of the work."""

    cfg: GenerateConfig
    layout: Layout
    rank: int = 0
    world_size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    progress: bool = True

    def my_categories(self, categories: Sequence[prompts.PromptCategory]) -> list[prompts.PromptCategory]:
        mine = prompts.shard_category_ids((c.category_id for c in categories), self.rank, self.world_size)
        return [c for c in categories if c.category_id in mine]

    def my_jobs(self, plan: Plan) -> list[prompts.GenerationJob]:
        return prompts.shard_jobs(plan.jobs, self.rank, self.world_size)

    def writer(self, folder: Path) -> RecordWriter:
        return RecordWriter(folder / f"rank{self.rank}.jsonl")


def stage_prompts(ctx: Context, every: Sequence[prompts.PromptCategory]) -> dict[str, int]:
    """Write ``prompts/<id>.txt`` for this process's categories that have none (stage 1); ``every`` is
    ``load_categories``."""
    cfg = ctx.cfg.prompts
    categories = ctx.my_categories(select_categories(cfg, every))
    todo = [c for c in categories if not (ctx.layout.prompts / f"{c.category_id}.txt").is_file()]
    given = prompts.read_prompt_dir(cfg.prompt_dir, every) if cfg.prompt_dir and todo else {}
    counts = Counter(existing=len(categories) - len(todo))
    lines = {c.category_id: given[c.category_id] for c in todo if c.category_id in given}
    counts["prompt_dir"] = len(lines)
    rest = [c for c in todo if c.category_id not in given]
    if rest and cfg.llm_model:
        from .diversify import diversify_prompts

        lines |= diversify_prompts(
            rest,
            model_path=cfg.llm_model,
            prompts_per_category=cfg.llm_prompts_per_category,
            seed=ctx.cfg.seed,
            device=ctx.device,
        )
        counts["llm"] = len(rest)
    else:
        lines |= {c.category_id: [prompts.template_prompt(c, cfg.template)] for c in rest}
        counts["template"] = len(rest)
    prompts.write_prompt_dir(lines, ctx.layout.prompts)
    logger.info("prompts: %s", dict(counts))
    return dict(counts)


def stage_generate(ctx: Context, plan: Plan) -> dict[str, dict[str, int]]:
    """Render this process's jobs with every generator, one generator in memory at a time (stage 2)."""
    from .generators import generate_to_disk, load_generator

    jobs = ctx.my_jobs(plan)
    counts = {}
    for spec in ctx.cfg.generators:
        if all(image_path(ctx.layout.images, j, spec.name).exists() for j in jobs):
            # Nothing to do: do not load a multi-GB pipeline.
            counts[spec.name] = {"generated": 0, "skipped_existing": len(jobs), "failed": 0}
            continue
        generator = load_generator(spec, device=ctx.device)
        counts[spec.name] = generate_to_disk(generator, jobs, ctx.layout.images, progress=ctx.progress)
        del generator
        _empty_cache(ctx.device)
    return counts


def _empty_cache(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()


def load_scorer(cfg: FilterConfig, device: torch.device) -> clip_filter.ClipScorer:
    if cfg.clip_model_config:
        import open_clip

        path = Path(cfg.clip_model_config)
        if not path.is_file():
            raise FileNotFoundError(f"filter.clip_model_config: {path} does not exist")
        open_clip.add_model_config(path)
    return clip_filter.ClipScorer.load(
        model=cfg.clip_model, pretrained=cfg.clip_pretrained or None, device=device
    )


def build_annotators(ctx: Context) -> list[Any]:
    """The configured annotators, in config order (``annotate.SamAnnotator`` / ``annotate.ClipSegAnnotator``)."""
    a = ctx.cfg.annotate
    post = {"min_area": a.min_area, "max_area": a.max_area}
    out = []
    for name in a.annotators:
        if name == "sam":
            predictor = annotate.load_sam(a.sam_checkpoint, model_type=a.sam_model_type, device=ctx.device)
            out.append(
                annotate.SamAnnotator(predictor, margin=a.margin, official_index=a.official_index, **post)
            )
        else:
            model, processor = annotate.load_clipseg(a.clipseg_model, device=ctx.device)
            out.append(annotate.ClipSegAnnotator(model, processor, threshold=a.clipseg_threshold, **post))
    return out


def _job_record(layout: Layout, job: prompts.GenerationJob, generator: str) -> dict:
    return {
        "image": layout.rel(image_path(layout.images, job, generator)),
        "category_id": job.category_id,
        "generator": generator,
        "prompt": job.prompt,
        "prompt_index": job.prompt_index,
        "sample_index": job.sample_index,
        "seed": job.seed,
    }


def stage_annotate(ctx: Context, plan: Plan) -> dict[str, int]:
    """Cut out every generated image of this process that has no annotation record yet (stage 3).

    One record per image in ``annotations/rank<r>.jsonl``: the job's fields, ``cutout`` (path or null),
    ``annotator`` (the one kept), ``reason`` (null or why it was rejected), ``area`` and, with several annotators,
    ``annotator_scores`` (their CLIP scores). An image that does not decode is counted, removed and gets no record,
    so the ``generate`` stage of a rerun makes it again and this stage tries again.
    """
    layout = ctx.layout
    done = {r["image"] for r in read_records(layout.annotations)}
    items, counts = [], Counter()
    for job in ctx.my_jobs(plan):
        for spec in ctx.cfg.generators:
            rec = _job_record(layout, job, spec.name)
            if rec["image"] in done:
                counts["skipped_existing"] += 1
            elif (layout.root / rec["image"]).exists():
                items.append(rec)
    if not items:
        logger.info("annotate: nothing to do")
        return dict(counts)
    annotators = build_annotators(ctx)
    scorer = load_scorer(ctx.cfg.filter, ctx.device) if len(annotators) > 1 else None
    names = plan.names
    with ctx.writer(layout.annotations) as out, _progress(len(items), "annotate", ctx.progress) as bar:
        for rec in items:
            bar.update(1)
            try:
                with Image.open(layout.root / rec["image"]) as f:
                    rgb = np.asarray(f.convert("RGB"))
            except annotate.READ_ERRORS as e:
                # Removed, so that the next run's generate stage (which trusts existing files) makes it again.
                logger.warning(
                    "%s: cannot decode the image (%s); removed, a rerun regenerates it", rec["image"], e
                )
                (layout.root / rec["image"]).unlink(missing_ok=True)
                counts["unreadable"] += 1
                continue
            try:
                choice = annotate.annotate_with(annotators, rgb, names[rec["category_id"]], scorer=scorer)
            except Exception:  # one bad image must not end a run over a million; logged with its traceback
                logger.exception("%s: annotation failed", rec["image"])
                counts["failed"] += 1
                continue
            ann = choice.annotation
            rec = rec | {"cutout": None, "annotator": choice.annotator, "reason": ann.reason}
            rec["area"] = round(float(ann.area_fraction), 6)
            if len(annotators) > 1:
                rec["annotator_scores"] = {k: _finite(v) for k, v in choice.scores.items()}
            if ann.reason is None:
                cutout = layout.cutouts / Path(rec["image"]).relative_to("images")
                annotate.save_image_atomic(Image.fromarray(ann.rgba), cutout)
                rec["cutout"] = layout.rel(cutout)
                counts["written"] += 1
            else:
                counts[ann.reason] += 1
            out.write(rec)
            out.flush()
    logger.info("annotate: %s", dict(counts))
    return dict(counts)


def reference_embeddings(
    ctx: Context, scorer: clip_filter.ClipScorer, category_ids: Sequence[int]
) -> dict[int, torch.Tensor]:
    """The real-crop mean embeddings of ``category_ids``, cached per category in ``references/<id>.safetensors``
    (``references/<id>.none`` marks a category without real crops)."""
    folder = ctx.layout.references
    cached = {
        c for c in category_ids if (folder / f"{c}.safetensors").exists() or (folder / f"{c}.none").exists()
    }
    missing = [c for c in category_ids if c not in cached]
    if missing:
        f = ctx.cfg.filter
        real = f.real_annotations or ctx.cfg.prompts.annotations
        crops = clip_filter.lvis_real_crops(
            real, f.real_image_root, max_per_category=f.max_real_crops_per_category or None
        )
        folder.mkdir(parents=True, exist_ok=True)
        for cid in missing:
            refs = clip_filter.category_reference_embeddings(
                scorer, {cid: crops.get(cid, iter(()))}, batch_size=f.batch_size
            )
            if cid in refs:
                clip_filter.save_references(refs, folder / f"{cid}.safetensors")
            else:
                (folder / f"{cid}.none").write_text("no real crop\n")
    out = {}
    for cid in category_ids:
        if (folder / f"{cid}.safetensors").exists():
            out |= clip_filter.load_references(folder / f"{cid}.safetensors")
    return out


def stage_filter(ctx: Context, plan: Plan) -> dict[str, int]:
    """Score every cut-out of this process that has no score record yet (stage 4): ``scores/rank<r>.jsonl`` gets
    the annotation record plus ``clip_score`` and ``clip_inter_sim`` (null without a reference)."""
    layout = ctx.layout
    mine = {c.category_id for c in ctx.my_categories(plan.categories)}
    done = {r["cutout"] for r in read_records(layout.scores)}
    cutouts = [r for r in latest_annotations(layout) if r["cutout"] and r["category_id"] in mine]
    items = sorted((r for r in cutouts if r["cutout"] not in done), key=lambda r: r["cutout"])
    counts = Counter(skipped_existing=len(cutouts) - len(items))
    if not items:
        logger.info("filter: nothing to do")
        return dict(counts)
    f = ctx.cfg.filter
    scorer = load_scorer(f, ctx.device)
    refs = reference_embeddings(ctx, scorer, sorted({r["category_id"] for r in items}))
    names = plan.names
    with ctx.writer(layout.scores) as out, _progress(len(items), "filter", ctx.progress) as bar:
        for batch in _batches(items, f.batch_size * 4):
            bar.update(len(batch))
            good, cutouts = [], []
            for rec in batch:
                try:
                    with Image.open(layout.root / rec["cutout"]) as im:
                        cutouts.append(np.asarray(im.convert("RGBA")))
                    good.append(rec)
                except annotate.READ_ERRORS as e:
                    logger.warning("%s: cannot decode the cut-out (%s); skipped", rec["cutout"], e)
                    counts["unreadable"] += 1
            if not good:
                continue
            ids = [r["category_id"] for r in good]
            score = clip_filter.clip_scores(scorer, cutouts, [names[c] for c in ids], batch_size=f.batch_size)
            inter = clip_filter.inter_similarity(scorer, cutouts, ids, refs, batch_size=f.batch_size)
            for rec, s, i in zip(good, score, inter, strict=True):
                out.write(rec | {"clip_score": _finite(s), "clip_inter_sim": _finite(i)})
            out.flush()
            counts["scored"] += len(good)
    logger.info("filter: %s", dict(counts))
    return dict(counts)


def stage_pool(ctx: Context, plan: Plan) -> dict[str, Any]:
    """Apply the thresholds, write ``pool.jsonl``, the per-category report and the contact sheets (stage 5).
    Run by one process, after every process has scored."""
    layout, f = ctx.layout, ctx.cfg.filter
    scored = {r["cutout"]: r for r in read_records(layout.scores)}
    planned = {c.category_id for c in plan.categories}
    records = sorted(
        (r for r in scored.values() if r["category_id"] in planned),
        key=lambda r: (r["category_id"], r["generator"], r["prompt_index"], r["sample_index"]),
    )
    nan = float("nan")
    keep = clip_filter.keep_mask(
        np.array([nan if r["clip_score"] is None else r["clip_score"] for r in records], dtype=np.float64),
        np.array([nan if r["clip_inter_sim"] is None else r["clip_inter_sim"] for r in records]),
        min_clip_score=_finite(f.min_clip_score),
        min_inter_similarity=_finite(f.min_inter_similarity),
        keep_without_reference=f.keep_without_reference,
    )
    pool_fields = ("category_id", "generator", "prompt", "seed", "clip_score", "clip_inter_sim", "annotator")
    kept = [{"path": r["cutout"]} | {k: r.get(k) for k in pool_fields} for r, k in zip(records, keep) if k]
    write_pool_index(kept, layout.pool)
    rows = report.category_rows(
        plan.categories,
        planned={
            c: n * len(ctx.cfg.generators) for c, n in Counter(j.category_id for j in plan.jobs).items()
        },
        generated=count_images(ctx, plan),
        annotations=latest_annotations(layout),
        scored=records,
        keep=keep,
    )
    report.write_csv(rows, layout.report / "categories.csv")
    summary = {
        "categories": len(plan.categories),
        "generators": [g.name for g in ctx.cfg.generators],
        **{k: int(sum(row[k] for row in rows)) for k in report.COUNTS},
        "thresholds": {
            "min_clip_score": _finite(f.min_clip_score),
            "min_inter_similarity": _finite(f.min_inter_similarity),
        },
        "pool": layout.rel(layout.pool),
    }
    (layout.report / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    sheets = draw_sheets(ctx, plan, records, keep)
    logger.info(
        "pool: %d of %d scored cut-outs kept -> %s (report: %s, %d contact sheets)",
        len(kept),
        len(records),
        layout.pool,
        layout.report / "categories.csv",
        sheets,
    )
    return summary


def count_images(ctx: Context, plan: Plan) -> Counter:
    """Generated PNGs per category id, over all generators (a directory listing, no decoding)."""
    counts = Counter()
    for spec in ctx.cfg.generators:
        for c in plan.categories:
            folder = ctx.layout.images / spec.name / str(c.category_id)
            if folder.is_dir():
                counts[c.category_id] += sum(1 for e in os.scandir(folder) if e.name.endswith(".png"))
    return counts


def draw_sheets(ctx: Context, plan: Plan, records: Sequence[dict], keep: np.ndarray) -> int:
    """``report/sheets/<id>.png`` for the first ``report.max_sheets`` categories that have scored cut-outs: kept
    ones above, those the filters rejected below (``generation_report.draw_sheet``). Returns how many."""
    r = ctx.cfg.report
    by_category: dict[int, tuple[list, list]] = defaultdict(lambda: ([], []))
    for rec, k in zip(records, keep, strict=True):
        by_category[rec["category_id"]][0 if k else 1].append(ctx.layout.root / rec["cutout"])
    ids = [c.category_id for c in plan.categories if c.category_id in by_category][: r.max_sheets]
    folder = ctx.layout.report / "sheets"
    folder.mkdir(parents=True, exist_ok=True)
    for cid in ids:
        kept, rejected = by_category[cid]
        sheet = report.draw_sheet(
            kept,
            rejected,
            columns=r.sheet_columns,
            rows=r.sheet_rows,
            cell=r.sheet_cell,
            title=f"{cid} {plan.names[cid]}: {len(kept)} kept, {len(rejected)} rejected",
        )
        sheet.save(folder / f"{cid}.png")
    return len(ids)


# ------------------------------------------------------------------------------------------------ driver


def run(
    cfg: GenerateConfig,
    stages: Iterable[str] = STAGES,
    *,
    rank: int = 0,
    world_size: int = 1,
    device: str | torch.device | None = None,
    barrier: Any = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Run ``stages`` (in ``STAGES`` order) as process ``rank`` of ``world_size``.

    Arguments:
        cfg: the config.
        stages: names from ``STAGES``.
        rank, world_size: this process's share of the categories (``accelerate launch``: the process index).
        device: where the models run; default ``cfg.device`` or the CPU.
        barrier: called between stages when ``world_size > 1`` (``PartialState().wait_for_everyone``); the
            ``pool`` stage runs on rank 0 only, after it.
        progress: tqdm bars.

    Returns each stage's counts.
    """
    wanted = set(stages)
    if wanted - set(STAGES):
        raise ValueError(f"unknown stages {sorted(wanted - set(STAGES))}; expected names from {STAGES}")
    stages = [s for s in STAGES if s in wanted]
    problems = missing_inputs(cfg, stages)
    if problems:
        raise FileNotFoundError("generate: missing inputs:\n  " + "\n  ".join(problems))
    ctx = Context(
        cfg=cfg,
        layout=Layout(Path(cfg.output_dir)),
        rank=rank,
        world_size=world_size,
        device=torch.device(device or cfg.device or "cpu"),
        progress=progress and rank == 0,
    )
    ctx.layout.root.mkdir(parents=True, exist_ok=True)
    wait = barrier if (barrier is not None and world_size > 1) else (lambda: None)
    results: dict[str, Any] = {}
    every, plan = load_categories(cfg.prompts), None  # an LVIS train file is 1 GB: parsed once per run
    for stage in stages:
        if stage == "prompts":
            results[stage] = stage_prompts(ctx, every)
            wait()
            continue
        plan = plan or make_plan(cfg, ctx.layout, every)
        if stage == "pool":
            wait()
            if rank == 0:
                results[stage] = stage_pool(ctx, plan)
            wait()
        else:
            results[stage] = {"generate": stage_generate, "annotate": stage_annotate, "filter": stage_filter}[
                stage
            ](ctx, plan)
    return results
