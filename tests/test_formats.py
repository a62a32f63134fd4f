"""Dataset layouts: each one read into the conversation (or text) it means, and trained where it should be."""

from __future__ import annotations

import pytest

from smolfactory.data import SFTDataModule
from smolfactory.data.formats import Example, RowError, detect_format, row_to_example
from smolfactory.errors import SmolFactoryError
from smolfactory.model.loss import IGNORE_INDEX
from tests.conftest import trained_spans, write_jsonl


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


def system(text):
    return {"role": "system", "content": text}


SHAREGPT_TOOL_ROW = {
    "system": "You can call tools.",
    "conversations": [
        {"from": "human", "value": "Weather in Paris?"},
        {"from": "function_call", "value": '{"name": "weather", "arguments": {"city": "Paris"}}'},
        {"from": "observation", "value": '{"temperature": 21}'},
        {"from": "gpt", "value": "It is 21 degrees in Paris."},
    ],
}


@pytest.mark.parametrize(
    ("row", "layout", "expected"),
    [
        ({"messages": [user("Hi"), assistant("Hello")]}, "messages", [user("Hi"), assistant("Hello")]),
        (
            SHAREGPT_TOOL_ROW,
            "sharegpt",
            [
                system("You can call tools."),
                user("Weather in Paris?"),
                assistant('{"name": "weather", "arguments": {"city": "Paris"}}'),
                {"role": "tool", "content": '{"temperature": 21}'},
                assistant("It is 21 degrees in Paris."),
            ],
        ),
        (
            {
                "instruction": "Translate to French.",
                "input": "Good morning",
                "output": "Bonjour",
                "system": "You translate.",
                "history": [["Translate to German: yes", "Ja"]],
            },
            "alpaca",
            [
                system("You translate."),
                user("Translate to German: yes"),
                assistant("Ja"),
                user("Translate to French.\n\nGood morning"),
                assistant("Bonjour"),
            ],
        ),
        ({"instruction": "Say hi.", "input": "", "output": "Hi!"}, "alpaca", [user("Say hi."), assistant("Hi!")]),
        (
            {"prompt": [user("2 + 2?")], "completion": [assistant("4")]},
            "prompt_completion",
            [user("2 + 2?"), assistant("4")],
        ),
    ],
    ids=["messages", "sharegpt-tools", "alpaca-history", "alpaca-no-input", "prompt-completion-chat"],
)
def test_chat_layouts_become_their_conversation(row, layout, expected):
    assert detect_format(list(row), {}) == layout
    assert row_to_example(row, layout) == Example(messages=expected)


def test_plain_text_layouts():
    assert row_to_example({"text": "Once upon a time"}, "text") == Example(text="Once upon a time")
    row = {"prompt": "The capital of France is", "completion": " Paris."}
    assert row_to_example(row, "prompt_completion") == Example(prompt="The capital of France is", text=" Paris.")


def test_columns_are_remapped_and_a_default_system_prompt_is_added_only_where_missing():
    columns = {"instruction": "question", "output": "answer"}
    row = {"question": "Why?", "answer": "Because."}
    assert detect_format(list(row), columns) == "alpaca"
    example = row_to_example(row, "alpaca", columns, system_prompt="Be kind.")
    assert example.messages == [system("Be kind."), user("Why?"), assistant("Because.")]
    own = row_to_example({"messages": [system("Mine."), user("a"), assistant("b")]}, "messages", system_prompt="X")
    assert own.messages[0] == system("Mine.")


@pytest.mark.parametrize(
    ("row", "layout", "problem"),
    [
        ({"instruction": "Hi"}, "alpaca", "missing field 'output'"),
        ({"conversations": [{"from": "bot", "value": "x"}]}, "sharegpt", "from 'bot'"),
        ({"prompt": [user("a")], "completion": "b"}, "prompt_completion", "lists of messages"),
        ({"text": ""}, "text", "non-empty string"),
    ],
)
def test_malformed_rows_say_what_is_wrong(row, layout, problem):
    with pytest.raises(RowError, match=problem):
        row_to_example(row, layout)


def datamodule_for(tiny_model_dir, path, **kwargs) -> SFTDataModule:
    datamodule = SFTDataModule(tokenizer=tiny_model_dir, dataset=str(path), val_split=0, **kwargs)
    datamodule.setup("fit")
    return datamodule


def test_tool_results_are_read_not_trained(tiny_model_dir, tmp_path):
    datamodule = datamodule_for(tiny_model_dir, write_jsonl(tmp_path / "tools.jsonl", [SHAREGPT_TOOL_ROW]))
    tokenizer = datamodule.tokenizer
    spans = [tokenizer.decode(s) for s in trained_spans(datamodule.train_data[0]["labels"])]
    assert spans == [
        '{"name": "weather", "arguments": {"city": "Paris"}}<|im_end|>',
        "It is 21 degrees in Paris.<|im_end|>",
    ]


