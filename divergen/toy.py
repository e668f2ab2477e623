"""BSGAL's CIFAR-10 contribution experiment (appendix A.6, Table 1, Fig. 2; bsgal.md §7).

    python -m divergen.toy --config configs/toy_cifar.toml   # ResNet-18 on CIFAR-10 (a GPU; hours)
    python -m divergen.toy --config configs/toy_demo.toml    # tiny CNN, synthetic stand-in (CPU, < 1 min)

The experiment checks that BSGAL's contribution estimator sees data quality: a model is trained on a "real" set
R, candidate batches of increasingly corrupted "generated" data G are scored, and training on G selected by
contribution is compared with training on R alone and on R + all of G.

Data (A.6; bsgal.md §7). The training set is cut into ``num_splits`` disjoint, equal, seeded random splits
(CIFAR-10: 5 × 10,000; the split sizes are our reading of "Split1..Split5", the retrieved text does not state
them). R = ``real_split`` (split 1). Each candidate group is a split plus a noise level, paired by index in
``candidate_splits`` / ``noise_levels`` (default: split 1 + noise 0, i.e. R itself, "already seen"; split 2 +
40, split 3 + 100, split 4 + 200, split 5 + 400). The retrieved text does not define "noise level"; we use
additive Gaussian pixel noise, std = level on the 0-255 scale, drawn once per image (a fixed corrupted data
set, as a generated set would be) and clipped to [0, 255]. Only groups whose split is not R's are "generated"
data for the training strategies; the seen group shows how the estimators treat data the model already fits.

Estimators, both on the same candidate batches, the model in eval mode (BatchNorm uses its running statistics
and is not updated; the official scoring forwards also put the backbone in eval, bsgal.md §8.5):

- ``grad_cache`` (BSGAL §3, bsgal.md §1.2 steps 2 and 4): before each candidate, the cache is updated with
  the gradient of a fresh real batch from R (``GradCache.update``); the score is
  ``contribution(cache.dot_and_norms(∇ℓ_g))``: the cosine (A.5 normalisation) or the raw dot. This is
  ``divergen.bsgal``'s estimator, not a copy.
- ``lookahead`` (the ideal contribution, bsgal.md §1.1): φ(g) = L_R(θ) − L_R(θ − α∇ℓ_g(θ)), L_R the mean loss
  on a fixed real reference subset of R, one plain SGD step of size α, weights restored (``lookahead``).

Selection keeps candidate batches through ``divergen.bsgal.Threshold``: a fixed τ (accept s ≥ τ), or a
preset keep fraction r (the (1 − r)-percentile of all the batch scores, the rule of A.5 / bsgal.md §5 applied
to the whole scored set). Training (A.6): SGD lr 0.1, momentum 0.9, weight decay 5e-4, cosine schedule,
random crop (pad 4) + horizontal flip; the paper trains ResNet-18 for 200 epochs (93.02 % on the clean
training set). Outputs in ``output_dir``: ``report.json``, ``contributions.png`` (Fig. 2-style histograms per
noise level), ``config.toml``.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

from .bsgal import GradCache, Threshold, contribution
from .config import ConfigError, config_to_dict, load_config, parse_config_args, save_config

logger = logging.getLogger(__name__)

SOURCES = ("cifar10", "synthetic")
ARCHS = ("resnet18", "tiny_cnn")
SELECT_MODES = ("tau", "keep_fraction")
STRATEGIES = ("real_only", "real_all", "real_selected")
ESTIMATORS = ("grad_cache", "lookahead")
CIFAR_MEAN = (125.3, 123.0, 113.9)  # per-channel pixel mean / std of the CIFAR-10 training set, 0-255
CIFAR_STD = (63.0, 62.1, 66.7)


# ---------------------------------------------------------------------------------------------- config


@dataclass
class ToyDataConfig:
    """``[data]``: where the images come from and how R and the candidate groups are cut (A.6)."""

    source: str = "cifar10"  # "cifar10" (torchvision's format under root) or "synthetic" (the stand-in)
    root: str = "data/cifar10"  # the folder holding cifar-10-batches-py/
    download: bool = False  # let torchvision download CIFAR-10 into root when missing
    num_splits: int = 5
    real_split: int = 1  # 1-based, as the paper's Split1
    candidate_splits: list[int] = field(default_factory=lambda: [1, 2, 3, 4, 5])
    noise_levels: list[float] = field(default_factory=lambda: [0.0, 40.0, 100.0, 200.0, 400.0])
    synthetic_train_size: int = 2000  # the stand-in's training set (cut into num_splits)
    synthetic_test_size: int = 500
    synthetic_sample_noise: float = 20.0  # the stand-in's own per-image pixel noise std (before noise_levels)


@dataclass
class ToyModelConfig:
    """``[model]``: ResNet-18 for CIFAR (3x3 stem, no max-pool) or a tiny CNN for the demo and tests."""

    arch: str = "resnet18"
    width: int = 16  # tiny_cnn: channels of its first conv (doubled by the second)


@dataclass
class ToySolverConfig:
    """``[solver]``: every training run (A.6: SGD 0.1, momentum 0.9, wd 5e-4, cosine, 200 epochs)."""

    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    batch_size: int = 128
    epochs: int = 200  # each strategy's run
    warmup_epochs: int = 200  # the model trained on R that scores the candidates
    augment: bool = True  # random crop (pad 4) + horizontal flip


@dataclass
class ToyScoreConfig:
    """``[score]``: the two estimators."""

    batch_size: int = 128  # candidate batch size (one score per batch, as BSGAL decides per batch)
    max_batches_per_level: int = 0  # 0 = score every batch of each group (selection needs them all)
    reference_batch_size: int = 128  # the real batch whose gradient updates the cache before each candidate
    reference_size: int = 1024  # the fixed subset of R whose loss L_R the lookahead measures
    cache_update: str = "momentum"  # GradCache rule: "momentum" or "average"
    cache_momentum: float = 0.1  # weight of the OLD cache (official MOMENTUM0.1, bsgal.md §8.3)
    normalize: bool = True  # cosine (A.5, official) or raw dot
    lookahead_lr: float = 0.01  # α of the lookahead step


@dataclass
class ToySelectConfig:
    """``[select]``: which candidate batches ``real_selected`` trains on."""

    mode: str = "tau"  # "tau" (fixed threshold) or "keep_fraction"
    estimator: str = "grad_cache"  # whose scores decide: "grad_cache" or "lookahead"
    tau: float = -0.05  # official R50 (bsgal.md §1.2 step 4)
    keep_fraction: float = 0.5


@dataclass
class ToyConfig:
    """A ``python -m divergen.toy`` config: top-level run keys, one section per part."""

    output_dir: str = "output/toy_cifar"
    seed: int = 0
    device: str = ""  # "" = cuda if available, else cpu
    strategies: list[str] = field(default_factory=lambda: list(STRATEGIES))
    data: ToyDataConfig = field(default_factory=ToyDataConfig)
    model: ToyModelConfig = field(default_factory=ToyModelConfig)
    solver: ToySolverConfig = field(default_factory=ToySolverConfig)
    score: ToyScoreConfig = field(default_factory=ToyScoreConfig)
    select: ToySelectConfig = field(default_factory=ToySelectConfig)


def toy_config_errors(cfg: ToyConfig) -> list[str]:
    """The constraints the types cannot express, each naming its key."""
    d, e = cfg.data, []
    if d.source not in SOURCES:
        e.append(f"data.source = {d.source!r}: expected one of {list(SOURCES)}")
    if d.num_splits < 2:
        e.append(f"data.num_splits = {d.num_splits}: expected >= 2 (R and at least one candidate split)")
    for key, splits in (("data.real_split", [d.real_split]), ("data.candidate_splits", d.candidate_splits)):
        if any(not 1 <= s <= d.num_splits for s in splits):
            e.append(f"{key} = {splits}: expected split numbers in 1..{d.num_splits} (1-based)")
    if len(d.candidate_splits) != len(d.noise_levels) or not d.noise_levels:
        e.append(
            f"data.candidate_splits ({len(d.candidate_splits)}) and data.noise_levels ({len(d.noise_levels)}): "
            "expected equal, non-empty lists (group i = split candidate_splits[i] + noise noise_levels[i])"
        )
    if any(level < 0 for level in d.noise_levels):
        e.append(f"data.noise_levels = {d.noise_levels}: expected std values >= 0 (0-255 scale)")
    if d.source == "synthetic" and (d.synthetic_train_size < d.num_splits or d.synthetic_test_size < 1):
        e.append("data.synthetic_train_size must be >= data.num_splits and data.synthetic_test_size >= 1")
    if cfg.model.arch not in ARCHS:
        e.append(f"model.arch = {cfg.model.arch!r}: expected one of {list(ARCHS)}")
    s = cfg.solver
    if s.epochs < 0 or s.warmup_epochs < 0 or s.batch_size < 1 or s.lr <= 0:
        e.append("solver: expected epochs >= 0, warmup_epochs >= 0, batch_size >= 1 and lr > 0")
    sc = cfg.score
    if min(sc.batch_size, sc.reference_batch_size, sc.reference_size) < 1 or sc.max_batches_per_level < 0:
        e.append(
            "score: expected batch_size, reference_batch_size, reference_size >= 1, max_batches_per_level >= 0"
        )
    if sc.cache_update not in ("momentum", "average") or not 0.0 <= sc.cache_momentum < 1.0:
        e.append(
            f"score.cache_update / score.cache_momentum = {sc.cache_update!r} / {sc.cache_momentum}: expected "
            "'momentum' or 'average', and 0 <= momentum < 1"
        )
    sel = cfg.select
    if sel.mode not in SELECT_MODES:
        e.append(f"select.mode = {sel.mode!r}: expected one of {list(SELECT_MODES)}")
    if sel.estimator not in ESTIMATORS:
        e.append(f"select.estimator = {sel.estimator!r}: expected one of {list(ESTIMATORS)}")
    if not 0.0 < sel.keep_fraction <= 1.0:
        e.append(f"select.keep_fraction = {sel.keep_fraction}: expected 0 < keep_fraction <= 1")
    bad = [x for x in cfg.strategies if x not in STRATEGIES]
    if bad:
        e.append(f"strategies: {bad} unknown, expected names from {list(STRATEGIES)}")
    return e


def load_toy_config(path: str | Path, overrides: Sequence[str] = ()) -> ToyConfig:
    """``load_config`` with the toy schema, plus ``toy_config_errors``."""
    cfg = load_config(path, overrides, schema=ToyConfig)
    errors = toy_config_errors(cfg)
    if errors:
        raise ConfigError(f"in {path}:\n  " + "\n  ".join(errors))
    return cfg


# ------------------------------------------------------------------------------------------------ data


@dataclass
class Group:
    """One candidate group: ``images`` (N, 3, 32, 32) uint8, ``labels`` (N,) int64."""

    split: int
    noise: float
    images: Tensor
    labels: Tensor


@dataclass
class ToyData:
    real_images: Tensor  # (N_R, 3, 32, 32) uint8
    real_labels: Tensor  # (N_R,) int64
    test_images: Tensor
    test_labels: Tensor
    groups: list[Group]
    num_classes: int = 10


def load_cifar10(*, root: str | Path, download: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """CIFAR-10 in torchvision's format under ``root`` → (train images (50000, 3, 32, 32) uint8, train labels,
    test images (10000, ...), test labels). Downloads only when ``download`` is true."""
    import torchvision

    root = Path(root)
    if not download and not (root / "cifar-10-batches-py").is_dir():
        raise FileNotFoundError(
            f"data.root = {str(root)!r}: no CIFAR-10 there (expected {root / 'cifar-10-batches-py'}, "
            "torchvision's format); point data.root at it, or set data.download = true to fetch it"
        )
    out = []
    for train in (True, False):
        ds = torchvision.datasets.CIFAR10(str(root), train=train, download=download)
        out += [torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous(), torch.tensor(ds.targets)]
    return out[0], out[1], out[2], out[3]


def make_synthetic(
    *, num_train: int, num_test: int, num_classes: int = 10, sample_noise: float = 20.0, seed: int = 0
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """A CIFAR-like stand-in: 32x32 RGB uint8 images, class c = its own colour plus a sinusoidal grating of its
    own orientation and frequency, with a random phase, a per-image colour jitter (std 20) and Gaussian pixel
    noise (std ``sample_noise``). A tiny CNN learns it in seconds. Returns CIFAR's layout (``load_cifar10``)."""
    g = torch.Generator().manual_seed(seed)
    colours = 90 + 75 * torch.rand(num_classes, 3, generator=g)
    angles = torch.arange(num_classes) * math.pi / num_classes
    freqs = torch.tensor([2.0, 3.0, 4.0])[torch.arange(num_classes) % 3] / 32
    yy, xx = torch.meshgrid(torch.arange(32.0), torch.arange(32.0), indexing="ij")

    def draw(n: int) -> tuple[Tensor, Tensor]:
        labels = torch.randint(num_classes, (n,), generator=g)
        phase = 2 * math.pi * torch.rand(n, 1, 1, generator=g)
        a, f = angles[labels].view(-1, 1, 1), freqs[labels].view(-1, 1, 1)
        wave = torch.sin(2 * math.pi * f * (xx * torch.cos(a) + yy * torch.sin(a)) + phase)
        colour = colours[labels] + 20 * torch.randn(n, 3, generator=g)
        noise = sample_noise * torch.randn(n, 3, 32, 32, generator=g)
        img = colour.view(n, 3, 1, 1) + 30 * wave.unsqueeze(1) + noise
        return img.round().clamp(0, 255).to(torch.uint8), labels

    tr, te = draw(num_train), draw(num_test)
    return tr[0], tr[1], te[0], te[1]


