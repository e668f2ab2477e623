"""Stage 1 of the generation pipeline: the categories to generate, their prompts, and one job per image
(divergen.md §1.1).

Categories come from an LVIS/COCO annotation file, plus optionally an extra-category JSON (the official 1453-entry
``ImageNet2012_filtered04_lvis_v1_train_cat_info_250.json``: LVIS's 1203 categories, then 250 ImageNet ones with
ids 1204-1453). Prompts are either one template line per category (``template_prompt``, the official
``tools/generate_prompt.py``) or prompt files in the official layout ``input/<set>/<lvis_id>.txt``, one prompt
per line (``read_prompt_dir``; e.g. the 128 ChatGPT lines of ``gpt_prompt/``).

Optionally, a local LLM writes the diverse prompt lists (``diversify.diversify_prompts``, DiverGen's 128 ChatGPT
prompts per category with a model of your choice) and ``write_prompt_dir`` stores them in that layout.

``plan_jobs`` expands them into one ``GenerationJob`` per image with its own seed, and ``shard_jobs`` splits the
jobs over ranks by whole categories. A job's seed depends only on (seed, category_id, prompt_index,
sample_index), so adding categories, raising ``images_per_category`` or resuming never changes the seed of a job
that already exists, and the official ``torch.manual_seed(42 + rank)`` dependence on the world size is gone.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .data import CategoryInfo

logger = logging.getLogger(__name__)

# divergen.md §1.1: X-Paste's SD prompt, and DiverGen's template line (tools/generate_prompt.py).
TEMPLATES = {
    "xpaste": "a photo of a single {name}",
    "divergen": "a photo of a single {name}, {definition}, in a white background",
}
FREQUENCIES = ("r", "c", "f")
# A job's index inside its category is prompt_index << 16 | sample_index: both must fit in 16 bits.
MAX_PROMPTS = MAX_SAMPLES_PER_PROMPT = 1 << 16
_MASK32 = 0xFFFFFFFF
_PROMPT_FILE = re.compile(r"[0-9]+\.txt")


@dataclass(frozen=True)
class PromptCategory:
    """One category to generate.

    ``category_id`` is the LVIS id (1-based); extra categories continue after the dataset's ids. ``name`` is as
    in the annotation file (``"aerosol_can"``), ``definition`` the LVIS ``def`` / WordNet gloss ("" if absent),
    ``frequency`` "r" | "c" | "f" ("" for an extra category without one).
    """

    category_id: int
    name: str
    definition: str = ""
    synonyms: tuple[str, ...] = ()
    frequency: str = ""


@dataclass(frozen=True, slots=True)
class GenerationJob:
    """One image to generate: ``prompt`` (the ``prompt_index``-th of its category) for the ``sample_index``-th
    time, from ``seed`` (a 32-bit int, ``0 <= seed < 2**32``)."""

    category_id: int
    prompt: str
    prompt_index: int
    sample_index: int
    seed: int


# ------------------------------------------------------------------------------------------------ categories


def load_categories(
    annotation_json: str | os.PathLike, *, extra: str | os.PathLike | None = None
) -> list[PromptCategory]:
    """The categories of an LVIS/COCO annotation file, plus those of an extra-category file, sorted by id.

    ``frequency`` is ``CategoryInfo``'s (counted from the file's annotations); a file without ``annotations``
    (categories only) keeps its records' own ``frequency`` field, or "".

    Arguments:
        annotation_json: LVIS/COCO annotation file; ``name``, ``def`` and ``synonyms`` of each category record.
        extra: optional JSON list of ``{"id", "name", "def"?, "synonyms"?, "frequency"?}`` records, the shape of
            the official 1453-entry cat-info file (divergen.md §1.1). An entry whose id is a dataset category
            with the same name is skipped (so that file can be passed as is); any other clash, a duplicate id,
            or a new id not above every dataset id is a ``ValueError`` naming the file and id. New ids must come
            last so that a classifier over dataset + extra categories truncates to the dataset's (divergen.md
            §0, §6 item 7).
    """
    with open(annotation_json) as f:
        data = json.load(f)
    if not isinstance(data, dict) or not isinstance(data.get("categories"), list):
        raise ValueError(f"{annotation_json}: expected an LVIS/COCO annotation file with a 'categories' list")
    info = CategoryInfo.from_annotations(data, annotation_json)
    records = {int(c["id"]): c for c in data["categories"]}
    counted = "annotations" in data
    categories = [
        _category(
            records[cid],
            annotation_json,
            f"categories[id={cid}]",
            name=name,
            frequency=freq if counted else records[cid].get("frequency", ""),
        )
        for cid, name, freq in zip(info.ids, info.names, info.frequency)
    ]
    if extra is not None:
        categories += _load_extra(extra, {c.category_id: c.name for c in categories})
    return categories


def _load_extra(path: str | os.PathLike, dataset: dict[int, str]) -> list[PromptCategory]:
    with open(path) as f:
        entries = json.load(f)
    if not isinstance(entries, list):
        raise ValueError(f"{path}: expected a JSON list of {{'id', 'name', 'def'?, 'synonyms'?}} records")
    last_id = max(dataset, default=0)
    out: dict[int, PromptCategory] = {}
    for i, e in enumerate(entries):
        where = f"entry {i}"
        cid = e.get("id") if isinstance(e, dict) else None
        if not isinstance(cid, int) or isinstance(cid, bool) or cid < 1:
            raise ValueError(f"{path}: {where}: expected a dict with an integer 'id' >= 1, got {e!r:.200}")
        where = f"entry {i} (id {cid})"
        if cid in dataset:
            if e.get("name") != dataset[cid]:
                raise ValueError(
                    f"{path}: {where}: name {e.get('name')!r} clashes with the dataset's category {cid} "
                    f"{dataset[cid]!r}"
                )
            continue  # the dataset's own category, as in the official 1453-entry file
        if cid in out:
            raise ValueError(f"{path}: {where}: duplicate id")
        if cid <= last_id:
            raise ValueError(
                f"{path}: {where}: extra category ids must continue after the dataset's (max id {last_id})"
            )
        out[cid] = _category(e, path, where, name=e.get("name"), frequency=e.get("frequency", ""))
    return sorted(out.values(), key=lambda c: c.category_id)


def _category(record: dict, path, where: str, *, name, frequency) -> PromptCategory:
    """A ``PromptCategory`` from a category record, its fields checked (errors name ``path`` and ``where``)."""
    definition = record.get("def", "")
    synonyms = record.get("synonyms", [])
    if not isinstance(name, str) or not name:
        raise ValueError(f"{path}: {where}: expected a non-empty string 'name', got {name!r}")
    if not isinstance(definition, str):
        raise ValueError(f"{path}: {where}: expected a string 'def', got {definition!r:.200}")
    if not isinstance(synonyms, list) or not all(isinstance(s, str) for s in synonyms):
        raise ValueError(
            f"{path}: {where}: expected 'synonyms' to be a list of strings, got {synonyms!r:.200}"
        )
    if frequency not in (*FREQUENCIES, ""):
        raise ValueError(f"{path}: {where}: expected 'frequency' in {FREQUENCIES}, got {frequency!r}")
    return PromptCategory(int(record["id"]), name, definition, tuple(synonyms), frequency)


# ------------------------------------------------------------------------------------------------ prompts


def template_prompt(category: PromptCategory, template: str = "divergen") -> str:
    """The template prompt of ``category`` (divergen.md §1.1, official ``tools/generate_prompt.py``).

    The name's "_" become spaces: ``aerosol_can`` -> "a photo of a single aerosol can, a dispenser that holds
    a substance under pressure, in a white background". A template using ``{definition}`` on a category without
    one falls back to the ``"xpaste"`` form "a photo of a single {name}", where the official would write
    "a photo of a single x, , in a white background".

    Arguments:
        category: the category.
        template: a key of ``TEMPLATES``, or a format string with the fields ``{name}`` and ``{definition}``.
    """
    fmt = TEMPLATES.get(template, template)
    if "{name}" not in fmt:
        raise ValueError(
            f"template {template!r}: expected one of {sorted(TEMPLATES)} or a string with '{{name}}'"
        )
    if "{definition}" in fmt and not category.definition.strip():
        fmt = TEMPLATES["xpaste"]
    try:
        return fmt.format(name=category.name.replace("_", " "), definition=category.definition)
    except (KeyError, IndexError, ValueError) as e:
        raise ValueError(
            f"template {template!r}: only {{name}} and {{definition}} may be used ({e!r})"
        ) from None


def read_prompt_file(path: str | os.PathLike) -> list[str]:
    """The prompts of an official prompt file: one per line, stripped, blank lines skipped (divergen.md §1.1).

    A file with no prompt is a ``ValueError`` naming it.
    """
    try:
        text = Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: expected UTF-8 text ({e})") from None
    prompts = [line.strip() for line in text.splitlines()]
    prompts = [p for p in prompts if p]
    if not prompts:
        raise ValueError(f"{path}: no prompt (expected one prompt per line)")
    return prompts


def read_prompt_dir(
    directory: str | os.PathLike, categories: Iterable[PromptCategory]
) -> dict[int, list[str]]:
    """``{category_id: prompts}`` for every file of an official prompt set ``input/<set>/<lvis_id>.txt``.

    Hidden files are ignored. Any other entry that is not ``<integer id>.txt`` (a sub-folder: the parent
    ``input/`` was passed), an id that is not among ``categories`` or is there twice (``7.txt`` and
    ``007.txt``), or a folder with no prompt file is a ``ValueError`` naming it.

    Arguments:
        directory: the prompt set, e.g. ``input/gpt_prompt`` (144 files of 128 lines, divergen.md §1.1).
        categories: the categories the ids must belong to (``load_categories``).
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise ValueError(f"{directory}: expected a folder of <category id>.txt prompt files")
    known = {c.category_id for c in categories}
    out: dict[int, list[str]] = {}
    for entry in sorted(directory.iterdir()):
        if entry.name.startswith("."):
            continue
        if not entry.is_file() or not _PROMPT_FILE.fullmatch(entry.name):
            raise ValueError(f"{entry}: expected only <category id>.txt prompt files in {directory}")
        cid = int(entry.stem)
        if cid not in known:
            raise ValueError(f"{entry}: category id {cid} is not among the {len(known)} categories")
        if cid in out:
            raise ValueError(f"{entry}: a second prompt file for category id {cid}")
        out[cid] = read_prompt_file(entry)
    if not out:
        raise ValueError(f"{directory}: no <category id>.txt prompt file")
    return out


