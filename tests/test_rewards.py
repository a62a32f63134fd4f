"""GRPO rewards: the shipped functions on hand-worked completions, score's table, and its one-line errors."""

from __future__ import annotations

import math
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from smolfactory.errors import SmolFactoryError
from smolfactory.rewards import (
    Reward,
    completion_text,
    exact_answer,
    format_match,
    length_penalty,
    math_equivalence,
    score,
)

THINK_ANSWER = r"\s*<think>.*?</think>\s*<answer>.*?</answer>\s*"


def assistant(text):
    return [{"role": "assistant", "content": text}]


def one(function, completion, answer, **arguments):
    """The reward of a single text completion."""
    return function(prompts=["Q"], completions=[completion], answer=[answer], **arguments)[0]


def table(rewards, completions, columns=None, completion_ids=None, prompts=None):
    """score() on text completions, with a prompt per completion."""
    prompts = prompts or [f"question {i}" for i in range(len(completions))]
    completion_ids = completion_ids or [[1, 2]] * len(completions)
    return score(rewards, prompts, completions, completion_ids, columns or {})


@pytest.mark.parametrize(
    ("completion", "answer", "expected"),
    [
        ("I count 12 apples, no wait, 15.", 15, 1.0),  # several numbers: the last one
        ("I count 12 apples, no wait, 15.", 12, 0.0),
        ("I have no idea.", 3, 0.0),  # nothing to extract
        ("It is -3 degrees outside.", "-3", 1.0),
        ("It is -3 degrees outside.", 3, 0.0),
        ("The total is 1,234 dollars.", 1234, 1.0),  # thousands commas
        ("The total is 1234 dollars.", "1,234", 1.0),
        ("It costs $3.50", "3.5", 1.0),  # equal by value
        ("It costs $3.50", 3.5, 1.0),
        ("It costs $3.51", 3.5, 0.0),
        ("Read pages 3-5", 5, 1.0),  # a hyphen in a range is no minus sign
        ("The answer is 7.", " 7 ", 1.0),  # a full stop is no decimal point
        ("1,2,3", 3, 1.0),  # not a thousands group
        ("x = 0.1 + 0.2 = 0.3", "0.30", 1.0),
    ],
)
def test_exact_answer_last_number(completion, answer, expected):
    assert one(exact_answer, completion, answer) == expected


@pytest.mark.parametrize(
    ("completion", "answer", "expected"),
    [
        ("17 is larger than 9.", 17, 1.0),  # the claim comes first
        ("9 is larger than 17.", 17, 0.0),  # the last number would reward this wrong claim
        ("-4 is less than 2", "-4", 1.0),
        ("1,234 beats 99", 1234, 1.0),
        ("No number here.", 5, 0.0),
    ],
)
def test_exact_answer_first_number(completion, answer, expected):
    assert one(exact_answer, completion, answer, extract="first_number") == expected


@pytest.mark.parametrize(
    ("completion", "answer", "expected"),
    [
        (r"So $\boxed{\frac{1}{2}}$.", r"\frac{1}{2}", 1.0),  # nested braces
        (r"So $\boxed{\frac{1}{2}}$.", "0.5", 0.0),  # strings, not maths: that is math_equivalence's job
        (r"First \boxed{3}, then \boxed{4}", 4, 1.0),  # the last box
        (r"First \boxed{3}, then \boxed{4}", 3, 0.0),
        (r"\boxed{ 12 }", "12", 1.0),
        (r"\boxed{1,000}", 1000, 1.0),  # numbers compare by value in every mode
        (r"\boxed{5} and then \boxed{6", 5, 1.0),  # an unclosed box is skipped
        ("The answer is 5", 5, 0.0),  # no box
        (r"\boxed{Paris}", "Paris ", 1.0),
        (r"\boxed{Paris}", "paris", 0.0),  # case-sensitive
    ],
)
def test_exact_answer_boxed(completion, answer, expected):
    assert one(exact_answer, completion, answer, extract="boxed") == expected


