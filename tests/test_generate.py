"""The generation pipeline's stages together (divergen/generation.py, generate.py): config, resume after a crash,
two processes, thresholds re-applied without re-scoring, the report. Fast: a stand-in generator (white
background + a disc), a stand-in SAM (the non-white pixels), the tiny random open_clip model, a tiny synthetic
LVIS set for the categories and the real crops."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from divergen import annotate, generation, generators, tiny_models
from divergen.config import ConfigError, load_config, save_config
from divergen.data import CategoryInfo
from divergen.generation import (
    GenerateConfig,
    Layout,
    RecordWriter,
    load_generate_config,
    read_records,
    run,
)
from divergen.pool import InstancePool
from divergen.synthetic import make_synthetic_lvis

from .test_engine import free_port

pytest.importorskip("open_clip")

REPO = Path(__file__).resolve().parents[1]
NUM_CATEGORIES = 4


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("assets")
    data = make_synthetic_lvis(
        root / "data", num_train=24, num_val=2, num_categories=NUM_CATEGORIES, image_size=(64, 80)
    )
    clip_config, clip_weights = tiny_models.save_tiny_clip(root / "clip")
    sam = root / "sam.pth"
    sam.write_bytes(b"")  # load_sam is replaced; the file only has to exist
    return {**data, "clip_config": clip_config, "clip_weights": clip_weights, "sam": sam}


def make_config(assets: dict[str, Path], output_dir: Path, *overrides: str) -> GenerateConfig:
    path = output_dir.parent / f"{output_dir.name}.toml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        f"""
output_dir = "{output_dir}"
device = "cpu"
[prompts]
annotations = "{assets["train_json"]}"
images_per_category = 6
[[generators]]
kind = "sd"
model = "unused: load_generator is replaced"
dtype = "float32"
batch_size = 4
[annotate]
sam_checkpoint = "{assets["sam"]}"
[filter]
clip_model = "{tiny_models.TINY_CLIP_MODEL}"
clip_model_config = "{assets["clip_config"]}"
clip_pretrained = "{assets["clip_weights"]}"
min_inter_similarity = 0.0
real_image_root = "{assets["image_root"]}"
batch_size = 4
"""
    )
    return load_generate_config(path, overrides)


class DiscGenerator:
    """``Generator``'s interface: a white 48² image with a disc whose colour and radius follow the job's seed
    (radius 0 for seeds divisible by 7: an empty image that annotation rejects)."""

    def __init__(self, spec, calls: list, crash_after: int | None = None) -> None:
        self.spec, self.name, self.calls, self.crash_after = spec, spec.name, calls, crash_after

    def generate(self, jobs):
        if self.crash_after is not None and len(self.calls) >= self.crash_after:
            raise KeyboardInterrupt  # a kill: not an Exception, so generate_to_disk does not catch it
        self.calls.append([j.seed for j in jobs])
        out = []
        for j in jobs:
            rng = np.random.default_rng(j.seed)
            image = np.full((48, 48, 3), 255, np.uint8)
            radius = 0 if j.seed % 7 == 0 else int(rng.integers(6, 20))
            yy, xx = np.mgrid[:48, :48]
            image[(yy - 24) ** 2 + (xx - 24) ** 2 < radius**2] = rng.integers(0, 200, 3)
            out.append(Image.fromarray(image))
        return out


class WhiteBackgroundSam:
    """``SamPredictor``'s interface: all three candidate masks are the white pixels."""

    def __init__(self, calls: list, crash_after: int | None = None) -> None:
        self.calls, self.crash_after = calls, crash_after

    def set_image(self, image):
        if self.crash_after is not None and len(self.calls) >= self.crash_after:
            raise KeyboardInterrupt
        self.calls.append(1)
        self.image = image

    def predict(self, *, point_coords, point_labels, multimask_output):
        background = (self.image == 255).all(axis=2)
        return np.stack([background] * 3), np.full(3, 0.5, np.float32), None


