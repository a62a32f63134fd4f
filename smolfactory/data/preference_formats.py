"""Preference rows to (prompt, chosen, rejected) conversations, one function per dataset layout.

Three layouts, named after their columns:

- ``prompt_chosen_rejected``: ``prompt`` (a string or a message list) with ``chosen`` and ``rejected`` answers
  (strings or message lists), as TRL's preference datasets with an explicit prompt;
- ``sharegpt``: ``conversations`` of ``{from, value}`` turns with ``chosen`` and ``rejected`` turns (LLaMA-Factory);
- ``chosen_rejected``: ``chosen`` and ``rejected`` whole conversations that share their opening turns, the
  prompt (TRL's implicit prompt, as in Anthropic HH or UltraFeedback binarized).

A string prompt is one user turn and a string answer one assistant turn: everything is rendered with the
chat template, as the model sees it when it answers.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal, NamedTuple

from smolfactory.data.formats import SHAREGPT_ROLES, RowError, check_conversation, field_reader

PreferenceFormat = Literal["auto", "prompt_chosen_rejected", "sharegpt", "chosen_rejected"]
# The columns each layout needs, by their default names; `auto` picks the first layout whose columns are present.
REQUIRED_COLUMNS = {
    "prompt_chosen_rejected": ("prompt", "chosen", "rejected"),
    "sharegpt": ("conversations", "chosen", "rejected"),
    "chosen_rejected": ("chosen", "rejected"),
}
# Every field each layout reads: the keys data.columns may rename.
LAYOUT_FIELDS = {
    "prompt_chosen_rejected": ("prompt", "chosen", "rejected"),
    "sharegpt": ("conversations", "chosen", "rejected", "system"),
    "chosen_rejected": ("chosen", "rejected"),
}
Message = dict[str, str]


class PreferencePair(NamedTuple):
    """A prompt and two answers to it, as chat messages."""

    prompt: list[Message]
    chosen: list[Message]
    rejected: list[Message]


def row_to_pair(
    row: dict[str, Any], format: str, columns: dict[str, str] | None = None, system_prompt: str | None = None
) -> PreferencePair:
    """Turn one row into a checked ``PreferencePair``, adding ``system_prompt`` to prompts that have no system turn."""
    prompt, chosen, rejected = PAIR_READERS[format](field_reader(row, columns or {}))
    if system_prompt and (not prompt or prompt[0]["role"] != "system"):
        prompt = [{"role": "system", "content": system_prompt}, *prompt]
    for name, answer in (("chosen", chosen), ("rejected", rejected)):
        if not any(message["role"] == "assistant" for message in answer):
            raise RowError(f"the {name} answer has no assistant turn")
        check_conversation(prompt + answer)
    if chosen == rejected:
        raise RowError("the chosen and rejected answers are the same")
    return PreferencePair(prompt, chosen, rejected)


def _prompt_chosen_rejected(field: Callable) -> PreferencePair:
    prompt = field("prompt")
    prompt = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else _messages(prompt, "prompt")
    return PreferencePair(prompt, _answer(field("chosen"), "chosen"), _answer(field("rejected"), "rejected"))


def _sharegpt(field: Callable) -> PreferencePair:
    turns = field("conversations")
    if not isinstance(turns, list):
        raise RowError("'conversations' must be a list of {from, value} turns")
    prompt = [_sharegpt_turn(turn, f"turn {index}") for index, turn in enumerate(turns)]
    system = field("system", required=False)
    if system and (not prompt or prompt[0]["role"] != "system"):
        prompt.insert(0, {"role": "system", "content": system})
    answers = []
    for name in ("chosen", "rejected"):
        answer = field(name)
        if isinstance(answer, str):
            answers.append([{"role": "assistant", "content": answer}])
        else:
            turns = answer if isinstance(answer, list) else [answer]
            answers.append([_sharegpt_turn(turn, f"the {name} turn") for turn in turns])
    return PreferencePair(prompt, *answers)


def _chosen_rejected(field: Callable) -> PreferencePair:
    chosen, rejected = _messages(field("chosen"), "chosen"), _messages(field("rejected"), "rejected")
    shared = 0
    while shared < min(len(chosen), len(rejected)) and chosen[shared] == rejected[shared]:
        shared += 1
    # The answers start at the first assistant turn where the two conversations part.
    while shared > 0 and chosen[shared - 1]["role"] == "assistant":
        shared -= 1
    if shared == 0:
        raise RowError("'chosen' and 'rejected' share no opening turns to use as the prompt")
    return PreferencePair(chosen[:shared], chosen[shared:], rejected[shared:])


PAIR_READERS: dict[str, Callable[[Callable], PreferencePair]] = {
    "prompt_chosen_rejected": _prompt_chosen_rejected,
    "sharegpt": _sharegpt,
    "chosen_rejected": _chosen_rejected,
}


def _answer(value: Any, name: str) -> list[Message]:
    """A string answer is one assistant turn; a message list is taken as it is."""
    return [{"role": "assistant", "content": value}] if isinstance(value, str) else _messages(value, name)


def _messages(value: Any, name: str) -> list[Message]:
    if not isinstance(value, list) or not all(isinstance(message, dict) for message in value):
        raise RowError(f"'{name}' must be a string or a list of {{role, content}} messages")
    return [{"role": message.get("role"), "content": message.get("content")} for message in value]


def _sharegpt_turn(turn: Any, where: str) -> Message:
    if not isinstance(turn, dict):
        raise RowError(f"{where} is not a {{from, value}} object")
    speaker = turn.get("from")
    if speaker not in SHAREGPT_ROLES:
        raise RowError(f"{where} is from {speaker!r}; expected one of {', '.join(SHAREGPT_ROLES)}")
    return {"role": SHAREGPT_ROLES[speaker], "content": turn.get("value")}