@pytest.mark.parametrize(
    ("completion", "answer", "tag", "expected"),
    [
        ("<answer>1</answer> on second thought <answer>2</answer>", 2, "answer", 1.0),  # the last tag
        ("<answer>1</answer> on second thought <answer>2</answer>", 1, "answer", 0.0),
        ("<think>hmm</think><answer>\n  Paris\n</answer>", "Paris", "answer", 1.0),  # across lines, stripped
        ("The answer is Paris", "Paris", "answer", 0.0),  # no tag
        ("<final>9</final>", 9, "final", 1.0),
        ("<answer>9</answer>", 9, "final", 0.0),
    ],
)
def test_exact_answer_tag(completion, answer, tag, expected):
    assert one(exact_answer, completion, answer, extract="tag", tag=tag) == expected


def test_exact_answer_conversational_none_and_bad_options():
    completions = [assistant("The answer is 42"), assistant("The answer is 41"), assistant("whatever")]
    assert exact_answer(["a", "b", "c"], completions, answer=[42, 42, None]) == [1.0, 0.0, None]
    with pytest.raises(ValueError, match="last_number, first_number, boxed, tag"):
        one(exact_answer, "1", 1, extract="middle_number")
    with pytest.raises(ValueError, match="numeric reference"):
        one(exact_answer, "Paris", "Paris")


def test_completion_text():
    assert completion_text("plain") == "plain"
    assert completion_text(assistant("hello")) == "hello"
    # After a tool call, the answer is in the last message.
    tool_turns = [{"role": "assistant", "content": None}, {"role": "tool", "content": "21"}, *assistant("21 C")]
    assert completion_text(tool_turns) == "21 C"


def test_math_equivalence():
    pytest.importorskip("math_verify")
    completions = [r"\frac{1}{2}", "The answer is $0.5$", r"So \boxed{\frac{1}{3}}", "I give up", "half"]
    answers = ["0.5", r"\frac{1}{2}", "0.5", "0.5", None]
    assert math_equivalence(["q"] * 5, completions, answers) == [1.0, 1.0, 0.0, 0.0, None]
    # A reference math-verify cannot parse is not applicable, as in TRL's accuracy_reward.
    assert math_equivalence(["q"], ["A"], ["A"]) == [None]


def test_math_equivalence_scores_a_timeout_zero(monkeypatch):
    math_verify = pytest.importorskip("math_verify")
    from math_verify.errors import TimeoutException

    real_verify = math_verify.verify

    def slow_on_three(gold, target, **kwargs):
        if "3" in str(target):
            raise TimeoutException("Operation timed out!")
        return real_verify(gold, target, **kwargs)

    monkeypatch.setattr(math_verify, "verify", slow_on_three)
    assert math_equivalence(["q", "q"], ["3", "2"], ["3", "2"]) == [0.0, 1.0]


def test_math_equivalence_without_math_verify(monkeypatch):
    monkeypatch.setitem(sys.modules, "math_verify", None)  # makes `import math_verify` raise ImportError
    with pytest.raises(SmolFactoryError, match=r"pip install 'smolfactory\[math\]'"):
        table([Reward("math_equivalence")], ["1"], {"answer": ["1"]})


def test_math_equivalence_matches_trl_accuracy_reward():
    pytest.importorskip("math_verify")
    trl_rewards = pytest.importorskip("trl.rewards")
    completions = [assistant(r"My answer is \boxed{\frac{1}{3}}"), assistant(r"My answer is \boxed{\frac{1}{2}}")]
    solutions = [r"\frac{1}{3}", r"\frac{1}{3}"]
    expected = [1.0, 0.0]  # the example in TRL's docstring
    assert trl_rewards.accuracy_reward(completions, solutions) == expected
    assert math_equivalence(["q", "q"], completions, solutions) == expected


@pytest.mark.parametrize(
    ("completion", "expected"),
    [
        ("<think>2+2</think>\n<answer>4</answer>", 1.0),
        ("<think>line one\nline two</think><answer>4</answer>\n", 1.0),  # DOTALL: thinking spans lines
        ("<think>2+2</think>", 0.0),  # no answer
        ("Sure! <think>2+2</think><answer>4</answer>", 0.0),  # whole text: nothing before the think
        ("<think>2+2</think><answer>4</answer> Hope that helps", 0.0),  # ... and nothing after the answer
    ],
)
def test_format_match(completion, expected):
    assert format_match(["q"], [completion], pattern=THINK_ANSWER) == [expected]
    assert format_match(["q"], [assistant(completion)], pattern=THINK_ANSWER) == [expected]


