"""Stage 3 of the generation pipeline (SAM-background annotation): the selection rule and cut-out logic on
hand-drawn masks from a fake predictor, and a tiny random-weight SAM end to end (no network)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from divergen.annotate import (
    REJECT_REASONS,
    Annotation,
    annotate_image,
    annotate_to_disk,
    choose_background,
    corner_points,
    load_sam,
)
from divergen.pool import largest_component
from divergen.tiny_models import build_tiny_sam

segment_anything = pytest.importorskip("segment_anything")

H, W = 32, 40


def _box(y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
    m = np.zeros((H, W), dtype=bool)
    m[y0:y1, x0:x1] = True
    return m


OBJECT = _box(8, 21, 10, 25)  # rows 8..20, columns 10..24
BACKGROUND = ~OBJECT
LEFT_BACKGROUND = _box(0, H, 0, 16) & ~OBJECT  # a partial background: holds the 2 left corners only
CORNERS = corner_points(H, W)


class FakePredictor:
    """``SamPredictor``'s interface; returns fixed masks, or masks computed from the image by ``fn``."""

    def __init__(self, masks=None, scores=(0.5, 0.5, 0.5), fn=None):
        self.masks, self.scores, self.fn = masks, np.asarray(scores, dtype=np.float32), fn
        self.images, self.calls = [], []

    def set_image(self, image):
        self.images.append(image)

    def predict(self, *, point_coords, point_labels, multimask_output):
        self.calls.append((point_coords, point_labels, multimask_output))
        masks = self.fn(self.images[-1]) if self.fn is not None else self.masks
        masks = np.stack(masks)
        return masks, self.scores, np.zeros((3, 8, 8), dtype=np.float32)


def _image(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (H, W, 3), dtype=np.uint8)


# ---------------------------------------------------------------------------------------------- corners
def test_corner_points_xy_order_and_margin():
    assert corner_points(5, 8).tolist() == [[0, 0], [7, 0], [0, 4], [7, 4]]
    assert corner_points(5, 8, margin=1).tolist() == [[1, 1], [6, 1], [1, 3], [6, 3]]
    assert corner_points(5, 8).dtype == np.int64
    # Square images with margin 0 (DATA.md): the same 4 points as the official's swapped list (divergen.md §1.2).
    n = 256
    official = [[0, 0], [0, n - 1], [n - 1, 0], [n - 1, n - 1]]
    assert sorted(corner_points(n, n).tolist()) == sorted(official)
    with pytest.raises(ValueError, match="margin 3"):
        corner_points(5, 8, margin=3)
    with pytest.raises(ValueError, match="margin -1"):
        corner_points(5, 8, margin=-1)


# ---------------------------------------------------------------------------------------------- choice
def test_choose_background_when_index_2_is_the_object():
    masks = np.stack([LEFT_BACKGROUND, BACKGROUND, OBJECT])
    # The object gets the best score: score alone, like index 2 alone, would pick it.
    assert choose_background(masks, np.array([0.8, 0.7, 0.99]), CORNERS) == 1


def test_choose_background_when_index_2_is_a_partial_background():
    masks = np.stack([OBJECT, BACKGROUND, LEFT_BACKGROUND])
    assert choose_background(masks, np.array([0.9, 0.6, 0.95]), CORNERS) == 1


def test_choose_background_prefers_higher_score_among_full_backgrounds():
    bigger = BACKGROUND | _box(8, 10, 10, 25)  # eats two object rows: still every corner
    masks = np.stack([BACKGROUND, OBJECT, bigger])
    assert choose_background(masks, np.array([0.7, 0.99, 0.9]), CORNERS) == 2
    assert choose_background(masks, np.array([0.9, 0.99, 0.7]), CORNERS) == 0


def test_choose_background_skips_whole_image_mask():
    everything = np.ones((H, W), dtype=bool)
    masks = np.stack([everything, BACKGROUND, OBJECT])
    assert choose_background(masks, np.array([0.99, 0.5, 0.9]), CORNERS) == 1
    # Corners come first: a partial background is no better than nothing (the image is then rejected "empty").
    masks = np.stack([LEFT_BACKGROUND, everything, OBJECT])
    assert choose_background(masks, np.array([0.99, 0.5, 0.9]), CORNERS) == 1


