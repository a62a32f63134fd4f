"""Scoring a model on lm-evaluation-harness tasks: lm-eval's registry, local task YAML files, the tasks we ship;
generation tasks scored by our reward functions; and the ``smolfactory evaluate`` command.

smolfactory evaluate --model outputs/quickstart/final --tasks arc_easy --limit 100
smolfactory evaluate --model builtin:smollm2-135m-instruct --tasks builtin:quickstart-grpo --apply_chat_template
smolfactory evaluate --checkpoint outputs/quickstart/checkpoints/last.ckpt --tasks my_tasks/ --output results.json

lm-eval is imported inside the functions that use it: its import takes seconds, and ``import smolfactory`` must not.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import random
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from peft import PeftModel
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from smolfactory.errors import SmolFactoryError, first_line
from smolfactory.rewards import Reward, call

INSTALL = "pip install 'smolfactory[eval]'"
BUILTIN_PREFIX = "builtin:"
QUICKSTART_DATA = Path(__file__).parent / "data" / "quickstart"


# --- Tasks ------------------------------------------------------------------------------------------------------


def require_lm_eval() -> None:
    """Stop with the pip command when lm-evaluation-harness is not installed."""
    try:
        import lm_eval  # noqa: F401
    except ImportError as error:
        raise SmolFactoryError(
            f"task evaluation needs lm-evaluation-harness ({first_line(error)}); {INSTALL}"
        ) from error


def quickstart_grpo_task() -> dict[str, Any]:
    """``builtin:quickstart-grpo``: the GRPO quickstart's 64 held-out questions ("Which number is larger, 17 or
    32?"), greedy answers of at most 16 tokens (as the recipe samples) scored by its own reward, ``exact_answer``
    with the first number of the answer. A dict, not a YAML file, so the data file is found wherever the package is
    installed; it reads as the YAML a user would write (README)."""
    return {
        "task": "smolfactory_quickstart_grpo",
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(QUICKSTART_DATA / "grpo_validation.jsonl")}},
        "test_split": "test",
        "output_type": "generate_until",
        "doc_to_text": "{{prompt}}",
        "doc_to_target": "{{answer}}",
        "generation_kwargs": {"until": [], "max_gen_toks": 16, "do_sample": False},
        "process_results": reward_results("smolfactory.rewards.exact_answer", extract="first_number"),
        "metric_list": [{"metric": "exact_answer", "aggregation": "mean", "higher_is_better": True}],
        "metadata": {"version": 1.0},
    }


BUILTIN_TASKS: dict[str, Callable[[], dict[str, Any]]] = {"quickstart-grpo": quickstart_grpo_task}


def split_names(tasks: Sequence[str]) -> list[str]:
    """Task names as given, lm-eval's comma-separated form included (``arc_easy,hellaswag``)."""
    return [name.strip() for entry in tasks for name in entry.split(",") if name.strip()]


class TaskSelection(NamedTuple):
    """Tasks checked and ready for lm-eval's ``simple_evaluate`` (its ``tasks`` and ``task_manager``)."""

    specs: list[str | dict[str, Any]]
    manager: Any  # lm_eval.tasks.TaskManager (imported lazily)


