"""The instance pool: index formats, label mapping, filters, lazy loading of cutouts, broken samples."""

from __future__ import annotations

import json
import logging
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from divergen import pool as pool_module
from divergen.pool import POOL_INDEX_NAME, InstancePool, largest_component, write_pool_index


def _cutout(path: Path, h: int = 6, w: int = 5, *, alpha: int = 255, value: int = 100) -> np.ndarray:
    """Write an (h, w, 4) RGBA PNG whose pixels differ (so a crop or transpose is visible); return it."""
    rgba = np.zeros((h, w, 4), np.uint8)
    rgba[..., 0] = (np.arange(h * w).reshape(h, w) * 7) % 256
    rgba[..., 1] = value
    rgba[..., 3] = alpha
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rgba, "RGBA").save(path)
    return rgba


def _records(n: int, **extra) -> list[dict]:
    return [{"path": f"images/{i}.png", "category_id": 1 + i % 3, **extra} for i in range(n)]


def _write_lines(path: Path, lines: list[str], *, final_newline: bool = True) -> Path:
    path.write_text("\n".join(lines) + ("\n" if final_newline else ""))
    return path


# ------------------------------------------------------------------------------------------------ pool.jsonl


def test_jsonl_round_trip_keeps_records_and_loads_lazily(tmp_path):
    records = [
        {"path": "images/0/a.png", "category_id": 1, "generator": "sd15", "prompt": "a photo", "clip_score": 0.3,
         "clip_inter_sim": 0.7, "seed": 4, "extra": [1, 2]},
        {"path": "images/2/b.png", "category_id": 3, "generator": "if", "prompt": "ünïcode"},
    ]  # fmt: skip
    expected = [_cutout(tmp_path / r["path"], 4 + i, 3 + i) for i, r in enumerate(records)]
    index = write_pool_index(iter(records), tmp_path)
    assert index == tmp_path / POOL_INDEX_NAME
    assert index.read_text(encoding="utf-8").endswith("\n")
    assert [p.name for p in tmp_path.iterdir() if p.is_file()] == [POOL_INDEX_NAME]  # no temporary left

    pool = InstancePool(index)
    assert len(pool) == 2 and pool.format == "jsonl"
    assert pool.labels.tolist() == [0, 2] and pool.labels.dtype == np.int64
    for i, r in enumerate(records):
        assert pool.record(i) == {**r, "path": str(tmp_path / r["path"]), "label": [0, 2][i]}
        assert pool.path(i) == tmp_path / r["path"]
        np.testing.assert_array_equal(pool.load(i), expected[i])
    assert pool.generator(0) == "sd15" and pool.generator(1) == "if"
    assert pool.clip_scores[0] == pytest.approx(0.3) and np.isnan(pool.clip_scores[1])
    assert pool.inter_similarities[0] == pytest.approx(0.7)
    assert pool.num_skipped == 0
    with pytest.raises(IndexError):
        pool.path(2)


def test_write_pool_index_is_atomic_and_validates(tmp_path):
    index = write_pool_index(_records(2), tmp_path / "p" / "custom.jsonl")
    before = index.read_bytes()

    def bad_records():
        yield {"path": "x.png", "category_id": 1}
        yield {"path": "y.png", "category_id": "1"}

    with pytest.raises(ValueError, match=r"custom\.jsonl: record 1 needs 'category_id'"):
        write_pool_index(bad_records(), index)
    with pytest.raises(ValueError, match="record 0 needs 'path'"):
        write_pool_index([{"category_id": 1}], index)
    assert index.read_bytes() == before
    assert sorted(p.name for p in index.parent.iterdir()) == ["custom.jsonl"]


def test_directory_and_file_paths_read_the_same_pool(tmp_path):
    write_pool_index(_records(4), tmp_path)
    by_dir, by_file = InstancePool(tmp_path), InstancePool(tmp_path / POOL_INDEX_NAME)
    assert by_dir.labels.tolist() == by_file.labels.tolist() == [0, 1, 2, 0]
    assert by_dir.index_path == by_file.index_path
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="has no pool.jsonl"):
        InstancePool(tmp_path / "empty")
    (tmp_path / "pool.txt").write_text("")
    with pytest.raises(ValueError, match=r"pool\.txt: expected a pool.jsonl"):
        InstancePool(tmp_path / "pool.txt")


