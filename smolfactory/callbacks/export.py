"""Save a Hugging Face folder (adapter or full model, plus tokenizer) when fit ends."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy
from lightning.pytorch.utilities import rank_zero_info
from peft import PeftModel, get_peft_model
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from transformers import AutoModelForCausalLM

from smolfactory.export import save_pretrained_folder
from smolfactory.hub import push_folder, require_token
from smolfactory.model.loading import load_tokenizer


class HFExport(L.Callback):
    def __init__(self, dirname: str = "final", push_to_hub: str | None = None) -> None:
        """Write the trained model as a Hugging Face folder at the end of fit, and upload it when asked.

        Args:
            dirname: Folder under trainer.default_root_dir that receives the adapter (or full model) and tokenizer.
            push_to_hub: Hub repo id (owner/name) that receives the folder; a missing token stops fit before
                training starts.
        """
        self.dirname = dirname
        self.push_to_hub = push_to_hub

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage == "fit" and self.push_to_hub:
            require_token("export.push_to_hub")

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._start_step: int | None = None  # set when training starts (after a checkpoint is restored)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._start_step = trainer.global_step

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        folder = Path(trainer.default_root_dir) / self.dirname
        if self._start_step in (None, trainer.global_step):
            # Nothing trained (max_steps 0, or a resume that had already reached its end): keep what is there.
            rank_zero_info(
                f"This fit trained no step (it ended at step {trainer.global_step}), so {folder} was not written; "
                "`smolfactory export --checkpoint` writes one from any checkpoint"
            )
            return
        state_dict = None
        if isinstance(trainer.strategy, ModelParallelStrategy | FSDPStrategy):
            state_dict = gather_full_state_dict(trainer.strategy, pl_module.model)
        if not trainer.is_global_zero:
            return
        datamodule = trainer.datamodule
        tokenizer = getattr(datamodule, "tokenizer", None) or load_tokenizer(pl_module.hparams.model_name)
        model = pl_module.model
        if isinstance(trainer.strategy, FSDPStrategy) and isinstance(model, PeftModel):
            # FSDP's wrappers put "_fsdp_wrapped_module." into the module names from which peft picks the
            # adapter's weights out of a state dict; a wrapper-free copy names them as the gathered weights are.
            model = adapter_skeleton(model)
        path = save_pretrained_folder(model, tokenizer, folder, state_dict=state_dict)
        rank_zero_info(f"Saved the trained model to {path} (load it with from_pretrained)")
        if self.push_to_hub:
            url = push_folder(path, self.push_to_hub, "export.push_to_hub")
            rank_zero_info(f"Uploaded {path} to {url}")


def gather_full_state_dict(strategy: ModelParallelStrategy | FSDPStrategy, model: torch.nn.Module) -> dict:
    """The full weights of a sharded model (FSDP2 or FSDP), named as in `model`; every rank must call this.

    The strategy's root is the LightningModule, so its state dict names the weights "model.<name>". Off the
    CPU the gathered tensors go to host memory on rank 0 only (the others get nothing); on the CPU that offload
    is skipped, as FSDP's copy of a CPU tensor to the CPU crashes.
    """
    offload = strategy.root_device.type != "cpu"
    options = StateDictOptions(full_state_dict=True, cpu_offload=offload)
    gathered = get_model_state_dict(strategy.model, options=options)
    prefix = "model."
    state_dict = {name[len(prefix) :]: value for name, value in gathered.items() if name.startswith(prefix)}
    return without_tied_copies(model, state_dict)


def adapter_skeleton(model: PeftModel) -> PeftModel:
    """The same base architecture and adapter on the meta device (no memory, no weights), unwrapped."""
    with torch.device("meta"):
        base = AutoModelForCausalLM.from_config(model.get_base_model().config)
    return get_peft_model(base, model.peft_config[model.active_adapter])


def without_tied_copies(model: torch.nn.Module, state_dict: dict) -> dict:
    """Drop the second name of each tied weight (lm_head.weight when it is the embeddings), as save_pretrained does.

    A gathered state dict holds a separate tensor under every name, so transformers can no longer see the tie.
    """
    first_name: dict[int, str] = {}
    for name, parameter in model.named_parameters(remove_duplicate=False):
        first_name.setdefault(id(parameter), name)
    tied = {name for name, p in model.named_parameters(remove_duplicate=False) if first_name[id(p)] != name}
    return {name: value for name, value in state_dict.items() if name not in tied}
