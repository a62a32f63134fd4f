"""FSDP2 (``fully_shard``) for Lightning's ModelParallelStrategy: one shard group per decoder layer."""

from __future__ import annotations

import torch
from torch.distributed._shard.sharded_tensor import ShardedTensor
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor
from transformers import PreTrainedModel

from smolfactory.errors import SmolFactoryError

# Segments that wrappers (FSDP, activation checkpointing, torch.compile) add to parameter names; state dicts
# taken through those wrappers leave them out.
WRAPPER_SEGMENTS = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod.")


def unwrapped_name(name: str) -> str:
    """A parameter's name as it appears in a state dict: without the segments wrappers add."""
    for segment in WRAPPER_SEGMENTS:
        name = name.replace(segment, "")
    return name


def is_sharded(state_dict: dict) -> bool:
    """Whether a state dict holds shards (FSDP's sharded state dict: DTensor or ShardedTensor values)."""
    return any(isinstance(value, DTensor | ShardedTensor) for value in state_dict.values())


def decoder_layer_class_names(model: PreTrainedModel) -> set[str]:
    """The transformer-block classes that must not be split, from the model's ``_no_split_modules``."""
    names = set(getattr(model, "_no_split_modules", None) or [])
    if not names:
        raise SmolFactoryError(
            f"{type(model).__name__} does not name its decoder layer class (_no_split_modules), so it cannot be "
            "sharded layer by layer; use DDP"
        )
    return names


def shard_decoder_layers(root: torch.nn.Module, causal_lm: PreTrainedModel, mesh: DeviceMesh) -> None:
    """Shard each decoder layer, then the rest of the model (embeddings, final norm, LM head) as the root group.

    The root group keeps its weights gathered between forward and backward (FSDP2's default for the
    root), which the label-only loss relies on: it calls the LM head after the model's forward.
    """
    classes = decoder_layer_class_names(causal_lm)
    layers = [module for module in causal_lm.modules() if type(module).__name__ in classes]
    for layer in layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(root, mesh=mesh)


class DecoderLayerPolicy:
    """An FSDPStrategy wrap policy (auto-wrap or activation checkpointing): each decoder layer on its own.

    The layer classes come from the ``_no_split_modules`` of the Hugging Face models inside the wrapped
    module, read on the first call (FSDP calls the policy on the root first), so one config serves
    Llama, SmolLM3, Qwen and the rest without naming their classes.
    """

    def __init__(self) -> None:
        self.classes: set[str] | None = None

    def __call__(self, module: torch.nn.Module, recurse: bool, nonwrapped_numel: int) -> bool:
        if self.classes is None:
            self.classes = {name for m in module.modules() for name in (getattr(m, "_no_split_modules", None) or [])}
        return True if recurse else type(module).__name__ in self.classes
