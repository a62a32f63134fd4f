"""The run folder (trainer.default_root_dir) of a LightningCLI config: what goes in it, what a new run finds
there, and which checkpoint ``--ckpt_path last`` means.

Every function takes the parsed config (jsonargparse Namespaces) before any class is built, so a refusal
costs nothing.
"""

from __future__ import annotations

import importlib
import os
import shutil
from pathlib import Path
from typing import Any

from jsonargparse import Namespace
from lightning.fabric.plugins import CheckpointIO
from lightning.pytorch.callbacks import ModelCheckpoint, ProgressBar
from lightning.pytorch.utilities import rank_zero_info

from smolfactory.callbacks.progress import step_progress_bar_class
from smolfactory.checkpoints import AtomicCheckpointIO, newest_checkpoint
from smolfactory.errors import SmolFactoryError


def run_folder(trainer: Namespace) -> Path:
    """The run's folder: trainer.default_root_dir (Lightning's default: the working directory)."""
    return Path(trainer.default_root_dir or os.getcwd())


def checkpoint_folders(trainer: Namespace) -> list[Path]:
    """Where the run's checkpoints go: each ModelCheckpoint's dirpath, and <run>/checkpoints (the default)."""
    folders = [run_folder(trainer) / "checkpoints"]
    for callback in trainer.callbacks or []:
        if _is_subclass(callback, ModelCheckpoint) and callback.init_args.get("dirpath"):
            folders.append(Path(callback.init_args.dirpath))
    return list(dict.fromkeys(folders))


def add_run_defaults(trainer: Namespace) -> None:
    """Logs and checkpoints under trainer.default_root_dir unless the config names other folders, checkpoints
    written atomically, a progress bar that counts steps.

    Lightning's default logger is TensorBoard's when tensorboard happens to be installed, else CSV; ours is always
    CSV (no extra install, and what `smolfactory plot` reads); `logger: false` still turns it off. A ModelCheckpoint
    without dirpath would write under the logger's versioned folder, where `--ckpt_path last` of the next run
    would not look.
    """
    root = run_folder(trainer)
    if trainer.logger in (None, True):
        trainer.logger = Namespace(
            class_path="lightning.pytorch.loggers.CSVLogger", init_args=Namespace(save_dir=str(root), name="logs")
        )
    callbacks = trainer.callbacks or []
    checkpointing = [callback for callback in callbacks if _is_subclass(callback, ModelCheckpoint)]
    for callback in checkpointing:
        if not callback.init_args.get("dirpath"):
            callback.init_args.dirpath = str(root / "checkpoints")
    if not checkpointing and trainer.enable_checkpointing is not False:  # Lightning's default one, placed here
        init_args = Namespace(dirpath=str(root / "checkpoints"), save_last=True, save_top_k=0)
        trainer.callbacks = [*callbacks, Namespace(class_path="lightning.pytorch.callbacks.ModelCheckpoint",
                                                   init_args=init_args)]  # fmt: skip
    progress_bars = [callback for callback in trainer.callbacks or [] if _is_subclass(callback, ProgressBar)]
    if trainer.enable_progress_bar is not False and not progress_bars:
        bar = step_progress_bar_class()
        trainer.callbacks = [*(trainer.callbacks or []), Namespace(class_path=f"{bar.__module__}.{bar.__name__}")]
    plugins = trainer.plugins if isinstance(trainer.plugins, list) else [p for p in [trainer.plugins] if p]
    if not any(_is_subclass(plugin, CheckpointIO) for plugin in plugins):
        checkpoint_io = Namespace(class_path=f"{AtomicCheckpointIO.__module__}.AtomicCheckpointIO")
        trainer.plugins = [*plugins, checkpoint_io]


def check_writable(folder: Path) -> None:
    """A one-line error now, rather than a traceback from the logger or the first checkpoint later."""
    probe = folder / f".smolfactory-probe-{os.getpid()}"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe.touch()
        probe.unlink()
    except OSError as error:
        raise SmolFactoryError(
            f"cannot write to the run folder {folder} ({error.strerror or error}); set --trainer.default_root_dir "
            "to a folder you can write to"
        ) from error


def start_run_folder(config: Namespace) -> None:
    """Refuse a new run in a folder that holds another run's results, unless --overwrite says to replace them."""
    root = run_folder(config.trainer)
    final = root / config.export.dirname
    checkpoints = sorted(p for folder in checkpoint_folders(config.trainer) for p in folder.glob("*.ckpt"))
    if not (checkpoints or final.exists()):
        return
    held = ", ".join(str(path) for path in ([final] if final.exists() else []) + checkpoints[:3])
    if not config.overwrite:
        raise SmolFactoryError(
            f"{root} holds another run ({held}); continue it with --ckpt_path last, start this run in another "
            "--trainer.default_root_dir, or pass --overwrite true to replace it"
        )
    for path in checkpoints:
        if path.is_dir():  # a sharded checkpoint
            shutil.rmtree(path)
        else:
            path.unlink()
    rank_zero_info(f"--overwrite: deleted {len(checkpoints)} checkpoints of the previous run in {root}")


def last_checkpoint(config: Namespace) -> Path:
    """The newest complete checkpoint of the run (last, periodic or interrupt), or a one-line error."""
    folders = checkpoint_folders(config.trainer)
    found = newest_checkpoint(folders)
    if found is None:
        names = " or ".join(str(folder) for folder in folders)
        raise SmolFactoryError(
            f"--ckpt_path last: no complete checkpoint in {names}; give the checkpoint file, check "
            "--trainer.default_root_dir, or start a new run without --ckpt_path"
        )
    rank_zero_info(f"--ckpt_path last: resuming from {found}")
    return found


def _is_subclass(spec: Any, base: type) -> bool:
    """Whether a config entry ({class_path, init_args}) names a subclass of ``base``."""
    if not isinstance(spec, Namespace) or not isinstance(spec.get("class_path"), str):
        return isinstance(spec, base)
    module, _, name = spec.class_path.rpartition(".")
    return isinstance(cls := getattr(importlib.import_module(module), name, None), type) and issubclass(cls, base)
