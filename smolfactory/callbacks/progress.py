"""Progress bars that count a max_steps run's optimizer steps, resumed runs included.

Lightning's bars count the batches of an epoch: a run set by ``max_steps`` (``max_epochs`` then is -1) showed
``Epoch 0/-2``, and after a mid-epoch resume the bar started at the restored batch with a total of the steps
left (``7/1``), because Lightning skips ``on_train_epoch_start`` there. These show ``step/max_steps``.
"""

from __future__ import annotations

import importlib.util
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import RichProgressBar, TQDMProgressBar


class StepCounting:
    """What both bars share: the total, the position and the description of a max_steps run."""

    trainer: L.Trainer

    def counts_steps(self) -> bool:
        return self.trainer.max_epochs in (None, -1) and self.trainer.max_steps > 0

    def description(self) -> str:
        epochs = self.trainer.max_epochs
        return f"Epoch {self.trainer.current_epoch}" + (f"/{epochs - 1}" if epochs and epochs > 0 else "")

    @property
    def total_train_batches(self) -> int | float:
        return self.trainer.max_steps if self.counts_steps() else super().total_train_batches

    def get_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Any]:
        metrics = super().get_metrics(trainer, pl_module)
        metrics.pop("v_num", None)  # the log folder's version number, shown as a metric
        return metrics

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:  # fmt: skip
        if self.counts_steps():
            batch_idx = trainer.global_step - 1  # the bars show batch_idx + 1
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        self.describe()

    def describe(self) -> None:
        """Set the bar's description and total (after a resume the bar starts without on_train_epoch_start)."""


class StepRichProgressBar(StepCounting, RichProgressBar):
    """Lightning's rich bar, counting steps (the default where ``rich`` is installed, as in Lightning)."""

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_epoch_start(trainer, pl_module)
        self.describe()

    def describe(self) -> None:
        if self.progress is not None and self.train_progress_bar_id is not None:
            width = len(self.validation_description)
            self.progress.update(
                self.train_progress_bar_id, description=f"{self.description():{width}}", total=self.total_train_batches
            )


class StepTQDMProgressBar(StepCounting, TQDMProgressBar):
    """Lightning's tqdm bar, counting steps."""

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        self.describe()

    def on_train_epoch_start(self, trainer: L.Trainer, *args: Any) -> None:
        super().on_train_epoch_start(trainer, *args)
        self.describe()

    def describe(self) -> None:
        self.train_progress_bar.total = self.total_train_batches
        self.train_progress_bar.set_description(self.description(), refresh=False)


def step_progress_bar_class() -> type[StepRichProgressBar | StepTQDMProgressBar]:
    """The bar Lightning would pick (rich when installed, else tqdm), counting steps."""
    return StepRichProgressBar if importlib.util.find_spec("rich") else StepTQDMProgressBar
