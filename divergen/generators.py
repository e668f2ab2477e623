"""Stage 2 of the generation pipeline: text-to-image generation with diffusers (divergen.md §1.1, §7).

Two official generators, reproduced as their scripts run them:

- Stable Diffusion (X-Paste ``generation/text2im.py``): ``StableDiffusionPipeline`` with
  ``DPMSolverMultistepScheduler.from_config``, 50 steps, guidance 7.5, 512×512, batch 4.
- DeepFloyd-IF (DiverGen ``generation/txt2img_diffusers_stages_from_txt.py``): stage I ``IF-I-XL-v1.0``, then
  stage II ``IF-II-L-v1.0`` loaded with ``text_encoder=None`` and fed the stage-I T5 embeddings;
  ``encode_prompt`` once per prompt; ``output_type="pt"`` (no safety checker, no watermark); stage III is not run
  (DATA.md runs ``--stages I II``), so images are 256×256. The official stage-I sampler is diffusers' default
  (100 steps, guidance 7.0): set ``steps=100, guidance=7.0`` in the spec to reproduce it.

Any other text-to-image ``DiffusionPipeline`` runs with ``kind="diffusers"``.

Unlike the official scripts (one global ``torch.manual_seed(42 + rank)``), every image gets its own
``torch.Generator`` seeded with its job's seed, so an image depends only on its job: the same job gets the same
noise whatever the batch it falls in, the number of ranks, or a resume (pixels equal up to the summation order of
batched kernels: within one grey level; bit-identical for the same batch composition).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from .hub import download_hint, model_source
from .prompts import GenerationJob

logger = logging.getLogger(__name__)

KINDS = ("sd", "if", "diffusers")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# X-Paste's "runwayml/stable-diffusion-v1-5" (divergen.md §1.1); that hub repo is gone, this is its mirror.
SD15_MODEL = "stable-diffusion-v1-5/stable-diffusion-v1-5"
IF_STAGE1_MODEL, IF_STAGE2_MODEL = "DeepFloyd/IF-I-XL-v1.0", "DeepFloyd/IF-II-L-v1.0"
_DEFAULT_NAMES = {"sd": "sd15", "if": "if", "diffusers": "diffusers"}


@dataclass(frozen=True)
class GeneratorSpec:
    """Which text-to-image model to run, and how (defaults: X-Paste's SD settings, divergen.md §1.1).

    ``kind`` is "sd", "if" or "diffusers". ``model`` is a hub id or a local directory (``save_pretrained``
    layout); for "if" it is stage I and ``model_stage2`` stage II. ``steps``/``guidance``/``size`` drive SD and
    generic pipelines and IF stage I (whose sizes come from the checkpoints: ``size`` is ignored for "if");
    ``steps_stage2``/``guidance_stage2``/``noise_level`` drive IF stage II. ``name`` is recorded as
    ``"generator"`` in ``pool.jsonl`` and names the output folder; default from ``kind`` ("sd15", "if",
    "diffusers").
    """

    kind: str = "sd"
    model: str = SD15_MODEL
    model_stage2: str = ""
    dtype: str = "float16"
    steps: int = 50
    guidance: float = 7.5
    size: int = 512
    steps_stage2: int = 50
    guidance_stage2: float = 4.0
    noise_level: int = 250
    batch_size: int = 4
    name: str = ""

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"GeneratorSpec.kind: expected one of {KINDS}, got {self.kind!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"GeneratorSpec.dtype: expected one of {tuple(DTYPES)}, got {self.dtype!r}")
        if self.kind == "if" and not self.model_stage2:
            raise ValueError("GeneratorSpec.model_stage2: kind 'if' needs the stage-II model (IF-II-L-v1.0)")
        if self.batch_size < 1 or self.steps < 1 or self.steps_stage2 < 1 or self.size < 8:
            raise ValueError(
                f"GeneratorSpec: expected batch_size, steps, steps_stage2 >= 1 and size >= 8, got "
                f"batch_size={self.batch_size}, steps={self.steps}, steps_stage2={self.steps_stage2}, "
                f"size={self.size}"
            )
        if not self.name:
            object.__setattr__(self, "name", _DEFAULT_NAMES[self.kind])


# ------------------------------------------------------------------------------------------------ loading


def _torch_dtype(spec: GeneratorSpec, device: torch.device) -> torch.dtype:
    dtype = DTYPES[spec.dtype]
    if device.type == "cpu" and dtype != torch.float32:
        # Half-precision diffusion on CPU is either unsupported (fp16 conv kernels) or very slow.
        logger.warning("generator %s: dtype %s on CPU is not supported; using float32", spec.name, spec.dtype)
        dtype = torch.float32
    return dtype


def _from_pretrained(cls: Any, model: str, *, dtype: torch.dtype, **kwargs: Any) -> Any:
    """``cls.from_pretrained`` with the fp16 weight variant where the repo has one (divergen.md §1.1: IF is
    loaded with ``variant='fp16'``), falling back to the default weights; clear errors for missing weights."""
    source, is_local = model_source(model, what="generator model")
    attempts = [{"variant": "fp16"}, {}] if dtype == torch.float16 else [{}]
    error: Exception | None = None
    for extra in attempts:
        try:
            return cls.from_pretrained(source, dtype=dtype, **extra, **kwargs)
        except (OSError, ValueError) as e:  # diffusers: ValueError/OSError when a variant's files are absent
            error = e
            logger.info("loading %s with %s failed (%s); retrying", source, extra or "default weights", e)
    if is_local:
        raise OSError(
            f"generator model {source}: cannot load a diffusers pipeline from it: {error}"
        ) from error
    raise OSError(
        f"generator model {model!r}: not a local directory and not loadable from the Hugging Face hub ({error}). "
        + download_hint(model)
    ) from error


def load_generator(spec: GeneratorSpec, *, device: str | torch.device) -> Generator:
    """Load the pipeline(s) of ``spec`` onto ``device``.

    Arguments:
        spec: the generator to load.
        device: where to run it ("cuda", "cuda:1", "cpu", ...). On CPU the dtype is forced to float32, with a
            warning.

    A local path that does not exist is a ``FileNotFoundError`` naming it; a hub id that cannot be fetched is an
    ``OSError`` saying how to download it. Safety checkers are off: the official IF run uses
    ``output_type="pt"``, which skips them and the watermark; SD gets ``safety_checker=None``.
    """
    import diffusers  # heavy import (and optional for training), so only here

    device = torch.device(device)
    dtype = _torch_dtype(spec, device)
    stage2 = None
    if spec.kind == "sd":
        pipe = _from_pretrained(
            diffusers.StableDiffusionPipeline,
            spec.model,
            dtype=dtype,
            safety_checker=None,
            requires_safety_checker=False,
        )
        # divergen.md §1.1: X-Paste text2im.py swaps in DPM-Solver++ multistep.
        pipe.scheduler = diffusers.DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
    elif spec.kind == "if":
        no_checker = {"safety_checker": None, "watermarker": None, "requires_safety_checker": False}
        pipe = _from_pretrained(diffusers.IFPipeline, spec.model, dtype=dtype, **no_checker)
        # divergen.md §1.1: stage II reuses the stage-I T5 embeddings, so its text encoder is never loaded.
        stage2 = _from_pretrained(
            diffusers.IFSuperResolutionPipeline,
            spec.model_stage2,
            dtype=dtype,
            text_encoder=None,
            **no_checker,
        )
        stage2.to(device)
        stage2.set_progress_bar_config(disable=True)
    else:
        pipe = _from_pretrained(diffusers.DiffusionPipeline, spec.model, dtype=dtype)
    pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    logger.info("loaded generator %s (%s, %s) on %s", spec.name, spec.model, dtype, device)
    return Generator(spec=spec, pipe=pipe, stage2=stage2, device=device)


# ------------------------------------------------------------------------------------------------ generation


def _to_pil(images: np.ndarray | torch.Tensor, jobs: Sequence[GenerationJob]) -> list[Image.Image]:
    """(B, H, W, 3) float in [0, 1] (numpy) or (B, 3, H, W) float in [-1, 1] (torch) -> RGB PIL images.

    Non-finite pixels (fp16 overflow, a broken checkpoint) raise instead of being saved as black images.
    """
    if isinstance(images, torch.Tensor):
        images = ((images.float() / 2 + 0.5).clamp(0, 1)).permute(0, 2, 3, 1).cpu().numpy()
    bad = [j for j, im in zip(jobs, images) if not np.isfinite(im).all()]
    if bad:
        raise ValueError(f"non-finite pixels in the generated images of jobs {bad}")
    pixels = (np.clip(images, 0.0, 1.0) * 255).round().astype(np.uint8)
    return [Image.fromarray(p[..., :3]).convert("RGB") for p in pixels]


class Generator:
    """A loaded text-to-image generator; ``generate`` maps jobs to images.

    Arguments:
        spec: the spec it was loaded from (sampler settings, batch size, ``name``).
        pipe: the diffusers pipeline (IF: stage I).
        stage2: IF stage II (``IFSuperResolutionPipeline`` without text encoder), else None.
        device: the pipelines' device; the per-image ``torch.Generator``s live there.
    """

    def __init__(self, *, spec: GeneratorSpec, pipe: Any, stage2: Any = None, device: torch.device) -> None:
        if spec.kind == "if" and stage2 is None:
            raise ValueError(f"generator {spec.name}: kind 'if' needs the stage-II pipeline")
        self.spec = spec
        self.name = spec.name
        self.pipe = pipe
        self.stage2 = stage2
        self.device = torch.device(device)
        self._embeds: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def generate(self, jobs: Sequence[GenerationJob]) -> list[Image.Image]:
        """One RGB PIL image per job, in order, in batches of ``spec.batch_size``.

        Each image has its own ``torch.Generator`` seeded with ``job.seed`` (a list of generators per batch), so
        an image does not depend on the other jobs of its batch.
        """
        out: list[Image.Image] = []
        for start in range(0, len(jobs), self.spec.batch_size):
            batch = list(jobs[start : start + self.spec.batch_size])
            generators = [torch.Generator(self.device).manual_seed(job.seed) for job in batch]
            with torch.inference_mode():
                if self.spec.kind == "if":
                    out += self._generate_if(batch, generators)
                else:
                    out += self._generate_sd(batch, generators)
        return out

    def _generate_sd(self, jobs: list[GenerationJob], generators: list[torch.Generator]) -> list[Image.Image]:
        s = self.spec
        images = self.pipe(
            prompt=[job.prompt for job in jobs],
            num_inference_steps=s.steps,
            guidance_scale=s.guidance,
            height=s.size,
            width=s.size,
            generator=generators,
            output_type="np",
        ).images
        return _to_pil(np.asarray(images), jobs)

    def _prompt_embeds(self, prompt: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(1, L, D) T5 embeddings of ``prompt`` and of the empty negative prompt, computed once per distinct
        prompt (divergen.md §1.1: ``encode_prompt(prompt)`` once, reused by both stages)."""
        if prompt not in self._embeds:
            if len(self._embeds) >= 1024:  # bound the cache: jobs come grouped by prompt (prompts.plan_jobs)
                self._embeds.clear()
            self._embeds[prompt] = self.pipe.encode_prompt(prompt, device=self.device)
        return self._embeds[prompt]

    def _generate_if(self, jobs: list[GenerationJob], generators: list[torch.Generator]) -> list[Image.Image]:
        s = self.spec
        pairs = [self._prompt_embeds(job.prompt) for job in jobs]
        embeds = torch.cat([p for p, _ in pairs])
        negative = torch.cat([n for _, n in pairs])
        stage1 = self.pipe(
            prompt_embeds=embeds,
            negative_prompt_embeds=negative,
            num_inference_steps=s.steps,
            guidance_scale=s.guidance,
            generator=generators,
            output_type="pt",
        ).images
        # The generators continue from their stage-I state: still one stream per image.
        stage2 = self.stage2(
            image=stage1,
            prompt_embeds=embeds,
            negative_prompt_embeds=negative,
            num_inference_steps=s.steps_stage2,
            guidance_scale=s.guidance_stage2,
            noise_level=s.noise_level,
            generator=generators,
            output_type="pt",
        ).images
        return _to_pil(stage2, jobs)


# ------------------------------------------------------------------------------------------------ output


def image_path(root: str | os.PathLike, job: GenerationJob, generator_name: str) -> Path:
    """``root/<generator>/<category_id>/<prompt_index:05d>_<sample_index:05d>.png``: one file per job, so a run
    can resume and several generators can share a root."""
    return (
        Path(root)
        / generator_name
        / str(job.category_id)
        / f"{job.prompt_index:05d}_{job.sample_index:05d}.png"
    )


def is_readable_image(path: Path) -> bool:
    """Whether ``path`` is a complete PNG (a crash mid-write elsewhere can leave a truncated one)."""
    try:
        with Image.open(path) as im:
            im.load()
    except (OSError, SyntaxError, ValueError):
        return False
    return True


def save_image_atomic(image: Image.Image, path: Path) -> None:
    """Write ``image`` as a PNG at ``path`` through a temporary file and ``os.replace`` (parents created)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        image.save(tmp, format="PNG")
        os.replace(tmp, path)  # atomic: readers never see a partial PNG under the final name
    finally:
        tmp.unlink(missing_ok=True)


def generate_to_disk(
    generator: Generator,
    jobs: Sequence[GenerationJob],
    root: str | os.PathLike,
    *,
    progress: bool = False,
    verify: bool = False,
) -> dict[str, int]:
    """Generate every job's image to ``image_path(root, job, generator.name)``, resumably.

    Arguments:
        generator: a loaded ``Generator`` (anything with ``name`` and ``generate(jobs) -> list[PIL.Image]``).
        jobs: the jobs to run (e.g. this rank's ``prompts.shard_jobs`` share).
        root: output root; ``root/<generator.name>/...`` is created.
        progress: show a tqdm bar over jobs.
        verify: also decode every existing PNG and regenerate those that do not decode (files copied in from
            elsewhere). Off by default: this function writes atomically, so a file under its final name is
            complete, and decoding a million 512² PNGs at every resume would take over an hour (4-6 ms each).

    Jobs whose PNG already exists are skipped. Each PNG is written atomically. A batch that raises is retried
    job by job, and a job that still raises (e.g. non-finite output) is logged and counted as failed; the run
    goes on. Returns ``{"generated", "skipped_existing", "failed"}`` counts.
    """
    counts = {"generated": 0, "skipped_existing": 0, "failed": 0}
    todo = []
    for job in jobs:
        path = image_path(root, job, generator.name)
        if path.exists() and (not verify or is_readable_image(path)):
            counts["skipped_existing"] += 1
        else:
            if path.exists():
                logger.warning("%s is not a readable PNG; regenerating it", path)
            todo.append(job)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(jobs), initial=counts["skipped_existing"], desc=f"generate {generator.name}")
    batch_size = getattr(getattr(generator, "spec", None), "batch_size", 1)
    for start in range(0, len(todo), batch_size):
        batch = todo[start : start + batch_size]
        try:
            results: list[tuple[GenerationJob, Image.Image | None]] = list(
                zip(batch, generator.generate(batch))
            )
        except Exception:  # one bad batch must not end a multi-day run; isolate the bad job
            logger.warning("batch of %d jobs failed; retrying them one by one", len(batch), exc_info=True)
            results = []
            for job in batch:
                try:
                    results.append((job, generator.generate([job])[0]))
                except Exception:  # logged with its traceback and counted
                    logger.exception("generation failed for %s", job)
                    results.append((job, None))
        for job, image in results:
            if image is None:
                counts["failed"] += 1
            else:
                save_image_atomic(image, image_path(root, job, generator.name))
                counts["generated"] += 1
        if bar is not None:
            bar.update(len(batch))
    if bar is not None:
        bar.close()
    logger.info("generator %s: %s", generator.name, counts)
    return counts
