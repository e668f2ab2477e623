"""Random-weight stand-ins of the generation models: each one saved, loaded back through the real loading code
(``load_generator``, ``load_sam``, ``ClipScorer.load``, ``from_pretrained``) with identical weights and outputs;
seeded builds are reproducible; the demo root is written once. The full SD v1.5 build runs only with
``DIVERGEN_BIG_MODELS=1`` (~1.07 B parameters, ~4.3 GB)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from divergen import tiny_models
from divergen.clip_filter import ClipScorer
from divergen.generators import GeneratorSpec, load_generator
from divergen.prompts import GenerationJob
from divergen.tiny_models import (
    TINY_CLIP_MODEL,
    build_if_pipelines,
    build_sd_pipeline,
    build_tiny_clip,
    build_tiny_clipseg,
    build_tiny_llm,
    build_tiny_sam,
    byte_level_clip_tokenizer,
    register_tiny_clip,
    tiny_clip_config,
    write_demo_models,
)

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")
open_clip = pytest.importorskip("open_clip")
segment_anything = pytest.importorskip("segment_anything")

BIG = os.environ.get("DIVERGEN_BIG_MODELS") == "1"
JOBS = [
    GenerationJob(category_id=3, prompt="a photo of a single cat", prompt_index=0, sample_index=0, seed=11),
    GenerationJob(category_id=7, prompt="a photo of a single dog", prompt_index=1, sample_index=0, seed=13),
]


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> dict[str, Path]:
    return write_demo_models(tmp_path_factory.mktemp("tiny") / "models", sd_image_size=64)


def _assert_same_weights(a, b) -> None:
    """``a`` and ``b``: modules or state dicts."""
    sa, sb = (x.state_dict() if isinstance(x, torch.nn.Module) else x for x in (a, b))
    assert sa.keys() == sb.keys()
    for name in sa:
        assert torch.equal(sa[name].cpu(), sb[name].cpu()), name


def _image(size: int = 40, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8))


# ------------------------------------------------------------------------------------------------ tokenizers


def test_byte_level_clip_tokenizer(tmp_path):
    tok = byte_level_clip_tokenizer(tmp_path / "tok")
    assert (tmp_path / "tok" / "vocab.json").is_file() and (tmp_path / "tok" / "merges.txt").is_file()
    assert len(tok) == 514 and tok.model_max_length == 77
    # One token per byte; a word's last byte carries the end-of-word suffix (id 256 + byte); CLIP lowercases.
    assert tok("A cat").input_ids == [512, 256 + ord("a"), ord("c"), ord("a"), 256 + ord("t"), 513]
    assert tok.convert_ids_to_tokens(tok("é!").input_ids)[1:-1] == ["Ã", "©</w>", "!</w>"]  # é is UTF-8 C3 A9


# ------------------------------------------------------------------------------------------------ demo root


def test_demo_root_written_once_then_skipped(demo, tmp_path, monkeypatch, caplog):
    assert sorted(demo) == sorted(tiny_models.demo_model_paths(demo["sd"].parent))
    assert all(p.exists() for p in demo.values())
    assert not list(demo["sd"].parent.glob(".*"))  # no temporary directory left behind
    copy = tmp_path / "copy"
    shutil.copytree(demo["sd"].parent, copy)
    shutil.rmtree(copy / "if_stage2")
    (copy / "sam_tiny.pth").unlink()
    stage1 = (copy / "if_stage1" / "model_index.json").stat().st_mtime_ns

    def boom(*args, **kwargs):
        raise AssertionError("an existing model was rebuilt")

    for name in ("build_sd_pipeline", "build_tiny_clip", "build_tiny_clipseg", "build_tiny_llm"):
        monkeypatch.setattr(tiny_models, name, boom)
    with caplog.at_level("INFO", logger="divergen.tiny_models"):
        tiny_models.main(["--root", str(copy)])  # the CLI: writes only the two missing models
    assert "tiny sam: wrote" in caplog.text and "tiny sd: " in caplog.text and "skipped" in caplog.text
    assert (copy / "if_stage1" / "model_index.json").stat().st_mtime_ns == stage1  # only stage II rewritten
    _assert_same_weights(torch.load(copy / "sam_tiny.pth"), torch.load(demo["sam"]))
    assert (copy / "if_stage2" / "unet").is_dir()
    for name in ("build_if_pipelines", "build_tiny_sam"):
        monkeypatch.setattr(tiny_models, name, boom)
    write_demo_models(copy)  # everything is there now


def test_interrupted_write_leaves_nothing(tmp_path, monkeypatch):
    def crash(self, *args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(diffusers.StableDiffusionPipeline, "save_pretrained", crash)
    with pytest.raises(OSError, match="disk full"):
        tiny_models.save_sd_pipeline(tmp_path / "sd")
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "x").write_text("x")
    with pytest.raises(FileExistsError, match="taken"):
        tiny_models.save_sd_pipeline(tmp_path / "taken")


# ------------------------------------------------------------------------------------------------ generators


def test_sd_round_trip_through_load_generator(demo):
    spec = GeneratorSpec(kind="sd", model=str(demo["sd"]), dtype="float32", steps=2, size=64, batch_size=2)
    gen = load_generator(spec, device="cpu")
    ref = build_sd_pipeline(image_size=64, seed=0)
    for part in ("unet", "vae", "text_encoder"):
        _assert_same_weights(getattr(gen.pipe, part), getattr(ref, part))
    assert gen.pipe.tokenizer(JOBS[0].prompt).input_ids == ref.tokenizer(JOBS[0].prompt).input_ids
    assert gen.pipe.vae_scale_factor == 8 and gen.pipe.unet.config.sample_size == 8
    images = gen.generate(JOBS)
    assert [(im.mode, im.size) for im in images] == [("RGB", (64, 64))] * 2
    assert np.abs(np.asarray(images[0], dtype=np.int16) - np.asarray(images[1])).mean() > 1


@pytest.mark.parametrize(("size", "factor", "latent"), [(None, 2, 16), (32, 2, 16), (64, 8, 8), (128, 8, 16)])
def test_sd_tiny_image_sizes(size, factor, latent):
    pipe = build_sd_pipeline(image_size=size)
    assert pipe.vae_scale_factor == factor and pipe.unet.config.sample_size == latent
    assert pipe.vae.config.sample_size == (size or 32)


def test_sd_bad_arguments():
    with pytest.raises(ValueError, match="image_size must be one of"):
        build_sd_pipeline(image_size=48)
    with pytest.raises(ValueError, match="'sd15' generates 512 px"):
        build_sd_pipeline(arch="sd15", image_size=64)
    with pytest.raises(ValueError, match="'tiny' or 'sd15'"):
        build_sd_pipeline(arch="sdxl")
    with pytest.raises(ValueError, match="only arch 'tiny'"):
        build_if_pipelines(arch="full")


def test_if_round_trip_through_load_generator(demo):
    spec = GeneratorSpec(
        kind="if",
        model=str(demo["if_stage1"]),
        model_stage2=str(demo["if_stage2"]),
        dtype="float32",
        steps=2,
        steps_stage2=2,
    )
    gen = load_generator(spec, device="cpu")
    ref1, ref2 = build_if_pipelines(seed=0)
    _assert_same_weights(gen.pipe.unet, ref1.unet)
    _assert_same_weights(gen.pipe.text_encoder, ref1.text_encoder)
    _assert_same_weights(gen.stage2.unet, ref2.unet)  # (generation itself: tests/test_generators.py)


# ------------------------------------------------------------------------------------------------ SAM


def test_sam_round_trip_through_load_sam(demo, monkeypatch):
    from segment_anything import SamPredictor

    from divergen.annotate import load_sam

    # load_sam's "tiny" model type resolves to build_tiny_sam; registered here too so this test does not depend
    # on how annotate.py maps it.
    monkeypatch.setitem(segment_anything.sam_model_registry, "tiny", build_tiny_sam)
    predictor = load_sam(demo["sam"], model_type="tiny", device="cpu")
    reference = build_tiny_sam(seed=0)
    _assert_same_weights(predictor.model, reference)
    _assert_same_weights(build_tiny_sam(demo["sam"], seed=3), reference)  # registry-style checkpoint argument
    image = np.asarray(_image(48))
    points = np.array([[0, 0], [47, 47]], dtype=np.float32)
    outputs = []
    for p in (predictor, SamPredictor(reference)):
        p.set_image(image)
        outputs.append(p.predict(point_coords=points, point_labels=np.ones(2), multimask_output=True))
    for a, b in zip(*outputs):
        np.testing.assert_array_equal(a, b)


def test_seeded_builds_are_identical_and_leave_the_global_rng_alone():
    first = build_tiny_sam(seed=0)
    torch.manual_seed(123)  # another global RNG state (as in another process): the same weights
    state = torch.get_rng_state()
    _assert_same_weights(first, build_tiny_sam(seed=0))
    assert torch.equal(torch.get_rng_state(), state)
    with pytest.raises(AssertionError):
        _assert_same_weights(build_tiny_sam(seed=0), build_tiny_sam(seed=1))
    with pytest.raises(AssertionError):
        _assert_same_weights(build_tiny_clip(seed=0), build_tiny_clip(seed=1))
    _assert_same_weights(build_tiny_llm(seed=2)[0], build_tiny_llm(seed=2)[0])


# ------------------------------------------------------------------------------------------------ open_clip


def test_clip_round_trip_through_clip_scorer(demo):
    open_clip.add_model_config(demo["clip_config"])
    assert open_clip.get_model_config(TINY_CLIP_MODEL) == tiny_clip_config()
    scorer = ClipScorer.load(model=TINY_CLIP_MODEL, pretrained=str(demo["clip_weights"]), device="cpu")
    reference = build_tiny_clip(seed=0)
    _assert_same_weights(scorer.model, reference)
    text = scorer.text_embeddings(["a photo of a single cat"])
    with torch.no_grad():
        expected = torch.nn.functional.normalize(
            reference.encode_text(scorer.tokenizer(["a photo of a single cat"])), dim=-1
        )
    torch.testing.assert_close(text, expected)
    assert scorer.image_embeddings([_image()]).shape == (1, 16)


def test_register_tiny_clip_is_idempotent():
    register_tiny_clip()
    register_tiny_clip()
    assert TINY_CLIP_MODEL in open_clip.list_models()
    assert open_clip.get_model_config(TINY_CLIP_MODEL) == tiny_clip_config()


# ------------------------------------------------------------------------------------------------ CLIPSeg, LM


def test_clipseg_round_trip_through_from_pretrained(demo):
    processor = transformers.CLIPSegProcessor.from_pretrained(demo["clipseg"])
    model = transformers.CLIPSegForImageSegmentation.from_pretrained(demo["clipseg"]).eval()
    ref_model, ref_processor = build_tiny_clipseg(seed=0)
    _assert_same_weights(model, ref_model)
    prompts = ["a cat", "a photo of a dog"]
    inputs = processor(text=prompts, images=[_image(40)] * 2, padding=True, return_tensors="pt")
    ref_inputs = ref_processor(text=prompts, images=[_image(40)] * 2, padding=True, return_tensors="pt")
    assert inputs["pixel_values"].shape == (2, 3, 32, 32)
    assert torch.equal(inputs["input_ids"], ref_inputs["input_ids"])
    with torch.no_grad():
        logits = model(**inputs).logits
        torch.testing.assert_close(logits, ref_model(**ref_inputs).logits)
    assert logits.shape == (2, 32, 32) and torch.isfinite(logits).all()


def test_llm_round_trip_through_auto_classes(demo):
    tokenizer = transformers.AutoTokenizer.from_pretrained(demo["llm"])
    model = transformers.AutoModelForCausalLM.from_pretrained(demo["llm"]).eval()
    ref_model, _ = build_tiny_llm(seed=0)
    _assert_same_weights(model, ref_model)
    text = "a photo of a café"
    ids = tokenizer(text).input_ids
    assert ids == list(text.encode()) and tokenizer.decode(ids) == text  # token id = byte value
    chat = tokenizer.apply_chat_template(
        [{"role": "user", "content": "describe a cat"}], tokenize=False, add_generation_prompt=True
    )
    assert chat == "user: describe a cat\nassistant: "
    batch = tokenizer(["a cat", "a photo of a dog"], padding=True, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**batch, max_new_tokens=5, do_sample=False)
        ref = ref_model.generate(**batch, max_new_tokens=5, do_sample=False)
    assert out.shape == (2, batch["input_ids"].shape[1] + 5) and torch.equal(out, ref)


# ------------------------------------------------------------------------------------------------ SD v1.5


@pytest.mark.skipif(not BIG, reason="builds the ~1.07 B-parameter SD v1.5 (set DIVERGEN_BIG_MODELS=1)")
def test_sd15_architecture():
    pipe = build_sd_pipeline(arch="sd15", device="cuda" if torch.cuda.is_available() else "cpu")

    def count(module: torch.nn.Module) -> int:
        return sum(p.numel() for p in module.parameters())

    # The published SD v1.5 sizes: UNet 859.52 M, VAE 83.65 M, CLIP ViT-L/14 text encoder 123.06 M.
    assert count(pipe.unet) == pytest.approx(859.52e6, rel=1e-3)
    assert count(pipe.vae) == pytest.approx(83.65e6, rel=1e-3)
    assert count(pipe.text_encoder) == pytest.approx(123.06e6, rel=1e-3)
    assert pipe.vae_scale_factor == 8 and pipe.unet.config.sample_size == 64
    assert pipe.vae.config.scaling_factor == 0.18215
    assert pipe.text_encoder.config.hidden_act == "quick_gelu"
    ids = pipe.tokenizer("a photo of a single cat", padding="max_length", return_tensors="pt").input_ids
    with torch.no_grad():
        hidden = pipe.text_encoder(ids.to(pipe.device)).last_hidden_state
    assert hidden.shape == (1, 77, 768) and torch.isfinite(hidden).all()
