"""BSGAL's selection step (``divergen.bsgal_step``): scores against a naive flat-vector computation, the shared
forward against the official three-pass order, the lookahead estimator, and training runs (resume, two processes,
the report)."""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from divergen import engine
from divergen.bsgal_report import read_decisions, write_report
from divergen.bsgal_step import Selector
from divergen.config import load_config
from divergen.data import collate
from divergen.model import CenterNet2, build_model
from divergen.paste import build_train_dataset
from divergen.synthetic import make_synthetic_lvis
from divergen.synthetic_pool import make_synthetic_pool

from .test_engine import TINY, base_overrides, free_port, read_metrics, reset_accelerate

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("bsgal")
    paths = make_synthetic_lvis(
        root / "data", num_train=12, num_val=3, num_categories=8, image_size=(128, 128)
    )
    paths["pool"] = make_synthetic_pool(root / "pool", num_categories=8, per_category=6, size_range=(24, 48))
    return paths


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def bsgal_overrides(data, output_dir, *extra):
    return [
        *base_overrides(data, output_dir),
        "paste.enabled=true",
        f"paste.pool={data['pool']}",
        "paste.max_samples=6",
        "bsgal.enabled=true",
        *extra,
    ]


def make_case(data, tmp_path, *extra, seed=0):
    """(cfg, model in train mode, images, targets, infos): one batch of 2 pasted images with originals and
    references, as the training loader gives it."""
    cfg = load_config(TINY, bsgal_overrides(data, tmp_path, *extra))
    dataset = build_train_dataset(cfg, return_original=True, return_reference=True)
    rng = np.random.default_rng(seed)
    items = []
    while len(items) < 2:  # a batch with something pasted
        item = dataset[(int(rng.integers(len(dataset))), int(rng.integers(2**31)))]
        if item is not None and item["is_pasted"].any():
            items.append(item)
    images, targets, infos = collate(items)
    torch.manual_seed(0)
    model = build_model(cfg.model)
    model.roi_heads.set_fed_loss_weights(torch.tensor(dataset.categories.image_count, dtype=torch.float32))
    return cfg, model.train(), images, targets, infos


def flat_grad(model, loss):
    """The official flattening (bsgal.md §9): every trainable parameter's gradient, zeros where it has none."""
    model.zero_grad(set_to_none=True)
    loss.backward()
    out = torch.cat([
        (p.grad if p.grad is not None else torch.zeros_like(p)).flatten()
        for p in model.parameters() if p.requires_grad
    ])  # fmt: skip
    model.zero_grad(set_to_none=True)
    return out.double()  # float64 sums: the reference must be more exact than what it checks


def naive_only_paste_score(model, cfg, images, targets, infos, iteration, cache=None):
    """bsgal.md §9 with flat vectors: g_ref, c <- m·c + (1 - m)·g_ref, seed, g_paste, cosine."""
    refs = [i["reference"] for i in infos]
    ref = model.reference_cls_loss(
        [r["image"] for r in refs], [{k: r[k] for k in ("boxes", "labels", "masks")} for r in refs]
    )
    g_ref = flat_grad(model, sum(ref.values()))
    m = cfg.bsgal.momentum
    cache = (1 - m) * g_ref if cache is None else m * cache + (1 - m) * g_ref
    torch.manual_seed(cfg.bsgal.seed + iteration)
    losses = model(images, targets, paste_cls_loss=True)
    g = flat_grad(model, sum(v for k, v in losses.items() if "paste" in k))
    return float(cache @ g / (cache.norm() * g.norm() + 1e-8)), cache


def test_score_equals_the_naive_flat_vector_cosine(data, tmp_path):
    cfg, model, images, targets, infos = make_case(data, tmp_path)
    reference = copy.deepcopy(model)
    selector = Selector(cfg.bsgal, model, max_iter=10, rank=0, world_size=1, output_dir=tmp_path)
    cache = None
    for it in range(3):  # the cache carries over: three updates
        want, cache = naive_only_paste_score(reference, cfg, images, targets, infos, it, cache)
        losses, record = selector.select(model, images, targets, infos, it)
        assert record["score"] == pytest.approx(want, rel=1e-5, abs=1e-7)
        assert record["accepted"] == (not cfg.bsgal.tau > want)
        assert not any("paste" in k for k in losses)
        model.zero_grad(set_to_none=True)
    decisions = [
        json.loads(line) for line in (tmp_path / "bsgal" / "decisions_rank0.jsonl").read_text().splitlines()
    ]
    assert [d["iteration"] for d in decisions] == [1, 2, 3] and all(d["num_pasted"] > 0 for d in decisions)