def test_format_match_matches_trl_think_format_reward():
    trl_rewards = pytest.importorskip("trl.rewards")
    completions = [
        assistant("<think>\nThis is my reasoning.\n</think>\nThis is my answer."),
        assistant("<think>\nThis is my reasoning.\nThis is my answer."),
        assistant("Preamble <think>x</think> y"),
        assistant("<think>a</think><think>b</think>"),
    ]
    expected = [1.0, 0.0, 0.0, 0.0]
    assert trl_rewards.think_format_reward(completions) == expected
    # TRL's pattern, anchored by fullmatch rather than ^...$.
    assert format_match(["q"] * 4, completions, pattern=r"<think>(?!.*<think>).*?</think>.*") == expected


@pytest.mark.parametrize(
    ("length", "max_tokens", "buffer", "expected"),
    [
        (0, 100, 20, 0.0),
        (80, 100, 20, 0.0),  # the last length without penalty: max_tokens - buffer
        (81, 100, 20, -0.05),  # (80 - 81) / 20
        (90, 100, 20, -0.5),
        (100, 100, 20, -1.0),
        (101, 100, 20, -1.0),
        (100, 100, 0, 0.0),  # no buffer: only beyond max_tokens
        (101, 100, 0, -1.0),
        (1, 4, 4, -0.25),  # the buffer is the whole length
    ],
)
def test_length_penalty(length, max_tokens, buffer, expected):
    values = length_penalty(["q"], ["c"], [[7] * length], max_tokens=max_tokens, buffer=buffer)
    assert values == [pytest.approx(expected)]


def test_length_penalty_matches_trl_and_checks_its_buffer():
    trl_rewards = pytest.importorskip("trl.rewards")
    ids = [[1] * n for n in (10, 79, 80, 81, 95, 100, 130)]
    trl_values = trl_rewards.get_soft_overlong_punishment(max_completion_len=100, soft_punish_cache=20)(ids)
    assert length_penalty(["q"] * 7, ["c"] * 7, ids, max_tokens=100, buffer=20) == pytest.approx(trl_values)
    with pytest.raises(ValueError, match="buffer"):
        length_penalty(["q"], ["c"], [[1]], max_tokens=10, buffer=11)


def test_score_table_keeps_none_as_nan_and_leaves_weights_to_the_model():
    rewards = [
        Reward("exact_answer", weight=3.0),
        Reward("smolfactory.rewards.format_match", weight=0.5, arguments={"pattern": r"\d+"}),
    ]
    values = table(rewards, ["7", "8", "the answer is 9"], {"answer": [7, 7, None]})
    assert values.dtype == torch.float32
    assert values.shape == (3, 2)
    expected = torch.tensor([[1.0, 1.0], [0.0, 1.0], [math.nan, 0.0]])
    torch.testing.assert_close(values, expected, equal_nan=True)


def test_score_passes_trl_arguments_by_name():
    def uses_ids(completion_ids, **kwargs):
        return [float(len(ids)) for ids in completion_ids]

    def uses_state(prompts, trainer_state, **kwargs):
        return [float(trainer_state.global_step)] * len(prompts)

    def uses_column(prompts, completions, difficulty, **kwargs):
        return difficulty

    def returns_array(prompts, **kwargs):
        return np.array([0.5, -1.0])

    def returns_tensor(prompts, **kwargs):
        return torch.tensor([2.0, 4.0])

    # Every column by name and no **kwargs: the `prompt` column is not passed (TRL passes it only as `prompts`).
    def strict(prompts, completions, completion_ids, trainer_state, difficulty, answer):
        return [None] * len(prompts)

    values = score(
        [uses_ids, uses_state, uses_column, strict, returns_array, returns_tensor],
        prompts=["p0", "p1"],
        completions=["c0", "c1"],
        completion_ids=[[5, 6, 7], [5]],
        columns={"prompt": ["p0", "p1"], "difficulty": [0.25, 2], "answer": ["a", "b"]},
        trainer_state=SimpleNamespace(global_step=11),
    )
    expected = torch.tensor([[3.0, 11.0, 0.25, math.nan, 0.5, 2.0], [1.0, 11.0, 2.0, math.nan, -1.0, 4.0]])
    torch.testing.assert_close(values, expected, equal_nan=True)


