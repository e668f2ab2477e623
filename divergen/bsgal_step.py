"""BSGAL's per-iteration selection: accept or reject the pasted batch, then train on it or on the originals.

``Selector.select`` replaces the plain forward of a training iteration (the engine still runs the backward,
clipping, AdamW and EMA on the losses it returns). Per process and iteration, with the pasted batch, the same
crops without the pasted instances (``original``) and one real reference image per training image
(``reference``, chosen by a pasted class: bsgal.md §1.2 step 0):

``estimator = "grad_cache"`` (BSGAL_R50, bsgal.md §1.2, §4):

1. g_ref = ∇ of the reference loss (cls loss of the 3 stages on the reference images, GT boxes as the only
   RoIs, no federated sampling); the cache c <- m·c + (1 - m)·g_ref (``divergen.bsgal.GradCache``).
2. ``torch.manual_seed(seed + iteration)``, forward the pasted batch, and take the candidate gradient:
   ``candidate = "paste"``: g = ∇ Σ_k loss_cls_paste_stage{k} (the classification loss on the RoIs matched to
   pasted instances, one-forward simplification A.7), score s = cos(c, g), accept iff not τ > s (or the dynamic
   threshold, A.5); ``candidate = "compare"``: g_A = ∇ of the full loss on the pasted batch, g_B on the original
   batch, accept iff cos(c, g_A) >= cos(c, g_B).
3. Accepted: train on the pasted batch. Rejected: on the originals.

With ``shared_forward`` (default) the candidate gradient comes from the forward that trains: an accepted
iteration costs one reference pass and one training pass; a rejected one adds the forward on the originals.
``shared_forward = false`` is the official order: a separate scoring forward (backbone in eval mode), then the
training forward, three passes in all. Models without dropout/drop-path (R50, FrozenBN) give the same decisions
both ways; with drop-path (Swin), the shared forward scores in training mode.

``estimator = "lookahead"`` (BSGAL_SwinL, Algorithm 2, bsgal.md §3): one SGD step (``lookahead_lr``) on the pasted
batch, the reference cls loss, weights restored; the same for the original batch; accept iff the reference loss
after the pasted step is lower. No gradient vector is kept: the extra memory is one copy of the weights. The
official Swin config draws the two branches' RoI sampling independently; ``lookahead_paired`` (default) runs both
on the same RNG stream, so that only the data differs.

Distributed (bsgal.md §8.1): ``sync = "local"`` (official) decides on each process's own images from local
gradients; cache and threshold queue are per process (saved per rank). ``sync = "global"`` all-reduces the
reference and candidate gradients (or the lookahead losses), so the cache is the same everywhere and one decision
covers the global batch. Every forward runs on the unwrapped model, outside DDP, and CenterNet normalises its
losses by the process's own positives (``centernet.local_loss_normalization``): processes that decide differently
run different numbers of forward passes, which no collective inside a forward can tolerate. The engine then
averages the training gradient over processes itself (``Selector.all_reduce_gradients``, one collective per
iteration on every process), so the weights never diverge.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
from collections.abc import Sequence
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .bsgal import GradCache, Threshold, contribution
from .centernet import local_loss_normalization
from .config import BSGALConfig

logger = logging.getLogger(__name__)

BUCKET_NUMEL = 1 << 24  # values per gradient all-reduce (64 MB in fp32), as DDP's 25 MB buckets
DECISIONS_DIR = "bsgal"  # under the run's output directory: decisions_rank<r>.jsonl, gallery/
STATE_FILE = "bsgal_rank{rank}.pt"  # in a checkpoint's state/ directory, one per process


def _is_paste_key(key: str) -> bool:
    return "paste" in key


class Selector:
    """The per-process state of BSGAL's selection and its ``select`` step.

    Arguments:
        cfg: the ``[bsgal]`` section.
        model: the unwrapped detector (``CenterNet2``); its trainable parameters are the ones scored.
        max_iter: for the linear acceptance-rate schedule.
        rank, world_size: this process and the number of processes.
        output_dir: the run's directory; decisions go to ``<output_dir>/bsgal/decisions_rank<rank>.jsonl``.
    """

    def __init__(
        self,
        cfg: BSGALConfig,
        model: nn.Module,
        *,
        max_iter: int,
        rank: int,
        world_size: int,
        output_dir: Path,
    ):
        self.cfg, self.rank, self.world_size = cfg, rank, world_size
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.cache = None
        if cfg.estimator == "grad_cache":
            self.cache = GradCache(
                self.params,
                update=cfg.cache_update,
                momentum=cfg.momentum,
                dtype=torch.bfloat16 if cfg.cache_dtype == "bfloat16" else torch.float32,
                device=cfg.cache_device or None,
            )
        self.threshold = Threshold(
            tau=cfg.tau,
            dynamic=cfg.dynamic_threshold,
            accept_rate=cfg.accept_rate,
            accept_rate_end=cfg.accept_rate_end if cfg.accept_rate_end >= 0 else None,
            max_iter=max_iter,
            queue_size=cfg.queue_size,
        )
        self.log_dir = Path(output_dir) / DECISIONS_DIR
        self.log_path = self.log_dir / f"decisions_rank{rank}.jsonl"
        self.window: list[dict] = []  # decisions since the engine last asked for a summary

    # ------------------------------------------------------------------------------------------- the step

    def select(
        self,
        model: nn.Module,
        images: list[Tensor],
        targets: list[dict[str, Tensor]],
        infos: list[dict],
        iteration: int,
    ) -> tuple[dict[str, Tensor], dict]:
        """Decide, and return the training losses of the chosen batch (graph attached) and the decision record.

        Arguments:
            model: the model as prepared by Accelerate (DDP-wrapped when distributed); every forward runs on the
                unwrapped module, and the caller all-reduces the gradients (``all_reduce_gradients``).
            images, targets: the pasted batch (on the device; targets with ``is_pasted``).
            infos: per image ``original`` (the un-pasted crop) and ``reference`` (a real reference sample).
        """
        with local_loss_normalization():
            return self._select(_unwrap(model), images, targets, infos, iteration)

    def _select(self, det, images, targets, infos, iteration) -> tuple[dict[str, Tensor], dict]:
        device = images[0].device

        @functools.cache
        def originals() -> tuple[list[Tensor], list[dict[str, Tensor]]]:
            # Moved to the device only when needed: an accepted only-paste iteration never uses them.
            moved = [_to(i["original"], device) for i in infos]
            return [o["image"] for o in moved], [_target(o) for o in moved]

        num_pasted = int(sum(int(t["is_pasted"].sum()) for t in targets))
        record = {"iteration": iteration + 1, "rank": self.rank, "num_pasted": num_pasted}
        record["pasted_labels"] = sorted(
            {int(x) for t in targets for x in t["labels"][t["is_pasted"]].tolist()}
        )
        record["pool_index"] = [
            int(x) for i in infos for x in i.get("pool_index", torch.zeros(0)).tolist() if x >= 0
        ]
        # Nothing pasted (anywhere, in global mode): nothing to decide (the official scores 0 and keeps it).
        if self._globally(num_pasted) == 0:
            record.update(score=None, threshold=None, accepted=True)
            self._log(record)
            return det(images, targets), record
        refs = [_to(i["reference"], device) for i in infos if i.get("reference") is not None]
        if self.cfg.estimator == "lookahead":
            losses = self._lookahead(det, images, targets, originals, refs, iteration, record)
        elif self.cfg.candidate == "compare":
            losses = self._compare(det, images, targets, originals, refs, iteration, record)
        else:
            losses = self._only_paste(det, images, targets, originals, refs, iteration, record)
        if self.cfg.gallery_period > 0 and (iteration + 1) % self.cfg.gallery_period == 0:
            record["gallery"] = self._save_gallery(images, targets, record)
        self._log(record)
        return losses, record

    def _save_gallery(self, images: list[Tensor], targets: list[dict[str, Tensor]], record: dict) -> str:
        """The pasted batch as one JPEG (real boxes green, pasted red), for the report's gallery."""
        from .paste import draw_samples

        samples = [
            {"image": im.detach().cpu().to(torch.uint8), **{k: v.detach().cpu() for k, v in t.items()}}
            for im, t in zip(images, targets, strict=True)
        ]
        name = f"{record['iteration']:07d}_rank{self.rank}_{'accepted' if record['accepted'] else 'rejected'}.jpg"
        (self.log_dir / "gallery").mkdir(parents=True, exist_ok=True)
        draw_samples(samples, [], columns=len(samples)).save(self.log_dir / "gallery" / name, quality=85)
        return name

    def _update_cache(self, det: nn.Module, refs: list[dict]) -> None:
        """Step 1: the reference gradient into the cache (zero when this process has no reference image)."""
        grads: Sequence[Tensor | None] = [None] * len(self.params)
        if refs:
            losses = det.reference_cls_loss(
                [r["image"] for r in refs], [_target(r) for r in refs], backbone_eval=self.cfg.backbone_eval
            )
            grads = torch.autograd.grad(sum(losses.values()), self.params, allow_unused=True)
        if self.cfg.sync == "global":
            grads = _all_reduce_mean(grads, self.params)
        self.cache.update(grads)

    def _score(self, loss: Tensor, *, retain_graph: bool) -> float:
        """cos(cache, ∇loss) (or the dot product), without a flat gradient vector.

        Local mode streams the gradient: each parameter's gradient is scored as soon as the backward has
        accumulated it, then freed (a post-accumulate hook), so the whole gradient never exists at once; with
        the shared forward's retained graph that keeps the selection's extra memory at the cache. Global mode
        needs the whole gradient to all-reduce it first.
        """
        if self.cfg.sync == "global":
            grads = _all_reduce_mean(
                torch.autograd.grad(loss, self.params, retain_graph=retain_graph, allow_unused=True),
                self.params,
            )
            stats = self.cache.dot_and_norms(grads)
            del grads
            return contribution(stats, normalize=self.cfg.normalize)
        dots, g_sq = [], []

        def scorer(index: int):
            def hook(p: Tensor) -> None:
                dot, sq = self.cache.partial_stats(index, p.grad)
                dots.append(dot)
                g_sq.append(sq)
                p.grad = None

            return hook

        for p in self.params:
            p.grad = None
        handles = [p.register_post_accumulate_grad_hook(scorer(i)) for i, p in enumerate(self.params)]
        try:
            loss.backward(retain_graph=retain_graph, inputs=self.params)
        finally:
            for h in handles:
                h.remove()
        cache_sq = self.cache.dot_and_norms([None] * len(self.params))[1]
        zero = cache_sq.new_zeros(())
        stats = torch.stack([sum(dots, zero), cache_sq, sum(g_sq, zero)])
        return contribution(stats, normalize=self.cfg.normalize)

    def _seed(self, iteration: int) -> None:
        if self.cfg.seed:
            torch.manual_seed(self.cfg.seed + iteration)

    def _only_paste(self, det, images, targets, originals, refs, iteration, record):
        self._update_cache(det, refs)
        self._seed(iteration)
        if self.cfg.shared_forward:
            losses = det(images, targets, paste_cls_loss=True)
        else:  # the official order: a scoring forward of its own, backbone in eval mode
            with _backbone_eval(det, self.cfg.backbone_eval):
                losses = det(images, targets, paste_cls_loss=True)
        paste_loss = sum(v for k, v in losses.items() if _is_paste_key(k))
        score = self._score(paste_loss, retain_graph=self.cfg.shared_forward)
        accept, threshold = self.threshold.decide(score, iteration)
        accept = self._agree(accept)
        record.update(score=score, threshold=threshold, accepted=accept)
        if accept and self.cfg.shared_forward:
            return {k: v for k, v in losses.items() if not _is_paste_key(k)}
        del losses, paste_loss
        return det(images, targets) if accept else det(*originals())

    def _compare(self, det, images, targets, originals, refs, iteration, record):
        self._update_cache(det, refs)
        scores, kept = [], []
        for imgs, tgts in ((images, targets), originals()):
            self._seed(iteration)  # both candidates on the same RoI / federated-class sampling
            if self.cfg.shared_forward:
                losses = det(imgs, tgts)
            else:
                with _backbone_eval(det, self.cfg.backbone_eval):
                    losses = det(imgs, tgts)
            scores.append(self._score(sum(losses.values()), retain_graph=self.cfg.shared_forward))
            kept.append(losses if self.cfg.shared_forward else None)
        accept = self._agree(scores[0] >= scores[1])
        record.update(score=scores[0], threshold=scores[1], accepted=accept)
        if self.cfg.shared_forward:
            return kept[0] if accept else kept[1]
        del kept
        return det(images, targets) if accept else det(*originals())

    def _lookahead(self, det, images, targets, originals, refs, iteration, record):
        """bsgal.md §3: for each branch, one SGD step on it, the reference cls loss, weights restored."""
        snapshot = [p.detach().clone() for p in self.params]
        ref_images, ref_targets = [r["image"] for r in refs], [_target(r) for r in refs]
        ref_losses = []
        for b, (imgs, tgts) in enumerate(((images, targets), originals())):
            if self.cfg.lookahead_paired:
                self._seed(iteration)
            elif self.cfg.seed:  # unpaired, as the official Swin config: each branch its own stream
                torch.manual_seed(self.cfg.seed + iteration + 7919 * b)
            with _backbone_eval(det, self.cfg.backbone_eval):
                losses = det(imgs, tgts)
            grads = torch.autograd.grad(sum(losses.values()), self.params, allow_unused=True)
            del losses
            with torch.no_grad():
                for p, g in zip(self.params, grads, strict=True):
                    if g is not None:
                        p.sub_(g, alpha=self.cfg.lookahead_lr)
                del grads
                if ref_images:
                    ref = det.reference_cls_loss(
                        ref_images, ref_targets, backbone_eval=self.cfg.backbone_eval
                    )
                    ref_losses.append(float(sum(ref.values())))
                else:
                    ref_losses.append(0.0)
                torch._foreach_copy_(self.params, snapshot)
        del snapshot
        loss_paste, loss_orig = ref_losses
        if self.cfg.sync == "global" and dist.is_available() and dist.is_initialized():
            t = torch.tensor([loss_paste, loss_orig], dtype=torch.float64, device=images[0].device)
            dist.all_reduce(t)
            loss_paste, loss_orig = (t / dist.get_world_size()).tolist()
        accept = self._agree(loss_paste < loss_orig)
        record.update(score=loss_orig - loss_paste, threshold=0.0, accepted=accept)
        self._seed(iteration)
        return det(images, targets) if accept else det(*originals())

    def all_reduce_gradients(self) -> None:
        """Average ``.grad`` over processes after the training backward (what DDP would have done): flattened
        in buckets of at most ``BUCKET_NUMEL`` values, one all-reduce each; a parameter without a gradient
        takes part as zeros, so every process issues the same collectives."""
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return
        world = dist.get_world_size()
        for p in self.params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        bucket: list[Tensor] = []
        size = 0
        for i, p in enumerate(self.params):
            bucket.append(p.grad)
            size += p.grad.numel()
            if size >= BUCKET_NUMEL or i == len(self.params) - 1:
                flat = torch.cat([g.reshape(-1) for g in bucket])
                dist.all_reduce(flat)
                flat.div_(world)
                torch._foreach_copy_(
                    bucket,
                    [
                        f.view_as(g)
                        for f, g in zip(flat.split([g.numel() for g in bucket]), bucket, strict=True)
                    ],
                )
                bucket, size = [], 0

    # ------------------------------------------------------------------------------------------- helpers

    def _globally(self, n: int) -> int:
        """``n`` summed over processes in global mode; this process's ``n`` otherwise."""
        if self.cfg.sync != "global" or not (dist.is_available() and dist.is_initialized()):
            return n
        t = torch.tensor([n], dtype=torch.int64, device=self.params[0].device)
        dist.all_reduce(t)
        return int(t.item())

    def _agree(self, accept: bool) -> bool:
        """Global mode: rank 0's decision everywhere (the inputs are identical; this guards against rounding)."""
        accept = bool(accept)
        if self.cfg.sync != "global" or not (dist.is_available() and dist.is_initialized()):
            return accept
        t = torch.tensor([int(accept)], dtype=torch.int64, device=self.params[0].device)
        dist.broadcast(t, src=0)
        return bool(t.item())

    def _log(self, record: dict) -> None:
        self.window.append(record)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "a") as f:
            f.write(json.dumps(record) + "\n")

    def summary(self) -> dict[str, float]:
        """This process's acceptance rate, mean score and last threshold since the last call (for metrics)."""
        scored = [r for r in self.window if r["score"] is not None]
        out = {"bsgal_accept_rate": sum(r["accepted"] for r in scored) / len(scored) if scored else math.nan}
        if scored:
            out["bsgal_score"] = sum(r["score"] for r in scored) / len(scored)
            out["bsgal_threshold"] = scored[-1]["threshold"]
        self.window = []
        return out

    def truncate_log(self, iteration: int) -> None:
        """On resume: drop the decisions after ``iteration`` (the interrupted run's, about to be redone)."""
        if not self.log_path.is_file():
            return
        lines = [
            ln
            for ln in self.log_path.read_text().splitlines()
            if ln and json.loads(ln)["iteration"] <= iteration
        ]
        tmp = self.log_path.with_suffix(".tmp")
        tmp.write_text("".join(ln + "\n" for ln in lines))
        os.replace(tmp, self.log_path)

    # ------------------------------------------------------------------------------------------- state

    def state_dict(self) -> dict:
        return {
            "cache": self.cache.state_dict() if self.cache is not None else None,
            "threshold": self.threshold.state_dict(),
            "world_size": self.world_size,
        }

    def load_state_dict(self, state: dict) -> None:
        if state["world_size"] != self.world_size and self.cfg.sync == "local":
            raise ValueError(
                f"the BSGAL state was saved by {state['world_size']} processes, this run has {self.world_size}: "
                "with bsgal.sync = 'local' each process resumes its own cache and threshold queue"
            )
        if self.cache is not None:
            self.cache.load_state_dict(state["cache"])
        self.threshold.load_state_dict(state["threshold"])

    def save(self, state_dir: Path) -> None:
        """Write this process's state into a checkpoint's ``state/`` directory (every process calls it)."""
        torch.save(self.state_dict(), Path(state_dir) / STATE_FILE.format(rank=self.rank))

    def load(self, state_dir: Path) -> None:
        path = Path(state_dir) / STATE_FILE.format(rank=self.rank)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: the checkpoint has no BSGAL state for process {self.rank}")
        self.load_state_dict(torch.load(path, map_location="cpu", weights_only=False))


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if hasattr(model, "module") else model


def _to(sample: dict, device: torch.device) -> dict:
    return {k: (v.to(device, non_blocking=True) if isinstance(v, Tensor) else v) for k, v in sample.items()}


def _target(sample: dict) -> dict[str, Tensor]:
    return {k: sample[k] for k in ("boxes", "labels", "masks") if k in sample}


@contextmanager
def _backbone_eval(det: nn.Module, enabled: bool):
    """The backbone in eval mode inside (the official scoring forwards: Swin drop-path off), restored after."""
    was = det.backbone.training
    if enabled:
        det.backbone.eval()
    try:
        yield
    finally:
        det.backbone.train(was)


def _all_reduce_mean(grads: Sequence[Tensor | None], params: Sequence[Tensor]) -> list[Tensor]:
    """The mean of each gradient over processes (zeros where a process has none): one collective per tensor."""
    if not (dist.is_available() and dist.is_initialized()):
        return list(grads)
    out = []
    for g, p in zip(grads, params, strict=True):
        g = torch.zeros_like(p) if g is None else g.clone()
        dist.all_reduce(g)
        out.append(g.div_(dist.get_world_size()))
    return out
