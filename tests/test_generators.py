"""Stage 2 of the generation pipeline on tiny random-weight diffusers models, saved to disk and loaded through
``load_generator`` (no network)."""

from __future__ import annotations

import json
import logging
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from divergen.generators import Generator, GeneratorSpec, generate_to_disk, image_path, load_generator
from divergen.prompts import GenerationJob

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

JOBS = [
    GenerationJob(category_id=3, prompt="a photo of a single cat", prompt_index=0, sample_index=0, seed=11),
    GenerationJob(category_id=3, prompt="a photo of a single cat", prompt_index=0, sample_index=1, seed=12),
    GenerationJob(category_id=7, prompt="a photo of a single dog", prompt_index=1, sample_index=0, seed=13),
]


def _byte_chars() -> list[str]:
    """GPT-2/CLIP byte-level alphabet: the 256 unicode characters that stand for bytes."""
    bs = (
        list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    )
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


def _clip_tokenizer(path: Path):
    chars = _byte_chars()
    vocab = chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"]
    path.mkdir(parents=True)
    (path / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}))
    (path / "merges.txt").write_text("#version: 0.2\n")
    return transformers.CLIPTokenizer(
        vocab_file=str(path / "vocab.json"), merges_file=str(path / "merges.txt"), model_max_length=77
    )


@pytest.fixture(scope="module")
def sd_dir(tmp_path_factory) -> Path:
    """A tiny Stable Diffusion pipeline (32 px images, 16 px latents) saved with ``save_pretrained``."""
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("sd")
    unet = diffusers.UNet2DConditionModel(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        block_out_channels=(16, 32),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=4,
        norm_num_groups=8,
    )
    vae = diffusers.AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(8, 16),
        latent_channels=4,
        norm_num_groups=8,
        sample_size=32,
    )
    text_encoder = transformers.CLIPTextModel(
        transformers.CLIPTextConfig(
            vocab_size=520,
            hidden_size=32,
            intermediate_size=37,
            num_attention_heads=4,
            num_hidden_layers=2,
            max_position_embeddings=77,
            bos_token_id=514,
            eos_token_id=515,
            pad_token_id=515,
        )
    )
    pipe = diffusers.StableDiffusionPipeline(
        unet=unet,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=_clip_tokenizer(root / "tok"),
        scheduler=diffusers.PNDMScheduler(skip_prk_steps=True, steps_offset=1),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(root / "model")
    return root / "model"


def _t5_tokenizer():
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    pieces += [(c, -3.0) for c in "abcdefghijklmnopqrstuvwxyz,"] + [
        ("▁" + c, -3.5) for c in "abcdefghijklmnopqrstuvwxyz"
    ]
    return transformers.T5TokenizerFast(vocab=pieces, extra_ids=0, model_max_length=77)


def _if_unet(*, superres: bool):
    kwargs = dict(
        layers_per_block=1,
        block_out_channels=(16, 32),
        down_block_types=("ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D"),
        mid_block_type="UNetMidBlock2DSimpleCrossAttn",
        up_block_types=("SimpleCrossAttnUpBlock2D", "ResnetUpsampleBlock2D"),
        out_channels=6,
        cross_attention_dim=32,
        encoder_hid_dim=32,
        attention_head_dim=8,
        addition_embed_type="text",
        addition_embed_type_num_heads=2,
        cross_attention_norm="group_norm",
        resnet_time_scale_shift="scale_shift",
        act_fn="gelu",
        norm_num_groups=8,
    )
    if superres:
        kwargs.update(
            sample_size=32, in_channels=6, class_embed_type="timestep", mid_block_scale_factor=1.414,
            time_embedding_act_fn="gelu", time_embedding_dim=32,
        )  # fmt: skip
    else:
        kwargs.update(sample_size=16, in_channels=3)
    return diffusers.UNet2DConditionModel(**kwargs)


def _if_scheduler():
    return diffusers.DDPMScheduler(
        num_train_timesteps=1000,
        beta_schedule="squaredcos_cap_v2",
        thresholding=True,
        dynamic_thresholding_ratio=0.95,
        sample_max_value=1.0,
        prediction_type="epsilon",
        variance_type="learned_range",
    )


@pytest.fixture(scope="module")
def if_dirs(tmp_path_factory) -> tuple[Path, Path]:
    """Tiny IF stage I (16 px) and stage II (32 px, no text encoder) pipelines saved with ``save_pretrained``."""
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("if")
    none = {
        "safety_checker": None,
        "feature_extractor": None,
        "watermarker": None,
        "requires_safety_checker": False,
    }
    text_encoder = transformers.T5EncoderModel(
        transformers.T5Config(vocab_size=64, d_model=32, d_ff=37, d_kv=8, num_layers=2, num_heads=4)
    )
    stage1 = diffusers.IFPipeline(
        tokenizer=_t5_tokenizer(),
        text_encoder=text_encoder,
        unet=_if_unet(superres=False),
        scheduler=_if_scheduler(),
        **none,
    )
    stage2 = diffusers.IFSuperResolutionPipeline(
        tokenizer=_t5_tokenizer(),
        text_encoder=None,
        unet=_if_unet(superres=True),
        scheduler=_if_scheduler(),
        image_noising_scheduler=diffusers.DDPMScheduler(
            num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2"
        ),
        **none,
    )
    stage1.save_pretrained(root / "stage1")
    stage2.save_pretrained(root / "stage2")
    return root / "stage1", root / "stage2"


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
    paths[2].write_bytes(original[2][: len(original[2]) // 2])  # a PNG truncated by a crash
    assert generate_to_disk(sd, JOBS, tmp_path) == {"generated": 2, "skipped_existing": 1, "failed": 0}
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
