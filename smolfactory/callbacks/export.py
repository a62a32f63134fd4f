"""Save a Hugging Face folder (adapter or full model, plus tokenizer) when fit ends, and optionally a GGUF file."""

from __future__ import annotations

from pathlib import Path

import lightning as L
from lightning.pytorch.utilities import rank_zero_info
from peft import PeftModel
from transformers import PreTrainedTokenizerBase

from smolfactory.export import gguf_source, push_folder, require_token, save_trained_model
from smolfactory.gguf_export import check_exportable, check_file_type, write_gguf
from smolfactory.model.loading import load_tokenizer


class HFExport(L.Callback):
    def __init__(self, dirname: str = "final", push_to_hub: str | None = None, gguf: str | None = None) -> None:
        """Write the trained model as a Hugging Face folder at the end of fit, and upload it when asked.

        Args:
            dirname: Folder under trainer.default_root_dir that receives the adapter (or full model) and tokenizer.
            push_to_hub: Hub repo id (owner/name) that receives the folder; a missing token stops fit before
                training starts.
            gguf: Also write DIRNAME.gguf beside the folder, LoRA merged, for llama.cpp and Ollama: f32, f16, bf16
                or q8_0 (null: no GGUF). A model or tokenizer that GGUF export would refuse stops fit before
                training starts.
        """
        if gguf is not None:
            check_file_type(gguf, "export.gguf")
        self.dirname = dirname
        self.push_to_hub = push_to_hub
        self.gguf = gguf

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage == "fit" and self.push_to_hub:
            require_token("export.push_to_hub")

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._start_step: int | None = None  # set when training starts (after a checkpoint is restored)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._start_step = trainer.global_step
        if self.gguf is not None:  # the model is built by now; a refusal comes before any training
            model = pl_module.model
            model = model.get_base_model() if isinstance(model, PeftModel) else model
            check_exportable(model, trained_tokenizer(trainer, pl_module))

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        folder = Path(trainer.default_root_dir) / self.dirname
        if self._start_step in (None, trainer.global_step):
            # Nothing trained (max_steps 0, or a resume that had already reached its end): keep what is there.
            rank_zero_info(
                f"This fit trained no step (it ended at step {trainer.global_step}), so {folder} was not written; "
                "`smolfactory export --checkpoint` writes one from any checkpoint"
            )
            return
        tokenizer = None
        if trainer.is_global_zero:  # the one rank that writes (the others only help gather sharded weights)
            tokenizer = trained_tokenizer(trainer, pl_module)
        path = save_trained_model(trainer.strategy, pl_module.model, tokenizer, folder)
        if path is None:  # not rank 0
            return
        rank_zero_info(f"Saved the trained model to {path} (load it with from_pretrained)")
        if self.gguf is not None:
            # Read back from the folder just written: sharded and LoRA runs alike give one plain, merged model.
            model, tokenizer = gguf_source(None, str(path))
            gguf_path = write_gguf(model, tokenizer, path.with_name(f"{path.name}.gguf"), self.gguf)
            rank_zero_info(f"Saved a {self.gguf} GGUF of it to {gguf_path} (run it with llama.cpp or Ollama)")
        if self.push_to_hub:
            url = push_folder(path, self.push_to_hub, "export.push_to_hub")
            rank_zero_info(f"Uploaded {path} to {url}")


def trained_tokenizer(trainer: L.Trainer, pl_module: L.LightningModule) -> PreTrainedTokenizerBase:
    """The tokenizer the data module trained with (its chat template included), or the model's own."""
    return getattr(trainer.datamodule, "tokenizer", None) or load_tokenizer(pl_module.hparams.model_name)
