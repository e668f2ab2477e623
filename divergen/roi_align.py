"""ROIAlign with a vectorised CPU backward.

The forward is torchvision's ``roi_align`` itself (the official detectron2 ``ROIAlignV2`` calls it too, so the
parity fixtures are reproduced bit for bit). torchvision's CPU backward (``roi_align_kernel.cpp``,
``roi_align_backward_kernel_impl``) is a serial loop over every (RoI, channel, bin, sample) that recomputes the
bilinear weights once per channel; it was ~4.4 s of a ~15 s R50 CenterNet2 training step on 2 cores.

The gradient of ROIAlign is linear in the output gradient and the same for every channel:
``grad_input[b, :, pixel] = sum over (RoI k of image b, bin p) of weight[k, p, pixel] * grad_output[k, :, p]``.
``roi_align_backward`` builds that weight matrix once for all channels, as a sparse ``(B*H*W, K*P)`` CSR matrix,
and multiplies it with the ``(K*P, C)`` output gradient (MKL sparse x dense). The weights factorise per axis:
a sample's four bilinear corner weights are ``hy*hx, hy*lx, ly*hx, ly*lx`` and its in/out-of-map test is a test
on y and on x separately, so ``weight[k, (ph, pw), (y, x)] = wy[k, ph, y] * wx[k, pw, x] / count[k]``, where
``wy[k, ph, :]`` sums the 1-D weights of the bin's ``grid_h`` sample rows. Each bin touches one short run of rows
and one of columns, so the matrix holds one entry per (bin, touched pixel), already merged over samples.

The matrix is built from many small ops; they run serially (RoI slabs below torch's parallel grain size, numpy
for the sort), because on a 2-core machine whose other core is busy every OpenMP region costs milliseconds
(``_SERIAL_ELEMENTS``). Only the big steps (the sparse product, the transposes) use torch's threads.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch
import torchvision
from torch import Tensor
from torch.autograd.function import once_differentiable


def _prefer_torchvision(work: int, input_numel: int) -> bool:
    """Whether torchvision's serial backward is the faster one. It costs ~15-20 ns per unit of ``work``
    (channels x bins x samples, its inner-loop count); ours ~1 ms plus ~2 ns per input element (a fresh
    ``(B*H*W, C)`` buffer and the transpose out of it). Crossover measured by ``benchmarks/roi_align.py
    --crossover`` on 1 and 2 threads; the training step's poolings are 10-100x above it."""
    return work < 50_000 + input_numel // 8