def test_relative_paths_resolve_against_the_index_folder_not_the_cwd(tmp_path, monkeypatch):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    absolute = _cutout(elsewhere / "abs.png")
    relative = _cutout(tmp_path / "pool" / "sub" / "rel.png", 3, 3)
    write_pool_index([{"path": "sub/rel.png", "category_id": 1}, {"path": str(elsewhere / "abs.png"),
                      "category_id": 1}], tmp_path / "pool")  # fmt: skip
    monkeypatch.chdir(elsewhere)
    pool = InstancePool(Path("..") / "pool")
    assert pool.path(0) == Path("..") / "pool" / "sub" / "rel.png"
    assert pool.path(1) == elsewhere / "abs.png"
    np.testing.assert_array_equal(pool.load(0), relative)
    np.testing.assert_array_equal(pool.load(1), absolute)


def test_id_mapping_with_extra_ids_and_errors(tmp_path):
    id_to_index = {1: 0, 3: 1, 7: 2}  # LVIS-like ids with gaps
    ids = [
        1,
        3,
        7,
        8,
        10,
    ]  # 8 and 10: extra categories past the largest id (the ImageNet classes of DiverGen)
    write_pool_index([{"path": f"{i}.png", "category_id": c} for i, c in enumerate(ids)], tmp_path)
    assert InstancePool(tmp_path, id_to_index=id_to_index).labels.tolist() == [0, 1, 2, 3, 5]
    assert InstancePool(tmp_path).labels.tolist() == [0, 2, 6, 7, 9]  # None: id - 1

    write_pool_index([{"path": "a.png", "category_id": 1}, {"path": "b.png", "category_id": 2}], tmp_path)
    with pytest.raises(ValueError, match=r"pool\.jsonl:2: category_id 2 is not in id_to_index"):
        InstancePool(tmp_path, id_to_index=id_to_index)
    write_pool_index([{"path": "a.png", "category_id": 0}], tmp_path)
    with pytest.raises(ValueError, match=r"pool\.jsonl:1: category_id 0: LVIS ids are 1-based"):
        InstancePool(tmp_path)
    with pytest.raises(ValueError, match="id_to_index is empty"):
        InstancePool(tmp_path, id_to_index={})


def test_num_classes_check_names_the_line_before_any_filter(tmp_path):
    write_pool_index([{"path": "a.png", "category_id": 1}, {"path": "b.png", "category_id": 5}], tmp_path)
    with pytest.raises(
        ValueError, match=r"pool\.jsonl:2: label 4 is outside \[0, 4\): the model has 4 classes"
    ):
        InstancePool(tmp_path, num_classes=4)
    with pytest.raises(ValueError, match="the model has 4 classes"):
        InstancePool(tmp_path, num_classes=4, labels=range(4), generators=["if"])
    assert len(InstancePool(tmp_path, num_classes=5)) == 2


@pytest.mark.parametrize(
    "bad_line, message",
    [
        ('{"path": "b.png", "category_id": 2', "expected a JSON object"),
        ('["b.png", 2]', "expected a JSON object, got list"),
        ('{"category_id": 2}', "expected 'path'"),
        ('{"path": 3, "category_id": 2}', "expected 'path'"),
        ('{"path": "b.png"}', "expected 'category_id'"),
        ('{"path": "b.png", "category_id": "2"}', "expected 'category_id'"),
        ('{"path": "b.png", "category_id": 2.0}', "expected 'category_id'"),
        ('{"path": "b.png", "category_id": true}', "expected 'category_id'"),
        ('{"path": "b.png", "category_id": 2, "clip_score": "high"}', "expected 'clip_score' to be a number"),
        ('{"path": "b.png", "category_id": 2, "generator": 1}', "expected 'generator' to be a string"),
    ],
)
def test_malformed_line_names_file_and_line(tmp_path, bad_line, message):
    good = '{"path": "a.png", "category_id": 1}'
    index = _write_lines(tmp_path / POOL_INDEX_NAME, [good, "", bad_line, good])
    with pytest.raises(ValueError, match=rf"pool\.jsonl:3: {message}"):
        InstancePool(index)


