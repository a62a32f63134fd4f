"""Reward functions for GRPO: what the YAML names, how a batch is scored, and the rewards we ship.

A reward is a plain Python function with TRL's signature (``GRPOTrainer``'s ``reward_funcs``)::

    def my_reward(prompts, completions, completion_ids, answer, **kwargs) -> list[float | None]: ...

It is called with keyword arguments: ``prompts`` (as the dataset gave them: a text, or a list of messages),
``completions`` (a text, or ``[{"role": "assistant", "content": text}]`` for conversational prompts),
``completion_ids`` (the generated token ids), ``trainer_state``, and every other dataset column as a list, so a
function takes the columns it needs by name and ignores the rest through ``**kwargs``. It returns one value
per completion; ``None`` means "not applicable to this row" and becomes NaN in the table ``score`` returns.
The same functions work unchanged in TRL's ``GRPOTrainer``.

In a config::

    model:
      rewards:
        - function: smolfactory.rewards.exact_answer     # or my_rewards.is_polite: my_rewards.py where you run
          arguments: {extract: boxed}
        - function: format_match                         # a bare name is one of the rewards shipped here
          weight: 0.5
          arguments: {pattern: '\\s*<think>.*?</think>\\s*<answer>.*?</answer>\\s*'}
"""

from __future__ import annotations

import functools
import importlib
import numbers
import os
import re
import sys
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from decimal import Decimal
from typing import Any, Literal

import torch

from smolfactory.errors import SmolFactoryError, first_line

RewardFunction = Callable[..., Sequence[float | None]]

# Keys TRL never forwards as columns: the prompt and completion reach a function as `prompts` and `completions`.
NOT_COLUMNS = ("prompt", "completion", "completion_ids")


@dataclass(frozen=True)
class Reward:
    """One reward in ``model.rewards``: a function, its weight in the total, and arguments bound to it.

    Attributes:
        function: Import path of the function: ``smolfactory.rewards.exact_answer``, ``my_rewards.is_polite`` (a module
            on the python path or in the directory you run from), or the bare name of a reward shipped in this module.
        weight: Its weight in the total reward (applied by the model, not by ``score``).
        arguments: Extra keyword arguments bound to the function, e.g. ``{pattern: ...}`` for ``format_match``.
        name: The name in metric names (``reward_<name>``); the function's own name when not given.
    """

    function: str
    weight: float = 1.0
    arguments: dict[str, Any] | None = None
    name: str | None = None

    def __post_init__(self) -> None:
        # Frozen, so the default name is set once here and `reward.name` is always a string afterwards.
        if self.name is None:
            object.__setattr__(self, "name", self.function.rpartition(".")[2])

    def load(self, option: str = "model.rewards[0]") -> RewardFunction:
        """The function, with ``arguments`` bound and ``__name__`` set to ``name`` (TRL names its metrics by it).

        Args:
            option: Where this reward sits in the config, quoted in the error (``model.rewards[2]``).

        Raises:
            SmolFactoryError: The module or the function cannot be imported, or is not callable.
        """
        function = import_function(self.function, f"{option}.function")
        bound = functools.partial(function, **(self.arguments or {}))
        bound.__name__ = self.name  # type: ignore[attr-defined]  (partial objects take attributes)
        return bound


def import_function(path: str, option: str) -> Callable[..., Any]:
    """The function an import path names; a bare name is one of the rewards in this module.

    Args:
        path: ``package.module.function``, or a bare name such as ``exact_answer``.
        option: The config option, quoted in the error.
    """
    module_name, _, name = path.rpartition(".")
    module_name = module_name or __name__
    # Like `trl grpo`: a my_rewards.py beside the config is found, though console scripts leave the current
    # directory off sys.path. Appended, so it never shadows an installed package.
    if os.getcwd() not in sys.path:
        sys.path.append(os.getcwd())
    try:
        function = getattr(importlib.import_module(module_name), name)
    except (ImportError, AttributeError) as error:
        raise SmolFactoryError(
            f"{option}: cannot import {path} ({first_line(error)}); give module.function with the module installed, "
            f"on PYTHONPATH or in the directory you run from, or one of {', '.join(SHIPPED)}"
        ) from error
    if not callable(function):
        raise SmolFactoryError(f"{option}: {path} is a {type(function).__name__}, not a function")
    return function


