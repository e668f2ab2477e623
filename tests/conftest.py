"""Shared fixtures: the official-implementation parity tensors of ``../shared/reference/parity``.

Users do not have ``shared/``; every test that needs it skips cleanly. ``DIVERGEN_PARITY_DIR``
points elsewhere if the fixtures live somewhere else.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

PARITY_DIR = Path(
    os.environ.get(
        "DIVERGEN_PARITY_DIR", Path(__file__).resolve().parents[2] / "shared" / "reference" / "parity"
    )
)


def _load(name: str) -> dict[str, torch.Tensor]:
    path = PARITY_DIR / f"{name}.safetensors"
    if not path.is_file():
        pytest.skip(f"parity fixture {path} not present (it ships with the developers' shared/ folder only)")
    from safetensors.torch import load_file

    # bf16 tensors are exact values that the official code consumed as fp32 (parity README, "bf16 means exact").
    return {k: v.float() if v.dtype == torch.bfloat16 else v for k, v in load_file(str(path)).items()}


@pytest.fixture(scope="session")
def heads_case() -> dict[str, torch.Tensor]:
    return _load("heads_case")


@pytest.fixture(scope="session")
def heads_weights() -> dict[str, torch.Tensor]:
    """The 80 official state-dict entries of the shrunk model (20 classes, FC width 128), fp32."""
    return _load("heads_weights")


@pytest.fixture(scope="session")
def swin_case() -> dict[str, torch.Tensor]:
    return _load("swin_case")


@pytest.fixture(scope="session")
def swin_weights() -> dict[str, torch.Tensor]:
    return _load("swin_weights")


@pytest.fixture(scope="session")
def fed_loss_cat_info_path() -> Path:
    path = PARITY_DIR / "fed_loss_cat_info_20.json"
    if not path.is_file():
        pytest.skip(f"parity fixture {path} not present")
    return path


def strip_prefix(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The entries of ``state`` under ``prefix``, with the prefix removed."""
    return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}


def assert_close_rel(actual: torch.Tensor, expected: torch.Tensor, rel: float = 1e-4, name: str = "") -> None:
    """max |actual - expected| <= rel * max |expected| (the parity README's tolerance definition)."""
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    scale = expected.abs().max().clamp(min=1e-12)
    err = (actual.float() - expected.float()).abs().max()
    assert err <= rel * scale, f"{name}: max abs diff {err:.3g} > {rel:g} x max|ref| {scale:.3g}"