def test_truncated_final_line_is_skipped_with_a_warning(tmp_path, caplog):
    good = '{"path": "a.png", "category_id": 1}'
    index = _write_lines(
        tmp_path / POOL_INDEX_NAME, [good, good, '{"path": "c.png", "categ'], final_newline=False
    )
    with caplog.at_level(logging.WARNING, logger="divergen.pool"):
        pool = InstancePool(index)
    assert len(pool) == 2 and pool.num_filtered == {"truncated final line": 1}
    assert "pool.jsonl:3: skipping the truncated final line" in caplog.text
    # A complete final line without a newline is kept.
    _write_lines(index, [good, '{"path": "c.png", "category_id": 2}'], final_newline=False)
    assert InstancePool(index).labels.tolist() == [0, 1]


def test_score_filters_and_their_counts(tmp_path):
    records = [
        {
            "path": "0.png",
            "category_id": 1,
            "clip_score": 0.25,
            "clip_inter_sim": 0.6,
        },  # both at threshold: kept
        {"path": "1.png", "category_id": 1, "clip_score": 0.20, "clip_inter_sim": 0.9},
        {"path": "2.png", "category_id": 1, "clip_inter_sim": 0.9},
        {"path": "3.png", "category_id": 1, "clip_score": 0.3, "clip_inter_sim": 0.5},
        {"path": "4.png", "category_id": 1, "clip_score": 0.3, "clip_inter_sim": None},
        {"path": "5.png", "category_id": 1, "clip_score": 0.3, "clip_inter_sim": 0.61},
    ]
    write_pool_index(records, tmp_path)
    pool = InstancePool(tmp_path, min_clip_score=0.25)
    assert [pool.path(i).name for i in range(len(pool))] == ["0.png", "3.png", "4.png", "5.png"]
    assert pool.num_filtered == {"clip_score": 1, "missing clip_score": 1}
    pool = InstancePool(tmp_path, min_inter_similarity=0.6)
    assert [pool.path(i).name for i in range(len(pool))] == ["0.png", "1.png", "2.png", "5.png"]
    assert pool.num_filtered == {"clip_inter_sim": 1, "missing clip_inter_sim": 1}
    both = InstancePool(tmp_path, min_clip_score=0.25, min_inter_similarity=0.6)
    assert [both.path(i).name for i in range(len(both))] == ["0.png", "5.png"]
    assert sum(both.num_filtered.values()) == 4
    assert InstancePool(tmp_path).num_filtered == {}


def test_generator_and_label_filters_and_their_counts(tmp_path):
    gens = ["sd15", "if", None, "synthetic", "if", "sd15"]
    write_pool_index(
        [{"path": f"{i}.png", "category_id": 1 + i % 3, **({"generator": g} if g else {})} for i, g in
         enumerate(gens)], tmp_path)  # fmt: skip
    pool = InstancePool(tmp_path, generators=["if", "sd15"])
    assert [pool.generator(i) for i in range(len(pool))] == ["sd15", "if", "if", "sd15"]
    assert pool.num_filtered == {"generator": 2}
    pool = InstancePool(tmp_path, labels={0, 2})
    assert pool.labels.tolist() == [0, 2, 0, 2] and pool.num_filtered == {"label": 2}
    # The first failing filter counts: label before generator.
    pool = InstancePool(tmp_path, labels=np.array([0]), generators=("sd15",))
    assert [pool.path(i).name for i in range(len(pool))] == ["0.png"]
    assert pool.num_filtered == {"label": 4, "generator": 1}
    summary = pool.summary()
    assert "1 instances, 1 categories" in summary and "sd15 1" in summary and "label 4" in summary


