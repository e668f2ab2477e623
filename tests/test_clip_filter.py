"""Stage 4 of the generation pipeline (CLIP filtering): the official crops/views by hand, scores against direct
numpy computations, with a tiny random-weight open_clip model (no network)."""

from __future__ import annotations

import json

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

from divergen import clip_filter
from divergen.clip_filter import (
    ClipScorer,
    category_reference_embeddings,
    clip_scores,
    generated_view,
    inter_similarity,
    keep_mask,
    load_references,
    lvis_real_crops,
    real_crop,
    save_references,
    score_view,
)
from divergen.tiny_models import TINY_CLIP_MODEL, save_tiny_clip

open_clip = pytest.importorskip("open_clip")


@pytest.fixture(scope="module")
def scorer(tmp_path_factory) -> ClipScorer:
    config, weights = save_tiny_clip(tmp_path_factory.mktemp("clip") / "tiny")
    open_clip.add_model_config(config)
    return ClipScorer.load(model=TINY_CLIP_MODEL, pretrained=str(weights), device="cpu")


def _cutout(h: int, w: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    rgba = rng.integers(0, 256, (h, w, 4), dtype=np.uint8)
    rgba[..., 3] = np.where(rng.random((h, w)) < 0.6, 255, 0)
    return rgba


# ------------------------------------------------------------------------------------------------ views


@pytest.mark.parametrize(("view", "bg"), [(generated_view, 0), (score_view, 1)])
def test_views_pad_to_square_with_background_value(view, bg):
    rgba = _cutout(6, 10)
    rgba[0, 0, 3], rgba[0, 1, 3] = 128, 129  # the official threshold is mask > 128
    out = np.asarray(view(rgba))
    assert out.shape == (10, 10, 3) and out.dtype == np.uint8
    assert (out[:2] == bg).all() and (out[8:] == bg).all()  # (10 - 6) // 2 = 2 rows of padding above, 2 below
    inner = out[2:8]
    inside = rgba[..., 3] > 128
    np.testing.assert_array_equal(inner[inside], rgba[..., :3][inside])
    assert (inner[~inside] == bg).all()
    assert (inner[0, 0] == bg).all() and (inner[0, 1] == rgba[0, 1, :3]).all()


def test_views_tall_cutout_and_bad_input():
    out = np.asarray(generated_view(_cutout(9, 4)))
    assert out.shape == (9, 9, 3) and (out[:, :2] == 0).all() and (out[:, 6:] == 0).all()
    with pytest.raises(ValueError, match="RGBA"):
        score_view(np.zeros((4, 4, 3), np.uint8))


def test_real_crop_matches_hand_computation():
    rng = np.random.default_rng(1)
    image = rng.integers(0, 256, (120, 150, 3), dtype=np.uint8)
    mask = np.zeros((120, 150), bool)
    mask[20:41, 60:101] = True  # rows 20..40, cols 60..100
    mask[30, 60] = False
    crop = np.asarray(real_crop(image, mask))
    # box x 60..100 -> [20, 141); y 20..40 -> [0 (clamped from -20), 81)
    assert crop.shape == (81, 121, 3)
    blurred = cv2.blur(image, (10, 10))  # the official blurs the whole image
    full = np.where(mask[..., None], image, blurred)
    np.testing.assert_array_equal(crop, full[0:81, 20:141])
    np.testing.assert_array_equal(
        crop[20:41, 41:81][mask[20:41, 61:101]], image[20:41, 61:101][mask[20:41, 61:101]]
    )
    assert (crop[30 - 0, 60 - 20] == blurred[30, 60]).all()  # the hole is blurred, not kept


def test_real_crop_clamps_at_every_border_and_rejects_empty():
    rng = np.random.default_rng(2)
    image = rng.integers(0, 256, (50, 60, 3), dtype=np.uint8)
    mask = np.zeros((50, 60), bool)
    mask[5:45, 3:58] = True
    crop = np.asarray(real_crop(image, mask, padding=40, blur=10))
    np.testing.assert_array_equal(crop, np.where(mask[..., None], image, cv2.blur(image, (10, 10))))
    with pytest.raises(ValueError, match="empty"):
        real_crop(image, np.zeros((50, 60), bool))


def test_lvis_real_crops_reads_annotations(tmp_path):
    rng = np.random.default_rng(3)
    image = rng.integers(0, 256, (40, 50, 3), dtype=np.uint8)
    (tmp_path / "train2017").mkdir()
    Image.fromarray(image).save(tmp_path / "train2017" / "000000000007.png")
    poly = [10.0, 10.0, 30.0, 10.0, 30.0, 20.0, 10.0, 20.0]
    data = {
        "images": [{"id": 7, "width": 50, "height": 40, "coco_url": "http://x/train2017/000000000007.png"}],
        "annotations": [
            {
                "id": 1,
                "image_id": 7,
                "category_id": 3,
                "segmentation": [poly],
                "area": 200,
                "bbox": [10, 10, 20, 10],
            },
            {
                "id": 2,
                "image_id": 7,
                "category_id": 3,
                "segmentation": [poly],
                "area": 200,
                "bbox": [10, 10, 20, 10],
            },
        ],
        "categories": [{"id": 3, "name": "cat_a"}, {"id": 5, "name": "cat_b"}],
    }
    (tmp_path / "train.json").write_text(json.dumps(data))
    crops = lvis_real_crops(tmp_path / "train.json", tmp_path, max_per_category=1)
    assert sorted(crops) == [3, 5]
    got = list(crops[3])
    assert len(got) == 1 and list(crops[5]) == []
    from pycocotools import mask as mask_utils

    m = mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects([poly], 40, 50))).astype(bool)
    np.testing.assert_array_equal(np.asarray(got[0]), np.asarray(real_crop(image, m)))


