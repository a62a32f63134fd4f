"""Liger's fused Triton kernels (RMSNorm, SwiGLU, RoPE) for CUDA training, applied to one model instance.

Liger's fused linear cross-entropy is left off: smolfactory's label-only, chunked loss (``loss.py``) already
keeps the ``[tokens x vocabulary]`` logits from existing, and the model's own forward computes no logits.
"""

from __future__ import annotations

import importlib.util

from transformers import PreTrainedModel

from smolfactory.errors import SmolFactoryError

LIGER_INSTALL = "pip install liger-kernel (CUDA GPUs only)"


def check_liger_available() -> None:
    if importlib.util.find_spec("liger_kernel") is None:
        raise SmolFactoryError(f"model.liger: true needs the liger-kernel package; {LIGER_INSTALL}, or set it false")


def apply_liger_kernels(model: PreTrainedModel) -> None:
    """Swap the model's RMSNorm, SwiGLU MLP and rotary embedding for Liger's kernels, in place."""
    check_liger_available()
    from liger_kernel.transformers.monkey_patch import MODEL_TYPE_TO_APPLY_LIGER_FN, _apply_liger_kernel_to_instance

    model_type = model.config.model_type
    if model_type not in MODEL_TYPE_TO_APPLY_LIGER_FN:
        raise SmolFactoryError(f"model.liger: Liger has no kernels for model type '{model_type}'; set it false")
    _apply_liger_kernel_to_instance(
        model=model, rope=True, rms_norm=True, swiglu=True, cross_entropy=False, fused_linear_cross_entropy=False
    )
