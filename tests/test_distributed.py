"""DDP, FSDP2 (ModelParallelStrategy, fully_shard) and FSDP (FSDPStrategy) on 2 CPU processes, full and LoRA.

Each run trains two steps of global batch 4 (2 ranks x 2 accumulated micro-batches of 1) on four examples
of very different lengths, so every step sees all four. Its losses, first-step gradients and exported
weights must equal a single process training on batch 4. Under DDP, DPO with LoRA too, on four pairs, and GRPO
(DAPO: the loss is the mean over every completion token of the step, however the prompts are split) with
completions fixed by each prompt.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from smolfactory.export import export_checkpoint
from tests.conftest import RAGGED, ROOT, run_script, write_jsonl
from tests.distributed_run import VARIANTS, run

# Pairs of very different lengths: DPO's step loss is the mean over the step's pairs, however they are split.
RAGGED_PAIRS = [
    {"prompt": "Hi", "chosen": "Hello!", "rejected": "Go away."},
    {"prompt": "Tell me a long story.", "chosen": "Once upon a time " * 15, "rejected": "No."},
    {"prompt": "2 + 2?", "chosen": "4", "rejected": "5, because two and two make five."},
    {"prompt": "Name three colours.", "chosen": "Red, green and blue.", "rejected": "Dog, cat and bird."},
]


@pytest.fixture(scope="module")
def single_process(tiny_model_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("single")
    data = write_jsonl(folder / "ragged.jsonl", RAGGED)
    pairs = write_jsonl(folder / "pairs.jsonl", RAGGED_PAIRS)
    for variant in VARIANTS:
        run(variant, tiny_model_dir, str(data), folder, "auto", devices=1, batch_size=4, accumulate=1)
    run("lora", tiny_model_dir, str(pairs), folder, "auto", devices=1, batch_size=4, accumulate=1, name="dpo",
        preference=True)  # fmt: skip
    run("lora", tiny_model_dir, str(data), folder, "auto", devices=1, batch_size=4, accumulate=1, steps=4,
        name="straight")  # fmt: skip
    run("lora", tiny_model_dir, str(data), folder, "auto", devices=1, batch_size=4, accumulate=1, name="grpo",
        grpo=True)  # fmt: skip
    return folder, data, pairs


def weights(folder: Path) -> dict[str, torch.Tensor]:
    files = list(folder.glob("*.safetensors"))
    assert len(files) == 1, files
    return load_file(files[0])


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "fsdp2", "fsdp"])
def test_two_processes_match_one(tiny_model_dir, single_process, tmp_path, strategy):
    reference, data, pairs = single_process
    run_script("tests/distributed_run.py", strategy, tiny_model_dir, data, tmp_path, pairs)
    for variant in [*VARIANTS, "dpo", "grpo"] if strategy == "ddp" else VARIANTS:
        expected = json.loads((reference / f"{variant}.json").read_text())
        result = json.loads((tmp_path / f"{variant}.json").read_text())
        assert result["losses"] == pytest.approx(expected["losses"], abs=1e-5), variant
        # Sharded: one group per decoder layer (the tiny model has 2) plus the root; DDP shards nothing.
        assert result["shard_groups"] == (0 if strategy == "ddp" else 3), variant
        assert result["checkpointed"] == (2 if strategy == "fsdp" else 0), variant  # layers, as in fsdp.yaml
        assert result["gradients"].keys() == expected["gradients"].keys()
        for name, gradient in expected["gradients"].items():
            torch.testing.assert_close(torch.tensor(result["gradients"][name]), torch.tensor(gradient), atol=1e-6,
                                       rtol=1e-4, msg=f"{variant} {name}")  # fmt: skip
        # The export gathered the full weights on rank 0 (sharded under FSDP2) into a loadable folder. Two
        # AdamW steps of 1e-2 amplify 1e-7 gradient differences where a gradient is near zero: 1e-4 here.
        exported, single = weights(tmp_path / variant / "final"), weights(reference / variant / "final")
        assert exported.keys() == single.keys()
        for name, tensor in single.items():
            torch.testing.assert_close(exported[name], tensor, atol=1e-4, rtol=1e-3, msg=f"{variant} {name}")
    if strategy == "ddp":
        return
    # Sharded checkpoints: 2 steps, stop, resume for 2 more gives the last 2 of 4 straight steps, and
    # `smolfactory export` reads the sharded checkpoint folder into the same adapter.
    straight = json.loads((reference / "straight.json").read_text())
    resumed = json.loads((tmp_path / "resumed.json").read_text())
    assert resumed["losses"] == pytest.approx(straight["losses"][2:], abs=1e-5)
    checkpoint = tmp_path / "resumed" / "checkpoints" / "last.ckpt"
    assert checkpoint.is_dir()  # sharded
    export_checkpoint(checkpoint, tmp_path / "from_checkpoint")
    expected = weights(reference / "straight" / "final")
    for folder in (tmp_path / "resumed" / "final", tmp_path / "from_checkpoint"):
        exported = weights(folder)
        assert exported.keys() == expected.keys()
        for name, tensor in expected.items():
            torch.testing.assert_close(exported[name], tensor, atol=1e-4, rtol=1e-3, msg=f"{folder.name} {name}")


@pytest.mark.parametrize("name", ["ddp", "fsdp", "fsdp2"])
def test_strategy_configs_build_their_strategy(name, tiny_model_dir):
    """The CUDA configs parse, and FSDP's policy wraps exactly the decoder layers of a real model."""
    import yaml
    from jsonargparse import ArgumentParser
    from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy, Strategy
    from transformers import AutoModelForCausalLM

    config = yaml.safe_load((ROOT / "configs" / "strategy" / f"{name}.yaml").read_text())["trainer"]
    parser = ArgumentParser()
    parser.add_argument("--strategy", type=Strategy | str)
    strategy = parser.instantiate_classes(parser.parse_object({"strategy": config["strategy"]})).strategy
    expected = {"ddp": str, "fsdp": FSDPStrategy, "fsdp2": ModelParallelStrategy}[name]
    assert isinstance(strategy, expected) and config["precision"] == "bf16-mixed"
    if name == "ddp":
        assert strategy == "ddp"  # Lightning's registered name for DDPStrategy
        return
    if name == "fsdp":
        model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
        policies = strategy.kwargs["auto_wrap_policy"], strategy._activation_checkpointing_kwargs["auto_wrap_policy"]
        for policy in policies:
            assert policy(model, True, 0)
            wrapped = [m for m in model.modules() if policy(m, False, 0)]
            assert wrapped == list(model.model.layers)
