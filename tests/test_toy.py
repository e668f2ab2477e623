"""BSGAL's CIFAR-10 contribution experiment (appendix A.6) on the synthetic stand-in: contributions fall with the
noise level, the gradient-cache and lookahead estimators rank the levels alike, the estimator is divergen.bsgal's,
and the data, selection and config pieces behave as documented."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from divergen import bsgal
from divergen.config import ConfigError
from divergen.toy import (
    ToyConfig,
    ToyModelConfig,
    ToySelectConfig,
    add_noise,
    augment,
    batch_loss,
    build_toy_data,
    build_toy_model,
    load_cifar10,
    load_toy_config,
    lookahead,
    main,
    make_splits,
    run,
    select_batches,
    spearman,
)

LEVELS = [0.0, 40.0, 100.0, 200.0, 400.0]


def _small_config(tmp_path) -> ToyConfig:
    """Six splits of 500 synthetic images: R = split 1, five UNSEEN groups with noise 0..400 (a seen group would
    confound novelty with noise), a tiny CNN warmed up 10 epochs, candidate batches of 100."""
    cfg = ToyConfig(output_dir=str(tmp_path / "run"), seed=0, device="cpu", strategies=["real_selected"])
    cfg.data.source = "synthetic"
    cfg.data.num_splits = 6
    cfg.data.candidate_splits = [2, 3, 4, 5, 6]
    cfg.data.noise_levels = list(LEVELS)
    cfg.data.synthetic_train_size = 3000
    cfg.data.synthetic_test_size = 200
    cfg.model.arch = "tiny_cnn"
    cfg.solver.batch_size = 64
    cfg.solver.warmup_epochs = 10
    cfg.solver.epochs = 1
    cfg.solver.augment = False
    cfg.score.batch_size = 100
    cfg.score.reference_batch_size = 256
    cfg.score.reference_size = 500
    cfg.score.cache_update = "average"
    return cfg


@pytest.fixture(scope="module")
def experiment(tmp_path_factory):
    """One run of the experiment with spies on divergen.bsgal's GradCache (module-scoped: ~6 s on 2 cores)."""
    torch.set_num_threads(2)
    calls = {"update": 0, "dot_and_norms": 0}
    real_update, real_dot = bsgal.GradCache.update, bsgal.GradCache.dot_and_norms

    def update(self, grads):
        calls["update"] += 1
        return real_update(self, grads)

    def dot_and_norms(self, grads):
        calls["dot_and_norms"] += 1
        return real_dot(self, grads)

    cfg = _small_config(tmp_path_factory.mktemp("toy"))
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(bsgal.GradCache, "update", update)
        mp.setattr(bsgal.GradCache, "dot_and_norms", dot_and_norms)
        report = run(cfg)
    return cfg, report, calls


def test_grad_cache_contribution_falls_with_noise(experiment):
    _, report, _ = experiment
    assert [lv["noise"] for lv in report["levels"]] == LEVELS
    means = [lv["grad_cache"]["mean"] for lv in report["levels"]]
    assert all(a > b for a, b in zip(means, means[1:])), means
    assert report["warmup"]["test_acc"] > 0.5  # the scoring model has learnt the task


def test_estimators_rank_noise_levels_alike(experiment):
    _, report, _ = experiment
    la = [lv["lookahead"]["mean"] for lv in report["levels"]]
    assert all(a > b for a, b in zip(la, la[1:])), la
    assert report["spearman_levels"] == pytest.approx(1.0)
    assert report["spearman_noise"]["grad_cache"] == pytest.approx(-1.0)
    assert (
        report["spearman_batches"] > 0.5
    )  # batch by batch, too, the first-order estimate tracks the ideal one


def test_estimator_is_divergen_bsgal(experiment):
    _, report, calls = experiment
    n_batches = sum(lv["grad_cache"]["n"] for lv in report["levels"])
    assert n_batches == 5 * 5  # 500 images per group in batches of 100
    assert calls == {"update": n_batches, "dot_and_norms": n_batches}  # one cache update before each score


def test_outputs_and_selection(experiment):
    cfg, report, _ = experiment
    out = Path(cfg.output_dir)
    saved = json.loads((out / "report.json").read_text())
    assert saved["spearman_levels"] == pytest.approx(report["spearman_levels"])
    assert (out / "contributions.png").stat().st_size > 1000
    assert load_toy_config(out / "config.toml") == cfg  # the resolved config is saved and loads back
    sel = report["selection"]
    assert [p["noise"] for p in sel["per_level"]] == LEVELS  # every group is generated data here
    assert sel["per_level"][0]["accepted"] >= sel["per_level"][-1]["accepted"]
    kept = sum(p["accepted"] for p in sel["per_level"]) * 100
    assert report["strategies"]["real_selected"]["train_size"] == 500 + kept


# ------------------------------------------------------------------------------------------------ pieces


def test_spearman():
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 1, 0, -7]) == pytest.approx(-1.0)
    assert spearman([1, 2, 3], [5, 5, 6]) == pytest.approx(np.corrcoef([1, 2, 3], [1.5, 1.5, 3])[0, 1])
    assert np.isnan(spearman([1, 2, 3], [1, 1, 1]))


def test_select_batches_tau_and_keep_fraction():
    scores = [0.3, -0.04, -0.06, 0.1, -0.5]
    accept, th = select_batches(scores, ToySelectConfig(mode="tau", tau=-0.05))
    assert th == -0.05 and accept == [
        True,
        True,
        False,
        True,
        False,
    ]  # accept s >= τ (official: reject τ > s)
    accept, th = select_batches(scores, ToySelectConfig(mode="keep_fraction", keep_fraction=0.4))
    assert th == pytest.approx(np.percentile(scores, 60)) and accept == [True, False, False, True, False]


