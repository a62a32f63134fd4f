"""Render examples with a chat template and mark the tokens the model is trained on.

Most chat templates (SmolLM2, Qwen2.5, Llama 3) have no ``{% generation %}`` markers, so assistant spans
are found by rendering: the conversation up to an assistant turn, with the generation prompt, must be a
prefix of the whole rendering, and the turn runs from there to the rendering that includes it. The
trained span of a turn is its content plus the end-of-turn token (the first special token after the
content), and nothing after it: the newline some templates add after the end-of-turn token is not
something the model should learn to emit.

Some templates rewrite history (SmolLM3 and Qwen3 drop the reasoning of earlier turns once a later user
turn follows), so an earlier turn is rendered differently in the whole conversation than when the model
wrote it. Then each assistant turn becomes its own example, rendered exactly as at generation time.

The text is tokenized segment by segment (prompt, answer, prompt, ...), exactly as generation sees it:
the prompt ends where the generation prompt ends, so no token straddles a prompt and its answer, and
no offsets mapping is needed. Masks never come from the pad id: SmolLM2's pad token *is* its
end-of-turn token, and masking by pad id would hide every end-of-turn from the loss.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import jinja2
from transformers import PreTrainedTokenizerBase

from smolfactory.data.formats import Example
from smolfactory.errors import SmolFactoryError, first_line
from smolfactory.model.loss import IGNORE_INDEX

Message = dict[str, str]
TrainOn = Literal["assistant", "last_assistant", "all"]

# For base models without a template. A base model's vocabulary has no <|im_start|>/<|im_end|> tokens, so
# they are learned as text; the end-of-turn text is trained like any end-of-turn token.
BUILTIN_TEMPLATES = {
    "chatml": (
        "{% for message in messages %}"
        "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    ),
}


class TemplateError(ValueError):
    """The chat template cannot render a conversation, or renders it in a way the masks cannot follow."""


class HistoryRewritten(TemplateError):
    """The template renders an earlier turn differently once later turns follow."""


def resolve_chat_template(value: str) -> str:
    """A chat template from a built-in name (``chatml``), a ``.jinja`` file, or an inline Jinja string."""
    if value in BUILTIN_TEMPLATES:
        return BUILTIN_TEMPLATES[value]
    if "{{" in value or "{%" in value:
        return value
    path = Path(value).expanduser()
    if path.is_file():
        return path.read_text()
    raise SmolFactoryError(
        f"data.chat_template '{value}' is neither a built-in template ({', '.join(BUILTIN_TEMPLATES)}), "
        "a Jinja file that exists, nor a Jinja string"
    )


def render(
    tokenizer: PreTrainedTokenizerBase,
    messages: list[Message],
    add_generation_prompt: bool,
    template_kwargs: dict[str, Any] | None = None,
) -> str:
    """The chat template's text for ``messages``; template failures become a ``TemplateError``."""
    try:
        return tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=add_generation_prompt, **(template_kwargs or {})
        )
    except (jinja2.TemplateError, ValueError) as error:
        raise TemplateError(f"the chat template refused the conversation: {first_line(error)}") from error


def assistant_char_spans(
    tokenizer: PreTrainedTokenizerBase,
    messages: list[Message],
    turns: list[int],
    template_kwargs: dict[str, Any] | None = None,
) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the ``[start, end)`` character span of each assistant turn in ``turns``.

    Raises ``HistoryRewritten`` when a turn's prefix renders differently inside the whole conversation.
    """
    text = render(tokenizer, messages, False, template_kwargs)
    spans = []
    for index in turns:
        prompt = render(tokenizer, messages[:index], True, template_kwargs)
        last = index == len(messages) - 1  # then the rendering through the turn is the whole text
        through_turn = text if last else render(tokenizer, messages[: index + 1], False, template_kwargs)
        if not (through_turn.startswith(prompt) and text.startswith(through_turn)):
            raise HistoryRewritten(
                f"the chat template renders turn {index} differently once later turns follow (it rewrites history)"
            )
        start = len(prompt)
        turn_text = through_turn[start:]
        spans.append((start, start + _trained_length(tokenizer, turn_text, messages[index]["content"])))
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


def tokenize_example(
    tokenizer: PreTrainedTokenizerBase,
    example: Example,
    train_on: TrainOn = "assistant",
    template_kwargs: dict[str, Any] | None = None,
) -> list[dict[str, list[int]]]:
    """Token ids and labels (``-100`` where nothing is trained) of one example; labels are not shifted.

    Usually one sequence; several when the chat template rewrites history (one per trained turn).
    """
    if example.messages is None:
        return [tokenize_text(tokenizer, example.prompt, example.text, train_on)]
    return tokenize_conversation(tokenizer, example.messages, train_on, template_kwargs)


def tokenize_text(tokenizer: PreTrainedTokenizerBase, prompt: str, text: str, train_on: TrainOn) -> dict:
    """Plain text: ``prompt`` (untrained unless ``train_on='all'``), then ``text`` and the EOS token, trained."""
    prompt_ids = tokenizer(prompt, add_special_tokens=True)["input_ids"]  # BOS where the tokenizer uses one
    text_ids = tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    prompt_labels = prompt_ids if train_on == "all" else [IGNORE_INDEX] * len(prompt_ids)
    return {"input_ids": prompt_ids + text_ids, "labels": prompt_labels + text_ids}


def tokenize_conversation(
    tokenizer: PreTrainedTokenizerBase,
    messages: list[Message],
    train_on: TrainOn = "assistant",
    template_kwargs: dict[str, Any] | None = None,
) -> list[dict[str, list[int]]]:
    """Tokenize a conversation, training its assistant turns (``assistant``), the last one, or ``all`` tokens."""
    if train_on == "all":
        text = render(tokenizer, messages, False, template_kwargs)
        return [_tokenize_spans(tokenizer, text, [(0, len(text))])]
    assistant = [index for index, message in enumerate(messages) if message["role"] == "assistant"]
    turns = assistant[-1:] if train_on == "last_assistant" else assistant
    try:
        rendered = [assistant_char_spans(tokenizer, messages, turns, template_kwargs)]
    except HistoryRewritten:  # each turn on its own, with the history the model saw when it wrote it
        rendered = [assistant_char_spans(tokenizer, messages[: index + 1], [index], template_kwargs) for index in turns]
    return [_tokenize_spans(tokenizer, text, spans) for text, spans in rendered]


def tokenize_turns(
    tokenizer: PreTrainedTokenizerBase,
    messages: list[Message],
    turns: list[int],
    template_kwargs: dict[str, Any] | None = None,
) -> dict[str, list[int]]:
    """Token ids and labels of a conversation in which only the assistant turns listed in ``turns`` are trained."""
    return _tokenize_spans(tokenizer, *assistant_char_spans(tokenizer, messages, turns, template_kwargs))


def _tokenize_spans(tokenizer: PreTrainedTokenizerBase, text: str, spans: list[tuple[int, int]]) -> dict:
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