# ------------------------------------------------------------------------------------------------ scores


def test_scorer_embeddings_normalised_and_batched(scorer):
    images = [generated_view(_cutout(12, 9, s)) for s in range(5)]
    a = scorer.image_embeddings(images, batch_size=2)
    b = scorer.image_embeddings(iter(images), batch_size=32)
    assert a.shape == (5, 16) and a.dtype == torch.float32
    torch.testing.assert_close(a.norm(dim=-1), torch.ones(5))
    torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    assert scorer.image_embeddings([]).shape == (0, 16)
    t = scorer.text_embeddings(["a photo of a single cat", "a dog"])
    assert t.shape == (2, 16)
    torch.testing.assert_close(t.norm(dim=-1), torch.ones(2))


def test_clip_scores_equal_direct_cosine(scorer):
    cutouts = [_cutout(10, 14, s) for s in range(4)]
    names = ["tennis_racket", "cat", "tennis_racket", "cat"]
    got = clip_scores(scorer, cutouts, names)
    with torch.no_grad():
        img = scorer.model.encode_image(
            torch.stack([scorer.preprocess(score_view(c)) for c in cutouts])
        ).numpy()
        txt = scorer.model.encode_text(
            scorer.tokenizer(["a photo of a single tennis racket", "a photo of a single cat"] * 2)
        ).numpy()
    cos = (img * txt).sum(1) / np.linalg.norm(img, axis=1) / np.linalg.norm(txt, axis=1)
    np.testing.assert_allclose(got, cos, atol=1e-5)
    with pytest.raises(ValueError, match="names"):
        clip_scores(scorer, cutouts, names[:2])