@pytest.fixture
def fakes(monkeypatch):
    """Replace the model loaders; returns the call logs (and a dict to set crash points)."""
    state = {"gen_calls": [], "sam_calls": [], "gen_crash": None, "sam_crash": None, "loads": []}

    def load_generator(spec, *, device):
        state["loads"].append(spec.name)
        return DiscGenerator(spec, state["gen_calls"], state["gen_crash"])

    def load_sam(checkpoint, *, model_type, device):
        return WhiteBackgroundSam(state["sam_calls"], state["sam_crash"])

    monkeypatch.setattr(generators, "load_generator", load_generator)
    monkeypatch.setattr(annotate, "load_sam", load_sam)
    return state


def pool_lines(output_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (output_dir / "pool.jsonl").read_text().splitlines()]


def assert_same_pool(got: list[dict], expected: list[dict]) -> None:
    """The same records in the same order; CLIP scores to float rounding (a resumed or split run scores the
    cut-outs in other batches)."""
    scores = ("clip_score", "clip_inter_sim")
    assert [{k: v for k, v in r.items() if k not in scores} for r in got] == [
        {k: v for k, v in r.items() if k not in scores} for r in expected
    ]
    for k in scores:
        assert [r[k] for r in got] == pytest.approx([r[k] for r in expected], abs=1e-5)


# ------------------------------------------------------------------------------------------------ config


@pytest.mark.parametrize("name", ["generate_demo.toml", "generate_if.toml", "generate_sd.toml"])
def test_shipped_configs_load_and_round_trip(name, tmp_path):
    cfg = load_generate_config(REPO / "configs" / name)
    save_config(cfg, tmp_path / "c.toml")
    assert load_config(tmp_path / "c.toml", schema=GenerateConfig) == cfg
    assert cfg.generators and all(isinstance(g, generators.GeneratorSpec) for g in cfg.generators)


