"""roi_align: torchvision's forward bit for bit, and its CPU backward (roi_align_kernel.cpp) to fp32 rounding.

References: torchvision's own ``_roi_align_backward`` kernel, a float64 ``gradcheck`` (the true Jacobian of
torchvision's forward), and hand-computed gradients of single RoIs whose samples fall on pixel centres.
"""

from __future__ import annotations

import pytest
import torch
import torchvision

from divergen import roi_align as ra
from divergen.roi_align import roi_align, roi_align_backward
from tests.conftest import assert_close_rel

H, W = 20, 28  # non-square, so that a swapped axis shows


@pytest.fixture
def vectorised(monkeypatch):
    """Always take the vectorised backward, however small the case (tests are small)."""
    monkeypatch.setattr(ra, "_prefer_torchvision", lambda work, input_numel: False)


def make_rois(scale: float, num_random: int, seed: int) -> torch.Tensor:
    """``(K, 5)`` RoIs in input pixels of a ``H x W`` map at ``scale``, covering the kernel's special cases.

    Random boxes of every size from < 1 feature pixel to 3x the map, centred anywhere in [-0.3, 1.3] of the map
    (so partly or fully outside), plus hand-placed boxes: ending on the last row/column, beyond it, fully outside,
    degenerate (zero size, inverted), and one whose bin centres land exactly on -1 and on H (the border rule).
    Batch indices of 2 images, interleaved at random.
    """
    g = torch.Generator().manual_seed(seed)
    size = torch.exp(torch.empty(num_random, 2).uniform_(-4.0, 4.5, generator=g))  # 0.02 .. 90 feature px
    size[: num_random // 4] = torch.rand(num_random // 4, 2, generator=g)  # tiny: < 1 feature px
    centre = (torch.rand(num_random, 2, generator=g) * 1.6 - 0.3) * torch.tensor([W, H])
    boxes = torch.cat([centre - size / 2, centre + size / 2], dim=1)
    hand = torch.tensor(
        [
            [W - 3.0, H - 3.0, W, H],  # ends on the last row/col
            [W - 1.0, H - 1.0, W + 0.5, H + 0.5],  # straddles the end
            [W - 0.75, 2.0, W + 0.5, 9.0],
            [0.0, 0.0, W, H],  # the whole map
            [-W, -H, 2.0 * W, 2.0 * H],  # 3x the map
            [W + 5.0, 3.0, W + 9.0, 8.0],  # fully outside (right)
            [-9.0, -9.0, -4.0, -3.0],  # fully outside (top left)
            [4.0, 4.0, 4.0, 9.0],  # zero width
            [9.0, 9.0, 5.0, 6.0],  # inverted
            [-1.0, -1.0, 6.0, 6.0],  # aligned, output 7: first bin centre exactly at -1
            [W - 6.0, H - 6.0, W + 1.0, H + 1.0],  # aligned, output 7: last bin centre exactly at (W, H)
            [3.0, 5.0, 3.5, 5.25],  # tiny, inside
        ]
    )
    boxes = torch.cat([boxes, hand]) / scale
    batch = torch.randint(0, 2, (len(boxes), 1), generator=g).float()
    return torch.cat([batch, boxes], dim=1)


def grads(features, rois, output_size, scale, sampling_ratio, aligned, weight):
    """Gradient of sum(weight * roi_align(...)) w.r.t. features: (ours, torchvision's)."""
    features = features.detach().requires_grad_(True)
    ours = roi_align(features, rois, output_size, scale, sampling_ratio, aligned)
    (g_ours,) = torch.autograd.grad((ours * weight).sum(), features)
    ref = torchvision.ops.roi_align(features, rois, output_size, scale, sampling_ratio, aligned)
    (g_ref,) = torch.autograd.grad((ref * weight).sum(), features)
    return ours, ref, g_ours, g_ref


@pytest.mark.parametrize("aligned", [True, False])
@pytest.mark.parametrize("sampling_ratio", [0, 2])
@pytest.mark.parametrize(("output_size", "scale"), [(7, 1 / 8), (14, 1 / 16), ((7, 5), 1 / 32)])
def test_forward_and_gradient_match_torchvision(vectorised, output_size, scale, sampling_ratio, aligned):
    g = torch.Generator().manual_seed(1)
    rois = make_rois(scale, 60, seed=2)
    features = torch.randn(2, 8, H, W, generator=g)
    pooled = (output_size, output_size) if isinstance(output_size, int) else output_size
    weight = torch.randn(len(rois), 8, *pooled, generator=g)
    ours, ref, g_ours, g_ref = grads(features, rois, output_size, scale, sampling_ratio, aligned, weight)
    assert torch.equal(ours, ref)  # the forward is torchvision's
    assert g_ref.abs().sum() > 0 and (g_ref[0] != 0).any() and (g_ref[1] != 0).any()  # both images touched
    assert_close_rel(g_ours, g_ref, rel=1e-5, name="grad")


@pytest.mark.parametrize("map_size", [(1, 1), (1, 3), (4, 2)])
def test_tiny_maps(vectorised, map_size):
    # every sample is clamped onto the first/last row or column (p7 of a small image is a few pixels wide)
    g = torch.Generator().manual_seed(9)
    features = torch.randn(2, 3, *map_size, generator=g)
    rois = make_rois(1 / 8, 30, seed=10)
    weight = torch.randn(len(rois), 3, 7, 7, generator=g)
    ours, ref, g_ours, g_ref = grads(features, rois, 7, 1 / 8, 0, True, weight)
    assert torch.equal(ours, ref)
    assert_close_rel(g_ours, g_ref, rel=1e-5, name="grad")


def test_map_with_more_than_65536_pixels(vectorised):
    # the CSR rows (flat pixel indices) are sorted 16 bits at a time: 2 x 160 x 208 = 66560 pixels needs 2 passes
    g = torch.Generator().manual_seed(11)
    features = torch.randn(2, 2, 160, 208, generator=g)
    boxes = torch.rand(200, 2, generator=g) * torch.tensor([208.0, 160.0])
    rois = torch.cat(
        [
            torch.randint(0, 2, (200, 1), generator=g).float(),
            boxes,
            boxes + 1 + 30 * torch.rand(200, 2, generator=g),
        ],
        dim=1,
    )
    weight = torch.randn(200, 2, 7, 7, generator=g)
    _, _, g_ours, g_ref = grads(features, rois, 7, 1.0, 0, True, weight)
    assert (g_ref[1, :, 150:] != 0).any()  # RoIs reach the last rows of the second image (flat index > 65535)
    assert_close_rel(g_ours, g_ref, rel=1e-5, name="grad")


def test_border_and_hand_computed_gradients(vectorised):
    # One 1x1 bin, aligned, scale 1: the box [1, 3]^2 starts at 0.5 with a 2-px bin and grid 2, so its samples
    # sit exactly on pixel centres 1 and 2 (no interpolation): 1/4 of the gradient on each of 4 pixels.
    features = torch.zeros(1, 1, 4, 5, requires_grad=True)
    (grad,) = torch.autograd.grad(
        roi_align(features, torch.tensor([[0.0, 1, 1, 3, 3]]), 1, 1.0).sum(), features
    )
    expected = torch.zeros(1, 1, 4, 5)
    expected[0, 0, 1:3, 1:3] = 0.25
    torch.testing.assert_close(grad, expected, rtol=0, atol=0)
    # The border rule: a sample at y = -1 is inside (clamped to row 0, weight 1), at y < -1 it is dropped; one at
    # y = H is clamped to the last row with weight 1, beyond H it is dropped.
    rois = torch.tensor(
        [
            [0.0, 2.0, -1.0, 3.0, 0.0],  # one sample at (x, y) = (2, -1): weight 1 on (row 0, col 2)
            [0.0, 2.0, -1.25, 3.0, -0.25],  # (2, -1.25): dropped
            [0.0, 4.0, 4.0, 5.0, 5.0],  # (4, 4) = (W - 1, H): weight 1 on (3, 4)
            [0.0, 1.0, 4.25, 2.0, 5.25],  # (1, 4.25): dropped
            [0.0, 1.0, 1.0, 2.0, 2.0],  # (1, 1): weight 1 on (1, 1)
        ]
    )
    out = roi_align(features, rois, 1, 1.0, sampling_ratio=1, aligned=True)
    (grad,) = torch.autograd.grad(out, features, torch.tensor([1.0, 10, 100, 1000, 10000]).view(5, 1, 1, 1))
    expected = torch.zeros(1, 1, 4, 5)
    expected[0, 0, 0, 2], expected[0, 0, 3, 4], expected[0, 0, 1, 1] = 1.0, 100.0, 10000.0
    torch.testing.assert_close(grad, expected, rtol=0, atol=0)
    ref = torch.ops.torchvision._roi_align_backward(torch.tensor([1.0, 10, 100, 1000, 10000]).view(5, 1, 1, 1),
                                                    rois, 1.0, 1, 1, 1, 1, 4, 5, 1, True)  # fmt: skip
    torch.testing.assert_close(ref, expected, rtol=0, atol=0)  # the hand values are torchvision's too


def test_gradcheck_float64(vectorised):
    g = torch.Generator().manual_seed(3)
    features = torch.randn(2, 2, 6, 7, dtype=torch.float64, generator=g, requires_grad=True)
    # off pixel centres and away from the clamp/border decisions, where the map is smooth
    rois = torch.tensor([[1, 1.3, 0.7, 9.9, 8.1], [0, -2.2, 3.1, 4.7, 13.6], [1, 6.1, 2.2, 7.3, 2.9]])
    rois = rois.to(torch.float64)
    for sampling_ratio, aligned in [(0, True), (2, False)]:
        assert torch.autograd.gradcheck(
            lambda f, sr=sampling_ratio, al=aligned: roi_align(f, rois, (3, 2), 0.5, sr, al), (features,)
        )


def test_zero_rois(vectorised):
    features = torch.randn(2, 4, H, W, requires_grad=True)
    out = roi_align(features, torch.zeros(0, 5), 7, 1 / 8)
    assert out.shape == (0, 4, 7, 7)
    (grad,) = torch.autograd.grad(out.sum(), features, allow_unused=True)
    assert grad is None or (grad == 0).all()
    assert (roi_align_backward(torch.zeros(0, 4, 7, 7), torch.zeros(0, 5), (2, 4, H, W), 1 / 8) == 0).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_features_run_in_fp32(vectorised, dtype):
    g = torch.Generator().manual_seed(4)
    rois = make_rois(1 / 8, 40, seed=5)
    features = torch.randn(2, 8, H, W, generator=g).to(dtype).requires_grad_(True)
    out = roi_align(features, rois, 7, 1 / 8)
    assert out.dtype == dtype
    ref = torchvision.ops.roi_align(features.detach().float(), rois, 7, 1 / 8, 0, True)
    assert torch.equal(out, ref.to(dtype))  # torchvision in fp32 (its CPU kernel has no bf16), cast back
    weight = torch.randn(out.shape, generator=g).to(dtype)
    (grad,) = torch.autograd.grad(out, features, weight)
    assert grad.dtype == dtype
    ref_grad = torch.ops.torchvision._roi_align_backward(
        weight.float(), rois, 1 / 8, 7, 7, 2, 8, H, W, 0, True
    )
    # one rounding to `dtype` apart (the fp32 gradients agree to ~1e-7)
    assert_close_rel(grad.float(), ref_grad, rel=2.0**-8, name=f"{dtype} grad")


def test_ranges():
    # a range closes before the RoI that would take any column over its limit; an oversized RoI stands alone
    costs = torch.tensor([[100, 1]] * 7)
    assert ra._ranges(costs, (300, 100)) == [(0, 3), (3, 6), (6, 7)]
    assert ra._ranges(costs, (1000, 5)) == [(0, 5), (5, 7)]
    assert ra._ranges(torch.tensor([[1000], [1], [1]]), (10,)) == [(0, 1), (1, 3)]
    assert ra._ranges(torch.zeros(0, 2, dtype=torch.int64), (1, 1)) == [(0, 0)]


@pytest.mark.parametrize("limits", [(8 * 49 * 5, 300, 200), (1 << 30, 1 << 30, 500)])
def test_chunks_and_slabs_equal_one_pass(vectorised, monkeypatch, limits):
    # chunks of 5 RoIs (gradient bound) or ~300 entries; slabs of a few RoIs: the same sparse matrix, split
    g = torch.Generator().manual_seed(6)
    rois = make_rois(1 / 8, 50, seed=7)
    grad_out = torch.randn(len(rois), 8, 7, 7, generator=g)
    whole = roi_align_backward(grad_out, rois, (2, 8, H, W), 1 / 8)
    for name, limit in zip(("_CHUNK_GRAD_ELEMENTS", "_CHUNK_ENTRIES", "_SERIAL_ELEMENTS"), limits):
        monkeypatch.setattr(ra, name, limit)
    split = roi_align_backward(grad_out, rois, (2, 8, H, W), 1 / 8)
    assert torch.equal(split, roi_align_backward(grad_out, rois, (2, 8, H, W), 1 / 8))  # deterministic
    assert_close_rel(split, whole, rel=1e-6, name="split")
    ref = torch.ops.torchvision._roi_align_backward(grad_out, rois, 1 / 8, 7, 7, 2, 8, H, W, 0, True)
    assert_close_rel(split, ref, rel=1e-5, name="split vs torchvision")


def test_expanded_grad_output_and_rois_from_boxes(vectorised):
    # `out.sum().backward()` hands the backward a zero-stride gradient; rois may require grad (none flows back).
    features = torch.randn(2, 8, H, W, requires_grad=True)
    rois = make_rois(1 / 8, 20, seed=8).requires_grad_(True)
    roi_align(features, rois, 7, 1 / 8).sum().backward()
    ref_features = features.detach().requires_grad_(True)
    torchvision.ops.roi_align(ref_features, rois.detach(), 7, 1 / 8, 0, True).sum().backward()
    assert_close_rel(features.grad, ref_features.grad, rel=1e-5)
    assert rois.grad is None


def test_small_work_falls_back_to_torchvision():
    rois = torch.tensor([[0.0, 3, 4, 30, 40]])
    grad_out = torch.randn(1, 4, 7, 7)
    assert ra._prefer_torchvision(4 * 49, 4 * H * W)  # 4 channels x 49 bins x 1 sample: torchvision's
    ours = roi_align_backward(grad_out, rois, (1, 4, H, W), 1 / 8)
    ref = torch.ops.torchvision._roi_align_backward(grad_out, rois, 1 / 8, 7, 7, 1, 4, H, W, 0, True)
    assert torch.equal(ours, ref)
    # without a gradient to compute, roi_align is torchvision's op itself
    features = torch.randn(1, 4, H, W)
    assert torch.equal(
        roi_align(features, rois, 7, 1 / 8), torchvision.ops.roi_align(features, rois, 7, 1 / 8, 0, True)
    )


def test_errors_name_the_expected_input(vectorised):
    features = torch.randn(2, 4, H, W, requires_grad=True)
    with pytest.raises(ValueError, match=r"\(K, 5\)"):
        roi_align(features, torch.zeros(3, 4), 7, 1 / 8)
    with pytest.raises(ValueError, match=r"batch indices must lie in \[0, 2\)"):
        roi_align_backward(torch.ones(1, 4, 7, 7), torch.tensor([[2.0, 0, 0, 50, 50]]), (2, 4, H, W), 1 / 8)
