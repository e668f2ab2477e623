"""BSGAL contribution estimation: the cached real-data gradient, the fused cosine, the acceptance threshold.

The math (BSGAL §3, appendix A.5; bsgal.md §1, §5):

- The contribution of a generated batch g to the real data R is the drop of the real loss after one SGD step on
  g: φ(g) = L_R(θ) − L_R(θ − α∇ℓ_g(θ)). To first order (BSGAL §3) φ(g) ≈ α·⟨∇L_R(θ), ∇ℓ_g(θ)⟩.
- ∇L_R is not recomputed on all of R: a cached real-data gradient c stands in for it, updated every iteration
  from the gradient g_ref of a small real reference batch (bsgal.md §1.2 step 2), before it is used:
  ``momentum`` c ← m·c + (1 − m)·g_ref, where m is the weight of the OLD cache (official ``MOMENTUM0.1``:
  m = 0.1, so the new gradient gets 0.9 and the cache is essentially the current reference gradient, §8.3);
  ``average`` c ← c·t/(t + 1) + g_ref/(t + 1) after t updates (``AVERAGE``). The cache starts at zero.
- The score (bsgal.md §1.2 step 4, A.5 normalisation, ``ACTIVE_GRAD_NORM``) is the cosine
  s = ⟨c, g⟩ / (‖c‖·‖g‖ + 1e−8), or the raw dot ⟨c, g⟩ when not normalised. A parameter that got no gradient
  (``None``) counts as zeros, as the official flattening fills it.
- The decision: a fixed τ (official ``only_paste_-0.05``: REJECT iff τ > s, i.e. accept s ≥ τ, so mildly
  negative alignment passes), or the dynamic threshold of A.5 / bsgal.md §5: the (1 − r)·100-th percentile of a
  queue of the last 1000 scores, taken BEFORE the current score is pushed (0 while the queue is empty), accept
  iff s ≥ threshold, so r is the preset ACCEPTANCE rate (the official calls it ``filter_rate``); r may go
  linearly from r0 to r1 over the run (``only_paste_dynamic_linear_r0_r1``).

Memory (bsgal.md §1.2 "Cost", §8.7): the official flattens every gradient into a P-vector (77.7 M fp32 for R50,
311 MB each, ~3P in all) and keeps the cache as an ``nn.Embedding`` inside the model. Here the cache is a
plain list of tensors outside the model, one per parameter, and its extra memory is the cache alone:
``update`` and ``dot_and_norms`` never build a P-sized vector nor P-sized temporaries. When cache and gradients
share dtype and device they run in place (``torch._foreach_lerp_``) or as per-parameter reductions (plus
``torch._foreach_norm`` on CUDA) that allocate only scalars; otherwise (a bf16 cache, a cache offloaded to CPU)
they loop over the parameters and cast one tensor at a time, so the largest temporary is one parameter.
Dots are accumulated per parameter in fp32 (cuBLAS reductions; on CPU per 65536-element chunk, as its BLAS
dot drifts over long vectors) and the partial sums added in float64: the score matches a float64 flat
computation to ~1e-7 relative.

``GradCache`` and ``Threshold`` hold per-process state (the official keeps cache, queue and decision per GPU,
bsgal.md §8.1); both have ``state_dict`` / ``load_state_dict`` for an exact resume. The training-step wiring
(which losses, which forwards, seeding) is ``bsgal_step.py``.
"""

from __future__ import annotations

import logging
import math
from collections import deque
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

logger = logging.getLogger(__name__)

UPDATE_RULES = ("momentum", "average")
CPU_DOT_CHUNK = 1 << 16  # elements per fp32 partial dot on CPU (see _dots)


def _flat(t: torch.Tensor) -> torch.Tensor:
    """A 1-D view of ``t`` (a contiguous copy when ``t`` is not contiguous, e.g. a channels-last gradient)."""
    return t.view(-1) if t.is_contiguous() else t.contiguous().view(-1)