def test_config_errors_name_the_key(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('[prompts]\nannotations = "a.json"\n[[generators]]\nkind = "gan"\nmodel = "x"\n')
    with pytest.raises(ConfigError, match=r"generators\[0\].*kind"):
        load_generate_config(path)
    path.write_text('[prompts]\nannotations = "a.json"\n[[generators]]\nmodell = "x"\n')
    with pytest.raises(ConfigError, match=r"generators\[0\]\.modell"):
        load_generate_config(path)
    path.write_text(
        '[prompts]\nannotations = "a.json"\n[[generators]]\nkind = "sd"\n[[generators]]\nkind = "sd"\n'
    )
    with pytest.raises(ConfigError, match="distinct"):
        load_generate_config(path)
    path.write_text('[prompts]\nannotations = "a.json"\n[annotate]\nannotators = ["sam", "u2net"]\n')
    with pytest.raises(ConfigError, match="annotate.annotators"):
        load_generate_config(path)
    path.write_text("[prompts]\nimages_per_category = 8\n")
    with pytest.raises(ConfigError, match="prompts.annotations"):
        load_generate_config(path)


def test_unknown_category_id_is_an_error(assets, tmp_path):
    cfg = make_config(assets, tmp_path / "run", "prompts.category_ids=[1, 999]")
    with pytest.raises(ValueError, match=r"\[999\] are not categories"):
        run(cfg, ["prompts"], progress=False)


def test_missing_inputs_fail_before_any_work(assets, tmp_path):
    cfg = make_config(
        assets,
        tmp_path / "run",
        f"annotate.sam_checkpoint={tmp_path / 'absent.pth'}",
        'generators=[{kind="sd", model="./weights/absent-sd"}]',
    )
    with pytest.raises(FileNotFoundError) as e:
        run(cfg, progress=False)
    assert "annotate.sam_checkpoint" in str(e.value) and "generators[0].model" in str(e.value)
    assert not (Path(cfg.output_dir) / "prompts").exists()
    run(cfg, ["prompts"], progress=False)  # a stage that needs neither still runs


def test_later_stage_without_prompts_says_which_stage_to_run(assets, tmp_path):
    cfg = make_config(assets, tmp_path / "run")
    with pytest.raises(FileNotFoundError, match="run the 'prompts' stage first"):
        run(cfg, ["generate"], progress=False)


# ------------------------------------------------------------------------------------------------ records


def test_record_writer_cuts_a_torn_line_and_reader_skips_bad_ones(tmp_path, caplog):
    path = tmp_path / "r" / "rank0.jsonl"
    with RecordWriter(path) as w:
        w.write({"a": 1})
    with open(path, "a") as f:
        f.write('{"a": 2, "b":')  # a crash mid-write
    with RecordWriter(path) as w:
        w.write({"a": 3})
    assert [r["a"] for r in read_records(path.parent)] == [1, 3]
    (path.parent / "rank1.jsonl").write_text('{"a": 4}\nnot json\n{"a": 5}\n')
    assert [r["a"] for r in read_records(path.parent)] == [1, 3, 4, 5]
    assert "not a JSON record" in caplog.text


# ------------------------------------------------------------------------------------------------ pipeline


def test_pipeline_writes_a_pool_train_can_read(assets, tmp_path, fakes):
    cfg = make_config(assets, tmp_path / "run")
    results = run(cfg, progress=False)
    out = Path(cfg.output_dir)
    records = pool_lines(out)
    planned = NUM_CATEGORIES * cfg.prompts.images_per_category
    assert results["generate"]["sd15"]["generated"] == planned
    # Annotation: every image gets a record; empty discs are rejected, the others cut out.
    ann = list(read_records(out / "annotations"))
    assert len(ann) == planned and len({r["image"] for r in ann}) == planned
    rejected = [r for r in ann if r["cutout"] is None]
    assert rejected and all(r["reason"] == "empty" for r in rejected)
    assert all(r["seed"] % 7 == 0 for r in rejected) and all(r["seed"] % 7 for r in ann if r["cutout"])
    # Every cut-out is scored; the kept ones are those over the threshold.
    scores = list(read_records(out / "scores"))
    assert sorted(r["cutout"] for r in scores) == sorted(r["cutout"] for r in ann if r["cutout"])
    kept = {r["cutout"] for r in scores if r["clip_inter_sim"] >= 0.0}
    assert {r["path"] for r in records} == kept and kept
    for r in records:
        assert set(r) >= {
            "path",
            "category_id",
            "generator",
            "prompt",
            "seed",
            "clip_score",
            "clip_inter_sim",
        }
        with Image.open(out / r["path"]) as im:
            assert im.mode == "RGBA"
    # The report adds up, per category and in total.
    summary = json.loads((out / "report" / "summary.json").read_text())
    assert summary["planned"] == summary["generated"] == planned
    assert summary["annotated"] + summary["rejected_annotation"] == planned
    assert summary["scored"] == summary["annotated"] and summary["kept"] == len(records)
    rows = (out / "report" / "categories.csv").read_text().splitlines()
    assert len(rows) == 1 + NUM_CATEGORIES and rows[0].startswith("category_id,name,frequency,planned")
    assert len(list((out / "report" / "sheets").glob("*.png"))) == NUM_CATEGORIES
    # train.py's reader takes it as it is (relative paths resolve against the pool's folder).
    with open(assets["train_json"]) as f:
        info = CategoryInfo.from_annotations(json.load(f), assets["train_json"])
    pool = InstancePool(out / "pool.jsonl", id_to_index=info.id_to_index, num_classes=NUM_CATEGORIES)
    assert len(pool) == len(records)
    assert all(pool.load(i) is not None for i in range(len(pool)))


def test_rerun_does_no_work_and_pool_thresholds_apply_without_rescoring(assets, tmp_path, fakes, monkeypatch):
    cfg = make_config(assets, tmp_path / "run")
    run(cfg, progress=False)
    before = pool_lines(Path(cfg.output_dir))
    n_gen, n_sam = len(fakes["gen_calls"]), len(fakes["sam_calls"])

    def no_clip(*args, **kwargs):
        raise AssertionError("nothing is left to score: CLIP must not load")

    monkeypatch.setattr(generation, "load_scorer", no_clip)
    again = run(cfg, progress=False)
    planned = NUM_CATEGORIES * cfg.prompts.images_per_category
    assert again["annotate"] == {"skipped_existing": planned}
    assert again["filter"] == {"skipped_existing": again["pool"]["annotated"]}
    assert (len(fakes["gen_calls"]), len(fakes["sam_calls"])) == (n_gen, n_sam)
    assert fakes["loads"] == ["sd15"]  # the generator was not even loaded the second time
    assert pool_lines(Path(cfg.output_dir)) == before
    median = float(np.median([r["clip_inter_sim"] for r in before]))
    stricter = make_config(assets, tmp_path / "run", f"filter.min_inter_similarity={median}")
    run(stricter, ["pool"], progress=False)
    after = pool_lines(Path(cfg.output_dir))
    assert {r["path"] for r in after} == {r["path"] for r in before if r["clip_inter_sim"] >= median}
    assert 0 < len(after) < len(before)


def test_resume_after_crashes_gives_the_same_pool(assets, tmp_path, fakes):
    reference = make_config(assets, tmp_path / "straight")
    run(reference, progress=False)
    expected = pool_lines(Path(reference.output_dir))

    cfg = make_config(assets, tmp_path / "crashy")
    out = Path(cfg.output_dir)
    fakes["gen_crash"] = len(fakes["gen_calls"]) + 2  # killed in its third generation batch
    with pytest.raises(KeyboardInterrupt):
        run(cfg, progress=False)
    assert len(list((out / "images").rglob("*.png"))) == 8
    fakes["gen_crash"], fakes["sam_crash"] = None, len(fakes["sam_calls"]) + 5  # then killed mid-annotation
    with pytest.raises(KeyboardInterrupt):
        run(cfg, progress=False)
    assert len(list(read_records(out / "annotations"))) == 5
    fakes["sam_crash"] = None
    run(cfg, ["filter"], progress=False)
    with open(out / "scores" / "rank0.jsonl", "rb+") as f:  # a torn last line, and one record lost
        data = f.read()
        f.truncate(data.rfind(b"\n", 0, len(data) - 1) + 10)
    run(cfg, progress=False)
    # No job was generated twice (the straight run's, then 8 + the rest), and the pool is the uninterrupted one.
    assert sum(len(c) for c in fakes["gen_calls"]) == 2 * NUM_CATEGORIES * 6
    got = pool_lines(out)
    assert_same_pool(got, expected)
    assert len({r["path"] for r in got}) == len(got)
    scored = [r["cutout"] for r in read_records(out / "scores")]
    assert len(scored) == len(set(scored))


def test_a_broken_image_is_counted_then_regenerated(assets, tmp_path, fakes):
    cfg = make_config(assets, tmp_path / "run")
    out = Path(cfg.output_dir)
    run(cfg, ["prompts", "generate"], progress=False)
    broken = sorted((out / "images").rglob("*.png"))[3]
    broken.write_bytes(broken.read_bytes()[:40])  # a truncated PNG
    counts = run(cfg, ["annotate"], progress=False)["annotate"]
    assert counts["unreadable"] == 1 and counts["written"] + counts["empty"] == NUM_CATEGORIES * 6 - 1
    assert Layout(out).rel(broken) not in {r["image"] for r in read_records(out / "annotations")}
    counts = run(cfg, ["generate", "annotate"], progress=False)
    assert counts["generate"]["sd15"]["generated"] == 1 and "unreadable" not in counts["annotate"]
    assert Layout(out).rel(broken) in {r["image"] for r in read_records(out / "annotations")}


def test_two_processes_split_the_categories_and_merge(assets, tmp_path, fakes):
    single = make_config(assets, tmp_path / "single")
    run(single, progress=False)
    cfg = make_config(assets, tmp_path / "split")
    barrier_calls = []
    for stages in (["prompts"], ["generate", "annotate", "filter"]):
        for rank in (0, 1):
            run(cfg, stages, rank=rank, world_size=2, barrier=lambda: barrier_calls.append(1), progress=False)
    run(cfg, ["pool"], rank=1, world_size=2, barrier=lambda: None, progress=False)
    out = Path(cfg.output_dir)
    assert not (out / "pool.jsonl").exists()  # only rank 0 merges
    run(cfg, ["pool"], rank=0, world_size=2, barrier=lambda: None, progress=False)
    assert barrier_calls  # the prompts stage waits for the other process
    # Each process wrote only its own categories: sorted ids dealt round-robin.
    layout, ids = Layout(out), sorted({r["category_id"] for r in read_records(out / "annotations")})
    for rank in (0, 1):
        for folder in (layout.annotations, layout.scores):
            lines = (folder / f"rank{rank}.jsonl").read_text().splitlines()
            assert {json.loads(x)["category_id"] for x in lines} == set(ids[rank::2])
    assert_same_pool(pool_lines(out), pool_lines(Path(single.output_dir)))


def _generate_cli():
    spec = importlib.util.spec_from_file_location("_cli_generate", REPO / "generate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cli_runs_stages_and_saves_the_resolved_config(assets, tmp_path, fakes):
    cfg = make_config(assets, tmp_path / "run")
    config = tmp_path / "run.toml"
    cli = _generate_cli()
    assert (
        cli.main(["--config", str(config), "--stage", "prompts", "--stage", "generate", "--no-progress"]) == 0
    )
    out = Path(cfg.output_dir)
    assert load_config(out / "config.toml", schema=GenerateConfig) == cfg
    assert (
        len(list((out / "images").rglob("*.png"))) == NUM_CATEGORIES * 6 and not (out / "pool.jsonl").exists()
    )
    with pytest.raises(SystemExit) as e:
        cli.main(["--config", str(config), "--set", "filter.min_inter_similarty=0.5"])
    assert e.value.code == 2
    with pytest.raises(SystemExit):
        cli.main(["--config", str(config), "--stage", "paste"])


def test_stage_names_are_checked(assets, tmp_path):
    with pytest.raises(ValueError, match="unknown stages"):
        run(make_config(assets, tmp_path / "run"), ["prompts", "paste"], progress=False)


@pytest.mark.slow
def test_accelerate_launch_two_processes_with_the_tiny_models(assets, tmp_path):
    """The CLI under ``accelerate launch --num_processes 2`` (gloo on CPU), with the real loaders and the tiny
    random-weight SD / SAM / CLIP: the same pool as one process."""
    models = tiny_models.write_demo_models(tmp_path / "models", sd_image_size=32)
    config = tmp_path / "tiny.toml"
    config.write_text(
        f"""
output_dir = "{tmp_path / "two"}"
device = "cpu"
[prompts]
annotations = "{assets["train_json"]}"
template = "xpaste"
images_per_category = 2
[[generators]]
kind = "sd"
model = "{models["sd"]}"
dtype = "float32"
steps = 2
size = 32
batch_size = 2
[annotate]
sam_checkpoint = "{models["sam"]}"
sam_model_type = "tiny"
min_area = 0.0
max_area = 1.0
[filter]
clip_model = "{tiny_models.TINY_CLIP_MODEL}"
clip_model_config = "{models["clip_config"]}"
clip_pretrained = "{models["clip_weights"]}"
min_inter_similarity = -1.0
real_image_root = "{assets["image_root"]}"
max_real_crops_per_category = 4
"""
    )
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"]
    launcher += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    launcher += ["--main_process_port", str(free_port())]
    proc = subprocess.run(
        [*launcher, str(REPO / "generate.py"), "--config", str(config), "--no-progress"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    two = tmp_path / "two"
    assert {p.name for p in (two / "annotations").iterdir()} == {"rank0.jsonl", "rank1.jsonl"}
    single = load_generate_config(config, [f"output_dir={tmp_path / 'one'}"])
    run(single, progress=False)
    expected = pool_lines(tmp_path / "one")
    assert expected and len(expected) == len({r["path"] for r in expected})
    assert_same_pool(pool_lines(two), expected)