def write_prompt_dir(prompts: Mapping[int, Sequence[str]], root: str | os.PathLike) -> Path:
    """Write ``{category_id: prompts}`` in the official layout ``<root>/<lvis_id>.txt``, one prompt per line
    (divergen.md §1.1), each file atomically (temporary file, then ``os.replace``); returns ``root``.

    ``read_prompt_dir(root, categories)`` gives ``prompts`` back unchanged, so a prompt that would not survive a
    line-per-prompt file (blank, surrounded by whitespace, or holding a line break) is a ``ValueError`` naming
    its category and index. Files of other categories already in ``root`` are left alone.
    """
    root = Path(root)
    for cid, lines in prompts.items():
        if isinstance(lines, str) or not lines:
            raise ValueError(f"prompts[{cid}]: expected a non-empty list of prompts, got {lines!r:.200}")
        for i, p in enumerate(lines):
            if not isinstance(p, str) or not p or p != p.strip() or len(p.splitlines()) != 1:
                raise ValueError(
                    f"prompts[{cid}][{i}]: expected a one-line prompt without surrounding whitespace, got {p!r:.200}"
                )
    root.mkdir(parents=True, exist_ok=True)
    for cid, lines in prompts.items():
        path = root / f"{int(cid)}.txt"
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            tmp.write_text("".join(f"{p}\n" for p in lines), encoding="utf-8")
            os.replace(tmp, path)  # readers never see a half-written prompt file
        finally:
            tmp.unlink(missing_ok=True)
    return root


