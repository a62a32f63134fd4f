"""lm-eval task evaluation: the in-training callback, the `smolfactory evaluate` command, local tasks scored by our
reward functions, adapters, DDP and FSDP, and the one-line errors.

Two local tasks, written by the tests: a multiple-choice one (loglikelihoods: acc, acc_norm) and a generation one
scored by reward functions through `reward_results` (exact_answer on the first number, and a test reward that counts
the answer's characters, so that a random model still gets a score that depends on every generated token).
"""

from __future__ import annotations

import ast
import csv
import json
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml
from lightning.pytorch.loggers import CSVLogger
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from smolfactory import LoraSettings, SFTModule
from smolfactory.callbacks.evaluation import TaskEvaluation
from smolfactory.errors import SmolFactoryError
from smolfactory.evaluation import reward_results
from tests.conftest import QUICKSTART, ROOT, fit, run_script, smolfactory, stand_in_config, tiny_overrides, write_jsonl

CHOICES = [
    {"question": "What colour is the sky?", "choices": ["blue", "green", "loud"], "label": 0},
    {"question": "How many legs has a cat?", "choices": ["two", "four", "nine"], "label": 1},
    {"question": "Which is a fruit?", "choices": ["stone", "chair", "apple"], "label": 2},
    {"question": "What do bees make?", "choices": ["honey", "steel", "glass"], "label": 0},
    {"question": "Which is larger, 3 or 30?", "choices": ["3", "30"], "label": 1},
    {"question": "What is frozen water?", "choices": ["steam", "ice", "sand"], "label": 1},
]
NUMBERS = [{"prompt": f"Which number is larger, {a} or {b}?", "answer": str(max(a, b))} for a, b in
           [(3, 7), (12, 5), (40, 41), (9, 2), (17, 32)]]  # fmt: skip
CHOICE_METRICS = {"eval_tiny_choice_acc", "eval_tiny_choice_acc_norm"}
NUMBER_METRICS = {"eval_tiny_numbers_exact_answer", "eval_tiny_numbers_answer_chars"}


def answer_chars(prompts, completions, **kwargs) -> list[float]:
    """A test reward: the answer's length in characters (depends on every token a random model generates)."""
    return [float(len(completion)) for completion in completions]


UTILS = """from smolfactory.evaluation import reward_results

exact = reward_results("smolfactory.rewards.exact_answer", extract="first_number")
length = reward_results("tests.test_evaluation.answer_chars")


def process_results(doc, results):
    return exact(doc, results) | length(doc, results)
"""


@pytest.fixture(scope="session")
def task_folder(tmp_path_factory) -> Path:
    """A folder with the two local tasks, tiny_choice and tiny_numbers, as a user would write them."""
    folder = tmp_path_factory.mktemp("tasks")
    choice = {
        "task": "tiny_choice",
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(write_jsonl(folder / "choice.jsonl", CHOICES))}},
        "test_split": "test",
        "output_type": "multiple_choice",
        "doc_to_text": "Question: {{question}}\nAnswer:",
        "doc_to_choice": "{{choices}}",
        "doc_to_target": "{{label}}",
        "metric_list": [{"metric": "acc"}, {"metric": "acc_norm"}],
    }
    numbers = {
        "task": "tiny_numbers",
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(write_jsonl(folder / "numbers.jsonl", NUMBERS))}},
        "test_split": "test",
        "output_type": "generate_until",
        "doc_to_text": "{{prompt}}",
        "doc_to_target": "{{answer}}",
        "generation_kwargs": {"until": ["\n"], "max_gen_toks": 6, "do_sample": False},
        "metric_list": [
            {"metric": "exact_answer", "aggregation": "mean", "higher_is_better": True},
            {"metric": "answer_chars", "aggregation": "mean", "higher_is_better": True},
        ],
    }
    (folder / "choice.yaml").write_text(yaml.safe_dump(choice))
    # lm-eval's YAML tag for a function in the task's folder
    (folder / "numbers.yaml").write_text(yaml.safe_dump(numbers) + "process_results: !function utils.process_results\n")
    (folder / "utils.py").write_text(UTILS)
    return folder


