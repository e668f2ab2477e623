"""BSGAL contribution estimation (bsgal.md §1.2 steps 2 and 4, §5): the gradient cache and the fused cosine
against a naive flat-vector implementation on real gradients of a tiny conv net, the memory contract (no
P-sized vector or temporary; recorded op by op), bf16 and offloaded caches, checkpoints, and the threshold."""

from __future__ import annotations

import math
import weakref

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from divergen.bsgal import CPU_DOT_CHUNK, GradCache, Threshold, contribution

CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs CUDA")


# ----------------------------------------------------------------------------------------------- helpers


class TinyNet(nn.Module):
    """Conv-conv-linear classifier plus a head that the loss never uses (its parameters get no gradient, as
    the proposal and mask heads in the reference backward, bsgal.md §1.2 step 1)."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 16, 3, padding=1)
        self.fc = nn.Linear(16, 5)
        self.unused = nn.Linear(16, 3)

    def forward(self, x):
        x = torch.relu(self.conv1(x))
        x = torch.relu(self.conv2(x))
        return self.fc(x.mean((2, 3)))


def real_grads(model: nn.Module, seed: int, *, label_shift: int = 0) -> list[torch.Tensor | None]:
    """The gradients (None where a parameter got none) of a real backward pass on a seeded random batch;
    ``label_shift`` changes the labels, so different seeds/shifts give aligned or opposed gradients."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(4, 3, 8, 8, generator=gen)
    y = (torch.randint(0, 5, (4,), generator=gen) + label_shift) % 5
    model.zero_grad(set_to_none=True)
    nn.functional.cross_entropy(model(x), y).backward()
    return [None if p.grad is None else p.grad.detach().clone() for p in model.parameters()]


def flat(tensors, params) -> torch.Tensor:
    """The official flattening (bsgal.md §9): zeros for a missing gradient, float64 for the reference."""
    return torch.cat(
        [
            (torch.zeros(p.numel()) if t is None else t.detach().double().cpu().reshape(-1))
            for t, p in zip(tensors, params)
        ]
    ).double()


class NaiveCache:
    """bsgal.md §9 literally: one flat vector, c ← m·c + (1 − m)·g or the running mean, cos = dot/(‖c‖‖g‖ + 1e-8)."""

    def __init__(self, params, update, momentum):
        self.params, self.rule, self.m, self.t = list(params), update, momentum, 0
        self.c = torch.zeros(sum(p.numel() for p in self.params), dtype=torch.float64)

    def update(self, grads):
        g = flat(grads, self.params)
        if self.rule == "momentum":
            self.c = self.m * self.c + (1 - self.m) * g
        else:
            self.c = self.c * self.t / (self.t + 1) + g / (self.t + 1)
        self.t += 1

    def stats(self, grads):
        g = flat(grads, self.params)
        return torch.stack([self.c @ g, self.c @ self.c, g @ g])

    def cosine(self, grads):
        g = flat(grads, self.params)
        return float((self.c @ g) / (self.c.norm() * g.norm() + 1e-8))


class AllocationRecorder(TorchDispatchMode):
    """Records, for every aten op run inside it, the numel of each freshly allocated tensor output (outputs
    that share storage with an input, i.e. views and in-place results, are not allocations) and keeps a live
    byte count of them (decremented when the output is freed) to find the peak of what stays alive."""

    def __init__(self):
        super().__init__()
        self.largest = 0  # the biggest single allocated output (elements)
        self.largest_op_total = 0  # the most elements one op allocated over all its outputs (foreach ops)
        self.live = self.peak = 0  # bytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {
            t.untyped_storage().data_ptr()
            for t in tree_flatten((args, kwargs))[0]
            if isinstance(t, torch.Tensor)
        }
        fresh = [
            t
            for t in tree_flatten(out)[0]
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in inputs
        ]
        self.largest = max([self.largest] + [t.numel() for t in fresh])
        self.largest_op_total = max(self.largest_op_total, sum(t.numel() for t in fresh))
        for t in fresh:
            nbytes = t.untyped_storage().nbytes()
            self.live += nbytes
            weakref.finalize(t, self._free, nbytes)
        self.peak = max(self.peak, self.live)
        return out

    def _free(self, nbytes):
        self.live -= nbytes


