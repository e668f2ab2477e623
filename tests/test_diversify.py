"""Stage 1, LLM prompt diversification (divergen.md §1.1): parsing rules on hand-written LLM answers, the template
fill, seeding, the prompt-file round trip, and a tiny random-weight causal LM end to end (no network)."""

from __future__ import annotations

import logging

import pytest
import torch

from divergen import diversify
from divergen.diversify import (
    DIVERSIFY_OPENINGS,
    category_mentions,
    diversify_instruction,
    diversify_prompts,
    parse_prompt_lines,
)
from divergen.hub import hf_from_pretrained
from divergen.prompts import PromptCategory, read_prompt_dir, template_prompt, write_prompt_dir

CAN = PromptCategory(
    3, "aerosol_can", "a dispenser that holds a substance under pressure", ("spray_can",), "c"
)
BOW = PromptCategory(7, "bow_(weapon)", "a weapon for shooting arrows", ("longbow",), "r")
MENTIONS = category_mentions(CAN)
SUFFIX = ", in a white background"


class FakeModel(torch.nn.Module):
    """Stands in for the LLM: ``diversify_prompts`` only asks it for its device."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))


def _fake_llm(monkeypatch, answer_fn):
    """Replace the sampling step by ``answer_fn(instruction, num) -> list[str]``; records every call."""
    calls = []

    def sample(model, tokenizer, instruction, *, num, **kw):
        calls.append((instruction, num))
        return answer_fn(instruction, num)

    monkeypatch.setattr(diversify, "_sample_answers", sample)
    return (FakeModel(), object()), calls


# ---------------------------------------------------------------------------------------------- parsing
def test_parse_prompt_lines_strips_markers_quotes_and_filters():
    text = "\n".join(
        [
            "Here are 12 prompts for an aerosol can:",
            "",
            "1. A photo of a red aerosol can, in a white background",
            "2) An image of a dented aerosol can, in a white background",
            "(3) A real photo of a tall spray can, in a white background",
            "- An illustration of a blue aerosol can with a white cap.",
            '* "A photography of a silver aerosol can, in a white background"',
            "Prompt 6: A photo of a rusty aerosol can, in a white background",
            "#7: A photo of a pink aerosol can, in a white background",
            "8. a photo of a RED aerosol can,  in a white background",  # duplicate of 1 (case, spacing)
            "9. A photo of a green bottle, in a white background",  # does not name the category
            "10. A photo of an aerosol can " + "with stripes " * 30,  # too long
            "1.5 litre aerosol can, in a white background",  # a number, not a marker
            "**An image of a yellow aerosol can, in a white background**",
            "12.",
        ]
    )
    assert parse_prompt_lines(text, mentions=MENTIONS) == [
        "A photo of a red aerosol can, in a white background",
        "An image of a dented aerosol can, in a white background",
        "A real photo of a tall spray can, in a white background",
        "An illustration of a blue aerosol can with a white cap" + SUFFIX,
        "A photography of a silver aerosol can, in a white background",
        "A photo of a rusty aerosol can, in a white background",
        "A photo of a pink aerosol can, in a white background",
        "1.5 litre aerosol can, in a white background",
        "An image of a yellow aerosol can, in a white background",
    ]


def test_parse_prompt_lines_without_mentions_and_max_chars():
    text = "1. A photo of a green bottle\n2. " + "x" * 50
    assert parse_prompt_lines(text) == ["A photo of a green bottle" + SUFFIX, "x" * 50 + SUFFIX]
    assert parse_prompt_lines(text, max_chars=60) == ["A photo of a green bottle" + SUFFIX]
    assert parse_prompt_lines("  \n\n:") == []


def test_category_mentions_and_instruction():
    assert category_mentions(CAN) == ("aerosol can", "spray can")
    assert category_mentions(BOW) == ("bow", "longbow")
    text = diversify_instruction(CAN, 16)
    assert "16" in text and "aerosol can (a dispenser that holds a substance under pressure)" in text
    assert all(f'"{o}"' in text for o in DIVERSIFY_OPENINGS) and '"in a white background"' in text
    assert "()" not in diversify_instruction(PromptCategory(9, "tench"), 4)


# ---------------------------------------------------------------------------------------------- diversify
def test_diversify_fills_with_template_and_bounds_the_calls(monkeypatch, caplog):
    answer = "1. A photo of a red aerosol can\n2. A photo of a blue aerosol can\n3. A photo of a dog\n"
    llm, calls = _fake_llm(monkeypatch, lambda instruction, num: [answer] * num)
    with caplog.at_level(logging.WARNING, logger="divergen.prompts"):
        out = diversify_prompts([CAN], llm=llm, prompts_per_category=10, lines_per_request=4, max_rounds=3)
    assert out[3][:2] == ["A photo of a red aerosol can" + SUFFIX, "A photo of a blue aerosol can" + SUFFIX]
    assert out[3][2:] == [template_prompt(CAN)] * 8
    assert "filled 8" in caplog.text and "aerosol_can" in caplog.text
    # 3 rounds at most; each asks for min(4, missing) lines in up to batch_size=8 answers.
    assert [n for _, n in calls] == [3, 2, 2] and "Write 4 different prompts" in calls[0][0]


def test_diversify_stops_when_enough_and_keeps_order(monkeypatch):
    def answers(instruction, num):
        return [
            "\n".join(f"A photo of aerosol can number {torch.randint(10**6, ()).item()}" for _ in range(4))
            for _ in range(num)
        ]

    llm, calls = _fake_llm(monkeypatch, answers)
    out = diversify_prompts(
        [CAN, BOW], llm=llm, prompts_per_category=6, lines_per_request=4, require_name=False
    )
    assert len(out[3]) == 6 and len(set(out[3])) == 6 and all(p.endswith(SUFFIX) for p in out[3])
    assert len(calls) == 2  # one round per category: 2 answers x 4 lines >= 6


def test_diversify_deterministic_per_category_and_restores_rng(monkeypatch):
    def answers(instruction, num):
        return [f"A photo of a {torch.rand(()).item():.6f} aerosol can" for _ in range(num)]

    llm, _ = _fake_llm(monkeypatch, answers)
    kw = {"llm": llm, "prompts_per_category": 5, "lines_per_request": 1, "require_name": False}
    torch.manual_seed(123)
    state = torch.get_rng_state()
    a = diversify_prompts([CAN, BOW], seed=0, **kw)
    assert torch.equal(torch.get_rng_state(), state)  # the caller's RNG is untouched
    assert diversify_prompts([CAN, BOW], seed=0, **kw) == a
    assert diversify_prompts([CAN], seed=0, **kw)[3] == a[3]  # independent of the other categories
    b = diversify_prompts([CAN, BOW], seed=1, **kw)
    assert b[3] != a[3] and b[7] != a[7] and a[3] != a[7]
    assert all(len(v) == 5 and len(set(v)) == 5 for v in (*a.values(), *b.values()))


def test_diversify_argument_errors(monkeypatch):
    llm, _ = _fake_llm(monkeypatch, lambda instruction, num: [""] * num)
    with pytest.raises(ValueError, match="exactly one of model_path and llm"):
        diversify_prompts([CAN])
    with pytest.raises(ValueError, match="exactly one of model_path and llm"):
        diversify_prompts([CAN], llm=llm, model_path="x")
    with pytest.raises(ValueError, match="prompts_per_category must be >= 1"):
        diversify_prompts([CAN], llm=llm, prompts_per_category=0)


# ---------------------------------------------------------------------------------------------- files
def test_write_prompt_dir_round_trip(tmp_path):
    lines = {
        3: ["A photo of a red aerosol can, in a white background", "An image of a can — “quoted”, ünïcode"],
        7: ["a photo of a single bow"] * 3,
    }
    root = write_prompt_dir(lines, tmp_path / "gpt")
    assert sorted(p.name for p in root.iterdir()) == ["3.txt", "7.txt"]  # no temporary file left
    assert read_prompt_dir(root, [CAN, BOW]) == lines
    # Another category's file is kept; a category's file is replaced whole.
    write_prompt_dir({7: ["only one"]}, root)
    assert read_prompt_dir(root, [CAN, BOW]) == {3: lines[3], 7: ["only one"]}


@pytest.mark.parametrize("bad", ["", " padded", "two\nlines", "sep\u2028arator", 5])
def test_write_prompt_dir_rejects_prompts_that_do_not_round_trip(tmp_path, bad):
    with pytest.raises(ValueError, match=r"prompts\[3\]\[1\]"):
        write_prompt_dir({3: ["fine", bad]}, tmp_path)
    assert not any(tmp_path.iterdir())
    with pytest.raises(ValueError, match=r"prompts\[3\]: expected a non-empty list"):
        write_prompt_dir({3: []}, tmp_path)


# ---------------------------------------------------------------------------------------------- loading
def test_hf_from_pretrained_errors(tmp_path):
    class Failing:
        @classmethod
        def from_pretrained(cls, source, **kw):
            raise OSError("no network")

    with pytest.raises(FileNotFoundError, match="no such local directory"):
        hf_from_pretrained(Failing, tmp_path / "absent", what="LLM")
    with pytest.raises(OSError, match=r"'org/model'.*huggingface-cli download org/model"):
        hf_from_pretrained(Failing, "org/model", what="LLM")
    with pytest.raises(OSError, match=r"LLM .*: cannot load a Failing from it"):
        hf_from_pretrained(Failing, tmp_path, what="LLM")


def test_tiny_llm_end_to_end(tmp_path, caplog, monkeypatch):
    tiny_models = pytest.importorskip("divergen.tiny_models")
    path = tmp_path / "llm"
    tiny_models.save_tiny_llm(path)
    llm = diversify.load_llm(path, device="cpu")
    kw = {"prompts_per_category": 3, "lines_per_request": 2, "max_new_tokens": 12, "max_rounds": 1}
    # The tiny LM reads 256 byte tokens: the full instruction does not fit, which is an error that says so.
    with pytest.raises(ValueError, match="context holds 256 tokens"):
        diversify_prompts([CAN], llm=llm, **kw)
    monkeypatch.setattr(diversify, "DIVERSIFY_INSTRUCTION", "Write {n} prompts about a {name}{definition}.")
    # Random weights write garbage that names no category: every prompt is the template's.
    with caplog.at_level(logging.WARNING, logger="divergen.prompts"):
        out = diversify_prompts([CAN, BOW], model_path=path, **kw)
    assert out == {3: [template_prompt(CAN)] * 3, 7: [template_prompt(BOW)] * 3}
    assert "filled 3" in caplog.text
    # Without the name check the garbage lines are kept, and the same seed samples the same ones.
    a = diversify_prompts([CAN], llm=llm, require_name=False, **kw)
    assert a == diversify_prompts([CAN], llm=llm, require_name=False, **kw)
    assert len(a[3]) == 3 and all(p.endswith(SUFFIX) for p in a[3])
    root = write_prompt_dir(a, tmp_path / "prompts")
    assert read_prompt_dir(root, [CAN]) == a
    # A tokenizer without a chat template gets the plain instruction.
    llm[1].chat_template = None
    b = diversify_prompts([CAN], llm=llm, require_name=False, **kw)
    assert len(b[3]) == 3 and b != a