def make_splits(n: int, *, num_splits: int, seed: int) -> list[Tensor]:
    """``num_splits`` disjoint index sets of equal size (a seeded permutation; a remainder < num_splits is
    dropped)."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    size = n // num_splits
    return [perm[i * size : (i + 1) * size] for i in range(num_splits)]


def add_noise(images: Tensor, *, level: float, seed: int) -> Tensor:
    """Additive Gaussian pixel noise, std = ``level`` on the 0-255 scale, drawn once (seeded), clipped to
    [0, 255], rounded back to uint8. ``level`` 0 returns the images unchanged."""
    if level == 0:
        return images
    noise = level * torch.randn(images.shape, generator=torch.Generator().manual_seed(seed))
    return (images.float() + noise).round().clamp(0, 255).to(torch.uint8)


def build_toy_data(cfg: ToyDataConfig, *, seed: int) -> ToyData:
    """R, the candidate groups and the test set of ``cfg`` (see the module docstring)."""
    if cfg.source == "cifar10":
        tr_x, tr_y, te_x, te_y = load_cifar10(root=cfg.root, download=cfg.download)
    else:
        tr_x, tr_y, te_x, te_y = make_synthetic(num_train=cfg.synthetic_train_size, num_test=cfg.synthetic_test_size,
                                                sample_noise=cfg.synthetic_sample_noise, seed=seed)  # fmt: skip
    splits = make_splits(len(tr_y), num_splits=cfg.num_splits, seed=seed)
    real = splits[cfg.real_split - 1]
    groups = []
    for i, (s, level) in enumerate(zip(cfg.candidate_splits, cfg.noise_levels, strict=True)):
        idx = splits[s - 1]
        groups.append(
            Group(s, float(level), add_noise(tr_x[idx], level=level, seed=seed + 1000 + i), tr_y[idx])
        )
    logger.info("toy data (%s): R = split %d (%d images), groups (split, noise, images) %s, test %d", cfg.source,
                cfg.real_split, len(real), [(g.split, g.noise, len(g.labels)) for g in groups], len(te_y))  # fmt: skip
    return ToyData(tr_x[real], tr_y[real], te_x, te_y, groups)


def normalize_images(images: Tensor) -> Tensor:
    """uint8 (B, 3, H, W) → float, standardised with CIFAR-10's channel mean / std."""
    mean = torch.tensor(CIFAR_MEAN, device=images.device).view(1, 3, 1, 1)
    std = torch.tensor(CIFAR_STD, device=images.device).view(1, 3, 1, 1)
    return (images.float() - mean) / std


