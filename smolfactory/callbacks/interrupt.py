"""Save a resumable checkpoint when fit is stopped by Ctrl-C or SIGTERM, and last.ckpt at the final step."""

from __future__ import annotations

import signal
import threading
from pathlib import Path
from types import FrameType

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.exceptions import SIGTERMException

from smolfactory.checkpoints import written_at
from smolfactory.errors import SmolFactoryError

SIGNAL_NAMES = {signal.SIGINT: "Ctrl-C", signal.SIGTERM: "SIGTERM"}


class SaveOnInterrupt(L.Callback):
    def __init__(self, filename: str = "last.ckpt") -> None:
        """On Ctrl-C or SIGTERM during fit: finish the optimizer step, save a checkpoint, say how to resume.

        The stop waits for the end of the current optimizer step, so the checkpoint never holds half an
        accumulation window; every rank stops at the same step. A second Ctrl-C quits at once, without saving.

        When training ends between two periodic saves of a ``ModelCheckpoint(save_last=True)``, this also saves
        the final step's checkpoint: Lightning 2.6 saves last.ckpt at the end only if it saved nothing before.

        Args:
            filename: Checkpoint name, in the ModelCheckpoint folder (else default_root_dir/checkpoints); the
                default last.ckpt is what `--ckpt_path last` resumes from.
        """
        self.filename = filename
        self._requested: signal.Signals | None = None
        self._previous: dict[signal.Signals, object] = {}
        self._step = 0
        self._checkpointed_step: int | None = None  # the step of this fit's newest checkpoint, by any callback
        self._saved = False
        self._announce = True

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._requested, self._saved, self._step = None, False, trainer.global_step
        self._checkpointed_step = None
        self._announce = trainer.is_global_zero
        if threading.current_thread() is not threading.main_thread():
            return  # signal handlers can only be set from the main thread; Lightning's SIGTERM handling stays
        for signum in SIGNAL_NAMES:
            self._previous[signum] = signal.signal(signum, self._request_stop)

    def _request_stop(self, signum: int, frame: FrameType | None) -> None:
        self._requested = signal.Signals(signum)
        if signum == signal.SIGINT:  # the next Ctrl-C raises KeyboardInterrupt, as usual
            signal.signal(signal.SIGINT, signal.default_int_handler)
        if self._announce:  # a plain print: this runs between two Python instructions of the training loop
            print(f"\n{SIGNAL_NAMES[self._requested]}: stopping after this step to save a checkpoint", flush=True)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: object) -> None:
        if trainer.global_step == self._step:  # inside an accumulation window
            return
        self._step = trainer.global_step
        # A collective at every optimizer step (cheap): a signal may reach the ranks at different times.
        if not trainer.strategy.reduce_boolean_decision(self._requested is not None, all=False):
            return
        path = self._save(trainer)  # a failed write raises: the run stops with that error, not this message
        self._saved = True
        cause = SIGNAL_NAMES.get(self._requested, "A signal on another rank")
        rank_zero_info(f"{cause} at step {trainer.global_step}: saved {path}. Resume with the same command plus "
                       "--ckpt_path last")  # fmt: skip
        raise SIGTERMException  # a SystemExit: Lightning tears down and the process ends with status 0

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self._restore_handlers()
        if self._saved or trainer.state.fn != "fit":
            return
        if isinstance(exception, KeyboardInterrupt):
            rank_zero_info("Stopped by a second Ctrl-C, without saving a checkpoint.")
        elif isinstance(exception, SIGTERMException):  # SIGTERM before training started: Lightning's handler
            path = self._save(trainer)
            rank_zero_info(f"SIGTERM at step {trainer.global_step}: saved {path}. Resume with --ckpt_path last")

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        self._checkpointed_step = trainer.global_step

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._restore_handlers()
        # A fit of 45 steps that saves every 10 would otherwise leave last.ckpt at step 40: a resume would train
        # steps 41-45 again, and an export would miss them. ModelCheckpoint's own end-of-training save (it runs
        # after this hook) covers a fit in which nothing was saved yet.
        saves_last = any(isinstance(c, ModelCheckpoint) and c.save_last for c in trainer.checkpoint_callbacks)
        behind = self._checkpointed_step not in (None, trainer.global_step)
        if saves_last and behind and not trainer.fast_dev_run:
            self._save(trainer)

    def _restore_handlers(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}

    def _save(self, trainer: L.Trainer) -> Path:
        checkpoint = trainer.checkpoint_callback
        folder = checkpoint.dirpath if isinstance(checkpoint, ModelCheckpoint) and checkpoint.dirpath else None
        path = Path(folder or Path(trainer.default_root_dir) / "checkpoints") / self.filename
        before = written_at(path)
        trainer.save_checkpoint(path, weights_only=False)  # a full, resumable checkpoint (and no log line about it)
        if trainer.is_global_zero and written_at(path) in (None, before):  # a writer that failed without raising
            raise SmolFactoryError(f"the checkpoint {path} was not written; training stopped without saving it")
        return path
