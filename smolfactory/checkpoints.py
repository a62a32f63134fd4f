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
        if storage_options is not None or is_remote(path):  # remote storage: fsspec's transactions
            return super().save_checkpoint(checkpoint, path, storage_options)
        path = Path(path)
        try:
            with atomic_file(path) as staging, staging.open("wb") as file:
                torch.save(checkpoint, file)
                file.flush()
                os.fsync(file.fileno())
            for stale in path.parent.glob(f".{path.name}.tmp-*"):  # left by a process killed while writing
                stale.unlink(missing_ok=True)
        except OSError as error:
            raise SmolFactoryError(
                f"could not write checkpoint {path.name} in {path.parent} ({error.strerror or error}); training "
                "stopped. Free space or make that folder writable (or set trainer.default_root_dir), then resume "
                "with --ckpt_path last"
            ) from error


def is_remote(path: str | Path) -> bool:
    """Whether ``path`` is a URL (s3://, gs://, ...) that fsspec writes, rather than a local path."""
    return "://" in str(path)


def is_complete(path: Path) -> bool:
    """Whether ``path`` is a whole checkpoint: a zip archive with its central directory (what ``torch.save``
    writes last), or a sharded folder with the shards' ``.metadata`` and Lightning's ``meta.pt`` (written last)."""
    if path.is_dir():
        return (path / ".metadata").is_file() and is_complete(path / "meta.pt")
    try:
        with zipfile.ZipFile(path) as archive:
            return bool(archive.namelist())
    except (OSError, zipfile.BadZipFile):
        return False


def check_checkpoint(path: str | Path) -> Path:
    """The checkpoint file or sharded folder ``path``, or a one-line error saying why it cannot be resumed from."""
    path = Path(path).expanduser()
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
    found = {path: written_at(path) for folder in folders if folder.is_dir() for path in folder.glob("*.ckpt")}
    written = {path: time for path, time in found.items() if time is not None}  # not a link to a file that is gone
    for path in sorted(written, key=written.get, reverse=True):
        if is_complete(path):
            return path
    return None


def written_at(path: Path) -> int | None:
    """When a checkpoint (a file, or a sharded folder's ``meta.pt``) was last written, or None if it is not there."""
    try:
        return (path / "meta.pt" if path.is_dir() else path).stat().st_mtime_ns
    except OSError:
        return None


def check_same_settings(
    saved: dict[str, Any], current: dict[str, Any], prefix: str, resumable: set[str], ckpt_path: str | Path | None
) -> None:
    """One line naming every setting under ``prefix`` (model, data, trainer) in which a resumed run differs from
    the run that saved ``ckpt_path``; the settings in ``resumable`` may differ."""
    differences = setting_differences(saved, current, prefix, resumable)
    if differences:
        raise SmolFactoryError(
            f"--ckpt_path {ckpt_path} was saved by a run with other settings ({'; '.join(differences)}); resume "
            "with the checkpoint's settings, or start a new run without --ckpt_path"
        )


def setting_differences(saved: dict[str, Any], current: dict[str, Any], prefix: str, ignore: set[str]) -> list[str]:
    """``prefix.key is A there and B here`` for every setting that differs, nested settings by their own keys.

    A setting the checkpoint does not have (one added to smolfactory since) is not a difference; one this run
    does not have is (the checkpoint came from another recipe). Empty lists and mappings equal null.
    """
    differences = []
    for key in sorted(saved.keys() | current.keys()):
        if key.startswith("_") or key in ignore or key not in saved:
            continue
        before, after = _plain(saved[key]), _plain(current.get(key, MISSING))
        if isinstance(before, dict) and isinstance(after, dict):
            differences += setting_differences(before, after, f"{prefix}.{key}", set())
        elif before != after:
            differences.append(f"{prefix}.{key} is {_shown(before)} there and {_shown(after)} here")
    return differences


MISSING = object()


def _plain(value: Any) -> Any:
    """Settings as the YAML gives them: tuples as lists, empty containers as null."""
    if isinstance(value, tuple | list):
        return [_plain(item) for item in value] or None
    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items()} or None
    return value


def _shown(value: Any) -> str:
    return "not a setting" if value is MISSING else repr(value)
