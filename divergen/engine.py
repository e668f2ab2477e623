"""The training loop under Accelerate (issue 3; the official optimisation settings are centernet2.md §4).

    from divergen.engine import train
    summary = train(load_config("configs/tiny.toml"), resume=True)

One iteration = one optimizer step over ``train.batch_size`` images: ``grad_accum_steps`` micro-batches of
``batch_size / (world_size · grad_accum_steps)`` images on every process. Per iteration: forward -> loss check
(NaN/Inf on any rank: every rank skips the step) -> backward -> clip by value (after unscaling) -> AdamW ->
EMA -> LR schedule. Every ``log_period`` iterations: losses, lr, timings to TensorBoard and
``<output_dir>/metrics.jsonl``; every ``checkpoint_period`` and at the end a checkpoint (layout in
``divergen/checkpoint.py``); every ``eval_period`` and at the end LVIS AP of the EMA weights.

Exact resume: ``accelerator.save_state`` holds the model, AdamW, the schedule, every process's RNG states and
the EMA and loop counters (registered for checkpointing); the data position is the number of batches drawn
from the loader, identical on every rank, skipped without loading images on resume (the sampler's keys
carry their own augmentation seeds, so the same samples come back with the same augmentation).
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import random
import shutil
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator, skip_first_batches
from accelerate.logging import get_logger
from accelerate.utils import set_seed
from torch import Tensor, nn

from .bsgal_step import Selector
from .checkpoint import EMA_FILE, MODEL_FILE, load_weights, save_weights
from .config import Config, config_to_dict, save_config
from .data import (
    DetectionDataset,
    RepeatFactorSampler,
    build_train_loader,
    load_category_image_counts,
)
from .model import build_model
from .paste import EXTRA_CLASS_IMAGE_COUNT, build_train_dataset

logger = get_logger(__name__)

STATE_DIR = "state"  # accelerator.save_state inside a checkpoint directory
LAST_CHECKPOINT = "last_checkpoint"  # text file in output_dir naming the newest checkpoint directory
METRICS_FILE = "metrics.jsonl"


# ------------------------------------------------------------------------------------------ schedule, optimizer


def warmup_cosine_factor(iteration: int, *, max_iter: int, warmup_iters: int, warmup_factor: float) -> float:
    """The LR multiplier of iteration ``iteration`` (0-based): detectron2 ``WarmupCosineLR`` (centernet2.md §4).

    cos(t) = 0.5 · (1 + cos(π · t / max_iter)), over the full run (warmup included). For t < warmup_iters the
    factor goes linearly from ``warmup_factor`` (= warmup_factor · cos(0)) at t = 0 to cos(warmup_iters):
    (1 − α) · warmup_factor + α · cos(warmup_iters), α = t / warmup_iters (fvcore ``WarmupParamScheduler``
    with a ``LinearParamScheduler`` over ``CosineParamScheduler(1, 0)``).
    """

    def cosine(t: float) -> float:
        return 0.5 * (1.0 + math.cos(math.pi * t / max_iter))

    if iteration < warmup_iters:
        alpha = iteration / warmup_iters
        return (1.0 - alpha) * warmup_factor + alpha * cosine(warmup_iters)
    return cosine(iteration)


def build_optimizer(model: nn.Module, cfg_solver) -> torch.optim.AdamW:
    """AdamW over the trainable parameters, one weight decay for all of them, norms and biases included
    (the official ``USE_CUSTOM_SOLVER`` path, centernet2.md §4); default eps."""
    if cfg_solver.optimizer != "adamw":
        raise ValueError(
            f"solver.optimizer = {cfg_solver.optimizer!r}: only 'adamw' (the official) is implemented"
        )
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.AdamW(
        params, lr=cfg_solver.lr, betas=tuple(cfg_solver.betas), weight_decay=cfg_solver.weight_decay
    )


def build_lr_scheduler(
    optimizer: torch.optim.Optimizer, cfg_solver, max_iter: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """``LambdaLR`` with :func:`warmup_cosine_factor`; stepped once per iteration, so iteration t trains at
    lr · factor(t). A plain closure: LambdaLR does not store it, so a resumed run follows its own config."""
    if cfg_solver.schedule != "cosine":
        raise ValueError(
            f"solver.schedule = {cfg_solver.schedule!r}: only 'cosine' (the official) is implemented"
        )
    if cfg_solver.warmup_iters < 0:
        raise ValueError(f"solver.warmup_iters = {cfg_solver.warmup_iters}: expected >= 0")
    warmup_iters, warmup_factor = cfg_solver.warmup_iters, cfg_solver.warmup_factor

    def factor(t: int) -> float:
        return warmup_cosine_factor(
            t, max_iter=max_iter, warmup_iters=warmup_iters, warmup_factor=warmup_factor
        )

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


# ------------------------------------------------------------------------------------------ EMA, loop state


class ModelEMA:
    """Exponential moving average of a model's weights *and buffers* (the official ``ModelEma``):
    ema ← decay · ema + (1 − decay) · model for floating-point entries; other entries are copied.

    The engine updates it after each optimizer step (as timm's examples do). The official code updates it right
    before the step (centernet2.md §4), so its EMA lags the weights by one step; otherwise the same.

    Arguments:
        model: the (unwrapped) model to track; deep-copied, frozen, in eval mode, on the model's device.
        decay: the EMA decay (0.999 official).
    """

    def __init__(self, model: nn.Module, *, decay: float):
        self.module = copy.deepcopy(model).eval().requires_grad_(False)
        self.decay = decay
        self.num_updates = 0

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """One EMA step towards ``model``'s current state."""
        ema_state, state = self.module.state_dict(), model.state_dict()
        ema_f, model_f = [], []
        for name, e in ema_state.items():
            v = state[name].detach()
            if e.is_floating_point():
                ema_f.append(e)
                model_f.append(v.to(e.dtype))
            else:
                e.copy_(v)
        if ema_f:
            torch._foreach_lerp_(ema_f, model_f, 1.0 - self.decay)  # e + (1 − d)(m − e) = d·e + (1 − d)·m
        self.num_updates += 1

    def state_dict(self) -> dict[str, Any]:
        return {"module": self.module.state_dict(), "decay": self.decay, "num_updates": self.num_updates}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.module.load_state_dict(state["module"])
        self.num_updates = int(state["num_updates"])  # the decay comes from the current config


class TrainState:
    """The loop counters saved with ``accelerator.save_state`` (they are equal on every rank)."""

    def __init__(self):
        self.iteration = 0  # completed iterations (optimizer steps, skipped ones included)
        self.batches_consumed = 0  # batches drawn from this rank's loader (the same number on every rank)
        self.nonfinite_steps = 0  # iterations skipped for a NaN/Inf loss, in total
        self.nonfinite_in_row = 0
        self.skipped_images = 0  # unreadable images before this run segment, summed over ranks

    def state_dict(self) -> dict[str, int]:
        return dict(vars(self))

    def load_state_dict(self, state: Mapping[str, int]) -> None:
        for key in vars(self):
            setattr(self, key, int(state[key]))


# ------------------------------------------------------------------------------------------ checkpoints


def find_last_checkpoint(output_dir: str | os.PathLike) -> Path | None:
    """The checkpoint directory named by ``<output_dir>/last_checkpoint``, else the highest-numbered complete
    one under ``<output_dir>/checkpoints`` (a crash between the rename and the pointer update), else None."""
    output_dir = Path(output_dir)
    pointer = output_dir / LAST_CHECKPOINT
    if pointer.is_file():
        path = output_dir / pointer.read_text().strip()
        if (path / STATE_DIR).is_dir():
            return path
        logger.warning(f"{pointer} names {path}, which is not a complete checkpoint; looking for others")
    root = output_dir / "checkpoints"
    found = (
        [p for p in root.iterdir() if p.name.isdigit() and (p / STATE_DIR).is_dir()] if root.is_dir() else []
    )
    return max(found, key=lambda p: int(p.name), default=None)


def resolve_resume(resume: str | os.PathLike | bool, output_dir: Path) -> Path | None:
    """``--resume``: False -> None (start fresh); True -> the newest checkpoint of ``output_dir`` or None if
    there is none yet (so a preemptible job can always pass --resume); a path -> that checkpoint directory
    (or the newest one of that output directory)."""
    if resume is False or resume is None:
        return None
    if resume is True:
        return find_last_checkpoint(output_dir)
    path = Path(resume)
    if (path / STATE_DIR).is_dir():
        return path
    last = find_last_checkpoint(path) if path.is_dir() else None
    if last is None:
        raise FileNotFoundError(
            f"--resume {path}: expected a checkpoint directory (<output_dir>/checkpoints/<iteration>, with a "
            f"'{STATE_DIR}/' subdirectory) or an output directory with '{LAST_CHECKPOINT}'"
        )
    return last


def _write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def save_checkpoint(
    accelerator: Accelerator,
    model: nn.Module,
    ema: ModelEMA | None,
    cfg: Config,
    output_dir: Path,
    iteration: int,
    extra_state: Callable[[Path], None] | None = None,
) -> Path:
    """Write ``<output_dir>/checkpoints/<iteration:07d>/{model,ema}.safetensors`` and ``state/`` into a temporary
    directory, rename it into place, then point ``last_checkpoint`` at it. Called on every process.

    The safetensors files carry the metadata ``iteration`` and ``config`` (the resolved config as JSON). A crash
    leaves either the previous checkpoint or the new one, never a partial one under the final name.
    ``extra_state(state_dir)``, when given, writes per-process state beside Accelerate's (BSGAL's cache).
    """
    root, name = output_dir / "checkpoints", f"{iteration:07d}"
    final, tmp = root / name, root / f".{name}.tmp"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)  # a leftover of a crash during a previous save
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp / STATE_DIR))  # every rank writes its own RNG state file
    if extra_state is not None:
        extra_state(tmp / STATE_DIR)
    metadata = {"iteration": str(iteration), "config": json.dumps(config_to_dict(cfg))}
    state_dict = accelerator.get_state_dict(model)  # a collective under sharded setups: every rank calls it
    if accelerator.is_main_process:
        save_weights(state_dict, tmp / MODEL_FILE, metadata)
        if ema is not None:
            save_weights(ema.module.state_dict(), tmp / EMA_FILE, metadata)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if final.exists():  # e.g. a fresh run in an old output_dir: swap, so a complete one always exists
            old = root / f".{name}.old"
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old)
        else:
            os.replace(tmp, final)
        _write_text_atomic(output_dir / LAST_CHECKPOINT, f"checkpoints/{final.name}\n")
        logger.info(f"saved checkpoint {final}")
    accelerator.wait_for_everyone()
    return final