def _pair(output_size: int | tuple[int, int]) -> tuple[int, int]:
    if isinstance(output_size, int):
        return output_size, output_size
    pooled_h, pooled_w = output_size
    return int(pooled_h), int(pooled_w)


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp64 stays fp64 (gradcheck); fp32, fp16 and bf16 run in fp32 (torchvision's CPU kernel has no bf16)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _check_rois(rois: Tensor, features: Tensor) -> None:
    if not isinstance(rois, Tensor) or rois.dim() != 2 or rois.shape[1] != 5:
        shape = tuple(rois.shape) if isinstance(rois, Tensor) else type(rois).__name__
        raise ValueError(
            f"roi_align: expected rois of shape (K, 5) = (batch_index, x1, y1, x2, y2), got {shape}"
        )
    if features.dim() != 4:
        raise ValueError(f"roi_align: expected features of shape (B, C, H, W), got {tuple(features.shape)}")


def _forward(
    features: Tensor,
    rois: Tensor,
    pooled: tuple[int, int],
    spatial_scale: float,
    sampling_ratio: int,
    aligned: bool,
) -> Tensor:
    """torchvision's forward. fp16/bf16 features are pooled in fp32 and the result cast back (as torchvision's own
    autocast wrapper does; its CPU kernel has no bf16, and rois in half precision would move the boxes)."""
    dtype = _compute_dtype(features.dtype)
    out = torchvision.ops.roi_align(
        features.to(dtype), rois.to(dtype), pooled, spatial_scale, sampling_ratio, aligned
    )
    return out.to(features.dtype)


def roi_align(
    features: Tensor,
    rois: Tensor,
    output_size: int | tuple[int, int],
    spatial_scale: float,
    sampling_ratio: int = 0,
    aligned: bool = True,
) -> Tensor:
    """``torchvision.ops.roi_align`` with a fast CPU backward (same forward, same gradient to fp32 rounding).

    Arguments:
        features: ``(B, C, H, W)`` feature map; fp32/fp64, or fp16/bf16 (pooled in fp32, cast back, on every
            device).
        rois: ``(K, 5)`` = (batch index, x1, y1, x2, y2), input pixels; cast to the compute dtype.
        output_size: ``S`` or ``(PH, PW)``, the pooled grid.
        spatial_scale: feature pixels per input pixel (``1 / stride``).
        sampling_ratio: samples per bin and axis; ``<= 0``: adaptive, ``ceil(roi_size / output_size)``.
        aligned: shift the box by -0.5 feature pixel (detectron2 ``ROIAlignV2``).

    Returns:
        ``(K, C, PH, PW)`` in ``features.dtype``. No gradient flows to ``rois`` (as in torchvision); double
        backward is not supported. Off CPU, or without a gradient to compute, this is torchvision's op as is.
    """
    _check_rois(rois, features)
    pooled = _pair(output_size)
    if features.device.type != "cpu" or not (torch.is_grad_enabled() and features.requires_grad):
        return _forward(features, rois, pooled, spatial_scale, sampling_ratio, aligned)
    return _RoIAlign.apply(features, rois, pooled, spatial_scale, sampling_ratio, aligned)


class _RoIAlign(torch.autograd.Function):
    @staticmethod
    def forward(ctx, features, rois, pooled, spatial_scale, sampling_ratio, aligned):
        ctx.save_for_backward(rois)
        ctx.args = (tuple(features.shape), spatial_scale, sampling_ratio, aligned)
        return _forward(features, rois, pooled, spatial_scale, sampling_ratio, aligned)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output):
        (rois,) = ctx.saved_tensors
        input_shape, spatial_scale, sampling_ratio, aligned = ctx.args
        grad = roi_align_backward(grad_output, rois, input_shape, spatial_scale, sampling_ratio, aligned)
        return grad, None, None, None, None, None


# ----------------------------------------------------------------------------------------------- backward

# Extra memory of the backward: at most this many output-gradient elements are transposed at once (32 MiB in
# fp32), and at most this many sparse entries (~40 bytes each) are held at once.
_CHUNK_GRAD_ELEMENTS = 1 << 23
_CHUNK_ENTRIES = 1 << 20
# torch runs an elementwise op on the calling thread alone up to this many elements (at::internal::GRAIN_SIZE)
# and opens an OpenMP parallel region beyond. The sparse matrix is built from many small ops, so it is built in
# RoI slabs below that size: a parallel region after serial work wakes the sleeping worker thread, which costs
# up to milliseconds while another process holds the other core. Measured on 2 threads with the other core busy:
# the box pooler's backward (1024 RoIs, 3 levels) took ~750 ms built in parallel, ~140 ms built serially.
_SERIAL_ELEMENTS = 1 << 15


