"""benchmarks/gpu.sh's parts that a CPU can check: the real shapes of every recipe's model, the commands it runs,
the wheels it carries, its data, and the torch varlen attention it registers (with a reference kernel standing in
for PyTorch's CUDA-only one)."""

from __future__ import annotations

import json
import sys
import zipfile
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))  # the benchmark scripts import each other as top-level modules

import gpu_benchmark  # noqa: E402
import gpu_shapes  # noqa: E402
import gpu_varlen  # noqa: E402


def test_every_recipe_has_its_real_shape():
    recipes = gpu_shapes.recipe_models()
    assert len(recipes) == len(list((ROOT / "configs" / "models").glob("*.yaml"))) >= 7
    missing = {model for model in recipes.values() if model not in gpu_shapes.REAL_CONFIGS}
    assert not missing, f"add the real config.json of {missing} to benchmarks/gpu_shapes.py"


@pytest.mark.parametrize("model_id", sorted(gpu_shapes.REAL_CONFIGS))
def test_real_shapes_have_the_published_parameter_counts(model_id):
    config = gpu_shapes.real_config(model_id)
    assert gpu_shapes.parameter_count(config) == gpu_shapes.PUBLISHED_PARAMETERS[model_id]
    tiny = gpu_shapes.tiny_config(model_id)
    assert (tiny.model_type, tiny.vocab_size, tiny.tie_word_embeddings) == (
        config.model_type,
        config.vocab_size,
        config.tie_word_embeddings,
    )
    assert (tiny.num_key_value_heads < tiny.num_attention_heads) == (
        config.num_key_value_heads < config.num_attention_heads
    )


def test_smollm3_keeps_its_nope_layers():
    config = gpu_shapes.real_config("HuggingFaceTB/SmolLM3-3B")
    assert [i for i, rope in enumerate(config.no_rope_layers) if not rope] == list(range(3, 36, 4))
    assert gpu_shapes.tiny_config("HuggingFaceTB/SmolLM3-3B").no_rope_layers == [1, 1, 1, 0]


def test_recipes_run_unchanged_but_for_what_the_measurement_needs(tmp_path):
    context = gpu_benchmark.Context(False, tmp_path, 0.0, tmp_path / "log", {})
    result = tmp_path / "r.json"
    overridden = {}
    for recipe in gpu_shapes.recipe_models():
        command = gpu_benchmark.recipe_command(context, recipe, "FOLDER", result, [])
        assert command[3:8] == ["fit", "--config", "configs/cuda.yaml", "--config", f"configs/models/{recipe}.yaml"]
        overridden[recipe] = {arg.split("+=")[0] for arg in command[8:] if arg.startswith("--")}
    allowed = {"--model.model_name", "--data.dataset", "--trainer.max_steps", "--trainer.default_root_dir",
               "--trainer.callbacks", "--trainer.enable_progress_bar"}  # fmt: skip
    assert all(options == allowed for recipe, options in overridden.items() if "fsdp" not in recipe)
    assert overridden["smollm3-3b-full-fsdp"] == allowed | {"--trainer.devices"}


def test_keep_libraries_drops_other_libraries_and_their_record_lines(tmp_path):
    wheel = tmp_path / "bnb-1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as file:
        for name in ("bnb/__init__.py", "bnb/libbnb_cuda130.so", "bnb/libbnb_cuda118.so"):
            file.writestr(name, "x")
        record = "bnb/__init__.py,,\nbnb/libbnb_cuda130.so,,\nbnb/libbnb_cuda118.so,,\n"
        file.writestr("bnb-1.0.dist-info/RECORD", record)
    gpu_benchmark.keep_libraries(wheel, ("libbnb_cuda130.so",))
    with zipfile.ZipFile(wheel) as file:
        assert sorted(file.namelist()) == ["bnb-1.0.dist-info/RECORD", "bnb/__init__.py", "bnb/libbnb_cuda130.so"]
        assert "cuda118" not in file.read("bnb-1.0.dist-info/RECORD").decode()


def test_conversations_are_smoltalk_messages_rows(tmp_path):
    path = tmp_path / "conversations.jsonl"
    gpu_benchmark.write_conversations(path, count=20)
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(rows) == 20
    for row in rows:
        roles = [message["role"] for message in row["messages"]]
        assert roles == ["user", "assistant"] * (len(roles) // 2) and 4 <= len(roles) <= 8


def reference_varlen_attn(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, scale=None, window_size=(-1, -1),
                          enable_gqa=False):  # fmt: skip
    """torch.nn.attention.varlen.varlen_attn's arithmetic in plain SDPA, one sequence at a time (CPU)."""
    assert window_size == (-1, 0)  # causal, as the adapter asks on this torch
    outputs = []
    for start, end in zip(cu_seq_q[:-1].tolist(), cu_seq_q[1:].tolist(), strict=True):
        q, k, v = (x[start:end].transpose(0, 1) for x in (query, key, value))
        attention = torch.nn.functional.scaled_dot_product_attention
        outputs.append(attention(q, k, v, is_causal=True, scale=scale, enable_gqa=enable_gqa).transpose(0, 1))
    return torch.cat(outputs)


def test_torch_varlen_attention_keeps_packed_examples_apart(monkeypatch):
    """Packed rows through the registered torch_varlen path give sdpa's logits (grouped-query attention too)."""
    monkeypatch.setattr("torch.nn.attention.varlen.varlen_attn", reference_varlen_attn)
    gpu_varlen.register_torch_varlen()
    config = gpu_shapes.tiny_config("HuggingFaceTB/SmolLM2-360M-Instruct")
    assert config.num_key_value_heads < config.num_attention_heads
    torch.manual_seed(0)
    input_ids = torch.randint(0, 1000, (2, 12))
    position_ids = torch.tensor([[0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 5, 6], [0, 1, 2, 0, 1, 2, 3, 4, 5, 6, 7, 0]])
    logits = {}
    for path in ("sdpa", "torch_varlen"):
        config._attn_implementation = path
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config).eval()
        # use_cache=False as in training: with a cache, transformers does not look for packed examples
        logits[path] = model(input_ids=input_ids, position_ids=position_ids, use_cache=False).logits
    torch.testing.assert_close(logits["torch_varlen"], logits["sdpa"], rtol=1e-5, atol=1e-5)


def test_goals_read_the_rows():
    rows = [{"run": "smollm2-360m-lora", "mfu": 0.5}, {"run": "smollm2-1.7b-lora", "mfu": 0.4},
            {"run": "throughput.py trl-default", "speedup": 3.0}]  # fmt: skip
    assert gpu_benchmark.goals(rows) == [
        "- goal MFU >= 45% for smollm2-360m-lora: met",
        "- goal MFU >= 45% for smollm2-1.7b-lora: NOT met",
        "- goal smolfactory-packed >= 2.87x trl-default (the CPU ratio): met",
        "- goal smolfactory-packed >= 2.0x trl-best (the CPU ratio): unmeasured",
    ]
