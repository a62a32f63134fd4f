"""Everything that writes a trained model out: Hugging Face folders, written atomically, from a running fit or
from a checkpoint, with a model card, optionally uploaded to the Hub; and the `smolfactory export` command, which also
writes GGUF files (smolfactory.gguf_export).

smolfactory export --checkpoint outputs/quickstart/checkpoints/last.ckpt --output outputs/quill [--merge]
    [--push_to_hub owner/name]
smolfactory export --checkpoint ...last.ckpt | --model outputs/quickstart/final --gguf q8_0 --output quill.gguf
    [--modelfile]
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from huggingface_hub import HfApi, get_token
from huggingface_hub.errors import HfHubHTTPError
from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy, Strategy
from peft import PeftModel, get_peft_model
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from transformers import AutoModelForCausalLM, PreTrainedModel, PreTrainedTokenizerBase

from smolfactory.errors import SmolFactoryError, first_line

if TYPE_CHECKING:
    pass

# The file Lightning's sharded checkpoints hold beside the shards: everything but the weights and optimizer states.
LIGHTNING_META_FILE = "meta.pt"


# --- Files written atomically -----------------------------------------------------------------------------------


@contextmanager
def atomic_file(path: str | Path) -> Iterator[Path]:
    """A hidden staging path beside ``path`` to write to; renamed onto ``path`` when the block ends without an
    error, removed otherwise, so ``path`` never holds a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        yield staging
        os.replace(staging, path)
    finally:
        staging.unlink(missing_ok=True)


