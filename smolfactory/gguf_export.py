"""A trained model as one GGUF file, the format llama.cpp, Ollama and LM Studio run, and an Ollama Modelfile beside it.

smolfactory export --model outputs/quickstart/final --gguf q8_0 --output outputs/quill.gguf --modelfile

The file is written with the ``gguf`` package (llama.cpp's own format library) and follows the conventions of
llama.cpp's converter (convert_hf_to_gguf.py), which transformers' GGUF loader undoes, so a file round-trips:
- tensor names from ``gguf.get_tensor_name_map``; tied embeddings are stored once (no ``output.weight``);
- Llama's q_proj and k_proj rows are permuted, as llama.cpp's Llama kernels rotate interleaved pairs where
  transformers rotates two halves; Qwen2 keeps transformers' layout (llama.cpp runs it with "NEOX" rotary);
- 1-D tensors (norms, biases) stay F32 in every file type; f16, bf16 and q8_0 change the 2-D weights only;
- the tokenizer as llama.cpp's byte-level BPE ("gpt2"): tokens, token types, merges, and ``tokenizer.ggml.pre``,
  the name of the rule that splits text before BPE, found as llama.cpp finds it: by hashing the tokenization of a
  fixed text. A tokenizer whose hash is not in our table is refused: llama.cpp would split its text differently.

A chat model that does not know where its turn ends rambles on (ollama/ollama#8363, #6823): every file carries the
chat template and the end-of-turn token, found by rendering a conversation, or the export is refused.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from hashlib import sha256
from pathlib import Path

import gguf
import numpy as np
import torch
from jinja2 import TemplateError
from peft import PeftModel
from transformers import PretrainedConfig, PreTrainedModel, PreTrainedTokenizerBase

from smolfactory.errors import SmolFactoryError, first_line
from smolfactory.export import atomic_file, without_tied_copies

# --gguf value -> (the file type the header states, the type of the 2-D weights)
FILE_TYPES = {
    "f32": (gguf.LlamaFileType.ALL_F32, gguf.GGMLQuantizationType.F32),
    "f16": (gguf.LlamaFileType.MOSTLY_F16, gguf.GGMLQuantizationType.F16),
    "bf16": (gguf.LlamaFileType.MOSTLY_BF16, gguf.GGMLQuantizationType.BF16),
    "q8_0": (gguf.LlamaFileType.MOSTLY_Q8_0, gguf.GGMLQuantizationType.Q8_0),
}


@dataclass(frozen=True)
class Architecture:
    """How one transformers model class maps onto a llama.cpp architecture."""

    arch: gguf.MODEL_ARCH
    permute_qk: bool  # llama.cpp's Llama graph rotates interleaved pairs; transformers rotates halves


# SmolLM3 is left out: llama.cpp has an architecture for it (NoPE layers), but transformers cannot load such a file
# back, so nothing here could check the file we would write.
ARCHITECTURES = {
    "LlamaForCausalLM": Architecture(gguf.MODEL_ARCH.LLAMA, permute_qk=True),
    "Qwen2ForCausalLM": Architecture(gguf.MODEL_ARCH.QWEN2, permute_qk=False),
}

# llama.cpp's fixed text (convert_hf_to_gguf.py, get_vocab_base_pre): whitespace runs, emoji, digit runs, scripts and
# contractions, where pre-tokenizers differ. The sha256 of str(tokenizer.encode(PRE_TOKENIZER_PROBE)) names the rule.
PRE_TOKENIZER_PROBE = (
    "\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ (multiple emojis concatenated) "
    "✅ 🦙🦙 3 33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 "
    "កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天～ ------======= "
    "нещо на Български ''''''```````\"\"\"\"......!!!!!!?????? I've been 'told he's there, 'RE you sure? 'M not sure "
    "I'll make it, 'D you like some tea? We'Ve a'lL"
)
# The hashes llama.cpp records for the tokenizers of the families we support.
PRE_TOKENIZERS = {
    "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249": "smollm",  # SmolLM, SmolLM2
    "0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5": "llama-bpe",  # Llama 3.x
    "e636dc30a262dcc0d8c323492e32ae2b70728f4df7dfe9737d9f920a282b8aea": "qwen2",  # Qwen1.5, Qwen2, Qwen2.5
    "d4540891389ea895b53b399da6ac824becc30f2fba0e9ddbb98f92e55ca0e97c": "qwen2",  # Qwen3-Embedding's variant
}

# A conversation whose assistant text is found again in the rendered template, to see what follows it.
ANSWER_MARKER = "Quill answers 42."
PROBE = [{"role": "user", "content": "Hi there."}, {"role": "assistant", "content": ANSWER_MARKER}]


# --- The whole file ---------------------------------------------------------------------------------------------


def write_gguf(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, path: str | Path, file_type: str = "f16"
) -> Path:
    """Write ``model`` (a plain model: merge a LoRA adapter first) and ``tokenizer`` to the GGUF file ``path``.

    Everything is checked before the first byte is written, and the file appears only when complete (an existing one
    is replaced atomically).
    """
    check_file_type(file_type)
    config = model.config
    architecture = gguf_architecture(model)
    vocab = gguf_vocab(tokenizer, config.vocab_size)
    stops = stop_tokens(model, tokenizer)
    tensors = gguf_tensors(model, architecture, FILE_TYPES[file_type][1])
    path = Path(path)
    with atomic_file(path) as staging:
        writer = gguf.GGUFWriter(staging, gguf.MODEL_ARCH_NAMES[architecture.arch])
        writer.add_type(gguf.GGUFType.MODEL)
        writer.add_name(Path(str(config.name_or_path or "model")).name)
        add_hyperparameters(writer, config, architecture)
        writer.add_file_type(FILE_TYPES[file_type][0])
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        add_tokenizer(writer, tokenizer, vocab, stops)
        for name, data, raw_type in tensors:
            writer.add_tensor(name, data, raw_dtype=raw_type)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    return path


def check_exportable(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> None:
    """Every refusal write_gguf could make, without converting a weight: for a fit, before training starts."""
    gguf_architecture(model)
    rope_parameters(model.config)
    gguf_vocab(tokenizer, model.config.vocab_size)
    stop_tokens(model, tokenizer)


def check_file_type(file_type: str, option: str = "--gguf") -> None:
    """Refuse a file type we do not write, naming the option that asked for it and the types we do write."""
    if file_type not in FILE_TYPES:
        raise SmolFactoryError(f"{option} {file_type} is not a GGUF type we write; use one of {', '.join(FILE_TYPES)}")


def gguf_architecture(model: PreTrainedModel) -> Architecture:
    """The llama.cpp architecture of a model's class (or a class it derives from: FSDP2 wraps a model in a subclass
    named FSDP<name>), or a one-line refusal naming what we support."""
    if isinstance(model, PeftModel):
        raise SmolFactoryError("GGUF export takes a plain model: merge the LoRA adapter first (merge_and_unload())")
    for cls in type(model).__mro__:
        if cls.__name__ in ARCHITECTURES:
            return ARCHITECTURES[cls.__name__]
    raise SmolFactoryError(
        f"GGUF export does not support {type(model).__name__}; supported: {', '.join(ARCHITECTURES)} (SmolLM2, "
        "Llama 3.x, Qwen2.5); export a Hugging Face folder instead"
    )


# --- Hyper-parameters -------------------------------------------------------------------------------------------


def add_hyperparameters(writer: gguf.GGUFWriter, config: PretrainedConfig, architecture: Architecture) -> None:
    """The shape and rotary settings llama.cpp needs, under the keys its converter writes."""
    head_dim = attention_head_size(config)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_freq_base(rope_parameters(config)["rope_theta"])
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    if architecture.arch == gguf.MODEL_ARCH.LLAMA:
        writer.add_rope_dimension_count(head_dim)
    if head_dim != config.hidden_size // config.num_attention_heads:  # llama.cpp derives it otherwise
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)


def attention_head_size(config: PretrainedConfig) -> int:
    """The size of one attention head: set in the config (Qwen3, some Llamas) or hidden size over heads."""
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def rope_parameters(config: PretrainedConfig) -> dict:
    """The rotary settings (transformers 5 keeps them in ``rope_parameters``); scalings we cannot write refused."""
    parameters = dict(getattr(config, "rope_parameters", None) or {})
    parameters.setdefault("rope_theta", getattr(config, "rope_theta", 10000.0))
    kind = parameters.get("rope_type", "default")
    if kind not in ("default", "llama3"):
        raise SmolFactoryError(
            f"GGUF export does not support rope scaling '{kind}' yet (only none and llama3); export a Hugging Face "
            "folder and convert it with llama.cpp's convert_hf_to_gguf.py"
        )
    return parameters


def llama3_rope_factors(config: PretrainedConfig) -> np.ndarray:
    """Llama 3.1+'s long-context scaling as the per-frequency divisors llama.cpp reads from ``rope_freqs.weight``."""
    rope = rope_parameters(config)
    head_dim = attention_head_size(config)
    frequencies = 1.0 / (rope["rope_theta"] ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))
    factor, low, high = rope.get("factor", 8.0), rope.get("low_freq_factor", 1.0), rope.get("high_freq_factor", 4.0)
    old_context = rope.get("original_max_position_embeddings", 8192)
    wavelengths = 2 * np.pi / frequencies
    smooth = (old_context / wavelengths - low) / (high - low)
    blended = 1 / ((1 - smooth) / factor + smooth)
    factors = np.where(
        wavelengths < old_context / high, 1.0, np.where(wavelengths > old_context / low, factor, blended)
    )
    return factors.astype(np.float32)