# ------------------------------------------------------------------------------------------ logging helpers


class MetricsLog:
    """``<output_dir>/metrics.jsonl``, one JSON object per line with an ``iteration`` key; main process only.

    A fresh run starts the file anew; a resumed run keeps the lines up to the checkpoint's iteration and drops
    later ones (written after the checkpoint by the interrupted run, they are about to be written again).
    """

    def __init__(self, path: Path, *, enabled: bool, resume_iteration: int):
        self.path, self.enabled = path, enabled
        if not enabled:
            return
        kept = []
        if resume_iteration > 0 and path.is_file():
            for line in path.read_text().splitlines():
                if line.strip() and json.loads(line).get("iteration", 0) <= resume_iteration:
                    kept.append(line + "\n")
        _write_text_atomic(path, "".join(kept))

    def write(self, record: Mapping[str, Any]) -> None:
        """Append one flat record; NaN/Inf (e.g. the loss of a window of skipped steps) as null."""
        if self.enabled:
            record = {
                k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in record.items()
            }
            with self.path.open("a") as f:
                f.write(json.dumps(record, allow_nan=False) + "\n")


def flat_config(cfg: Config) -> dict[str, int | float | str | bool]:
    """``model.roi_heads.fc_dim``-style keys -> scalars (lists as strings), for TensorBoard's hparams."""
    out: dict[str, int | float | str | bool] = {}

    def visit(d: Mapping[str, Any], prefix: str) -> None:
        for k, v in d.items():
            if isinstance(v, Mapping):
                visit(v, f"{prefix}{k}.")
            else:
                out[prefix + k] = v if isinstance(v, (int, float, str, bool)) else json.dumps(v)

    visit(config_to_dict(cfg), "")
    return out


