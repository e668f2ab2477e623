"""Stage 2 of the generation pipeline on tiny random-weight diffusers models, saved to disk and loaded through
``load_generator`` (no network)."""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from divergen.generators import Generator, GeneratorSpec, generate_to_disk, image_path, load_generator
from divergen.prompts import GenerationJob
from divergen.tiny_models import save_if_pipelines, save_sd_pipeline

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

JOBS = [
    GenerationJob(category_id=3, prompt="a photo of a single cat", prompt_index=0, sample_index=0, seed=11),
    GenerationJob(category_id=3, prompt="a photo of a single cat", prompt_index=0, sample_index=1, seed=12),
    GenerationJob(category_id=7, prompt="a photo of a single dog", prompt_index=1, sample_index=0, seed=13),
]


@pytest.fixture(scope="module")
def sd_dir(tmp_path_factory) -> Path:
    """A tiny Stable Diffusion pipeline (32 px images, 16 px latents) saved with ``save_pretrained``."""
    return save_sd_pipeline(tmp_path_factory.mktemp("sd") / "model", image_size=32)


@pytest.fixture(scope="module")
def if_dirs(tmp_path_factory) -> tuple[Path, Path]:
    """Tiny IF stage I (16 px) and stage II (32 px, no text encoder) pipelines saved with ``save_pretrained``."""
    root = tmp_path_factory.mktemp("if")
    return save_if_pipelines(root / "stage1", root / "stage2")


@pytest.fixture(scope="module")
def sd(sd_dir) -> Generator:
    spec = GeneratorSpec(kind="sd", model=str(sd_dir), dtype="float32", steps=2, size=32, batch_size=3)
    return load_generator(spec, device="cpu")


def _pixels(images: list[Image.Image]) -> list[np.ndarray]:
    return [np.asarray(im) for im in images]


def test_sd_loads_with_official_scheduler_and_no_safety_checker(sd):
    assert isinstance(sd.pipe.scheduler, diffusers.DPMSolverMultistepScheduler)
    assert sd.pipe.safety_checker is None
    assert sd.name == "sd15"


def _assert_same_image(a: Image.Image, b: Image.Image) -> None:
    """Equal up to one grey level: batched CPU/GPU kernels sum in another order than unbatched ones, so the
    same job in another batch can round differently at a handful of pixels (the noise itself is identical)."""
    diff = np.abs(np.asarray(a, dtype=np.int16) - np.asarray(b, dtype=np.int16))
    assert diff.max() <= 1 and (diff > 0).mean() < 0.01


def test_sd_images_are_rgb_and_batch_independent(sd):
    batched = sd.generate(JOBS)  # one batch of 3
    assert [(im.mode, im.size) for im in batched] == [("RGB", (32, 32))] * 3
    # Batches of 1, in another order: each image depends only on its own job.
    _assert_same_image(sd.generate([JOBS[2]])[0], batched[2])
    _assert_same_image(sd.generate([JOBS[0]])[0], batched[0])
    # Different seeds give different images (the per-image generators are really used).
    assert np.abs(np.asarray(batched[0], dtype=np.int16) - np.asarray(batched[1])).mean() > 5


def test_if_two_stages_reuse_stage1_embeddings(if_dirs):
    stage1, stage2 = if_dirs
    spec = GeneratorSpec(
        kind="if", model=str(stage1), model_stage2=str(stage2), dtype="float32", steps=2, steps_stage2=2
    )
    gen = load_generator(spec, device="cpu")
    assert gen.stage2.text_encoder is None and gen.name == "if"
    calls = []
    encode = gen.pipe.encode_prompt

    def spy(prompt, *args, **kwargs):
        if prompt is not None:  # the pipeline's own call, given our embeddings, passes prompt=None
            calls.append(prompt)
        return encode(prompt, *args, **kwargs)

    gen.pipe.encode_prompt = spy
    batched = gen.generate(JOBS)
    assert calls == ["a photo of a single cat", "a photo of a single dog"]  # once per distinct prompt
    assert [(im.mode, im.size) for im in batched] == [("RGB", (32, 32))] * 3  # stage II's resolution
    _assert_same_image(gen.generate([JOBS[2]])[0], batched[2])
    assert np.abs(np.asarray(batched[0], dtype=np.int16) - np.asarray(batched[1])).mean() > 5


def test_image_path_layout(tmp_path):
    job = GenerationJob(category_id=1204, prompt="p", prompt_index=3, sample_index=17, seed=0)
    assert image_path(tmp_path, job, "if") == tmp_path / "if" / "1204" / "00003_00017.png"


