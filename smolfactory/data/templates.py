"""Render conversations with a chat template and mark the tokens the model is trained on.

Most chat templates (SmolLM2, SmolLM3, Qwen2.5, Llama 3) have no ``{% generation %}`` markers, so the
assistant spans are found by rendering: the text of the conversation up to an assistant turn, with the
generation prompt, must be a prefix of the whole rendering; the turn's text then runs to the next prefix.
The trained span of a turn is its content plus the end-of-turn token, and nothing after it (the newline a
template adds after the end-of-turn token is not something the model should learn to emit).

Masks are built from character spans and the tokenizer's offsets, never from the pad id: SmolLM2's pad
token *is* its end-of-turn token, and masking by pad id would hide every end-of-turn from the loss.
"""

from __future__ import annotations

from transformers import PreTrainedTokenizerBase

from smolfactory.model.loss import IGNORE_INDEX

Message = dict[str, str]


class TemplateError(ValueError):
    """The chat template renders a conversation in a way the masks cannot follow."""


def render(tokenizer: PreTrainedTokenizerBase, messages: list[Message], add_generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def assistant_char_spans(
    tokenizer: PreTrainedTokenizerBase, messages: list[Message]
) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the ``[start, end)`` character span of every assistant turn."""
    text = render(tokenizer, messages, add_generation_prompt=False)
    end_of_turn = tokenizer.eos_token
    spans = []
    for index, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = render(tokenizer, messages[:index], add_generation_prompt=True)
        through_turn = render(tokenizer, messages[: index + 1], add_generation_prompt=False)
        if not (text.startswith(prompt) and text.startswith(through_turn)):
            raise TemplateError(
                f"the chat template renders turn {index} differently once later turns follow "
                "(it rewrites history), so its assistant span cannot be located"
            )
        start, end = len(prompt), len(through_turn)
        turn_text = text[start:end]
        if end_of_turn and end_of_turn in turn_text:
            end = start + turn_text.rindex(end_of_turn) + len(end_of_turn)
        spans.append((start, end))
    return text, spans


def tokenize_conversation(tokenizer: PreTrainedTokenizerBase, messages: list[Message]) -> dict[str, list[int]]:
    """Token ids of the rendered conversation and labels that are ``-100`` outside assistant spans.

    Labels are not shifted: the loss shifts them.
    """
    text, spans = assistant_char_spans(tokenizer, messages)
    # The template writes any BOS itself; letting the tokenizer add one would double it.
    encoding = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    input_ids = encoding["input_ids"]
    labels = [IGNORE_INDEX] * len(input_ids)
    span_index = 0
    for position, (token_start, token_end) in enumerate(encoding["offset_mapping"]):
        while span_index < len(spans) and token_start >= spans[span_index][1]:
            span_index += 1
        if span_index == len(spans):
            break
        span_start, span_end = spans[span_index]
        if span_start <= token_start < span_end and token_end > token_start:
            labels[position] = input_ids[position]
    return {"input_ids": input_ids, "labels": labels}