def flat_eval_metrics(metrics: Mapping[str, Any] | None) -> dict[str, float]:
    """``{"bbox": {"AP": .., "per_category": {..}}, ..}`` -> ``{"bbox/AP": ..}`` (summary numbers only)."""
    out: dict[str, float] = {}
    for group, values in (metrics or {}).items():
        if isinstance(values, Mapping):
            out.update({f"{group}/{k}": float(v) for k, v in values.items() if isinstance(v, (int, float))})
        elif isinstance(values, (int, float)):
            out[group] = float(values)
    return out


@contextlib.contextmanager
def _rng_preserved(device: torch.device) -> Iterator[None]:
    """Whatever the body draws from the global generators, training continues as if it had not run (so an
    evaluation between iterations does not change the losses that follow, nor break exact resume)."""
    py, npy = random.getstate(), np.random.get_state()  # noqa: NPY002 -- third-party code may use it
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices, device_type=device.type if devices else "cuda"):
        yield
    random.setstate(py)
    np.random.set_state(npy)  # noqa: NPY002


# ------------------------------------------------------------------------------------------ the loop


def _per_process_batch(batch_size: int, world_size: int, grad_accum_steps: int) -> int:
    per_process, rest = divmod(batch_size, world_size * grad_accum_steps)
    if rest or per_process < 1:
        raise ValueError(
            f"train.batch_size = {batch_size} (global images per iteration) must be a positive multiple of "
            f"world_size × train.grad_accum_steps = {world_size} × {grad_accum_steps} = "
            f"{world_size * grad_accum_steps}"
        )
    return per_process