def roi_align_backward(
    grad_output: Tensor,
    rois: Tensor,
    input_shape: tuple[int, int, int, int],
    spatial_scale: float,
    sampling_ratio: int = 0,
    aligned: bool = True,
) -> Tensor:
    """Gradient of ``roi_align`` w.r.t. its features: ``torch.ops.torchvision._roi_align_backward`` semantics.

    Arguments:
        grad_output: ``(K, C, PH, PW)``.
        rois: ``(K, 5)`` = (batch index, x1, y1, x2, y2), input pixels.
        input_shape: ``(B, C, H, W)`` of the features.
        spatial_scale, sampling_ratio, aligned: as in ``roi_align``.

    Returns:
        ``(B, C, H, W)`` in ``grad_output.dtype`` (computed in fp32, or fp64 for fp64). Off CPU, and on CPU when
        ``_prefer_torchvision`` says so (small cases), torchvision's own kernel computes it.
    """
    batch, channels, height, width = input_shape
    num_rois, _, pooled_h, pooled_w = grad_output.shape
    dtype = _compute_dtype(grad_output.dtype)
    if num_rois == 0 or channels == 0:
        return grad_output.new_zeros(input_shape)
    rois = rois.detach().to(dtype)
    args = (rois, spatial_scale, pooled_h, pooled_w, batch, channels, height, width, sampling_ratio, aligned)
    if grad_output.device.type != "cpu":
        return torch.ops.torchvision._roi_align_backward(grad_output.to(dtype), *args).to(grad_output.dtype)
    start_h, bin_h, grid_h, start_w, bin_w, grid_w = _sample_grid(
        rois, (pooled_h, pooled_w), spatial_scale, sampling_ratio, aligned
    )
    num_bins = pooled_h * pooled_w
    work = channels * num_bins * int((grid_h.clamp(min=0) * grid_w.clamp(min=0)).sum())
    if _prefer_torchvision(work, batch * channels * height * width):
        return torch.ops.torchvision._roi_align_backward(grad_output.to(dtype), *args).to(grad_output.dtype)
    image = rois[:, 0].to(torch.int64)  # the kernel's (int) cast
    if int(image.min()) < 0 or int(image.max()) >= batch:
        raise ValueError(
            f"roi_align_backward: batch indices must lie in [0, {batch}), got {rois[:, 0].unique()}"
        )
    axes = ((start_h, bin_h, grid_h, pooled_h, height), (start_w, bin_w, grid_w, pooled_w, width))
    # per RoI: elements of its 1-D sample tensors, and a bound on its sparse entries (a bin's samples span less
    # than the bin, so each axis's run of pixels is at most ceil(bin) + 2 long)
    samples = torch.stack([grid.clamp(min=0) * pooled for _, _, grid, pooled, _ in axes]).amax(0)
    touched = [
        (torch.ceil(bin_size.abs()).nan_to_num(0).clamp(max=size) + 2).to(torch.int64).clamp(max=size)
        for _, bin_size, _, _, size in axes
    ]
    entries = num_bins * touched[0] * touched[1]

    grad_flat = grad_output.detach().reshape(num_rois, channels * num_bins)
    out = torch.zeros(batch * height * width, channels, dtype=dtype)
    costs = torch.stack([torch.full_like(entries, num_bins * channels), entries], dim=1)
    for begin, end in _ranges(costs, (_CHUNK_GRAD_ELEMENTS, _CHUNK_ENTRIES)):
        parts = []
        slab_costs = torch.stack([samples[begin:end], entries[begin:end]], dim=1)
        for first, last in _ranges(slab_costs, (_SERIAL_ELEMENTS, _SERIAL_ELEMENTS)):
            k = slice(begin + first, begin + last)
            slab_axes = [
                (start[k], bin_size[k], grid[k], pooled, size) for start, bin_size, grid, pooled, size in axes
            ]
            parts.append(_slab_entries(image[k], slab_axes, first, end - begin))
        weight = _csr(parts, (batch * height * width, (end - begin) * num_bins))
        # the dense operand, (P * K_chunk, C) with row p * K_chunk + k: the channel dimension is the dense one of
        # the sparse x dense product, and this row order makes it one 2-D transpose of (K_chunk * C, P)
        chunk = grad_flat[begin:end].to(dtype).contiguous().view(-1, num_bins)
        out.addmm_(weight, _transpose(chunk).view(-1, channels))
    grad = torch.empty(batch, channels, height * width, dtype=dtype)
    for b, image_out in enumerate(out.view(batch, height * width, channels)):
        grad[b].copy_(image_out.t())  # the blocked 2-D transpose copy, as in _transpose
    return grad.view(input_shape).to(grad_output.dtype)


