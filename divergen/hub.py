"""Loading models by Hugging Face hub id or local directory, with errors that say how to fetch them offline."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any


def model_source(model: str | os.PathLike, *, what: str) -> tuple[str, bool]:
    """``(what to pass to from_pretrained, whether it is a local directory)`` for ``model``.

    A path that exists is local. One that does not, but cannot be a hub id (absolute, starting with "." or "~",
    or with more than one "/"), is a ``FileNotFoundError`` naming ``what``; anything else is taken as a hub id.
    """
    name = str(model)
    path = Path(name).expanduser()
    if path.exists():
        return str(path), True
    if path.is_absolute() or name.startswith((".", "~")) or name.count("/") > 1:
        raise FileNotFoundError(f"{what} {name!r}: no such local directory")
    return name, False


def download_hint(name: str) -> str:
    return (
        f"Without network download it first, e.g. `huggingface-cli download {name} --local-dir <dir>` (gated "
        f"models such as DeepFloyd IF need the licence accepted and `huggingface-cli login`), then pass <dir>."
    )


def hf_from_pretrained(cls: Any, model: str | os.PathLike, *, what: str, **kwargs: Any) -> Any:
    """``cls.from_pretrained(model, **kwargs)`` for a local directory or a hub id; ``what`` names the model in
    the errors (a missing directory, or a hub id that cannot be fetched, with how to download it)."""
    source, is_local = model_source(model, what=what)
    try:
        return cls.from_pretrained(source, **kwargs)
    except (OSError, ValueError) as e:  # transformers: OSError for missing files / no network
        if is_local:
            raise OSError(f"{what} {source}: cannot load a {cls.__name__} from it ({e})") from e
        raise OSError(
            f"{what} {source!r}: not a local directory and not loadable from the Hugging Face hub ({e}). "
            + download_hint(source)
        ) from e