def resolve_tasks(tasks: Sequence[str], include_path: Sequence[str] = ()) -> TaskSelection:
    """The tasks named, every name checked before any model loads.

    A name is one of lm-eval's tasks, groups or tags (or one that a folder in ``include_path`` defines), a task
    YAML file, a folder of task YAML files (its tasks), or ``builtin:<name>`` for a task we ship. lm-eval's own
    registry is indexed (about 10 s) only when a name is none of the others.

    Raises:
        SmolFactoryError: lm-eval is not installed, no task is given, or a name is none of the above.
    """
    require_lm_eval()
    from lm_eval.tasks import TaskManager

    names = split_names(tasks)
    if not names:
        raise SmolFactoryError("no task given; name lm-eval tasks (`lm-eval ls tasks`), task YAML files or folders")
    folders = [str(path) for path in include_path]
    for path in folders:
        if not Path(path).is_dir():
            raise SmolFactoryError(f"include_path {path} is not a folder; give folders of task YAML files")
    folders += [name for name in names if Path(name).is_dir()]
    manager = TaskManager(include_path=folders or None, include_defaults=False)
    local = {name for name in names if name.startswith(BUILTIN_PREFIX) or Path(name).exists()}
    if not local.union(manager.all_tasks).issuperset(names):  # lm-eval's own registry is needed
        manager = TaskManager(include_path=folders or None)
    specs: list[str | dict[str, Any]] = []
    for name in names:
        if name.startswith(BUILTIN_PREFIX):
            specs.append(builtin_task(name))
        elif Path(name).is_dir():  # the tasks the folder defines
            specs += TaskManager(include_path=name, include_defaults=False).all_subtasks
        elif Path(name).is_file() or name in manager.all_tasks:
            specs.append(name)
        else:
            where = f" or the folders {', '.join(folders)}" if folders else ""
            raise SmolFactoryError(
                f"unknown task {name!r}: not in lm-eval's registry{where}, nor a task YAML file or folder; "
                "`lm-eval ls tasks` lists the registry, --include_path adds folders of your own"
            )
    return TaskSelection(specs, manager)


def builtin_task(name: str) -> dict[str, Any]:
    """The config of a task we ship, by its ``builtin:`` name."""
    key = name[len(BUILTIN_PREFIX) :]
    if key not in BUILTIN_TASKS:
        shipped = ", ".join(BUILTIN_PREFIX + known for known in BUILTIN_TASKS)
        raise SmolFactoryError(f"unknown built-in task {name!r}; the built-in tasks are {shipped}")
    return BUILTIN_TASKS[key]()


# --- Generation tasks scored by reward functions ----------------------------------------------------------------


def reward_results(function: str, answer: str = "answer", **arguments: Any) -> Callable[[dict, list], dict]:
    """An lm-eval ``process_results`` that scores a generated answer with a reward function (one definition of
    "correct" for GRPO training and evaluation). In a task's folder, ``utils.py``::

        from smolfactory.evaluation import reward_results
        process_results = reward_results("smolfactory.rewards.exact_answer", extract="first_number")

    and in its YAML ``process_results: !function utils.process_results`` with a ``metric_list`` entry named as the
    function (``exact_answer``, aggregation ``mean``).

    The function is called as GRPO calls it, for one completion: ``prompts`` (the document's ``prompt``, if any),
    ``completions`` (the generated text), ``completion_ids`` (empty: lm-eval hands over text only), and every
    column of the document by name, with the column named ``answer`` passed as ``answer``.

    Args:
        function: Import path of the reward (``smolfactory.rewards.exact_answer``, ``my_rewards.is_polite``) or the
            bare name of one we ship.
        answer: The document column that holds the reference answer.
        **arguments: Bound to the function (``extract="first_number"``).

    Returns:
        ``process_results(doc, results) -> {name: value}``, the name being the function's; None (not applicable)
        becomes NaN.
    """
    reward = Reward(function, arguments=arguments or None)
    loaded = reward.load("process_results")

    def process_results(doc: dict[str, Any], results: list[str]) -> dict[str, float]:
        if answer not in doc:
            raise SmolFactoryError(
                f"process_results ({reward.name}): the document has no column {answer!r} (it has "
                f"{', '.join(doc)}); pass answer=<column> to reward_results"
            )
        columns = {key: [value] for key, value in doc.items()} | {"answer": [doc[answer]]}
        arguments = columns | {"prompts": [doc.get("prompt")], "completions": results[:1], "completion_ids": [[]]}
        value = call(loaded, arguments)[0]
        return {reward.name: value}

    return process_results


# --- Running lm-eval on a model in memory -----------------------------------------------------------------------