def _ranges(costs: Tensor, limits: tuple[int, ...]) -> list[tuple[int, int]]:
    """Consecutive RoI ranges whose ``(K, M)`` integer costs sum to at most ``limits[m]`` in every column ``m``
    (a RoI over a limit gets a range of its own)."""
    ranges, begin, total = [], 0, [0] * len(limits)
    for k, row in enumerate(costs.tolist()):
        if k > begin and any(t + c > limit for t, c, limit in zip(total, row, limits)):
            ranges.append((begin, k))
            begin, total = k, [0] * len(limits)
        total = [t + c for t, c in zip(total, row)]
    ranges.append((begin, len(costs)))
    return ranges


def _transpose(x: Tensor) -> Tensor:
    """``x.t().contiguous()`` of a contiguous ``(M, N)`` CPU tensor through torch's blocked 2-D transpose copy
    (``copy_`` of a transposed 2-D source): ~3x faster than the generic strided copy of ``.contiguous()``."""
    return torch.empty(x.shape[1], x.shape[0], dtype=x.dtype).copy_(x.t())


def _axis_weights(
    start: Tensor, bin_size: Tensor, grid: Tensor, pooled: int, size: int
) -> tuple[Tensor, Tensor, Tensor]:
    """1-D bilinear weights along one axis, summed over each bin's samples.

    torchvision ``bilinear_interpolate_gradient`` per coordinate: a sample outside ``[-1, size]`` contributes
    nothing; below 0 it is clamped to 0; at or past the last pixel it is clamped there with weight 1 on it;
    otherwise ``1 - frac`` goes to ``floor`` and ``frac`` to ``floor + 1``. Sample ``i`` of bin ``p`` sits at
    ``(start + p * bin_size) + (i + 0.5) * bin_size / grid``, evaluated in that order so that every fp32 rounding
    (and hence every floor and border decision) matches the C++ kernel.

    Arguments:
        start, bin_size: ``(K,)`` RoI start and bin size along the axis, feature pixels, compute dtype.
        grid: ``(K,)`` int64 samples per bin along the axis (``<= 0``: none).
        pooled: bins along the axis; size: feature-map pixels along the axis.

    Returns:
        first ``(K, P)`` int64, first pixel a bin touches; length ``(K, P)`` int64, pixels it touches (0: none);
        weights ``(K, P, L)``, weight of pixel ``first + j`` (zero past ``length``).
    """
    dtype = start.dtype
    g_max = max(int(grid.max()), 1) if grid.numel() else 1
    bins = torch.arange(pooled, dtype=dtype)
    steps = torch.arange(g_max, dtype=dtype)
    bin_start = start[:, None] + bins * bin_size[:, None]  # (K, P)
    offset = (steps + 0.5) * bin_size[:, None] / grid.clamp(min=1).to(dtype)[:, None]  # (K, G)
    coord = bin_start[:, :, None] + offset[:, None, :]  # (K, P, G)
    # written as "in range" so that NaN coordinates contribute nothing (as in the forward's pre_calc)
    valid = (coord >= -1.0) & (coord <= size) & (torch.arange(g_max) < grid[:, None, None])
    coord = torch.where(valid, coord, 0.0).clamp(min=0.0)
    low = coord.to(torch.int64)  # truncation == floor for coord >= 0, as the C++ (int) cast
    at_end = low >= size - 1
    low = torch.where(at_end, size - 1, low)
    frac = torch.where(at_end, 0.0, coord - low.to(dtype))
    touches_high = valid & (frac != 0)  # the high pixel has weight frac: skip it when frac == 0
    first = torch.where(valid, low, size).amin(-1)
    last = torch.where(touches_high, low + 1, torch.where(valid, low, -1)).amax(-1)
    length = (last - first + 1).clamp(min=0)
    first = torch.where(length > 0, first, 0)
    width = max(int(length.max()), 1) if length.numel() else 1
    # slot `width` collects the weights of invalid samples and is dropped
    weights = torch.zeros(*length.shape, width + 1, dtype=dtype)
    weights.scatter_add_(
        -1, torch.where(valid, low - first[..., None], width), torch.where(valid, 1.0 - frac, 0.0)
    )
    weights.scatter_add_(-1, torch.where(touches_high, low + 1 - first[..., None], width), frac)
    return first, length, weights[..., :width]