def _dots(a: torch.Tensor, b: torch.Tensor) -> list[torch.Tensor]:
    """fp32 partial dot products of two equal 1-D tensors: one on CUDA (cuBLAS reduces by a tree), one per
    ``CPU_DOT_CHUNK`` elements on CPU, whose BLAS dot drifts by ~3e-6 relative over 1M fp32 elements (and
    ``torch.linalg.vector_norm`` by ~2e-5): chunks are views, so nothing is allocated but the scalars."""
    if a.device.type != "cpu" or a.numel() <= CPU_DOT_CHUNK:
        return [torch.dot(a, b)]
    return [torch.dot(x, y) for x, y in zip(a.split(CPU_DOT_CHUNK), b.split(CPU_DOT_CHUNK))]


def _lerp_one(c: torch.Tensor, g: torch.Tensor, w: float) -> bool:
    """c ← c + w·(g − c) in place for one parameter whose cache and gradient differ in dtype or device:
    computed in the wider of the two dtypes (at least fp32) on the gradient's device, rounded once into c.
    Returns whether a non-blocking copy into (pinned) host memory is still in flight."""
    work_dtype = torch.promote_types(torch.promote_types(c.dtype, g.dtype), torch.float32)
    g_work = g if g.dtype == work_dtype else g.to(work_dtype)
    if c.device == g.device and c.dtype == work_dtype:
        c.lerp_(g_work, w)
        return False
    work = c.to(device=g.device, dtype=work_dtype, non_blocking=True)
    work.lerp_(g_work, w)
    c.copy_(work, non_blocking=True)  # freeing work on return is safe: the allocator orders it after the copy
    return c.device.type == "cpu" and g.device.type == "cuda"


def _partials(
    c: torch.Tensor, g: torch.Tensor | None, *, with_cache: bool
) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
    """The partial sums of ⟨c, g⟩, ‖g‖² and (if ``with_cache``) ‖c‖² for one parameter, in the wider dtype (at
    least fp32) on the gradient's device; ‖c‖² alone where c lives when g is None (host memory if offloaded)."""
    work_dtype = torch.promote_types(c.dtype, torch.float32)
    if g is None:
        if not with_cache:
            return [], [], []
        c_work = _flat(c if c.dtype == work_dtype else c.to(work_dtype))
        return [], [], _dots(c_work, c_work)
    work_dtype = torch.promote_types(work_dtype, g.dtype)
    c_work = _flat(c.to(device=g.device, dtype=work_dtype, non_blocking=True))  # no-op when already so
    g_work = _flat(g if g.dtype == work_dtype else g.to(work_dtype))
    return _dots(c_work, g_work), _dots(g_work, g_work), _dots(c_work, c_work) if with_cache else []


def _shape(t: torch.Tensor | torch.Size) -> tuple[int, ...]:
    return tuple(t.shape if isinstance(t, torch.Tensor) else t)


