"""Stage 1, optional: more prompts per category from a local causal language model (divergen.md §1.1).

DiverGen had ChatGPT write 128 prompts per category (``input/gpt_prompt/``, one per line) to diversify what the
generators draw. ``diversify_prompts`` does the same with any local ``transformers`` causal LM (a path or hub id):
it asks for prompts in the shape of the official lines, keeps only well-formed lines that name the category,
and fills what is missing with the category's template prompt. ``generate.py`` calls it when
``prompts.llm_model`` is set (off by default) and writes the result with ``prompts.write_prompt_dir``.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Sequence
from typing import Any

from .hub import hf_from_pretrained
from .prompts import PromptCategory, job_seed, template_prompt

logger = logging.getLogger(__name__)

# divergen.md §1.1: DiverGen's 128 ChatGPT prompts per category open with one of these (about equal shares), vary
# colour / shape / attributes / context, and always end with ", in a white background" (the meta-prompt itself is
# not published; this instruction asks for the same shape of line).
DIVERSIFY_OPENINGS = (
    "A photo of",
    "A real photo of",
    "An image of",
    "An illustration of",
    "A photography of",
)
WHITE_BACKGROUND = ", in a white background"
DIVERSIFY_INSTRUCTION = (
    "Write {n} different prompts for a text-to-image model. Each prompt describes one single {name}{definition}. "
    "Vary the colour, shape, size, material, style, viewpoint and other attributes of the {name} from one prompt "
    'to the next. Start each prompt with one of: {openings}. End each prompt with "{suffix}". Write one prompt '
    "per line and nothing else."
)
MAX_PROMPT_CHARS = 300
# A leading list marker: "-", "•", "1.", "1)", "(1)", "#1:", "Prompt 1:" ... (a number only before a space, so
# "1.5 litre bottle" keeps its number).
_MARKER = re.compile(
    r"^(?:[-*•·–—>]+\s*|\(?\d{1,4}[.):\]](?:\s+|$)|\d{1,4}\s+-\s+|#\s*\d+\s*[.):-]?\s*|prompt\s*\d*\s*[:.)-]\s*)",
    re.I,
)
_QUOTES = " \t\"'`*“”‘’«»"


def load_llm(model_path: str | os.PathLike, *, device: str = "cpu", dtype: Any = None) -> tuple[Any, Any]:
    """``(AutoModelForCausalLM, AutoTokenizer)`` from a local directory or hub id, in eval mode on ``device``
    (``dtype``: e.g. ``torch.bfloat16`` on a GPU; ``None`` keeps the checkpoint's default)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = hf_from_pretrained(AutoTokenizer, model_path, what="LLM tokenizer")
    kwargs = {} if dtype is None else {"dtype": dtype}
    model = hf_from_pretrained(AutoModelForCausalLM, model_path, what="LLM", **kwargs)
    model.to(device).eval()
    logger.info("loaded LLM %s on %s", model_path, device)
    return model, tokenizer


def diversify_instruction(category: PromptCategory, n: int) -> str:
    """The request for ``n`` prompts about ``category`` (name with "_" -> " ", and its definition if any)."""
    definition = category.definition.strip().rstrip(".")
    return DIVERSIFY_INSTRUCTION.format(
        n=n,
        name=category.name.replace("_", " "),
        definition=f" ({definition})" if definition else "",
        openings=", ".join(f'"{o}"' for o in DIVERSIFY_OPENINGS),
        suffix=WHITE_BACKGROUND.lstrip(", "),
    )


def category_mentions(category: PromptCategory) -> tuple[str, ...]:
    """Lower-case names a prompt about ``category`` must contain one of: its name and synonyms, "_" -> " ",
    without LVIS's parenthesised sense (``bow_(weapon)`` -> "bow")."""
    names = (category.name, *category.synonyms)
    out = {re.sub(r"\s*\(.*?\)", "", n.replace("_", " ")).strip().lower() for n in names}
    return tuple(sorted(n for n in out if n))


def parse_prompt_lines(
    text: str, *, mentions: Sequence[str] = (), max_chars: int = MAX_PROMPT_CHARS
) -> list[str]:
    """The prompts in an LLM's answer ``text``, one per line, in order, without duplicates.

    Each line loses its list marker ("1.", "2)", "-", "*", "Prompt 3:") and surrounding quotes / markdown, and
    its inner whitespace is collapsed. Dropped: empty lines, headings and preambles (ending with ":"), lines
    mentioning none of ``mentions`` (case-insensitive; ``category_mentions``; empty = no check), and lines over
    ``max_chars`` characters. A line without "white background" gets ``WHITE_BACKGROUND`` appended (its final
    period dropped first), as every DiverGen prompt ends with it (divergen.md §1.1). Duplicates are found
    case-insensitively; the first is kept.
    """
    out, seen = [], set()
    for raw in text.splitlines():
        line = _MARKER.sub("", raw.strip(_QUOTES), count=1).strip(_QUOTES)
        line = " ".join(line.split())
        if not line or line.endswith(":"):
            continue
        lower = line.lower()
        if mentions and not any(m in lower for m in mentions):
            continue
        if "white background" not in lower:
            line = line.rstrip(".").rstrip() + WHITE_BACKGROUND
        key = line.lower()
        if len(line) > max_chars or key in seen:
            continue
        seen.add(key)
        out.append(line)
    return out


def diversify_prompts(
    categories: Sequence[PromptCategory],
    *,
    model_path: str | os.PathLike | None = None,
    llm: tuple[Any, Any] | None = None,
    prompts_per_category: int = 128,
    lines_per_request: int = 16,
    batch_size: int = 8,
    max_rounds: int = 4,
    max_new_tokens: int = 1024,
    temperature: float = 1.0,
    top_p: float = 0.95,
    require_name: bool = True,
    template: str = "divergen",
    seed: int = 0,
    device: str = "cpu",
) -> dict[int, list[str]]:
    """``{category_id: prompts_per_category prompts}`` written by a local LLM, DiverGen's prompt diversity
    (divergen.md §1.1: 128 ChatGPT prompts per category) with a model of your choice. Off by default in the
    pipeline; the result goes to ``write_prompt_dir`` / ``plan_jobs(prompts=...)``.

    Per category and round, one ``generate`` call samples up to ``batch_size`` answers, each to the request for
    ``lines_per_request`` prompts (``diversify_instruction``, through the tokenizer's chat template when it has
    one, else as plain text); ``parse_prompt_lines`` keeps the valid new lines. After ``max_rounds`` rounds a
    category still short of prompts is filled up with copies of its ``template_prompt`` (logged: how many).

    Arguments:
        categories: the categories (``load_categories``).
        model_path: a local directory or hub id for ``load_llm``; or pass ``llm``.
        llm: an already loaded ``(model, tokenizer)``, instead of ``model_path``.
        prompts_per_category: N, >= 1.
        lines_per_request: prompts asked for in one answer.
        batch_size: answers sampled per ``generate`` call.
        max_rounds: ``generate`` calls per category at most, >= 1.
        max_new_tokens: tokens per answer (about 30 per prompt line).
        temperature, top_p: sampling.
        require_name: drop lines that do not name the category (``category_mentions``).
        template: for the fill (``template_prompt``).
        seed: sampling seed; category ``c``'s round ``r`` samples from a seed derived from ``(seed, c, r)``, so
            a category's prompts do not depend on the other categories. The caller's RNG state is restored.
        device: where ``model_path`` is loaded.
    """
    import torch

    if (model_path is None) == (llm is None):
        raise ValueError("diversify_prompts: pass exactly one of model_path and llm")
    for key, value in [
        ("prompts_per_category", prompts_per_category),
        ("lines_per_request", lines_per_request),
        ("batch_size", batch_size),
        ("max_rounds", max_rounds),
        ("max_new_tokens", max_new_tokens),
    ]:
        if value < 1:
            raise ValueError(f"diversify_prompts: {key} must be >= 1, got {value}")
    model, tokenizer = llm if llm is not None else load_llm(model_path, device=device)
    model_device = next(model.parameters()).device
    # Sampling seeds the global RNGs: fork the CPU one and, on a GPU, that GPU's, so the caller's are restored.
    fork = []
    if model_device.type == "cuda":
        fork = [model_device.index if model_device.index is not None else torch.cuda.current_device()]
    out: dict[int, list[str]] = {}
    for category in categories:
        cid = category.category_id
        mentions = category_mentions(category) if require_name else ()
        lines: list[str] = []
        seen: set[str] = set()
        for round_index in range(max_rounds):
            missing = prompts_per_category - len(lines)
            if missing <= 0:
                break
            n_lines = min(lines_per_request, missing)
            n_answers = min(batch_size, -(-missing // n_lines))
            instruction = diversify_instruction(category, n_lines)
            with torch.random.fork_rng(devices=fork):
                torch.manual_seed(job_seed(seed, cid, 0, round_index))  # per (seed, category, round) only
                answers = _sample_answers(
                    model,
                    tokenizer,
                    instruction,
                    num=n_answers,
                    max_new_tokens=max_new_tokens,
                    temperature=temperature,
                    top_p=top_p,
                )
            for answer in answers:
                for line in parse_prompt_lines(answer, mentions=mentions):
                    if line.lower() not in seen and len(lines) < prompts_per_category:
                        seen.add(line.lower())
                        lines.append(line)
        filled = prompts_per_category - len(lines)
        if filled:
            logger.warning(
                "category %d (%s): the LLM gave %d valid prompts of %d; filled %d with the template prompt",
                cid,
                category.name,
                len(lines),
                prompts_per_category,
                filled,
            )
            lines += [template_prompt(category, template)] * filled
        out[cid] = lines
    return out


def _sample_answers(
    model: Any,
    tokenizer: Any,
    instruction: str,
    *,
    num: int,
    max_new_tokens: int,
    temperature: float,
    top_p: float,
) -> list[str]:
    """``num`` sampled answers of ``model`` to ``instruction``, decoded without the prompt."""
    import torch

    if getattr(tokenizer, "chat_template", None):
        messages = [{"role": "user", "content": instruction}]
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        enc = tokenizer(text, return_tensors="pt", add_special_tokens=False)
    else:
        enc = tokenizer(f"{instruction}\n\n", return_tensors="pt")
    n_in = enc["input_ids"].shape[1]
    # GPT-2-style absolute positions fail with an IndexError deep inside generate() past their table; say why.
    limit = getattr(model.config, "max_position_embeddings", None)
    if limit and n_in + max_new_tokens > limit:
        raise ValueError(
            f"diversify_prompts: the LLM's context holds {limit} tokens, but the request takes {n_in} and "
            f"max_new_tokens is {max_new_tokens}: lower max_new_tokens and lines_per_request, or use a longer model"
        )
    device = next(model.parameters()).device
    enc = {k: v.to(device) for k, v in enc.items()}
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    with torch.no_grad():
        out = model.generate(
            **enc,
            do_sample=True,
            temperature=temperature,
            top_p=top_p,
            max_new_tokens=max_new_tokens,
            num_return_sequences=num,
            pad_token_id=pad,
        )
    return tokenizer.batch_decode(out[:, n_in:], skip_special_tokens=True)