@pytest.fixture(scope="module", autouse=True)
def single_thread():
    """Tiny tensors: OpenMP threads only add barrier waits (100× slower on a busy 2-core machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return TinyNet()


# ------------------------------------------------------------------------------- equality with the naive


@pytest.mark.parametrize(("update", "momentum"), [("momentum", 0.1), ("momentum", 0.9), ("average", 0.1)])
def test_matches_naive_flat_implementation(model, update, momentum):
    params = list(model.parameters())
    cache, naive = GradCache(params, update=update, momentum=momentum), NaiveCache(params, update, momentum)
    fixed, fixed_naive = Threshold(tau=-0.05), Threshold(tau=-0.05)
    dyn, dyn_naive = Threshold(dynamic=True, accept_rate=0.5), Threshold(dynamic=True, accept_rate=0.5)
    scores = []
    for it in range(6):
        ref = real_grads(model, seed=100 + it)
        assert ref[-1] is None and ref[-2] is None  # the unused head: the None path is exercised
        cache.update(ref)
        naive.update(ref)
        # Elementwise, fp32 rounding of a sum of terms is relative to the terms, not to a cancelled result.
        torch.testing.assert_close(
            flat(cache.cache, params), naive.c, rtol=1e-6, atol=1e-6 * naive.c.abs().max()
        )
        for k, cand in enumerate([real_grads(model, seed=200 + it, label_shift=s) for s in (0, 2)]):
            stats = cache.dot_and_norms(cand)
            assert stats.dtype == torch.float64 and stats.shape == (3,)
            torch.testing.assert_close(stats, naive.stats(cand), rtol=1e-6, atol=1e-12)
            s, s_naive = contribution(stats), naive.cosine(cand)
            assert s == pytest.approx(s_naive, rel=1e-6, abs=1e-9)
            assert contribution(stats, normalize=False) == pytest.approx(
                float(naive.stats(cand)[0]), rel=1e-6
            )
            assert fixed.decide(s, it) == (fixed_naive.decide(s_naive, it)[0], -0.05)
            assert dyn.decide(s, 2 * it + k)[0] == dyn_naive.decide(s_naive, 2 * it + k)[0]
            scores.append(s)
    assert cache.num_updates == 6
    # The stream had both signs, so the decisions compared above were not all the same.
    assert min(scores) < -0.05 < max(scores)


def test_cpu_chunked_dot_matches_float64_on_long_tensors():
    """Tensors longer than the CPU chunk: the fp32 partials per chunk keep ~1e-7 relative where one fp32 BLAS
    dot over the whole tensor drifts by ~1e-6..1e-5."""
    gen = torch.Generator().manual_seed(0)
    params = [torch.empty(16 * CPU_DOT_CHUNK + 17), torch.empty(5, 7)]
    g = [torch.randn(p.shape, generator=gen) + 0.5 for p in params]
    cand = [torch.randn(p.shape, generator=gen) + 0.5 for p in params]
    cache = GradCache(params, momentum=0.0)
    cache.update(g)
    exact = torch.stack(
        [
            flat(g, params) @ flat(cand, params),
            flat(g, params) @ flat(g, params),
            flat(cand, params).square().sum(),
        ]
    )
    torch.testing.assert_close(cache.dot_and_norms(cand), exact, rtol=2e-7, atol=0)


def test_none_gradient_is_zeros(model):
    params = list(model.parameters())
    grads = real_grads(model, seed=1)
    zeros = [torch.zeros_like(p) if g is None else g for g, p in zip(grads, params)]
    a, b = GradCache(params), GradCache(params)
    a.update([torch.ones_like(p) for p in params])  # a non-zero cache where the gradients are missing
    b.update([torch.ones_like(p) for p in params])
    a.update(grads)
    b.update(zeros)
    for x, y in zip(a.cache, b.cache):
        torch.testing.assert_close(x, y, rtol=1e-6, atol=0)  # c·(1 - w) vs lerp(c, 0, w): an ulp apart
    assert a.cache[-1].abs().max() == pytest.approx(0.09)  # 0.9 (first update), then decayed by m = 0.1
    torch.testing.assert_close(a.dot_and_norms(grads), b.dot_and_norms(zeros), rtol=1e-6, atol=0)


def test_momentum_and_average_formulas_by_hand():
    p = [torch.empty(2)]
    mom = GradCache(p, update="momentum", momentum=0.1)
    avg = GradCache(p, update="average")
    for g in ([1.0, 2.0], [3.0, -2.0], [5.0, 0.0]):
        mom.update([torch.tensor(g)])
        avg.update([torch.tensor(g)])
    # momentum: 0.9·g1 -> 0.1·0.9·g1 + 0.9·g2 -> ... (m = 0.1 on the OLD cache)
    c = torch.zeros(2, dtype=torch.float64)
    for g in ([1.0, 2.0], [3.0, -2.0], [5.0, 0.0]):
        c = 0.1 * c + 0.9 * torch.tensor(g, dtype=torch.float64)
    torch.testing.assert_close(mom.cache[0].double(), c)
    torch.testing.assert_close(avg.cache[0], torch.tensor([3.0, 0.0]))  # the plain mean
    assert mom.num_updates == avg.num_updates == 3


def test_contribution_of_empty_candidate_and_eps():
    cache = GradCache([torch.empty(3)])
    cache.update([torch.tensor([1.0, 0.0, 0.0])])
    # Nothing pasted: g = 0, cosine 0 (official: "accepted", harmless, bsgal.md §8.11).
    stats = cache.dot_and_norms([None])
    assert stats.tolist() == [0.0, pytest.approx(0.81), 0.0]
    assert contribution(stats) == 0.0
    assert Threshold(tau=-0.05).decide(contribution(stats), 0)[0]
    # eps enters the denominator as the official: dot / (|c||g| + eps).
    s = torch.tensor([1.0, 4.0, 1.0], dtype=torch.float64)
    assert contribution(s, eps=1.0) == pytest.approx(1.0 / 3.0)
    assert contribution(s, normalize=False) == 1.0


# --------------------------------------------------------------------------------------------- bf16 cache


def test_bf16_cache_close_to_fp32(model):
    """bf16 rounds each cached value to 8 significant bits (2^-9 relative); the cosine over a few thousand
    values moves by far less: within 2e-3 absolute of the fp32 cache's (measured: 1.6e-4 at most here)."""
    params = list(model.parameters())
    f32, bf16 = GradCache(params), GradCache(params, dtype=torch.bfloat16)
    assert bf16.nbytes * 2 == f32.nbytes and bf16.numel == f32.numel
    tau = -0.05
    for it in range(4):
        ref = real_grads(model, seed=300 + it)
        f32.update(ref)
        bf16.update(ref)
        assert all(c.dtype == torch.bfloat16 for c in bf16.cache)
        for cand in (ref, [None if g is None else -g for g in ref], real_grads(model, seed=400 + it)):
            s32, s16 = contribution(f32.dot_and_norms(cand)), contribution(bf16.dot_and_norms(cand))
            assert abs(s32 - s16) < 2e-3
            if abs(s32 - tau) > 0.02:  # clear-cut: the same decision
                assert (s16 >= tau) == (s32 >= tau)
        # The candidate equal to the reference itself is clearly accepted, its negation clearly rejected.
        assert contribution(bf16.dot_and_norms(ref)) > 0.5
        assert contribution(bf16.dot_and_norms([None if g is None else -g for g in ref])) < -0.5


