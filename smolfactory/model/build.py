"""Build a trainable model from its settings: load, quantize, add kernels and adapters, then shard and compile.

``build_model`` needs no Trainer, so a notebook gets exactly the model a recipe trains::

    from smolfactory.model.build import ModelSettings, build_model
    from smolfactory.model.lora import LoraSettings

    model = build_model(ModelSettings("HuggingFaceTB/SmolLM2-135M-Instruct"), LoraSettings(r=8))
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch
from peft import PeftModel, prepare_model_for_kbit_training
from torch.distributed.device_mesh import DeviceMesh
from transformers import PreTrainedModel

from smolfactory.errors import SmolFactoryError
from smolfactory.model.kernels import apply_liger_kernels
from smolfactory.model.loading import DEFAULT_MODEL, adapter_base_model, load_model, resolve_model_path
from smolfactory.model.lora import LoraSettings, apply_lora, skip_input_casts_under_autocast
from smolfactory.model.packed_attention import PACKED_SDPA
from smolfactory.model.precision import Quantization, WeightsDtype, bnb_config, check_combination, compute_dtype
from smolfactory.model.sharding import decoder_layers, shard_decoder_layers

# Config keys of models that rescale or soft-cap their logits after the LM head (Gemma 2/3, Cohere,
# Granite); the label-only loss calls the LM head directly and would skip that step.
LOGIT_POSTPROCESSING = ("final_logit_softcapping", "logit_scale", "logits_scaling")
AttnImplementation = Literal["sdpa", "eager", "flash_attention_2"]


@dataclass(frozen=True)
class ModelSettings:
    """Which pretrained model, and how it is loaded and run (the recipes' model_name, dtype, ... keys)."""

    name: str = DEFAULT_MODEL
    """Hub id, model or adapter folder, or builtin:smollm2-135m-instruct."""
    dtype: WeightsDtype = "float32"
    """Dtype the weights are stored in; trainer.precision sets the compute."""
    quantization: Quantization | None = None
    """Quantize the frozen base weights with bitsandbytes: nf4 or fp4 (QLoRA), int8, or None."""
    attn_implementation: AttnImplementation = "sdpa"
    """Attention kernel of the transformers model."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass (non-reentrant)."""
    liger: bool = False
    """Liger's Triton kernels for RMSNorm, SwiGLU and RoPE (CUDA only)."""
    freeze_embeddings: bool = False
    """Full fine-tuning only: keep the input embeddings (and a tied LM head) frozen."""
    compile: bool = False
    """torch.compile each decoder layer in place (parameter names unchanged; ``compile_decoder_layers``)."""


def build_model(
    settings: ModelSettings,
    lora: LoraSettings | None,
    precision: str | None = None,
    on_cuda: bool = False,
    device_mesh: DeviceMesh | None = None,
) -> PreTrainedModel | PeftModel:
    """The model as configured, in training mode: pretrained weights, quantized, with kernels and adapters.

    Args:
        settings: The model and how to load it.
        lora: New adapters on a base model (or, for an adapter folder, keep training that adapter); None trains
            every weight (an adapter folder is then merged into its base first).
        precision: The Trainer's precision (it decides the quantized layers' compute dtype); None outside a Trainer.
        on_cuda: Whether the model will run on a CUDA device (some kernels exist only there).
        device_mesh: Shard every decoder layer with FSDP2 over its ``data_parallel`` dimension.
    """
    check_combination(
        precision=precision,
        on_cuda=on_cuda,
        weights=settings.dtype,
        quantization=settings.quantization,
        lora=lora is not None,
        attn_implementation=settings.attn_implementation,
        freeze_embeddings=settings.freeze_embeddings,
        liger=settings.liger,
    )
    path = resolve_model_path(settings.name)
    base_name = adapter_base_model(path)
    base = load_base(settings, base_name or path, precision)
    if base_name is None:
        model = apply_lora(base, lora) if lora is not None else base
    else:  # an adapter folder: keep training its adapter, or merge it and train every weight
        model = PeftModel.from_pretrained(base, path, is_trainable=True)
        if lora is None:
            model = model.merge_and_unload()
            model.requires_grad_(True)
    skip_input_casts_under_autocast(model)
    if settings.freeze_embeddings:
        model.get_input_embeddings().requires_grad_(False)
    postprocessing = [key for key in LOGIT_POSTPROCESSING if getattr(model.config, key, None) not in (None, 1.0)]
    if postprocessing:
        raise SmolFactoryError(
            f"model '{settings.name}' post-processes its logits ({', '.join(postprocessing)}), which smolfactory's "
            "label-only loss does not support yet; use a model without it (SmolLM, Qwen, Llama)"
        )
    model.train()  # from_pretrained returns eval mode, and Lightning keeps the modes it finds
    if attends_example_by_example(settings, on_cuda):
        causal_lm_of(model).set_attn_implementation(PACKED_SDPA)  # every call without a packed layout is sdpa
    if device_mesh is not None:
        shard_decoder_layers(model, causal_lm_of(model), device_mesh["data_parallel"])
    if settings.compile:
        compile_decoder_layers(model)
    return model


def compile_decoder_layers(model: PreTrainedModel | PeftModel) -> None:
    """torch.compile each decoder layer's training steps ("regional compilation"), or the whole model's if it has
    no list of decoder layers. The layers run the same code, so they share one compiled graph: compiling costs
    one layer's time, not the whole model's. Attention that runs outside torch.compile (packed rows example by
    example) stays eager between the compiled parts. Parameter names, and so checkpoints and exports, stay as
    they are."""
    causal_lm = causal_lm_of(model)
    layers = decoder_layers(causal_lm)
    if layers and not causal_lm.get_input_embeddings().weight.requires_grad:
        # Frozen embeddings (LoRA) would give the first layer inputs without gradients and a graph of its own to
        # compile; with them all layers share one (the extra gradient stops at the embeddings: ~1% of a step).
        causal_lm.enable_input_require_grads()
    for module in layers or [model]:
        module.forward = CompiledForTraining(module.forward)


class CompiledForTraining:
    """A forward compiled for training (gradients on) and eager otherwise: validation and generation would each
    compile graphs of their own (no gradients, a cache, other shapes), minutes on a CPU, for little gain."""

    def __init__(self, forward: Callable) -> None:
        self.eager = forward
        self.compiled = torch.compile(forward, dynamic=True)  # packed and unpadded batches change length

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return (self.compiled if torch.is_grad_enabled() else self.eager)(*args, **kwargs)


def attends_example_by_example(settings: ModelSettings, on_cuda: bool) -> bool:
    """Whether packed rows, and padded ones without their padding, attend example by example
    (``packed_attention.py``): sdpa on a CPU, compiled or not (it runs outside torch.compile)."""
    return settings.attn_implementation == "sdpa" and not on_cuda


def load_base(settings: ModelSettings, name: str, precision: str | None) -> PreTrainedModel:
    """The pretrained model, quantized and prepared for k-bit training when asked, checkpointing on when asked."""
    quantization = None
    if settings.quantization is not None:
        quantization = bnb_config(settings.quantization, compute_dtype(precision, settings.dtype))
    model = load_model(name, getattr(torch, settings.dtype), settings.attn_implementation, quantization)
    if settings.liger:
        apply_liger_kernels(model)
    checkpointing = {"gradient_checkpointing_kwargs": {"use_reentrant": False}}
    if quantization is not None:
        # peft's QLoRA preparation: norms and other small weights in float32, input gradients on.
        return prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=settings.gradient_checkpointing, **checkpointing
        )
    if settings.gradient_checkpointing:
        model.gradient_checkpointing_enable(**checkpointing)
    return model


def frozen_copy(settings: ModelSettings, lora: LoraSettings | None, precision: str | None) -> torch.nn.Module:
    """A second copy of the model as loaded, frozen and in eval mode (a reference model); never compiled."""
    model = build_model(dataclasses.replace(settings, compile=False), lora, precision)
    return model.requires_grad_(False).eval()


def causal_lm_of(model: PreTrainedModel | PeftModel) -> PreTrainedModel:
    """The transformers model underneath any PEFT wrapper (its layers hold the adapters)."""
    return model.get_base_model() if isinstance(model, PeftModel) else model
