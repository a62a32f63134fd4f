"""Tokenizing dataset rows into examples: the function ``datasets.map`` runs, and the counts it leaves.

A kind of example (``kinds``) turns one row into zero or more examples: usually one; several when the chat
template rewrites history or an over-long example is split; none when it is dropped. ``tokenize_rows`` runs it
over a batch of rows: bad rows stop with a one-line error, or leave a placeholder that ``summarize`` counts as
skipped. ``fit_length`` and ``leading_cut`` fit a tokenized sequence to ``max_length``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import datasets
from transformers import PreTrainedTokenizerBase

from smolfactory.data.formats import RowError
from smolfactory.data.sources import UNREADABLE
from smolfactory.data.templates import TemplateError
from smolfactory.errors import SmolFactoryError
from smolfactory.model.loss import IGNORE_INDEX

if TYPE_CHECKING:
    from smolfactory.data.kinds import ExampleKind


@dataclass(frozen=True)
class RowSettings:
    """The data module's settings that decide how a row becomes examples (the kind of example holds its own)."""

    format: str
    columns: dict[str, str]
    system_prompt: str | None
    template_kwargs: dict[str, Any] | None
    max_length: int
    overlong: str
    on_bad_row: str


def tokenize_rows(
    batch: dict[str, list],
    indices: list[int],
    tokenizer: PreTrainedTokenizerBase,
    settings: RowSettings,
    source: str,
    kind: ExampleKind,
    code: str,
) -> dict[str, list]:
    """``datasets.map`` function: a batch of rows to examples, plus one placeholder per skipped or dropped row.

    ``kind.row_examples`` turns one row into its examples; each has the kind's ``columns`` and ``num_trained``; a
    ``status`` column says what happened to the row. ``code`` is unused here: it is the source of everything that
    turns rows into examples (``kind.code``), an argument so that datasets' fingerprint of this map, and so its
    cache, changes with that code (datasets hashes the arguments, not the code a function calls).
    """
    out: dict[str, list] = {key: [] for key in (*kind.columns, "num_trained", "status")}
    placeholder = kind.placeholder()

    def add(example: dict[str, Any], status: str) -> None:
        for key, value in example.items():
            out[key].append(value)
        out["status"].append(status)

    for index, values in zip(indices, zip(*batch.values(), strict=True), strict=True):
        row = dict(zip(batch, values, strict=True))
        try:
            if row.get(UNREADABLE):  # a line the file's reader could not read (sources.load_rows)
                raise RowError(row[UNREADABLE])
            examples, truncated = kind.row_examples(row, tokenizer, settings)
        except (RowError, TemplateError) as error:
            problem = f"{source}, row {index + 1}: {error}"
            if settings.on_bad_row == "error":
                raise SmolFactoryError(f"{problem}; fix or remove the row, or set data.on_bad_row: skip") from error
            add(placeholder, f"skipped: {problem}")
            continue
        if not examples:  # a length outcome, not a malformed row: dropped and counted, whatever on_bad_row says
            add(placeholder, f"dropped: {index + 1}")
        for example in examples:
            add(example, "truncated" if truncated else "")
    return out


def trained_count(labels: list[int]) -> int:
    """How many tokens of an example have a loss (its first label never does: nothing predicts it)."""
    return sum(label != IGNORE_INDEX for label in labels[1:])


def fit_length(sequence: dict[str, list[int]], settings: RowSettings) -> list[tuple[list[int], list[int]]]:
    """The sequence cut to ``max_length`` as ``settings.overlong`` says; pieces with no trained token are left out.

    ``truncate_prompt`` first removes as many of the untrained tokens before the first trained one as needed
    (``leading_cut``), then the end if the rest is still too long.
    """
    input_ids, labels, limit = sequence["input_ids"], sequence["labels"], settings.max_length
    if len(input_ids) <= limit:
        pieces = [(input_ids, labels)]
    elif settings.overlong == "drop":
        return []
    elif settings.overlong == "truncate_prompt":
        start = leading_cut(labels, limit)
        pieces = [(input_ids[start : start + limit], labels[start : start + limit])]
    elif settings.overlong == "truncate":
        pieces = [(input_ids[:limit], labels[:limit])]
    else:
        pieces = [(input_ids[i : i + limit], labels[i : i + limit]) for i in range(0, len(input_ids), limit)]
    return [(ids, lab) for ids, lab in pieces if any(label != IGNORE_INDEX for label in lab[1:])]


def leading_cut(labels: list[int], limit: int) -> int:
    """How many leading tokens to remove so that ``limit`` tokens are left, taking only untrained tokens before
    the first trained one, and keeping the one token before it (which predicts it)."""
    first_trained = next((i for i, label in enumerate(labels) if i > 0 and label != IGNORE_INDEX), len(labels))
    return max(0, min(len(labels) - limit, first_trained - 1))


def summarize(tokenized: datasets.Dataset, rows: int, examples: int) -> dict[str, Any]:
    """Counts of a tokenized dataset: rows read, examples kept, truncated, dropped and skipped rows."""
    status = tokenized["status"]
    skipped = [s.removeprefix("skipped: ") for s in status if s.startswith("skipped")]
    dropped = [int(s.removeprefix("dropped: ")) for s in status if s.startswith("dropped")]
    return {
        "rows": rows,
        "examples": examples,
        "truncated": status.count("truncated"),
        "dropped": len(dropped),
        "dropped_first": dropped[:5],
        "skipped": len(skipped),
        "skipped_first": skipped[:3],
    }


def summary_line(name: str, summary: dict[str, Any], max_length: int) -> str:
    """One line of counts (and the first dropped rows, the first skipped rows' problems) for the log."""
    dropped = summary["dropped"]
    rows = ", ".join(map(str, summary["dropped_first"])) + (", ..." if dropped > len(summary["dropped_first"]) else "")
    line = (
        f"{name}: {summary['rows']} rows -> {summary['examples']} examples "
        f"({summary['truncated']} truncated to {max_length} tokens, {dropped} too long to train dropped"
        f"{f' (rows {rows})' if dropped else ''}, {summary['skipped']} bad rows skipped)"
    )
    return line + "".join(f"\n  skipped {problem}" for problem in summary["skipped_first"])
