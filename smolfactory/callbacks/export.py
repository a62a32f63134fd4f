"""Save a Hugging Face folder (adapter or full model, plus tokenizer) when fit ends."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.strategies import ModelParallelStrategy
from lightning.pytorch.utilities import rank_zero_info
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

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
        state_dict = None
        if isinstance(trainer.strategy, ModelParallelStrategy):
            # Sharded (FSDP2): every rank takes part in gathering the full weights; rank 0 writes them. The
            # state dict of the strategy's root (the LightningModule) names the weights "model.<name>".
            # (FSDPStrategy is not handled here yet: see the README.)
            options = StateDictOptions(full_state_dict=True, cpu_offload=True)
            gathered = get_model_state_dict(trainer.strategy.model, options=options)
            prefix = "model."
            state_dict = {name[len(prefix) :]: value for name, value in gathered.items() if name.startswith(prefix)}
            state_dict = without_tied_copies(pl_module.model, state_dict)
        if not trainer.is_global_zero:
            return
        datamodule = trainer.datamodule
        tokenizer = getattr(datamodule, "tokenizer", None) or load_tokenizer(pl_module.hparams.model_name)
        folder = Path(trainer.default_root_dir) / self.dirname
        path = save_pretrained_folder(pl_module.model, tokenizer, folder, state_dict=state_dict)
        rank_zero_info(f"Saved the trained model to {path} (load it with from_pretrained)")


def without_tied_copies(model: torch.nn.Module, state_dict: dict) -> dict:
    """Drop the second name of each tied weight (lm_head.weight when it is the embeddings), as save_pretrained does.

    A gathered state dict holds a separate tensor under every name, so transformers can no longer see the tie.
    """
    first_name: dict[int, str] = {}
    for name, parameter in model.named_parameters(remove_duplicate=False):
        first_name.setdefault(id(parameter), name)
    tied = {name for name, p in model.named_parameters(remove_duplicate=False) if first_name[id(p)] != name}
    return {name: value for name, value in state_dict.items() if name not in tied}
