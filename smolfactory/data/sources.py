"""Where rows come from: a built-in dataset, a local json/jsonl/parquet/csv file, or a Hub dataset."""

from __future__ import annotations

from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path

import datasets

from smolfactory.data.formats import Format
from smolfactory.errors import SmolFactoryError, first_line
from smolfactory.model.loading import BUILTIN_PREFIX

# Built-in datasets: name -> {split: file inside smolfactory/data}
BUILTIN_DATASETS = {
    "quickstart": {"train": "quickstart/train.jsonl", "validation": "quickstart/validation.jsonl"},
    "quickstart-preference": {
        "train": "quickstart/preference_train.jsonl",
        "validation": "quickstart/preference_validation.jsonl",
    },
}
FILE_LOADERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}


@dataclass(frozen=True)
class DatasetSource:
    """One dataset to train on, and how much of it."""

    path: str
    """Hub dataset id, local json/jsonl/parquet/csv file, or a built-in dataset (builtin:quickstart)."""
    name: str | None = None
    """Hub dataset configuration (subset) name."""
    split: str = "train"
    """Split to read (Hub datasets; local files have one split)."""
    revision: str | None = None
    """Hub dataset revision: a branch, tag or commit."""
    format: Format | None = None
    """Row layout of this dataset; null uses data.format."""
    columns: dict[str, str] | None = None
    """Column renames of this dataset; null uses data.columns."""
    weight: float | None = None
    """Mixing weight: the dataset contributes weight x its examples (0.5 half of them, 2 each one twice)."""
    num_samples: int | None = None
    """Mixing by count: exactly this many examples from the dataset, repeating it if needed."""

    def __post_init__(self) -> None:
        if (self.weight is not None and self.weight <= 0) or (self.num_samples is not None and self.num_samples < 1):
            raise SmolFactoryError(f"dataset {self.path}: weight must be > 0 and num_samples >= 1")
        if self.weight is not None and self.num_samples is not None:
            raise SmolFactoryError(f"dataset {self.path}: give weight or num_samples, not both")


def builtin_split_path(name: str, split: str) -> Path:
    """The packaged file of a built-in dataset's split."""
    relative = BUILTIN_DATASETS[name].get(split)
    if relative is None:
        raise SmolFactoryError(f"built-in dataset {BUILTIN_PREFIX}{name} has no '{split}' split")
    return Path(str(files("smolfactory.data").joinpath(relative)))


def load_rows(spec: DatasetSource, streaming: bool = False) -> datasets.Dataset | datasets.IterableDataset:
    """Load one split of a dataset (lazily with ``streaming``), with a one-line error when that fails."""
    source, split = spec.path, spec.split
    if source.startswith(BUILTIN_PREFIX):
        name = source[len(BUILTIN_PREFIX) :]
        if name not in BUILTIN_DATASETS:
            known = ", ".join(BUILTIN_PREFIX + n for n in BUILTIN_DATASETS)
            raise SmolFactoryError(f"unknown built-in dataset '{source}'; known: {known}")
        return _load_file(builtin_split_path(name, split), streaming)
    path = Path(source).expanduser()
    if path.suffix.lower() in FILE_LOADERS or path.exists():
        if not path.is_file():
            raise SmolFactoryError(
                f"dataset file not found: {source} (cwd {Path.cwd()}); check data.dataset, or give a Hub id"
            )
        return _load_file(path, streaming)
    try:
        return datasets.load_dataset(source, spec.name, split=split, revision=spec.revision, streaming=streaming)
    except Exception as error:  # datasets raises many types for a missing or unreachable dataset
        raise SmolFactoryError(
            f"could not load dataset '{source}' split '{split}' ({first_line(error)}); give a local "
            f"{'/'.join(FILE_LOADERS)} file or a Hub dataset id you can reach"
        ) from error


def _load_file(path: Path, streaming: bool) -> datasets.Dataset | datasets.IterableDataset:
    loader = FILE_LOADERS.get(path.suffix.lower())
    if loader is None:
        raise SmolFactoryError(f"dataset file {path} has an unknown type; use one of {', '.join(FILE_LOADERS)}")
    try:
        return datasets.load_dataset(loader, data_files=str(path), split="train", streaming=streaming)
    except Exception as error:
        raise SmolFactoryError(
            f"could not read dataset file {path} ({first_line(error)}); check that it is valid {loader}"
        ) from error
