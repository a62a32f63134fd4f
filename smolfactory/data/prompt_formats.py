"""Prompt rows (online RL: GRPO) to the prompt the model answers and the columns its reward functions read.

Four layouts, named after their columns:

- ``messages`` (and ``sharegpt``, its ``{from, value}`` cousin): a conversation, cut after its last user turn; the
  model answers that turn. The content of a dropped final assistant turn goes to the rewards as column ``answer``
  when the row has no (non-null) ``answer`` of its own;
- ``prompt``: TRL's prompt-only layout, a ``prompt`` that is a string (one user turn) or a list of messages;
- ``alpaca``: ``instruction`` and an optional ``input`` as one user turn (``system`` as a system turn); ``output``
  is not part of the prompt and reaches the rewards like any other column.

Every column the prompt is not read from reaches the rewards unchanged (TRL passes all of a row's columns but the
prompt as keyword arguments). The rewards see the prompt as TRL's do: the messages (system turn included) for a
conversational row (``messages``, ``sharegpt``, a message-list ``prompt``), the text for a text ``prompt`` and for
``alpaca``. Every prompt is rendered with the chat template, up to its generation prompt.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal, NamedTuple

from smolfactory.data.formats import ROLES, ROW_READERS, RowError, field_reader
from smolfactory.data.sources import UNREADABLE

PromptFormat = Literal["auto", "messages", "sharegpt", "prompt", "alpaca"]
# The columns each layout needs, by their default names; `auto` picks the first layout whose columns are present.
REQUIRED_COLUMNS = {
    "messages": ("messages",),
    "sharegpt": ("conversations",),
    "prompt": ("prompt",),
    "alpaca": ("instruction",),
}
# Every field each layout reads the prompt from: the keys data.columns may rename, and the columns the rewards
# do not get (all others they do).
LAYOUT_FIELDS = {
    "messages": ("messages",),
    "sharegpt": ("conversations", "system"),
    "prompt": ("prompt",),
    "alpaca": ("instruction", "input", "system"),
}
Message = dict[str, str]


class PromptRow(NamedTuple):
    """One row as a prompt: what the chat template renders, what the rewards see, and the rewards' columns."""

    messages: list[Message]
    """The prompt as chat messages, system turn included, ending with the user turn to answer."""
    shown: str | list[Message]
    """The prompt as the reward functions see it: the messages of a conversational row, else the text."""
    columns: dict[str, Any]
    """Every other column of the row, by the dataset's own column names."""


def row_to_prompt(
    row: dict[str, Any], format: str, columns: dict[str, str] | None = None, system_prompt: str | None = None
) -> PromptRow:
    """Turn one row into a checked ``PromptRow``, adding ``system_prompt`` to prompts that have no system turn."""
    columns = columns or {}
    messages, text, answer = PROMPT_READERS[format](field_reader(row, columns))
    if system_prompt and messages[0]["role"] != "system":
        messages = [{"role": "system", "content": system_prompt}, *messages]
    check_prompt(messages)
    read = {columns.get(name, name) for name in LAYOUT_FIELDS[format]} | {UNREADABLE}
    rest = {name: value for name, value in row.items() if name not in read}
    if answer is not None and rest.get("answer") is None:  # the data's own answer column wins
        rest["answer"] = answer
    return PromptRow(messages, messages if text is None else text, rest)


def check_prompt(messages: list[Message]) -> None:
    """Check roles and contents; the prompt opens (after any system turn) and ends with a user turn."""
    if not messages or all(message["role"] == "system" for message in messages):
        raise RowError("the prompt has no user turn")
    for turn, message in enumerate(messages):
        if message["role"] not in ROLES:
            raise RowError(f"message {turn} has role {message['role']!r}; expected one of {', '.join(ROLES)}")
        if not isinstance(message["content"], str):
            raise RowError(f"message {turn} has non-string content ({type(message['content']).__name__})")
    first = next(message for message in messages if message["role"] != "system")
    if first["role"] != "user":
        raise RowError(f"the prompt must open with a user turn, not with role {first['role']!r}")
    if messages[-1]["role"] != "user":
        raise RowError(f"the prompt must end with a user turn, not with role {messages[-1]['role']!r}")


# A reader gives (messages to render, the text the rewards see or None for a conversational row, a dropped answer).
Read = tuple[list[Message], str | None, str | None]


def _conversation(layout: str) -> Callable[[Callable], Read]:
    """A reader of ``layout`` (messages, sharegpt): the conversation through its last user turn."""

    def read(field: Callable) -> Read:
        messages = ROW_READERS[layout](field).messages
        users = [index for index, message in enumerate(messages) if message.get("role") == "user"]
        if not users:
            raise RowError("the conversation has no user turn to answer")
        later = messages[users[-1] + 1 :]
        answer = later[-1]["content"] if later and later[-1]["role"] == "assistant" else None
        return messages[: users[-1] + 1], None, answer

    return read


def _prompt(field: Callable) -> Read:
    prompt = field("prompt")
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}], prompt, None
    if not isinstance(prompt, list) or not all(isinstance(message, dict) for message in prompt):
        raise RowError("'prompt' must be a string or a list of {role, content} messages")
    return [{"role": message.get("role"), "content": message.get("content")} for message in prompt], None, None


def _alpaca(field: Callable) -> Read:
    instruction, extra = field("instruction"), field("input", required=False)
    if not isinstance(instruction, str) or not (extra is None or isinstance(extra, str)):
        raise RowError("'instruction' and 'input' must be strings")
    text = f"{instruction}\n\n{extra}" if extra and extra.strip() else instruction
    system = field("system", required=False)
    messages = [{"role": "system", "content": system}] if system else []
    return [*messages, {"role": "user", "content": text}], text, None


PROMPT_READERS: dict[str, Callable[[Callable], Read]] = {
    "messages": _conversation("messages"),
    "sharegpt": _conversation("sharegpt"),
    "prompt": _prompt,
    "alpaca": _alpaca,
}
