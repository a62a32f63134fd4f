"""Save a resumable checkpoint when fit is stopped by Ctrl-C or SIGTERM."""

from __future__ import annotations

from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.exceptions import SIGTERMException


class SaveOnInterrupt(L.Callback):
    def __init__(self, filename: str = "last.ckpt") -> None:
        """On Ctrl-C or SIGTERM during fit, save a checkpoint and say how to resume.

        Args:
            filename: Checkpoint name, in the ModelCheckpoint folder (else default_root_dir/checkpoints); the
                default last.ckpt is what `--ckpt_path last` resumes from.
        """
        self.filename = filename

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        # Lightning turns SIGTERM into SIGTERMException at the next batch boundary, on every rank.
        if not isinstance(exception, KeyboardInterrupt | SIGTERMException) or trainer.state.fn != "fit":
            return
        checkpoint = trainer.checkpoint_callback
        folder = checkpoint.dirpath if isinstance(checkpoint, ModelCheckpoint) and checkpoint.dirpath else None
        path = Path(folder or Path(trainer.default_root_dir) / "checkpoints") / self.filename
        trainer.save_checkpoint(path)
        cause = "Ctrl-C" if isinstance(exception, KeyboardInterrupt) else "SIGTERM"
        rank_zero_info(
            f"{cause} at step {trainer.global_step}: saved {path}. Resume with the same command plus --ckpt_path {path}"
        )
