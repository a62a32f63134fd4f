"""Assistant-only label masks, checked against token spans built by hand, on real chat templates.

``tests/templates/`` holds the templates SmolLM3, Qwen2.5, Qwen3 and Llama 3.2 ship (see its README);
they run on the SmolLM2 tokenizer, given each template's special tokens.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest

from smolfactory.data.templates import TemplateError, render, tokenize_conversation
from smolfactory.model.loss import IGNORE_INDEX
from tests.conftest import trained_spans

TEMPLATES = Path(__file__).parent / "templates"

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
LLAMA_TOKENS = ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
# name -> (template, special tokens it needs beyond SmolLM2's, end-of-turn token)
TEMPLATE_SETUPS = {
    "smollm2": (None, [], "<|im_end|>"),
    "smollm3": ((TEMPLATES / "smollm3.jinja").read_text(), [], "<|im_end|>"),
    "qwen2.5": ((TEMPLATES / "qwen2_5.jinja").read_text(), [], "<|im_end|>"),
    "llama3.2": ((TEMPLATES / "llama3.jinja").read_text(), LLAMA_TOKENS, "<|eot_id|>"),
    "llama3-synthetic": (LLAMA3_TEMPLATE, LLAMA_TOKENS, "<|eot_id|>"),
    "gemma-synthetic": (GEMMA_TEMPLATE, ["<start_of_turn>", "<end_of_turn>"], "<end_of_turn>"),
}
TURN_END = {name: setup[2] for name, setup in TEMPLATE_SETUPS.items()}


def with_template(tokenizer, name: str):
    """A copy of the SmolLM2 tokenizer with another template and that template's special tokens."""
    template, tokens, _ = TEMPLATE_SETUPS[name]
    if template is None:
        return tokenizer
    variant = copy.deepcopy(tokenizer)
    if tokens:
        variant.add_special_tokens({"additional_special_tokens": tokens})
    if "llama3" in name:
        variant.bos_token = "<|begin_of_text|>"
    variant.chat_template = template
    return variant


@pytest.fixture(scope="module", params=list(TEMPLATE_SETUPS))
def template(request, tokenizer):
    """(name, tokenizer) for each template."""
    return request.param, with_template(tokenizer, request.param)


def encode(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def test_single_turn_matches_hand_built_rendering(tokenizer):
    messages = [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello! How can I help?"}]
    prompt = (
        f"<|im_start|>system\n{SMOLLM2_DEFAULT_SYSTEM}<|im_end|>\n"
        "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n"
    )
    answer = "Hello! How can I help?<|im_end|>"
    example = tokenize_conversation(tokenizer, messages)[0]

    prompt_ids, answer_ids, tail_ids = encode(tokenizer, prompt), encode(tokenizer, answer), encode(tokenizer, "\n")
    assert example["input_ids"] == prompt_ids + answer_ids + tail_ids
    assert example["labels"] == [IGNORE_INDEX] * len(prompt_ids) + answer_ids + [IGNORE_INDEX] * len(tail_ids)


def test_multi_turn_llama3_layout_matches_hand_built_ids(tokenizer):
    tokenizer = with_template(tokenizer, "llama3-synthetic")
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
    example = tokenize_conversation(tokenizer, messages)[0]
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
    example = tokenize_conversation(tokenizer, messages)[0]
    spans = [tokenizer.decode(span) for span in trained_spans(example["labels"])]
    stripped = name.startswith("llama3")  # those templates trim contents
    assert spans == [(answer.strip() if stripped else answer) + TURN_END[name] for answer in answers]
    # Nothing else is trained: the prompt, user turns and the newline after an end-of-turn stay masked.
    assert sum(label != IGNORE_INDEX for label in example["labels"]) == sum(
        len(s) for s in trained_spans(example["labels"])
    )


def test_end_of_turn_token_is_trained_although_it_is_the_pad_token(tokenizer):
    assert tokenizer.pad_token_id == tokenizer.eos_token_id  # the trap this test is about
    messages = [{"role": "user", "content": "Ping"}, {"role": "assistant", "content": "Pong"}]
    labels = tokenize_conversation(tokenizer, messages)[0]["labels"]
    assert trained_spans(labels)[-1][-1] == tokenizer.eos_token_id


def test_template_exceptions_become_template_errors(tokenizer):
    tokenizer = with_template(tokenizer, "gemma-synthetic")  # its template refuses system turns
    messages = [
        {"role": "system", "content": "x"},
        {"role": "user", "content": "a"},
        {"role": "assistant", "content": "b"},
    ]
    with pytest.raises(TemplateError, match="System role not supported"):
        tokenize_conversation(tokenizer, messages)[0]


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
        tokenize_conversation(forgetful, messages)[0]


TWO_TURNS = [
    {"role": "user", "content": "What is 2 + 2?"},
    {"role": "assistant", "content": "4."},
    {"role": "user", "content": "Doubled?"},
    {"role": "assistant", "content": "It is 8."},
]


@pytest.mark.parametrize("enable_thinking", [True, False])
def test_history_rewriting_template_gives_one_example_per_turn_as_generation_sees_it(tokenizer, enable_thinking):
    """Qwen3 drops an earlier turn's think block once a user turn follows: each turn becomes its own example."""
    qwen3 = copy.deepcopy(tokenizer)
    qwen3.chat_template = (TEMPLATES / "qwen3.jinja").read_text()
    kwargs = {"enable_thinking": enable_thinking}
    examples = tokenize_conversation(qwen3, TWO_TURNS, template_kwargs=kwargs)
    assert len(examples) == 2
    for example, turn in zip(examples, (1, 3), strict=True):
        spans = trained_spans(example["labels"])
        assert len(spans) == 1  # only this example's own turn is trained
        prompt = render(qwen3, TWO_TURNS[:turn], add_generation_prompt=True, template_kwargs=kwargs)
        # The untrained part is exactly the prompt generation would see; the trained part ends the turn.
        assert qwen3.decode(example["input_ids"][: -len(spans[0]) - 1]) == prompt
        assert qwen3.decode(spans[0]).endswith(TWO_TURNS[turn]["content"] + "<|im_end|>")
        # With thinking on, the generation prompt stops before the empty think block, so the model learns it.
        assert qwen3.decode(spans[0]).startswith("<think>") == enable_thinking


def test_train_on_last_assistant_and_all(tokenizer):
    last = tokenize_conversation(tokenizer, TWO_TURNS, train_on="last_assistant")[0]
    every = tokenize_conversation(tokenizer, TWO_TURNS, train_on="all")[0]
    assistant = tokenize_conversation(tokenizer, TWO_TURNS)[0]
    assert [tokenizer.decode(span) for span in trained_spans(last["labels"])] == ["It is 8.<|im_end|>"]
    assert last["input_ids"] == assistant["input_ids"] == every["input_ids"]
    assert every["labels"] == every["input_ids"]