# ------------------------------------------------------------------------------------------------ jobs


def plan_jobs(
    categories: Sequence[PromptCategory],
    *,
    prompts: Mapping[int, Sequence[str]] | None = None,
    template: str = "divergen",
    images_per_category: int = 1024,
    seed: int = 0,
) -> list[GenerationJob]:
    """One job per image, ordered by category (as given), prompt, sample.

    The official script repeats every prompt line ``n_samples`` times (1 template line x 1024, or 128 GPT lines
    x 8: 1024 images per category either way, divergen.md §1.1). Here ``images_per_category`` is split as
    evenly as possible over the category's prompts, the first ones getting one more when it does not divide
    (so with fewer images than prompts the last prompts get none).

    Arguments:
        categories: the categories to generate; each id once.
        prompts: ``{category_id: prompts}`` (``read_prompt_dir``); ids not in ``categories`` are ignored, a
            category absent from it gets its one ``template_prompt``.
        template: the template for those (``template_prompt``).
        images_per_category: images per category, >= 1.
        seed: the run's seed, >= 0. Each job's seed is ``job_seed(seed, category_id, prompt_index,
            sample_index)``.
    """
    if images_per_category < 1:
        raise ValueError(f"images_per_category must be >= 1, got {images_per_category}")
    prompts = prompts or {}
    jobs: list[GenerationJob] = []
    seen: set[int] = set()
    for category in categories:
        cid = category.category_id
        if cid in seen:
            raise ValueError(f"category id {cid} appears twice in categories")
        seen.add(cid)
        lines = prompts[cid] if cid in prompts else [template_prompt(category, template)]
        if isinstance(lines, str) or not lines:
            raise ValueError(f"prompts[{cid}]: expected a non-empty list of prompts, got {lines!r:.200}")
        per_prompt, rest = divmod(images_per_category, len(lines))
        key = _category_key(seed, cid)
        for p, prompt in enumerate(lines):
            n = per_prompt + (p < rest)
            if n > MAX_SAMPLES_PER_PROMPT or p >= MAX_PROMPTS:
                raise ValueError(
                    f"category id {cid}: at most {MAX_PROMPTS} prompts and {MAX_SAMPLES_PER_PROMPT} images per "
                    f"prompt are supported (got {len(lines)} prompts, {n} images per prompt)"
                )
            jobs += [GenerationJob(cid, prompt, p, s, _mix32(key ^ (p << 16 | s))) for s in range(n)]
    return jobs