def test_lookahead_is_the_loss_drop_and_restores_weights():
    torch.manual_seed(0)
    model = build_toy_model(ToyModelConfig(arch="tiny_cnn", width=4)).eval()
    params = list(model.parameters())
    x = torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8)
    y = torch.randint(0, 10, (8,))
    rx, ry = x[:4].flip(0), y[:4]
    before = [p.detach().clone() for p in params]
    phi = lookahead(model, params, x, y, ref_images=rx, ref_labels=ry, lr=0.5)
    assert all(torch.equal(a, b) for a, b in zip(before, params))
    grads = torch.autograd.grad(batch_loss(model, x, y), params)
    with torch.no_grad():
        l0 = float(batch_loss(model, rx, ry))
        for p, g in zip(params, grads):
            p.sub_(0.5 * g)
        l1 = float(batch_loss(model, rx, ry))
    assert phi == pytest.approx(l0 - l1, rel=1e-5, abs=1e-7)


def test_noise_model_and_splits():
    gray = torch.full((64, 3, 32, 32), 128, dtype=torch.uint8)
    assert add_noise(gray, level=0, seed=1) is gray
    noisy = add_noise(gray, level=20, seed=1)
    assert noisy.dtype == torch.uint8 and torch.equal(noisy, add_noise(gray, level=20, seed=1))
    assert (noisy.float() - 128).std().item() == pytest.approx(20, rel=0.05)
    saturated = add_noise(gray, level=400, seed=1)  # clipped to [0, 255]: mostly 0 or 255
    assert ((saturated == 0) | (saturated == 255)).float().mean() > 0.6
    splits = make_splits(103, num_splits=5, seed=0)
    assert [len(s) for s in splits] == [20] * 5 and len(torch.cat(splits).unique()) == 100


def test_groups_share_labels_and_noise_only_where_asked(tmp_path):
    cfg = _small_config(tmp_path).data
    cfg.candidate_splits, cfg.noise_levels = [1, 2], [0.0, 40.0]
    data = build_toy_data(cfg, seed=0)
    assert torch.equal(data.groups[0].images, data.real_images)  # split 1 + noise 0 is R itself
    assert data.groups[1].images.shape == (500, 3, 32, 32) and len(data.test_labels) == 200


def test_augment_is_a_padded_crop_or_its_flip():
    x = torch.randint(1, 256, (6, 3, 32, 32), dtype=torch.uint8)
    out = augment(x, generator=torch.Generator().manual_seed(0))
    padded = torch.nn.functional.pad(x, (4, 4, 4, 4))
    for i in range(len(x)):
        crops = [padded[i, :, dy : dy + 32, dx : dx + 32] for dy in range(9) for dx in range(9)]
        assert any(torch.equal(out[i], c) or torch.equal(out[i], c.flip(-1)) for c in crops)


def test_resnet18_is_the_cifar_variant():
    model = build_toy_model(ToyConfig().model)
    assert model.conv1.kernel_size == (3, 3) and model.conv1.stride == (1, 1)
    assert isinstance(model.maxpool, torch.nn.Identity)
    assert model(torch.zeros(2, 3, 32, 32)).shape == (2, 10)


# ------------------------------------------------------------------------------------------------ errors


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ('[data]\nsource = "mnist"\n', "data.source"),
        ("[data]\nsorce = 1\n", "data.sorce"),
        ("[data]\nnoise_levels = [0, 40]\n", "data.noise_levels"),
        ("[data]\nreal_split = 0\n", "data.real_split"),
        ('[select]\nmode = "top"\n', "select.mode"),
        ("[score]\ncache_momentum = 1.0\n", "score.cache_momentum"),
        ('strategies = ["all"]\n', "strategies"),
        ('[solver]\nlr = "fast"\n', "solver.lr"),
    ],
)
def test_config_errors_name_the_key(tmp_path, text, key):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_toy_config(path)


def test_cli_rejects_bad_config_with_status_2(tmp_path, capsys):
    path = tmp_path / "bad.toml"
    path.write_text('[model]\narch = "vgg"\n')
    with pytest.raises(SystemExit) as e:
        main(["--config", str(path)])
    assert e.value.code == 2 and "model.arch" in capsys.readouterr().err


def test_cifar_loader_refuses_a_missing_directory(tmp_path, capsys):
    with pytest.raises(FileNotFoundError, match=r"data\.root.*cifar-10-batches-py.*data\.download = true"):
        load_cifar10(root=tmp_path / "nowhere", download=False)
    path = tmp_path / "c.toml"
    path.write_text(f'output_dir = "{tmp_path / "out"}"\n[data]\nroot = "{tmp_path / "nowhere"}"\n')
    with pytest.raises(SystemExit) as e:
        main(["--config", str(path)])
    assert e.value.code == 2 and "data.root" in capsys.readouterr().err


def test_shipped_configs_load():
    for name in ("configs/toy_cifar.toml", "configs/toy_demo.toml"):
        cfg = load_toy_config(name)
        assert len(cfg.data.candidate_splits) == len(cfg.data.noise_levels)
    cifar = load_toy_config("configs/toy_cifar.toml")
    assert (cifar.model.arch, cifar.solver.lr, cifar.solver.momentum, cifar.solver.weight_decay) == (
        "resnet18", 0.1, 0.9, 5e-4)  # fmt: skip
    assert cifar.solver.epochs == 200 and cifar.data.noise_levels == LEVELS