def test_text_trains_every_token_and_prompt_completion_only_the_completion(tiny_model_dir, tmp_path):
    rows = [{"text": "Tokens all the way down."}]
    text = datamodule_for(tiny_model_dir, write_jsonl(tmp_path / "text.jsonl", rows)).train_data[0]
    assert text["labels"] == text["input_ids"]
    datamodule = datamodule_for(
        tiny_model_dir, write_jsonl(tmp_path / "pc.jsonl", [{"prompt": "The sky is", "completion": " blue."}])
    )
    example, tokenizer = datamodule.train_data[0], datamodule.tokenizer
    trained = [label for label in example["labels"] if label != IGNORE_INDEX]
    assert tokenizer.decode(trained) == " blue." + tokenizer.eos_token
    assert tokenizer.decode(example["input_ids"]) == "The sky is blue." + tokenizer.eos_token


@pytest.mark.parametrize("source", ["builtin", "file", "inline"])
def test_chat_template_override_by_name_file_or_string(tiny_model_dir, tmp_path, source):
    template_file = tmp_path / "mine.jinja"
    template_file.write_text(
        "{% for m in messages %}{{ '### ' + m['role'] + ': ' + m['content'] + '<|im_end|>' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '### assistant: ' }}{% endif %}"
    )
    value = {"builtin": "chatml", "file": str(template_file), "inline": template_file.read_text()}[source]
    path = write_jsonl(tmp_path / "d.jsonl", [{"messages": [user("Hi"), assistant("Hello")]}])
    datamodule = datamodule_for(tiny_model_dir, path, chat_template=value)
    example, tokenizer = datamodule.train_data[0], datamodule.tokenizer
    expected = {
        "builtin": "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello<|im_end|>\n",
        "file": "### user: Hi<|im_end|>### assistant: Hello<|im_end|>",
    }
    assert tokenizer.decode(example["input_ids"]) == expected.get(source, expected["file"])
    assert [tokenizer.decode(s) for s in trained_spans(example["labels"])] == ["Hello<|im_end|>"]


def test_chat_template_kwargs_reach_the_template(tiny_model_dir, tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"messages": [user("Hi"), assistant("Hello")]}])
    template = "{% for m in messages %}{{ greeting + m['content'] + '<|im_end|>' }}{% endfor %}"
    datamodule = datamodule_for(tiny_model_dir, path, chat_template=template, chat_template_kwargs={"greeting": "> "})
    assert datamodule.tokenizer.decode(datamodule.train_data[0]["input_ids"]) == "> Hi<|im_end|>> Hello<|im_end|>"


def test_tokenizer_without_a_chat_template_asks_for_one(tiny_model_dir, tmp_path, monkeypatch):
    from smolfactory.data import base

    real = base.load_tokenizer

    def no_template(name):
        tokenizer = real(name)
        tokenizer.chat_template = None
        return tokenizer

    monkeypatch.setattr(base, "load_tokenizer", no_template)
    path = write_jsonl(tmp_path / "d.jsonl", [{"messages": [user("Hi"), assistant("Hello")]}])
    with pytest.raises(SmolFactoryError, match="has no chat template .* set data.chat_template"):
        datamodule_for(tiny_model_dir, path)


def test_bad_rows_skipped_and_counted(tiny_model_dir, tmp_path):
    rows = [
        {"messages": [user("Hi"), assistant("Hello")]},
        {"messages": [user("Hi")]},
        {"messages": [user("Hi"), assistant(7)]},
        {"messages": [user("Bye"), assistant("Goodbye")]},
    ]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    datamodule = datamodule_for(tiny_model_dir, path, on_bad_row="skip")
    summary = datamodule.summaries[f"{path}:train"]
    assert (len(datamodule.train_data), summary["skipped"]) == (2, 2)
    assert summary["skipped_first"][0].endswith("row 2: the conversation has no assistant turn to train on")
    assert "row 3: message 1 has non-string content (int)" in summary["skipped_first"][1]
    # No example without a trained token ever reaches a batch.
    assert all(any(label != IGNORE_INDEX for label in labels[1:]) for labels in datamodule.train_data["labels"])


def test_a_misspelt_column_rename_is_named(tiny_model_dir, tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"instruction": "Hi", "output": "Hello"}])
    with pytest.raises(SmolFactoryError, match="renames instrution, which the alpaca layout does not read"):
        datamodule_for(tiny_model_dir, path, format="alpaca", columns={"instrution": "question"})
