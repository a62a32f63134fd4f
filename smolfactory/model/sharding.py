"""FSDP2 (``fully_shard``) for Lightning's ModelParallelStrategy: one shard group per decoder layer."""

from __future__ import annotations

import torch
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
    """Whether a state dict holds shards: DTensors (FSDP2), or FSDP's ShardedTensors, told by their public
    ``local_shards()`` (plain tensors have none)."""
    return any(
        isinstance(value, DTensor) or callable(getattr(value, "local_shards", None)) for value in state_dict.values()
    )


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The model's decoder layers: its largest list of modules of one class (a causal LM's ``layers``), found
    from the module tree alone, so any architecture works without naming it; empty if it has no such list."""
    best: list[torch.nn.Module] = []
    best_size = 0
    for modules in model.modules():
        if not isinstance(modules, torch.nn.ModuleList) or len(modules) < 2:
            continue
        if len({type(layer) for layer in modules}) != 1:
            continue
        size = sum(parameter.numel() for parameter in modules.parameters())
        if size > best_size:
            best, best_size = list(modules), size
    return best


def shardable_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """``decoder_layers``, refusing a model that has none."""
    layers = decoder_layers(model)
    if not layers:
        raise SmolFactoryError(
            f"{type(model).__name__} has no list of decoder layers of one class, so it cannot be sharded layer by "
            "layer; use DDP"
        )
    return layers


def decoder_layer_class_names(model: torch.nn.Module) -> set[str]:
    """The class name of the model's decoder layers (``decoder_layers``)."""
    return {type(shardable_layers(model)[0]).__name__}


def shard_decoder_layers(root: torch.nn.Module, causal_lm: PreTrainedModel, mesh: DeviceMesh) -> None:
    """Shard each decoder layer, then the rest of the model (embeddings, final norm, LM head) as the root group.

    The root group keeps its weights gathered between forward and backward (FSDP2's default for the
    root), which the label-only loss relies on: it calls the LM head after the model's forward.
    """
    for layer in shardable_layers(causal_lm):
        fully_shard(layer, mesh=mesh)
    fully_shard(root, mesh=mesh)


class DecoderLayerPolicy:
    """An FSDPStrategy wrap policy (auto-wrap or activation checkpointing): each decoder layer on its own.

    The layer class is found in the wrapped module on the first call (FSDP calls the policy on the root first;
    see ``decoder_layer_class_names``), so one config serves Llama, SmolLM3, Qwen and the rest without naming
    their classes.
    """

    def __init__(self) -> None:
        self.classes: set[str] | None = None

    def __call__(self, module: torch.nn.Module, recurse: bool, nonwrapped_numel: int) -> bool:
        if self.classes is None:
            self.classes = decoder_layer_class_names(module)
        return True if recurse else type(module).__name__ in self.classes