def writable_file(path: str | Path, option: str) -> Path:
    """Refuse, before any work, an output file that is a folder or whose folder cannot be made or written to."""
    path = Path(path)
    if path.is_dir():
        raise SmolFactoryError(f"{option} {path} is a folder; give the file to write, such as {path / 'out'}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise SmolFactoryError(f"{option} {path}: its folder cannot be made ({first_line(error)})") from error
    if not os.access(path.parent, os.W_OK):
        raise SmolFactoryError(f"{option} {path}: its folder {path.parent} is not writable")
    return path


def save_pretrained_folder(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    path: str | Path,
    state_dict: dict | None = None,
    card: str | None = None,
) -> Path:
    """Save a model (a PEFT adapter or a full model) with its tokenizer and chat template to ``path``.

    ``state_dict`` replaces the model's own weights (a sharded model passes its gathered full weights);
    ``card`` becomes the folder's README.md.

    Everything is written to a hidden sibling staging folder and renamed into place, so ``path`` never
    holds a half-written export. An existing folder at ``path`` is first renamed to ``.NAME.old-PID`` and
    deleted once the new one is in place: a crash between those two renames leaves the old export there.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    try:
        if isinstance(model, PeftModel):  # only the trained adapter (DPO keeps a frozen reference one beside it)
            model.save_pretrained(staging, state_dict=state_dict, selected_adapters=[model.active_adapter])
        else:
            model.save_pretrained(staging, state_dict=state_dict)
        tokenizer.save_pretrained(staging)
        if card is not None:
            (staging / "README.md").write_text(card)
        if path.exists():
            retired = path.with_name(f".{path.name}.old-{os.getpid()}")
            os.replace(path, retired)
            os.replace(staging, path)
            shutil.rmtree(retired)
        else:
            os.replace(staging, path)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return path


# --- From a running fit (the HFExport callback) -----------------------------------------------------------------


def save_trained_model(
    strategy: Strategy, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase | None, path: str | Path
) -> Path | None:
    """Write the model a fit trained to ``path``; every rank must call this, rank 0 writes and returns the path.

    Under a sharding strategy (FSDP2, FSDP) the ranks first gather the full weights together. Only rank 0's
    ``tokenizer`` is used (the other ranks may pass None).
    """
    state_dict = None
    if isinstance(strategy, ModelParallelStrategy | FSDPStrategy):
        state_dict = gather_full_state_dict(strategy, model)
    if not strategy.is_global_zero:
        return None
    if isinstance(strategy, FSDPStrategy) and isinstance(model, PeftModel):
        # FSDP's wrappers put "_fsdp_wrapped_module." into the module names from which peft picks the
        # adapter's weights out of a state dict; a wrapper-free copy names them as the gathered weights are.
        model = adapter_skeleton(model)
    return save_pretrained_folder(model, tokenizer, path, state_dict=state_dict)


def gather_full_state_dict(strategy: ModelParallelStrategy | FSDPStrategy, model: torch.nn.Module) -> dict:
    """The full weights of a sharded model (FSDP2 or FSDP), named as in `model`; every rank must call this.

    The strategy's root is the LightningModule, so its state dict names the weights "model.<name>". Off the
    CPU the gathered tensors go to host memory on rank 0 only (the others get nothing); on the CPU that offload
    is skipped, as FSDP's copy of a CPU tensor to the CPU crashes.
    """
    offload = strategy.root_device.type != "cpu"
    options = StateDictOptions(full_state_dict=True, cpu_offload=offload)
    gathered = get_model_state_dict(strategy.model, options=options)
    prefix = "model."
    state_dict = {name[len(prefix) :]: value for name, value in gathered.items() if name.startswith(prefix)}
    return without_tied_copies(model, state_dict)


def adapter_skeleton(model: PeftModel) -> PeftModel:
    """The same base architecture and adapter on the meta device (no memory, no weights), unwrapped."""
    with torch.device("meta"):
        base = AutoModelForCausalLM.from_config(model.get_base_model().config)
    return get_peft_model(base, model.peft_config[model.active_adapter])


def without_tied_copies(model: torch.nn.Module, state_dict: dict) -> dict:
    """Drop the second name of each tied weight (lm_head.weight when it is the embeddings), as save_pretrained does.

    A gathered state dict holds a separate tensor under every name, so transformers can no longer see the tie.
    """
    first_name: dict[int, str] = {}
    for name, parameter in model.named_parameters(remove_duplicate=False):
        first_name.setdefault(id(parameter), name)
    tied = {name for name, p in model.named_parameters(remove_duplicate=False) if first_name[id(p)] != name}
    return {name: value for name, value in state_dict.items() if name not in tied}


# --- From a checkpoint ------------------------------------------------------------------------------------------


def export_checkpoint(checkpoint: str | Path, output: str | Path, merge: bool = False) -> Path:
    """Rebuild the model a checkpoint was saved from, load its weights, and write a Hugging Face folder.

    With ``merge`` a LoRA checkpoint's adapters are folded into the base weights (a plain model folder);
    without it the folder holds the adapter alone, as peft saves it.
    """
    saved = read_checkpoint(Path(checkpoint))
    hparams = saved.get("hyper_parameters") or {}
    model, tokenizer = model_from_saved(saved)
    if merge and isinstance(model, PeftModel):
        model = model.merge_and_unload()
    data = saved.get("datamodule_hyper_parameters") or {}
    card = model_card(hparams, data, saved, merged=merge and bool(hparams.get("lora")))
    return save_pretrained_folder(model, tokenizer, output, card=card)


def model_from_saved(saved: dict[str, Any]) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """The model a checkpoint dict was saved from, with its weights, and the tokenizer (and chat template) it
    trained with."""
    # Imported here, as in checkpoint_tokenizer: smolfactory.model and smolfactory.data import this module.
    from smolfactory.model.recipe import model_from_checkpoint

    hparams = saved.get("hyper_parameters") or {}
    data = saved.get("datamodule_hyper_parameters") or {}
    return model_from_checkpoint(saved), checkpoint_tokenizer(hparams.get("model_name"), data.get("chat_template"))


def checkpoint_tokenizer(model_name: str, chat_template: str | None) -> PreTrainedTokenizerBase:
    """The model's tokenizer, with the chat template the data module trained with when it set one."""
    from smolfactory.data.templates import resolve_chat_template
    from smolfactory.model.loading import load_tokenizer

    tokenizer = load_tokenizer(model_name)
    if chat_template:
        tokenizer.chat_template = resolve_chat_template(chat_template)
    return tokenizer


def read_checkpoint(path: Path) -> dict[str, Any]:
    """A Lightning checkpoint as one dict: a .ckpt file, or a sharded (FSDP) folder gathered in this process."""
    if path.is_dir() and not (path / ".metadata").is_file():
        raise SmolFactoryError(
            f"{path} is a folder without .metadata, so not a sharded checkpoint; pass a .ckpt file or the folder "
            "a sharded (FSDP) run saved"
        )
    try:
        if path.is_dir():
            return read_sharded_checkpoint(path)
        return torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, ValueError) as error:
        raise SmolFactoryError(f"could not read checkpoint {path} ({first_line(error)})") from error


