"""Assistant-only label masks, checked against token spans built by hand, on several chat templates."""

from __future__ import annotations

import copy

import pytest

from smolfactory.data.templates import TemplateError, tokenize_conversation
from smolfactory.model.loss import IGNORE_INDEX

SMOLLM2_DEFAULT_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"

# Llama 3's layout: the template writes BOS itself; turns end with <|eot_id|>, which is not the EOS token here.
LLAMA3_TEMPLATE = (
    "{{ '<|begin_of_text|>' }}{% for m in messages %}"
    "{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\n\n' + m['content'] | trim + '<|eot_id|>' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
# Gemma's layout: the assistant is 'model', turns end with <end_of_turn> and a newline, no system role.
GEMMA_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'system' %}"
    "{{ raise_exception('System role not supported') }}{% endif %}"
    "{% set role = 'model' if m['role'] == 'assistant' else m['role'] %}"
    "{{ '<start_of_turn>' + role + '\n' + m['content'] + '<end_of_turn>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)
TURN_END = {"smollm2": "<|im_end|>", "llama3": "<|eot_id|>", "gemma": "<end_of_turn>"}


def with_template(tokenizer, name: str):
    """A copy of the SmolLM2 tokenizer with another template and that template's special tokens."""
    variant = copy.deepcopy(tokenizer)
    tokens = {
        "llama3": ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
        "gemma": ["<start_of_turn>", "<end_of_turn>"],
    }[name]
    variant.add_special_tokens({"additional_special_tokens": tokens})
    variant.chat_template = LLAMA3_TEMPLATE if name == "llama3" else GEMMA_TEMPLATE
    return variant


@pytest.fixture(scope="module", params=list(TURN_END))
def template(request, tokenizer):
    """(name, tokenizer) for the real SmolLM2 template and the two others."""
    name = request.param
    return name, tokenizer if name == "smollm2" else with_template(tokenizer, name)


def trained_spans(labels: list[int]) -> list[list[int]]:
    spans, current = [], []
    for label in labels:
        if label == IGNORE_INDEX:
            if current:
                spans.append(current)
            current = []
        else:
            current.append(label)
    return spans + ([current] if current else [])


def encode(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def test_single_turn_matches_hand_built_rendering(tokenizer):
    messages = [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello! How can I help?"}]
    prompt = (
        f"<|im_start|>system\n{SMOLLM2_DEFAULT_SYSTEM}<|im_end|>\n"
        "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n"
    )
    answer = "Hello! How can I help?<|im_end|>"
    example = tokenize_conversation(tokenizer, messages)

    prompt_ids, answer_ids, tail_ids = encode(tokenizer, prompt), encode(tokenizer, answer), encode(tokenizer, "\n")
    assert example["input_ids"] == prompt_ids + answer_ids + tail_ids
    assert example["labels"] == [IGNORE_INDEX] * len(prompt_ids) + answer_ids + [IGNORE_INDEX] * len(tail_ids)


def test_multi_turn_llama3_layout_matches_hand_built_ids(tokenizer):
    tokenizer = with_template(tokenizer, "llama3")
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "2 + 2?"},
        {"role": "assistant", "content": "4."},
        {"role": "user", "content": "Doubled?"},
        {"role": "assistant", "content": "8."},
    ]
    header = "<|start_header_id|>{}<|end_header_id|>\n\n"
    pieces = [
        (
            "<|begin_of_text|>"
            + header.format("system")
            + "Be brief.<|eot_id|>"
            + header.format("user")
            + "2 + 2?<|eot_id|>"
            + header.format("assistant"),
            False,
        ),
        ("4.<|eot_id|>", True),
        (header.format("user") + "Doubled?<|eot_id|>" + header.format("assistant"), False),
        ("8.<|eot_id|>", True),
    ]
    expected_ids, expected_labels = [], []
    for text, trained in pieces:
        ids = encode(tokenizer, text)
        expected_ids += ids
        expected_labels += ids if trained else [IGNORE_INDEX] * len(ids)
    example = tokenize_conversation(tokenizer, messages)
    assert example["input_ids"] == expected_ids
    assert example["labels"] == expected_labels
    assert example["input_ids"].count(tokenizer.convert_tokens_to_ids("<|begin_of_text|>")) == 1  # no double BOS


@pytest.mark.parametrize(
    "answers",
    [
        ["4.", "It is 8, since 4 times 2 is 8.", "You're welcome!"],
        ["  two leading spaces", "code:\n```py\nx = 1\n```", "emoji 🎉 and ünïcödé"],
    ],
    ids=["plain", "whitespace-code-unicode"],
)
def test_every_assistant_turn_is_trained_with_its_end_of_turn_token(template, answers):
    name, tokenizer = template
    questions = ["What is 2 + 2?", "And doubled?", "Thanks"]
    messages = [
        {"role": role, "content": text}
        for question, answer in zip(questions, answers, strict=True)
        for role, text in (("user", question), ("assistant", answer))
    ]
    example = tokenize_conversation(tokenizer, messages)
    spans = [tokenizer.decode(span) for span in trained_spans(example["labels"])]
    stripped = name == "llama3"  # that template trims contents
    assert spans == [(answer.strip() if stripped else answer) + TURN_END[name] for answer in answers]
    # Nothing else is trained: the prompt, user turns and the newline after an end-of-turn stay masked.
    assert sum(label != IGNORE_INDEX for label in example["labels"]) == sum(
        len(s) for s in trained_spans(example["labels"])
    )


def test_end_of_turn_token_is_trained_although_it_is_the_pad_token(tokenizer):
    assert tokenizer.pad_token_id == tokenizer.eos_token_id  # the trap this test is about
    messages = [{"role": "user", "content": "Ping"}, {"role": "assistant", "content": "Pong"}]
    labels = tokenize_conversation(tokenizer, messages)["labels"]
    assert trained_spans(labels)[-1][-1] == tokenizer.eos_token_id


def test_template_exceptions_become_template_errors(tokenizer):
    tokenizer = with_template(tokenizer, "gemma")  # its template refuses system turns
    messages = [
        {"role": "system", "content": "x"},
        {"role": "user", "content": "a"},
        {"role": "assistant", "content": "b"},
    ]
    with pytest.raises(TemplateError, match="System role not supported"):
        tokenize_conversation(tokenizer, messages)


def test_template_that_rewrites_history_is_refused(tokenizer):
    forgetful = copy.deepcopy(tokenizer)
    # Renders only the last two messages: earlier turns vanish once later ones follow.
    forgetful.chat_template = (
        "{% for m in messages[-2:] %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}"
        "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    )
    messages = [
        {"role": "user", "content": "a"},
        {"role": "assistant", "content": "b"},
        {"role": "user", "content": "c"},
        {"role": "assistant", "content": "d"},
    ]
    with pytest.raises(TemplateError, match="rewrites history"):
        tokenize_conversation(forgetful, messages)