def lm_eval_scores(folder: str, task_folder: Path, model_args: str = "") -> dict[str, float]:
    """lm-eval's own `simple_evaluate` on a saved folder, as a user would run it: the reference numbers."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    from smolfactory.evaluation import task_metrics

    manager = TaskManager(include_path=str(task_folder), include_defaults=False)
    results = simple_evaluate(
        model="hf", model_args=f"pretrained={folder},dtype=float32{model_args}", tasks=["tiny_choice", "tiny_numbers"],
        task_manager=manager, device="cpu", batch_size=4, log_samples=False, bootstrap_iters=0,
    )  # fmt: skip
    return task_metrics(results)


def merged_folder(base: str, adapter: Path, output: Path) -> str:
    """An adapter folder merged into its base, saved as a plain model folder with the adapter's tokenizer."""
    merged = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), adapter).merge_and_unload()
    merged.save_pretrained(output)
    AutoTokenizer.from_pretrained(adapter).save_pretrained(output)
    return str(output)


# --- reward_results -----------------------------------------------------------------------------------------------


def test_reward_results_scores_a_generation_with_a_reward_function():
    process = reward_results("smolfactory.rewards.exact_answer", extract="first_number")
    doc = {"prompt": "Which number is larger, 17 or 32?", "answer": "32"}
    assert process(doc, ["32 is larger than 17."]) == {"exact_answer": 1.0}
    assert process(doc, ["17 is smaller than 32."]) == {"exact_answer": 0.0}  # the first number, as GRPO scores
    other_column = reward_results("exact_answer", answer="target")
    assert other_column({"target": 5}, ["It is 5"]) == {"exact_answer": 1.0}
    with pytest.raises(SmolFactoryError, match="no column 'answer'.*answer=<column>"):
        process({"target": "32"}, ["32"])
    with pytest.raises(SmolFactoryError, match="cannot import smolfactory.rewards.no_such"):
        reward_results("smolfactory.rewards.no_such")


def test_tasks_are_names_files_folders_or_built_in(task_folder):
    """What --tasks and `evaluation.tasks` take, resolved without indexing lm-eval's registry (none is needed)."""
    from smolfactory.evaluation import resolve_tasks

    by_name = resolve_tasks(["tiny_choice,tiny_numbers"], [str(task_folder)])
    assert by_name.specs == ["tiny_choice", "tiny_numbers"]
    assert "arc_easy" not in by_name.manager.all_tasks  # only the local folder was indexed
    assert sorted(resolve_tasks([str(task_folder)]).specs) == ["tiny_choice", "tiny_numbers"]
    assert resolve_tasks([str(task_folder / "choice.yaml")]).specs == [str(task_folder / "choice.yaml")]
    (builtin,) = resolve_tasks(["builtin:quickstart-grpo"]).specs
    assert (
        builtin["task"] == "smolfactory_quickstart_grpo"
        and Path(builtin["dataset_kwargs"]["data_files"]["test"]).is_file()
    )


@pytest.mark.slow
def test_the_built_in_task_runs_out_of_the_box(capfd, tiny_model_dir):
    """builtin:quickstart-grpo: the GRPO quickstart's held-out questions, scored by its reward (on the tiny model:
    a few questions, to see it run; README gives the built-in model's score)."""
    run = smolfactory(capfd, "evaluate", "--model", tiny_model_dir, "--tasks", "builtin:quickstart-grpo", "--limit",
                      2, "--apply_chat_template", "--device", "cpu")  # fmt: skip
    assert run.code == 0, run.err
    assert "|smolfactory_quickstart_grpo|" in run.out and "exact_answer" in run.out


# --- the callback -------------------------------------------------------------------------------------------------


class Probe(L.Callback):
    """Records, after each evaluation, whether the model was back in training mode with gradients on."""

    def __init__(self) -> None:
        self.after: list[tuple[bool, bool]] = []

    def on_train_batch_end(self, trainer, pl_module, *args) -> None:  # runs after TaskEvaluation's (listed first)
        self.after.append((pl_module.model.training, torch.is_grad_enabled()))


