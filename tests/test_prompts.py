"""Generation stage 1: categories, template prompts, prompt files, per-image jobs and their seeds, sharding."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from divergen.prompts import (
    GenerationJob,
    PromptCategory,
    job_seed,
    load_categories,
    plan_jobs,
    read_prompt_dir,
    read_prompt_file,
    shard_jobs,
    template_prompt,
)

AEROSOL_DEF = "a dispenser that holds a substance under pressure"


def _lvis(path: Path, *, annotations: bool = True, ids: tuple[int, ...] = (3, 1, 2)) -> Path:
    """A tiny LVIS-format file: aerosol_can (id 1) in 11 images ("c"), id 2 in 1 image ("r"), id 3 none ("r")."""
    records = {
        1: {"id": 1, "name": "aerosol_can", "def": AEROSOL_DEF, "synonyms": ["aerosol_can", "spray_can"],
            "frequency": "c"},
        2: {"id": 2, "name": "air_conditioner", "def": "a machine that keeps air cool", "synonyms": [],
            "frequency": "f"},
        3: {"id": 3, "name": "bow_(weapon)", "frequency": "r"},  # COCO-like: no def / synonyms
        5: {"id": 5, "name": "apple", "def": "fruit"},
    }  # fmt: skip
    data = {"images": [{"id": i} for i in range(12)], "categories": [records[i] for i in ids]}
    if annotations:
        anns = [(i, 1) for i in range(11)] + [(11, 2)]
        data["annotations"] = [{"id": k, "image_id": i, "category_id": c} for k, (i, c) in enumerate(anns)]
    path.write_text(json.dumps(data))
    return path


def _write_json(path: Path, data) -> Path:
    path.write_text(json.dumps(data))
    return path


def _cats(*ids: int) -> list[PromptCategory]:
    return [PromptCategory(i, f"cat_{i}", f"def {i}") for i in ids]


# ------------------------------------------------------------------------------------------------ categories


def test_load_categories_reads_names_definitions_synonyms_and_counted_frequency(tmp_path):
    cats = load_categories(_lvis(tmp_path / "lvis.json"))
    assert cats == [
        PromptCategory(1, "aerosol_can", AEROSOL_DEF, ("aerosol_can", "spray_can"), "c"),
        # "r" as counted from the annotations (1 image), not the record's "f"
        PromptCategory(2, "air_conditioner", "a machine that keeps air cool", (), "r"),
        PromptCategory(3, "bow_(weapon)", "", (), "r"),
    ]


def test_load_categories_without_annotations_keeps_the_records_frequency(tmp_path):
    cats = load_categories(_lvis(tmp_path / "lvis.json", annotations=False, ids=(1, 2, 5)))
    assert [c.frequency for c in cats] == ["c", "f", ""]


def test_load_categories_rejects_a_file_without_categories(tmp_path):
    path = _write_json(tmp_path / "bad.json", [{"id": 1, "name": "x"}])
    with pytest.raises(ValueError, match="bad.json.*'categories'"):
        load_categories(path)


def test_extra_file_in_the_official_1453_shape_adds_only_new_categories(tmp_path):
    extra = _write_json(
        tmp_path / "cat_info_1453.json",
        [  # the dataset's own entries first, as the official file; then new ones, unsorted
            {"id": 1, "name": "aerosol_can", "def": "other text", "frequency": "f", "image_count": 64},
            {"id": 2, "name": "air_conditioner"},
            {"id": 3, "name": "bow_(weapon)"},
            {"id": 5, "name": "goldfish", "frequency": "c", "image_count": 2000},
            {"id": 4, "name": "tench", "def": "freshwater dace-like game fish", "synonyms": ["tench", "Tinca"],
             "synset": "tench.n.01", "frequency": "c"},
        ],
    )  # fmt: skip
    cats = load_categories(_lvis(tmp_path / "lvis.json"), extra=extra)
    assert [c.category_id for c in cats] == [1, 2, 3, 4, 5]
    assert cats[0].definition == AEROSOL_DEF and cats[0].frequency == "c"  # the dataset's record wins
    assert cats[3] == PromptCategory(4, "tench", "freshwater dace-like game fish", ("tench", "Tinca"), "c")
    assert cats[4] == PromptCategory(5, "goldfish", "", (), "c")

    no_freq = _write_json(tmp_path / "plain.json", [{"id": 9, "name": "koala"}])
    assert load_categories(_lvis(tmp_path / "lvis.json"), extra=no_freq)[-1] == PromptCategory(9, "koala")


@pytest.mark.parametrize(
    ("entries", "message"),
    [
        ([{"id": 2, "name": "tench"}], r"entry 0 \(id 2\): name 'tench' clashes .* 'air_conditioner'"),
        ([{"id": 7, "name": "a"}, {"id": 7, "name": "b"}], r"entry 1 \(id 7\): duplicate id"),
        ([{"id": 4, "name": "tench"}], r"entry 0 \(id 4\): .*continue after the dataset's \(max id 5\)"),
        ([{"name": "tench"}], r"entry 0: expected a dict with an integer 'id'"),
        ([{"id": "9", "name": "tench"}], r"entry 0: expected a dict with an integer 'id'"),
        ([{"id": True, "name": "tench"}], r"entry 0: expected a dict with an integer 'id'"),
        (["tench"], r"entry 0: expected a dict"),
        ([{"id": 9}], r"entry 0 \(id 9\): expected a non-empty string 'name'"),
        ([{"id": 9, "name": "t", "synonyms": "t"}], r"entry 0 \(id 9\): expected 'synonyms' to be a list"),
        ([{"id": 9, "name": "t", "def": None}], r"entry 0 \(id 9\): expected a string 'def'"),
        ([{"id": 9, "name": "t", "frequency": "rare"}], r"entry 0 \(id 9\): expected 'frequency'"),
        ({"9": {"name": "t"}}, r"expected a JSON list"),
    ],
)
def test_extra_file_errors_name_the_file_and_entry(tmp_path, entries, message):
    lvis = _lvis(tmp_path / "lvis.json", ids=(1, 2, 5))  # a gap at 3, 4: extra ids there would shift indices
    extra = _write_json(tmp_path / "extra.json", entries)
    with pytest.raises(ValueError, match="extra.json: " + message):
        load_categories(lvis, extra=extra)


# ------------------------------------------------------------------------------------------------ prompts


def test_template_prompt_reproduces_the_official_example_and_the_xpaste_form():
    aerosol = PromptCategory(1, "aerosol_can", AEROSOL_DEF)
    assert template_prompt(aerosol) == (
        "a photo of a single aerosol can, a dispenser that holds a substance under pressure, in a white background"
    )
    assert template_prompt(aerosol, "xpaste") == "a photo of a single aerosol can"
    assert template_prompt(aerosol, "{name}: {definition}") == f"aerosol can: {AEROSOL_DEF}"


@pytest.mark.parametrize("definition", ["", "  "])
def test_template_prompt_without_definition_falls_back_to_the_xpaste_form(definition):
    bow = PromptCategory(3, "bow_(weapon)", definition)
    assert template_prompt(bow) == "a photo of a single bow (weapon)"
    assert template_prompt(bow, "{name} alone") == "bow (weapon) alone"  # no {definition}: no fallback


@pytest.mark.parametrize(("template", "message"), [("divergen2", "expected one of"), ("{name} {x}", "only")])
def test_template_prompt_rejects_unknown_templates(template, message):
    with pytest.raises(ValueError, match=message):
        template_prompt(PromptCategory(1, "a"), template)


def test_read_prompt_file_strips_and_skips_blank_lines(tmp_path):
    path = tmp_path / "7.txt"
    path.write_bytes(
        "  A photo of a red apple, in a white background \r\n\n \nAn image of ünïcode\n\n".encode()
    )
    assert read_prompt_file(path) == ["A photo of a red apple, in a white background", "An image of ünïcode"]


@pytest.mark.parametrize("content", [b"", b"\n \n\t\n"])
def test_read_prompt_file_without_prompts_is_an_error_naming_it(tmp_path, content):
    (tmp_path / "7.txt").write_bytes(content)
    with pytest.raises(ValueError, match=r"7\.txt: no prompt"):
        read_prompt_file(tmp_path / "7.txt")


def test_read_prompt_dir_maps_every_file_to_its_category(tmp_path):
    (tmp_path / "2.txt").write_text("b1\nb2\n")
    (tmp_path / "10.txt").write_text("j\n")
    (tmp_path / ".DS_Store").write_text("ignored")
    assert read_prompt_dir(tmp_path, _cats(1, 2, 10)) == {2: ["b1", "b2"], 10: ["j"]}


@pytest.mark.parametrize(
    ("names", "message"),
    [
        (["1.txt", "abc.txt"], r"abc\.txt: expected only <category id>\.txt"),
        (["1.txt", "2.text"], r"2\.text: expected only <category id>\.txt"),
        (["1.txt", "-2.txt"], r"-2\.txt: expected only"),
        (["3.txt"], r"3\.txt: category id 3 is not among the 2 categories"),
        (["1.txt", "01.txt"], r"1\.txt: a second prompt file for category id 1"),
        (["sub/1.txt"], r"sub: expected only <category id>\.txt"),
        ([], r"no <category id>\.txt prompt file"),
        (["2.txt", "1.txt/"], r"1\.txt: expected only"),  # a folder named like a prompt file
    ],
)
def test_read_prompt_dir_errors_name_the_file(tmp_path, names, message):
    folder = tmp_path / "gpt_prompt"
    folder.mkdir()
    for name in names:
        if name.endswith("/"):
            (folder / name).mkdir()
            continue
        (folder / name).parent.mkdir(exist_ok=True)
        (folder / name).write_text("a prompt\n")
    with pytest.raises(ValueError, match=message):
        read_prompt_dir(folder, _cats(1, 2))


def test_read_prompt_dir_rejects_a_missing_folder(tmp_path):
    with pytest.raises(ValueError, match="missing: expected a folder"):
        read_prompt_dir(tmp_path / "missing", _cats(1))


# ------------------------------------------------------------------------------------------------ jobs


def test_plan_jobs_counts_per_category_and_prompt():
    gpt = [f"gpt {i}" for i in range(128)]
    jobs = plan_jobs(_cats(1, 2, 3), prompts={2: gpt, 3: ["x", "y", "z"], 99: ["ignored"]})
    per_category = Counter(j.category_id for j in jobs)
    assert per_category == {1: 1024, 2: 1024, 3: 1024}
    template = "a photo of a single cat 1, def 1, in a white background"
    assert {j.prompt for j in jobs if j.category_id == 1} == {template}
    assert Counter(j.prompt for j in jobs if j.category_id == 2) == dict.fromkeys(gpt, 8)

    small = plan_jobs(_cats(3), prompts={3: ["x", "y", "z"]}, images_per_category=10)
    assert [(j.prompt, j.prompt_index, j.sample_index) for j in small] == [
        *(("x", 0, s) for s in range(4)), *(("y", 1, s) for s in range(3)), *(("z", 2, s) for s in range(3))
    ]  # fmt: skip
    fewer = plan_jobs(_cats(3), prompts={3: ["x", "y", "z"]}, images_per_category=2)
    assert [j.prompt_index for j in fewer] == [0, 1]


def test_plan_jobs_orders_by_category_prompt_sample_and_uses_the_template():
    jobs = plan_jobs(_cats(5, 2), prompts={5: ["p", "q"]}, template="xpaste", images_per_category=3)
    assert [(j.category_id, j.prompt, j.prompt_index, j.sample_index) for j in jobs] == [
        (5, "p", 0, 0), (5, "p", 0, 1), (5, "q", 1, 0),
        (2, "a photo of a single cat 2", 0, 0), (2, "a photo of a single cat 2", 0, 1),
        (2, "a photo of a single cat 2", 0, 2),
    ]  # fmt: skip
    assert all(isinstance(j, GenerationJob) for j in jobs)


def test_plan_jobs_seeds_are_reproducible_distinct_and_stable():
    prompts = {2: [f"gpt {i}" for i in range(128)]}
    jobs = plan_jobs(_cats(1, 2), prompts=prompts, seed=3)
    assert jobs == plan_jobs(_cats(1, 2), prompts=prompts, seed=3)
    seeds = [j.seed for j in jobs]
    assert len(set(seeds)) == len(seeds) == 2048
    assert all(isinstance(s, int) and 0 <= s < 2**32 for s in seeds)
    assert all(j.seed == job_seed(3, j.category_id, j.prompt_index, j.sample_index) for j in jobs[::97])
    # Pinned: a changed seed function would silently change what a resumed run generates.
    assert [j.seed for j in plan_jobs(_cats(1), seed=0, images_per_category=3)] == [
        job_seed(0, 1, 0, 0), job_seed(0, 1, 0, 1), job_seed(0, 1, 0, 2)
    ] == [3424067361, 2263372071, 3699331579]  # fmt: skip

    other_seed = {j.seed for j in plan_jobs(_cats(1, 2), prompts=prompts, seed=4)}
    assert len(other_seed & set(seeds)) < 5
    # Adding a category (before or after), or more images per category, keeps every existing job as it was.
    more = plan_jobs(_cats(0, 1, 7, 2), prompts=prompts, seed=3)
    assert set(jobs) <= set(more)
    bigger = plan_jobs(_cats(1, 2), prompts=prompts, seed=3, images_per_category=1100)
    assert set(jobs) <= set(bigger) and len(bigger) == 2200


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"images_per_category": 0}, "images_per_category must be >= 1"),
        ({"prompts": {1: []}}, r"prompts\[1\]: expected a non-empty list of prompts"),
        ({"prompts": {1: "a prompt"}}, r"prompts\[1\]: expected a non-empty list of prompts"),
        ({"seed": -1}, "seed and category_id must be >= 0"),
        ({"images_per_category": 2**16 + 1}, "at most 65536 prompts and 65536 images per prompt"),
    ],
)
def test_plan_jobs_rejects_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        plan_jobs(_cats(1), **kwargs)
    with pytest.raises(ValueError, match="category id 1 appears twice"):
        plan_jobs(_cats(1, 1), images_per_category=1)


def test_shard_jobs_deals_whole_categories_round_robin():
    jobs = plan_jobs(_cats(9, 1, 5, 3, 2), prompts={5: ["a", "b"]}, images_per_category=3)
    shards = [shard_jobs(jobs, rank, 2) for rank in range(2)]
    assert [sorted({j.category_id for j in s}) for s in shards] == [[1, 3, 9], [2, 5]]
    for shard in shards:  # order kept
        assert shard == [j for j in jobs if j in shard]
    assert sorted(shards[0] + shards[1], key=jobs.index) == jobs  # each job exactly once
    assert shard_jobs(jobs, 0, 1) == jobs
    five = [shard_jobs(jobs, rank, 7) for rank in range(7)]
    assert [len(s) for s in five] == [3, 3, 3, 3, 3, 0, 0]


@pytest.mark.parametrize(("rank", "world_size"), [(2, 2), (-1, 2), (0, 0)])
def test_shard_jobs_rejects_bad_ranks(rank, world_size):
    with pytest.raises(ValueError, match="0 <= rank < world_size"):
        shard_jobs([], rank, world_size)
