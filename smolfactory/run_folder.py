"""The run folder (trainer.default_root_dir) of a LightningCLI config: what goes in it, what a new run finds
there, and which checkpoint ``--ckpt_path last`` means.

Every function takes the parsed config (jsonargparse Namespaces) before any class is built, so a refusal
costs nothing.
"""

from __future__ import annotations

import importlib
import os
import shutil
from datetime import timedelta
from pathlib import Path
from typing import Any

from jsonargparse import Namespace
from lightning.fabric.plugins import CheckpointIO
from lightning.pytorch.callbacks import ModelCheckpoint, ProgressBar
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only

from smolfactory.callbacks.progress import step_progress_bar_class
from smolfactory.checkpoints import AtomicCheckpointIO, check_checkpoint, is_remote, newest_checkpoint
from smolfactory.errors import SmolFactoryError


def prepare_run(subcommand: str, config: Namespace) -> str | None:
    """Check the run folder and resolve ``--ckpt_path`` before anything loads; returns the checkpoint to load.

    A fit without a checkpoint of this run starts a new run: its folder must not hold another one. A remote
    run folder (s3://, ...) is left to Lightning and fsspec.
    """
    trainer, ckpt_path = config.trainer, config.get("ckpt_path")
    if is_remote(trainer.default_root_dir or ""):
        return ckpt_path
    if ckpt_path == "last":
        ckpt_path = str(last_checkpoint(trainer))
    elif ckpt_path is not None and ckpt_path not in ("best", "hpc") and not ckpt_path.startswith("registry"):
        ckpt_path = ckpt_path if is_remote(ckpt_path) else str(check_checkpoint(ckpt_path))
    if subcommand == "fit":
        check_writable(run_folder(trainer))
        if ckpt_path is None or not any(_inside(ckpt_path, folder) for folder in checkpoint_folders(trainer)):
            start_run_folder(config)
    return ckpt_path


def run_folder(trainer: Namespace) -> Path:
    """The run's folder: trainer.default_root_dir (Lightning's default: the working directory)."""
    return Path(trainer.default_root_dir or os.getcwd()).expanduser()


def checkpoint_folders(trainer: Namespace) -> list[Path]:
    """Where the run's checkpoints go: each ModelCheckpoint's dirpath, and <run>/checkpoints (the default)."""
    folders = [run_folder(trainer) / "checkpoints"]
    for callback in trainer.callbacks or []:
        if _is_subclass(callback, ModelCheckpoint) and callback.init_args.get("dirpath"):
            folders.append(Path(callback.init_args.dirpath).expanduser())
    return list(dict.fromkeys(folders))


def add_run_defaults(trainer: Namespace) -> None:
    """Logs and checkpoints under trainer.default_root_dir unless the config names other folders, checkpoints
    written atomically, a progress bar that counts steps.

    Lightning's default logger is TensorBoard's when tensorboard happens to be installed, else CSV; ours is always
    CSV (no extra install, and what `smolfactory plot` reads); `logger: false` still turns it off. A ModelCheckpoint
    without dirpath would write under the logger's versioned folder, where `--ckpt_path last` of the next run
    would not look. The default ModelCheckpoint saves last.ckpt every DEFAULT_SAVE_INTERVAL of training.
    """
    root = trainer.default_root_dir or os.getcwd()
    root = root.rstrip("/") if is_remote(root) else str(Path(root).expanduser())
    if trainer.logger in (None, True):
        trainer.logger = Namespace(
            class_path="lightning.pytorch.loggers.CSVLogger", init_args=Namespace(save_dir=root, name="logs")
        )
    callbacks = trainer.callbacks or []
    checkpointing = [callback for callback in callbacks if _is_subclass(callback, ModelCheckpoint)]
    for callback in checkpointing:
        if not callback.init_args.get("dirpath"):
            callback.init_args.dirpath = f"{root}/checkpoints"
        # The folder holds one run (prepare_run): its last.ckpt is replaced, never versioned as last-v1.ckpt beside
        # a last.ckpt that the interrupt handler wrote.
        callback.init_args.enable_version_counter = False
        warn_if_last_waits(callback.init_args)
    if not checkpointing and trainer.enable_checkpointing is not False:  # Lightning's default one, placed here
        init_args = Namespace(dirpath=f"{root}/checkpoints", save_last=True, save_top_k=0, enable_version_counter=False,
                              train_time_interval=DEFAULT_SAVE_INTERVAL)  # fmt: skip
        trainer.callbacks = [*callbacks, Namespace(class_path="lightning.pytorch.callbacks.ModelCheckpoint",
                                                   init_args=init_args)]  # fmt: skip
    progress_bars = [callback for callback in trainer.callbacks or [] if _is_subclass(callback, ProgressBar)]
    if trainer.enable_progress_bar is not False and not progress_bars:
        bar = step_progress_bar_class()
        trainer.callbacks = [*(trainer.callbacks or []), Namespace(class_path=f"{bar.__module__}.{bar.__name__}")]
    plugins = trainer.plugins if isinstance(trainer.plugins, list) else [p for p in [trainer.plugins] if p]
    strategy = trainer.strategy
    own_io = isinstance(strategy, Namespace) and (strategy.get("init_args") or {}).get("checkpoint_io") is not None
    if not own_io and not any(_is_subclass(plugin, CheckpointIO) for plugin in plugins):
        checkpoint_io = Namespace(class_path=f"{AtomicCheckpointIO.__module__}.AtomicCheckpointIO")
        trainer.plugins = [*plugins, checkpoint_io]


