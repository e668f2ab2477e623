"""The instance pool: generated object cutouts with their categories, read lazily (divergen.md §1.4, §2).

Two index formats are read:

- ours, ``pool.jsonl`` (DESIGN.md "Data formats"), one JSON object per line: ``{"path": "images/3/00012.png",
  "category_id": <LVIS id>, "generator": "sd15|if|...", "prompt": ..., "clip_score": f, "clip_inter_sim": f,
  "seed": n, ...}``. Only ``path`` and ``category_id`` are required. Each path is an RGBA PNG cutout (tight
  crop, alpha = mask), used as is.
- the official X-Paste / DiverGen JSON ``{"<0-based category index>": ["*/abs/images/3/1.png", ...]}``
  (divergen.md §1.4). ``*path`` is a cutout used as is; any other entry (``image.png|mask.png``, or a plain
  path whose own alpha is the mask) is cut out at load time as the official ``InstPool._load_RGBA`` does:
  alpha > 128, the largest connected component (``largest_component``), rejected unless it covers more than
  1% and less than 100% of the image, cropped to its tight box.

Relative paths resolve against the index file's folder. The index is built once and shared by fork()ed loader
workers copy-on-write, so nothing in it is a per-instance Python object: the paths as written sit in one numpy
byte buffer with int64 end offsets, labels / scores / generator codes / jsonl line offsets in numpy arrays, and
``record(i)`` re-reads line i from the jsonl (one seek) instead of keeping it. Memory per instance is the path
length plus 43 bytes (path end offset, label, label-sorted index and line offset 8 each, two float32 scores,
an int16 generator code, a bool online-cutout flag). Measured (2 CPU cores): a 1M-record pool.jsonl (196 MB,
22-byte paths) builds in 6-6.5 s into a 65 MB index; RSS grows 75-100 MB (at most +150 MB while building).

Bad input: a malformed index line fails at construction with ``ValueError`` naming file:line, except a
truncated final line (a writer killed mid-line), which is skipped with a warning. A broken cutout makes
``load`` return ``None``, counted in ``num_skipped`` and logged (rate-limited); ``load`` never raises.
"""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
from array import array
from collections import Counter
from collections.abc import Collection, Iterable, Mapping, Sequence
from pathlib import Path

import cv2
import numpy as np
import torch
from PIL import Image

from .data import SKIP_COUNTER_SLOTS

logger = logging.getLogger(__name__)

POOL_INDEX_NAME = "pool.jsonl"
# Official InstPool (divergen.md §1.4): mask_threshold=128, instance_filter_min=0.01, instance_filter_max=1.0.
MASK_THRESHOLD = 128
MIN_AREA_FRACTION, MAX_AREA_FRACTION = 0.01, 1.0
# Broken samples logged per process: the first LOG_FIRST, then every LOG_EVERY-th (a pool with 1% broken
# files would otherwise write a warning every few images).
LOG_FIRST, LOG_EVERY = 20, 1000
# The optional score fields of pool.jsonl and the filter that reads each.
SCORE_FIELDS = ("clip_score", "clip_inter_sim")
_READ_ERRORS = (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError)