def read_sharded_checkpoint(folder: Path) -> dict[str, Any]:
    """A sharded checkpoint folder (Lightning's FSDPStrategy or ModelParallelStrategy) as the dict a .ckpt holds.

    The same dict as Lightning's consolidation (``python -m lightning.pytorch.utilities.consolidate_checkpoint``):
    the shards gathered into full tensors, then ``meta.pt`` (epoch, loops, hyper-parameters, ...) on top. The
    whole checkpoint must fit in CPU memory, and one copy of it is written to the temporary folder (TMPDIR).
    """
    with tempfile.TemporaryDirectory(prefix="smolfactory-checkpoint-") as scratch:
        # torch's public converter gathers the shards into one torch.save file, read back at once.
        consolidated = Path(scratch) / "consolidated.pt"
        dcp_to_torch_save(folder, consolidated)
        saved = torch.load(consolidated, map_location="cpu", weights_only=True)
    meta = folder / LIGHTNING_META_FILE
    if meta.is_file():
        saved.update(torch.load(meta, map_location="cpu", weights_only=True))
    return with_checkpoint_keys(saved)


def with_checkpoint_keys(saved: dict[str, Any]) -> dict[str, Any]:
    """Rename a sharded folder's top-level keys to a .ckpt's, in place: "model" (FSDPStrategy's name for the
    weights; ModelParallelStrategy's is already "state_dict") to "state_dict", and "optimizer_0", "optimizer_1",
    ... to the list "optimizer_states"."""
    if "model" in saved:
        saved["state_dict"] = saved.pop("model")
    count = sum(1 for key in saved if re.fullmatch(r"optimizer_[0-9]+", key))
    if count:
        saved["optimizer_states"] = [saved.pop(f"optimizer_{index}") for index in range(count)]
    return saved


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


# --- The Hub ----------------------------------------------------------------------------------------------------


def require_token(option: str) -> str:
    """The Hub token, or a one-line error naming ``option``; called before any training or export work."""
    token = get_token()
    if not token:
        raise SmolFactoryError(
            f"{option} needs a Hugging Face token with write access: run `hf auth login` or set HF_TOKEN "
            "(nothing was trained or uploaded)"
        )
    return token


def push_folder(folder: str | Path, repo_id: str, option: str = "push_to_hub") -> str:
    """Create the model repo if needed and upload the folder's files in one commit; returns the repo's URL."""
    api = HfApi(token=require_token(option))
    try:
        url = api.create_repo(repo_id, repo_type="model", exist_ok=True)
        api.upload_folder(repo_id=repo_id, folder_path=str(folder), commit_message="Upload from smolfactory")
    except (HfHubHTTPError, OSError, ValueError) as error:
        raise SmolFactoryError(
            f"could not upload {folder} to the Hub repo '{repo_id}' ({first_line(error)}); the folder is saved "
            "locally, so retry with smolfactory export or `hf upload`"
        ) from error
    return str(url)


# --- The `smolfactory export` command ---------------------------------------------------------------------------