class GradCache:
    """The cached real-data gradient c (bsgal.md §1.2 step 2), one tensor per parameter (never a flat P-vector).

    ``update`` "momentum": c ← m·c + (1 − m)·g (m = the weight of the OLD cache; official ``MOMENTUM0.1`` →
    m = 0.1); "average": c ← c·t/(t + 1) + g/(t + 1) (t = updates so far). Both are the interpolation
    c ← c + w·(g − c) with w = 1 − m or 1/(t + 1), done in place by one ``lerp_`` pass. Starts at zero.

    Extra memory: the cache alone, P values of ``dtype`` (``nbytes``). ``update`` and ``dot_and_norms``
    allocate only scalars (a few per parameter) when cache and gradients share dtype and device (fused
    ``_foreach`` kernels on CUDA), else one parameter-sized cast at a time (a bf16 cache, a CPU-offloaded
    cache; two when the gradients are in a lower precision than the cache).

    Arguments:
        params: the parameters scored, in a fixed order (the official: every ``requires_grad`` parameter in
            ``named_parameters()`` order except ``backbone.bottom_up.base.fc``, bsgal.md §1.2 step 1). Only
            their shapes, devices and dtypes are read; no reference is kept.
        update: "momentum" (official R50) or "average" (the official default rule).
        momentum: m in [0, 1), the weight of the old cache in the "momentum" rule.
        dtype: the cache's floating dtype: float32 (official) or bfloat16 (half the memory, ~3 significant
            digits per value; the cosine moved by < 2e-4 on real gradients of a small net, tested < 2e-3).
        device: None = each parameter's own device; "cpu" = offloaded to host memory (the Swin-L memory
            option; pinned when a parameter is on CUDA, so the per-tensor transfers are asynchronous).
    """

    def __init__(
        self,
        params: Sequence[torch.Tensor],
        *,
        update: str = "momentum",
        momentum: float = 0.1,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ):
        if update not in UPDATE_RULES:
            raise ValueError(f"GradCache: update = {update!r}, expected one of {UPDATE_RULES}")
        if not 0.0 <= momentum < 1.0:
            raise ValueError(
                f"GradCache: momentum = {momentum}, expected 0 <= momentum < 1 (weight of the old cache)"
            )
        if not dtype.is_floating_point:
            raise ValueError(f"GradCache: dtype = {dtype}, expected a floating dtype (float32 or bfloat16)")
        params = list(params)
        if not params:
            raise ValueError("GradCache: no parameters given")
        self.update_rule = update
        self.momentum = float(momentum)
        self.dtype = dtype
        target = None if device is None else torch.device(device)
        pin = target is not None and target.type == "cpu" and any(p.device.type == "cuda" for p in params)
        self.cache: list[torch.Tensor] = [
            torch.zeros(p.shape, dtype=dtype, device=target or p.device, pin_memory=pin) for p in params
        ]
        self.num_updates = 0
        self.numel = sum(c.numel() for c in self.cache)
        self.nbytes = sum(c.numel() * c.element_size() for c in self.cache)
        self._cache_sq: torch.Tensor | None = None  # ‖c‖², float64, memoised until the next update
        # CUDA devices that may still be reading the pinned host cache (non-blocking copies of dot_and_norms):
        # waited for before the host cache is next written.
        self._reading: set[torch.device] = set()
        logger.info(
            "GradCache: %d tensors, %d values, %.1f MB %s on %s, %s update (m = %g)",
            len(self.cache),
            self.numel,
            self.nbytes / 2**20,
            str(dtype).removeprefix("torch."),
            "the parameters' devices" if target is None else target,
            update,
            self.momentum,
        )

    # ------------------------------------------------------------------------------------------------ checks

    def _check(self, grads: Sequence[torch.Tensor | None], where: str) -> list[torch.Tensor | None]:
        grads = list(grads)
        if len(grads) != len(self.cache):
            raise ValueError(
                f"GradCache.{where}: {len(grads)} gradients, expected {len(self.cache)} (one per parameter)"
            )
        for i, (c, g) in enumerate(zip(self.cache, grads)):
            if g is not None and g.shape != c.shape:
                raise ValueError(
                    f"GradCache.{where}: gradient {i} has shape {_shape(g)}, expected {_shape(c)}"
                )
            if g is not None and (g.layout != torch.strided or not g.is_floating_point()):
                raise ValueError(
                    f"GradCache.{where}: gradient {i} must be a dense floating tensor, got {g.layout} {g.dtype}"
                )
        return grads

    def _fused(self, grads: list[torch.Tensor | None]) -> bool:
        """Whether every (cache, gradient) pair shares device and dtype, and that dtype is at least fp32 (so
        ``_foreach_norm`` returns fp32 partials), i.e. whether the fused ``_foreach`` path applies."""
        return all(
            g is None
            or (g.device == c.device and g.dtype == c.dtype and c.dtype in (torch.float32, torch.float64))
            for c, g in zip(self.cache, grads)
        )

    def _wait_for_readers(self) -> None:
        for dev in self._reading:
            torch.cuda.current_stream(dev).synchronize()
        self._reading.clear()

    # ------------------------------------------------------------------------------------------------ update

    @torch.no_grad()
    def update(self, grads: Sequence[torch.Tensor | None]) -> None:
        """c ← c + w·(g − c) in place, w = 1 − m ("momentum") or 1/(t + 1) ("average") (bsgal.md §1.2 step 2).

        Arguments:
            grads: one per parameter, the shape of its cache tensor, any floating dtype, on any device; None =
                that parameter got no gradient (counts as zeros: its cache entry decays by 1 − w).
        """
        grads = self._check(grads, "update")
        self._wait_for_readers()
        t = self.num_updates
        w = 1.0 - self.momentum if self.update_rule == "momentum" else 1.0 / (t + 1)
        missing = [c for c, g in zip(self.cache, grads) if g is None]
        if missing:
            torch._foreach_mul_(missing, 1.0 - w)
        pairs = [(c, g) for c, g in zip(self.cache, grads) if g is not None]
        if pairs and self._fused(grads):
            torch._foreach_lerp_([c for c, _ in pairs], [g for _, g in pairs], w)
        else:
            pending = set()  # CUDA devices with a non-blocking copy back into pinned host memory in flight
            for c, g in pairs:  # one parameter at a time: its casts are freed when _lerp_one returns
                if _lerp_one(c, g, w):
                    pending.add(g.device)
            for dev in pending:
                torch.cuda.current_stream(dev).synchronize()  # host-side c must be final when update returns
        self.num_updates += 1
        self._cache_sq = None

    # --------------------------------------------------------------------------------------------- scoring

    @torch.no_grad()
    def dot_and_norms(self, grads: Sequence[torch.Tensor | None]) -> torch.Tensor:
        """⟨c, g⟩, ‖c‖², ‖g‖² over all parameters, without flattening (bsgal.md §1.2 step 4).

        Arguments:
            grads: as in ``update``; None = zeros.

        Returns:
            ``(3,)`` float64 ``[⟨c, g⟩, ‖c‖², ‖g‖²]``, on the device of the first gradient (the cache's when
            every gradient is None), not synchronised: ``contribution`` turns it into the score, and a
            distributed caller may all-reduce it first. Per-parameter fp32 partials, summed in float64.
        """
        grads = self._check(grads, "dot_and_norms")
        present = [(c, g) for c, g in zip(self.cache, grads) if g is not None]
        out_device = present[0][1].device if present else self.cache[0].device
        zero = torch.zeros((), dtype=torch.float64, device=out_device)

        def total(parts: list[torch.Tensor], *, square: bool = False) -> torch.Tensor:
            """Σ parts (Σ parts² if ``square``) in float64: one stack, one cast, one sum."""
            if not parts:
                return zero
            stacked = torch.stack([p.to(out_device) for p in parts]).to(torch.float64)
            return (stacked.square() if square else stacked).sum()

        cache_sq = None if self._cache_sq is None else self._cache_sq.to(out_device)
        if self._fused(grads) and out_device.type == "cuda":
            # Fused: one dot kernel per parameter, one multi-tensor norm kernel per list.
            dots = [torch.dot(c.view(-1), _flat(g)) for c, g in present]
            g_sq = total(torch._foreach_norm([g for _, g in present]), square=True) if present else zero
            if cache_sq is None:
                cache_sq = total(torch._foreach_norm(self.cache), square=True)
        else:
            dots, g_parts, c_parts = [], [], []
            for c, g in zip(self.cache, grads):  # one parameter at a time: its casts die with _partials
                d, gg, cc = _partials(c, g, with_cache=cache_sq is None)
                dots += d
                g_parts += gg
                c_parts += cc
                if g is not None and c.device.type == "cpu" and g.device.type == "cuda":
                    self._reading.add(g.device)
            g_sq = total(g_parts)
            if cache_sq is None:
                cache_sq = total(c_parts)
        self._cache_sq = cache_sq
        return torch.stack([total(dots), cache_sq, g_sq])

    @torch.no_grad()
    def partial_stats(self, index: int, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(⟨c_i, g⟩, ‖g‖²)`` float64 of parameter ``index`` alone: for scoring a gradient while the backward
        produces it, one parameter at a time, so that the whole gradient never exists at once. Summed over all
        parameters, with ‖c‖² from ``dot_and_norms([None] * n)``, it equals ``dot_and_norms(grads)``."""
        c = self.cache[index]
        if tuple(grad.shape) != tuple(c.shape):
            raise ValueError(f"GradCache.partial_stats: parameter {index} has shape {tuple(c.shape)}, got a "
                             f"gradient of shape {tuple(grad.shape)}")  # fmt: skip
        dots, g_sq, _ = _partials(c, grad, with_cache=False)
        if c.device.type == "cpu" and grad.device.type == "cuda":
            self._reading.add(grad.device)
        return (
            torch.stack(dots).to(torch.float64).sum(),
            torch.stack(g_sq).to(torch.float64).sum(),
        )

    # ------------------------------------------------------------------------------------------ checkpoints

    def state_dict(self) -> dict[str, Any]:
        """``{"cache": [tensor per parameter], "num_updates": t}``. The tensors are the live cache, as
        ``nn.Module.state_dict`` returns its parameters: clone them to keep a snapshot in memory."""
        return {"cache": list(self.cache), "num_updates": self.num_updates}

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore ``state_dict``'s tensors (cast to this cache's dtype and device) and update count; the rule
        and m come from the constructor (the current config)."""
        saved = state["cache"]
        if len(saved) != len(self.cache):
            raise ValueError(
                f"GradCache.load_state_dict: the state has {len(saved)} tensors, expected {len(self.cache)}"
            )
        for i, (c, s) in enumerate(zip(self.cache, saved)):
            if s.shape != c.shape:
                raise ValueError(
                    f"GradCache.load_state_dict: parameter {i} has shape {_shape(s)} in the state, expected {_shape(c)}"
                )
        self._wait_for_readers()
        for c, s in zip(self.cache, saved):
            c.copy_(s)
        self.num_updates = int(state["num_updates"])
        self._cache_sq = None


def contribution(stats: torch.Tensor, *, normalize: bool = True, eps: float = 1e-8) -> float:
    """The score s of a candidate gradient (bsgal.md §1.2 step 4; A.5 normalisation, ``ACTIVE_GRAD_NORM``).

    Arguments:
        stats: ``(3,)`` ``[⟨c, g⟩, ‖c‖², ‖g‖²]`` from ``GradCache.dot_and_norms``.
        normalize: the cosine ⟨c, g⟩ / (‖c‖·‖g‖ + eps) (official) when True, else the raw dot ⟨c, g⟩.
        eps: official 1e-8; an all-zero gradient (nothing pasted) scores 0.

    Returns:
        s as a Python float (a host sync).
    """
    dot, c_sq, g_sq = stats.detach().to(device="cpu", dtype=torch.float64).tolist()
    if not normalize:
        return dot
    return dot / (math.sqrt(max(c_sq, 0.0)) * math.sqrt(max(g_sq, 0.0)) + eps)


class Threshold:
    """Accept or reject a candidate batch from its score (bsgal.md §1.2 step 4, §5; A.5).

    Fixed τ (official ``only_paste_<τ>``): REJECT iff τ > s, i.e. accept s ≥ τ. Dynamic (A.5, official
    ``DynamicThreshold``): a deque(maxlen=queue_size) of past scores; the threshold is
    ``np.percentile(queue, (1 − r)·100)`` (linear interpolation) computed BEFORE the current score is pushed,
    0 while the queue is empty; accept iff s ≥ threshold, so r is the ACCEPTANCE rate; r goes linearly from r0
    to r1 over ``max_iter`` when ``accept_rate_end`` is given (``only_paste_dynamic_linear_r0_r1``) and stays
    at r1 after it. Every finite score is pushed in both modes (the queue is then warm if a run switches). A
    non-finite score (a broken gradient) is rejected and not pushed: the official would accept it under a fixed
    τ (``τ > nan`` is False), and pushing it would make every percentile NaN for the next queue_size steps.

    Arguments:
        tau: the fixed threshold (official R50: −0.05).
        dynamic: use the percentile threshold instead of tau.
        accept_rate: r (or r0), in (0, 1].
        accept_rate_end: r1 in (0, 1], or None for a constant r.
        max_iter: iterations over which r goes from r0 to r1 (``SOLVER.MAX_ITER``), >= 1.
        queue_size: scores kept (official 1000), >= 1.
    """

    def __init__(
        self,
        *,
        tau: float = -0.05,
        dynamic: bool = False,
        accept_rate: float = 0.5,
        accept_rate_end: float | None = None,
        max_iter: int = 1,
        queue_size: int = 1000,
    ):
        for name, rate in (("accept_rate", accept_rate), ("accept_rate_end", accept_rate_end)):
            if rate is not None and not 0.0 < rate <= 1.0:
                raise ValueError(
                    f"Threshold: {name} = {rate}, expected 0 < {name} <= 1 (the acceptance rate)"
                )
        if queue_size < 1:
            raise ValueError(f"Threshold: queue_size = {queue_size}, expected >= 1")
        if max_iter < 1:
            raise ValueError(f"Threshold: max_iter = {max_iter}, expected >= 1")
        self.tau = float(tau)
        self.dynamic = dynamic
        self.accept_rate = float(accept_rate)
        self.accept_rate_end = None if accept_rate_end is None else float(accept_rate_end)
        self.max_iter = int(max_iter)
        self.queue: deque[float] = deque(maxlen=int(queue_size))

    def accept_rate_at(self, iteration: int) -> float:
        """r at ``iteration``: constant, or r0 + (r1 − r0)·iteration/max_iter clamped to [r0, r1]."""
        if self.accept_rate_end is None:
            return self.accept_rate
        frac = min(max(iteration, 0), self.max_iter) / self.max_iter
        return self.accept_rate + (self.accept_rate_end - self.accept_rate) * frac

    def threshold(self, iteration: int) -> float:
        """The threshold the next ``decide`` at ``iteration`` will use (the queue as it is now)."""
        if not self.dynamic:
            return self.tau
        if not self.queue:
            return 0.0
        return float(
            np.percentile(
                np.fromiter(self.queue, dtype=np.float64), (1.0 - self.accept_rate_at(iteration)) * 100.0
            )
        )

    def decide(self, score: float, iteration: int) -> tuple[bool, float]:
        """(accept, the threshold used) for ``score`` at ``iteration``; then pushes the score into the queue."""
        thresh = self.threshold(iteration)
        score = float(score)
        if not math.isfinite(score):
            logger.warning(
                "BSGAL: non-finite contribution %s at iteration %d: batch rejected", score, iteration
            )
            return False, thresh
        self.queue.append(score)
        return not (thresh > score), thresh  # the official test: reject iff threshold > s

    def state_dict(self) -> dict[str, Any]:
        return {"queue": list(self.queue)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the queue (its newest ``queue_size`` scores); τ, r and the schedule come from the config."""
        self.queue.clear()
        self.queue.extend(float(s) for s in state["queue"])


if __name__ == "__main__":  # python -m divergen.bsgal report RUN_DIR
    from .bsgal_report import main

    main()
