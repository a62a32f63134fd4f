"""The reference model of a recipe whose loss compares the policy with where it started (DPO, GRPO with a KL term).

Never a second copy where one can be avoided: training LoRA on a base model, the reference is the same model with
its adapter switched off; continuing an adapter, it is that adapter as loaded, kept frozen beside the trained one;
only full fine-tuning loads a second, frozen model.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import TYPE_CHECKING

import torch
from peft import PeftModel

from smolfactory.errors import SmolFactoryError
from smolfactory.model.build import frozen_copy
from smolfactory.model.loading import adapter_base_model, resolve_model_path

if TYPE_CHECKING:
    from smolfactory.model.recipe import RecipeModule

REFERENCE_ADAPTER = "reference"


def load_reference(recipe: RecipeModule, no_copy_fix: str) -> torch.nn.Module | None:
    """Prepare the reference of ``recipe.model``, the policy just built: a frozen copy for full fine-tuning
    (returned), or nothing to return (the adapter switched off, or a frozen reference adapter loaded into the
    model).

    ``no_copy_fix`` says what to do instead of a copy where none can be made (a sharded full model).
    """
    if recipe.lora is None:
        if recipe.device_mesh is not None:
            raise SmolFactoryError(
                f"full fine-tuning with a sharded model has no frozen reference copy yet; {no_copy_fix}"
            )
        # A second model, frozen; loaded again, as the policy may already be sharded or compiled.
        trainer = recipe.attached_trainer
        return frozen_copy(recipe.model_settings, None, trainer.precision if trainer is not None else None)
    path = resolve_model_path(recipe.model_settings.name)
    if adapter_base_model(path) is not None:  # training continues an adapter: that adapter, frozen, beside it
        recipe.model.load_adapter(path, adapter_name=REFERENCE_ADAPTER, is_trainable=False)
        recipe.model.train()  # peft switched the whole model to eval mode (dropout off) for the frozen adapter
    return None


@contextlib.contextmanager
def reference_of(
    model: torch.nn.Module, copy: torch.nn.Module | None, policy_is_reference: bool = False
) -> Iterator[torch.nn.Module]:
    """The reference model for the duration of the block, without gradients or dropout: ``copy`` when there is
    one, else ``model`` with its reference adapter active or its adapter switched off, or ``model`` itself when
    ``policy_is_reference`` (full fine-tuning before the first step)."""
    if copy is not None:
        with torch.no_grad():
            yield copy
        return
    if isinstance(model, PeftModel) and REFERENCE_ADAPTER in model.peft_config:
        switch = active_adapter(model, REFERENCE_ADAPTER)
    elif isinstance(model, PeftModel):
        switch = model.disable_adapter()
    elif policy_is_reference:
        switch = contextlib.nullcontext()
    else:
        raise SmolFactoryError("no reference model: train LoRA, or let the recipe keep a frozen copy")
    training = model.training
    model.eval()
    try:
        with torch.no_grad(), switch:
            yield model
    finally:
        model.train(training)


@contextlib.contextmanager
def active_adapter(model: PeftModel, name: str) -> Iterator[None]:
    """Make adapter ``name`` the active one for the block; the trained adapter stays trainable afterwards."""
    previous = model.active_adapter
    model.set_adapter(name, inference_mode=True)
    try:
        yield
    finally:
        model.set_adapter(previous)
