"""Weights dtype, quantized base weights (bitsandbytes, for QLoRA), and how they meet the Trainer's precision.

The weights' dtype (``model.dtype``) is what the parameters are stored in; ``trainer.precision`` decides
what the matrix products run in (bf16-mixed: float32 weights, bfloat16 products). ``check_combination``
refuses, in one line each, the pairs that cannot work.
"""

from __future__ import annotations

import importlib.util
from typing import Literal

import torch
from transformers import BitsAndBytesConfig

from smolfactory.errors import SmolFactoryError

Quantization = Literal["nf4", "fp4", "int8"]
WeightsDtype = Literal["float32", "bfloat16", "float16"]


def bnb_config(kind: Quantization, compute_dtype: torch.dtype) -> BitsAndBytesConfig:
    """bitsandbytes settings: 4-bit NF4/FP4 with double quantization (QLoRA's recipe), or LLM.int8()."""
    if importlib.util.find_spec("bitsandbytes") is None:
        raise SmolFactoryError(
            f"model.quantization: {kind} needs bitsandbytes; pip install 'smolfactory[quant]' (bitsandbytes>=0.50)"
        )
    if kind == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=kind,
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute_dtype,
    )


def compute_dtype(precision: str | None, weights: WeightsDtype) -> torch.dtype:
    """The dtype matrix products run in: the autocast dtype of a mixed precision, else the weights' dtype."""
    if precision is not None and precision.startswith("bf16"):
        return torch.bfloat16
    if precision is not None and precision.startswith("16"):
        return torch.float16
    return getattr(torch, weights)


def check_combination(
    *,
    precision: str | None,
    on_cuda: bool,
    weights: WeightsDtype,
    quantization: Quantization | None,
    lora: bool,
    attn_implementation: str,
    freeze_embeddings: bool,
    liger: bool = False,
) -> None:
    """One-line errors for settings that cannot work together (``precision`` None: no Trainer yet)."""
    if quantization and not lora:
        raise SmolFactoryError(
            f"model.quantization: {quantization} freezes quantized base weights, so only adapters can train; "
            "set model.lora (it is null)"
        )
    if quantization and precision in ("bf16-true", "16-true"):
        raise SmolFactoryError(
            f"trainer.precision: {precision} casts every weight, which breaks {quantization} layers; "
            "use bf16-mixed (on a GPU) or 32-true"
        )
    if weights == "float16" and precision not in (None, "16-mixed"):
        raise SmolFactoryError(
            f"model.dtype: float16 needs loss scaling, which trainer.precision: {precision} does not do; "
            "use trainer.precision: 16-mixed, or model.dtype: bfloat16 or float32"
        )
    if freeze_embeddings and lora:
        raise SmolFactoryError("model.freeze_embeddings is for full fine-tuning (lora: null); LoRA freezes them")
    if attn_implementation == "flash_attention_2":
        if precision is not None and not on_cuda:
            raise SmolFactoryError("model.attn_implementation: flash_attention_2 runs on CUDA GPUs only; use sdpa")
        if importlib.util.find_spec("flash_attn") is None:
            raise SmolFactoryError(
                "model.attn_implementation: flash_attention_2 needs the flash-attn package "
                "(pip install flash-attn --no-build-isolation); or use sdpa"
            )
    if liger and precision is not None and not on_cuda:
        raise SmolFactoryError("model.liger: Liger's Triton kernels run on CUDA GPUs only; set model.liger: false")