def augment(images: Tensor, *, generator: torch.Generator) -> Tensor:
    """The standard CIFAR augmentation on a uint8 batch: random 32x32 crop of the zero-padded (4 px) image and
    a random horizontal flip, one draw per image (on the batch's device, vectorised)."""
    b, _, h, w = images.shape
    padded = F.pad(images, (4, 4, 4, 4))
    dy = torch.randint(0, 9, (b,), generator=generator).to(images.device)
    dx = torch.randint(0, 9, (b,), generator=generator).to(images.device)
    flip = (torch.rand(b, generator=generator) < 0.5).to(images.device)
    rows = (dy.view(b, 1, 1, 1) + torch.arange(h, device=images.device).view(1, 1, h, 1)).expand(
        b, 3, h, w + 8
    )
    cols = torch.arange(w, device=images.device).view(1, w).expand(b, w)
    cols = torch.where(flip.view(b, 1), w - 1 - cols, cols) + dx.view(b, 1)
    out = padded.gather(2, rows)
    cols = cols.view(b, 1, 1, w).expand(b, 3, h, w)
    return out.gather(3, cols)


# ----------------------------------------------------------------------------------------------- models


def build_toy_model(cfg: ToyModelConfig, *, num_classes: int = 10) -> nn.Module:
    """ResNet-18 for CIFAR (torchvision's, with a 3x3 stride-1 stem and no max-pool) or a tiny CNN."""
    if cfg.arch == "resnet18":
        import torchvision

        model = torchvision.models.resnet18(num_classes=num_classes)
        model.conv1 = nn.Conv2d(3, 64, 3, stride=1, padding=1, bias=False)
        model.maxpool = nn.Identity()
        return model
    w = cfg.width
    return nn.Sequential(  # two stride-2 convs: 32 → 8 px, a few MFLOP per image
        nn.Conv2d(3, w, 3, stride=2, padding=1, bias=False),
        nn.BatchNorm2d(w),
        nn.ReLU(inplace=True),
        nn.Conv2d(w, 2 * w, 3, stride=2, padding=1, bias=False),
        nn.BatchNorm2d(2 * w),
        nn.ReLU(inplace=True),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(2 * w, num_classes),
    )