def evaluate(
    model: PreTrainedModel | PeftModel,
    tokenizer: PreTrainedTokenizerBase,
    tasks: TaskSelection,
    limit: float | None = None,
    num_fewshot: int | None = None,
    batch_size: int = 8,
    apply_chat_template: bool = False,
    bootstrap_iters: int = 100_000,
) -> dict[str, Any] | None:
    """lm-eval's results for a model already in memory (a PeftModel too): no second copy is loaded.

    ``tasks`` come from ``resolve_tasks``; ``bootstrap_iters`` 0 skips the standard errors that need resampling.

    The model is put in eval mode (lm-eval's wrapper does so); callers that train restore it afterwards. lm-eval
    seeds Python's, NumPy's and torch's generators, as its own command does, so scores equal those of
    ``lm_eval --model hf``; the caller's generators are left as they were.

    Returns:
        lm-eval's results dict (``results``, ``versions``, ``n-shot``, ``config``, ...), or None on a process
        whose ``LOCAL_RANK`` is not 0 (lm-eval returns results there only).
    """
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    # A copy: lm-eval may give the tokenizer a pad token, and the data module's must stay as it is. Its warnings
    # that an in-memory model ignores loading options, and is scored in one process, say nothing to our users.
    wrapper_log = logging.getLogger("lm_eval.models.huggingface")
    level = wrapper_log.level
    wrapper_log.setLevel(logging.ERROR)
    try:
        lm = HFLM(pretrained=model, tokenizer=copy.deepcopy(tokenizer), batch_size=batch_size)
    finally:
        wrapper_log.setLevel(level)
    with generators_kept():
        return simple_evaluate(
            model=lm,
            tasks=tasks.specs,
            task_manager=tasks.manager,
            limit=limit,
            num_fewshot=num_fewshot,
            apply_chat_template=apply_chat_template,
            log_samples=False,
            bootstrap_iters=bootstrap_iters,
        )


@contextmanager
def generators_kept() -> Iterator[None]:
    """Python's, NumPy's and torch's random generators as they were before the block (lm-eval reseeds them)."""
    python_state, numpy_state = random.getstate(), np.random.get_state()
    try:
        # Only the current GPU's generator: forking every visible one warns on multi-GPU machines.
        devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
        with torch.random.fork_rng(devices=devices):
            yield
    finally:
        random.setstate(python_state)
        np.random.set_state(numpy_state)


def task_metrics(results: dict[str, Any], prefix: str = "eval_") -> dict[str, float]:
    """Each task's (and group's) scores as ``<prefix><task>_<metric>``, the filter appended unless it is lm-eval's
    ``none`` (``eval_gsm8k_exact_match_strict-match``); standard errors left out. Underscores, like ``val_loss``:
    one CSV column each, and no ``/`` for loggers to turn into folders."""
    metrics: dict[str, float] = {}
    for task, values in {**results.get("results", {}), **results.get("groups", {})}.items():
        for key, value in values.items():
            metric, comma, filter_name = key.partition(",")
            # Scores are "<metric>,<filter>"; alias, sample_len and the like are about the task, not scores.
            if not comma or metric.endswith("_stderr") or not isinstance(value, int | float) or isinstance(value, bool):
                continue
            suffix = "" if filter_name == "none" else f"_{filter_name}"
            metrics[f"{prefix}{task}_{metric}{suffix}"] = float(value)
    return metrics


def results_table(results: dict[str, Any]) -> str:
    """lm-eval's own tables (tasks, then groups) as its command prints them."""
    from lm_eval.utils import make_table

    tables = [make_table(results)]
    if results.get("groups"):
        tables.append(make_table(results, "groups"))
    return "\n".join(tables)


def write_results(results: dict[str, Any], path: str | Path) -> Path:
    """The results as JSON, written atomically (lm-eval's own conversion of what JSON cannot hold)."""
    from lm_eval.utils import handle_non_serializable

    from smolfactory.export import atomic_file

    with atomic_file(path) as staging:
        staging.write_text(json.dumps(results, indent=2, default=handle_non_serializable, ensure_ascii=False))
    return Path(path)