def test_generate_to_disk_resumes_and_repairs(sd, tmp_path):
    # Batches of 1 so that regenerated jobs run exactly the same kernels: identical bytes.
    sd = Generator(spec=replace(sd.spec, batch_size=1), pipe=sd.pipe, device=sd.device)
    counts = generate_to_disk(sd, JOBS, tmp_path)
    assert counts == {"generated": 3, "skipped_existing": 0, "failed": 0}
    paths = [image_path(tmp_path, job, "sd15") for job in JOBS]
    original = [p.read_bytes() for p in paths]
    assert generate_to_disk(sd, JOBS, tmp_path, progress=True) == {
        "generated": 0,
        "skipped_existing": 3,
        "failed": 0,
    }
    paths[0].unlink()
    paths[2].write_bytes(original[2][: len(original[2]) // 2])  # a truncated PNG, copied in from elsewhere
    assert generate_to_disk(sd, JOBS, tmp_path) == {"generated": 1, "skipped_existing": 2, "failed": 0}
    assert generate_to_disk(sd, JOBS, tmp_path, verify=True) == {
        "generated": 1,
        "skipped_existing": 2,
        "failed": 0,
    }
    assert [p.read_bytes() for p in paths] == original
    assert not list(tmp_path.rglob("*.tmp"))


class _Flaky:
    """Stands in for a Generator whose image for one prompt cannot be generated."""

    name = "flaky"

    def __init__(self, base: Generator) -> None:
        self.base, self.spec = base, base.spec

    def generate(self, jobs):
        if any(job.prompt == "boom" for job in jobs):
            raise ValueError("non-finite pixels")
        return self.base.generate(jobs)


def test_failing_job_is_counted_and_the_rest_written(sd, tmp_path, caplog):
    bad = GenerationJob(category_id=3, prompt="boom", prompt_index=5, sample_index=0, seed=1)
    jobs = [JOBS[0], bad, JOBS[2]]
    with caplog.at_level(logging.ERROR, logger="divergen.generators"):
        counts = generate_to_disk(_Flaky(sd), jobs, tmp_path)
    assert counts == {"generated": 2, "skipped_existing": 0, "failed": 1}
    assert (
        image_path(tmp_path, JOBS[0], "flaky").is_file() and image_path(tmp_path, JOBS[2], "flaky").is_file()
    )
    assert not image_path(tmp_path, bad, "flaky").exists()
    assert "boom" in caplog.text


def test_non_finite_output_raises(sd_dir):
    spec = GeneratorSpec(kind="sd", model=str(sd_dir), dtype="float32", steps=2, size=32, name="nan")
    gen = load_generator(spec, device="cpu")
    with torch.no_grad():
        gen.pipe.vae.decoder.conv_out.bias.fill_(float("nan"))
    with pytest.raises(ValueError, match="non-finite"):
        gen.generate(JOBS[:1])


def test_missing_local_path_names_it(tmp_path):
    missing = tmp_path / "no" / "such" / "model"
    with pytest.raises(FileNotFoundError, match="no/such/model"):
        load_generator(GeneratorSpec(kind="sd", model=str(missing)), device="cpu")


def test_local_dir_that_is_not_a_pipeline(tmp_path):
    with pytest.raises(OSError, match="cannot load"):
        load_generator(GeneratorSpec(kind="sd", model=str(tmp_path), dtype="float32"), device="cpu")


def test_cpu_forces_float32_with_warning(sd_dir, caplog):
    with caplog.at_level(logging.WARNING, logger="divergen.generators"):
        gen = load_generator(GeneratorSpec(kind="sd", model=str(sd_dir), dtype="float16"), device="cpu")
    assert gen.pipe.unet.dtype == torch.float32
    assert "float16" in caplog.text and "float32" in caplog.text


def test_spec_validation_and_default_names():
    assert GeneratorSpec(kind="diffusers", model="m").name == "diffusers"
    assert GeneratorSpec(kind="sd", model="m", name="sd21").name == "sd21"
    with pytest.raises(ValueError, match="kind"):
        GeneratorSpec(kind="dalle", model="m")
    with pytest.raises(ValueError, match="dtype"):
        GeneratorSpec(kind="sd", model="m", dtype="float64")
    with pytest.raises(ValueError, match="model_stage2"):
        GeneratorSpec(kind="if", model="m")


def test_hub_id_without_network_says_how_to_download(monkeypatch):
    def offline(*args, **kwargs):
        raise OSError("We couldn't connect to 'https://huggingface.co' to load the files")

    monkeypatch.setattr(diffusers.StableDiffusionPipeline, "from_pretrained", offline)
    with pytest.raises(OSError, match="huggingface-cli download org/sd-model"):
        load_generator(GeneratorSpec(kind="sd", model="org/sd-model", dtype="float32"), device="cpu")
