"""Weights files: atomic writes, EMA preference, strict/non-strict loading with clear errors."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from divergen.checkpoint import EMA_FILE, MODEL_FILE, load_weights, read_weights, save_weights


def _net(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))


def test_round_trip_with_metadata(tmp_path):
    a, b = _net(0), _net(1)
    save_weights(a.state_dict(), tmp_path / "w.safetensors", {"iteration": "7"})
    assert load_weights(b, tmp_path / "w.safetensors") == {"iteration": "7"}
    for (k, va), vb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(va, vb), k
    assert [p.name for p in tmp_path.iterdir()] == ["w.safetensors"]  # no temporary file left


def test_directory_prefers_ema(tmp_path):
    model, ema = _net(0), _net(1)
    save_weights(model.state_dict(), tmp_path / MODEL_FILE)
    save_weights(ema.state_dict(), tmp_path / EMA_FILE)
    target = _net(2)
    load_weights(target, tmp_path)
    assert torch.equal(target[0].weight, ema[0].weight)
    load_weights(target, tmp_path, prefer_ema=False)
    assert torch.equal(target[0].weight, model[0].weight)


def test_failed_write_keeps_old_file(tmp_path, monkeypatch):
    path = tmp_path / "w.safetensors"
    save_weights(_net(0).state_dict(), path)
    before = read_weights(path)[0]

    def crash(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr("divergen.checkpoint.save_file", crash)
    with pytest.raises(RuntimeError, match="disk full"):
        save_weights(_net(1).state_dict(), path)
    after = read_weights(path)[0]
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert [p.name for p in tmp_path.iterdir()] == ["w.safetensors"]


def test_errors_name_the_problem(tmp_path):
    state = _net(0).state_dict()
    partial = {k: v for k, v in state.items() if not k.startswith("1.")}
    save_weights(partial, tmp_path / "partial.safetensors")
    with pytest.raises(ValueError, match="missing keys"):
        load_weights(_net(1), tmp_path / "partial.safetensors")
    load_weights(_net(1), tmp_path / "partial.safetensors", strict=False)  # backbone-only style: allowed
    save_weights({"0.weight": torch.zeros(5, 3)}, tmp_path / "bad.safetensors")
    with pytest.raises(ValueError, match=r"0\.weight: file \(5, 3\) vs model \(4, 3\)"):
        load_weights(_net(1), tmp_path / "bad.safetensors", strict=False)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_weights(_net(1), tmp_path / "nope.safetensors")
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(FileNotFoundError, match="checkpoint directory without"):
        load_weights(_net(1), tmp_path / "empty_dir")
    (tmp_path / "x.pth").write_bytes(b"")
    with pytest.raises(ValueError, match="convert official"):
        load_weights(_net(1), tmp_path / "x.pth")
