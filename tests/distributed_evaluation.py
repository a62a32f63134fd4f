"""Two CPU processes fit a tiny LoRA model for one step with TaskEvaluation, under DDP, FSDP2 and FSDP in turn, and
record what each rank scored.

    python tests/distributed_evaluation.py MODEL_DIR DATA_PATH TASK_FOLDER OUT_FOLDER

For each strategy each rank writes OUT_FOLDER/<strategy>-rank<N>.json: how many times lm-eval ran on it and the
metrics the callback gave it; the trained model is exported to OUT_FOLDER/<strategy>/final for the test to score
with lm-eval itself.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import lightning as L
from lightning.pytorch.strategies import ModelParallelStrategy

import smolfactory.evaluation
from smolfactory import LoraSettings, SFTDataModule, SFTModule
from smolfactory.callbacks import HFExport
from smolfactory.callbacks.evaluation import TaskEvaluation
from smolfactory.model.sharding import DecoderLayerPolicy
from tests.conftest import adamw
from tests.distributed_run import CPUFSDPStrategy

STRATEGIES = {
    "ddp": lambda: "ddp",
    "fsdp2": lambda: ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1),
    "fsdp": lambda: CPUFSDPStrategy(auto_wrap_policy=DecoderLayerPolicy()),
}
RUNS: list[str] = []


def counted(*args, **kwargs):
    """smolfactory.evaluation.evaluate, counted on this rank."""
    RUNS.append("run")
    return EVALUATE(*args, **kwargs)


EVALUATE = smolfactory.evaluation.evaluate
smolfactory.evaluation.evaluate = counted


def run(name: str, model_dir: str, data_path: str, task_folder: str, out: Path) -> None:
    """One step of a LoRA fit under the strategy ``name``, scored after the step."""
    RUNS.clear()
    L.seed_everything(0)
    module = SFTModule(model_name=model_dir, lora=LoraSettings(r=4, alpha=8), optimizer=adamw(1e-2))
    data = SFTDataModule(tokenizer=model_dir, dataset=data_path, val_split=0, batch_size=1)
    evaluation = TaskEvaluation(
        tasks=["tiny_choice", "tiny_numbers"], include_path=[task_folder], batch_size=4, every_n_steps=1
    )
    trainer = L.Trainer(
        accelerator="cpu", devices=2, strategy=STRATEGIES[name](), max_steps=1, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
        default_root_dir=out / name, callbacks=[evaluation, HFExport()],
    )  # fmt: skip
    trainer.fit(module, datamodule=data)
    record = {"runs": len(RUNS), "metrics": evaluation.latest}
    (out / f"{name}-rank{trainer.global_rank}.json").write_text(json.dumps(record))


def main() -> None:
    model_dir, data_path, task_folder, out = sys.argv[1:5]
    for name in STRATEGIES:
        run(name, model_dir, data_path, task_folder, Path(out))


if __name__ == "__main__":
    main()
