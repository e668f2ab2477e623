"""Random-weight stand-ins for every model of the generation pipeline (divergen.md §1), saved in the layouts the
real loading code reads, so that the whole chain runs offline: demos and tests on CPU with tiny models, GPU
benchmarks with the full Stable Diffusion v1.5 architecture.

What each stand-in replaces, and how it is loaded back:

- ``sd/``: a ``StableDiffusionPipeline`` (``build_sd_pipeline``): ``generators.load_generator`` with
  ``GeneratorSpec(kind="sd", model=...)``. ``arch="sd15"`` is the exact SD v1.5 architecture (~1.07 B
  parameters: UNet 860 M, VAE 84 M, CLIP ViT-L/14 text encoder 123 M).
- ``if_stage1/``, ``if_stage2/``: DeepFloyd IF stage I and II (``build_if_pipelines``): ``load_generator`` with
  ``kind="if"``.
- ``sam_tiny.pth``: a SAM state dict (``build_tiny_sam``, a ``sam_model_registry``-style builder):
  ``annotate.load_sam`` with ``model_type="tiny"``.
- ``clip/``: an open_clip model config and weights (``save_tiny_clip``): ``open_clip.add_model_config`` (or
  ``register_tiny_clip``), then ``ClipScorer.load(model=TINY_CLIP_MODEL, pretrained=<weights>)``.
- ``clipseg/``: ``CLIPSegForImageSegmentation`` and ``CLIPSegProcessor`` (``save_tiny_clipseg``).
- ``llm/``: a GPT-2 causal LM and tokenizer (``save_tiny_llm``) for prompt diversification.

The full SAM ViT-H and CLIP ViT-L need nothing from here: ``segment_anything.sam_model_registry["vit_h"]()`` and
``ClipScorer.load(model="ViT-L-14", pretrained=None)`` build them with random weights.

Every builder is seeded (``seed``) inside a forked RNG: the same seed gives identical weights in any process, and
the caller's global RNG state is left untouched. Tokenizers are byte-level with no merges (every byte is one
token), written from scratch, so nothing is downloaded.

CLI: ``python -m divergen.tiny_models --root data/tiny_models`` writes all the tiny models (``write_demo_models``).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger(__name__)

TINY_CLIP_MODEL = "divergen-tiny-clip"
SD_IMAGE_SIZES = (32, 64, 128)  # tiny SD output sizes (pixels)
CLIP_MEAN, CLIP_STD = [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]
_CLIP_SPECIALS = ["<|startoftext|>", "<|endoftext|>"]
_GPT2_EOS = "<|endoftext|>"
# The transformer sizes of every tiny CLIP tower (SD's text encoder, CLIPSeg's text and vision towers).
_TINY_TOWER = {"hidden_size": 32, "intermediate_size": 37, "num_attention_heads": 4, "num_hidden_layers": 2}
# A minimal chat template, so that prompt-diversification code calling ``apply_chat_template`` runs on the tiny LM.
_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ message['role'] }}: {{ message['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant: {% endif %}"
)


# ------------------------------------------------------------------------------------------------ helpers


@contextmanager
def _seeded(seed: int, device: str | torch.device = "cpu") -> Iterator[None]:
    """Build under ``seed`` on a forked RNG (the caller's RNG state is restored), with ``device`` as the default
    device for new tensors."""
    device = torch.device(device)
    cuda = (
        []
        if device.type != "cuda"
        else [torch.cuda.current_device() if device.index is None else device.index]
    )
    with torch.random.fork_rng(devices=cuda), torch.device(device):
        torch.manual_seed(seed)
        yield


@contextmanager
def _atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary directory next to ``path``; rename it to ``path`` when the block succeeds, so that a
    crash never leaves a half-written model where a reader (or ``write_demo_models``' skip test) would find it."""
    path = Path(path)
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise FileExistsError(f"{path} already exists: delete it first (tiny models are never overwritten)")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        if path.exists():
            path.rmdir()  # an empty directory (checked above)
        tmp.rename(path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def _byte_chars() -> list[str]:
    """The GPT-2/CLIP byte-level alphabet: the 256 printable unicode characters that stand for bytes 0..255
    (printable ASCII and Latin-1 stand for themselves, the rest are shifted above 255), in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), 256)]
    chars, shifted = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + shifted)
            shifted += 1
    return [chars[b] for b in range(256)]


def _write_bpe_files(path: Path, vocab: list[str]) -> None:
    path.mkdir(parents=True, exist_ok=True)
    (path / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}))
    (path / "merges.txt").write_text("#version: 0.2\n")  # no merges: one token per byte


def byte_level_clip_tokenizer(path: str | os.PathLike) -> Any:
    """A ``transformers.CLIPTokenizer`` whose vocabulary is the 256 bytes, each also with the end-of-word suffix,
    plus ``<|startoftext|>`` (id 512) and ``<|endoftext|>`` (id 513, also padding): 514 tokens, no merges.

    Writes ``vocab.json`` and ``merges.txt`` into ``path`` (created) and loads them with ``from_pretrained``, the
    one reading path that every transformers version supports.
    """
    import transformers

    path = Path(path)
    chars = _byte_chars()
    _write_bpe_files(path, chars + [c + "</w>" for c in chars] + _CLIP_SPECIALS)
    tokenizer = transformers.CLIPTokenizer.from_pretrained(str(path), model_max_length=77)
    if len(tokenizer) != 514 or tokenizer.bos_token_id != 512 or tokenizer.eos_token_id != 513:
        raise RuntimeError(
            f"byte_level_clip_tokenizer: {path}/vocab.json was read as {len(tokenizer)} tokens (bos "
            f"{tokenizer.bos_token_id}, eos {tokenizer.eos_token_id}); expected 514 (bos 512, eos 513)"
        )
    return tokenizer


def _clip_tokenizer_in_memory() -> Any:
    with tempfile.TemporaryDirectory() as tmp:  # the tokenizer keeps its vocabulary in memory once loaded
        return byte_level_clip_tokenizer(tmp)


def _clip_text_config(tokenizer: Any, **sizes: Any) -> Any:
    import transformers

    return transformers.CLIPTextConfig(
        max_position_embeddings=77,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,  # the pooled output is read at the first eos token
        pad_token_id=tokenizer.pad_token_id,
        **sizes,
    )


# ------------------------------------------------------------------------------------------------ Stable Diffusion


def _sd_scheduler() -> Any:
    """The SD v1.5 ``scheduler/scheduler_config.json`` (PNDM, scaled-linear betas); ``load_generator`` replaces it
    by DPM-Solver++ built from this config (divergen.md §1.1)."""
    import diffusers

    return diffusers.PNDMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        skip_prk_steps=True,
        steps_offset=1,
        set_alpha_to_one=False,
    )


def _sd_parts(arch: str, image_size: int | None, tokenizer: Any) -> dict[str, Any]:
    import diffusers
    import transformers

    if arch == "sd15":
        if image_size not in (None, 512):
            raise ValueError(
                f"build_sd_pipeline: arch 'sd15' generates 512 px images, got image_size={image_size}"
            )
        # SD v1.5 (runwayml/stable-diffusion-v1-5 unet/, vae/, text_encoder/ config.json).
        unet = diffusers.UNet2DConditionModel(
            sample_size=64,
            block_out_channels=(320, 640, 1280, 1280),
            layers_per_block=2,
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
            cross_attention_dim=768,
            attention_head_dim=8,
            norm_num_groups=32,
        )
        vae = diffusers.AutoencoderKL(
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            block_out_channels=(128, 256, 512, 512),
            layers_per_block=2,
            latent_channels=4,
            norm_num_groups=32,
            sample_size=512,
            scaling_factor=0.18215,
        )
        # CLIP ViT-L/14's text tower with its real vocabulary size (the byte-level ids are all < 49408).
        text_config = _clip_text_config(
            tokenizer,
            vocab_size=49408,
            hidden_size=768,
            intermediate_size=3072,
            num_attention_heads=12,
            num_hidden_layers=12,
            projection_dim=768,
            hidden_act="quick_gelu",
        )
    elif arch == "tiny":
        image_size = image_size or 32
        if image_size not in SD_IMAGE_SIZES:
            raise ValueError(
                f"build_sd_pipeline: tiny image_size must be one of {SD_IMAGE_SIZES}, got {image_size}"
            )
        # VAE factor 2 at 32 px (16 px latents), SD's 8 above (8-16 px latents), and attention only at the UNet's
        # low resolution: CPU time goes to attention, and a 64 px batch of 4 takes ~0.2 s at 10 steps.
        vae_blocks = (8, 16) if image_size == 32 else (8, 16, 16, 16)
        latent = image_size // 2 ** (len(vae_blocks) - 1)
        unet = diffusers.UNet2DConditionModel(
            sample_size=latent,
            block_out_channels=(16, 32),
            layers_per_block=1,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            cross_attention_dim=32,
            attention_head_dim=2,  # diffusers' legacy name for the number of heads
            norm_num_groups=8,
        )
        vae = diffusers.AutoencoderKL(
            down_block_types=("DownEncoderBlock2D",) * len(vae_blocks),
            up_block_types=("UpDecoderBlock2D",) * len(vae_blocks),
            block_out_channels=vae_blocks,
            latent_channels=4,
            norm_num_groups=8,
            sample_size=image_size,
        )
        text_config = _clip_text_config(tokenizer, vocab_size=len(tokenizer), **_TINY_TOWER)
    else:
        raise ValueError(f"build_sd_pipeline: arch must be 'tiny' or 'sd15', got {arch!r}")
    return {"unet": unet, "vae": vae, "text_encoder": transformers.CLIPTextModel(text_config)}


def build_sd_pipeline(
    *, arch: str = "tiny", image_size: int | None = None, seed: int = 0, device: str | torch.device = "cpu"
) -> Any:
    """A ``diffusers.StableDiffusionPipeline`` with random weights and the byte-level CLIP tokenizer.

    Arguments:
        arch: "tiny" (a few hundred thousand parameters) or "sd15" (the SD v1.5 architecture, ~1.07 B parameters:
            ~4.3 GB in float32; build it on the GPU with ``device="cuda"``, which is much faster than on CPU).
        image_size: tiny only, the default output size: 32 (VAE factor 2), 64 or 128 (VAE factor 8); None is 32.
        seed: the weights' seed.
        device: where the weights are created (and initialised: a GPU build gives other weights than a CPU one).

    No safety checker (as ``load_generator`` loads it); scheduler: SD v1.5's PNDM.
    """
    import diffusers

    tokenizer = _clip_tokenizer_in_memory()
    with _seeded(seed, device):
        parts = _sd_parts(arch, image_size, tokenizer)
    pipe = diffusers.StableDiffusionPipeline(
        **parts,
        tokenizer=tokenizer,
        scheduler=_sd_scheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def save_sd_pipeline(path: str | os.PathLike, **kwargs: Any) -> Path:
    """Build ``build_sd_pipeline(**kwargs)`` and ``save_pretrained`` it to ``path`` (written atomically, never
    overwritten), the layout ``load_generator(GeneratorSpec(kind="sd", model=str(path)))`` loads."""
    pipe = build_sd_pipeline(**kwargs)
    with _atomic_dir(path) as tmp:
        pipe.save_pretrained(tmp)
    return Path(path)


# ------------------------------------------------------------------------------------------------ DeepFloyd IF


def _t5_tokenizer() -> Any:
    """A unigram T5 tokenizer over lowercase letters and the comma (57 pieces)."""
    import transformers

    letters = "abcdefghijklmnopqrstuvwxyz"
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    pieces += [(c, -3.0) for c in letters + ","] + [("▁" + c, -3.5) for c in letters]
    return transformers.T5TokenizerFast(vocab=pieces, extra_ids=0, model_max_length=77)


def _if_unet(*, superres: bool) -> Any:
    import diffusers

    kwargs: dict[str, Any] = dict(
        layers_per_block=1,
        block_out_channels=(16, 32),
        down_block_types=("ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D"),
        mid_block_type="UNetMidBlock2DSimpleCrossAttn",
        up_block_types=("SimpleCrossAttnUpBlock2D", "ResnetUpsampleBlock2D"),
        out_channels=6,  # learned variance: epsilon and the variance interpolation
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
    if superres:  # stage II: the noised stage-I image is concatenated to the input, its noise level embedded
        kwargs.update(
            sample_size=32,
            in_channels=6,
            class_embed_type="timestep",
            mid_block_scale_factor=1.414,
            time_embedding_act_fn="gelu",
            time_embedding_dim=32,
        )
    else:
        kwargs.update(sample_size=16, in_channels=3)
    return diffusers.UNet2DConditionModel(**kwargs)


def _if_scheduler() -> Any:
    """IF's ``scheduler_config.json``: squared-cosine DDPM with learned variance and dynamic thresholding."""
    import diffusers

    return diffusers.DDPMScheduler(
        num_train_timesteps=1000,
        beta_schedule="squaredcos_cap_v2",
        thresholding=True,
        dynamic_thresholding_ratio=0.95,
        sample_max_value=1.0,
        prediction_type="epsilon",
        variance_type="learned_range",
    )


def build_if_pipelines(*, arch: str = "tiny", seed: int = 0) -> tuple[Any, Any]:
    """Tiny DeepFloyd IF: stage I (``IFPipeline``, T5 text encoder, 16 px) and stage II
    (``IFSuperResolutionPipeline``, no text encoder, 32 px), random weights, no safety checker or watermarker.

    Only ``arch="tiny"``: the IF-I-XL / IF-II-L configs are not available offline to reproduce exactly.
    """
    import diffusers
    import transformers

    if arch != "tiny":
        raise ValueError(f"build_if_pipelines: only arch 'tiny' is available, got {arch!r}")
    none = dict(safety_checker=None, feature_extractor=None, watermarker=None, requires_safety_checker=False)
    with _seeded(seed):
        text_encoder = transformers.T5EncoderModel(
            transformers.T5Config(vocab_size=64, d_model=32, d_ff=37, d_kv=8, num_layers=2, num_heads=4)
        )
        unet1, unet2 = _if_unet(superres=False), _if_unet(superres=True)
    stage1 = diffusers.IFPipeline(
        tokenizer=_t5_tokenizer(), text_encoder=text_encoder, unet=unet1, scheduler=_if_scheduler(), **none
    )
    stage2 = diffusers.IFSuperResolutionPipeline(
        tokenizer=_t5_tokenizer(),
        text_encoder=None,  # stage II reuses stage I's embeddings (divergen.md §1.1)
        unet=unet2,
        scheduler=_if_scheduler(),
        image_noising_scheduler=diffusers.DDPMScheduler(
            num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2"
        ),
        **none,
    )
    for pipe in (stage1, stage2):
        pipe.set_progress_bar_config(disable=True)
    return stage1, stage2


def save_if_pipelines(
    path1: str | os.PathLike | None, path2: str | os.PathLike | None, **kwargs: Any
) -> tuple[Path | None, Path | None]:
    """Build ``build_if_pipelines(**kwargs)`` and save stage I to ``path1`` and stage II to ``path2`` (each written
    atomically; a None path is not written), for ``load_generator(GeneratorSpec(kind="if", model=path1,
    model_stage2=path2))``."""
    pipes = build_if_pipelines(**kwargs)
    for path, pipe in zip((path1, path2), pipes):
        if path is not None:
            with _atomic_dir(path) as tmp:
                pipe.save_pretrained(tmp)
    return (Path(path1) if path1 is not None else None, Path(path2) if path2 is not None else None)


# ------------------------------------------------------------------------------------------------ SAM


def build_tiny_sam(checkpoint: str | os.PathLike | None = None, *, seed: int = 0) -> Any:
    """A tiny ``segment_anything`` ``Sam`` (64 px ViT encoder, one block, 32 channels), in eval mode.

    Called like the ``sam_model_registry`` builders: ``checkpoint`` is a state dict to load (``save_tiny_sam``),
    else the weights are random from ``seed``.
    """
    from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer

    dim, img_size, patch = 32, 64, 16
    with _seeded(seed):
        sam = Sam(
            image_encoder=ImageEncoderViT(
                img_size=img_size,
                patch_size=patch,
                embed_dim=dim,
                depth=1,
                num_heads=2,
                mlp_ratio=2.0,
                out_chans=dim,
                qkv_bias=True,
                norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
                use_rel_pos=True,
                window_size=0,
            ),
            prompt_encoder=PromptEncoder(
                embed_dim=dim,
                image_embedding_size=(img_size // patch, img_size // patch),
                input_image_size=(img_size, img_size),
                mask_in_chans=4,
            ),
            mask_decoder=MaskDecoder(
                transformer_dim=dim,
                transformer=TwoWayTransformer(depth=1, embedding_dim=dim, num_heads=2, mlp_dim=64),
                num_multimask_outputs=3,
                iou_head_depth=2,
                iou_head_hidden_dim=32,
            ),
            pixel_mean=[123.675, 116.28, 103.53],
            pixel_std=[58.395, 57.12, 57.375],
        )
    if checkpoint is not None:
        sam.load_state_dict(torch.load(checkpoint, map_location="cpu", weights_only=True))
    return sam.eval()


def save_tiny_sam(path: str | os.PathLike, *, seed: int = 0) -> Path:
    """Save ``build_tiny_sam(seed=seed)``'s state dict to the ``.pth`` file ``path`` (atomically; an existing file
    raises ``FileExistsError``)."""
    path = Path(path)
    if path.exists():
        raise FileExistsError(f"{path} already exists: delete it first (tiny models are never overwritten)")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    torch.save(build_tiny_sam(seed=seed).state_dict(), tmp)
    os.replace(tmp, path)
    return path


# ------------------------------------------------------------------------------------------------ open_clip


def tiny_clip_config() -> dict[str, Any]:
    """The open_clip model config of ``TINY_CLIP_MODEL``: 32 px ViT, 16-d embeddings. The text tower keeps CLIP's
    49408-token vocabulary, so open_clip's bundled BPE tokenizer works without network."""
    return {
        "embed_dim": 16,
        "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 8, "head_width": 16},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
    }


def register_tiny_clip() -> None:
    """Make ``TINY_CLIP_MODEL`` an open_clip model name (idempotent). open_clip keeps registered configs after
    their file is gone, so the config is written to a temporary file only for the call."""
    import open_clip

    if TINY_CLIP_MODEL in open_clip.list_models():
        return
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"{TINY_CLIP_MODEL}.json"
        path.write_text(json.dumps(tiny_clip_config()))
        open_clip.add_model_config(path)


def build_tiny_clip(*, seed: int = 0) -> Any:
    """The open_clip ``TINY_CLIP_MODEL`` with random weights from ``seed`` (registered first)."""
    import open_clip

    register_tiny_clip()
    with _seeded(seed):
        return open_clip.create_model(TINY_CLIP_MODEL, pretrained=None)


def save_tiny_clip(path: str | os.PathLike, *, seed: int = 0) -> tuple[Path, Path]:
    """Write ``TINY_CLIP_MODEL``'s config and weights into the directory ``path`` (atomically).

    Returns ``(config_json, weights)``: ``open_clip.add_model_config(config_json)`` registers the model (the file
    stem is its name), ``ClipScorer.load(model=TINY_CLIP_MODEL, pretrained=str(weights))`` loads these weights.
    """
    model = build_tiny_clip(seed=seed)
    with _atomic_dir(path) as tmp:
        (tmp / f"{TINY_CLIP_MODEL}.json").write_text(json.dumps(tiny_clip_config(), indent=2))
        torch.save(model.state_dict(), tmp / f"{TINY_CLIP_MODEL}.pt")
    path = Path(path)
    return path / f"{TINY_CLIP_MODEL}.json", path / f"{TINY_CLIP_MODEL}.pt"


# ------------------------------------------------------------------------------------------------ CLIPSeg


def build_tiny_clipseg(*, seed: int = 0) -> tuple[Any, Any]:
    """A random ``CLIPSegForImageSegmentation`` (32 px, 8 px patches, 2-layer towers, decoder on both layers) and
    its ``CLIPSegProcessor`` (``ViTImageProcessor`` resizing to 32 px with CLIP's mean/std, byte-level CLIP
    tokenizer). Returns ``(model, processor)``; the logits are ``(B, 32, 32)``."""
    import transformers

    tokenizer = _clip_tokenizer_in_memory()
    text = _clip_text_config(tokenizer, vocab_size=len(tokenizer), **_TINY_TOWER)
    config = transformers.CLIPSegConfig(
        text_config=text.to_dict(),
        vision_config={"image_size": 32, "patch_size": 8, **_TINY_TOWER},
        projection_dim=16,
        extract_layers=[0, 1],  # indices of vision layers (the official reads layers 3, 6, 9 of 12)
        reduce_dim=16,
        decoder_num_attention_heads=2,
        decoder_intermediate_size=32,
        conditional_layer=0,
    )
    with _seeded(seed):
        model = transformers.CLIPSegForImageSegmentation(config).eval()
    image_processor = transformers.ViTImageProcessor(
        do_resize=True, size={"height": 32, "width": 32}, image_mean=CLIP_MEAN, image_std=CLIP_STD
    )
    return model, transformers.CLIPSegProcessor(image_processor=image_processor, tokenizer=tokenizer)


def save_tiny_clipseg(path: str | os.PathLike, *, seed: int = 0) -> Path:
    """Save ``build_tiny_clipseg(seed=seed)`` to the directory ``path`` (atomically) so that
    ``CLIPSegProcessor.from_pretrained(path)`` and ``CLIPSegForImageSegmentation.from_pretrained(path)`` load it."""
    model, processor = build_tiny_clipseg(seed=seed)
    with _atomic_dir(path) as tmp:
        model.save_pretrained(tmp)
        processor.save_pretrained(tmp)
    return Path(path)


# ------------------------------------------------------------------------------------------------ causal LM


def build_tiny_llm(*, seed: int = 0) -> tuple[Any, Any]:
    """A random 2-layer ``GPT2LMHeadModel`` (32-d, 256 positions) with a byte-level GPT-2 tokenizer (256 byte
    tokens + ``<|endoftext|>`` as bos, eos and padding; a minimal chat template). Returns
    ``(model, tokenizer)``."""
    import transformers

    with tempfile.TemporaryDirectory() as tmp:
        _write_bpe_files(Path(tmp), _byte_chars() + [_GPT2_EOS])
        tokenizer = transformers.GPT2Tokenizer.from_pretrained(tmp, model_max_length=256)
    tokenizer.pad_token = _GPT2_EOS  # batched generation pads
    tokenizer.chat_template = _CHAT_TEMPLATE
    eos = tokenizer.eos_token_id
    sizes = {"n_positions": 256, "n_embd": 32, "n_layer": 2, "n_head": 2}
    config = transformers.GPT2Config(vocab_size=len(tokenizer), bos_token_id=eos, eos_token_id=eos, **sizes)
    with _seeded(seed):
        model = transformers.GPT2LMHeadModel(config).eval()
    model.generation_config.pad_token_id = eos
    return model, tokenizer


def save_tiny_llm(path: str | os.PathLike, *, seed: int = 0) -> Path:
    """Save ``build_tiny_llm(seed=seed)`` to the directory ``path`` (atomically) so that
    ``AutoTokenizer.from_pretrained(path)`` and ``AutoModelForCausalLM.from_pretrained(path)`` load it."""
    model, tokenizer = build_tiny_llm(seed=seed)
    with _atomic_dir(path) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return Path(path)


# ------------------------------------------------------------------------------------------------ demo root


def demo_model_paths(root: str | os.PathLike) -> dict[str, Path]:
    """Where ``write_demo_models(root)`` puts each model (keys: sd, if_stage1, if_stage2, sam, clip, clip_config,
    clip_weights, clipseg, llm)."""
    root = Path(root)
    return {
        "sd": root / "sd",
        "if_stage1": root / "if_stage1",
        "if_stage2": root / "if_stage2",
        "sam": root / "sam_tiny.pth",
        "clip": root / "clip",
        "clip_config": root / "clip" / f"{TINY_CLIP_MODEL}.json",
        "clip_weights": root / "clip" / f"{TINY_CLIP_MODEL}.pt",
        "clipseg": root / "clipseg",
        "llm": root / "llm",
    }


def write_demo_models(root: str | os.PathLike, *, sd_image_size: int = 64, seed: int = 0) -> dict[str, Path]:
    """Write every tiny model under ``root`` (see ``demo_model_paths``), skipping those already there.

    Each model is written to a temporary path and renamed, so an interrupted call leaves only complete models and
    the next call writes the rest. An existing model is kept as it is, even if it was written with another
    ``sd_image_size`` or ``seed``: delete it to rebuild.

    Arguments:
        root: the directory to write into (created).
        sd_image_size: the tiny SD pipeline's default image size (32, 64 or 128).
        seed: the seed of every model.
    """
    paths = demo_model_paths(root)

    def missing(*keys: str) -> list[Path | None]:
        return [None if paths[k].exists() else paths[k] for k in keys]

    # name -> (the paths it writes, the writer); one IF build writes whichever stage is missing.
    writers: dict[str, tuple[list[Path], Callable[[], Any]]] = {
        "sd": ([paths["sd"]], lambda: save_sd_pipeline(paths["sd"], image_size=sd_image_size, seed=seed)),
        "if": (
            [paths["if_stage1"], paths["if_stage2"]],
            lambda: save_if_pipelines(*missing("if_stage1", "if_stage2"), seed=seed),
        ),
        "sam": ([paths["sam"]], lambda: save_tiny_sam(paths["sam"], seed=seed)),
        "clip": ([paths["clip"]], lambda: save_tiny_clip(paths["clip"], seed=seed)),
        "clipseg": ([paths["clipseg"]], lambda: save_tiny_clipseg(paths["clipseg"], seed=seed)),
        "llm": ([paths["llm"]], lambda: save_tiny_llm(paths["llm"], seed=seed)),
    }
    for name, (targets, write) in writers.items():
        todo = [str(p) for p in targets if not p.exists()]
        if not todo:
            logger.info("tiny %s: %s exists, skipped", name, ", ".join(str(p) for p in targets))
            continue
        write()
        logger.info("tiny %s: wrote %s", name, ", ".join(todo))
    return paths


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", type=Path, default=Path("data/tiny_models"), help="directory to write into")
    parser.add_argument(
        "--sd-image-size", type=int, default=64, choices=SD_IMAGE_SIZES, help="tiny SD image size"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of every model's weights")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    paths = write_demo_models(args.root, sd_image_size=args.sd_image_size, seed=args.seed)
    logger.info("tiny models under %s: %s", args.root, ", ".join(f"{k}={v}" for k, v in paths.items()))


if __name__ == "__main__":
    main()