@pytest.mark.slow
def test_the_in_training_score_equals_lm_eval_on_the_exported_folder(tiny_model_dir, tiny_data, task_folder, tmp_path):
    """A LoRA fit with dropout and gradient checkpointing, scored after every step by lm-eval's wrapper around the
    PeftModel being trained: the score at the last step equals lm-eval's on the folder the fit exported (merged),
    the metrics reach the CSV logger, and training is exactly that of a fit without scoring (lm-eval reseeds the
    generators that dropout draws from; they are restored). A full fine-tune is a plain model: the command's tests
    score one."""
    from smolfactory.callbacks import HFExport
    from tests.conftest import StepRecorder

    def module() -> SFTModule:
        return SFTModule(model_name=tiny_model_dir, lora=LoraSettings(r=4, alpha=8, dropout=0.3),
                         gradient_checkpointing=True)  # fmt: skip

    evaluation = TaskEvaluation(
        tasks=["tiny_choice", "tiny_numbers"], include_path=[str(task_folder)], batch_size=4, every_n_steps=1
    )
    probe, recorder = Probe(), StepRecorder()
    logger = CSVLogger(tmp_path, name="logs")
    L.seed_everything(0)
    trainer = L.Trainer(
        accelerator="cpu", max_steps=2, limit_val_batches=0, logger=logger, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False,
        default_root_dir=tmp_path, callbacks=[recorder, evaluation, probe, HFExport()],
    )  # fmt: skip
    trainer.fit(module(), datamodule=tiny_data)
    assert set(evaluation.latest) == CHOICE_METRICS | NUMBER_METRICS
    assert probe.after == [(True, True)] * 2  # training mode and gradients back after each evaluation
    merged = merged_folder(tiny_model_dir, tmp_path / "final", tmp_path / "merged")
    assert evaluation.latest == pytest.approx(lm_eval_scores(merged, task_folder), abs=1e-6)
    rows = list(csv.DictReader((Path(logger.log_dir) / "metrics.csv").open()))
    assert [row["step"] for row in rows if row["eval_tiny_choice_acc"]] == ["1", "2"]
    assert fit(module(), tiny_data, tmp_path / "plain", max_steps=2).losses == recorder.losses


def test_without_tasks_the_callback_is_off_and_lm_eval_is_never_imported(monkeypatch):
    """The CLI always registers the callback: without tasks it must cost nothing, and lm-eval (seconds to import)
    is imported only inside the functions that run it, never when smolfactory is imported."""
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # any import of lm_eval now fails
    callback = TaskEvaluation()
    callback.setup(None, None, "fit")
    assert callback.evaluate(None, None) == {}
    top_level = [
        f"{path.name}: {ast.unparse(node)}"
        for path in (ROOT / "smolfactory").rglob("*.py")
        for node in ast.parse(path.read_text()).body  # module level only: imports inside functions are lazy
        if isinstance(node, ast.Import | ast.ImportFrom) and "lm_eval" in ast.unparse(node)
    ]
    assert top_level == []


# --- the command --------------------------------------------------------------------------------------------------


def evaluate_args(task_folder: Path, *args: object) -> list[object]:
    """`smolfactory evaluate` on the two local tasks, on the CPU."""
    return ["evaluate", "--tasks", "tiny_choice,tiny_numbers", "--include_path", task_folder, "--batch_size", 4,
            "--device", "cpu", *args]  # fmt: skip


@pytest.fixture(scope="module")
def perturbed_adapter(tiny_adapter_dir, tmp_path_factory) -> str:
    """The tiny adapter with its LoRA B matrices made nonzero (peft starts them at zero: a no-op adapter)."""
    from safetensors.torch import load_file, save_file

    folder = tmp_path_factory.mktemp("perturbed-adapter")
    for path in Path(tiny_adapter_dir).iterdir():
        (folder / path.name).write_bytes(path.read_bytes())
    weights = load_file(folder / "adapter_model.safetensors")
    generator = torch.Generator().manual_seed(0)
    for name, value in weights.items():
        if "lora_B" in name:
            weights[name] = torch.randn(value.shape, generator=generator) * 0.5
    save_file(weights, folder / "adapter_model.safetensors")
    return str(folder)