def main(args: list[str]) -> None:
    """`smolfactory export`: parse its options, write the folder (or GGUF file), upload it when asked."""
    parser = argparse.ArgumentParser(
        prog="smolfactory export",
        description="A Lightning checkpoint to a Hugging Face folder with a model card, or a checkpoint or model "
        "folder to a GGUF file for llama.cpp and Ollama.",
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", help="a .ckpt file or sharded folder written by smolfactory fit")
    source.add_argument("--model", help="with --gguf: a model folder, an adapter folder, or builtin:...")
    parser.add_argument(
        "--output",
        required=True,
        help="folder to write, or the .gguf file with --gguf (replaced atomically if it exists)",
    )
    parser.add_argument("--merge", action="store_true", help="fold LoRA adapters into the base weights")
    parser.add_argument("--push_to_hub", metavar="REPO", help="upload the written folder to this Hub repo (owner/name)")
    parser.add_argument("--gguf", metavar="TYPE", help="write one GGUF file of this type: f32, f16, bf16 or q8_0")
    parser.add_argument("--modelfile", action="store_true", help="with --gguf: an Ollama Modelfile beside the file")
    options = parser.parse_args(args)
    if options.gguf is not None or options.model is not None or options.modelfile:
        export_gguf_command(options)
        return
    if options.push_to_hub:
        require_token("--push_to_hub")  # before any work
    path = export_checkpoint(options.checkpoint, options.output, options.merge)
    print(f"Wrote {path} (load it with from_pretrained)")
    if options.push_to_hub:
        print(f"Uploaded {path} to {push_folder(path, options.push_to_hub, '--push_to_hub')}")


def export_gguf_command(options: argparse.Namespace) -> None:
    """`smolfactory export --gguf`: check the options, load and merge the model, write the file (and Modelfile)."""
    from smolfactory.gguf_export import FILE_TYPES, check_file_type, write_gguf, write_modelfile

    output = Path(options.output)
    if options.gguf is None:
        option = "--modelfile" if options.modelfile else "--model"
        raise SmolFactoryError(f"{option} goes with --gguf TYPE (one of {', '.join(FILE_TYPES)})")
    check_file_type(options.gguf)
    if output.suffix != ".gguf" or output.is_dir():
        raise SmolFactoryError(
            f"--output {output} must be the .gguf file to write, such as {output.stem or 'model'}.gguf"
        )
    if options.push_to_hub:
        raise SmolFactoryError("--push_to_hub uploads folders; upload a .gguf file with `hf upload REPO FILE`")
    writable_file(output, "--output")
    # --merge is implied: a GGUF holds one plain model, so LoRA adapters are always merged.
    model, tokenizer = gguf_source(options.checkpoint, options.model)
    if output.exists():
        print(f"Replacing {output}")
    path = write_gguf(model, tokenizer, output, options.gguf)
    print(f"Wrote {path} ({options.gguf}, {path.stat().st_size / 2**20:.1f} MiB; run it with llama.cpp or Ollama)")
    if options.modelfile:
        if path.with_suffix(".Modelfile").exists():
            print(f"Replacing {path.with_suffix('.Modelfile')}")
        modelfile, template = write_modelfile(path, model, tokenizer)
        if template is None:
            print(
                f"Wrote {modelfile} without TEMPLATE: the chat template is not one we can write in Ollama's syntax "
                "(ChatML, Llama 3), so Ollama will pick one from the file's chat template"
            )
        else:
            print(f"Wrote {modelfile} ({template.format.name} template; `ollama create NAME -f {modelfile}`)")


def gguf_source(checkpoint: str | None, model_name: str | None) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """The model to write as GGUF, LoRA adapters merged, in float32 on the CPU, and its tokenizer."""
    if checkpoint is not None:
        saved = read_checkpoint(Path(checkpoint))
        hparams = saved.get("hyper_parameters") or {}
        if hparams.get("quantization"):
            # A quantized base holds packed bytes, not weights: merge into the base as published, as QLoRA does.
            print(f"Merging into the unquantized base ({hparams['quantization']} was for training only)")
            saved["hyper_parameters"] = {**hparams, "quantization": None}
        model, tokenizer = model_from_saved(saved)
    else:
        from smolfactory.chat import load_chat_model

        model, tokenizer = load_chat_model(model_name, "cpu")
    # In float32 before merging: a bf16 merge would round small LoRA updates away.
    model = model.float()
    if isinstance(model, PeftModel):
        model = model.merge_and_unload()
    return model.eval(), tokenizer