def score(
    rewards: Sequence[Reward | RewardFunction],
    prompts: list[Any],
    completions: list[Any],
    completion_ids: list[list[int]],
    columns: dict[str, list[Any]],
    trainer_state: Any = None,
) -> torch.Tensor:
    """Every reward of every completion, unweighted: the model weighs and sums them.

    Args:
        rewards: The rewards, as ``Reward`` settings or loaded functions.
        prompts: N prompts (a prompt repeated once per completion of it).
        completions: The N completions, text or ``[{"role": "assistant", "content": text}]``.
        completion_ids: The N completions' token ids.
        columns: The other dataset columns, N values each, passed by name to each function.
        trainer_state: Passed on as ``trainer_state`` (rewards shaped by training progress).

    Returns:
        Float32 tensor of shape [N, len(rewards)], NaN where a function returned None.

    Raises:
        SmolFactoryError: A function raised, or returned other than one number or None per completion. One
            line naming the function and the prompt involved, chained from the original error.
    """
    arguments = {key: value for key, value in columns.items() if key not in NOT_COLUMNS}
    arguments.update(
        prompts=prompts, completions=completions, completion_ids=completion_ids, trainer_state=trainer_state
    )
    table = torch.empty(len(prompts), len(rewards), dtype=torch.float32)
    for j, reward in enumerate(rewards):
        function = reward.load(f"model.rewards[{j}]") if isinstance(reward, Reward) else reward
        table[:, j] = torch.tensor(call(function, arguments), dtype=torch.float32)
    return table


def call(function: RewardFunction, arguments: dict[str, Any]) -> list[float]:
    """One function's values for a batch, None as NaN; any failure as one SmolFactoryError line."""
    name = function_name(function)
    prompts = arguments["prompts"]
    try:
        values = function(**arguments)
    except SmolFactoryError:
        raise  # already one line meant for the user (e.g. math-verify is not installed)
    except Exception as error:
        prompt = prompts[failing_item(function, arguments)]
        raise SmolFactoryError(
            f"reward {name} raised {type(error).__name__}: {first_line(error)} (prompt {shorten(prompt)})"
        ) from error
    if hasattr(values, "tolist"):  # a numpy array or a tensor, which TRL takes too
        values = values.tolist()
    if not isinstance(values, Sequence) or isinstance(values, str) or len(values) != len(prompts):
        got = f"{len(values)} values" if isinstance(values, Sequence) else type(values).__name__
        raise SmolFactoryError(
            f"reward {name} returned {got} for {len(prompts)} completions; return one number or None per "
            f"completion (first prompt {shorten(prompts[0])})"
        )
    for value, prompt in zip(values, prompts, strict=True):
        if value is not None and not isinstance(value, numbers.Real):
            raise SmolFactoryError(
                f"reward {name} returned {shorten(value)}, not a number or None (prompt {shorten(prompt)})"
            )
    return [float("nan") if value is None else float(value) for value in values]


def failing_item(function: RewardFunction, arguments: dict[str, Any]) -> int:
    """The first row that makes ``function`` raise on its own, or 0 when the batch fails only as a whole.

    Only on the error path: the function is rerun on one row at a time to point at the row to look at.
    """
    for i in range(len(arguments["prompts"])):
        row = {key: value[i : i + 1] if isinstance(value, list) else value for key, value in arguments.items()}
        try:
            function(**row)
        except Exception:
            return i
    return 0


def function_name(function: Callable[..., Any]) -> str:
    """A reward's name: its ``__name__``, the wrapped function's for a partial, else its class name."""
    name = getattr(function, "__name__", None) or getattr(getattr(function, "func", None), "__name__", None)
    return name or type(function).__name__


def shorten(value: Any, limit: int = 80) -> str:
    """A one-line repr of a prompt or value for an error message: the last message's text for a conversation."""
    if isinstance(value, list) and value and isinstance(value[-1], dict):
        value = value[-1].get("content")
    text = repr(value)  # repr escapes newlines, so the message stays one line
    return text if len(text) <= limit else text[: limit - 3] + "..."


def completion_text(completion: str | list[dict[str, Any]]) -> str:
    """The text of a completion: itself, or the content of the last message of a conversational one.

    Args:
        completion: A text, or a list of messages (``[{"role": "assistant", "content": text}]``; after tool
            calls the answer is in the last message).
    """
    if isinstance(completion, str):
        return completion
    return (completion[-1].get("content") or "") if completion else ""