@pytest.mark.slow
def test_evaluate_scores_a_folder_and_an_adapter_as_lm_eval_does(capfd, tiny_model_dir, perturbed_adapter,
                                                                 task_folder, tmp_path):  # fmt: skip
    """The command on a model folder equals lm-eval on that folder; on an adapter folder (base + adapter, as chat
    loads it) it equals lm-eval on the merged model, and differs from the base (the adapter is no no-op)."""
    base = smolfactory(capfd, *evaluate_args(task_folder, "--model", tiny_model_dir, "--output", tmp_path / "a.json"))
    assert base.code == 0, base.err
    assert "|tiny_choice |" in base.out and "exact_answer" in base.out  # lm-eval's table
    written = json.loads((tmp_path / "a.json").read_text())
    from smolfactory.evaluation import task_metrics

    assert task_metrics(written) == pytest.approx(lm_eval_scores(tiny_model_dir, task_folder), abs=1e-6)
    assert not list(tmp_path.glob(".*"))  # written atomically: no staging file left

    # The tasks given as the paths of their YAML files this time (numbers.yaml's !function found beside it).
    files = [task_folder / "choice.yaml", task_folder / "numbers.yaml"]
    args = ["evaluate", "--tasks", *files, "--batch_size", 4, "--device", "cpu", "--model", perturbed_adapter]
    adapter = smolfactory(capfd, *args, "--output", tmp_path / "b.json")
    assert adapter.code == 0, adapter.err
    scores = task_metrics(json.loads((tmp_path / "b.json").read_text()))
    merged = merged_folder(tiny_model_dir, Path(perturbed_adapter), tmp_path / "merged")
    assert scores == pytest.approx(lm_eval_scores(merged, task_folder), abs=1e-6)
    assert scores != pytest.approx(task_metrics(written), abs=1e-6)


@pytest.mark.slow
def test_fit_from_yaml_logs_task_scores_and_a_checkpoint_scores_the_same(capfd, tiny_model_dir, task_folder,
                                                                         tmp_path):  # fmt: skip
    """`evaluation:` in a config turns the callback on in `smolfactory fit`: the scores at the validation after
    the last step are in metrics.csv, and `smolfactory evaluate --checkpoint` on last.ckpt gives the same."""
    evaluation = {"tasks": ["tiny_choice", "tiny_numbers"], "include_path": [str(task_folder)], "batch_size": 4}
    config = stand_in_config(tmp_path, tiny_model_dir, evaluation=evaluation)
    run = smolfactory(capfd, "fit", "--config", QUICKSTART, "--config", tiny_overrides(tmp_path, tiny_model_dir),
                      "--config", config, "--samples.prompts=[]")  # fmt: skip
    assert run.code == 0, run.err
    assert "Task evaluation at step 2" in run.out
    rows = list(csv.DictReader((next(tmp_path.rglob("metrics.csv"))).open()))
    logged = {name: float(value) for row in rows for name, value in row.items() if name.startswith("eval_") and value}
    assert set(logged) == CHOICE_METRICS | NUMBER_METRICS
    scored = smolfactory(capfd, *evaluate_args(task_folder, "--checkpoint", tmp_path / "checkpoints" / "last.ckpt",
                                               "--output", tmp_path / "c.json"))  # fmt: skip
    assert scored.code == 0, scored.err
    from smolfactory.evaluation import task_metrics

    assert task_metrics(json.loads((tmp_path / "c.json").read_text())) == pytest.approx(logged, abs=1e-5)


# --- one-line errors ----------------------------------------------------------------------------------------------