def _any_rank(accelerator: Accelerator, flag: bool) -> bool:
    """True on every rank iff ``flag`` is True on some rank: one decision that all ranks take together."""
    if accelerator.num_processes == 1:
        return flag
    t = torch.tensor([float(flag)], device=accelerator.device)
    return bool(accelerator.reduce(t, reduction="sum").item() > 0)


def _to_device(images: list[Tensor], targets: list[dict[str, Tensor]], device: torch.device):
    images = [im.to(device, non_blocking=True) for im in images]
    targets = [{k: v.to(device, non_blocking=True) for k, v in t.items()} for t in targets]
    return images, targets


def _build_model(cfg: Config, dataset: DetectionDataset) -> nn.Module:
    """The model with the optional initial weights and its federated-loss weights; identical on every rank."""
    num_data_classes = dataset.categories.num_classes
    if num_data_classes > cfg.model.num_classes or (
        num_data_classes < cfg.model.num_classes and not cfg.paste.enabled
    ):
        raise ValueError(
            f"{cfg.data.train_json} has {num_data_classes} categories but model.num_classes = "
            f"{cfg.model.num_classes} (more classes than the dataset's are for pasted extra categories only)"
        )
    model = build_model(cfg.model)
    if cfg.model.weights:
        if not Path(cfg.model.weights).exists():
            raise FileNotFoundError(
                f"model.weights = {cfg.model.weights!r}: no such weights file or checkpoint directory"
            )
        load_weights(model, cfg.model.weights, strict=False)
    # After the initial weights, which may carry another dataset's freq_weight: the sampling weights
    # image_count^0.5 (centernet2.md §3) belong to this training set, taken from its annotations unless a
    # cat-info file is given.
    if cfg.model.fed_loss_cat_info:
        counts = load_category_image_counts(cfg.model.fed_loss_cat_info, cfg.model.num_classes)
    else:
        counts = torch.tensor(dataset.categories.image_count, dtype=torch.float32)
        # Extra (pasted-only) classes: the image count the official DiverGen metadata gives its ImageNet classes.
        extra = cfg.model.num_classes - num_data_classes
        counts = torch.cat([counts, torch.full((extra,), EXTRA_CLASS_IMAGE_COUNT)])
    model.roi_heads.set_fed_loss_weights(counts)
    return model


