"""evaluate.py and ``run_evaluation`` end to end on a tiny synthetic LVIS-format set (issue 3 item 4).

The CLI runs as users run it (a subprocess, once with ``accelerate launch --num_processes 2``); the protocol
checks use an oracle model that returns the ground truth, which must score AP 1.0.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pycocotools.mask as mask_util
import pytest
import torch

from divergen.checkpoint import save_weights
from divergen.config import load_config
from divergen.data import DetectionDataset, ResizeShortestEdge
from divergen.evaluation import evaluate_lvis, run_evaluation
from divergen.model import build_model
from divergen.synthetic import make_synthetic_lvis

ROOT = Path(__file__).resolve().parents[1]
# evaluate.py by path: the name "evaluate" could also be Hugging Face's package.
_spec = importlib.util.spec_from_file_location("divergen_evaluate_cli", ROOT / "evaluate.py")
evaluate = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(evaluate)
NUM_CATEGORIES = 5
# The tiny test model at the synthetic images' own size (96 x 128): inference takes milliseconds per image.
OVERRIDES = [
    f"model.num_classes={NUM_CATEGORIES}",
    "data.test_short_edge=96",
    "data.test_max_size=128",
    "eval.batch_size=2",
]


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("synthetic")
    return make_synthetic_lvis(
        root, num_train=12, num_val=7, num_categories=NUM_CATEGORIES, image_size=(96, 128), seed=3
    )


def _overrides(synthetic: dict[str, Path], output_dir: Path) -> list[str]:
    return [
        *OVERRIDES,
        f"data.train_json={synthetic['train_json']}",
        f"data.train_image_root={synthetic['image_root']}",
        f"data.val_json={synthetic['val_json']}",
        f"data.val_image_root={synthetic['image_root']}",
        f"train.output_dir={output_dir}",
    ]


@pytest.fixture(scope="module")
def weights(synthetic, tmp_path_factory) -> Path:
    """The weights of a random-init model of configs/tiny.toml (resnet18, FPN 64) for the synthetic set."""
    cfg = load_config(ROOT / "configs" / "tiny.toml", _overrides(synthetic, Path("unused")))
    torch.manual_seed(0)
    model = build_model(cfg.model)
    path = tmp_path_factory.mktemp("weights") / "tiny.safetensors"
    save_weights(model.state_dict(), path, {"iteration": "0"})
    return path


def _run_cli(args: list[str], *, launcher: list[str] | None = None, timeout: int = 120):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [*(launcher or [sys.executable]), str(ROOT / "evaluate.py"), *args]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def _cli_args(synthetic, weights, out: Path) -> list[str]:
    args = ["--config", str(ROOT / "configs" / "tiny.toml"), "--weights", str(weights), "--output", str(out)]
    for o in _overrides(synthetic, out.parent / "run"):
        args += ["--set", o]
    # A random-init model scores below the default 0.02: lower the threshold so that there are detections.
    return [*args, "--set", "model.roi_heads.score_thresh_test=0.0"]


@pytest.fixture(scope="module")
def cli_run(synthetic, weights, tmp_path_factory) -> tuple[subprocess.CompletedProcess, Path]:
    """``python evaluate.py ...`` on the synthetic val set, one process."""
    out = tmp_path_factory.mktemp("cli") / "eval"
    return _run_cli(_cli_args(synthetic, weights, out)), out


@pytest.mark.slow
def test_evaluate_cli_end_to_end(synthetic, cli_run):
    proc, out = cli_run
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    metrics = json.loads((out / "metrics.json").read_text())
    gt = json.loads(Path(synthetic["val_json"]).read_text())
    assert results, "the tiny model made no detection at score threshold 0"
    assert {r["category_id"] for r in results} <= {c["id"] for c in gt["categories"]}
    assert {r["image_id"] for r in results} == {im["id"] for im in gt["images"]}
    assert np.bincount([r["image_id"] for r in results]).max() <= 50  # eval.max_dets of tiny.toml
    assert all(len(r["bbox"]) == 4 and "counts" in r["segmentation"] for r in results)
    assert all(r["segmentation"]["size"] == [96, 128] for r in results)  # at the original image size
    # metrics.json is the LVIS evaluation of results.json, with the frequency split and per-category AP.
    expected = evaluate_lvis(gt, results, max_dets=50)
    for iou_type in ("bbox", "segm"):
        for key in ("AP", "AP50", "APr", "APc", "APf"):
            assert metrics[iou_type][key] == expected[iou_type][key], (iou_type, key)
        assert set(metrics[iou_type]["per_category"]) == {c["name"] for c in gt["categories"]}
    assert "APr" in proc.stdout and "segm" in proc.stdout  # the table


@pytest.mark.slow
def test_evaluate_cli_two_processes_equals_one(synthetic, weights, cli_run, tmp_path):
    """``accelerate launch --multi_gpu --num_processes 2`` on CPU (gloo): a shard per rank, every image once."""
    launcher = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0",
    ]  # fmt: skip
    proc = _run_cli(_cli_args(synthetic, weights, tmp_path / "eval"), launcher=launcher)
    assert proc.returncode == 0, proc.stderr[-3000:]
    shards = re.findall(r"inference: (\d+) images on this rank", proc.stderr)
    assert sorted(shards) == ["3", "4"], proc.stderr[-3000:]
    # The same detections as one process, image by image: rank 0's shard, then rank 1's, in dataset order;
    # both runs batch the same images together, so the numbers are the same.
    one = json.loads((cli_run[1] / "results.json").read_text())
    two = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert two == one
    m1 = json.loads((cli_run[1] / "metrics.json").read_text())
    assert json.loads((tmp_path / "eval" / "metrics.json").read_text()) == m1


def test_missing_weights_is_a_clear_error(synthetic, tmp_path, capsys):
    missing = tmp_path / "nope" / "model.safetensors"
    args = ["--config", str(ROOT / "configs" / "tiny.toml"), "--weights", str(missing)]
    for o in _overrides(synthetic, tmp_path):
        args += ["--set", o]
    with pytest.raises(SystemExit) as e:
        evaluate.main(args)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert str(missing) in err and "no such file" in err
    # No weights at all (no --weights, model.weights empty in tiny.toml).
    with pytest.raises(SystemExit):
        evaluate.main(args[:2] + args[4:])
    assert "no weights to evaluate" in capsys.readouterr().err


def test_missing_val_json_is_a_clear_error(synthetic, weights, tmp_path, capsys):
    args = ["--config", str(ROOT / "configs" / "tiny.toml"), "--weights", str(weights)]
    for o in [*_overrides(synthetic, tmp_path), f"data.val_json={tmp_path / 'missing.json'}"]:
        args += ["--set", o]
    with pytest.raises(SystemExit) as e:
        evaluate.main(args)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "data.val_json" in err and "missing.json" in err and "does not exist" in err


def test_weights_of_another_model_are_a_clear_error(synthetic, weights, tmp_path, caplog):
    """Strict loading: a checkpoint whose class count differs from the config's fails, naming the tensors."""
    args = ["--config", str(ROOT / "configs" / "tiny.toml"), "--weights", str(weights)]
    for o in [*_overrides(synthetic, tmp_path), f"model.num_classes={NUM_CATEGORIES + 1}"]:
        args += ["--set", o]
    assert evaluate.main(args) == 1
    assert "wrong shape" in caplog.text and "cls_score" in caplog.text