# ------------------------------------------------------------------------------------------------ memory


def _big_params(device="cpu"):
    """Several parameters, the largest 40000 values of ~100k in all (a flat vector would be 2.5× it)."""
    shapes = [(200, 200), (100, 300), (16, 8, 3, 3), (30000,), (64,), (7,)]
    return [torch.zeros(s, device=device) for s in shapes]


def _record(cache, grads_seq):
    with AllocationRecorder() as rec:
        for grads in grads_seq:
            cache.update(grads)
            cache.dot_and_norms(grads)
    return rec


@pytest.mark.parametrize(
    "kind", ["fp32", "bf16", "fp32-cpu-device", "fp64-cache-fp32-grads", "channels-last-grad"]
)
def test_no_p_sized_intermediate(kind):
    """Every op of update/dot_and_norms allocates at most one parameter's worth of elements (over all of its
    outputs, which catches foreach ops too), and what is alive at once stays under one parameter's cast:
    the extra memory is the cache alone."""
    params = _big_params()
    largest = max(p.numel() for p in params)
    dtype = {"bf16": torch.bfloat16, "fp64-cache-fp32-grads": torch.float64}.get(kind, torch.float32)
    cache = GradCache(params, dtype=dtype, device="cpu" if kind == "fp32-cpu-device" else None)
    gen = torch.Generator().manual_seed(0)
    grads_seq = [[torch.randn(p.shape, generator=gen) for p in params] for _ in range(2)]
    grads_seq[1][4] = None
    if kind == "channels-last-grad":
        grads_seq[0][2] = grads_seq[0][2].contiguous(memory_format=torch.channels_last)
    rec = _record(cache, grads_seq)
    assert rec.largest <= largest
    assert rec.largest_op_total <= largest
    if kind in ("fp32", "fp32-cpu-device"):
        assert rec.peak <= 64 * 1024  # only scalars: no tensor-sized temporary at all
    else:  # one cast alive at a time, in the working dtype (fp32; fp64 for an fp64 cache)
        work_itemsize = 8 if dtype == torch.float64 else 4
        assert rec.peak <= largest * work_itemsize + 64 * 1024
    assert cache.nbytes == sum(p.numel() for p in params) * cache.cache[0].element_size()


