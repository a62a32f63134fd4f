"""Every shipped recipe trains a step as shipped, on the CPU: its own precision, clipping, optimizer, LoRA and
quantization settings. Only what this machine cannot provide changes: the model (a tiny stand-in of the same
family of architecture), a Hub dataset (a local file in its layout), the accelerator, device count and strategy."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from bitsandbytes.nn import Linear4bit
from bitsandbytes.optim import AdamW8bit
from lightning.pytorch.cli import instantiate_class

from smolfactory.cli import SmolFactoryCLI
from tests.conftest import ROOT, chat, hardware_precision_here, write_jsonl

RECIPES = sorted((ROOT / "configs" / "models").glob("*.yaml"))
SHIPPED = [ROOT / "configs" / "quickstart.yaml", ROOT / "configs" / "dpo_quickstart.yaml", *RECIPES]
CUDA_BASE = ROOT / "configs" / "cuda.yaml"


def composed(config: Path) -> list[Path]:
    """The --config files of a shipped recipe, as its header says: the models' recipes on the shared CUDA base."""
    return [CUDA_BASE, config] if config.parent.name == "models" else [config]


def merged(first: dict, second: dict) -> dict:
    """Two parsed YAML documents as jsonargparse composes them: the second's keys win, mappings merge."""
    result = dict(first)
    for key, value in second.items():
        both = isinstance(value, dict) and isinstance(first.get(key), dict)
        result[key] = merged(first[key], value) if both else value
    return result


def read(config: Path) -> dict:
    documents = [yaml.safe_load(path.read_text()) for path in composed(config)]
    return merged(documents[0], documents[1]) if len(documents) == 2 else documents[0]


def test_the_promised_recipes_exist():
    names = {path.stem for path in RECIPES}
    expected = {"smollm3-3b-lora", "smollm3-3b-qlora", "smollm3-3b-full-fsdp", "smollm2-135m-lora",
                "smollm2-360m-lora", "smollm2-1.7b-lora", "qwen2.5-0.5b-lora"}  # fmt: skip
    assert expected <= names


def stand_in(raw: dict, model_dir: str, adapter_dir: str, folder: Path) -> dict:
    """The settings this machine has to replace, and nothing else."""
    model = raw["model"].get("init_args", raw["model"])
    data = raw["data"].get("init_args", raw["data"])
    hub_id = model["model_name"].count("/") == 1  # else the quickstart's adapter folder, outputs/quickstart/final
    replaced = {
        "trainer": {"accelerator": "cpu", "devices": 1, "strategy": "auto", "max_steps": 1},
        "model": {"model_name": model_dir if hub_id else adapter_dir},
    }
    if not str(data["dataset"]).startswith("builtin:"):  # a Hub dataset of conversations (messages layout)
        rows = [chat(f"Question {i}?", "An answer. " * (1 + i % 4)) for i in range(24)]
        replaced["data"] = {"dataset": str(write_jsonl(folder / "conversations.jsonl", rows))}
    return replaced