# --- The command ------------------------------------------------------------------------------------------------


def load_for_evaluation(
    model: str | None, checkpoint: str | None, device: str
) -> tuple[PreTrainedModel | PeftModel, PreTrainedTokenizerBase]:
    """The model to score in eval mode on ``device``, and its tokenizer: a folder (an adapter folder with its base,
    as ``chat`` loads it), a Hub id or ``builtin:``, or the model a checkpoint was saved from (as ``export``
    rebuilds it, with the chat template its data module trained with)."""
    if checkpoint is None:
        from smolfactory.chat import load_chat_model
        from smolfactory.model.loading import DEFAULT_MODEL

        name = model or DEFAULT_MODEL
        if not name.startswith(BUILTIN_PREFIX) and Path(name).exists() and not Path(name, "config.json").is_file():
            if not Path(name, "adapter_config.json").is_file():
                raise SmolFactoryError(
                    f"{name} holds neither config.json nor adapter_config.json; give a model or adapter folder "
                    "(such as a run's final/), a Hub id or builtin:smollm2-135m-instruct"
                )
        return load_chat_model(name, device)
    from smolfactory.export import model_from_saved, read_checkpoint

    loaded, tokenizer = model_from_saved(read_checkpoint(Path(checkpoint)))
    return loaded.to(device).eval(), tokenizer


def parse_limit(text: str) -> float:
    """``--limit``: a count of documents per task (100) or a fraction of each task (0.1)."""
    value = float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError("give a positive count (100) or a fraction (0.1)")
    return int(value) if value >= 1 and value.is_integer() else value


def main(args: list[str]) -> None:
    parser = argparse.ArgumentParser(
        prog="smolfactory evaluate",
        description="Score a model folder, an adapter folder or a checkpoint's model on lm-evaluation-harness tasks.",
    )
    parser.add_argument("--model", help="model folder, adapter folder, Hub id or builtin:... (default: the built-in)")
    parser.add_argument("--checkpoint", help="a .ckpt file or sharded folder: score the model it was saved from")
    parser.add_argument(
        "--tasks", nargs="+", required=True,
        help="lm-eval tasks, groups or tags (`lm-eval ls tasks`), task YAML files or folders, builtin:quickstart-grpo",
    )  # fmt: skip
    parser.add_argument("--include_path", nargs="*", default=[], help="folders of task YAML files to add to lm-eval's")
    parser.add_argument("--limit", type=parse_limit, help="documents per task: a count (100) or a fraction (0.1)")
    parser.add_argument("--num_fewshot", type=int, help="few-shot examples (default: each task's own)")
    parser.add_argument("--batch_size", type=int, default=8, help="requests per forward pass")
    parser.add_argument("--apply_chat_template", action="store_true", help="render prompts with the chat template")
    parser.add_argument(
        "--device",
        default="cuda" if torch.cuda.is_available() else "cpu",
        help="cuda (a model or adapter folder loads in bfloat16 there, as chat loads it) or cpu (float32)",
    )
    parser.add_argument("--output", help="write lm-eval's results as JSON to this file")
    options = parser.parse_args(args)
    if options.model and options.checkpoint:
        raise SmolFactoryError("give --model or --checkpoint, not both (a checkpoint names its own model)")
    if options.output:
        from smolfactory.export import writable_file

        writable_file(options.output, "--output")  # before the evaluation, not after it
    tasks = resolve_tasks(options.tasks, options.include_path)  # an unknown task stops here, before loading
    model, tokenizer = load_for_evaluation(options.model, options.checkpoint, options.device)
    results = evaluate(
        model,
        tokenizer,
        tasks,
        limit=options.limit,
        num_fewshot=options.num_fewshot,
        batch_size=options.batch_size,
        apply_chat_template=options.apply_chat_template,
    )
    print(results_table(results))
    if options.output:
        if Path(options.output).exists():
            print(f"Replacing {options.output}", file=sys.stderr)
        print(f"Wrote {write_results(results, options.output)}", file=sys.stderr)