# ---------------------------------------------------------------------------------------------------------------
# Shipped rewards
# ---------------------------------------------------------------------------------------------------------------

# A decimal number: an optional minus (not a hyphen inside a word or range such as 3-5), thousands commas.
NUMBER = re.compile(r"(?:(?<![\w.])[-\u2212])?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?")


def exact_answer(
    prompts: list[Any],
    completions: list[Any],
    answer: list[Any],
    extract: Literal["last_number", "first_number", "boxed", "tag"] = "last_number",
    tag: str = "answer",
    **kwargs: Any,
) -> list[float | None]:
    """1.0 where the answer extracted from the completion equals the reference ``answer``, else 0.0.

    Numbers compare by value (``1,234`` = ``1234``, ``3.50`` = ``3.5``, exactly, as decimals); anything else
    compares as the stripped, case-sensitive string. For LaTeX answers such as ``\\frac{1}{2}`` vs ``0.5``, use
    ``math_equivalence``. A completion with nothing to extract scores 0.0.

    Args:
        prompts: The prompts (unused).
        completions: The completions.
        answer: The reference answers, one per completion (a number or a text; for GSM8K, the part after
            ``####``); None scores None (not applicable).
        extract: How the completion's answer is found: ``last_number`` (the last decimal number in the text;
            the reference must then be a number), ``first_number`` (the first one: for answers that state the
            result first, "17 is larger than 9", where the last number would reward the wrong claim), ``boxed``
            (the content of the last ``\\boxed{...}``, nested braces included) or ``tag`` (the content of the
            last ``<answer>...</answer>``).
        tag: The tag name for ``extract: tag``.
        **kwargs: The other columns (unused).

    Raises:
        ValueError: An unknown ``extract``, or a reference that is not a number under ``last_number`` (it could
            never match).
    """
    extractors: dict[str, Callable[[str], str | None]] = {
        "last_number": last_number,
        "first_number": first_number,
        "boxed": last_boxed,
        "tag": functools.partial(last_tag, tag=tag),
    }
    if extract not in extractors:
        raise ValueError(f"extract must be one of {', '.join(extractors)}, not {extract!r}")
    rewards: list[float | None] = []
    for completion, reference in zip(completions, answer, strict=True):
        if reference is None:
            rewards.append(None)
            continue
        if extract.endswith("_number") and as_number(reference) is None:
            raise ValueError(f"extract: {extract} needs a numeric reference answer, not {reference!r}")
        found = extractors[extract](completion_text(completion))
        rewards.append(float(found is not None and same_answer(found, reference)))
    return rewards


def last_number(text: str) -> str | None:
    """The last decimal number in ``text`` (``-3``, ``1,234``, ``3.50``), or None."""
    numbers_found = NUMBER.findall(text)
    return numbers_found[-1] if numbers_found else None


def first_number(text: str) -> str | None:
    """The first decimal number in ``text``, or None."""
    found = NUMBER.search(text)
    return found.group() if found else None


def last_boxed(text: str) -> str | None:
    """The content of the last complete ``\\boxed{...}`` in ``text`` (braces inside it balanced), or None."""
    for start in reversed([match.end() for match in re.finditer(r"\\boxed\s*\{", text)]):
        depth = 1
        for end in range(start, len(text)):
            depth += {"{": 1, "}": -1}.get(text[end], 0)
            if depth == 0:
                return text[start:end]
    return None


def last_tag(text: str, tag: str) -> str | None:
    """The content of the last ``<tag>...</tag>`` in ``text``, or None."""
    contents = re.findall(rf"<{re.escape(tag)}>(.*?)</{re.escape(tag)}>", text, re.DOTALL)
    return contents[-1] if contents else None


def as_number(value: Any) -> Decimal | None:
    """A number or a text that is exactly one decimal number, as a Decimal (exact: 3.50 == 3.5); else None."""
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        return Decimal(str(value))
    if isinstance(value, str):
        text = value.strip()
        if NUMBER.fullmatch(text):
            return Decimal(text.replace(",", "").replace("\u2212", "-"))
    return None


def same_answer(found: str, reference: Any) -> bool:
    """Whether an extracted answer equals the reference: by value when both are numbers, else as stripped text."""
    found_number, reference_number = as_number(found), as_number(reference)
    if found_number is not None and reference_number is not None:
        return found_number == reference_number
    return found.strip() == str(reference).strip()