ERRORS = {
    "unknown task": (
        ["--tasks", "no_such_task"],
        "unknown task 'no_such_task': not in lm-eval's registry or the "
        "folders {tasks}, nor a task YAML file or folder; `lm-eval ls tasks` lists the registry",
    ),
    "unknown built-in task": (
        ["--tasks", "builtin:nope"],
        "unknown built-in task 'builtin:nope'; the built-in tasks are builtin:quickstart-grpo",
    ),
    "include_path not a folder": (
        ["--tasks", "tiny_choice", "--include_path", "{tasks}/choice.yaml"],
        "include_path {tasks}/choice.yaml is not a folder",
    ),
    "not a model folder": (
        ["--tasks", "tiny_choice", "--model", "{tasks}"],
        "{tasks} holds neither config.json nor adapter_config.json; give a model or adapter folder",
    ),
    "model and checkpoint": (
        ["--tasks", "tiny_choice", "--model", "{tasks}", "--checkpoint", "last.ckpt"],
        "give --model or --checkpoint, not both",
    ),
    "no lm-eval": (["--tasks", "tiny_choice"], "task evaluation needs lm-evaluation-harness"),
    "output is a folder": (["--tasks", "tiny_choice", "--output", "{tasks}"], "--output {tasks} is a folder"),
}


@pytest.mark.parametrize(
    "case", [pytest.param(case, marks=[pytest.mark.slow] if case == "unknown task" else []) for case in ERRORS]
)  # the unknown task is looked up in lm-eval's whole registry, which takes seconds to index
def test_problems_are_one_line_with_status_2(capfd, monkeypatch, task_folder, case):
    args, message = ERRORS[case]
    if case == "no lm-eval":
        monkeypatch.setitem(sys.modules, "lm_eval", None)  # what an environment without the extra sees
    base = ["evaluate", "--include_path", task_folder] if "--include_path" not in args else ["evaluate"]
    run = smolfactory(capfd, *base, *[arg.format(tasks=task_folder) for arg in args])
    assert run.code == 2, run.err
    assert run.error.startswith("error: " + message.format(tasks=task_folder)), run.error
    assert len(run.err.strip().splitlines()) == 1, run.err
    if case == "no lm-eval":
        assert run.error.endswith("pip install 'smolfactory[eval]'")


def test_fit_with_an_unknown_task_stops_before_training(capfd, tiny_model_dir, tmp_path):
    config = stand_in_config(tmp_path, tiny_model_dir, evaluation={"tasks": ["builtin:nope"]})
    run = smolfactory(capfd, "fit", "--config", QUICKSTART, "--config", tiny_overrides(tmp_path, tiny_model_dir),
                      "--config", config)  # fmt: skip
    assert run.code == 2 and run.error.startswith("error: unknown built-in task 'builtin:nope'"), run.err
    assert not (tmp_path / "checkpoints").exists()


# --- DDP and FSDP -------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_two_processes_score_once_or_in_lockstep_as_lm_eval_does(tiny_model_dir, task_folder, tmp_path):
    """DDP: rank 0 scores while rank 1 waits. FSDP2 and FSDP: both ranks run every request in lockstep (each
    forward needs both shards). Either way both ranks get the same metrics, equal to lm-eval's on the exported
    model. One launch runs the three strategies in turn (each launch of two processes costs seconds)."""
    from tests.conftest import RAGGED

    data = write_jsonl(tmp_path / "ragged.jsonl", RAGGED)
    run_script("tests/distributed_evaluation.py", tiny_model_dir, data, task_folder, tmp_path)
    for strategy in ("ddp", "fsdp2", "fsdp"):
        ranks = [json.loads((tmp_path / f"{strategy}-rank{rank}.json").read_text()) for rank in (0, 1)]
        assert [rank["runs"] for rank in ranks] == ([1, 0] if strategy == "ddp" else [1, 1]), strategy
        assert ranks[0]["metrics"] == ranks[1]["metrics"], strategy
        assert set(ranks[0]["metrics"]) == CHOICE_METRICS | NUMBER_METRICS, strategy
        merged = merged_folder(tiny_model_dir, tmp_path / strategy / "final", tmp_path / f"{strategy}-merged")
        assert ranks[0]["metrics"] == pytest.approx(lm_eval_scores(merged, task_folder), abs=1e-5), strategy