def fails_on_bad(prompts, completions, **kwargs):
    return [1.0 / 0 if "bad" in completion else 1.0 for completion in completions]


def test_score_error_names_the_function_and_the_failing_prompt():
    prompts = ["fine prompt", "second prompt", "prompt of the bad one"]
    with pytest.raises(SmolFactoryError) as caught:
        table([fails_on_bad], ["ok", "ok", "bad"], prompts=prompts)
    message = str(caught.value)
    assert "fails_on_bad" in message and "ZeroDivisionError" in message
    assert "prompt of the bad one" in message and "fine prompt" not in message
    assert "\n" not in message
    assert isinstance(caught.value.__cause__, ZeroDivisionError)


def test_score_error_names_the_row_of_a_shipped_reward():
    conversation = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Capital of France?"}]
    with pytest.raises(SmolFactoryError, match=r"reward exact_answer raised ValueError.*'Capital of France\?'"):
        score(
            [Reward("exact_answer")],
            ["What is 2+2?", conversation],
            ["4", "Paris"],
            [[1], [1]],
            {"answer": [4, "Paris"]},
        )


def test_score_error_on_wrong_length_or_type():
    def too_few(prompts, **kwargs):
        return [1.0]

    def not_a_list(prompts, **kwargs):
        return 1.0

    def text_values(prompts, **kwargs):
        return [1.0, "1.0"]

    prompts = ["first prompt", "second prompt"]
    with pytest.raises(SmolFactoryError, match=r"reward too_few returned 1 values for 2 completions.*'first prompt'"):
        table([too_few], ["a", "b"], prompts=prompts)
    with pytest.raises(SmolFactoryError, match=r"reward not_a_list returned float for 2 completions"):
        table([not_a_list], ["a", "b"], prompts=prompts)
    with pytest.raises(SmolFactoryError, match=r"reward text_values returned '1.0', not a number.*'second prompt'"):
        table([text_values], ["a", "b"], prompts=prompts)


@pytest.mark.parametrize(
    ("function", "expected"),
    [
        ("no_such_module.reward", r"model.rewards\[1\].function: cannot import no_such_module.reward"),
        ("smolfactory.rewards.no_such_reward", r"model.rewards\[1\].function: cannot import .*exact_answer"),
        ("smolfactory.rewards.NUMBER", r"model.rewards\[1\].function: smolfactory.rewards.NUMBER is a Pattern"),
    ],
)
def test_reward_load_errors(function, expected):
    with pytest.raises(SmolFactoryError, match=expected):
        Reward(function).load("model.rewards[1]")


def test_reward_names_and_bound_arguments():
    assert Reward("smolfactory.rewards.exact_answer").name == "exact_answer"
    assert Reward("exact_answer", name="gsm8k").name == "gsm8k"
    loaded = Reward("exact_answer", name="boxed_answer", arguments={"extract": "boxed"}).load()
    assert loaded.__name__ == "boxed_answer"  # the name TRL's GRPOTrainer logs it under
    assert loaded(prompts=["q"], completions=[r"\boxed{4}"], answer=["4"]) == [1.0]


def test_reward_from_a_module_in_the_run_directory(tmp_path, monkeypatch):
    (tmp_path / "rewards_beside_config.py").write_text(
        "def constant(prompts, completions, value, **kwargs):\n    return [value] * len(completions)\n"
    )
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))  # load() adds the run directory; undo that afterwards
    reward = Reward("rewards_beside_config.constant", arguments={"value": 0.75})
    torch.testing.assert_close(table([reward], ["a", "b"]), torch.tensor([[0.75], [0.75]]))