def test_inter_similarity_equals_mean_cosine_over_real_crops(scorer):
    rng = np.random.default_rng(4)
    crops = {
        3: [Image.fromarray(rng.integers(0, 256, (20 + i, 30, 3), dtype=np.uint8)) for i in range(5)],
        7: [Image.fromarray(rng.integers(0, 256, (25, 25, 3), dtype=np.uint8)) for _ in range(2)],
        9: [],
    }
    refs = category_reference_embeddings(scorer, {k: iter(v) for k, v in crops.items()}, batch_size=2)
    assert sorted(refs) == [3, 7]  # no crop -> no reference
    cutouts = [_cutout(11, 13, s) for s in range(4)]
    cats = [3, 7, 9, 3]
    got = inter_similarity(scorer, cutouts, cats, refs)

    def raw(images):
        with torch.no_grad():
            return scorer.model.encode_image(torch.stack([scorer.preprocess(i) for i in images])).numpy()

    gen = raw([generated_view(c) for c in cutouts])
    for i, c in enumerate(cats):
        if c == 9:
            assert np.isnan(got[i])
            continue
        real = raw(crops[c])
        cos = real @ gen[i] / np.linalg.norm(real, axis=1) / np.linalg.norm(gen[i])
        np.testing.assert_allclose(got[i], cos.mean(), atol=1e-5)
    assert np.isnan(inter_similarity(scorer, cutouts[:1], [9], refs)).all()


def test_references_round_trip(tmp_path):
    refs = {12: torch.randn(16), 3: torch.randn(16)}
    save_references(refs, tmp_path / "refs.safetensors")
    back = load_references(tmp_path / "refs.safetensors")
    assert list(back) == [3, 12]
    for k in refs:
        torch.testing.assert_close(back[k], refs[k])
    with pytest.raises(ValueError, match="no reference"):
        save_references({}, tmp_path / "empty.safetensors")


def test_keep_mask_rules():
    clip = np.array([0.3, 0.1, 0.3, 0.3, np.nan])
    sim = np.array([0.7, 0.7, 0.5, np.nan, 0.9])
    assert keep_mask(clip, sim).all()
    np.testing.assert_array_equal(keep_mask(clip, sim, min_clip_score=0.21), [1, 0, 1, 1, 0])
    np.testing.assert_array_equal(keep_mask(clip, sim, min_inter_similarity=0.6), [1, 1, 0, 1, 1])
    np.testing.assert_array_equal(
        keep_mask(clip, sim, min_inter_similarity=0.6, keep_without_reference=False), [1, 1, 0, 0, 1]
    )
    np.testing.assert_array_equal(
        keep_mask(clip, sim, min_clip_score=0.21, min_inter_similarity=0.6), [1, 0, 0, 1, 0]
    )
    np.testing.assert_array_equal(keep_mask(None, sim, min_inter_similarity=0.7), [1, 1, 0, 1, 1])
    with pytest.raises(ValueError, match="clip_score is None"):
        keep_mask(None, sim, min_clip_score=0.2)
    with pytest.raises(ValueError, match="one length"):
        keep_mask(clip, sim[:3])


# ------------------------------------------------------------------------------------------------ load


def test_load_offline_error_says_how_to_fetch(monkeypatch):
    def offline(*args, **kwargs):
        raise RuntimeError("Failed to download weights for tag 'openai'")

    monkeypatch.setattr(open_clip, "create_model_and_transforms", offline)
    with pytest.raises(RuntimeError, match="huggingface-cli download timm/vit_large_patch14_clip_224.openai"):
        ClipScorer.load(model="ViT-L-14", pretrained="openai")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ClipScorer.load(model="ViT-L-14", pretrained="/nonexistent/ViT-L-14.pt")
    with pytest.raises(ValueError, match="unknown open_clip model"):
        ClipScorer.load(model="no-such-model", pretrained=None)


def test_end_to_end_tiny_model(scorer):
    assert clip_filter.INTER_SIMILARITY_THRESHOLD == 0.6
    rng = np.random.default_rng(5)
    real = {3: [real_crop(rng.integers(0, 256, (60, 60, 3), dtype=np.uint8), np.eye(60, dtype=bool))]}
    refs = category_reference_embeddings(scorer, real)
    cutouts = [_cutout(16, 16, s) for s in range(3)]
    sim = inter_similarity(scorer, cutouts, [3, 3, 1204], refs)
    score = clip_scores(scorer, cutouts, ["a", "a", "tench"])
    assert np.isfinite(sim[:2]).all() and np.isnan(sim[2]) and np.isfinite(score).all()
    keep = keep_mask(score, sim, min_inter_similarity=float(sim[:2].max()), keep_without_reference=False)
    np.testing.assert_array_equal(keep, sim >= sim[:2].max())
