"""smolfactory against TRL's SFTTrainer: the same model, data, hyper-parameters and examples, side by side.

    .venv/bin/pip install -e ".[bench]"      # TRL, for this benchmark only
    .venv/bin/python benchmarks/throughput.py --dataset ../shared/data/alpaca_en_demo.json --examples 120
        [--model builtin:smollm2-135m-instruct] [--full] [--max-length 512] [--batch-size 4]
        [--precision 32-true|bf16-mixed] [--runs smolfactory smolfactory-packed trl-default trl-best]

Each run trains one epoch over the same examples (Alpaca rows or chat rows become one user and one
assistant turn; only the assistant turn is trained) in a process of its own, so that peak memory is its own.
It prints real (non-padding) tokens/s over the training loop, wall time, peak memory (CUDA: allocated;
CPU: resident set), the mean training loss and the ratio to TRL's default configuration.

TRL runs: `trl-default` (SFTConfig defaults: padded batches, gradient checkpointing on) and `trl-best`
(packing, padding-free, no gradient checkpointing). Both use prompt-completion rows, so TRL trains the
completion only, as smolfactory trains the assistant turn. Learning rate constant in both.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

RUNS = ["smolfactory", "smolfactory-packed", "trl-default", "trl-best"]
LEARNING_RATE = 2e-4


def read_rows(path: str, examples: int) -> list[dict]:
    """The first rows as user/assistant message pairs (Alpaca: instruction + input -> user; output -> assistant)."""
    if path == "builtin:quickstart":
        from importlib.resources import files

        path = str(files("smolfactory.data").joinpath("quickstart/train.jsonl"))
    text = Path(path).read_text()
    rows = json.loads(text) if text.lstrip().startswith("[") else [json.loads(line) for line in text.splitlines()]
    pairs = []
    for row in rows[:examples]:
        if "messages" in row:
            user = next(m["content"] for m in row["messages"] if m["role"] == "user")
            assistant = next(m["content"] for m in row["messages"] if m["role"] == "assistant")
        else:
            user = row["instruction"] + (f"\n\n{row['input']}" if row.get("input") else "")
            assistant = row["output"]
        pairs.append({"user": user, "assistant": assistant})
    return pairs


def peak_memory_mb(device: str) -> float:
    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux


def run_smolfactory(args: argparse.Namespace, pairs: list[dict], packing: bool) -> dict:
    import lightning as L

    from smolfactory import CausalLMModule, LoraSettings, SFTDataModule
    from smolfactory.callbacks import TokenThroughput
    from smolfactory.callbacks.throughput import real_tokens

    folder = Path(tempfile.mkdtemp())
    path = folder / "rows.jsonl"
    rows = [{"messages": [{"role": "user", "content": p["user"]}, {"role": "assistant", "content": p["assistant"]}]}
            for p in pairs]  # fmt: skip
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    L.seed_everything(0)
    lora = None if args.full else LoraSettings(r=16, alpha=32, dropout=0.0)
    module = CausalLMModule(model_name=args.model, lora=lora, learning_rate=LEARNING_RATE, min_lr_ratio=1.0)
    data = SFTDataModule(tokenizer=args.model, dataset=str(path), val_split=0, max_length=args.max_length,
                         batch_size=args.batch_size, packing=packing)  # fmt: skip
    throughput = TokenThroughput()

    class Losses(L.Callback):
        values: list[float] = []

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            self.values.append(trainer.callback_metrics["train_loss"].item())

    losses = Losses()
    trainer = L.Trainer(
        accelerator=args.device, devices=1, precision=args.precision, max_epochs=1, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
        log_every_n_steps=1, callbacks=[throughput, losses], default_root_dir=folder,
    )  # fmt: skip
    start = time.perf_counter()
    trainer.fit(module, datamodule=data)
    wall = time.perf_counter() - start
    trained = sum(sum(1 for t in e["labels"] if t != -100) for e in data.train_data)
    tokens = sum(int(real_tokens(batch)) for batch in data.train_dataloader())
    return {"tokens": tokens, "trained_tokens": trained, "train_seconds": throughput._seconds, "wall": wall,
            "loss": sum(losses.values) / len(losses.values), "mfu": throughput.metrics(1)["train_mfu"]}  # fmt: skip


def run_trl(args: argparse.Namespace, pairs: list[dict], best: bool) -> dict:
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    from smolfactory.model import resolve_model_path

    folder = resolve_model_path(args.model)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    rows = [{"prompt": [{"role": "user", "content": p["user"]}],
             "completion": [{"role": "assistant", "content": p["assistant"]}]} for p in pairs]  # fmt: skip
    options = {"packing": True, "padding_free": True, "gradient_checkpointing": False} if best else {}
    config = SFTConfig(
        output_dir=tempfile.mkdtemp(), per_device_train_batch_size=args.batch_size, max_length=args.max_length,
        learning_rate=LEARNING_RATE, lr_scheduler_type="constant", num_train_epochs=1, logging_steps=1,
        report_to=[], save_strategy="no", bf16=args.precision.startswith("bf16"), use_cpu=args.device == "cpu",
        dataloader_num_workers=0, seed=0, **options,
    )  # fmt: skip
    peft_config = None if args.full else LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear")
    trainer = SFTTrainer(model=model, args=config, train_dataset=Dataset.from_list(rows), processing_class=tokenizer,
                         peft_config=peft_config)  # fmt: skip
    tokens = sum(len(ids) for ids in trainer.train_dataset["input_ids"])
    trained = sum(sum(1 for t in labels if t != -100) for labels in trainer.train_dataset["labels"])
    start = time.perf_counter()
    result = trainer.train()
    wall = time.perf_counter() - start
    return {"tokens": tokens, "trained_tokens": trained, "train_seconds": result.metrics["train_runtime"],
            "wall": wall, "loss": result.metrics["train_loss"], "mfu": None}  # fmt: skip


def run_one(args: argparse.Namespace) -> None:
    pairs = read_rows(args.dataset, args.examples)
    if args.run.startswith("smolfactory"):
        result = run_smolfactory(args, pairs, packing=args.run.endswith("packed"))
    else:
        result = run_trl(args, pairs, best=args.run == "trl-best")
    result["peak_mb"] = peak_memory_mb(args.device)
    print("RESULT " + json.dumps(result), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="builtin:smollm2-135m-instruct")
    parser.add_argument("--dataset", default="builtin:quickstart", help="Alpaca JSON, or chat JSONL")
    parser.add_argument("--examples", type=int, default=120)
    parser.add_argument("--full", action="store_true", help="full fine-tuning instead of LoRA r=16 on all linear")
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--precision", default=None, help="32-true (default on CPU) or bf16-mixed (default on CUDA)")
    parser.add_argument("--runs", nargs="+", default=RUNS, choices=RUNS)
    parser.add_argument("--run", help=argparse.SUPPRESS)  # one run, in a child process
    args = parser.parse_args()
    args.precision = args.precision or ("bf16-mixed" if args.device == "cuda" else "32-true")
    if args.run:
        run_one(args)
        return
    results = {}
    for name in args.runs:
        command = [sys.executable, __file__, *sys.argv[1:], "--run", name]
        process = subprocess.run(command, capture_output=True, text=True)
        lines = [line for line in process.stdout.splitlines() if line.startswith("RESULT ")]
        if process.returncode or not lines:
            print(f"{name}: failed\n{process.stderr[-3000:]}", file=sys.stderr)
            continue
        results[name] = json.loads(lines[-1][len("RESULT ") :])
    print_table(args, results)


def print_table(args: argparse.Namespace, results: dict[str, dict]) -> None:
    method = "full fine-tuning" if args.full else "LoRA r=16 all-linear"
    print(f"\n{args.model}, {method}, {args.precision} on {args.device}, {args.examples} examples of {args.dataset}, "
          f"batch {args.batch_size}, max_length {args.max_length}\n")  # fmt: skip
    baseline = results.get("trl-default")
    columns = ["run", "real tokens", "trained tokens", "tokens/s", "train s", "wall s", "peak MB", "mean loss", "MFU"]
    print("| " + " | ".join([*columns, "vs TRL default"]) + " |")
    print("|---" * (len(columns) + 1) + "|")
    for name, r in results.items():
        speed = r["tokens"] / r["train_seconds"]
        ratio = f"{speed / (baseline['tokens'] / baseline['train_seconds']):.2f}x" if baseline else "-"
        mfu = f"{100 * r['mfu']:.0f}%" if r["mfu"] is not None else "-"
        print(f"| {name} | {r['tokens']:,} | {r['trained_tokens']:,} | {speed:.0f} | {r['train_seconds']:.0f} | "
              f"{r['wall']:.0f} | {r['peak_mb']:,.0f} | {r['loss']:.4f} | {mfu} | {ratio} |")  # fmt: skip


if __name__ == "__main__":
    main()