def test_recorder_catches_p_sized_temporaries():
    """The memory test can fail: a flat vector, and ``_foreach_mul(cache, grads)``, are both caught."""
    params = _big_params()
    largest = max(p.numel() for p in params)
    grads = [torch.ones_like(p) for p in params]
    with AllocationRecorder() as rec:
        torch.cat([g.view(-1) for g in grads])
    assert rec.largest > largest
    with AllocationRecorder() as rec:
        products = torch._foreach_mul(params, grads)
    assert rec.largest <= largest < rec.largest_op_total and rec.peak >= 4 * sum(p.numel() for p in params)
    del products


@needs_cuda
@pytest.mark.parametrize("kind", ["fp32", "bf16", "offload"])
def test_cuda_peak_memory_is_the_cache(kind):
    device = torch.device("cuda")
    params = [torch.zeros(s, device=device) for s in [(1024, 1024)] * 8 + [(4096,), (3, 3)]]
    largest_bytes = 1024 * 1024 * 4
    cache = GradCache(
        params,
        dtype=torch.bfloat16 if kind == "bf16" else torch.float32,
        device="cpu" if kind == "offload" else None,
    )
    if kind == "offload":
        assert all(c.device.type == "cpu" and c.is_pinned() for c in cache.cache)
    grads = [torch.randn_like(p) for p in params]
    cache.update(grads)
    cache.dot_and_norms(grads)  # warm up kernels and cuBLAS workspaces
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    for _ in range(3):
        cache.update(grads)
        cache.dot_and_norms(grads)
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - before
    budget = 1 << 20 if kind == "fp32" else 2 * largest_bytes + (1 << 20)
    assert extra <= budget, (
        f"{kind}: {extra} extra bytes, budget {budget} (a flat vector is {8 * largest_bytes})"
    )


# ----------------------------------------------------------------------------------------- offloaded cache


def test_offloaded_cache_with_cpu_params(model):
    params = list(model.parameters())
    on, off = GradCache(params), GradCache(params, device="cpu")
    assert all(c.device.type == "cpu" and not c.is_pinned() for c in off.cache)
    for it in range(3):
        ref = real_grads(model, seed=500 + it)
        on.update(ref)
        off.update(ref)
        cand = real_grads(model, seed=600 + it)
        assert torch.equal(on.dot_and_norms(cand), off.dot_and_norms(cand))


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_offloaded_cache_with_cuda_params(model, dtype):
    params = list(model.parameters())
    naive = NaiveCache(params, "momentum", 0.1)
    gpu_params = [p.detach().cuda() for p in params]
    off = GradCache(gpu_params, device="cpu", dtype=dtype)
    assert all(c.device.type == "cpu" and c.is_pinned() and c.dtype == dtype for c in off.cache)
    tol = 1e-6 if dtype == torch.float32 else 1e-2
    for it in range(3):
        ref = real_grads(model, seed=700 + it)
        naive.update(ref)
        off.update([None if g is None else g.cuda() for g in ref])
        cand = real_grads(model, seed=800 + it)
        stats = off.dot_and_norms([None if g is None else g.cuda() for g in cand])
        assert stats.device.type == "cuda"
        assert contribution(stats) == pytest.approx(naive.cosine(cand), abs=tol)


@needs_cuda
def test_cuda_fused_matches_naive(model):
    params = list(model.parameters())
    naive = NaiveCache(params, "average", 0.1)
    cache = GradCache([p.detach().cuda() for p in params], update="average")
    for it in range(3):
        ref = real_grads(model, seed=900 + it)
        naive.update(ref)
        cache.update([None if g is None else g.cuda() for g in ref])
        cand = real_grads(model, seed=950 + it)
        stats = cache.dot_and_norms([None if g is None else g.cuda() for g in cand])
        torch.testing.assert_close(stats.cpu(), naive.stats(cand), rtol=1e-6, atol=1e-12)