def _sample_grid(
    rois: Tensor, pooled: tuple[int, int], spatial_scale: float, sampling_ratio: int, aligned: bool
) -> tuple[Tensor, ...]:
    """Per-RoI start, bin size and sample count on each axis (``roi_align_backward_kernel_impl``, in the compute
    dtype of ``rois``): ``start = coord * scale - (0.5 if aligned)``, ``bin = size / pooled`` (size clamped to
    >= 1 when not aligned), ``grid = sampling_ratio`` or ``ceil(size / pooled)``."""
    scale = torch.tensor(spatial_scale, dtype=rois.dtype)  # the kernel's `const T& spatial_scale`
    offset = 0.5 if aligned else 0.0
    start_w, start_h, end_w, end_h = (rois[:, i] * scale - offset for i in range(1, 5))
    roi_w, roi_h = end_w - start_w, end_h - start_h
    if not aligned:  # legacy: force malformed RoIs to be 1x1
        roi_w, roi_h = roi_w.clamp(min=1.0), roi_h.clamp(min=1.0)
    if sampling_ratio > 0:
        grid_h = grid_w = torch.full(roi_w.shape, sampling_ratio, dtype=torch.int64)
    else:
        grid_h, grid_w = (
            torch.ceil(roi_h / pooled[0]).to(torch.int64),
            torch.ceil(roi_w / pooled[1]).to(torch.int64),
        )
    return start_h, roi_h / pooled[0], grid_h, start_w, roi_w / pooled[1], grid_w


