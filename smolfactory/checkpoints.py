"""A run's checkpoints: written atomically or not at all, found again by ``--ckpt_path last``, and refused
when they belong to another run.

Lightning's own writer stages the file in the system's temporary folder and moves it into place, which is a
copy (not atomic) when that folder is on another disk, and it drops a ``PermissionError`` without a word.
``AtomicCheckpointIO`` writes beside the target and renames, and any OS error stops the run with one line.
"""

from __future__ import annotations

import os
import zipfile
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins import TorchCheckpointIO

from smolfactory.errors import SmolFactoryError
from smolfactory.export import atomic_file


class AtomicCheckpointIO(TorchCheckpointIO):
    """``torch.save`` checkpoints through a hidden file beside the target, flushed to disk, then renamed onto it:
    a crash at any moment leaves the previous file whole, and a failed write ends the run with one line."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | Path, storage_options: Any = None) -> None:
        if storage_options is not None or "://" in str(path):  # remote storage: fsspec's transactions
            return super().save_checkpoint(checkpoint, path, storage_options)
        path = Path(path)
        try:
            with atomic_file(path) as staging, staging.open("wb") as file:
                torch.save(checkpoint, file)
                file.flush()
                os.fsync(file.fileno())
        except OSError as error:
            raise SmolFactoryError(
                f"could not write checkpoint {path.name} in {path.parent} ({error.strerror or error}); training "
                "stopped. Free space or make that folder writable (or set trainer.default_root_dir), then resume "
                "with --ckpt_path last"
            ) from error


def is_complete(path: Path) -> bool:
    """Whether ``path`` is a whole checkpoint: a zip archive with its central directory (what ``torch.save``
    writes last), or a sharded folder with its ``.metadata`` (what distributed checkpointing writes last)."""
    if path.is_dir():
        return (path / ".metadata").is_file()
    try:
        with zipfile.ZipFile(path) as archive:
            return bool(archive.namelist())
    except (OSError, zipfile.BadZipFile):
        return False


def check_checkpoint(path: str | Path) -> Path:
    """The checkpoint file or sharded folder ``path``, or a one-line error saying why it cannot be resumed from."""
    path = Path(path)
    if not path.exists():
        raise SmolFactoryError(f"--ckpt_path {path}: no such checkpoint; give a .ckpt file, or --ckpt_path last")
    if not is_complete(path):
        raise SmolFactoryError(
            f"--ckpt_path {path} is incomplete or not a checkpoint (a write cut short?); give an earlier checkpoint "
            "of the run, or start a new run without --ckpt_path"
        )
    return path


def newest_checkpoint(folders: list[Path]) -> Path | None:
    """The most recently written complete checkpoint (``*.ckpt``: last, periodic or interrupt) in ``folders``."""
    found = {path for folder in folders if folder.is_dir() for path in folder.glob("*.ckpt")}
    for path in sorted(found, key=lambda path: path.stat().st_mtime, reverse=True):
        if is_complete(path):
            return path
    return None


def check_same_settings(
    saved: dict[str, Any], current: dict[str, Any], prefix: str, resumable: set[str], ckpt_path: str | Path | None
) -> None:
    """One line naming every setting under ``prefix`` (model, data) in which a resumed run differs from the run
    that saved ``ckpt_path``; the settings in ``resumable`` may differ."""
    differences = setting_differences(saved, current, prefix, resumable)
    if differences:
        raise SmolFactoryError(
            f"--ckpt_path {ckpt_path} was saved by a run with other settings ({'; '.join(differences)}); resume "
            "with the checkpoint's settings, or start a new run without --ckpt_path"
        )


def setting_differences(saved: dict[str, Any], current: dict[str, Any], prefix: str, ignore: set[str]) -> list[str]:
    """``prefix.key: saved -> current`` for every setting (nested dicts flattened) that differs, ``ignore`` aside."""
    saved, current = _flat(saved), _flat(current)
    differences = []
    for key in sorted(saved.keys() | current.keys()):
        if key.startswith("_") or key.split(".")[0] in ignore:
            continue
        before, after = saved.get(key, "unset"), current.get(key, "unset")
        if _plain(before) != _plain(after):
            differences.append(f"{prefix}.{key} is {before!r} there and {after!r} here")
    return differences


def _flat(settings: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat = {}
    for key, value in settings.items():
        if isinstance(value, dict):
            flat |= _flat(value, f"{prefix}{key}.")
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _plain(value: Any) -> Any:
    """Tuples and lists compare equal (a checkpoint's YAML-born lists against a signature's tuples)."""
    return list(value) if isinstance(value, tuple | list) else value