# -------------------------------------------------------------------------------------------- checkpoints


def test_grad_cache_state_dict_round_trip(model, tmp_path):
    params = list(model.parameters())
    a = GradCache(params, update="average")
    for it in range(3):
        a.update(real_grads(model, seed=it))
    torch.save(a.state_dict(), tmp_path / "cache.pt")
    b = GradCache(params, update="average")
    b.load_state_dict(torch.load(tmp_path / "cache.pt"))
    assert b.num_updates == 3
    for it in range(3, 5):  # the next updates use t = 3, 4 in both: bit-identical
        g = real_grads(model, seed=it)
        a.update(g)
        b.update(g)
        assert torch.equal(a.dot_and_norms(g), b.dot_and_norms(g))
    for x, y in zip(a.cache, b.cache):
        assert torch.equal(x, y)

    # Across dtypes: an fp32 state loaded into a bf16 cache is cast.
    c = GradCache(params, dtype=torch.bfloat16)
    assert c.dot_and_norms([None] * len(params))[1] == 0  # memoises ‖c‖² = 0 before the load
    c.load_state_dict(a.state_dict())
    for x, y in zip(a.cache, c.cache):
        assert y.dtype == torch.bfloat16 and torch.equal(x.bfloat16(), y)
    # The memoised ‖c‖² is not carried over from before the load.
    torch.testing.assert_close(c.dot_and_norms([None] * len(params))[1], flat(c.cache, params).square().sum())


def test_grad_cache_load_errors(model):
    params = list(model.parameters())
    cache = GradCache(params)
    state = GradCache(params).state_dict()
    state["cache"][1] = torch.zeros(3, 4)
    with pytest.raises(ValueError, match=r"parameter 1 has shape \(3, 4\) in the state, expected \(8,\)"):
        cache.load_state_dict(state)
    with pytest.raises(ValueError, match="state has 2 tensors, expected 8"):
        cache.load_state_dict({"cache": state["cache"][:2], "num_updates": 0})


def test_gradient_count_and_shape_errors(model):
    params = list(model.parameters())
    cache = GradCache(params)
    with pytest.raises(ValueError, match="7 gradients, expected 8"):
        cache.update([None] * 7)
    bad = [None] * 8
    bad[2] = torch.zeros(5)
    with pytest.raises(ValueError, match=r"gradient 2 has shape \(5,\), expected \(16, 8, 3, 3\)"):
        cache.dot_and_norms(bad)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"update": "MOMENTUM0.1"}, r"update = 'MOMENTUM0.1', expected one of \('momentum', 'average'\)"),
        ({"momentum": 1.0}, r"momentum = 1.0, expected 0 <= momentum < 1"),
        ({"momentum": -0.1}, r"momentum = -0.1, expected 0 <= momentum < 1"),
        ({"dtype": torch.int32}, "expected a floating dtype"),
    ],
)
def test_grad_cache_validation(kwargs, message):
    with pytest.raises(ValueError, match=message):
        GradCache([torch.empty(2)], **kwargs)


# ------------------------------------------------------------------------------------------------ threshold


def test_fixed_threshold_accepts_at_equality():
    th = Threshold(tau=-0.05)
    assert th.decide(-0.05, 0) == (True, -0.05)  # reject iff tau > s: equality passes
    assert th.decide(-0.0500001, 1) == (False, -0.05)
    assert th.decide(0.3, 2) == (True, -0.05)
    assert th.decide(-0.01, 3) == (True, -0.05)  # mildly negative alignment passes (bsgal.md §1.2 step 4)


def test_dynamic_threshold_by_hand():
    th = Threshold(dynamic=True, accept_rate=0.5, queue_size=4)
    assert th.decide(-0.1, 0) == (False, 0.0)  # empty queue: threshold 0
    assert th.decide(0.2, 1) == (True, -0.1)  # percentile of [-0.1] only: before the push
    accept, thr = th.decide(0.05, 2)  # median of [-0.1, 0.2] = 0.05: accepted at equality
    assert accept and thr == pytest.approx(0.05)
    accept, thr = th.decide(0.0, 3)  # median of [-0.1, 0.2, 0.05]
    assert not accept and thr == pytest.approx(0.05)
    # The queue holds the last 4: [-0.1, 0.2, 0.05, 0.0] -> [0.2, 0.05, 0.0, 1.0] after the next push.
    assert th.decide(1.0, 4)[1] == pytest.approx(0.025)
    assert list(th.queue) == [0.2, 0.05, 0.0, 1.0]
    # r = 0.25: the 75th percentile (linear interpolation) of [1, 2, 3, 4] is 3.25.
    q = Threshold(dynamic=True, accept_rate=0.25)
    for s in (1.0, 2.0, 3.0, 4.0):
        q.decide(s, 0)
    assert q.decide(3.25, 0) == (True, pytest.approx(3.25))
    assert q.decide(3.2, 0)[0] is False


