"""Dataset rows to conversations or raw text, one function per dataset layout.

Every chat layout becomes a list of ``{"role", "content"}`` messages (roles system, user, assistant and
tool), validated once in ``check_conversation``. Two layouts are not chats: ``text`` (continued
pre-training, every token trained) and ``prompt_completion`` with string fields (plain text, the
completion trained), which TRL also tokenizes without a chat template.

The column each layout reads can be renamed: ``columns={"instruction": "question"}`` reads the
``instruction`` field from a ``question`` column.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

Format = Literal["auto", "messages", "sharegpt", "alpaca", "prompt_completion", "text"]
ROLES = ("system", "user", "assistant", "tool")
SHAREGPT_ROLES = {
    "system": "system",
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "function_call": "assistant",  # a tool call is something the model writes: trained
    "observation": "tool",  # a tool's answer is something the model reads: not trained
    "tool": "tool",
}
# The columns each layout reads, by their default names; `auto` picks the first layout whose required
# columns are all present.
REQUIRED_COLUMNS = {
    "messages": ("messages",),
    "sharegpt": ("conversations",),
    "alpaca": ("instruction", "output"),
    "prompt_completion": ("prompt", "completion"),
    "text": ("text",),
}


# Every field each layout reads: the keys data.columns may rename.
LAYOUT_FIELDS = {
    "messages": ("messages",),
    "sharegpt": ("conversations", "system"),
    "alpaca": ("instruction", "input", "output", "system", "history"),
    "prompt_completion": ("prompt", "completion"),
    "text": ("text",),
}


class RowError(ValueError):
    """A dataset row that cannot be turned into a trainable example."""


@dataclass(frozen=True)
class Example:
    """One row in a form the tokenizer understands: a conversation, or text with an untrained prefix."""

    messages: list[dict[str, str]] | None = None
    prompt: str = ""  # plain-text layouts: untrained prefix
    text: str = ""  # plain-text layouts: trained text


def detect_format(
    column_names: list[str], columns: dict[str, str], required_columns: dict[str, tuple[str, ...]] = REQUIRED_COLUMNS
) -> str:
    """The layout whose columns (after renaming) the dataset has, or a RowError naming the choices."""
    present = set(column_names)
    for name, required in required_columns.items():
        if all(columns.get(field, field) in present for field in required):
            return name
    layouts = "; ".join(f"{name}: {', '.join(required)}" for name, required in required_columns.items())
    raise RowError(
        f"cannot tell the dataset's format from its columns {column_names} (expected {layouts}); "
        "set data.format, or map your column names with data.columns"
    )


def check_columns(
    format: str, columns: dict[str, str], layout_fields: dict[str, tuple[str, ...]] = LAYOUT_FIELDS
) -> None:
    """A RowError when ``columns`` renames a field that the layout does not read (a typo, usually)."""
    unknown = sorted(set(columns) - set(layout_fields[format]))
    if unknown:
        raise RowError(
            f"data.columns renames {', '.join(unknown)}, which the {format} layout does not read "
            f"(it reads {', '.join(layout_fields[format])}); keys are layout fields, values your column names"
        )


def row_to_example(
    row: dict[str, Any], format: str, columns: dict[str, str] | None = None, system_prompt: str | None = None
) -> Example:
    """Turn one row into an ``Example``, adding ``system_prompt`` to conversations that have no system turn."""
    example = ROW_READERS[format](field_reader(row, columns or {}))
    if example.messages is None:
        return example
    messages = example.messages
    if system_prompt and messages[0]["role"] != "system":
        messages = [{"role": "system", "content": system_prompt}, *messages]
    return Example(messages=check_conversation(messages))


def field_reader(row: dict[str, Any], columns: dict[str, str]) -> Callable[..., Any]:
    """``field(name, required=True)``: the value of layout field ``name`` in ``row``, read from its renamed column."""

    def field(name: str, required: bool = True) -> Any:
        value = row.get(columns.get(name, name))
        if required and value is None:
            raise RowError(f"missing field '{columns.get(name, name)}'")
        return value

    return field


def _messages(field: Callable) -> Example:
    return Example(messages=_message_list(field("messages"), "role", "content"))


def _sharegpt(field: Callable) -> Example:
    turns = field("conversations")
    if not isinstance(turns, list):
        raise RowError("'conversations' must be a list of {from, value} turns")
    messages = []
    for turn, message in enumerate(turns):
        if not isinstance(message, dict):
            raise RowError(f"turn {turn} is not a {{from, value}} object")
        speaker = message.get("from")
        if speaker not in SHAREGPT_ROLES:
            raise RowError(f"turn {turn} is from {speaker!r}; expected one of {', '.join(SHAREGPT_ROLES)}")
        messages.append({"role": SHAREGPT_ROLES[speaker], "content": message.get("value")})
    system = field("system", required=False)
    if system and (not messages or messages[0]["role"] != "system"):
        messages.insert(0, {"role": "system", "content": system})
    return Example(messages=messages)


def _alpaca(field: Callable) -> Example:
    instruction, extra = field("instruction"), field("input", required=False)
    if not isinstance(instruction, str) or not (extra is None or isinstance(extra, str)):
        raise RowError("'instruction' and 'input' must be strings")
    prompt = f"{instruction}\n\n{extra}" if extra and extra.strip() else instruction
    messages = []
    if system := field("system", required=False):
        messages.append({"role": "system", "content": system})
    for pair in field("history", required=False) or []:
        if not (isinstance(pair, list | tuple) and len(pair) == 2):
            raise RowError("'history' must be a list of [instruction, response] pairs")
        messages += [{"role": "user", "content": pair[0]}, {"role": "assistant", "content": pair[1]}]
    messages += [{"role": "user", "content": prompt}, {"role": "assistant", "content": field("output")}]
    return Example(messages=messages)


def _prompt_completion(field: Callable) -> Example:
    prompt, completion = field("prompt"), field("completion")
    if isinstance(prompt, str) and isinstance(completion, str):
        if not completion.strip():
            raise RowError("'completion' is empty")
        return Example(prompt=prompt, text=completion)
    if isinstance(prompt, str):  # a string prompt before a conversational completion: one user turn
        prompt = [{"role": "user", "content": prompt}]
    if not (isinstance(prompt, list) and isinstance(completion, list)):
        raise RowError("'prompt' and 'completion' must both be strings or both be lists of messages")
    return Example(messages=_message_list(prompt + completion, "role", "content"))


def _text(field: Callable) -> Example:
    text = field("text")
    if not isinstance(text, str) or not text.strip():
        raise RowError("'text' must be a non-empty string")
    return Example(text=text)


ROW_READERS: dict[str, Callable[[Callable], Example]] = {
    "messages": _messages,
    "sharegpt": _sharegpt,
    "alpaca": _alpaca,
    "prompt_completion": _prompt_completion,
    "text": _text,
}


def _message_list(messages: Any, role_key: str, content_key: str) -> list[dict[str, Any]]:
    if not isinstance(messages, list):
        raise RowError(f"expected a list of {{{role_key}, {content_key}}} messages")
    converted = []
    for turn, message in enumerate(messages):
        if not isinstance(message, dict):
            raise RowError(f"message {turn} is not a {{{role_key}, {content_key}}} object")
        converted.append({"role": message.get(role_key), "content": message.get(content_key)})
    return converted


def check_conversation(messages: list[dict[str, Any]]) -> list[dict[str, str]]:
    """Check roles and contents; the conversation must open with a user turn and train at least one answer."""
    if not messages:
        raise RowError("the conversation is empty")
    for turn, message in enumerate(messages):
        role, content = message["role"], message["content"]
        if role not in ROLES:
            raise RowError(f"message {turn} has role {role!r}; expected one of {', '.join(ROLES)}")
        if not isinstance(content, str):
            raise RowError(f"message {turn} has non-string content ({type(content).__name__})")
        if role == "assistant" and not content.strip():
            raise RowError(f"message {turn} is an empty assistant turn")
    if not any(m["role"] == "assistant" for m in messages):
        raise RowError("the conversation has no assistant turn to train on")
    first = next(m for m in messages if m["role"] != "system")
    if first["role"] != "user":
        raise RowError(f"the conversation must open with a user turn, not with role {first['role']!r}")
    return [{"role": m["role"], "content": m["content"]} for m in messages]
