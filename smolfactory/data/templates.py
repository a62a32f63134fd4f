"""Render conversations with a chat template and mark the tokens the model is trained on.

Most chat templates (SmolLM2, Qwen2.5, Llama 3) have no ``{% generation %}`` markers, so assistant spans
are found by rendering: the conversation up to an assistant turn, with the generation prompt, must be a
prefix of the whole rendering, and the turn runs from there to the rendering that includes it. The
trained span of a turn is its content plus the end-of-turn token (the first special token after the
content), and nothing after it: the newline some templates add after the end-of-turn token is not
something the model should learn to emit.

The text is tokenized segment by segment (prompt, answer, prompt, ...), exactly as generation sees it:
the prompt ends where the generation prompt ends, so no token straddles a prompt and its answer, and
no offsets mapping is needed. Masks never come from the pad id: SmolLM2's pad token *is* its
end-of-turn token, and masking by pad id would hide every end-of-turn from the loss.
"""

from __future__ import annotations

import jinja2
from transformers import PreTrainedTokenizerBase

from smolfactory.errors import first_line
from smolfactory.model.loss import IGNORE_INDEX

Message = dict[str, str]


class TemplateError(ValueError):
    """The chat template cannot render a conversation, or renders it in a way the masks cannot follow."""


def render(tokenizer: PreTrainedTokenizerBase, messages: list[Message], add_generation_prompt: bool) -> str:
    """The chat template's text for ``messages``; template failures become a ``TemplateError``."""
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    except (jinja2.TemplateError, ValueError) as error:
        raise TemplateError(f"the chat template refused the conversation: {first_line(error)}") from error


def assistant_char_spans(
    tokenizer: PreTrainedTokenizerBase, messages: list[Message]
) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the ``[start, end)`` character span of every assistant turn."""
    text = render(tokenizer, messages, add_generation_prompt=False)
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
        start = len(prompt)
        spans.append((start, start + _trained_length(tokenizer, text[start : len(through_turn)], message["content"])))
    return text, spans


def _trained_length(tokenizer: PreTrainedTokenizerBase, turn_text: str, content: str) -> int:
    """Characters of an assistant turn's text to train: through the first special token after the content."""
    content = content.strip()  # templates may trim it
    content_at = turn_text.find(content)
    search_from = content_at + len(content) if content_at >= 0 else 0
    ends = [
        position + len(token)
        for token in tokenizer.all_special_tokens
        if (position := turn_text.find(token, search_from)) >= 0
    ]
    return min(ends) if ends else len(turn_text.rstrip())


def tokenize_conversation(tokenizer: PreTrainedTokenizerBase, messages: list[Message]) -> dict[str, list[int]]:
    """Token ids of the rendered conversation and labels that are ``-100`` outside assistant spans.

    Labels are not shifted: the loss shifts them.
    """
    text, spans = assistant_char_spans(tokenizer, messages)
    input_ids: list[int] = []
    labels: list[int] = []
    position = 0
    for start, end in [*spans, (len(text), len(text))]:
        for segment, trained in ((text[position:start], False), (text[start:end], True)):
            # The template writes any BOS itself; letting the tokenizer add one would double it.
            ids = tokenizer(segment, add_special_tokens=False)["input_ids"] if segment else []
            input_ids += ids
            labels += ids if trained else [IGNORE_INDEX] * len(ids)
        position = end
    return {"input_ids": input_ids, "labels": labels}