def test_choose_background_most_corners_then_score_when_none_has_all():
    three = _box(0, H, 0, W) & ~_box(H // 2, H, W // 2, W)  # all but the bottom-right quadrant
    masks = np.stack([LEFT_BACKGROUND, three, OBJECT])
    assert choose_background(masks, np.array([0.9, 0.1, 0.99]), CORNERS) == 1
    right = _box(0, H, 24, W)  # the 2 right corners, tie with LEFT_BACKGROUND on corners
    masks = np.stack([LEFT_BACKGROUND, OBJECT, right])
    assert choose_background(masks, np.array([0.3, 0.99, 0.6]), CORNERS) == 2
    assert choose_background(masks, np.array([0.6, 0.99, 0.3]), CORNERS) == 0


def test_choose_background_rejects_bad_shapes():
    with pytest.raises(ValueError, match="expected masks"):
        choose_background(np.stack([OBJECT, OBJECT]), np.zeros(3), CORNERS)
    with pytest.raises(ValueError, match="outside"):
        choose_background(np.stack([OBJECT] * 3), np.zeros(3), np.array([[W, 0]]))


# ---------------------------------------------------------------------------------------------- annotate_image
def test_annotate_image_inverts_background_and_crops_tight():
    image = _image()
    predictor = FakePredictor([LEFT_BACKGROUND, BACKGROUND, OBJECT], scores=(0.8, 0.7, 0.99))
    result = annotate_image(predictor, image)
    assert isinstance(result, Annotation) and result.reason is None
    np.testing.assert_array_equal(result.mask, OBJECT)
    assert result.area_fraction == pytest.approx(OBJECT.mean())
    assert result.rgba.shape == (13, 15, 4) and result.rgba.dtype == np.uint8
    np.testing.assert_array_equal(result.rgba[..., :3], image[8:21, 10:25])
    assert (result.rgba[..., 3] == 255).all()
    # The prompt: 4 positive corner clicks, multimask output.
    ((coords, labels, multimask),) = predictor.calls
    np.testing.assert_array_equal(coords, CORNERS)
    np.testing.assert_array_equal(labels, [1, 1, 1, 1])
    assert multimask is True
    np.testing.assert_array_equal(predictor.images[0], image)


def test_annotate_image_alpha_zero_outside_an_irregular_object():
    obj = _box(8, 21, 10, 25) & ~_box(8, 12, 10, 14)  # a notch at the crop's top-left corner
    result = annotate_image(FakePredictor([~obj] * 3), _image())
    alpha = result.rgba[..., 3]
    assert alpha.shape == (13, 15)
    assert (alpha[:4, :4] == 0).all() and (alpha[4:, :] == 255).all() and (alpha[:, 4:] == 255).all()


def test_annotate_image_keeps_largest_component_and_fills_holes():
    ring = _box(4, 20, 4, 20) & ~_box(8, 14, 8, 14)
    speck = _box(24, 28, 30, 34)
    result = annotate_image(FakePredictor([~(ring | speck)] * 3), _image())
    np.testing.assert_array_equal(result.mask, _box(4, 20, 4, 20))
    assert result.rgba.shape[:2] == (16, 16) and (result.rgba[..., 3] == 255).all()


def test_annotate_image_pil_input_converted_to_rgb():
    image = _image()
    pil = Image.fromarray(np.dstack([image, np.full((H, W), 7, np.uint8)]))  # RGBA
    predictor = FakePredictor([BACKGROUND] * 3)
    result = annotate_image(predictor, pil)
    assert predictor.images[0].shape == (H, W, 3)
    np.testing.assert_array_equal(result.rgba[..., :3], image[8:21, 10:25])
    with pytest.raises(ValueError, match=r"\(H, W, 3\) uint8"):
        annotate_image(predictor, image.astype(np.float32))


@pytest.mark.parametrize(
    ("background", "kw", "reason", "area"),
    [
        (np.ones((H, W), bool), {}, "empty", 0.0),
        (np.zeros((H, W), bool), {}, "full", 1.0),
        (~_box(0, 3, 0, 3), {}, "too_small", 9 / (H * W)),
        (BACKGROUND, {"max_area": 0.1}, "too_large", OBJECT.mean()),
    ],
)
def test_annotate_image_rejections(background, kw, reason, area):
    result = annotate_image(FakePredictor([background] * 3), _image(), **kw)
    assert result.rgba is None and result.reason == reason
    assert result.area_fraction == pytest.approx(area)
    assert result.mask.shape == (H, W)


def test_annotate_image_area_bounds_inclusive():
    result = annotate_image(FakePredictor([BACKGROUND] * 3), _image(), min_area=OBJECT.mean())
    assert result.reason is None
    with pytest.raises(ValueError, match="min_area"):
        annotate_image(FakePredictor([BACKGROUND] * 3), _image(), min_area=0.5, max_area=0.4)


def test_annotate_image_official_index_takes_mask_2():
    masks = [OBJECT, BACKGROUND, LEFT_BACKGROUND]
    ours = annotate_image(FakePredictor(masks, scores=(0.9, 0.6, 0.95)), _image())
    official = annotate_image(FakePredictor(masks, scores=(0.9, 0.6, 0.95)), _image(), official_index=True)
    np.testing.assert_array_equal(ours.mask, OBJECT)
    np.testing.assert_array_equal(official.mask, largest_component(~LEFT_BACKGROUND))
    assert official.reason is None and official.area_fraction > 0.5
    # Index 2 = the object: the official inverts it into the background, whose outer contour is filled whole.
    flawed = annotate_image(
        FakePredictor([LEFT_BACKGROUND, BACKGROUND, OBJECT]), _image(), official_index=True
    )
    assert flawed.reason == "full"


def test_annotate_image_rejects_wrong_mask_shape():
    with pytest.raises(ValueError, match=r"expected \(3, 32, 40\)"):
        annotate_image(FakePredictor([OBJECT[:, :-1]] * 3), _image())


# ---------------------------------------------------------------------------------------------- tiny SAM
def test_tiny_sam_end_to_end():
    from segment_anything import SamPredictor

    predictor = SamPredictor(build_tiny_sam(seed=0))
    image = np.full((H, W, 3), 255, np.uint8)
    image[8:21, 10:25] = (200, 30, 30)
    result = annotate_image(predictor, image, min_area=0.0, max_area=1.0)
    assert result.mask.shape == (H, W) and result.mask.dtype == bool
    assert result.reason in (None, *REJECT_REASONS)
    assert result.area_fraction == pytest.approx(result.mask.mean())
    if result.rgba is not None:
        assert result.rgba.ndim == 3 and result.rgba.shape[2] == 4 and result.rgba.dtype == np.uint8
        assert set(np.unique(result.rgba[..., 3])) <= {0, 255}
    masks, scores, _ = predictor.predict(
        point_coords=CORNERS.astype(np.float32), point_labels=np.ones(4), multimask_output=True
    )
    assert masks.shape == (3, H, W) and scores.shape == (3,)


def test_load_sam_missing_checkpoint(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"missing\.pth.*sam_vit_h_4b8939\.pth"):
        load_sam(tmp_path / "missing.pth", device="cpu")
    with pytest.raises(FileNotFoundError, match="sam_vit_b_01ec64.pth"):
        load_sam(tmp_path / "missing.pth", model_type="vit_b", device="cpu")
    with pytest.raises(FileNotFoundError):
        load_sam(None, device="cpu")  # the official DATA.md case: never an untrained SAM
    with pytest.raises(ValueError, match="vit_x"):
        load_sam(tmp_path / "missing.pth", model_type="vit_x", device="cpu")


def test_load_sam_loads_weights(tmp_path, monkeypatch):
    from segment_anything import SamPredictor

    # The registry's builder stands in for ViT-B, so that no 90M-parameter model is built.
    monkeypatch.setitem(segment_anything.sam_model_registry, "vit_b", build_tiny_sam)  # seed 0
    reference = build_tiny_sam(seed=1)  # other weights: the checkpoint must really be loaded
    torch.save(reference.state_dict(), tmp_path / "tiny.pth")
    predictor = load_sam(tmp_path / "tiny.pth", model_type="vit_b", device="cpu")
    assert isinstance(predictor, SamPredictor) and not predictor.model.training
    for (name, a), (_, b) in zip(reference.state_dict().items(), predictor.model.state_dict().items()):
        assert torch.equal(a, b), name
    torch.save({"not_sam": torch.zeros(1)}, tmp_path / "other.pth")
    with pytest.raises(RuntimeError, match=r"other\.pth: not a SAM vit_b checkpoint"):
        load_sam(tmp_path / "other.pth", model_type="vit_b", device="cpu")


# ---------------------------------------------------------------------------------------------- to disk
def _white_background(image: np.ndarray) -> list[np.ndarray]:
    """A stand-in SAM: the background is the white pixels."""
    if (image == 1).all():
        raise RuntimeError("predictor failure")
    background = (image == 255).all(axis=2)
    return [background] * 3


def _write(path: Path, image: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(path)
    return path


def test_annotate_to_disk_counts_and_resumes(tmp_path, caplog):
    white = np.full((H, W, 3), 255, np.uint8)
    good = white.copy()
    good[8:21, 10:25] = (10, 200, 30)
    tiny = white.copy()
    tiny[0:2, 0:2] = 0
    src = tmp_path / "gen"
    items = [
        (_write(src / "good.png", good), tmp_path / "out" / "3" / "good.png"),
        (_write(src / "white.png", white), tmp_path / "out" / "3" / "white.png"),
        (_write(src / "tiny.png", tiny), tmp_path / "out" / "3" / "tiny.png"),
        (_write(src / "boom.png", np.ones((H, W, 3), np.uint8)), tmp_path / "out" / "3" / "boom.png"),
        (src / "corrupt.png", tmp_path / "out" / "3" / "corrupt.png"),
        (src / "absent.png", tmp_path / "out" / "3" / "absent.png"),
    ]
    (src / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    predictor = FakePredictor(fn=_white_background)
    counts = annotate_to_disk(predictor, items)
    assert counts == {
        "written": 1,
        "skipped_existing": 0,
        "unreadable": 2,
        "failed": 1,
        "empty": 1,
        "full": 0,
        "too_small": 1,
        "too_large": 0,
    }
    assert sorted(p.name for p in (tmp_path / "out" / "3").iterdir()) == ["good.png"]  # no temporary left
    with Image.open(items[0][1]) as f:
        assert f.mode == "RGBA"
        cutout = np.asarray(f)
    np.testing.assert_array_equal(cutout[..., :3], good[8:21, 10:25])
    assert (cutout[..., 3] == 255).all()
    assert "corrupt.png" in caplog.text and "boom.png" in caplog.text

    # Resume: the existing cutout is not recomputed; a truncated one is.
    n_calls = len(predictor.calls)
    counts = annotate_to_disk(predictor, items[:1])
    assert counts["skipped_existing"] == 1 and counts["written"] == 0 and len(predictor.calls) == n_calls
    items[0][1].write_bytes(items[0][1].read_bytes()[:20])
    counts = annotate_to_disk(predictor, items[:1])
    assert counts["written"] == 1 and len(predictor.calls) == n_calls + 1
    with Image.open(items[0][1]) as f:
        np.testing.assert_array_equal(np.asarray(f), cutout)


def test_annotate_to_disk_forwards_and_checks_keywords(tmp_path):
    image = np.full((H, W, 3), 255, np.uint8)
    image[8:21, 10:25] = 0
    items = [(_write(tmp_path / "a.png", image), tmp_path / "out" / "a.png")]
    counts = annotate_to_disk(FakePredictor(fn=_white_background), items, max_area=0.1)
    assert counts["too_large"] == 1 and counts["written"] == 0
    with pytest.raises(TypeError, match="min_aera"):
        annotate_to_disk(FakePredictor(fn=_white_background), items, min_aera=0.1)
    with pytest.raises(ValueError, match="min_area"):
        annotate_to_disk(FakePredictor(fn=_white_background), items, min_area=0.9, max_area=0.1)
