"""Model names: the built-in model, local folders, Hub ids, and the errors for wrong names."""

from __future__ import annotations

import json
from pathlib import Path

import huggingface_hub
import pytest

from smolfactory.errors import SmolFactoryError
from smolfactory.model.loading import load_model, load_tokenizer, resolve_model_path


def test_builtin_model_is_a_trainable_safetensors_folder(builtin_path):
    folder = Path(builtin_path)
    config = json.loads((folder / "config.json").read_text())
    assert "quantization_config" not in config  # a GGUF marker here would block training
    assert config["model_type"] == "llama" and config["tie_word_embeddings"] is True
    assert (folder / "model.safetensors").is_file() and (folder / "chat_template.jinja").is_file()


def test_local_folder_resolves_to_absolute_path(tiny_model_dir, monkeypatch):
    monkeypatch.chdir(Path(tiny_model_dir).parent)
    assert resolve_model_path(Path(tiny_model_dir).name) == tiny_model_dir


def test_hub_ids_pass_through_unchanged():
    assert resolve_model_path("HuggingFaceTB/SmolLM2-360M-Instruct") == "HuggingFaceTB/SmolLM2-360M-Instruct"


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("builtin:gpt-17", "unknown built-in model 'builtin:gpt-17'; known: builtin:smollm2-135m-instruct"),
        ("./no/such/folder", "model './no/such/folder' is not a folder with a Hugging Face model"),
    ],
)
def test_wrong_model_names_say_what_to_use(name, message):
    with pytest.raises(SmolFactoryError, match=message):
        resolve_model_path(name)


def test_unreachable_hub_id_is_one_clear_error(monkeypatch):
    # Offline mode fails at once instead of retrying connections (huggingface_hub reads the env var on import).
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(SmolFactoryError, match=r"could not load model 'nobody/no-such-model' .*builtin:"):
        load_tokenizer("nobody/no-such-model")
    with pytest.raises(SmolFactoryError, match=r"could not load model 'nobody/no-such-model'"):
        load_model("nobody/no-such-model")


def test_tokenizer_keeps_chat_template_and_pad(builtin_path):
    tokenizer = load_tokenizer("builtin:smollm2-135m-instruct")
    assert tokenizer.chat_template and tokenizer.pad_token_id is not None