def math_equivalence(
    prompts: list[Any], completions: list[Any], answer: list[Any], **kwargs: Any
) -> list[float | None]:
    """1.0 where HF's math-verify finds the completion's answer equal to the reference, else 0.0.

    ``verify(parse(answer), parse(completion))`` with math-verify's default extraction (LaTeX and plain
    expressions, ``\\boxed{}`` first): ``\\frac{1}{2}``, ``0.5`` and ``$\\frac{2}{4}$`` are equal. A completion
    that fails to parse, or a parse or comparison past math-verify's timeout, scores 0.0. A reference that is
    None or that math-verify cannot parse scores None (not applicable), as in TRL's ``accuracy_reward``.
    Needs ``pip install 'smolfactory[math]'``.

    Args:
        prompts: The prompts (unused).
        completions: The completions.
        answer: The reference answers (LaTeX or plain), one per completion.
        **kwargs: The other columns (unused).
    """
    try:
        from math_verify import parse, verify
        from math_verify.errors import TimeoutException
    except ImportError as error:
        raise SmolFactoryError("math_equivalence needs math-verify: pip install 'smolfactory[math]'") from error
    # math-verify times out with signal.alarm, which only the main thread may set: elsewhere, no timeout.
    timeout = 5 if threading.current_thread() is threading.main_thread() else None
    rewards: list[float | None] = []
    for completion, reference in zip(completions, answer, strict=True):
        gold = [] if reference is None else parse(str(reference), parsing_timeout=timeout)
        if not gold:
            rewards.append(None)
            continue
        try:
            predicted = parse(completion_text(completion), parsing_timeout=timeout)
            rewards.append(float(verify(gold, predicted, timeout_seconds=timeout)))
        except (Exception, TimeoutException):  # TimeoutException is a BaseException: one bad item scores 0
            rewards.append(0.0)
    return rewards


def format_match(prompts: list[Any], completions: list[Any], pattern: str, **kwargs: Any) -> list[float]:
    """1.0 where the regular expression ``pattern`` matches the whole completion, else 0.0.

    The match is ``re.fullmatch(pattern, text, re.DOTALL)``: anchored at both ends, and ``.`` crosses newlines.
    For a completion that thinks, then answers::

        pattern: '\\s*<think>.*?</think>\\s*<answer>.*?</answer>\\s*'

    Args:
        prompts: The prompts (unused).
        completions: The completions.
        pattern: A Python regular expression.
        **kwargs: The other columns (unused).
    """
    compiled = re.compile(pattern, re.DOTALL)
    return [float(compiled.fullmatch(completion_text(completion)) is not None) for completion in completions]


def length_penalty(
    prompts: list[Any],
    completions: list[Any],
    completion_ids: list[list[int]],
    max_tokens: int,
    buffer: int,
    **kwargs: Any,
) -> list[float]:
    """DAPO's soft overlong punishment (arXiv 2503.14476, eq. 13): a penalty for completions near the length cap.

    With L the completion's length in tokens: 0 while L <= max_tokens - buffer, then falling linearly to -1 at
    L = max_tokens (``(max_tokens - buffer - L) / buffer``), and -1 beyond. With max_tokens 100 and buffer 20:
    80 tokens score 0, 90 score -0.5, 100 score -1. Same as TRL's ``get_soft_overlong_punishment``.

    Args:
        prompts: The prompts (unused).
        completions: The completions (unused: the length is counted in ``completion_ids``).
        completion_ids: The completions' token ids.
        max_tokens: The length that scores -1 (usually the generation's max_new_tokens).
        buffer: How many tokens before ``max_tokens`` the penalty starts; 0 penalises only beyond max_tokens.
        **kwargs: The other columns (unused).

    Raises:
        ValueError: ``buffer`` is negative or larger than ``max_tokens``.
    """
    if not 0 <= buffer <= max_tokens:
        raise ValueError(
            f"length_penalty needs 0 <= buffer <= max_tokens, got buffer {buffer}, max_tokens {max_tokens}"
        )
    start = max_tokens - buffer
    # The middle case only arises when buffer > 0, so the division is safe.
    return [
        0.0 if len(ids) <= start else -1.0 if len(ids) > max_tokens else (start - len(ids)) / buffer
        for ids in completion_ids
    ]


SHIPPED = ("exact_answer", "math_equivalence", "format_match", "length_penalty")
