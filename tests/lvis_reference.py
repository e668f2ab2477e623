"""The reference LVIS evaluator, lvis-api 0.5.3, run as detectron2's LVISEvaluator runs it.

Used by tests/test_evaluation.py (equality with ``divergen.lvis_eval``) and benchmarks/evaluate.py (speed).
lvis 0.5.3 predates numpy 2 (``np.float``) and its ``__init__`` imports a visualiser (cv2, matplotlib) that
evaluation does not need; ``patch_lvis_import`` works around both.
"""

from __future__ import annotations

import copy
import importlib.util
import logging
import sys
import types
from typing import Any

import numpy as np


def patch_lvis_import(monkeypatch: Any = None) -> bool:
    """Make ``lvis.eval`` importable under numpy 2; False when the package is not installed.

    With a pytest ``monkeypatch``, the patch is undone after the test.
    """
    spec = importlib.util.find_spec("lvis")
    if spec is None:
        return False
    pkg = types.ModuleType("lvis")  # skips lvis/__init__.py
    pkg.__path__ = list(spec.submodule_search_locations)
    if monkeypatch is not None:
        monkeypatch.setattr(np, "float", float, raising=False)
        if "lvis.eval" not in sys.modules:
            monkeypatch.setitem(sys.modules, "lvis", pkg)
    else:
        np.float = float  # noqa: NPY001
        sys.modules.setdefault("lvis", pkg)
    return True


def lvis_api_evaluate(gt: dict, results: list[dict], iou_type: str, max_dets: int = 300) -> tuple[dict, Any]:
    """``(summary, precision array)`` of lvis-api on ``results`` (``bbox`` dropped for segm, as detectron2)."""
    from lvis.eval import LVISEval
    from lvis.lvis import LVIS
    from lvis.results import LVISResults

    lvis_gt = LVIS.__new__(LVIS)
    lvis_gt.logger = logging.getLogger("lvis")
    lvis_gt.dataset = copy.deepcopy(gt)
    lvis_gt._create_index()
    results = copy.deepcopy(results)
    if iou_type == "segm":
        for r in results:
            r.pop("bbox", None)
    ev = LVISEval(lvis_gt, LVISResults(lvis_gt, results, max_dets=max_dets), iou_type)
    ev.run()
    return {k: float(v) for k, v in ev.results.items()}, ev.eval["precision"]