def train_model(
    model: nn.Module,
    images: Tensor,
    labels: Tensor,
    *,
    cfg: ToySolverConfig,
    epochs: int,
    seed: int,
    desc: str = "train",
) -> nn.Module:
    """SGD with momentum and weight decay, cosine schedule (per iteration, to 0), cross-entropy; in place.

    Arguments:
        images: (N, 3, 32, 32) uint8 on the model's device; labels: (N,) int64 there.
        epochs: passes over the (reshuffled) data; 0 leaves the model untouched.
    """
    device = next(model.parameters()).device
    gen = torch.Generator().manual_seed(seed)
    steps_per_epoch = math.ceil(len(labels) / cfg.batch_size)
    total = max(epochs * steps_per_epoch, 1)
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total)
    model.train()
    for _ in tqdm(range(epochs), desc=desc, leave=False):
        perm = torch.randperm(len(labels), generator=gen).to(device)
        for start in range(0, len(labels), cfg.batch_size):
            idx = perm[start : start + cfg.batch_size]
            x = images[idx]
            if cfg.augment:
                x = augment(x, generator=gen)
            loss = F.cross_entropy(model(normalize_images(x)), labels[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    return model


@torch.no_grad()
def accuracy(model: nn.Module, images: Tensor, labels: Tensor, *, batch_size: int = 512) -> float:
    """Top-1 accuracy (eval mode) of uint8 ``images`` against ``labels``."""
    model.eval()
    correct = 0
    for s in range(0, len(labels), batch_size):
        correct += int(
            (
                model(normalize_images(images[s : s + batch_size])).argmax(1) == labels[s : s + batch_size]
            ).sum()
        )
    return correct / max(len(labels), 1)


# ------------------------------------------------------------------------------------------- estimators


def batch_loss(model: nn.Module, images: Tensor, labels: Tensor) -> Tensor:
    """Mean cross-entropy of a uint8 batch (no augmentation)."""
    return F.cross_entropy(model(normalize_images(images)), labels)


def lookahead(
    model: nn.Module,
    params: Sequence[Tensor],
    images: Tensor,
    labels: Tensor,
    *,
    ref_images: Tensor,
    ref_labels: Tensor,
    lr: float,
) -> float:
    """The ideal contribution φ(g) = L_R(θ) − L_R(θ − α∇ℓ_g(θ)) (bsgal.md §1.1) of the batch
    (``images``, ``labels``) for the real reference (``ref_images``, ``ref_labels``): one plain SGD step of
    size ``lr`` on ``params``, the reference loss after it, the weights restored exactly (also on error)."""
    grads = torch.autograd.grad(batch_loss(model, images, labels), params, allow_unused=True)
    snapshot = [p.detach().clone() for p in params]
    try:
        with torch.no_grad():
            before = float(batch_loss(model, ref_images, ref_labels))
            for p, g in zip(params, grads, strict=True):
                if g is not None:
                    p.sub_(g, alpha=lr)
            after = float(batch_loss(model, ref_images, ref_labels))
    finally:
        with torch.no_grad():
            for p, s in zip(params, snapshot, strict=True):
                p.copy_(s)
    return before - after


def score_groups(model: nn.Module, data: ToyData, cfg: ToyScoreConfig, *, seed: int) -> list[dict]:
    """Both estimators on the candidate batches of every group, the model in eval mode (module docstring).

    Returns one dict per group: ``split``, ``noise``, ``batches`` (a list of index tensors into the group),
    ``grad_cache`` and ``lookahead`` (a score per batch, same order).
    """
    model.eval()
    params = [p for p in model.parameters() if p.requires_grad]
    cache = GradCache(params, update=cfg.cache_update, momentum=cfg.cache_momentum)
    gen = torch.Generator().manual_seed(seed)
    n_real = len(data.real_labels)
    ref_idx = torch.randperm(n_real, generator=gen)[: cfg.reference_size].to(data.real_labels.device)
    ref_x, ref_y = data.real_images[ref_idx], data.real_labels[ref_idx]
    results = []
    for group in data.groups:
        order = torch.randperm(len(group.labels), generator=gen).to(group.labels.device)
        batches = list(order.split(cfg.batch_size))
        if cfg.max_batches_per_level:
            batches = batches[: cfg.max_batches_per_level]
        gc_scores, la_scores = [], []
        for idx in tqdm(batches, desc=f"score noise {group.noise:g}", leave=False):
            x, y = group.images[idx], group.labels[idx]
            # The cache is updated from a fresh real batch before each use (bsgal.md §1.2 step 2).
            real = torch.randint(n_real, (cfg.reference_batch_size,), generator=gen).to(ref_idx.device)
            ref_grads = torch.autograd.grad(
                batch_loss(model, data.real_images[real], data.real_labels[real]), params, allow_unused=True
            )
            cache.update(ref_grads)
            grads = torch.autograd.grad(batch_loss(model, x, y), params, allow_unused=True)
            gc_scores.append(contribution(cache.dot_and_norms(grads), normalize=cfg.normalize))
            la_scores.append(
                lookahead(model, params, x, y, ref_images=ref_x, ref_labels=ref_y, lr=cfg.lookahead_lr)
            )
        results.append(dict(split=group.split, noise=group.noise, batches=batches, grad_cache=gc_scores,
                            lookahead=la_scores))  # fmt: skip
        logger.info("noise %g (split %d): grad_cache %.4f ± %.4f, lookahead %.3g ± %.3g over %d batches",
                    group.noise, group.split, np.mean(gc_scores), np.std(gc_scores), np.mean(la_scores),
                    np.std(la_scores), len(batches))  # fmt: skip
    return results


def spearman(a: Sequence[float], b: Sequence[float]) -> float:
    """Spearman's rank correlation (average ranks for ties; NaN when either side is constant)."""

    def ranks(x: Sequence[float]) -> np.ndarray:
        x = np.asarray(x, dtype=np.float64)
        order = np.argsort(x, kind="stable")
        r = np.empty(len(x))
        r[order] = np.arange(len(x), dtype=np.float64)
        for v in np.unique(x):  # ties share their mean rank
            r[x == v] = r[x == v].mean()
        return r

    ra, rb = ranks(a), ranks(b)
    if len(ra) < 2 or ra.std() == 0 or rb.std() == 0:
        return float("nan")
    return float(np.corrcoef(ra, rb)[0, 1])


def select_batches(scores: Sequence[float], cfg: ToySelectConfig) -> tuple[list[bool], float]:
    """(accept per batch, threshold) through ``divergen.bsgal.Threshold``: fixed τ, or the (1 − r)-percentile of
    all ``scores`` (the dynamic rule of bsgal.md §5 with the whole scored set as its queue)."""
    if cfg.mode == "tau":
        th = Threshold(tau=cfg.tau)
    else:
        th = Threshold(dynamic=True, accept_rate=cfg.keep_fraction, queue_size=max(len(scores), 1))
        th.load_state_dict({"queue": list(scores)})
    thresh = th.threshold(0)
    return [not (thresh > s) for s in scores], thresh  # the official test: reject iff threshold > s


# ------------------------------------------------------------------------------------------- experiment


def plot_contributions(results: list[dict], path: Path) -> None:
    """Histograms of the batch contributions per noise level, one panel per estimator (cf. Fig. 2)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, key, title in zip(
        axes, ("grad_cache", "lookahead"), ("gradient cache (cosine)", "lookahead L_R(θ) − L_R(θ')")
    ):
        values = np.concatenate([np.asarray(r[key]) for r in results])
        bins = np.linspace(values.min(), values.max(), 40) if np.ptp(values) > 0 else 10
        for r in results:
            ax.hist(r[key], bins=bins, alpha=0.5, label=f"split {r['split']} + noise {r['noise']:g}")
        ax.set_title(title)
        ax.set_xlabel("contribution")
        ax.set_ylabel("batches")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _summary(values: Sequence[float]) -> dict[str, float]:
    return {"mean": float(np.mean(values)), "std": float(np.std(values)), "n": len(values)}


def run(cfg: ToyConfig) -> dict:
    """The whole experiment: data, warm-up on R, scoring, selection, the training strategies, outputs.
    Returns the report (also written to ``output_dir/report.json``)."""
    t0 = time.time()
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out / "config.toml")
    device = torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch.manual_seed(cfg.seed)
    data = build_toy_data(cfg.data, seed=cfg.seed)
    for name in ("real_images", "real_labels", "test_images", "test_labels"):
        setattr(data, name, getattr(data, name).to(device))
    for g in data.groups:
        g.images, g.labels = g.images.to(device), g.labels.to(device)

    def fresh_model() -> nn.Module:
        torch.manual_seed(cfg.seed)  # every strategy starts from the same initial weights
        return build_toy_model(cfg.model, num_classes=data.num_classes).to(device)

    warm = train_model(
        fresh_model(), data.real_images, data.real_labels, cfg=cfg.solver, epochs=cfg.solver.warmup_epochs,
        seed=cfg.seed, desc="warm-up on R",
    )  # fmt: skip
    report: dict = {"config": config_to_dict(cfg), "device": str(device)}
    report["warmup"] = {
        "train_acc": accuracy(warm, data.real_images, data.real_labels),
        "test_acc": accuracy(warm, data.test_images, data.test_labels),
    }
    logger.info("warm-up model: R accuracy %.4f, test accuracy %.4f", *report["warmup"].values())

    results = score_groups(warm, data, cfg.score, seed=cfg.seed + 1)
    means = {k: [float(np.mean(r[k])) for r in results] for k in ESTIMATORS}
    all_scores = {k: np.concatenate([r[k] for r in results]).tolist() for k in ESTIMATORS}
    report["levels"] = [
        {"split": r["split"], "noise": r["noise"], **{k: _summary(r[k]) for k in ESTIMATORS}} for r in results
    ]
    report["spearman_levels"] = spearman(means["grad_cache"], means["lookahead"])
    report["spearman_batches"] = spearman(all_scores["grad_cache"], all_scores["lookahead"])
    levels = [r["noise"] for r in results]
    report["spearman_noise"] = {k: spearman(levels, means[k]) for k in means}  # −1: falls as noise grows
    plot_contributions(results, out / "contributions.png")

    # Selection over the generated groups (splits other than R's).
    generated = [(g, r) for g, r in zip(data.groups, results, strict=True) if g.split != cfg.data.real_split]
    scores = [s for _, r in generated for s in r[cfg.select.estimator]]
    accept, thresh = select_batches(scores, cfg.select)
    sel_x, sel_y, all_x, all_y, per_level, k = [], [], [], [], [], 0
    for g, r in generated:
        all_x.append(g.images)
        all_y.append(g.labels)
        kept = 0
        for idx in r["batches"]:
            if accept[k]:
                sel_x.append(g.images[idx])
                sel_y.append(g.labels[idx])
                kept += 1
            k += 1
        per_level.append({"noise": g.noise, "split": g.split, "accepted": kept, "batches": len(r["batches"])})
    report["selection"] = {
        "mode": cfg.select.mode,
        "estimator": cfg.select.estimator,
        "threshold": thresh,
        "accept_rate": float(np.mean(accept)) if accept else float("nan"),
        "per_level": per_level,
    }
    logger.info("selection: threshold %.4g, (noise, accepted, batches) %s", thresh,
                [(p["noise"], p["accepted"], p["batches"]) for p in per_level])  # fmt: skip

    train_sets = {
        "real_only": ([data.real_images], [data.real_labels]),
        "real_all": ([data.real_images, *all_x], [data.real_labels, *all_y]),
        "real_selected": ([data.real_images, *sel_x], [data.real_labels, *sel_y]),
    }
    report["strategies"] = {}
    for name in cfg.strategies:
        xs, ys = train_sets[name]
        x, y = torch.cat(xs), torch.cat(ys)
        model = train_model(
            fresh_model(), x, y, cfg=cfg.solver, epochs=cfg.solver.epochs, seed=cfg.seed, desc=name
        )
        acc = accuracy(model, data.test_images, data.test_labels)
        report["strategies"][name] = {"train_size": len(y), "test_acc": acc}
        logger.info("%s: %d training images, test accuracy %.4f", name, len(y), acc)
    report["seconds"] = time.time() - t0
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    logger.info("wrote %s and %s", out / "report.json", out / "contributions.png")
    return report


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s: %(message)s")
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    args, cfg = parse_config_args(parser, argv, schema=ToyConfig)
    errors = toy_config_errors(cfg)
    if errors:
        parser.error(str(ConfigError(f"in {args.config}:\n  " + "\n  ".join(errors))))
    try:
        run(cfg)
    except FileNotFoundError as e:
        parser.exit(2, f"error: {e}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
