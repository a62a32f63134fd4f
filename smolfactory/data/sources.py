"""Where rows come from: a built-in dataset, a local json/jsonl/parquet/csv file, or a Hub dataset."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path

import datasets
from jsonargparse.typing import register_type

from smolfactory.data.formats import Format
from smolfactory.errors import SmolFactoryError, first_line
from smolfactory.export import atomic_file
from smolfactory.model.loading import BUILTIN_PREFIX

# Built-in datasets: name -> {split: file inside smolfactory/data}
BUILTIN_DATASETS = {
    "quickstart": {"train": "quickstart/train.jsonl", "validation": "quickstart/validation.jsonl"},
    "quickstart-preference": {
        "train": "quickstart/preference_train.jsonl",
        "validation": "quickstart/preference_validation.jsonl",
    },
    "quickstart-grpo": {"train": "quickstart/grpo_train.jsonl", "validation": "quickstart/grpo_validation.jsonl"},
}
FILE_LOADERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}
# The column of a row that stands for an unreadable line of a JSON Lines file (data.on_bad_row: skip).
UNREADABLE = "_unreadable_line"


class DatasetPath(str):
    """A dataset named by one string: a local json/jsonl/parquet/csv file, a Hub id, or builtin:NAME.

    Declared path-like (``__fspath__``) so that jsonargparse keeps a file's name as the value: for other types it
    reads a value naming an existing file as that file's contents (a JSON array of rows became the data.dataset
    list, a CSV's text the dataset name).
    """

    def __fspath__(self) -> str:
        return str(self)


def _dataset_path(value: object) -> DatasetPath:
    if not isinstance(value, str):  # a list or mapping is another member of the union (sources to mix)
        raise ValueError(f"expected a dataset name, got {type(value).__name__}")
    return DatasetPath(value)


register_type(DatasetPath, serializer=str, deserializer=_dataset_path)


@dataclass(frozen=True)
class DatasetSource:
    """One dataset to train on, and how much of it.

    Attributes:
        path: Hub dataset id, local json/jsonl/parquet/csv file, or a built-in dataset (builtin:quickstart).
        name: Hub dataset configuration (subset) name.
        split: Split to read (Hub datasets; local files have one split).
        revision: Hub dataset revision: a branch, tag or commit.
        format: Row layout of this dataset; null uses data.format.
        columns: Column renames of this dataset; null uses data.columns.
        weight: Mixing weight: the dataset contributes weight x its examples (0.5 half of them, 2 each one twice).
        num_samples: Mixing by count: exactly this many examples from the dataset, repeating it if needed.
    """

    path: str
    name: str | None = None
    split: str = "train"
    revision: str | None = None
    format: Format | None = None
    columns: dict[str, str] | None = None
    weight: float | None = None
    num_samples: int | None = None

    def __post_init__(self) -> None:
        if (self.weight is not None and self.weight <= 0) or (self.num_samples is not None and self.num_samples < 1):
            raise SmolFactoryError(f"dataset {self.path}: weight must be > 0 and num_samples >= 1")
        if self.weight is not None and self.num_samples is not None:
            raise SmolFactoryError(f"dataset {self.path}: give weight or num_samples, not both")


# data.dataset and data.validation_dataset. DatasetPath in each union turns off jsonargparse's reading of a named
# file as the value, for the list members too.
Datasets = str | DatasetPath | DatasetSource | list[str | DatasetSource]
ValidationDataset = str | DatasetPath | DatasetSource | None


def builtin_split_path(name: str, split: str) -> Path:
    """The packaged file of a built-in dataset's split."""
    relative = BUILTIN_DATASETS[name].get(split)
    if relative is None:
        raise SmolFactoryError(f"built-in dataset {BUILTIN_PREFIX}{name} has no '{split}' split")
    return Path(str(files("smolfactory.data").joinpath(relative)))