def test_linear_accept_rate_schedule():
    th = Threshold(dynamic=True, accept_rate=0.2, accept_rate_end=0.8, max_iter=100)
    assert [th.accept_rate_at(i) for i in (-5, 0, 25, 50, 100, 150)] == pytest.approx(
        [0.2, 0.2, 0.35, 0.5, 0.8, 0.8]
    )
    assert Threshold(accept_rate=0.3).accept_rate_at(10**6) == 0.3
    for s in range(101):
        th.queue.append(s / 100)
    # r at the decision's iteration picks the percentile: (1 - 0.5)·100 at it 50, (1 - 0.8)·100 at it 100.
    assert th.threshold(50) == pytest.approx(0.5)
    assert th.threshold(100) == pytest.approx(0.2)
    assert th.decide(0.3, 100) == (True, pytest.approx(0.2))
    assert th.decide(0.3, 0)[0] is False  # r = 0.2: threshold 0.8


@pytest.mark.parametrize("rate", [0.1, 0.5, 0.8])
def test_dynamic_threshold_tracks_the_acceptance_rate(rate):
    rng = np.random.default_rng(0)
    th = Threshold(dynamic=True, accept_rate=rate)
    accepted = [th.decide(s, i)[0] for i, s in enumerate(rng.normal(0.1, 0.3, 5000))]
    assert abs(np.mean(accepted) - rate) < 0.03


def test_linear_schedule_tracks_the_rate_over_time():
    rng = np.random.default_rng(1)
    th = Threshold(dynamic=True, accept_rate=0.2, accept_rate_end=0.8, max_iter=6000)
    accepted = np.array([th.decide(s, i)[0] for i, s in enumerate(rng.normal(0.0, 1.0, 6000))])
    assert abs(accepted[1000:2000].mean() - 0.35) < 0.05  # r from 0.233 to 0.467, mean 0.35
    assert abs(accepted[5000:].mean() - 0.75) < 0.05


def test_threshold_state_dict_round_trip():
    rng = np.random.default_rng(2)
    scores = rng.normal(0.0, 0.2, 1700)
    a = Threshold(dynamic=True, accept_rate=0.4, accept_rate_end=0.6, max_iter=2000)
    for i, s in enumerate(scores[:1500]):
        a.decide(s, i)
    b = Threshold(dynamic=True, accept_rate=0.4, accept_rate_end=0.6, max_iter=2000)
    b.load_state_dict(a.state_dict())
    assert len(b.queue) == 1000
    for i, s in enumerate(scores[1500:], start=1500):
        assert a.decide(s, i) == b.decide(s, i)
    # A state longer than the queue keeps its newest scores.
    c = Threshold(dynamic=True, queue_size=3)
    c.load_state_dict({"queue": [1.0, 2.0, 3.0, 4.0]})
    assert list(c.queue) == [2.0, 3.0, 4.0]


def test_non_finite_score_rejected_and_not_queued():
    th = Threshold(dynamic=True)
    th.decide(0.5, 0)
    assert th.decide(math.nan, 1) == (False, 0.5)
    assert th.decide(math.inf, 2)[0] is False
    assert list(th.queue) == [0.5]
    assert Threshold(tau=-0.05).decide(math.nan, 0)[0] is False


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"accept_rate": 0.0}, r"accept_rate = 0.0, expected 0 < accept_rate <= 1"),
        ({"accept_rate": 1.5}, r"accept_rate = 1.5, expected 0 < accept_rate <= 1"),
        ({"accept_rate_end": -0.2}, r"accept_rate_end = -0.2, expected 0 < accept_rate_end <= 1"),
        ({"queue_size": 0}, r"queue_size = 0, expected >= 1"),
        ({"max_iter": 0}, r"max_iter = 0, expected >= 1"),
    ],
)
def test_threshold_validation(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Threshold(**kwargs)