# --- Weights ----------------------------------------------------------------------------------------------------


def gguf_tensors(
    model: PreTrainedModel, architecture: Architecture, weight_type: gguf.GGMLQuantizationType
) -> list[tuple[str, np.ndarray, gguf.GGMLQuantizationType | None]]:
    """(GGUF name, data, raw type or None) for every weight, named, permuted and converted as llama.cpp's converter
    does; the raw type tells the writer how to read quantized bytes."""
    config = model.config
    names = gguf.get_tensor_name_map(architecture.arch, config.num_hidden_layers)
    state_dict = without_tied_copies(model, model.state_dict())
    tensors = []
    for hf_name, value in state_dict.items():
        stem, suffix = hf_name.rsplit(".", 1)
        gguf_name = names.get_name(stem)
        if gguf_name is None:
            raise SmolFactoryError(f"GGUF export found a weight llama.cpp has no name for: {hf_name}")
        data = value.detach().to(torch.float32).cpu().numpy()
        if architecture.permute_qk and stem.endswith("self_attn.q_proj"):
            data = interleave_rotary(data, config.num_attention_heads)
        elif architecture.permute_qk and stem.endswith("self_attn.k_proj"):
            data = interleave_rotary(data, config.num_key_value_heads)
        tensors.append((f"{gguf_name}.{suffix}", *converted(data, weight_type)))
    if rope_parameters(config).get("rope_type") == "llama3":
        tensors.append(("rope_freqs.weight", llama3_rope_factors(config), None))
    return tensors