def train(cfg: Config, *, resume: str | os.PathLike | bool = False) -> dict[str, Any]:
    """Train ``cfg``'s model on ``cfg.data``; checkpoints, logs and evaluations go to ``cfg.train.output_dir``.

    Arguments:
        cfg: the resolved config (``load_config``).
        resume: False = start fresh; True = continue from the newest checkpoint of the output directory (start
            fresh if there is none); a path = continue from that checkpoint directory.

    Returns:
        ``iteration`` (completed), ``checkpoint`` (the last checkpoint directory), ``nonfinite_steps``,
        ``skipped_images``, ``metrics`` (the final evaluation on the main process; None elsewhere or when
        ``data.val_json`` is empty).

    Raises ``FloatingPointError`` after ``train.max_nonfinite_in_row`` consecutive iterations with a NaN/Inf loss.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    accelerator = Accelerator(
        gradient_accumulation_steps=cfg.train.grad_accum_steps,
        log_with="tensorboard",
        project_dir=cfg.train.output_dir,
        # Accelerate would step the schedule num_processes times per iteration (its schedules count per-process
        # batches); ours counts global iterations, as max_iter does.
        step_scheduler_with_optimizer=False,
        # Several processes on a machine without GPUs (`accelerate launch --multi_gpu` there, torchrun):
        # Accelerate would run each process alone unless told it is a CPU run (gloo).
        cpu=world_size > 1 and not torch.accelerator.is_available(),
    )
    if accelerator.num_processes != world_size:
        raise RuntimeError(
            f"launched as {world_size} processes (WORLD_SIZE) but Accelerate runs {accelerator.num_processes}; "
            "check the launcher's options"
        )
    try:
        return _train(accelerator, cfg, resume)
    finally:
        accelerator.end_training()


def _train(accelerator: Accelerator, cfg: Config, resume: str | os.PathLike | bool) -> dict[str, Any]:
    tc, main, output_dir = cfg.train, accelerator.is_main_process, Path(cfg.train.output_dir)
    rank, world = accelerator.process_index, accelerator.num_processes
    per_process = _per_process_batch(tc.batch_size, world, tc.grad_accum_steps)
    if tc.max_nonfinite_in_row < 1:
        raise ValueError(f"train.max_nonfinite_in_row = {tc.max_nonfinite_in_row}: expected >= 1")
    checkpoint = resolve_resume(resume, output_dir)
    if main:
        output_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, output_dir / "config.toml")
        if checkpoint is None and (output_dir / LAST_CHECKPOINT).is_file():
            logger.warning(f"{output_dir} holds checkpoints; starting from scratch (--resume continues)")
    accelerator.wait_for_everyone()
    accelerator.init_trackers("divergen", config=flat_config(cfg))
    logger.info(
        f"{world} process(es) × {per_process} images × {tc.grad_accum_steps} accumulation steps = "
        f"{tc.batch_size} images per iteration; mixed precision {accelerator.mixed_precision}; {accelerator.device}"
    )

    bsgal = cfg.bsgal.enabled
    dataset = build_train_dataset(cfg, return_original=bsgal, return_reference=bsgal)
    set_seed(tc.seed)  # the same initial weights on every rank
    model = _build_model(cfg, dataset).to(accelerator.device)
    # The official code copies the EMA before loading the initial weights, so its EMA starts from random init
    # (centernet2.md §4): a bug, harmless only after many iterations. Ours starts from the loaded weights.
    ema = ModelEMA(model, decay=cfg.solver.ema_decay) if cfg.solver.ema_enabled else None
    optimizer = build_optimizer(model, cfg.solver)
    scheduler = build_lr_scheduler(optimizer, cfg.solver, tc.max_iter)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    eval_model = ema.module if ema is not None else accelerator.unwrap_model(model)
    state = TrainState()
    accelerator.register_for_checkpointing(state)
    if ema is not None:
        accelerator.register_for_checkpointing(ema)
    set_seed(tc.seed, device_specific=True)  # seed + rank: per-rank RoI sampling etc.; data seeds are shared
    selector = None
    if bsgal:  # BSGAL's cache and threshold queue: per process, outside the model (bsgal.md §8.7)
        selector = Selector(
            cfg.bsgal, accelerator.unwrap_model(model), max_iter=tc.max_iter, rank=rank, world_size=world,
            output_dir=output_dir,
        )  # fmt: skip
    if checkpoint is not None:
        accelerator.load_state(str(checkpoint / STATE_DIR))  # model, AdamW, schedule, RNGs, EMA, counters
        if selector is not None:
            selector.load(checkpoint / STATE_DIR)
            selector.truncate_log(state.iteration)
        logger.info(f"resumed from {checkpoint} at iteration {state.iteration}")

    sampler = RepeatFactorSampler(
        dataset, threshold=cfg.data.repeat_factor_threshold, seed=tc.seed, rank=rank, world_size=world
    )
    loader = build_train_loader(
        dataset, sampler, batch_size=per_process, num_workers=cfg.data.num_workers, seed=tc.seed + rank
    )
    if state.batches_consumed:
        loader = skip_first_batches(loader, state.batches_consumed)  # no image is loaded for skipped batches
    batches = iter(loader)
    metrics_log = MetricsLog(output_dir / METRICS_FILE, enabled=main, resume_iteration=state.iteration)
    skipped_before = state.skipped_images

    def skipped_images() -> int:  # a collective: call on every rank
        if world == 1:
            return skipped_before + dataset.num_skipped
        n = torch.tensor([float(dataset.num_skipped)], device=accelerator.device)
        return skipped_before + int(accelerator.reduce(n, reduction="sum").item())

    def paste_stats() -> dict[str, float]:  # this rank's pasted instances per image since the last call
        if dataset.paste is None:
            return {}
        (instances, images), pasted[:] = pasted, [0, 0]
        return {
            "pasted_per_image": instances / max(images, 1),
            "skipped_pool_files": dataset.paste.pool.num_skipped,
        }

    pasted = [0, 0]  # pasted instances, images

    def next_batch() -> tuple[list[Tensor], list[dict[str, Tensor]], list[dict]]:
        # A batch whose images were all unreadable comes back empty; if that happens on any rank, every rank
        # draws again, so that ranks stay in step and draw the same number of batches (exact resume).
        while True:
            images, targets, infos = next(batches)
            state.batches_consumed += 1
            if dataset.paste is not None:
                pasted[0] += sum(int(t["is_pasted"].sum()) for t in targets)
                pasted[1] += len(targets)
            if not _any_rank(accelerator, len(images) == 0):
                return (*_to_device(images, targets, accelerator.device), infos)
            logger.warning("an empty batch (every image unreadable) on some rank; all ranks draw again")

    def forward(images, targets, infos, iteration) -> dict[str, Tensor]:
        if selector is None:
            return model(images, targets)
        # Accelerate's mixed precision wraps only model.forward; the selector also runs the model's
        # reference_cls_loss, which must see the same precision as the forwards it is compared with.
        with accelerator.autocast():
            losses, _ = selector.select(model, images, targets, infos, iteration)
        return losses

    from tqdm.auto import tqdm

    progress = tqdm(total=tc.max_iter, initial=state.iteration, disable=not main, dynamic_ncols=True)
    window, last_checkpoint = _Window(), checkpoint
    for it in range(state.iteration, tc.max_iter):
        t_iter, lr = time.perf_counter(), optimizer.param_groups[0]["lr"]
        losses, data_time = _train_step(
            accelerator, model, optimizer, ema, next_batch, cfg, it, forward,
            sync_gradients=selector.all_reduce_gradients if selector is not None else None,
        )  # fmt: skip
        scheduler.step()
        state.iteration = it + 1
        if losses is None:
            state.nonfinite_steps += 1
            state.nonfinite_in_row += 1
        else:
            state.nonfinite_in_row = 0
        if state.nonfinite_in_row >= tc.max_nonfinite_in_row:
            raise FloatingPointError(
                f"iteration {it + 1}: the loss was NaN/Inf in {state.nonfinite_in_row} consecutive iterations "
                f"(train.max_nonfinite_in_row = {tc.max_nonfinite_in_row}); stopping. Lower solver.lr, check the "
                f"data, or resume from the last checkpoint ({last_checkpoint})"
            )
        window.add(losses, time.perf_counter() - t_iter, data_time)
        progress.update(1)

        last = it + 1 == tc.max_iter
        if (tc.log_period > 0 and (it + 1) % tc.log_period == 0) or last:
            record = {"iteration": it + 1, **window.means(accelerator), "lr": lr, **window.timings()}
            record.update(
                skipped_images=skipped_images(), nonfinite_steps=state.nonfinite_steps, **paste_stats()
            )
            scores = []
            if selector is not None:
                scores = [r["score"] for r in selector.window if r["score"] is not None]
                record.update(selector.summary())
            if main:
                metrics_log.write(record)
                accelerator.log({f"train/{k}": v for k, v in record.items() if k != "iteration"}, step=it + 1)
                if scores:  # this process's BSGAL scores since the last log line
                    tensorboard = accelerator.get_tracker("tensorboard", unwrap=True)
                    tensorboard.add_histogram("train/bsgal_score", np.asarray(scores), it + 1)
                progress.set_postfix(loss=f"{record['total_loss']:.4g}", lr=f"{lr:.3g}", refresh=False)
            window = _Window()
        if (tc.checkpoint_period > 0 and (it + 1) % tc.checkpoint_period == 0) or last:
            state.skipped_images = skipped_images()
            last_checkpoint = save_checkpoint(
                accelerator,
                model,
                ema,
                cfg,
                output_dir,
                it + 1,
                extra_state=selector.save if selector else None,
            )
        if tc.eval_period > 0 and (it + 1) % tc.eval_period == 0 and not last:
            _evaluate_and_log(accelerator, eval_model, cfg, it + 1, metrics_log)
    progress.close()

    metrics = _evaluate_and_log(accelerator, eval_model, cfg, state.iteration, metrics_log)
    return {
        "iteration": state.iteration,
        "checkpoint": last_checkpoint,
        "nonfinite_steps": state.nonfinite_steps,
        "skipped_images": skipped_images(),
        "metrics": metrics,
    }


def _train_step(
    accelerator: Accelerator,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    ema: ModelEMA | None,
    next_batch: Callable[[], tuple[list[Tensor], list[dict[str, Tensor]], list[dict]]],
    cfg: Config,
    iteration: int,
    forward: Callable[[list[Tensor], list[dict[str, Tensor]], list[dict], int], dict[str, Tensor]],
    sync_gradients: Callable[[], None] | None = None,
) -> tuple[dict[str, Tensor] | None, float]:
    """One iteration: ``grad_accum_steps`` forward/backward passes, then clipping, AdamW and EMA.

    ``forward(images, targets, infos, iteration)`` gives the losses to train on: the model's, or those of the batch
    BSGAL selects (``Selector.select``, which runs outside DDP; then ``sync_gradients`` averages the gradients over
    processes after the backward).

    Returns the losses (mean over the micro-batches, detached) and the seconds spent waiting for data. The losses
    are None if a micro-batch had a NaN/Inf loss on some rank: then no rank runs its backward (no NaN reaches the
    gradient all-reduce), no rank steps, and the gradients of the whole iteration are dropped.
    """
    accum, nonfinite, step_losses, data_time = cfg.train.grad_accum_steps, False, {}, 0.0
    for micro in range(accum):
        t_data = time.perf_counter()
        images, targets, infos = next_batch()
        data_time += time.perf_counter() - t_data
        with accelerator.accumulate(model):
            losses = forward(images, targets, infos, iteration)
            total = sum(losses.values())
            bad = not bool(torch.isfinite(total))
            if _any_rank(accelerator, bad):
                nonfinite = True
                if bad:
                    names = [k for k, v in losses.items() if not torch.isfinite(v)]
                    logger.warning(
                        f"iteration {iteration + 1}: non-finite {names} on rank {accelerator.process_index}; "
                        "the step is skipped",
                        main_process_only=False,
                    )
            else:
                accelerator.backward(total)  # divides by accum itself
                for k, v in losses.items():
                    step_losses[k] = step_losses.get(k, 0.0) + v.detach() / accum
            if micro == accum - 1:
                if not accelerator.sync_gradients:
                    raise RuntimeError("gradient accumulation out of step with Accelerate's counter")
                if not nonfinite:
                    if sync_gradients is not None:
                        sync_gradients()
                    if cfg.solver.clip_value > 0:  # elementwise, after unscaling (centernet2.md §4)
                        accelerator.clip_grad_value_(model.parameters(), cfg.solver.clip_value)
                    optimizer.step()
                    if ema is not None and not optimizer.step_was_skipped:  # fp16 overflow: no step
                        ema.update(accelerator.unwrap_model(model))
                optimizer.zero_grad(set_to_none=True)
    return (None if nonfinite else step_losses), data_time


class _Window:
    """Losses and timings accumulated between two log lines."""

    def __init__(self):
        self.losses: dict[str, Tensor] = {}
        self.finite = self.iters = 0
        self.time = self.data_time = 0.0

    def add(self, losses: dict[str, Tensor] | None, seconds: float, data_seconds: float) -> None:
        self.iters += 1
        self.time += seconds
        self.data_time += data_seconds
        if losses is not None:
            self.finite += 1
            for k, v in losses.items():
                self.losses[k] = self.losses.get(k, 0.0) + v

    def means(self, accelerator: Accelerator) -> dict[str, float]:
        """Each loss averaged over the finite iterations and over ranks (a collective), and their sum."""
        if not self.losses:
            return {"total_loss": float("nan")}
        names = sorted(self.losses)
        values = torch.stack([self.losses[k] for k in names]).float() / self.finite
        if accelerator.num_processes > 1:
            values = accelerator.reduce(values, reduction="mean")
        means = dict(zip(names, values.tolist(), strict=True))
        return {**means, "total_loss": math.fsum(means.values())}

    def timings(self) -> dict[str, float]:
        return {"time": self.time / self.iters, "data_time": self.data_time / self.iters}


def _evaluate_and_log(
    accelerator: Accelerator, model: nn.Module, cfg: Config, iteration: int, log: MetricsLog
) -> dict | None:
    """``evaluation.run_evaluation`` of ``model`` (the EMA module, or the model without EMA) on ``cfg.data``'s val
    set, with the training RNG streams left as they were; the metrics (main process) are logged and returned."""
    if not cfg.data.val_json:
        logger.info("data.val_json is empty: no evaluation")
        return None
    from .evaluation import run_evaluation  # imported late: evaluation pulls in pycocotools & co.

    with _rng_preserved(accelerator.device):
        metrics = run_evaluation(
            model, cfg, accelerator, Path(cfg.train.output_dir) / "eval" / f"{iteration:07d}"
        )
    if accelerator.is_main_process and metrics is not None:
        flat = {f"eval/{k}": v for k, v in flat_eval_metrics(metrics).items()}
        log.write({"iteration": iteration, **flat})
        accelerator.log(flat, step=iteration)
        summary = {k: v for k, v in flat.items() if k.rsplit("/", 1)[-1] in ("AP", "APr", "APc", "APf")}
        logger.info(f"iteration {iteration}: " + ", ".join(f"{k} {v:.4f}" for k, v in summary.items()))
    return metrics
