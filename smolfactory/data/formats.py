"""Dataset rows to conversations: the ``messages`` layout (OpenAI-style role/content lists)."""

from __future__ import annotations

from typing import Any

ROLES = ("system", "user", "assistant")


class RowError(ValueError):
    """A dataset row that cannot be turned into a trainable conversation."""


def row_to_messages(row: dict[str, Any], column: str = "messages") -> list[dict[str, str]]:
    """Validate a row's conversation and return it as ``[{"role": ..., "content": ...}, ...]``."""
    messages = row.get(column)
    if not isinstance(messages, list) or not messages:
        raise RowError(f"'{column}' must be a non-empty list of {{role, content}} messages")
    conversation = []
    for turn, message in enumerate(messages):
        if not isinstance(message, dict):
            raise RowError(f"message {turn} is not a {{role, content}} object")
        role, content = message.get("role"), message.get("content")
        if role not in ROLES:
            raise RowError(f"message {turn} has role {role!r}; expected one of {', '.join(ROLES)}")
        if not isinstance(content, str):
            raise RowError(f"message {turn} has non-string content ({type(content).__name__})")
        if role == "assistant" and not content.strip():
            raise RowError(f"message {turn} is an empty assistant turn")
        conversation.append({"role": role, "content": content})
    if not any(m["role"] == "assistant" for m in conversation):
        raise RowError("the conversation has no assistant turn to train on")
    first = next(m for m in conversation if m["role"] != "system")
    if first["role"] != "user":
        raise RowError("the conversation starts with an assistant turn; it must open with a user turn")
    return conversation
