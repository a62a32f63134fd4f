"""`smolfactory export`: a Lightning checkpoint to a Hugging Face folder (adapter or merged), with a model card.

smolfactory export --checkpoint outputs/quickstart/checkpoints/last.ckpt --output outputs/quill [--merge]
    [--push_to_hub owner/name]
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel

from smolfactory.data.templates import resolve_chat_template
from smolfactory.errors import SmolFactoryError, first_line
from smolfactory.export import save_pretrained_folder
from smolfactory.hub import push_folder, require_token
from smolfactory.model.loading import load_tokenizer
from smolfactory.model.recipe import model_from_checkpoint


def export_checkpoint(checkpoint: str | Path, output: str | Path, merge: bool = False) -> Path:
    """Rebuild the module a checkpoint was saved from, load its weights, and write a Hugging Face folder.

    With ``merge`` a LoRA checkpoint's adapters are folded into the base weights (a plain model folder);
    without it the folder holds the adapter alone, as peft saves it.
    """
    saved = read_checkpoint(Path(checkpoint))
    hparams = saved.get("hyper_parameters") or {}
    model = model_from_checkpoint(saved)
    lora = hparams.get("lora")
    if merge and isinstance(model, PeftModel):
        model = model.merge_and_unload()
    data = saved.get("datamodule_hyper_parameters") or {}
    tokenizer = load_tokenizer(hparams.get("model_name"))
    if data.get("chat_template"):
        tokenizer.chat_template = resolve_chat_template(data["chat_template"])
    card = model_card(hparams, data, saved, merged=merge and lora is not None)
    return save_pretrained_folder(model, tokenizer, output, card=card)


def read_checkpoint(path: Path) -> dict[str, Any]:
    """A Lightning checkpoint as one dict: a .ckpt file, or a sharded (FSDP) folder gathered in this process."""
    if path.is_dir() and not (path / ".metadata").is_file():
        raise SmolFactoryError(
            f"{path} is a folder without .metadata, so not a sharded checkpoint; pass a .ckpt file or the folder "
            "a sharded (FSDP) run saved"
        )
    try:
        if not path.is_dir():
            return torch.load(path, map_location="cpu", weights_only=True)
        # Lightning's own consolidation (what `python -m lightning.pytorch.utilities.consolidate_checkpoint`
        # runs), in memory: the shards are read into full tensors, then the keys renamed as in a .ckpt file.
        from lightning.fabric.utilities.load import _load_distributed_checkpoint
        from lightning.pytorch.utilities.consolidate_checkpoint import _format_checkpoint

        saved = _load_distributed_checkpoint(path)
        return _format_checkpoint(saved) if "model" in saved else saved
    except (OSError, RuntimeError, ValueError) as error:
        raise SmolFactoryError(f"could not read checkpoint {path} ({first_line(error)})") from error


def described(config: dict[str, Any] | None) -> str:
    """A class-path setting in a line: ``AdamW8bit (lr=0.001, weight_decay=0.0)``."""
    if not config:
        return ""
    arguments = ", ".join(f"{key}={value}" for key, value in (config.get("init_args") or {}).items())
    return f"{config['class_path'].rsplit('.', 1)[-1]} ({arguments})"


def model_card(hparams: dict[str, Any], data: dict[str, Any], saved: dict[str, Any], merged: bool) -> str:
    """A README.md: what was trained from what, on which data, with which settings, and how it ended."""
    lora = hparams.get("lora")
    if lora:
        method = f"LoRA r={lora['r']}, alpha={lora['alpha']}, dropout={lora['dropout']}, on {lora['target_modules']}"
        method += " (DoRA)" if lora.get("use_dora") else ""
        method += ", merged into the base weights" if merged else ", saved as a PEFT adapter"
    else:
        method = "full fine-tuning"
    if hparams.get("quantization"):
        method += f", base quantized to {hparams['quantization']} during training"
    if hparams.get("loss"):  # a DPOModule checkpoint
        method = f"preference tuning ({described(hparams['loss'])}), {method}"
    rows = {
        "base model": f"`{hparams.get('model_name')}`",
        "method": method,
        "dataset": f"`{data.get('dataset', 'unknown')}` (format {data.get('format', 'auto')})",
        "trained tokens": data.get("train_on", "assistant"),
        "max length": data.get("max_length"),
        "packing": data.get("packing"),
        "batch size (per device)": data.get("batch_size"),
        "optimizer": described(hparams.get("optimizer")),
        "learning-rate schedule": described(hparams.get("lr_scheduler")) or "constant",
        "optimizer steps": saved.get("global_step"),
        "epochs started": saved.get("epoch", 0) + 1,
    }
    metrics = saved.get("metrics") or {}
    for name in sorted(metrics):
        rows[f"final {name}"] = f"{metrics[name]:.4f}"
    table = "\n".join(f"| {key} | {value} |" for key, value in rows.items())
    loader = "AutoModelForCausalLM" if merged or not hparams.get("lora") else "AutoPeftModelForCausalLM"
    package = "transformers" if loader == "AutoModelForCausalLM" else "peft"
    return f"""---
library_name: {"transformers" if package == "transformers" else "peft"}
tags: [smolfactory, lightning]
---

# Fine-tuned with smolfactory

| | |
|---|---|
{table}

```python
from {package} import {loader}
from transformers import AutoTokenizer

model = {loader}.from_pretrained("path/to/this/folder")
tokenizer = AutoTokenizer.from_pretrained("path/to/this/folder")
```
"""


def main(args: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="smolfactory export", description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True, help="a .ckpt file written by smolfactory fit")
    parser.add_argument("--output", required=True, help="folder to write (replaced atomically if it exists)")
    parser.add_argument("--merge", action="store_true", help="fold LoRA adapters into the base weights")
    parser.add_argument("--push_to_hub", metavar="REPO", help="upload the written folder to this Hub repo (owner/name)")
    options = parser.parse_args(args)
    if options.push_to_hub:
        require_token("--push_to_hub")  # before any work
    path = export_checkpoint(options.checkpoint, options.output, options.merge)
    print(f"Wrote {path} (load it with from_pretrained)")
    if options.push_to_hub:
        print(f"Uploaded {path} to {push_folder(path, options.push_to_hub, '--push_to_hub')}")