def test_categories_and_instances_of(tmp_path):
    write_pool_index(
        [{"path": f"{i}.png", "category_id": c} for i, c in enumerate([3, 1, 3, 6, 1, 3])], tmp_path
    )
    pool = InstancePool(tmp_path)
    assert pool.categories.tolist() == [0, 2, 5] and pool.categories.dtype == np.int64
    assert pool.instances_of(2).tolist() == [0, 2, 5]
    assert pool.instances_of(0).tolist() == [1, 4]
    assert pool.instances_of(5).tolist() == [3]
    for missing in (-1, 1, 3, 99):
        empty = pool.instances_of(missing)
        assert empty.shape == (0,) and empty.dtype == np.int64
    with pytest.raises(ValueError, match="read-only"):
        pool.instances_of(2)[0] = 1  # the index is shared by every loader worker


def test_record_detects_a_rewritten_index(tmp_path):
    write_pool_index(_records(3), tmp_path)
    pool = InstancePool(tmp_path)
    write_pool_index([{"path": "other/name.png", "category_id": 1}] + _records(3), tmp_path)
    with pytest.raises(RuntimeError, match="the index changed since the pool was read"):
        pool.record(1)


def test_index_holds_numpy_buffers_not_per_record_objects(tmp_path):
    n = 60
    write_pool_index(_records(n, generator="if", clip_score=0.5, prompt="a long prompt " * 5), tmp_path)
    pool = InstancePool(tmp_path, generators=["if"])
    assert len(pool) == n
    for name in ("labels", "categories", "clip_scores", "inter_similarities", "_paths", "_path_ends",
                 "_line_offsets", "_generators", "_online", "_by_label", "_starts"):  # fmt: skip
        assert isinstance(getattr(pool, name), np.ndarray), name
    assert pool._paths.dtype == np.uint8 and pool._path_ends.dtype == np.int64
    for name, value in vars(pool).items():
        if isinstance(value, list | tuple | dict | set | str | bytes | bytearray):
            assert len(value) < 10, f"{name} grows with the number of instances"


# ------------------------------------------------------------------------------------------------ broken samples