def job_seed(seed: int, category_id: int, prompt_index: int, sample_index: int) -> int:
    """The 32-bit seed of a job: a function of these four numbers only.

    A per-category key from ``numpy.random.SeedSequence([seed, category_id])`` is XOR-ed with the job's index
    ``prompt_index << 16 | sample_index`` and passed through a bijective 32-bit mixer, so the seeds of one
    category are all distinct: two jobs with the same prompt and seed would draw the same image, and with a
    plain 32-bit hash 1453 categories of 1024 images would hold such a repeat with probability ~0.16. Seeds of
    different categories are independent draws.
    """
    if not (0 <= prompt_index < MAX_PROMPTS and 0 <= sample_index < MAX_SAMPLES_PER_PROMPT):
        raise ValueError(
            f"prompt_index and sample_index must be in [0, {MAX_PROMPTS}), got {prompt_index} and {sample_index}"
        )
    return _mix32(_category_key(seed, category_id) ^ (prompt_index << 16 | sample_index))


def _category_key(seed: int, category_id: int) -> int:
    if seed < 0 or category_id < 0:
        raise ValueError(f"seed and category_id must be >= 0, got {seed} and {category_id}")
    return int(np.random.SeedSequence([seed, category_id]).generate_state(1)[0])


def _mix32(x: int) -> int:
    """A bijection of [0, 2**32) that scatters nearby inputs (C. Wellons' "lowbias32" integer hash)."""
    x ^= x >> 16
    x = (x * 0x7FEB352D) & _MASK32
    x ^= x >> 15
    x = (x * 0x846CA68B) & _MASK32
    return x ^ (x >> 16)


def shard_jobs(jobs: Sequence[GenerationJob], rank: int, world_size: int) -> list[GenerationJob]:
    """The jobs of ``rank``: whole categories, dealt round-robin over the sorted category ids of ``jobs``.

    Each rank owns its categories' output files, and every job is in exactly one shard; job order is kept.
    Every rank must pass the same ``jobs``.

    Arguments:
        jobs: all jobs (``plan_jobs``).
        rank: this process's rank, ``0 <= rank < world_size``.
        world_size: the number of processes, >= 1.
    """
    mine = shard_category_ids({j.category_id for j in jobs}, rank, world_size)
    return [j for j in jobs if j.category_id in mine]


def shard_category_ids(category_ids: Iterable[int], rank: int, world_size: int) -> set[int]:
    """The category ids of ``rank`` (``shard_jobs``' rule): the sorted ids dealt round-robin over the ranks."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"expected 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
    return set(sorted(set(category_ids))[rank::world_size])
