"""The real shapes of the models that configs/models/ fine-tunes, as random-weight folders (the GPU machine has no Hub).

    from gpu_shapes import recipe_models, real_config, write_random_model

Each entry of ``REAL_CONFIGS`` is the model's own config.json, less what does not change a training step's
compute (token ids of the chat template, generation defaults). ``tiny_config`` keeps a model's architecture, its
vocabulary and its attention layout but shrinks the rest, for the CPU dry run of benchmarks/gpu.sh.
"""

from __future__ import annotations

from pathlib import Path

import torch
import yaml
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig, PreTrainedTokenizerBase

ROOT = Path(__file__).resolve().parent.parent

# Sources: each model's config.json on the Hugging Face Hub. The Hub is not reachable from this project's
# machines, so the values were read from copies of those files in public repositories (revision noted where the
# copy named one) and from the SmolLM2-135M-Instruct GGUF of the built-in model; the parameter counts below
# agree with the sizes the Hub lists (135M, 362M, 1.71B, 494M, 3.08B) and with SmolLM2-360M-Instruct's
# bf16 model.safetensors (723,674,912 bytes, revision a10cc151).
# What SmolLM2-135M and -360M share besides their sizes (both config.json files).
SMOLLM2_SHARED = {
    "vocab_size": 49152,
    "max_position_embeddings": 8192,
    "rms_norm_eps": 1e-5,
    "rope_parameters": {"rope_type": "default", "rope_theta": 100000.0},
    "tie_word_embeddings": True,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "pad_token_id": 2,
}
REAL_CONFIGS: dict[str, dict] = {
    # HuggingFaceTB/SmolLM2-135M-Instruct/config.json (and the built-in model's GGUF metadata)
    "HuggingFaceTB/SmolLM2-135M-Instruct": {
        "model_type": "llama",
        "hidden_size": 576,
        "intermediate_size": 1536,
        "num_hidden_layers": 30,
        "num_attention_heads": 9,
        "num_key_value_heads": 3,
        **SMOLLM2_SHARED,
    },
    # HuggingFaceTB/SmolLM2-360M-Instruct/config.json
    "HuggingFaceTB/SmolLM2-360M-Instruct": {
        "model_type": "llama",
        "hidden_size": 960,
        "intermediate_size": 2560,
        "num_hidden_layers": 32,
        "num_attention_heads": 15,
        "num_key_value_heads": 5,
        **SMOLLM2_SHARED,
    },
    # HuggingFaceTB/SmolLM2-1.7B-Instruct/config.json (revision 31b70e2e): multi-head attention, 32 KV heads
    "HuggingFaceTB/SmolLM2-1.7B-Instruct": {
        "model_type": "llama",
        "hidden_size": 2048,
        "intermediate_size": 8192,
        "num_hidden_layers": 24,
        "num_attention_heads": 32,
        "num_key_value_heads": 32,
        "vocab_size": 49152,
        "max_position_embeddings": 8192,
        "rms_norm_eps": 1e-5,
        "rope_parameters": {"rope_type": "default", "rope_theta": 130000.0},
        "tie_word_embeddings": True,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": 2,
    },
    # Qwen/Qwen2.5-0.5B-Instruct/config.json; Qwen2 layers always carry q/k/v biases (no config key for them)
    "Qwen/Qwen2.5-0.5B-Instruct": {
        "model_type": "qwen2",
        "hidden_size": 896,
        "intermediate_size": 4864,
        "num_hidden_layers": 24,
        "num_attention_heads": 14,
        "num_key_value_heads": 2,
        "vocab_size": 151936,
        "max_position_embeddings": 32768,
        "rms_norm_eps": 1e-6,
        "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0},
        "tie_word_embeddings": True,
        "use_sliding_window": False,
        "max_window_layers": 21,
        "bos_token_id": 151643,
        "eos_token_id": 151645,
    },
    # HuggingFaceTB/SmolLM3-3B/config.json: every fourth layer without rotary embeddings (NoPE)
    "HuggingFaceTB/SmolLM3-3B": {
        "model_type": "smollm3",
        "hidden_size": 2048,
        "intermediate_size": 11008,
        "num_hidden_layers": 36,
        "num_attention_heads": 16,
        "num_key_value_heads": 4,
        "vocab_size": 128256,
        "max_position_embeddings": 65536,
        "rms_norm_eps": 1e-6,
        "rope_parameters": {"rope_type": "default", "rope_theta": 5000000.0},
        "tie_word_embeddings": True,
        "no_rope_layer_interval": 4,
        "no_rope_layers": [int((layer + 1) % 4 != 0) for layer in range(36)],
        "use_sliding_window": False,
        "bos_token_id": None,
        "eos_token_id": 128012,
        "pad_token_id": 128004,
    },
}

# What the Hub lists for each model, counted exactly (tied LM heads counted once).
PUBLISHED_PARAMETERS = {
    "HuggingFaceTB/SmolLM2-135M-Instruct": 134_515_008,
    "HuggingFaceTB/SmolLM2-360M-Instruct": 361_821_120,
    "HuggingFaceTB/SmolLM2-1.7B-Instruct": 1_711_376_384,
    "Qwen/Qwen2.5-0.5B-Instruct": 494_032_768,
    "HuggingFaceTB/SmolLM3-3B": 3_075_098_624,
}


def recipe_models(configs_dir: Path = ROOT / "configs" / "models") -> dict[str, str]:
    """Recipe name (file stem) -> the model_name it fine-tunes, for every configs/models/*.yaml."""
    recipes = {}
    for path in sorted(configs_dir.glob("*.yaml")):
        recipes[path.stem] = yaml.safe_load(path.read_text())["model"]["model_name"]
    return recipes


def real_config(model_id: str) -> PretrainedConfig:
    """The transformers config of a model's real shape."""
    fields = dict(REAL_CONFIGS[model_id])
    return AutoConfig.for_model(fields.pop("model_type"), **fields)


def tiny_config(model_id: str) -> PretrainedConfig:
    """The same architecture, vocabulary and attention layout (grouped or not, biases, NoPE layers), 64 wide.

    SmolLM3 keeps four layers so that one of them is a NoPE layer.
    """
    fields = dict(REAL_CONFIGS[model_id])
    heads, kv_heads = fields["num_attention_heads"], fields["num_key_value_heads"]
    layers = 4 if fields["model_type"] == "smollm3" else 2
    fields.update(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=4 if kv_heads == heads else 2,
        head_dim=16,
    )
    if "no_rope_layers" in fields:
        fields["no_rope_layers"] = [int((layer + 1) % 4 != 0) for layer in range(layers)]
    if "max_window_layers" in fields:
        fields["max_window_layers"] = layers
    return AutoConfig.for_model(fields.pop("model_type"), **fields)


def parameter_count(config: PretrainedConfig) -> int:
    """Parameters of the model a config builds (on the meta device: no memory, no time)."""
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return sum(parameter.numel() for parameter in model.parameters())


def write_random_model(
    config: PretrainedConfig, tokenizer: PreTrainedTokenizerBase, folder: Path, device: str = "cpu"
) -> int:
    """Save a model of this config with random weights (its own initialisation) and the tokenizer; returns its
    parameter count.

    Initialised on ``device`` (a GPU does a 3B model in a second) and saved in bfloat16, half the disk and load
    time of float32; the recipes load it back in their own dtype.
    """
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return sum(parameter.numel() for parameter in model.parameters())
