"""Write `smolfactory predict` generations to a JSONL file."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import BasePredictionWriter
from lightning.pytorch.utilities import rank_zero_info

from smolfactory.export import atomic_file


class PredictionWriter(BasePredictionWriter):
    def __init__(self, filename: str = "predictions.jsonl") -> None:
        """Write each prompt, the generated answer and the dataset's answer as one JSON line.

        Args:
            filename: File under trainer.default_root_dir; rows of {prompt, generated, reference}.
        """
        super().__init__(write_interval="batch")
        self.filename = filename
        self.rows: list[dict[str, str]] = []

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx):
        tokenizer = trainer.datamodule.tokenizer
        for item in prediction:
            text = {key: tokenizer.decode(ids, skip_special_tokens=key != "prompt") for key, ids in item.items()}
            self.rows.append(text)

    def on_predict_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        path = Path(trainer.default_root_dir) / self.filename
        with atomic_file(path) as staging:  # never a half-written file
            staging.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in self.rows))
        rank_zero_info(f"Wrote {len(self.rows)} generations to {path}")
        self.rows = []
