"""Save a Hugging Face folder (adapter or full model, plus tokenizer) when fit ends."""

from __future__ import annotations

from pathlib import Path

import lightning as L
from lightning.pytorch.utilities import rank_zero_info

from smolfactory.export import save_pretrained_folder
from smolfactory.model.loading import load_tokenizer


class HFExport(L.Callback):
    def __init__(self, dirname: str = "final") -> None:
        """Write the trained model as a Hugging Face folder at the end of fit.

        Args:
            dirname: Folder under trainer.default_root_dir that receives the adapter (or full model) and tokenizer.
        """
        self.dirname = dirname

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        datamodule = trainer.datamodule
        tokenizer = getattr(datamodule, "tokenizer", None) or load_tokenizer(pl_module.hparams.model_name)
        path = save_pretrained_folder(pl_module.model, tokenizer, Path(trainer.default_root_dir) / self.dirname)
        rank_zero_info(f"Saved the trained model to {path} (load it with from_pretrained)")