def load_rows(
    spec: DatasetSource, streaming: bool = False, on_bad_row: str = "error"
) -> datasets.Dataset | datasets.IterableDataset:
    """Load one split of a dataset (lazily with ``streaming``), with a one-line error when that fails.

    A JSON Lines file's unreadable lines (not UTF-8, not JSON) stop with the line's number, or with
    ``on_bad_row: skip`` become rows whose ``UNREADABLE`` column says why, which ``tokenize_rows`` skips and counts.
    """
    source, split = spec.path, spec.split
    if source.startswith(BUILTIN_PREFIX):
        name = source[len(BUILTIN_PREFIX) :]
        if name not in BUILTIN_DATASETS:
            known = ", ".join(BUILTIN_PREFIX + n for n in BUILTIN_DATASETS)
            raise SmolFactoryError(f"unknown built-in dataset '{source}'; known: {known}")
        return _load_file(builtin_split_path(name, split), streaming, on_bad_row)
    path = Path(source).expanduser()
    if path.suffix.lower() in FILE_LOADERS or path.exists():
        if not path.is_file():
            raise SmolFactoryError(
                f"dataset file not found: {source} (cwd {Path.cwd()}); check data.dataset, or give a Hub id"
            )
        return _load_file(path, streaming, on_bad_row)
    try:
        return datasets.load_dataset(source, spec.name, split=split, revision=spec.revision, streaming=streaming)
    except Exception as error:  # datasets raises many types for a missing or unreachable dataset
        raise SmolFactoryError(
            f"could not load dataset '{source}' split '{split}' ({first_line(error)}); give a local "
            f"{'/'.join(FILE_LOADERS)} file or a Hub dataset id you can reach"
        ) from error


def _load_file(path: Path, streaming: bool, on_bad_row: str) -> datasets.Dataset | datasets.IterableDataset:
    loader = FILE_LOADERS.get(path.suffix.lower())
    if loader is None:
        raise SmolFactoryError(f"dataset file {path} has an unknown type; use one of {', '.join(FILE_LOADERS)}")
    try:
        rows = datasets.load_dataset(loader, data_files=str(path), split="train", streaming=streaming)
        if loader == "json" and not streaming:
            rows.data.validate(full=True)  # pyarrow's reader keeps bytes that are not UTF-8; reading them fails
        return rows
    except Exception as error:
        bad = unreadable_lines(path) if loader == "json" else []
        if not bad:
            raise SmolFactoryError(
                f"could not read dataset file {path} ({first_line(error.__cause__ or error)}); check that it is "
                f"valid {loader}"
            ) from error
        number, problem = bad[0]
        if _is_json_array(path):  # one document: a syntax error cannot be skipped
            raise SmolFactoryError(f"{path}, line {number}: {problem}; fix the file") from error
        if on_bad_row == "error":
            raise SmolFactoryError(
                f"{path}, line {number}: {problem}; fix or remove the line, or set data.on_bad_row: skip"
            ) from error
    readable = _readable_copy(path, bad)
    try:
        return datasets.load_dataset("json", data_files=str(readable), split="train", streaming=streaming)
    except Exception as error:  # the readable lines themselves do not form one table (mixed types, say)
        raise SmolFactoryError(
            f"could not read dataset file {path} ({first_line(error.__cause__ or error)})"
        ) from error


def unreadable_lines(path: Path) -> list[tuple[int, str]]:
    """(line number, problem) of each line of a JSON Lines file that is not a JSON object in UTF-8, or the first
    problem of a JSON file."""
    data = path.read_bytes()
    if _is_json_array(path):
        try:
            json.loads(data)
        except UnicodeDecodeError as error:
            return [(data[: error.start].count(b"\n") + 1, f"byte {data[error.start]:#04x} is not UTF-8")]
        except json.JSONDecodeError as error:
            return [(error.lineno, f"not valid JSON at column {error.colno} ({error.msg})")]
        return []
    bad = []
    for number, line in enumerate(data.split(b"\n"), 1):
        if line.strip() and (problem := _line_problem(line)):
            bad.append((number, problem))
    return bad


def _line_problem(line: bytes) -> str | None:
    try:
        value = json.loads(line.decode("utf-8"))
    except UnicodeDecodeError as error:
        return f"byte {line[error.start]:#04x} at column {error.start + 1} is not UTF-8"
    except json.JSONDecodeError as error:
        return f"not valid JSON at column {error.colno} ({error.msg})"
    return None if isinstance(value, dict) else f"a JSON {type(value).__name__}, not an object"


def _is_json_array(path: Path) -> bool:
    with path.open("rb") as file:
        return file.read(4096).lstrip()[:1] == b"["


def _readable_copy(path: Path, bad: list[tuple[int, str]]) -> Path:
    """The file with each bad line replaced by a row that says what was wrong (so rows keep their line numbers),
    in the datasets cache, named by the file's contents."""
    data = path.read_bytes()
    copy = (
        Path(datasets.config.HF_DATASETS_CACHE)
        / "smolfactory-readable"
        / (f"{path.stem}-{hashlib.sha256(data).hexdigest()[:16]}.jsonl")
    )
    if not copy.is_file():
        lines = data.split(b"\n")
        for number, problem in bad:
            lines[number - 1] = json.dumps({UNREADABLE: problem}).encode()
        with atomic_file(copy) as staging:
            staging.write_bytes(b"\n".join(lines))
    return copy