def test_shared_forward_decides_as_the_official_three_pass_order(data, tmp_path):
    """FrozenBN, no dropout: the scoring forward in eval mode (official) and the training forward (shared) see the
    same computation under the same seed, so the scores and decisions are the same."""
    for tau in (-0.05, 1.0):  # accepted, then rejected
        cfg, model, images, targets, infos = make_case(data, tmp_path, f"bsgal.tau={tau}")
        official = dataclasses.replace(cfg.bsgal, shared_forward=False)
        twin = copy.deepcopy(model)
        a = Selector(cfg.bsgal, model, max_iter=10, rank=0, world_size=1, output_dir=tmp_path / "a")
        b = Selector(official, twin, max_iter=10, rank=0, world_size=1, output_dir=tmp_path / "b")
        for it in range(2):
            la, ra = a.select(model, images, targets, infos, it)
            lb, rb = b.select(twin, images, targets, infos, it)
            assert ra["score"] == pytest.approx(rb["score"], rel=1e-6, abs=1e-8)
            assert ra["accepted"] == rb["accepted"] == (tau <= ra["score"])
            assert set(la) == set(lb) and all(torch.isfinite(v) for v in la.values())
            if not ra["accepted"]:  # trained on the originals: the same crops, nothing pasted
                assert la.keys() == lb.keys()


def test_lookahead_restores_the_weights_and_compares_reference_losses(data, tmp_path):
    cfg, model, images, targets, infos = make_case(
        data, tmp_path, "bsgal.estimator=lookahead", "bsgal.lookahead_lr=0.05"
    )
    before = {k: v.clone() for k, v in model.state_dict().items()}
    naive = []
    refs = [i["reference"] for i in infos]
    ref_args = ([r["image"] for r in refs], [{k: r[k] for k in ("boxes", "labels", "masks")} for r in refs])
    for imgs, tgts in ((images, targets), ([i["original"]["image"] for i in infos], [
        {k: i["original"][k] for k in ("boxes", "labels", "masks")} for i in infos
    ])):  # fmt: skip
        m = copy.deepcopy(model)
        torch.manual_seed(cfg.bsgal.seed + 0)
        m.backbone.eval()
        loss = sum(m(imgs, tgts).values())
        loss.backward()
        with torch.no_grad():
            for p in m.parameters():
                if p.grad is not None:
                    p.sub_(p.grad, alpha=0.05)
            naive.append(float(sum(m.reference_cls_loss(*ref_args).values())))
    selector = Selector(cfg.bsgal, model, max_iter=10, rank=0, world_size=1, output_dir=tmp_path)
    assert selector.cache is None  # no gradient vector is kept
    losses, record = selector.select(model, images, targets, infos, 0)
    assert record["score"] == pytest.approx(naive[1] - naive[0], rel=1e-4, abs=1e-6)
    assert record["accepted"] == (naive[0] < naive[1])
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # every weight restored exactly
    assert model.backbone.training and all(torch.isfinite(v) for v in losses.values())


def test_compare_mode_picks_the_higher_cosine(data, tmp_path):
    cfg, model, images, targets, infos = make_case(data, tmp_path, "bsgal.candidate=compare")
    selector = Selector(cfg.bsgal, model, max_iter=10, rank=0, world_size=1, output_dir=tmp_path)
    _, record = selector.select(model, images, targets, infos, 0)
    assert record["accepted"] == (record["score"] >= record["threshold"])  # cos(paste) >= cos(original)
    assert -1.0 <= record["score"] <= 1.0 and -1.0 <= record["threshold"] <= 1.0


def test_nothing_pasted_is_trained_without_a_decision(data, tmp_path):
    cfg, model, images, targets, infos = make_case(data, tmp_path)
    targets = [{**t, "is_pasted": torch.zeros_like(t["is_pasted"])} for t in targets]
    selector = Selector(cfg.bsgal, model, max_iter=10, rank=0, world_size=1, output_dir=tmp_path)
    losses, record = selector.select(model, images, targets, infos, 0)
    assert (
        record["score"] is None and record["accepted"] and len(selector.threshold.state_dict()["queue"]) == 0
    )
    assert selector.cache.num_updates == 0 and "loss_cls_stage0" in losses