def test_broken_samples_return_none_are_counted_and_logged(tmp_path, caplog):
    _cutout(tmp_path / "good.png")
    _cutout(tmp_path / "clear.png", alpha=0)
    (tmp_path / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    (tmp_path / "empty.png").write_bytes(b"")
    Image.fromarray(np.full((4, 4, 3), 9, np.uint8)).save(tmp_path / "rgb.png")
    names = ["good", "clear", "corrupt", "missing", "empty", "rgb"]
    write_pool_index([{"path": f"{n}.png", "category_id": 1} for n in names], tmp_path)
    pool = InstancePool(tmp_path)
    with caplog.at_level(logging.WARNING, logger="divergen.pool"):
        out = [pool.load(i) for i in range(len(pool))]
    assert [o is None for o in out] == [False, True, True, True, True, False]
    assert (out[5][..., 3] == 255).all() and (out[5][..., :3] == 9).all()  # RGB file: opaque
    assert pool.num_skipped == 4
    for name, reason in [("clear", "alpha channel is all zero"), ("corrupt", ""), ("missing", "file not found"),
                         ("empty", "")]:  # fmt: skip
        assert any(f"{name}.png" in r.message and reason in r.message for r in caplog.records), name


def test_broken_sample_log_is_rate_limited(tmp_path, caplog, monkeypatch):
    monkeypatch.setattr(pool_module, "LOG_FIRST", 2)
    monkeypatch.setattr(pool_module, "LOG_EVERY", 3)
    write_pool_index(_records(7), tmp_path)  # no image exists
    pool = InstancePool(tmp_path)
    with caplog.at_level(logging.WARNING, logger="divergen.pool"):
        assert all(pool.load(i) is None for i in range(7))
    assert pool.num_skipped == 7
    logged = [r.message for r in caplog.records]
    assert len(logged) == 4  # skips 1, 2 (the first LOG_FIRST), then 3 and 6 (every LOG_EVERY-th)
    assert "logging every 3th from now on" in logged[1]


class _Loads(torch.utils.data.Dataset):
    def __init__(self, pool: InstancePool):
        self.pool = pool

    def __len__(self) -> int:
        return len(self.pool)

    def __getitem__(self, i: int) -> int:
        return int(self.pool.load(i) is None)


def test_pickled_pool_works_and_worker_skips_reach_the_main_process(tmp_path):
    _cutout(tmp_path / "images" / "0.png")
    write_pool_index(_records(6), tmp_path)  # images 1..5 are missing
    pool = InstancePool(tmp_path)
    clone = pickle.loads(pickle.dumps(pool))
    assert clone.labels.tolist() == pool.labels.tolist() and clone.categories.tolist() == [0, 1, 2]
    assert clone.record(3)["path"] == str(tmp_path / "images" / "3.png")
    assert clone.load(0) is not None and clone.load(1) is None and clone.num_skipped == 1
    loader = torch.utils.data.DataLoader(_Loads(pool), batch_size=1, num_workers=2)
    assert sum(int(b) for b in loader) == 5
    assert pool.num_skipped == 5


# ------------------------------------------------------------------------------------------------ official JSON


def _official(tmp_path: Path, data: dict) -> Path:
    path = tmp_path / "official_pool.json"
    path.write_text(json.dumps(data))
    return path


def _image_and_mask(tmp_path: Path, mask: np.ndarray, name: str = "img") -> tuple[str, np.ndarray]:
    h, w = mask.shape
    rgb = np.random.default_rng(0).integers(0, 256, (h, w, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / f"{name}.jpg.png")
    Image.fromarray(mask, "L").save(tmp_path / f"{name}_mask.png")
    return f"{name}.jpg.png|{name}_mask.png", rgb


def test_largest_component_keeps_the_biggest_blob_and_fills_its_holes():
    mask = np.zeros((30, 40), bool)
    mask[2:20, 3:25] = True
    mask[8:12, 10:14] = False  # a hole
    mask[24:28, 30:38] = True  # a smaller component
    out = largest_component(mask)
    expected = np.zeros_like(mask)
    expected[2:20, 3:25] = True
    np.testing.assert_array_equal(out, expected)
    assert not largest_component(np.zeros((5, 5), bool)).any()


def test_official_json_cutouts_and_online_image_mask_entries(tmp_path):
    star = _cutout(tmp_path / "images" / "3" / "0.png", 5, 4)
    absolute = _cutout(tmp_path / "abs.png", 3, 7)
    mask = np.zeros((40, 40), np.uint8)
    mask[5:25, 10:30] = 255
    mask[14:16, 19:21] = 0  # a hole inside the largest component
    mask[20:22, 12:14] = 100  # soft values (<= 128) inside it
    mask[30:34, 2:6] = 255  # a smaller component: dropped
    entry, rgb = _image_and_mask(tmp_path, mask)
    pool = InstancePool(
        _official(tmp_path, {"3": ["*images/3/0.png", f"*{tmp_path / 'abs.png'}"], "0": [entry]})
    )
    assert pool.format == "official" and pool.labels.tolist() == [3, 3, 0]
    assert pool.categories.tolist() == [0, 3] and pool.instances_of(3).tolist() == [0, 1]
    np.testing.assert_array_equal(pool.load(0), star)
    np.testing.assert_array_equal(pool.load(1), absolute)
    assert pool.record(0) == {"path": str(tmp_path / "images/3/0.png"), "label": 3}
    assert pool.record(2) == {"path": str(tmp_path / "img.jpg.png"), "mask_path": str(tmp_path / "img_mask.png"),
                              "label": 0}  # fmt: skip
    assert pool.path(2) == tmp_path / "img.jpg.png" and pool.generator(2) is None

    cut = pool.load(2)
    assert cut.shape == (20, 20, 4)  # the tight box of the largest component
    np.testing.assert_array_equal(cut[..., :3], rgb[5:25, 10:30])
    # As the official code, alpha = the mask's values inside the filled component: 255 on the object, and the
    # hole and soft pixels keep their own values.
    np.testing.assert_array_equal(cut[..., 3], mask[5:25, 10:30])
    assert pool.num_skipped == 0


def test_official_online_entries_reject_tiny_and_full_masks(tmp_path, caplog):
    tiny = np.zeros((40, 40), np.uint8)
    tiny[3:7, 3:7] = 255  # 16 px = exactly 1% of the image: rejected (area <= 1%)
    small = np.zeros((40, 40), np.uint8)
    small[3:8, 3:7] = 255  # 20 px: kept
    full = np.full((40, 40), 255, np.uint8)  # 100%: rejected
    entries = [
        _image_and_mask(tmp_path, m, n)[0] for m, n in [(tiny, "tiny"), (small, "small"), (full, "full")]
    ]
    # A plain path (no "*") is cut out online too, using its own alpha: an opaque RGB image is 100% mask.
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "plain_rgb.png")
    rgba = np.zeros((10, 12, 4), np.uint8)
    rgba[2:6, 3:9] = 255
    Image.fromarray(rgba, "RGBA").save(tmp_path / "plain_rgba.png")
    wrong_size = _image_and_mask(tmp_path, small, "other")[0].split("|")[0] + "|short_mask.png"
    Image.fromarray(small[:20]).save(tmp_path / "short_mask.png")
    pool = InstancePool(_official(tmp_path, {"1": entries + ["plain_rgb.png", "plain_rgba.png", wrong_size,
                                                             "missing.png|small_mask.png"]}))  # fmt: skip
    with caplog.at_level(logging.WARNING, logger="divergen.pool"):
        out = [pool.load(i) for i in range(len(pool))]
    assert [o is None for o in out] == [True, False, True, True, False, True, True]
    assert out[1].shape == (5, 4, 4) and out[4].shape == (4, 6, 4)
    assert pool.num_skipped == 5
    assert "covers 1.00% of the image" in caplog.text and "covers 100.00%" in caplog.text
    assert "the mask is 40x20 px but the image 40x40 px" in caplog.text
    assert f"file not found: {tmp_path / 'missing.png'}" in caplog.text


def test_official_json_filters_and_errors(tmp_path):
    path = _official(tmp_path, {"0": ["*a.png", "*b.png"], "7": ["*c.png"]})
    with pytest.raises(ValueError, match="official pool format carries no CLIP scores"):
        InstancePool(path, min_clip_score=0.2)
    with pytest.raises(ValueError, match="official pool format carries no CLIP scores"):
        InstancePool(path, min_inter_similarity=0.6)
    pool = InstancePool(path, generators=["if"])
    assert len(pool) == 0 and pool.num_filtered == {"generator": 3}
    pool = InstancePool(path, labels=[7])
    assert pool.labels.tolist() == [7] and pool.num_filtered == {"label": 2}
    with pytest.raises(ValueError, match=r"official_pool\.json: key '7': label 7 is outside \[0, 5\)"):
        InstancePool(path, num_classes=5)
    # The key is the label: id_to_index does not apply to the official format.
    assert InstancePool(path, id_to_index={1: 5}).labels.tolist() == [0, 0, 7]
    for data, message in [
        ({"cat": ["*a.png"]}, "key 'cat': expected a 0-based category index"),
        ({"-1": ["*a.png"]}, "key '-1': expected a 0-based category index"),
        ({"0": "*a.png"}, "key '0': expected a list of paths"),
        ({"0": ["*a.png", 3]}, "key '0', entry 1: expected a path string"),
        ({"0": ["*"]}, "key '0', entry 0: expected a path string"),
        (["*a.png"], "expected a JSON object"),
    ]:
        with pytest.raises(ValueError, match=message):
            InstancePool(_official(tmp_path, data))
    (tmp_path / "official_pool.json").write_text('{"0": [')
    with pytest.raises(ValueError, match=r"official_pool\.json: expected an official pool JSON object"):
        InstancePool(tmp_path / "official_pool.json")
