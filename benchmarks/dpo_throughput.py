"""DPO speed: smolfactory's DPOModule against TRL's DPOTrainer on the same model, pairs, LoRA and batch.

    python benchmarks/dpo_throughput.py [--model builtin:smollm2-135m-instruct] [--steps 10] [--batch-size 8]

Each run trains a fresh LoRA adapter (r=16, all linear layers) with DPO (sigmoid, beta 0.1) on the built-in
preference pairs, in float32, for ``--steps`` optimizer steps, and is timed from the end of its first step
(which pays for warm-up) to the end of the last. TRL runs twice: with its defaults (gradient checkpointing
on) and without checkpointing, as smolfactory trains. Needs TRL (``pip install -e '.[bench]'``).
"""

from __future__ import annotations

import argparse
import time

import torch

from smolfactory.data.sources import builtin_split_path
from smolfactory.model.loading import resolve_model_path

LEARNING_RATE = 5e-5


def smolfactory_run(model: str, data: str, steps: int, batch_size: int) -> dict:
    import lightning as L

    from smolfactory import DPOModule, LoraSettings, PreferenceDataModule

    class Clock(L.Callback):
        def on_train_batch_end(self, trainer, *args) -> None:
            if trainer.global_step == 1 and not hasattr(self, "start"):
                self.start = time.perf_counter()

    optimizer = {"class_path": "torch.optim.AdamW", "init_args": {"lr": LEARNING_RATE, "weight_decay": 0.0}}
    module = DPOModule(model_name=model, lora=LoraSettings(r=16, alpha=32), optimizer=optimizer)
    datamodule = PreferenceDataModule(tokenizer=model, dataset=data, val_split=0, batch_size=batch_size, max_length=256)
    clock = Clock()
    trainer = L.Trainer(
        max_steps=steps, precision="32-true", logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, callbacks=[clock],
    )  # fmt: skip
    trainer.fit(module, datamodule=datamodule)
    seconds = time.perf_counter() - clock.start
    return {"seconds_per_step": seconds / (steps - 1), "loss": trainer.callback_metrics["train_loss"].item()}


def trl_run(model: str, data: str, steps: int, batch_size: int, checkpointing: bool) -> dict:
    import datasets
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs) -> None:
            if state.global_step == 1:
                self.start = time.perf_counter()

    path = resolve_model_path(model)
    config = DPOConfig(
        output_dir="/tmp/dpo_throughput_trl", max_steps=steps, per_device_train_batch_size=batch_size,
        learning_rate=LEARNING_RATE, lr_scheduler_type="cosine", beta=0.1, max_length=256, bf16=False,
        use_cpu=True, gradient_checkpointing=checkpointing, report_to=[], save_strategy="no", logging_steps=1,
    )  # fmt: skip
    clock = Clock()
    trainer = DPOTrainer(
        model=AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32),
        args=config,
        train_dataset=datasets.load_dataset("json", data_files=data, split="train"),
        processing_class=AutoTokenizer.from_pretrained(path),
        peft_config=LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", task_type="CAUSAL_LM"),
        callbacks=[clock],
    )
    trainer.train()
    seconds = time.perf_counter() - clock.start
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    return {"seconds_per_step": seconds / (steps - 1), "loss": losses[-1]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="builtin:smollm2-135m-instruct")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=8)
    args = parser.parse_args()
    data = str(builtin_split_path("quickstart-preference", "train"))
    runs = {
        "smolfactory": lambda: smolfactory_run(args.model, data, args.steps, args.batch_size),
        "trl (defaults: checkpointing)": lambda: trl_run(args.model, data, args.steps, args.batch_size, True),
        "trl (no checkpointing)": lambda: trl_run(args.model, data, args.steps, args.batch_size, False),
    }
    results = {}
    for name, run in runs.items():
        torch.manual_seed(0)
        results[name] = run()
    baseline = results["trl (defaults: checkpointing)"]["seconds_per_step"]
    print(f"\nDPO, LoRA r=16, {args.batch_size} pairs per step, float32, {args.steps} steps (first one not timed)")
    print("| run | s/step | pairs/s | last step's train loss | vs TRL defaults |\n|---|---|---|---|---|")
    for name, result in results.items():
        seconds = result["seconds_per_step"]
        print(
            f"| {name} | {seconds:.2f} | {args.batch_size / seconds:.2f} | {result['loss']:.4f} | "
            f"{baseline / seconds:.2f}x |"
        )


if __name__ == "__main__":
    main()