# Time rather than steps: it bounds what a crash loses whatever a step costs, from a laptop CPU to a GPU node.
DEFAULT_SAVE_INTERVAL = timedelta(minutes=15)


def warn_if_last_waits(checkpoint: Namespace) -> None:
    """Say so when a ModelCheckpoint's last.ckpt would not follow training.

    In Lightning 2.6 `save_last` saves only beside a top-k checkpoint: never before the end of fit with
    save_top_k 0, only at a new best with a monitor. A crash then loses every step since.
    """
    periodic = checkpoint.get("every_n_train_steps") or checkpoint.get("train_time_interval") is not None
    if not checkpoint.get("save_last") or periodic:
        return
    if checkpoint.get("save_top_k", 1) == 0:
        when = "when fit ends"
    elif checkpoint.get("monitor") is not None and checkpoint.get("save_top_k", 1) != -1:
        when = f"when fit ends and at a new best {checkpoint.monitor}"
    else:
        return
    rank_zero_info(f"Note: the ModelCheckpoint writes last.ckpt only {when}, so a crash loses the steps since; add "
                   "every_n_train_steps or train_time_interval to it to save it as training goes")  # fmt: skip


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
    if not (checkpoints or final.exists()) or list(root.glob("hpc_ckpt_*.ckpt")):
        return  # (a SLURM job requeued by Lightning: it resumes its hpc_ckpt itself)
    held = ", ".join(str(path) for path in ([final] if final.exists() else []) + checkpoints[:3])
    if not config.overwrite:
        raise SmolFactoryError(
            f"{root} holds another run ({held}); continue it with --ckpt_path last, start this run in another "
            "--trainer.default_root_dir, or pass --overwrite true to replace it"
        )
    if rank_zero_only.rank != 0:  # every process of a distributed run parses the command; one deletes
        return
    for path in checkpoints:
        if path.is_dir():  # a sharded checkpoint
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
    rank_zero_info(f"--overwrite: deleted {len(checkpoints)} checkpoints of the previous run in {root}")


def last_checkpoint(trainer: Namespace) -> Path:
    """The newest complete checkpoint of the run (last, periodic or interrupt), or a one-line error."""
    folders = checkpoint_folders(trainer)
    found = newest_checkpoint(folders)
    if found is None:
        names = " or ".join(str(folder) for folder in folders)
        raise SmolFactoryError(
            f"--ckpt_path last: no complete checkpoint in {names}; give the checkpoint file, check "
            "--trainer.default_root_dir, or start a new run without --ckpt_path"
        )
    rank_zero_info(f"--ckpt_path last: resuming from {found}")
    return found


def _inside(path: str, folder: Path) -> bool:
    return Path(path).resolve().is_relative_to(folder.resolve())


def _is_subclass(spec: Any, base: type) -> bool:
    """Whether a config entry ({class_path, init_args}) names a subclass of ``base``."""
    if not isinstance(spec, Namespace) or not isinstance(spec.get("class_path"), str):
        return isinstance(spec, base)
    module, _, name = spec.class_path.rpartition(".")
    return isinstance(cls := getattr(importlib.import_module(module), name, None), type) and issubclass(cls, base)