def _slab_entries(
    image: Tensor, axes: list[tuple[Tensor, Tensor, Tensor, int, int]], offset: int, chunk_rois: int
) -> tuple[Tensor, Tensor, Tensor]:
    """The sparse entries of a slab of RoIs: one per (bin, touched pixel), merged over the bin's samples.

    Bin ``(k, ph, pw)`` touches the ``len_y[k, ph] x len_x[k, pw]`` block of pixels, with weight
    ``w_y * w_x / count``. The blocks are ragged, so the entries are enumerated flat: entry ``e`` of bin ``n`` is
    block element ``(e // len_x, e % len_x)``. (``index_select`` rather than ``[]``: several times faster for 1-D
    gathers on CPU.)

    Arguments:
        image: ``(S,)`` int64 batch index of the slab's RoIs.
        axes: per axis (y, then x): start, bin size, grid ``(S,)`` (``_sample_grid``), bins, map size.
        offset: index of the slab's first RoI in its chunk; chunk_rois: RoIs in the chunk.

    Returns:
        pixel ``(E,)`` int32, flat ``b * H * W + y * W + x``; dense row ``(E,)`` int32, ``p * chunk_rois + k``
        (``roi_align_backward``); value ``(E,)``.
    """
    (_, _, grid_h, pooled_h, height), (_, _, grid_w, pooled_w, width) = axes
    first_y, len_y, w_y = _axis_weights(*axes[0])
    first_x, len_x, w_x = _axis_weights(*axes[1])
    w_y = w_y / (grid_h * grid_w).clamp(min=1).to(w_y.dtype)[:, None, None]  # the average over the samples
    num_rois, width_y, width_x = len(image), w_y.shape[-1], w_x.shape[-1]
    row_base = (image[:, None, None] * height + first_y[..., None] + torch.arange(width_y)) * width
    col_base = first_x[..., None] + torch.arange(width_x)

    shape = (num_rois, pooled_h, pooled_w)
    per_bin = (len_y[:, :, None] * len_x[:, None, :]).reshape(-1)  # (S * P,)
    total = int(per_bin.sum())
    bin_id = _repeat_arange(per_bin, total)
    # per bin: its first entry, its block width, where its rows/columns start in w_y/row_base and w_x/col_base,
    # and its row of the dense operand
    bin_first = torch.cumsum(per_bin, 0) - per_bin
    bin_len_x = len_x[:, None, :].expand(shape).reshape(-1)
    bin_row = (torch.arange(num_rois * pooled_h) * width_y).view(num_rois, pooled_h, 1).expand(shape)
    bin_col = (torch.arange(num_rois * pooled_w) * width_x).view(num_rois, 1, pooled_w).expand(shape)
    bin_dense = torch.arange(pooled_h * pooled_w) * chunk_rois + (offset + torch.arange(num_rois))[:, None]
    local = torch.arange(total) - bin_first.index_select(0, bin_id)
    entry_len_x = bin_len_x.index_select(0, bin_id)
    j_y = local.div(entry_len_x, rounding_mode="floor")
    row = bin_row.reshape(-1).index_select(0, bin_id) + j_y
    col = bin_col.reshape(-1).index_select(0, bin_id) + (local - j_y * entry_len_x)
    value = w_y.reshape(-1).index_select(0, row) * w_x.reshape(-1).index_select(0, col)
    pixel = row_base.reshape(-1).index_select(0, row) + col_base.reshape(-1).index_select(0, col)
    dense_row = bin_dense.reshape(-1).index_select(0, bin_id)
    return pixel.to(torch.int32), dense_row.to(torch.int32), value


def _repeat_arange(counts: Tensor, total: int) -> Tensor:
    """``torch.repeat_interleave(torch.arange(len(counts)), counts)`` (``total`` = its length), without the
    parallel region that ``repeat_interleave`` opens at any size (see ``_SERIAL_ELEMENTS``)."""
    nonzero = counts.nonzero()[:, 0]
    starts = torch.zeros(total, dtype=torch.int64)
    starts[(torch.cumsum(counts, 0) - counts).index_select(0, nonzero[1:])] = 1
    return nonzero.index_select(0, torch.cumsum(starts, 0))


def _csr(parts: list[tuple[Tensor, Tensor, Tensor]], size: tuple[int, int]) -> Tensor:
    """The ``size = (B*H*W, P*K)`` CSR matrix of the slabs' entries ``(pixel, dense row, value)``.

    Built with numpy: torch's ``cat``, ``sort`` and ``bincount`` open parallel regions at any size (see
    ``_SERIAL_ELEMENTS``; its sort then took ~100 ms for 400k keys), numpy's stable sort of 16-bit keys is a
    serial radix sort (~2 ms). MKL takes the columns of a CSR row in any order.
    """
    pixel, dense_row, value = (np.concatenate([part[i].numpy() for part in parts]) for i in range(3))
    order = np.argsort(pixel.astype(np.uint16), kind="stable")  # LSD radix sort, 16 bits at a time
    for shift in range(16, max(size[0] - 1, 1).bit_length(), 16):
        order = order[np.argsort((pixel[order] >> shift).astype(np.uint16), kind="stable")]
    crow = np.zeros(size[0] + 1, dtype=np.int32)
    np.cumsum(np.bincount(pixel, minlength=size[0]), out=crow[1:])
    with warnings.catch_warnings():  # "Sparse CSR tensor support is in beta state"
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        return torch.sparse_csr_tensor(
            torch.from_numpy(crow),
            torch.from_numpy(dense_row[order]),
            torch.from_numpy(value[order]),
            size=size,
            check_invariants=False,
        )