def largest_component(mask: np.ndarray) -> np.ndarray:
    """``(H, W)`` bool -> ``(H, W)`` bool: the largest connected component, holes filled (divergen.md §1.4).

    As the official ``get_largest_connect_component``: the external contours of ``mask``
    (``cv2.RETR_EXTERNAL``, ``CHAIN_APPROX_SIMPLE``), the one of largest ``cv2.contourArea`` (the first on a tie),
    filled with ``cv2.fillPoly``, which also fills its holes. A mask without any contour comes back unchanged.
    """
    m = np.ascontiguousarray(mask, dtype=np.uint8)
    contours, _ = cv2.findContours(m, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    if not contours:
        return m.astype(bool)
    largest = int(np.argmax([cv2.contourArea(c) for c in contours]))
    out = np.zeros_like(m)
    cv2.fillPoly(out, [contours[largest]], 1)
    return out.astype(bool)


def write_pool_index(records: Iterable[dict], path: str | os.PathLike) -> Path:
    """Write ``records`` as a ``pool.jsonl`` index, atomically (temporary file, then ``os.replace``).

    ``path`` is the ``.jsonl`` file or a directory (the index is then ``path/pool.jsonl``). Paths are written
    as given; relative ones resolve against the index's folder when read. Returns the index file.

    Arguments:
        records: dicts with at least ``path`` (str) and ``category_id`` (int, LVIS id); other keys are kept.
        path: the index file or its directory.
    """
    path = Path(path)
    if path.is_dir() or not path.suffix:
        path = path / POOL_INDEX_NAME
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            for n, r in enumerate(records):
                if not isinstance(r.get("path"), str) or not r["path"]:
                    raise ValueError(f"{path}: record {n} needs 'path' (a non-empty string), got {r!r}")
                if not _is_int(r.get("category_id")):
                    raise ValueError(f"{path}: record {n} needs 'category_id' (an int), got {r!r}")
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
    return path


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


class _Filters:
    """The construction-time filters and their per-reason drop counts; ``drop_reason`` is the first that fails."""

    def __init__(self, labels, generators, thresholds: dict[str, float | None], num_classes, counts: Counter):
        self.labels = None if labels is None else {int(c) for c in labels}
        self.generators = set(generators)
        self.thresholds = {k: float(t) for k, t in thresholds.items() if t is not None}
        self.num_classes = num_classes
        self.counts = counts

    def drop_reason(
        self, label: int, generator: str | None, scores: Sequence[float], where: str
    ) -> str | None:
        # Checked before any filter: a pool with labels the model lacks is a configuration error, not noise.
        if self.num_classes is not None and not 0 <= label < self.num_classes:
            raise ValueError(
                f"{where}: label {label} is outside [0, {self.num_classes}): the model has "
                f"{self.num_classes} classes"
            )
        if self.labels is not None and label not in self.labels:
            return "label"
        if self.generators and generator not in self.generators:
            return "generator"
        for field, value in zip(SCORE_FIELDS, scores):
            if field in self.thresholds:
                if math.isnan(value):
                    return f"missing {field}"
                if not value >= self.thresholds[field]:
                    return field
        return None


class _IndexBuilder:
    """Growable typed buffers (``bytearray`` / ``array``: raw values, no Python object per entry) that the
    readers append to; ``InstancePool`` copies them into numpy arrays."""

    def __init__(self):
        self.paths, self.ends, self.labels, self.line_offsets = (
            bytearray(),
            array("q"),
            array("q"),
            array("q"),
        )
        self.scores = tuple(array("f") for _ in SCORE_FIELDS)
        self.generators, self.online = array("h"), array("b")
        self.generator_names: list[str] = []
        self._generator_code: dict[str | None, int] = {None: -1}

    def add(
        self,
        entry: str,
        label: int,
        generator: str | None,
        scores: Sequence[float],
        line_offset: int,
        *,
        online: bool,
    ) -> None:
        self.paths.extend(os.fsencode(entry))
        self.ends.append(len(self.paths))
        self.labels.append(label)
        self.line_offsets.append(line_offset)
        for buf, value in zip(self.scores, scores):
            buf.append(value)
        if generator not in self._generator_code:
            self._generator_code[generator] = len(self.generator_names)
            self.generator_names.append(generator)
        self.generators.append(self._generator_code[generator])
        self.online.append(online)


class InstancePool:
    """An instance pool (``pool.jsonl`` or the official JSON), filtered at construction, cutouts read lazily.

    ``labels`` (N,) int64 are 0-based model labels; ``categories`` the sorted labels with at least one instance;
    ``instances_of(label)`` the indices of a label's instances (the official ``cas_random`` sampling draws a
    category, then an instance within it: divergen.md §2). ``num_filtered`` counts the records dropped by each
    filter (the first that fails): "label", "generator", "clip_score" / "clip_inter_sim" (below the threshold),
    "missing clip_score" / "missing clip_inter_sim" (no value), and "truncated final line".

    Also: ``clip_scores`` / ``inter_similarities`` (N,) float32 (NaN where the record has none),
    ``generator(i)``, ``format`` ("jsonl" or "official"), ``index_path`` and ``root`` (paths resolve against it).

    Labels: a pool.jsonl ``category_id`` is an LVIS id and maps through ``id_to_index``; an id above all of its
    keys continues contiguously after the mapped labels (LVIS 1..1203 -> 0..1202, then DiverGen's ImageNet
    extras 1204..1453 -> 1203..1452: divergen.md §3); ``id_to_index=None`` means label = id - 1. An official
    JSON key is the label itself.

    Arguments:
        path: a ``pool.jsonl`` file, a directory holding one, or an official-format ``.json``.
        id_to_index: LVIS id -> contiguous label (``CategoryInfo.id_to_index``); None = id - 1.
        num_classes: if given, a label outside [0, num_classes) is a ``ValueError`` (before any filter).
        min_clip_score: keep records with ``clip_score`` >= this (records without one are dropped).
        min_inter_similarity: keep records with ``clip_inter_sim`` >= this (the DiverGen filter, §1.3 (b)).
        generators: keep records whose ``generator`` is one of these; empty = all.
        labels: keep only instances of these labels (e.g. a frequency group).
    """

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        id_to_index: Mapping[int, int] | None = None,
        num_classes: int | None = None,
        min_clip_score: float | None = None,
        min_inter_similarity: float | None = None,
        generators: Sequence[str] = (),
        labels: Collection[int] | None = None,
    ):
        path = Path(path)
        if path.is_dir():
            path = path / POOL_INDEX_NAME
            if not path.is_file():
                raise FileNotFoundError(
                    f"{path.parent}: the instance-pool directory has no {POOL_INDEX_NAME}"
                )
        if path.suffix not in (".jsonl", ".json"):
            raise ValueError(
                f"{path}: expected a pool.jsonl index, a directory holding one, or an official .json pool"
            )
        self.index_path, self.root = path, path.parent
        counts: Counter = Counter()
        thresholds = {"clip_score": min_clip_score, "clip_inter_sim": min_inter_similarity}
        filters = _Filters(labels, generators, thresholds, num_classes, counts)
        index = _IndexBuilder()
        if path.suffix == ".jsonl":
            self.format = "jsonl"
            self._read_jsonl(path, id_to_index, filters, index)
        else:
            self.format = "official"
            if any(t is not None for t in thresholds.values()):
                raise ValueError(
                    f"{path}: the official pool format carries no CLIP scores, so min_clip_score / "
                    "min_inter_similarity cannot filter it (use a pool.jsonl, or filter before building the JSON)"
                )
            self._read_official(path, filters, index)
        self.num_filtered: dict[str, int] = dict(counts)
        self.generator_names = index.generator_names
        self._paths, self._path_ends = _numpy(index.paths, np.uint8), _numpy(index.ends, np.int64)
        self.labels, self._line_offsets = _numpy(index.labels, np.int64), _numpy(index.line_offsets, np.int64)
        self.clip_scores, self.inter_similarities = (_numpy(b, np.float32) for b in index.scores)
        self._generators = _numpy(index.generators, np.int16)
        self._online = _numpy(index.online, np.int8).view(bool)
        del index
        # Instances grouped by label: _by_label[_starts[k]:_starts[k + 1]] are those of categories[k].
        self._by_label = _frozen(np.argsort(self.labels, kind="stable"))
        self.categories, first = np.unique(self.labels[self._by_label], return_index=True)
        self.categories = _frozen(self.categories)
        self._starts = _frozen(np.append(first, len(self.labels)).astype(np.int64))
        # A counter slot per process (0 = main, w + 1 = worker w) in shared memory, as DetectionDataset's.
        self._skipped = torch.zeros(SKIP_COUNTER_SLOTS, dtype=torch.int64).share_memory_()
        if len(self) == 0:
            logger.warning(f"{path}: no instance left in the pool ({self.summary()})")

    # -------------------------------------------------------------------------------------------- reading

    def _read_jsonl(
        self, path: Path, id_to_index: Mapping[int, int] | None, filters: _Filters, index: _IndexBuilder
    ) -> None:
        if id_to_index is not None:
            if not id_to_index:
                raise ValueError(f"{path}: id_to_index is empty")
            max_id, max_label = max(id_to_index), max(id_to_index.values())
        offset = 0
        with open(path, "rb") as f:
            for lineno, line in enumerate(f, start=1):
                line_offset, offset = offset, offset + len(line)
                if not line.strip():
                    continue
                where = f"{path}:{lineno}"
                try:
                    r = json.loads(line)
                except ValueError as e:
                    if not line.endswith(b"\n"):  # only the last line can lack it: a writer killed mid-line
                        logger.warning(f"{where}: skipping the truncated final line ({e})")
                        filters.counts["truncated final line"] += 1
                        continue
                    raise ValueError(f"{where}: expected a JSON object ({e})") from None
                if not isinstance(r, dict):
                    raise ValueError(f"{where}: expected a JSON object, got {type(r).__name__}")
                entry, cid = r.get("path"), r.get("category_id")
                if not isinstance(entry, str) or not entry:
                    raise ValueError(f"{where}: expected 'path' (a non-empty string), got {entry!r}")
                if not _is_int(cid):
                    raise ValueError(f"{where}: expected 'category_id' (an int LVIS id), got {cid!r}")
                generator = r.get("generator")
                if generator is not None and not isinstance(generator, str):
                    raise ValueError(f"{where}: expected 'generator' to be a string, got {generator!r}")
                scores = []
                for field in SCORE_FIELDS:
                    v = r.get(field)
                    if v is not None and not _is_number(v):
                        raise ValueError(f"{where}: expected {field!r} to be a number, got {v!r}")
                    scores.append(math.nan if v is None else float(v))
                if id_to_index is None:
                    label = cid - 1
                    if label < 0:
                        raise ValueError(f"{where}: category_id {cid}: LVIS ids are 1-based")
                elif cid in id_to_index:
                    label = id_to_index[cid]
                elif cid > max_id:
                    label = max_label + (cid - max_id)
                else:
                    raise ValueError(
                        f"{where}: category_id {cid} is not in id_to_index (ids up to {max_id}); only ids "
                        f"above {max_id} (extra categories) map past it, to {max_label} + (id - {max_id})"
                    )
                reason = filters.drop_reason(label, generator, scores, where)
                if reason is not None:
                    filters.counts[reason] += 1
                    continue
                index.add(entry, label, generator, scores, line_offset, online=False)

    def _read_official(self, path: Path, filters: _Filters, index: _IndexBuilder) -> None:
        with open(path, "rb") as f:
            try:
                data = json.load(f)
            except ValueError as e:
                raise ValueError(f"{path}: expected an official pool JSON object ({e})") from None
        if not isinstance(data, dict):
            raise ValueError(f"{path}: expected a JSON object {{'<0-based category>': [paths]}}")
        no_scores = (math.nan, math.nan)
        for key, entries in data.items():
            where = f"{path}: key {key!r}"
            if not (isinstance(key, str) and key.isdecimal()):
                raise ValueError(f"{where}: expected a 0-based category index")
            if not isinstance(entries, list):
                raise ValueError(f"{where}: expected a list of paths, got {type(entries).__name__}")
            label = int(key)
            for j, e in enumerate(entries):
                if not isinstance(e, str) or e in ("", "*"):
                    raise ValueError(f"{where}, entry {j}: expected a path string, got {e!r}")
                reason = filters.drop_reason(label, None, no_scores, where)
                if reason is not None:
                    filters.counts[reason] += 1
                    continue
                # "*path": cropped already; anything else is cut out at load time (official _load_RGBA).
                cut = e.startswith("*")
                index.add(e[1:] if cut else e, label, None, no_scores, -1, online=not cut)

    # -------------------------------------------------------------------------------------------- access

    def __len__(self) -> int:
        return len(self.labels)

    def instances_of(self, label: int) -> np.ndarray:
        """``(n,)`` int64 indices of ``label``'s instances, in index order; empty if it has none (read-only)."""
        k = int(np.searchsorted(self.categories, label))
        if k == len(self.categories) or self.categories[k] != label:
            return self._by_label[:0]
        return self._by_label[self._starts[k] : self._starts[k + 1]]

    def _entry(self, i: int) -> str:
        if not 0 <= i < len(self):
            raise IndexError(f"instance {i} out of range for a pool of {len(self)}")
        start = int(self._path_ends[i - 1]) if i > 0 else 0
        return os.fsdecode(self._paths[start : int(self._path_ends[i])].tobytes())

    def path(self, i: int) -> Path:
        """The image file of instance ``i`` (for an official ``image|mask`` entry, the image)."""
        entry = self._entry(i)
        return self.root / (entry.split("|", 1)[0] if self._online[i] else entry)

    def record(self, i: int) -> dict:
        """Instance ``i``'s jsonl record, re-read from the index (``path`` resolved, ``label`` added); for the
        official format ``{"path", "label"}`` (+ ``"mask_path"`` for an ``image|mask`` entry)."""
        entry, label = self._entry(i), int(self.labels[i])
        if self.format == "official":
            if not self._online[i] or "|" not in entry:
                return {"path": str(self.root / entry), "label": label}
            image, mask = entry.split("|", 1)
            return {"path": str(self.root / image), "mask_path": str(self.root / mask), "label": label}
        with open(self.index_path, "rb") as f:
            f.seek(int(self._line_offsets[i]))
            line = f.readline()
        try:
            r = json.loads(line)
        except ValueError:
            r = None
        if not isinstance(r, dict) or r.get("path") != entry:
            raise RuntimeError(
                f"{self.index_path}: the index changed since the pool was read (instance {i}, {entry!r}, "
                f"is no longer at byte {int(self._line_offsets[i])}); rebuild the InstancePool"
            )
        return {**r, "path": str(self.root / entry), "label": label}

    def generator(self, i: int) -> str | None:
        """The ``generator`` of instance ``i`` (None when unrecorded, as in the official format)."""
        code = int(self._generators[i])
        return None if code < 0 else self.generator_names[code]

    @property
    def num_skipped(self) -> int:
        """Instances ``load`` found broken so far, summed over all worker processes."""
        return int(self._skipped.sum())

    def load(self, i: int) -> np.ndarray | None:
        """``(h, w, 4)`` uint8 RGBA cutout of instance ``i`` (an RGB file gets alpha 255), or None if broken.

        Broken: unreadable or missing file, an all-zero alpha, or (official non-``*`` entries) a kept
        component covering <= 1% or >= 100% of the image. Counted in ``num_skipped`` and logged; never raises.
        """
        entry = self._entry(i)
        try:
            if not self._online[i]:
                with Image.open(self.root / entry) as f:
                    rgba = np.array(f.convert("RGBA"))
                reason = "the alpha channel is all zero" if not rgba[..., 3].any() else None
            else:
                rgba, reason = self._load_online(entry)
        except FileNotFoundError as e:
            rgba, reason = None, f"file not found: {e.filename}"
        except _READ_ERRORS as e:
            rgba, reason = None, f"{type(e).__name__}: {e}"
        if reason is None:
            return rgba
        self._skip(i, entry, reason)
        return None

    def _load_online(self, entry: str) -> tuple[np.ndarray | None, str | None]:
        """The official online cut-out (``InstPool._load_RGBA`` with ``preprocessed=False``, divergen.md §1.4).

        Differences from the official: an unreadable or wrongly sized mask is a broken sample (the official
        prints and goes on with the image's own alpha), the mask is read as 8-bit grey (``convert("L")``, so a
        1-bit PNG gives 0/255, not 0/1), and the cut-out always happens (the official skips it, area check
        included, under RANDOM_SCALE or for a category missing from area_mean_std2, i.e. the ImageNet extras).
        """
        image_path, _, mask_path = entry.partition("|")
        with Image.open(self.root / image_path) as f:
            rgba = np.array(f.convert("RGBA"))
        if mask_path:
            with Image.open(self.root / mask_path) as f:
                mask = np.array(f.convert("L"))
            if mask.shape != rgba.shape[:2]:
                (mh, mw), (h, w) = mask.shape, rgba.shape[:2]
                return None, f"the mask is {mw}x{mh} px but the image {w}x{h} px"
            rgba[..., 3] = mask
        keep = largest_component(rgba[..., 3] > MASK_THRESHOLD)
        area = keep.mean()
        if not MIN_AREA_FRACTION < area < MAX_AREA_FRACTION:
            return None, f"the mask's largest component covers {area:.2%} of the image, outside (1%, 100%)"
        ys, xs = np.nonzero(keep.any(axis=1))[0], np.nonzero(keep.any(axis=0))[0]
        y0, y1, x0, x1 = ys[0], ys[-1], xs[0], xs[-1]
        if y1 <= y0 or x1 <= x0:
            return None, f"the mask's largest component is {y1 - y0 + 1}x{x1 - x0 + 1} px"
        # alpha *= component, as the official `img_RGBA[:, :, 3:] *= seg_mask`: pixels outside the component
        # go transparent; inside, the mask's own values stay (a hole that the mask leaves at 0 stays a hole).
        rgba[..., 3] *= keep
        return np.ascontiguousarray(rgba[y0 : y1 + 1, x0 : x1 + 1]), None

    def _skip(self, i: int, entry: str, reason: str) -> None:
        worker = torch.utils.data.get_worker_info()
        slot = 0 if worker is None else 1 + worker.id % (SKIP_COUNTER_SLOTS - 1)
        self._skipped[slot] += 1
        n = int(self._skipped[slot])  # this process's count: the rate limit is per process
        if n <= LOG_FIRST or n % LOG_EVERY == 0:
            more = f" (logging every {LOG_EVERY}th from now on in this process)" if n == LOG_FIRST else ""
            where = (
                "|".join(str(self.root / p) for p in entry.split("|"))
                if self._online[i]
                else self.root / entry
            )
            logger.warning(f"skipping pool instance {i} ({where}): {reason} [{n} so far]{more}")

    def summary(self) -> str:
        """One line: instances, categories, instances per generator, records filtered out."""
        codes, counts = np.unique(self._generators, return_counts=True)
        gens = ", ".join(
            f"{'(none)' if c < 0 else self.generator_names[c]} {n}"
            for c, n in zip(codes.tolist(), counts.tolist())
        )
        filtered = ", ".join(f"{k} {n}" for k, n in sorted(self.num_filtered.items())) or "none"
        return (
            f"instance pool {self.index_path}: {len(self)} instances, {len(self.categories)} categories; "
            f"generators: {gens or '-'}; filtered out: {filtered}"
        )


def _numpy(buffer: bytearray | array, dtype) -> np.ndarray:
    """A read-only numpy copy of a growable buffer (``np.frombuffer`` cannot take an empty one)."""
    a = np.frombuffer(buffer, dtype=dtype).copy() if len(buffer) else np.zeros(0, dtype=dtype)
    return _frozen(a)


def _frozen(a: np.ndarray) -> np.ndarray:
    """Read-only, so that no caller can change the index that every worker shares."""
    a.flags.writeable = False
    return a
