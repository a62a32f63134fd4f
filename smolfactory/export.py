"""Write a trained module as a standard Hugging Face folder, and single files, atomically."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from peft import PeftModel
from transformers import PreTrainedModel, PreTrainedTokenizerBase


def save_pretrained_folder(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    path: str | Path,
    state_dict: dict | None = None,
    card: str | None = None,
) -> Path:
    """Save a model (a PEFT adapter or a full model) with its tokenizer and chat template to ``path``.

    ``state_dict`` replaces the model's own weights (a sharded model passes its gathered full weights);
    ``card`` becomes the folder's README.md.

    Everything is written to a hidden sibling staging folder and renamed into place, so ``path`` never
    holds a half-written export. An existing folder at ``path`` is first renamed to ``.NAME.old-PID`` and
    deleted once the new one is in place: a crash between those two renames leaves the old export there.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    try:
        if isinstance(model, PeftModel):  # only the trained adapter (DPO keeps a frozen reference one beside it)
            model.save_pretrained(staging, state_dict=state_dict, selected_adapters=[model.active_adapter])
        else:
            model.save_pretrained(staging, state_dict=state_dict)
        tokenizer.save_pretrained(staging)
        if card is not None:
            (staging / "README.md").write_text(card)
        if path.exists():
            retired = path.with_name(f".{path.name}.old-{os.getpid()}")
            os.replace(path, retired)
            os.replace(staging, path)
            shutil.rmtree(retired)
        else:
            os.replace(staging, path)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return path


@contextmanager
def atomic_file(path: str | Path) -> Iterator[Path]:
    """A hidden staging path beside ``path`` to write to; renamed onto ``path`` when the block ends without an
    error, removed otherwise, so ``path`` never holds a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        yield staging
        os.replace(staging, path)
    finally:
        staging.unlink(missing_ok=True)