# ----------------------------------------------------------------------------------------------------------
# run_evaluation with an oracle model
# ----------------------------------------------------------------------------------------------------------


class _Oracle(torch.nn.Module):
    """Returns the ground truth of the image it is shown (recognised by a hash of its test-resized pixels) at
    ``output_sizes``: boxes, masks decoded from the annotations' RLEs, score 1."""

    def __init__(self, gt: dict, dataset: DetectionDataset):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(()))
        self.image_of = {_digest(dataset[i]["image"]): dataset.record(i)["id"] for i in range(len(dataset))}
        self.anns: dict[int, list] = {}
        for a in gt["annotations"]:
            self.anns.setdefault(a["image_id"], []).append(a)
        self.index = dataset.categories.id_to_index
        self.calls = 0

    def forward(self, images, *, output_sizes):
        assert not self.training and not torch.is_grad_enabled()
        self.calls += 1
        outs = []
        for im, (h, w) in zip(images, output_sizes, strict=True):
            anns = self.anns.get(self.image_of[_digest(im)], [])
            outs.append({
                "boxes": torch.tensor([[x, y, x + bw, y + bh] for x, y, bw, bh in (a["bbox"] for a in anns)])
                .reshape(-1, 4),
                "scores": torch.ones(len(anns)),
                "labels": torch.tensor([self.index[a["category_id"]] for a in anns], dtype=torch.int64),
                "masks": torch.from_numpy(
                    np.stack([mask_util.decode(a["segmentation"]) for a in anns]).astype(bool)
                ) if anns else torch.zeros(0, h, w, dtype=torch.bool),
            })  # fmt: skip
        return outs