@pytest.mark.slow
@pytest.mark.parametrize("config", SHIPPED, ids=lambda path: path.stem)
def test_every_shipped_config_trains_a_step_as_shipped(config, tiny_model_dir, tiny_adapter_dir, tmp_path):
    raw = read(config)
    settings = tmp_path / "stand-in.yaml"
    settings.write_text(yaml.safe_dump(stand_in(raw, tiny_model_dir, tiny_adapter_dir, tmp_path)))
    root = tmp_path / "run"
    shipped = [argument for path in composed(config) for argument in ("--config", str(path))]
    cli = SmolFactoryCLI(args=["fit", *shipped, "--config", str(settings), f"--trainer.default_root_dir={root}"])
    trainer, module = cli.trainer, cli.model
    assert trainer.global_step == 1
    # As shipped, or (no precision in the config) what the CPU computes fastest.
    assert trainer.precision == raw["trainer"].get("precision", hardware_precision_here())
    assert trainer.gradient_clip_val == raw["trainer"].get("gradient_clip_val")
    model_settings = raw["model"].get("init_args", raw["model"])
    optimizer = trainer.optimizers[0]
    if model_settings["optimizer"]["class_path"] == "bitsandbytes.optim.AdamW8bit":
        assert isinstance(optimizer, AdamW8bit)
    else:
        assert isinstance(optimizer, torch.optim.AdamW) and optimizer.defaults["fused"]
    # As configured: the peak learning rate and weight decay (on matrices only), the schedule's warm-up.
    decay, no_decay = optimizer.param_groups
    assert decay["weight_decay"] == model_settings["optimizer"]["init_args"]["weight_decay"]
    assert no_decay["weight_decay"] == 0.0 and all(p.ndim < 2 for p in no_decay["params"])
    assert decay["initial_lr"] == model_settings["optimizer"]["init_args"]["lr"]
    schedule = trainer.lr_scheduler_configs[0].scheduler
    assert schedule.warmup_steps == model_settings["lr_scheduler"]["init_args"]["warmup_steps"]
    trainable = [name for name, p in module.named_parameters() if p.requires_grad]
    lora = model_settings.get("lora", {"r": 16})  # SFTModule's default
    if lora is None:
        assert len(trainable) == len(list(module.parameters()))  # full fine-tuning
        assert (root / "final" / "model.safetensors").is_file()
    else:
        assert trainable and all("lora_" in name for name in trainable)
        assert module.model.peft_config["default"].r == lora["r"]
        # DPO continuing the quickstart's adapter keeps that adapter, frozen, as its reference.
        assert ("reference" in module.model.peft_config) == (config.stem == "dpo_quickstart")
        assert (root / "final" / "adapter_model.safetensors").is_file()
    quantized = any(isinstance(m, Linear4bit) for m in module.modules())
    assert quantized == (model_settings.get("quantization") == "nf4")
    assert (root / "checkpoints" / "last.ckpt").is_file() and (root / "logs" / "version_0" / "config.yaml").is_file()
    strategy = raw["trainer"].get("strategy")
    if strategy:  # built as written (the Trainer refuses FSDP without CUDA, the strategy itself does not)
        arguments = {
            key: instantiate_class((), value) if isinstance(value, dict) else value
            for key, value in strategy["init_args"].items()
        }
        built = instantiate_class((), {"class_path": strategy["class_path"], "init_args": arguments})
        assert type(built).__name__ == "FSDPStrategy"
        assert raw["trainer"]["devices"] == 8


def values(tree: object) -> list[object]:
    """Every leaf value of a parsed YAML document."""
    if isinstance(tree, dict):
        return [value for child in tree.values() for value in values(child)]
    if isinstance(tree, list):
        return [value for child in tree for value in values(child)]
    return [tree]


@pytest.mark.parametrize("config", SHIPPED, ids=lambda path: path.stem)
def test_each_config_names_its_run_folder_once(config):
    """Logs, checkpoints and final/ follow trainer.default_root_dir: no setting repeats the folder."""
    raw = read(config)
    root = raw["trainer"]["default_root_dir"]
    assert [value for value in values(raw) if isinstance(value, str) and root in value] == [root]


def test_the_recipes_share_their_base_instead_of_repeating_it():
    """configs/models/ holds only what each recipe changes; no line of the shared base is repeated there."""
    base = yaml.safe_load(CUDA_BASE.read_text())
    for recipe in RECIPES:
        text = recipe.read_text()
        assert f"--config configs/cuda.yaml --config configs/models/{recipe.name}" in text
        changes = yaml.safe_load(text)
        assert "callbacks" not in changes["trainer"] and "samples" not in changes
        assert len(text.splitlines()) < len(CUDA_BASE.read_text().splitlines()) / 2
        for section, values_ in changes.items():
            for key, value in values_.items():
                assert base.get(section, {}).get(key) != value, f"{recipe.name} repeats {section}.{key}"