def test_training_resumes_bsgal_state_exactly_and_reports(data, tmp_path, monkeypatch):
    """Run "full": 4 iterations. Run "cut": killed in iteration 4 (after the checkpoint of iteration 2 and the
    decision of iteration 3), then resumed: the cache and threshold queue come back, the decisions are redone."""
    common = ["train.max_iter=4", "train.batch_size=2", "train.checkpoint_period=2", "bsgal.gallery_period=2"]

    class Killed(Exception):
        pass

    class KilledSelector(Selector):
        def select(self, model, images, targets, infos, iteration):
            if iteration == 3:
                raise Killed
            return super().select(model, images, targets, infos, iteration)

    reset_accelerate()
    try:
        engine.train(load_config(TINY, bsgal_overrides(data, tmp_path / "full", *common)))
        reset_accelerate()
        monkeypatch.setattr(engine, "Selector", KilledSelector)
        cut = load_config(TINY, bsgal_overrides(data, tmp_path / "cut", *common))
        with pytest.raises(Killed):
            engine.train(cut)
        assert [r["iteration"] for r in read_decisions(tmp_path / "cut")] == [1, 2, 3]
        monkeypatch.setattr(engine, "Selector", Selector)
        reset_accelerate()
        engine.train(cut, resume=True)
    finally:
        reset_accelerate()
    assert (tmp_path / "full" / "checkpoints" / "0000002" / "state" / "bsgal_rank0.pt").is_file()
    full, cut = read_decisions(tmp_path / "full"), read_decisions(tmp_path / "cut")
    assert [r["iteration"] for r in cut] == [1, 2, 3, 4]
    for a, b in zip(full, cut, strict=True):
        assert a["accepted"] == b["accepted"] and a["pool_index"] == b["pool_index"]
        assert (a["score"] is None and b["score"] is None) or a["score"] == pytest.approx(
            b["score"], rel=1e-5
        )
    metrics = read_metrics(tmp_path / "full")
    assert "bsgal_accept_rate" in metrics[-1]
    index = write_report(tmp_path / "full")
    report = index.parent
    assert {"acceptance.png", "scores.png", "categories.png", "summary.json"} <= {
        p.name for p in report.iterdir()
    }
    summary = json.loads((report / "summary.json").read_text())
    assert summary["decisions"] + summary["unscored (nothing pasted)"] == 4
    assert "accept_rate_by_corruption" in summary  # the synthetic pool records each instance's corruption
    assert "gallery/0000002_rank0_" in index.read_text() or summary["decisions"] < 2


def test_mixed_precision_covers_the_reference_pass(data, tmp_path, monkeypatch):
    """Accelerate's autocast wraps only ``model.forward``; the reference loss the cache is built from must run
    at the training forward's precision too."""
    seen = []
    original = CenterNet2.reference_cls_loss

    def spy(self, *args, **kwargs):
        seen.append(torch.is_autocast_enabled("cpu"))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(CenterNet2, "reference_cls_loss", spy)
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    reset_accelerate()
    try:
        engine.train(
            load_config(TINY, bsgal_overrides(data, tmp_path, "train.max_iter=2", "train.batch_size=2"))
        )
    finally:
        reset_accelerate()
    assert seen and all(seen)


@pytest.mark.parametrize("sync", ["global", "local"])
def test_two_processes(data, tmp_path, sync):
    """``accelerate launch --multi_gpu --num_processes 2`` on CPU (gloo): in global mode every process logs the
    same decisions; in both modes training runs and each process checkpoints its own BSGAL state."""
    # A dynamic threshold at a 50% acceptance rate: rejections happen, and in local mode the ranks disagree, so
    # DDP sees one rank train on its pasted batch and the other on its originals.
    sets = bsgal_overrides(
        data, tmp_path, "train.max_iter=3", "train.batch_size=2", f"bsgal.sync={sync}",
        "bsgal.dynamic_threshold=true", "bsgal.accept_rate=0.5",
    )  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"]
    launcher += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    launcher += ["--main_process_port", str(free_port())]
    proc = subprocess.run(
        [*launcher, str(REPO / "train.py"), "--config", str(TINY), *[x for s in sets for x in ("--set", s)]],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    records = read_decisions(tmp_path)
    by_rank = {r: [d for d in records if d["rank"] == r] for r in (0, 1)}
    assert [d["iteration"] for d in by_rank[0]] == [d["iteration"] for d in by_rank[1]] == [1, 2, 3]
    if sync == "global":
        for a, b in zip(by_rank[0], by_rank[1], strict=True):
            assert a["accepted"] == b["accepted"]
            assert (a["score"] is None) == (b["score"] is None)
            if a["score"] is not None:
                assert a["score"] == pytest.approx(b["score"], rel=1e-5)
    scored = [d for d in records if d["score"] is not None]
    assert any(not d["accepted"] for d in scored) and any(d["accepted"] for d in scored)
    for r in (0, 1):
        assert (tmp_path / "checkpoints" / "0000003" / "state" / f"bsgal_rank{r}.pt").is_file()