def _digest(image: torch.Tensor) -> str:
    return hashlib.sha1(image.to(torch.uint8).contiguous().numpy().tobytes()).hexdigest()


class _MustUnwrap(torch.nn.DataParallel):
    """A wrapper as ``accelerator.prepare`` adds one; calling it instead of the unwrapped model is a bug."""

    def forward(self, *args, **kwargs):
        raise AssertionError("run_evaluation must run the unwrapped model")


def _oracle_setup(synthetic, tmp_path, val_json: Path | None = None):
    from accelerate import Accelerator

    cfg = load_config(ROOT / "configs" / "tiny.toml", _overrides(synthetic, tmp_path))
    if val_json is not None:
        cfg.data = dataclasses.replace(cfg.data, val_json=str(val_json))
    gt = json.loads(Path(cfg.data.val_json).read_text())
    dataset = DetectionDataset(
        cfg.data.val_json,
        cfg.data.val_image_root,
        transform=ResizeShortestEdge(short_edge=cfg.data.test_short_edge, max_size=cfg.data.test_max_size),
        filter_empty=False,
        load_masks=False,
    )
    return cfg, gt, _Oracle(gt, dataset), Accelerator(cpu=True)


def test_run_evaluation_oracle_gives_ap_one(synthetic, tmp_path):
    cfg, gt, oracle, accelerator = _oracle_setup(synthetic, tmp_path)
    wrapped = _MustUnwrap(oracle)
    wrapped.train()
    timings = {}
    metrics = run_evaluation(wrapped, cfg, accelerator, tmp_path / "out", timings=timings)
    assert oracle.training and wrapped.training  # mode restored
    assert oracle.calls == 4  # 7 images, eval.batch_size 2
    assert timings["images"] == 7 and timings["eval_s"] > 0
    for iou_type in ("bbox", "segm"):
        m = metrics[iou_type]
        assert m["AP"] == 1.0 and m["AP50"] == 1.0 and m["AP75"] == 1.0, (iou_type, m)
        # A frequency group scores 1 too, or -1 (undefined) when it has no category here.
        for group in "rcf":
            present = any(c["frequency"] == group for c in gt["categories"])
            assert m[f"AP{group}"] == (1.0 if present else -1.0), (iou_type, group, m)
    assert any(c["frequency"] == "r" for c in gt["categories"])
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert len(results) == len(gt["annotations"])
    saved = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert saved["bbox"]["AP"] == 1.0 and saved["segm"]["APr"] == 1.0


def test_run_evaluation_uses_coco_protocol_without_lvis_fields(synthetic, tmp_path):
    gt = json.loads(Path(synthetic["val_json"]).read_text())
    for im in gt["images"]:
        del im["neg_category_ids"], im["not_exhaustive_category_ids"]
    coco_json = tmp_path / "coco_val.json"
    coco_json.write_text(json.dumps(gt))
    cfg, gt, oracle, accelerator = _oracle_setup(synthetic, tmp_path, coco_json)
    metrics = run_evaluation(oracle, cfg, accelerator, tmp_path / "out")
    for iou_type in ("bbox", "segm"):
        m = metrics[iou_type]
        assert "APr" not in m and "AR@100" in m  # COCOeval's summary, at COCO's 100 detections
        assert m["AP"] == pytest.approx(1.0), (iou_type, m)


def test_run_evaluation_class_count_mismatch(synthetic, tmp_path):
    cfg = load_config(ROOT / "configs" / "tiny.toml", _overrides(synthetic, tmp_path))
    model = build_model(dataclasses.replace(cfg.model, num_classes=NUM_CATEGORIES + 2))
    from accelerate import Accelerator

    with pytest.raises(ValueError, match=r"scores 7 classes at test time but .* has 5 categories"):
        run_evaluation(model, cfg, Accelerator(cpu=True), tmp_path / "out")
    # A model trained on extra (pasted-only) classes is evaluated on the dataset's: test_num_classes.
    roi = dataclasses.replace(cfg.model.roi_heads, test_num_classes=NUM_CATEGORIES)
    model = build_model(dataclasses.replace(cfg.model, num_classes=NUM_CATEGORIES + 2, roi_heads=roi))
    metrics = run_evaluation(model, cfg, Accelerator(cpu=True), tmp_path / "out2")
    assert metrics is not None and "bbox" in metrics
    missing = dataclasses.replace(cfg.data, val_json=str(tmp_path / "absent.json"))
    with pytest.raises(FileNotFoundError, match="data.val_json"):
        run_evaluation(model, dataclasses.replace(cfg, data=missing), Accelerator(cpu=True), tmp_path)
