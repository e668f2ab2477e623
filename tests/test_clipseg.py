"""Stage 3 alternatives (divergen.md §1.2): CLIPSeg masks (threshold rule on hand-made logits, a tiny random
CLIPSeg end to end), the shared annotator interface, X-Paste's max-CLIP-score choice on hand-built embeddings,
and the multi-annotator ``annotate_to_disk``."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from divergen import annotate
from divergen.annotate import (
    REJECT_REASONS,
    Annotation,
    ClipSegAnnotator,
    SamAnnotator,
    annotate_to_disk,
    annotate_with,
    annotation_clip_scores,
    choose_by_clip,
    clipseg_mask,
    cut_out,
    load_clipseg,
    load_sam,
)

tiny_models = pytest.importorskip("divergen.tiny_models")
H, W = 24, 32


def _image(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (H, W, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def clipseg_dir(tmp_path_factory) -> Path:
    return tiny_models.save_tiny_clipseg(tmp_path_factory.mktemp("models") / "clipseg")


# ---------------------------------------------------------------------------------------------- CLIPSeg
class FakeClipSeg(torch.nn.Module):
    """Returns fixed logits and records its inputs (``clipseg_mask`` only reads ``.logits``)."""

    def __init__(self, logits: torch.Tensor):
        super().__init__()
        self.logits, self.w, self.inputs = logits, torch.nn.Parameter(torch.zeros(1)), []

    def forward(self, **inputs):
        self.inputs.append(inputs)
        return SimpleNamespace(logits=self.logits)


def _fake_processor(calls: list):
    def processor(*, text, images, **kw):
        calls.append((text, images))
        return {"input_ids": torch.zeros(1, 3, dtype=torch.long), "pixel_values": torch.zeros(1, 3, 4, 4)}

    return processor


# Left half of the 4x4 logit map says "object" (logit 2, p = 0.88), right half "background" (-2); one cell in
# between (logit 0.5, p = 0.62).
LOGITS = torch.tensor([[2.0, 2.0, -2.0, -2.0]] * 4)
LOGITS[0, 2] = 0.5


@pytest.mark.parametrize("squeezed", [False, True])
def test_clipseg_mask_threshold_on_hand_made_logits(squeezed):
    calls = []
    model = FakeClipSeg(LOGITS if squeezed else LOGITS[None])
    mask = clipseg_mask(model, _fake_processor(calls), _image(), "a photo of a can", threshold=0.5)
    assert mask.shape == (H, W) and mask.dtype == bool
    # Bilinear upsampling x6 (rows) / x8 (columns): away from the 0.5 cell, the logit crosses 0 half-way between
    # the column centres 11.5 and 19.5.
    assert mask[:, :16].all() and not mask[12:, 16:].any()
    assert mask[0, 19] and not mask[0, 27]  # the p = 0.62 cell is in at 0.5 ...
    expected = torch.sigmoid(
        torch.nn.functional.interpolate(LOGITS[None, None], size=(H, W), mode="bilinear", align_corners=False)
    )[0, 0]
    np.testing.assert_array_equal(mask, (expected > 0.5).numpy())
    strict = clipseg_mask(model, _fake_processor([]), _image(), "t", threshold=0.7)
    np.testing.assert_array_equal(strict, (expected > 0.7).numpy())
    assert not strict[0, 19] and strict[:, 4].all()  # ... and out at 0.7, where the p = 0.88 cells stay in
    assert not clipseg_mask(model, _fake_processor([]), _image(), "t", threshold=0.9).any()  # max p = 0.88
    ((text, images),) = calls
    assert text == ["a photo of a can"] and np.array_equal(np.asarray(images[0]), _image())
    with pytest.raises(ValueError, match="threshold"):
        clipseg_mask(model, _fake_processor([]), _image(), "t", threshold=1.0)


def test_clipseg_annotator_prompt_and_post_processing():
    calls = []
    logits = torch.full((1, 4, 4), -5.0)
    logits[0, 1:3, 1:3] = 5.0  # a centred square
    annotator = ClipSegAnnotator(FakeClipSeg(logits), _fake_processor(calls), min_area=0.0)
    image = _image()
    result = annotator(image, "aerosol_can")
    assert calls[0][0] == ["a photo of aerosol can"]  # X-Paste's text, "_" -> " "
    assert result.reason is None and result.mask.shape == (H, W)
    rows, cols = np.nonzero(result.mask.any(1))[0], np.nonzero(result.mask.any(0))[0]
    assert 0 < rows[0] < rows[-1] < H - 1 and 0 < cols[0] < cols[-1] < W - 1
    np.testing.assert_array_equal(result.rgba[..., :3], image[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1])
    # Everything "object": rejected as full, as SAM's.
    full = ClipSegAnnotator(FakeClipSeg(torch.full((1, 4, 4), 5.0)), _fake_processor([]))(image, "can")
    assert full.reason == "full" and full.rgba is None
    with pytest.raises(ValueError, match="category name"):
        annotator(image, "")
    with pytest.raises(ValueError, match="no '\\{\\}'"):
        ClipSegAnnotator(None, None, prompt="a photo")


def test_tiny_clipseg_end_to_end(clipseg_dir):
    model, processor = load_clipseg(clipseg_dir, device="cpu")
    assert not model.training
    image = np.full((H, W, 3), 255, np.uint8)
    image[6:18, 8:24] = (200, 30, 30)
    mask = clipseg_mask(model, processor, image, "a photo of a can")
    assert mask.shape == (H, W) and mask.dtype == bool
    result = ClipSegAnnotator(model, processor, min_area=0.0, max_area=1.0)(image, "can")
    assert result.reason in (None, *REJECT_REASONS) and result.mask.shape == (H, W)
    assert result.area_fraction == pytest.approx(result.mask.mean())
    # Same result through annotate_with, which accepts a PIL image.
    choice = annotate_with(
        [ClipSegAnnotator(model, processor, min_area=0.0, max_area=1.0)], Image.fromarray(image), "can"
    )
    np.testing.assert_array_equal(choice.annotation.mask, result.mask)


def test_load_clipseg_and_tiny_sam_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such local directory"):
        load_clipseg(tmp_path / "absent", device="cpu")
    with pytest.raises(FileNotFoundError, match="save_tiny_sam"):
        load_sam(tmp_path / "absent.pth", model_type="tiny", device="cpu")
    with pytest.raises(ValueError, match="'tiny'"):
        load_sam(tmp_path / "absent.pth", model_type="vit_x", device="cpu")


def test_load_sam_tiny(tmp_path):
    path = tiny_models.save_tiny_sam(tmp_path / "sam.pth", seed=3)
    predictor = load_sam(path, model_type="tiny", device="cpu")
    reference = tiny_models.build_tiny_sam(seed=3).state_dict()
    for name, value in predictor.model.state_dict().items():
        assert torch.equal(value, reference[name]), name
    result = SamAnnotator(predictor, min_area=0.0, max_area=1.0)(_image(), "ignored")
    assert result.mask.shape == (H, W) and result.reason in (None, *REJECT_REASONS)


def test_cut_out_checks_shapes():
    with pytest.raises(ValueError, match=r"foreground \(3, 3\)"):
        cut_out(_image(), np.ones((3, 3), bool))
    with pytest.raises(ValueError, match="min_area"):
        cut_out(_image(), np.ones((H, W), bool), min_area=0.5, max_area=0.1)


# ---------------------------------------------------------------------------------------------- max-CLIP choice
class ColourScorer:
    """A stand-in ``ClipScorer``: an image's embedding is the colour of its centre pixel (normalised), every text's
    is "red", so a cut-out's score is ``r / |rgb|``. Records the texts and the number of images embedded."""

    embed_dim = 3

    def __init__(self):
        self.texts, self.n_images = [], 0

    def image_embeddings(self, images, *, batch_size=32):
        rows = []
        for im in images:
            a = np.asarray(im, dtype=np.float32)
            rows.append(a[a.shape[0] // 2, a.shape[1] // 2])
            self.n_images += 1
        return torch.nn.functional.normalize(torch.tensor(np.stack(rows)), dim=-1)

    def text_embeddings(self, texts):
        self.texts += list(texts)
        return torch.tensor([[1.0, 0.0, 0.0]] * len(texts))


def _ann(colour=None, reason=None) -> Annotation:
    if colour is None:
        return Annotation(rgba=None, mask=np.zeros((H, W), bool), reason=reason or "empty", area_fraction=0.0)
    rgba = np.zeros((6, 6, 4), np.uint8)
    rgba[..., :3], rgba[..., 3] = colour, 255
    return Annotation(rgba=rgba, mask=np.ones((H, W), bool), reason=None, area_fraction=0.3)


RED, ORANGE, GREEN = (250, 10, 10), (200, 100, 0), (0, 200, 0)


def test_choose_by_clip_picks_max_skips_rejected_and_breaks_ties_first():
    scorer = ColourScorer()
    assert choose_by_clip([_ann(GREEN), _ann(RED), _ann(ORANGE)], scorer, "aerosol_can") == 1
    assert scorer.texts == ["a photo of a single aerosol can"] and scorer.n_images == 3  # clip_filter's score
    assert choose_by_clip([_ann(ORANGE), _ann(GREEN)], scorer, "x") == 0
    # A rejected annotation is never chosen and never embedded.
    scorer = ColourScorer()
    assert choose_by_clip([_ann(), _ann(GREEN), _ann(reason="too_large")], scorer, "x") == 1
    assert scorer.n_images == 1
    # Ties go to the first.
    assert choose_by_clip([_ann(GREEN), _ann(ORANGE), _ann(ORANGE)], ColourScorer(), "x") == 1
    # All rejected: nothing to choose, nothing embedded.
    scorer = ColourScorer()
    assert choose_by_clip([_ann(), _ann(reason="too_small")], scorer, "x") is None and scorer.n_images == 0
    scores = annotation_clip_scores([_ann(RED), _ann()], ColourScorer(), "x")
    assert scores.dtype == np.float32 and np.isnan(scores[1])
    assert scores[0] == pytest.approx(250 / np.hypot(250, 10 * np.sqrt(2)), rel=1e-5)


class FixedAnnotator:
    """An annotator that returns a fixed annotation (or raises) and counts its calls."""

    uses_category_name = False

    def __init__(self, name, result):
        self.name, self.result, self.calls = name, result, []

    def __call__(self, image, category_name):
        self.calls.append(category_name)
        if isinstance(self.result, Exception):
            raise self.result
        return self.result


def test_annotate_with_reports_winner_and_scores():
    a, b, c = (
        FixedAnnotator("sam", _ann(GREEN)),
        FixedAnnotator("clipseg", _ann(RED)),
        FixedAnnotator("u2net", _ann()),
    )
    choice = annotate_with([a, b, c], _image(), "can", scorer=ColourScorer())
    assert choice.annotator == "clipseg" and choice.annotation is b.result
    assert set(choice.scores) == {"sam", "clipseg", "u2net"} and np.isnan(choice.scores["u2net"])
    assert choice.scores["clipseg"] > choice.scores["sam"] == pytest.approx(0.0)
    assert choice.annotations["sam"] is a.result and a.calls == ["can"]
    # Every one rejected: the first one's rejection is reported.
    rejected = [FixedAnnotator("a", _ann(reason="too_small")), FixedAnnotator("b", _ann(reason="empty"))]
    choice = annotate_with(rejected, _image(), "can", scorer=ColourScorer())
    assert choice.annotator is None and choice.annotation.reason == "too_small"
    # One annotator needs no scorer.
    choice = annotate_with([a], _image(), "can")
    assert choice.annotator == "sam" and choice.scores == {}
    with pytest.raises(ValueError, match="needs a CLIP scorer"):
        annotate_with([a, b], _image(), "can")
    with pytest.raises(ValueError, match="distinct"):
        annotate_with([a, FixedAnnotator("sam", _ann(RED))], _image(), "can", scorer=ColourScorer())


# ---------------------------------------------------------------------------------------------- to disk
def _write(path: Path, image: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(path)
    return path


def test_annotate_to_disk_with_several_annotators(tmp_path):
    src = _write(tmp_path / "a.png", _image())
    items = [(src, tmp_path / "out" / f"{i}.png", "can") for i in range(3)]
    a, b = FixedAnnotator("sam", _ann(GREEN)), FixedAnnotator("clipseg", _ann(RED))
    counts = annotate_to_disk([a, b], items[:2], scorer=ColourScorer())
    assert counts["written"] == 2 and counts["chosen_clipseg"] == 2 and counts["chosen_sam"] == 0
    with Image.open(items[0][1]) as f:
        np.testing.assert_array_equal(np.asarray(f), b.result.rgba)
    # Resume: only the missing output is annotated.
    counts = annotate_to_disk([a, b], items, scorer=ColourScorer())
    assert counts["skipped_existing"] == 2 and counts["written"] == 1 and len(a.calls) == 3
    # A failing annotator counts the image as failed; all rejected counts the first one's reason.
    boom = FixedAnnotator("boom", RuntimeError("segmenter crashed"))
    counts = annotate_to_disk([a, boom], [(src, tmp_path / "x.png", "can")], scorer=ColourScorer())
    assert counts["failed"] == 1 and not (tmp_path / "x.png").exists()
    rejected = [FixedAnnotator("a", _ann(reason="too_large")), FixedAnnotator("b", _ann())]
    counts = annotate_to_disk(rejected, [(src, tmp_path / "y.png", "can")], scorer=ColourScorer())
    assert counts["too_large"] == 1 and counts["written"] == 0 and counts["chosen_a"] == 0


def test_annotate_to_disk_argument_checks(tmp_path):
    src = _write(tmp_path / "a.png", _image())
    a, b = FixedAnnotator("sam", _ann(GREEN)), FixedAnnotator("clipseg", _ann(RED))
    # A single annotator that ignores the name takes (image, output) pairs, and its counts have no "chosen_".
    counts = annotate_to_disk(a, [(src, tmp_path / "o.png")])
    assert counts["written"] == 1 and not any(k.startswith("chosen_") for k in counts)
    with pytest.raises(ValueError, match="no category name"):
        annotate_to_disk([a, b], [(src, tmp_path / "p.png")], scorer=ColourScorer())
    clipseg = ClipSegAnnotator(FakeClipSeg(LOGITS[None]), _fake_processor([]))
    with pytest.raises(ValueError, match="no category name"):
        annotate_to_disk(clipseg, [(src, tmp_path / "p.png")])
    with pytest.raises(ValueError, match="needs a CLIP scorer"):
        annotate_to_disk([a, b], [(src, tmp_path / "p.png", "can")])
    with pytest.raises(TypeError, match="bare SAM predictor only"):
        annotate_to_disk(a, [(src, tmp_path / "p.png")], max_area=0.5)
    with pytest.raises(ValueError, match="expected \\(image, output\\)"):
        annotate_to_disk(a, [src])
    assert not (tmp_path / "p.png").exists()
    assert annotate.READ_ERRORS  # public for the pipeline's own reading loop
