"""Assistant-only label masks, checked against spans computed by hand from SmolLM2's template."""

from __future__ import annotations

import pytest

from smolfactory.data.templates import TemplateError, tokenize_conversation
from smolfactory.model.loss import IGNORE_INDEX

DEFAULT_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"


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
    messages = [
        {"role": "user", "content": "Hi there"},
        {"role": "assistant", "content": "Hello! How can I help?"},
    ]
    prompt = (
        f"<|im_start|>system\n{DEFAULT_SYSTEM}<|im_end|>\n<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n"
    )
    answer = "Hello! How can I help?<|im_end|>"
    tail = "\n"
    example = tokenize_conversation(tokenizer, messages)

    prompt_ids, answer_ids, tail_ids = (
        encode(tokenizer, prompt),
        encode(tokenizer, answer),
        encode(tokenizer, tail),
    )
    assert example["input_ids"] == prompt_ids + answer_ids + tail_ids
    expected = [IGNORE_INDEX] * len(prompt_ids) + answer_ids + [IGNORE_INDEX] * len(tail_ids)
    assert example["labels"] == expected


def test_end_of_turn_token_is_trained_although_it_is_the_pad_token(tokenizer):
    assert tokenizer.pad_token_id == tokenizer.eos_token_id  # the trap this test is about
    messages = [{"role": "user", "content": "Ping"}, {"role": "assistant", "content": "Pong"}]
    labels = tokenize_conversation(tokenizer, messages)["labels"]
    assert trained_spans(labels)[-1][-1] == tokenizer.eos_token_id


def test_every_assistant_turn_of_a_multi_turn_conversation_is_trained(tokenizer):
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is 2 + 2?"},
        {"role": "assistant", "content": "4."},
        {"role": "user", "content": "And doubled?"},
        {"role": "assistant", "content": "It is 8, since 4 times 2 is 8."},
        {"role": "user", "content": "Thanks"},
        {"role": "assistant", "content": "You're welcome!"},
    ]
    example = tokenize_conversation(tokenizer, messages)
    spans = [tokenizer.decode(span) for span in trained_spans(example["labels"])]
    assistant_texts = [m["content"] for m in messages if m["role"] == "assistant"]
    assert spans == [text + tokenizer.eos_token for text in assistant_texts]
    # Labels, where set, are the input ids themselves (unshifted).
    for token, label in zip(example["input_ids"], example["labels"], strict=True):
        assert label in (IGNORE_INDEX, token)


def test_template_that_rewrites_history_is_refused(tokenizer):
    class ForgetfulTokenizer:
        """Renders only the last two messages: earlier turns vanish once later ones follow."""

        eos_token = tokenizer.eos_token

        def apply_chat_template(self, messages, tokenize, add_generation_prompt):
            kept = messages[-2:]
            text = "".join(f"<{m['role']}>{m['content']}{self.eos_token}" for m in kept)
            return text + ("<assistant>" if add_generation_prompt else "")

    messages = [
        {"role": "user", "content": "a"},
        {"role": "assistant", "content": "b"},
        {"role": "user", "content": "c"},
        {"role": "assistant", "content": "d"},
    ]
    with pytest.raises(TemplateError, match="rewrites history"):
        tokenize_conversation(ForgetfulTokenizer(), messages)