def interleave_rotary(weight: np.ndarray, heads: int) -> np.ndarray:
    """Reorder each head's rows from transformers' rotary layout (first half, second half) to llama.cpp's Llama
    layout (pairs side by side); transformers' GGUF loader applies the inverse."""
    return (
        weight.reshape(heads, 2, weight.shape[0] // heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)
    )


def converted(
    data: np.ndarray, weight_type: gguf.GGMLQuantizationType
) -> tuple[np.ndarray, gguf.GGMLQuantizationType | None]:
    """A tensor in the file type's format: 1-D tensors stay F32 (llama.cpp adds them to F32 activations), and a
    row that Q8_0's 32-value blocks do not divide falls back to F16, as llama.cpp's converter does."""
    if data.ndim < 2 or weight_type == gguf.GGMLQuantizationType.F32:
        return data, None
    if weight_type == gguf.GGMLQuantizationType.Q8_0 and data.shape[-1] % 32:
        weight_type = gguf.GGMLQuantizationType.F16
    if weight_type == gguf.GGMLQuantizationType.F16:
        return data.astype(np.float16), None
    return gguf.quants.quantize(data, weight_type), weight_type


# --- Tokenizer --------------------------------------------------------------------------------------------------


@dataclass
class Vocab:
    """A byte-level BPE vocabulary as llama.cpp stores it."""

    tokens: list[str]
    token_types: list[int]
    merges: list[str]
    pre: str


def gguf_vocab(tokenizer: PreTrainedTokenizerBase, vocab_size: int) -> Vocab:
    """Tokens (ids the tokenizer lacks up to the model's vocabulary size become unused "[PADn]"), their types
    (added special tokens CONTROL, other added tokens USER_DEFINED) and merges of a byte-level BPE tokenizer."""
    model = json.loads(tokenizer.backend_tokenizer.to_str())["model"] if tokenizer.is_fast else {}
    if model.get("type") != "BPE":
        raise SmolFactoryError(
            "GGUF export supports byte-level BPE tokenizers (SmolLM2, Llama 3, Qwen2.5), not this one "
            f"({type(tokenizer).__name__}); export a Hugging Face folder instead"
        )
    by_id = {index: token for token, index in tokenizer.get_vocab().items()}
    added = tokenizer.added_tokens_decoder
    tokens, token_types = [], []
    for index in range(vocab_size):
        if index not in by_id:
            tokens.append(f"[PAD{index}]")
            token_types.append(gguf.TokenType.UNUSED)
            continue
        tokens.append(by_id[index])
        if index in added:
            control = added[index].special or looks_like_control(by_id[index])
            token_types.append(gguf.TokenType.CONTROL if control else gguf.TokenType.USER_DEFINED)
        else:
            token_types.append(gguf.TokenType.NORMAL)
    merges = [merge if isinstance(merge, str) else " ".join(merge) for merge in model["merges"]]
    return Vocab(tokens, token_types, merges, pre_tokenizer_name(tokenizer))


def looks_like_control(token: str) -> bool:
    """An added token that some tokenizers leave unmarked but that is a control token (Qwen2.5's ``<|fim_prefix|>``,
    ``<|file_sep|>``): llama.cpp's converter makes such ``<|...|>`` tokens CONTROL too, and so do we."""
    return (token.startswith("<|") and token.endswith("|>")) or (token.startswith("<｜") and token.endswith("｜>"))


def pre_tokenizer_name(tokenizer: PreTrainedTokenizerBase) -> str:
    """llama.cpp's name for the tokenizer's pre-tokenization rule, identified by the hash of a probe's ids."""
    digest = sha256(str(tokenizer.encode(PRE_TOKENIZER_PROBE)).encode()).hexdigest()
    if digest not in PRE_TOKENIZERS:
        raise SmolFactoryError(
            f"GGUF export does not recognise this tokenizer's pre-tokenizer (probe hash {digest[:12]}...; known: "
            f"{', '.join(sorted(set(PRE_TOKENIZERS.values())))}), so llama.cpp would split text differently; export "
            "a Hugging Face folder instead"
        )
    return PRE_TOKENIZERS[digest]


@dataclass
class StopTokens:
    """The tokens that end generation: the end of an assistant turn first, then the model's end-of-sequence ids."""

    end_of_turn: int
    ids: list[int]


def stop_tokens(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> StopTokens:
    """The end-of-turn token (the special token the chat template writes right after an assistant's text), then
    eos and every id of generation_config.eos_token_id; refused when the template is missing or ends no turn."""
    template = tokenizer.chat_template
    if not isinstance(template, str) or not template:
        raise SmolFactoryError(
            "the tokenizer has no chat template, so llama.cpp and Ollama could not format a conversation and the "
            "model would not know when to stop; set data.chat_template when training, or export a tokenizer with one"
        )
    try:
        rendered = tokenizer.apply_chat_template(PROBE, tokenize=False)
    except TemplateError as error:
        raise SmolFactoryError(f"the chat template fails on a user and assistant turn ({first_line(error)})") from error
    after = rendered[rendered.find(ANSWER_MARKER) + len(ANSWER_MARKER) :] if ANSWER_MARKER in rendered else ""
    specials = sorted((token for token in tokenizer.get_added_vocab() if after.startswith(token)), key=len)
    if not specials:
        raise SmolFactoryError(
            "the chat template writes no special token after an assistant's answer, so a GGUF of it would not stop "
            "at the end of its turn; use a chat template with an end-of-turn token (ChatML's <|im_end|>, for one)"
        )
    end_of_turn = tokenizer.convert_tokens_to_ids(specials[-1])
    ids = [end_of_turn]
    generation_eos = getattr(model.generation_config, "eos_token_id", None)
    for index in [tokenizer.eos_token_id, *(np.atleast_1d(generation_eos) if generation_eos is not None else [])]:
        if index is not None and int(index) not in ids:
            ids.append(int(index))
    return StopTokens(end_of_turn, ids)


def adds_bos(tokenizer: PreTrainedTokenizerBase) -> bool:
    """What the tokenizer does, not what a flag says: does encoding plain text put a BOS in front?"""
    return tokenizer.bos_token_id is not None and tokenizer.encode("a")[:1] == [tokenizer.bos_token_id]


def add_tokenizer(writer: gguf.GGUFWriter, tokenizer: PreTrainedTokenizerBase, vocab: Vocab, stops: StopTokens) -> None:
    """The tokenizer keys llama.cpp reads, with the chat template and the end-of-turn id."""
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(vocab.pre)
    writer.add_token_list(vocab.tokens)
    writer.add_token_types(vocab.token_types)
    writer.add_token_merges(vocab.merges)
    if tokenizer.bos_token_id is not None:
        writer.add_bos_token_id(tokenizer.bos_token_id)
    writer.add_eos_token_id(tokenizer.eos_token_id)
    writer.add_eot_token_id(stops.end_of_turn)
    if tokenizer.unk_token_id is not None:
        writer.add_unk_token_id(tokenizer.unk_token_id)
    if tokenizer.pad_token_id is not None:
        writer.add_pad_token_id(tokenizer.pad_token_id)
    writer.add_add_bos_token(adds_bos(tokenizer))
    writer.add_add_space_prefix(bool(getattr(tokenizer, "add_prefix_space", False)))
    writer.add_chat_template(tokenizer.chat_template)


# --- Ollama -----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ChatFormat:
    """A chat format Ollama can render: its Go template, and the same rendering in Python to compare against the
    model's own (Jinja) chat template."""

    name: str
    go_template: str
    turn: str  # one message, with {role} and {content}
    generation_prompt: str  # what opens the assistant's turn


CHAT_FORMATS = [
    ChatFormat(
        "ChatML",
        "{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}<|im_start|>assistant\n",
        "<|im_start|>{role}\n{content}<|im_end|>\n",
        "<|im_start|>assistant\n",
    ),
    ChatFormat(
        "Llama 3",
        "{{- range .Messages }}<|start_header_id|>{{ .Role }}<|end_header_id|>\n\n{{ .Content }}<|eot_id|>\n"
        "{{- end }}<|start_header_id|>assistant<|end_header_id|>\n\n",
        "<|start_header_id|>{role}<|end_header_id|>\n\n{content}<|eot_id|>",
        "<|start_header_id|>assistant<|end_header_id|>\n\n",
    ),
]

# Two user turns around an answer, ending with the generation prompt: what Ollama sends on a second turn.
CONVERSATION = [*PROBE, {"role": "user", "content": "And again?"}]


@dataclass(frozen=True)
class OllamaTemplate:
    """A recognised chat format and the system prompt the model's template adds when a conversation has none."""

    format: ChatFormat
    default_system: str | None


def render(chat_format: ChatFormat, messages: list[dict]) -> str:
    """What Ollama's Go template of ``chat_format`` renders for ``messages`` (with the generation prompt)."""
    turns = "".join(chat_format.turn.format(role=m["role"], content=m["content"]) for m in messages)
    return turns + chat_format.generation_prompt


def ollama_template(tokenizer: PreTrainedTokenizerBase) -> OllamaTemplate | None:
    """The chat format whose Go template renders a probe conversation exactly as the model's own template does
    (llama.cpp and Ollama put a BOS in front themselves), or None when no format we know does."""

    def jinja(messages: list[dict]) -> str:
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        bos = tokenizer.bos_token
        return text[len(bos) :] if adds_bos(tokenizer) and bos and text.startswith(bos) else text

    for chat_format in CHAT_FORMATS:
        default_system = implied_system_prompt(chat_format, jinja([CONVERSATION[0]]))
        system = [{"role": "system", "content": default_system}] if default_system is not None else []
        if jinja(CONVERSATION) == render(chat_format, system + CONVERSATION):
            return OllamaTemplate(chat_format, default_system)
    return None


def implied_system_prompt(chat_format: ChatFormat, rendered: str) -> str | None:
    """The system prompt a template renders before the first user turn when there is none (SmolLM2's "You are a
    helpful AI assistant named SmolLM..."), or None."""
    before, after = chat_format.turn.format(role="system", content="\0").split("\0")
    if not rendered.startswith(before) or after not in rendered[len(before) :]:
        return None
    return rendered[len(before) : rendered.index(after, len(before))]


def write_modelfile(
    gguf_path: str | Path, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase
) -> tuple[Path, OllamaTemplate | None]:
    """Write an Ollama Modelfile, ``<name>.Modelfile``, beside ``gguf_path`` (atomically; one per GGUF file, so two
    exports into one folder keep theirs): FROM the file, a TEMPLATE in Ollama's Go
    syntax when the chat format is one we recognise (with the default SYSTEM prompt the model's template implies),
    and every stop token as PARAMETER stop. Returns its path and the template (None: TEMPLATE left out)."""
    gguf_path = Path(gguf_path)
    stops = stop_tokens(model, tokenizer)
    template = ollama_template(tokenizer)
    path = gguf_path.with_suffix(".Modelfile")
    lines = [f"# ollama create {gguf_path.stem} -f {path}", f"FROM ./{gguf_path.name}"]
    if template is not None:
        lines.append(f'TEMPLATE """{template.format.go_template}"""')
        if template.default_system:
            lines.append(f'SYSTEM """{template.default_system}"""')
    lines += [f"PARAMETER stop {json.dumps(tokenizer.convert_ids_to_tokens(index))}" for index in stops.ids]
    with atomic_file(path) as staging:
        staging.write_text("\n".join(lines) + "\n")
    return path, template
