"""The driver of benchmarks/gpu.sh: ``prepare`` here (PyPI reachable), ``run`` on the GPU machine (no network).

    python benchmarks/gpu_benchmark.py prepare            # wheels, tokenizer and conversations into .gpu/
    python benchmarks/gpu_benchmark.py run [--dry-run] [--budget 400] [--out DIR]

``run`` measures, each piece in a child process of its own with its own time limit (a piece that fails or hangs
prints its error line and the rest go on; pieces that no longer fit in ``--budget`` seconds are reported as
skipped):

1. every configs/models/ recipe, composed on configs/cuda.yaml and run through ``smolfactory fit`` unchanged
   except for the model (random weights of its real shape, ``gpu_shapes.py``), the data (.gpu/conversations.jsonl),
   the run folder, a few steps (``MEASURED_STEPS`` after ``WARMUP_STEPS``) and a callback that measures them
   (``gpu_steady.py``); the FSDP recipe asks for 8 GPUs and gets the one there is;
2. variants of the 360M recipe: Liger's kernels, flash-attention 2, every weight trained (lora: null);
3. one packed batch through each variable-length attention path against sdpa (``gpu_varlen.py``);
4. smolfactory against TRL's SFTTrainer on the 360M shape (``throughput.py``, one run per process).

It prints one markdown table and writes gpu_benchmark.json and gpu_benchmark.log to ``--out`` ($OUT when set).
A recipe's process is stopped once its measurement is written: the checkpoint and final export that follow
(12 GB each for the full 3B model) are not what is measured, and the budget is short.

``--dry-run`` runs the same pieces on the CPU in float32, on 64-wide models of each architecture, rows of 256
tokens and a few steps; what needs CUDA says so and is skipped.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BENCHMARKS = ROOT / "benchmarks"
PREPARED = ROOT / ".gpu"
WARMUP_STEPS, MEASURED_STEPS = 3, 8
# The 360M shape carries the variants, the attention comparison and the TRL comparison.
VARIANT_MODEL = "HuggingFaceTB/SmolLM2-360M-Instruct"
VARIANT_RECIPE = "smollm2-360m-lora"
# The CPU figures in the README's Speed section (packed smolfactory over TRL's defaults and over TRL's best).
# bf16-mixed on a CPU with AVX512-BF16, 2026-12-02 (README, "In each precision").
CPU_RATIOS = {"trl-default": 2.87, "trl-best": 2.00}
MFU_GOAL = 0.45

# What the GPU machine's python3 lacks, or has in another version than this project develops against
# (device/KINDS.md's package list against pyproject.toml): pinned to the versions of the development venv.
WHEELS = [
    "lightning==2.6.6",  # the image's version is not known; smolfactory needs >=2.6.6,<2.7
    "transformers==5.24.0",  # the machine has 5.17; smolfactory is developed and tested against 5.24
    "peft==0.21.2",
    "trl==1.16.0",
    "datasets==5.2.0",
    "dill==0.4.1",
    "multiprocess==0.70.19",
    "fsspec==2026.9.0",  # datasets 5.2 wants <= 2026.9.0; the machine's version is unknown
    "jsonargparse==4.53.0",
    "docstring-parser==0.18.0",
    "typeshed-client==2.15.0",
    "ruamel.yaml==0.19.1",
    "torchdata==0.11.0",
    "gguf==0.19.0",
    "liger-kernel==0.8.5",
    "bitsandbytes==0.50.2",
]
PLATFORMS = ["manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_24_x86_64", "manylinux_2_17_x86_64",
             "manylinux2014_x86_64", "manylinux1_x86_64"]  # fmt: skip
# bitsandbytes ships one library per CUDA and ROCm version (43 MB); the machine's torch is built for CUDA 13.0.
BNB_KEEP = ("libbitsandbytes_cpu.so", "libbitsandbytes_cuda130.so")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("prepare", help="download wheels, save the tokenizer, write the conversations")
    run = commands.add_parser("run", help="measure (on the GPU machine, or on the CPU with --dry-run)")
    run.add_argument("--dry-run", action="store_true", help="tiny shapes on the CPU, CUDA-only parts skipped")
    run.add_argument("--budget", type=float, default=400, help="seconds for all pieces together")
    run.add_argument("--out", default=os.environ.get("OUT"), help="folder for the JSON and the log")
    setup = commands.add_parser("setup", help=argparse.SUPPRESS)  # a child of run: environment and models
    setup.add_argument("--dry-run", action="store_true")
    setup.add_argument("--work", required=True)
    args = parser.parse_args()
    if args.command == "prepare":
        prepare()
    elif args.command == "setup":
        setup_child(Path(args.work), args.dry_run)
    else:
        run_all(args)


# ---- prepare (here) ----------------------------------------------------------------------------------------------


def prepare() -> None:
    """Everything the GPU run reads, into .gpu/ (ignored by git, carried to the machine)."""
    shutil.rmtree(PREPARED, ignore_errors=True)
    download_wheels(PREPARED / "wheels")
    save_tokenizer(PREPARED / "tokenizer")
    write_conversations(PREPARED / "conversations.jsonl")
    size = sum(path.stat().st_size for path in PREPARED.rglob("*") if path.is_file())
    print(f"{PREPARED}: {size / 2**20:.1f} MiB (the repository travels with it: 64 MiB in all)")


def download_wheels(folder: Path) -> None:
    platforms = [option for platform in PLATFORMS for option in ("--platform", platform)]
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
         "--python-version", "3.12", "--implementation", "cp", *platforms, "-d", str(folder), *WHEELS],
        check=True,
    )  # fmt: skip
    for wheel in folder.glob("bitsandbytes-*.whl"):
        keep_libraries(wheel, BNB_KEEP)


def keep_libraries(wheel: Path, keep: tuple[str, ...]) -> None:
    """Rewrite a wheel without its shared libraries other than ``keep`` (and without their RECORD lines)."""
    slim = wheel.with_suffix(".slim")
    with zipfile.ZipFile(wheel) as source, zipfile.ZipFile(slim, "w", zipfile.ZIP_DEFLATED) as target:
        dropped = {n for n in source.namelist() if n.endswith(".so") and Path(n).name not in keep}
        for name in source.namelist():
            if name in dropped:
                continue
            data = source.read(name)
            if name.endswith(".dist-info/RECORD"):
                lines = data.decode().splitlines(keepends=True)
                data = "".join(line for line in lines if line.split(",")[0] not in dropped).encode()
            target.writestr(name, data)
    slim.replace(wheel)


def save_tokenizer(folder: Path) -> None:
    """SmolLM2's tokenizer and chat template (the built-in model's): every random-weight model uses it."""
    from transformers import AutoTokenizer

    from smolfactory.model import DEFAULT_MODEL, resolve_model_path

    AutoTokenizer.from_pretrained(resolve_model_path(DEFAULT_MODEL)).save_pretrained(folder)


def write_conversations(path: Path, count: int = 2000, seed: int = 0) -> None:
    """Multi-turn conversations in SmolTalk's messages layout, stitched from the quickstart's question and answer
    pairs: 2 to 4 exchanges of one or two questions and 3 to 10 answers each (about 270 tokens a conversation,
    540k in all), so that packed rows of 2,048 and 4,096 tokens fill for the steps the benchmark takes."""
    from importlib.resources import files

    quickstart = files("smolfactory.data").joinpath("quickstart")
    pairs = []
    for name in ("train.jsonl", "validation.jsonl"):
        for line in quickstart.joinpath(name).read_text().splitlines():
            messages = json.loads(line)["messages"]
            pairs.append((messages[0]["content"], messages[1]["content"]))
    rng = random.Random(seed)
    with path.open("w") as file:
        for _ in range(count):
            messages = []
            for _ in range(rng.randint(2, 4)):
                questions = [question for question, _ in rng.sample(pairs, rng.randint(1, 2))]
                answers = [answer for _, answer in rng.sample(pairs, rng.randint(3, 10))]
                messages.append({"role": "user", "content": " ".join(questions)})
                messages.append({"role": "assistant", "content": "\n\n".join(answers)})
            file.write(json.dumps({"messages": messages}) + "\n")


# ---- the setup child: environment and random-weight models ------------------------------------------------------


def setup_child(work: Path, dry_run: bool) -> None:
    """Versions, device, which optional packages import, and one random-weight folder per model of the recipes."""
    import torch
    from gpu_shapes import real_config, recipe_models, tiny_config, write_random_model
    from transformers import AutoTokenizer

    device = "cuda" if torch.cuda.is_available() and not dry_run else "cpu"
    tokenizer = AutoTokenizer.from_pretrained(PREPARED / "tokenizer")
    models = {}
    for model_id in sorted(set(recipe_models().values())):
        config = tiny_config(model_id) if dry_run else real_config(model_id)
        folder = work / "models" / model_id.replace("/", "--")
        models[model_id] = {"folder": str(folder), "parameters": write_random_model(config, tokenizer, folder, device)}
        print(f"{model_id}: {models[model_id]['parameters']:,} parameters in {folder}", flush=True)
    environment = {"device": torch.cuda.get_device_name() if device == "cuda" else "CPU (dry run)",
                   "versions": versions(), "available": available()}  # fmt: skip
    (work / "setup.json").write_text(json.dumps({"environment": environment, "models": models}))


def versions() -> dict[str, str | None]:
    from importlib.metadata import PackageNotFoundError, version

    names = ["torch", "transformers", "peft", "lightning", "trl", "datasets", "bitsandbytes", "liger-kernel",
             "flash-attn", "pyarrow", "triton"]  # fmt: skip
    found = {}
    for name in names:
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = None
    return found


def available() -> dict[str, str | None]:
    """Why each optional package cannot be used here (None: it imports)."""
    import importlib

    reasons = {}
    for module in ("flash_attn", "liger_kernel.transformers", "bitsandbytes", "trl"):
        try:
            importlib.import_module(module)
            reasons[module] = None
        except Exception as error:
            reasons[module] = f"{type(error).__name__}: {str(error).splitlines()[0][:200]}"
    return reasons


# ---- run: pieces in child processes ------------------------------------------------------------------------------


@dataclass
class Context:
    dry_run: bool
    work: Path
    deadline: float
    log: Path
    env: dict[str, str]
    setup: dict = field(default_factory=dict)
    rows: list[dict] = field(default_factory=list)

    @property
    def device(self) -> str:
        return "cpu" if self.dry_run else "cuda"

    def folder(self, model_id: str) -> str:
        return self.setup["models"][model_id]["folder"]

    @property
    def data(self) -> str:
        """The conversations; the dry run takes the first 200 (tokenizing them all would take most of its time)."""
        if not self.dry_run:
            return str(PREPARED / "conversations.jsonl")
        subset = self.work / "conversations.jsonl"
        if not subset.is_file():
            subset.write_text("".join((PREPARED / "conversations.jsonl").read_text().splitlines(keepends=True)[:200]))
        return str(subset)


def run_all(args: argparse.Namespace) -> None:
    if not (PREPARED / "conversations.jsonl").is_file():
        sys.exit(f"{PREPARED} is missing or incomplete: run `bash benchmarks/gpu.sh prepare` first (with PyPI)")
    started = time.time()
    work = Path(tempfile.mkdtemp(prefix="smolfactory-gpu-"))
    out = Path(args.out) if args.out else work
    out.mkdir(parents=True, exist_ok=True)
    context = Context(args.dry_run, work, started + args.budget, out / "gpu_benchmark.log", child_environment(work))
    print(f"work folder {work}; log {context.log}", flush=True)
    for piece in PIECES:
        try:
            piece(context)
        except Exception as error:  # a bug in one piece's bookkeeping leaves the others their turn
            if piece is setup_piece:
                raise
            context.rows.append({"run": piece.__name__, "status": "failed", "note": f"{type(error).__name__}: {error}"})
        # After every piece: a run stopped by the machine's command limit still brings back what it measured.
        report = {"date": datetime.date.today().isoformat(), "dry_run": args.dry_run,
                  "seconds": time.time() - started, "environment": context.setup.get("environment"),
                  "rows": context.rows}  # fmt: skip
        partial = out / "gpu_benchmark.json.partial"
        partial.write_text(json.dumps(report, indent=1))
        partial.replace(out / "gpu_benchmark.json")
    print(table(report))


def child_environment(work: Path) -> dict[str, str]:
    """No network, caches in the work folder, this checkout and benchmarks/ importable (nothing is installed)."""
    paths = [str(ROOT), str(BENCHMARKS), os.environ.get("PYTHONPATH", "")]
    return {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(path for path in paths if path),
        "PYTHONUNBUFFERED": "1",
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "HF_HOME": str(work / "hf"),
        "TOKENIZERS_PARALLELISM": "false",
    }


@dataclass
class Outcome:
    status: str  # ok, failed, timeout, skipped
    note: str = ""
    output: str = ""


def run_child(context: Context, name: str, command: list[str], limit: float, result: Path | None = None) -> Outcome:
    """Run one piece with a time limit; stop it early once ``result`` is written. Its output goes to the log."""
    if context.dry_run:  # the limits are the GPU machine's; a shared 2-core CPU under nice is many times slower
        limit *= 3
    limit = min(limit, context.deadline - time.time())
    if limit < 15:
        return Outcome("skipped", "out of time (--budget)")
    print(f"[{name}] {limit:.0f} s at most", flush=True)
    started = time.time()
    log = context.work / f"{name}.log"
    with log.open("w") as output:
        process = subprocess.Popen(command, cwd=ROOT, env=context.env, stdout=output, stderr=subprocess.STDOUT,
                                   process_group=0)  # fmt: skip
        status = wait(process, started + limit, result)
    text = log.read_text(errors="replace")
    with context.log.open("a") as file:
        file.write(f"\n===== {name}: {status} after {time.time() - started:.0f} s\n$ {' '.join(command)}\n{text}")
    print(f"[{name}] {status} after {time.time() - started:.0f} s", flush=True)
    if status == "ok":
        return Outcome("ok", output=text)
    note = error_line(text) if status == "failed" else f"no result within {limit:.0f} s"
    print(f"[{name}] {note}", flush=True)
    return Outcome(status, note, text)


def wait(process: subprocess.Popen, deadline: float, result: Path | None) -> str:
    while True:
        if result is not None and result.is_file():
            stop(process)
            return "ok"
        if process.poll() is not None:
            return "ok" if process.returncode == 0 and result is None else "failed"
        if time.time() > deadline:
            stop(process)
            return "timeout"
        time.sleep(0.5)


def stop(process: subprocess.Popen) -> None:
    """Kill the child and what it started (compile workers, loader workers): SIGTERM would make smolfactory save
    a checkpoint first."""
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def error_line(text: str) -> str:
    """The line that names the error: the last 'error:' or exception line, else the last line."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    for line in reversed(lines):
        if line.startswith("error:") or "Error:" in line.split(" ")[0] or line.split(":")[0].endswith("Error"):
            return line[:300]
    return lines[-1][:300] if lines else "no output"


# ---- the pieces --------------------------------------------------------------------------------------------------


def setup_piece(context: Context) -> None:
    command = [sys.executable, str(BENCHMARKS / "gpu_benchmark.py"), "setup", "--work", str(context.work)]
    outcome = run_child(context, "setup", [*command, *(["--dry-run"] if context.dry_run else [])], 240)
    if outcome.status != "ok":  # without models nothing can run
        sys.exit(f"setup {outcome.status}: {outcome.note}\n{outcome.output[-3000:]}")
    context.setup = json.loads((context.work / "setup.json").read_text())
    environment = context.setup["environment"]
    print(f"device: {environment['device']}; versions: {environment['versions']}", flush=True)


def recipe_run(context: Context, label: str, recipe: str, extra: list[str], limit: float) -> dict:
    """One recipe through `smolfactory fit`, measured by gpu_steady.SteadyThroughput; returns its table row."""
    from gpu_shapes import recipe_models

    model_id = recipe_models()[recipe]
    slug = label.replace(" + ", "+")
    result = context.work / f"{slug}.json"
    command = recipe_command(context, recipe, context.folder(model_id), result, extra)
    outcome = run_child(context, slug, command, limit, result)
    row = {"run": label, "method": method(recipe, extra), "model": model_id,
           "parameters": context.setup["models"][model_id]["parameters"], "status": outcome.status,
           "note": outcome.note}  # fmt: skip
    if outcome.status == "ok":
        row.update(json.loads(result.read_text()))
        row["method"] += f" ({count(row['trainable_parameters'])} trained)"
    if context.dry_run and "fsdp" in recipe:
        row["note"] = "; ".join(
            filter(None, [row["note"], "dry run without FSDP (Lightning's FSDPStrategy needs CUDA)"])
        )
    context.rows.append(row)
    return row


def recipe_command(context: Context, recipe: str, folder: str, result: Path, extra: list[str]) -> list[str]:
    """`smolfactory fit` on configs/cuda.yaml and the recipe, with only the overrides the measurement needs."""
    warmup, measured = steps_of(context.dry_run)
    callback = {
        "class_path": "gpu_steady.SteadyThroughput",
        "init_args": {"output": str(result), "warmup_steps": warmup},
    }
    command = [sys.executable, "-m", "smolfactory.cli", "fit", "--config", "configs/cuda.yaml",
               "--config", f"configs/models/{recipe}.yaml", "--model.model_name", folder,
               "--data.dataset", context.data, "--trainer.max_steps", str(warmup + measured),
               "--trainer.default_root_dir", str(context.work / "runs" / result.stem),
               f"--trainer.callbacks+={json.dumps(callback)}", "--trainer.enable_progress_bar", "false"]  # fmt: skip
    if "fsdp" in recipe:  # the recipe asks for 8 GPUs; one GPU is what there is
        command += ["--trainer.devices", "1"]
        if context.dry_run:  # Lightning's FSDPStrategy refuses the CPU: the rest of the recipe still runs
            command += ["--trainer.strategy", "auto"]
    if context.dry_run:  # float32: CPUs without bf16 units multiply bf16 matrices hundreds of times slower
        command += ["--trainer.accelerator", "cpu", "--trainer.precision", "32-true",
                    "--data.max_length", "256", "--data.batch_size", "2"]  # fmt: skip
    return command + extra


def steps_of(dry_run: bool) -> tuple[int, int]:
    """Warm-up and measured optimizer steps of a recipe run."""
    return (1, 2) if dry_run else (WARMUP_STEPS, MEASURED_STEPS)


def method(recipe: str, extra: list[str]) -> str:
    """What a run trains, read from its recipe and overrides."""
    import yaml

    model = yaml.safe_load((ROOT / "configs" / "models" / f"{recipe}.yaml").read_text())["model"]
    if "--model.lora" in extra or model.get("lora", "") is None:
        kind = "full" + (", FSDP on 1 GPU" if "fsdp" in recipe else "")
    elif model.get("quantization"):
        kind = f"QLoRA r=16 ({model['quantization']})"
    else:
        kind = "LoRA r=16"
    for option, name in (("--model.liger", "Liger"), ("--model.attn_implementation", "flash_attention_2")):
        if option in extra:
            kind += f" + {name}"
    return kind


def recipes_piece(context: Context, recipes: list[str]) -> None:
    from gpu_shapes import recipe_models

    limits = {"smollm3-3b-full-fsdp": 150, "smollm3-3b-qlora": 120, "smollm3-3b-lora": 110}
    for recipe in recipes:
        assert recipe in recipe_models(), recipe
        recipe_run(context, recipe, recipe, [], limits.get(recipe, 90))


def variants_piece(context: Context) -> None:
    """The 360M recipe with Liger, with flash-attention 2, and training every weight."""
    base = next((row for row in context.rows if row["run"] == VARIANT_RECIPE), None)
    reasons = context.setup["environment"]["available"]
    variants = [("liger", ["--model.liger", "true"], "liger_kernel.transformers"),
                ("flash-attention-2", ["--model.attn_implementation", "flash_attention_2"], "flash_attn"),
                ("full", ["--model.lora", "null"], None)]  # fmt: skip
    for name, extra, package in variants:
        label = f"{VARIANT_RECIPE} + {name}"
        if package is not None and (context.dry_run or reasons[package]):
            note = "needs CUDA" if context.dry_run else f"unavailable, unmeasured ({reasons[package]})"
            context.rows.append({"run": label, "method": method(VARIANT_RECIPE, extra), "model": VARIANT_MODEL,
                                 "status": "skipped", "note": note})  # fmt: skip
            continue
        row = recipe_run(context, label, VARIANT_RECIPE, extra, 90)
        if package is not None and base and row["status"] == base["status"] == "ok":
            row["ratio"] = f"{row['tokens_per_sec'] / base['tokens_per_sec']:.2f}x {VARIANT_RECIPE}"


def attention_piece(context: Context) -> None:
    """gpu_varlen.py on the 360M shape: every path's loss, gradient and speed against sdpa."""
    result = context.work / "attention.json"
    shape = ["--max-length", "256", "--batch-size", "2", "--iterations", "2"] if context.dry_run else []
    command = [sys.executable, str(BENCHMARKS / "gpu_varlen.py"), "--model", context.folder(VARIANT_MODEL),
               "--dataset", context.data, "--output", str(result),
               "--device", context.device, *shape]  # fmt: skip
    outcome = run_child(context, "attention", command, 150)
    if not result.is_file():
        context.rows.append({"run": "packed batch, attention paths", "status": outcome.status, "note": outcome.note})
        return
    summary = json.loads(result.read_text())  # (what was measured before a timeout or a crash)
    sdpa = summary["paths"]["sdpa"].get("tokens_per_sec")
    not_reached = {"status": outcome.status, "note": f"not reached: {outcome.note}"}
    for path in ("sdpa", "flash_attention_2", "torch_varlen", "flex_attention"):
        measured = summary["paths"].get(path, not_reached)
        note = measured.get("note") or attention_note(measured, summary)
        row = {"run": f"packed batch, {path}", "method": "forward + backward, every weight", "model": VARIANT_MODEL,
               "tokens_per_sec": measured.get("tokens_per_sec"), "peak_allocated_gib": measured.get("peak_gib"),
               "status": measured["status"], "note": note}  # fmt: skip
        if path != "sdpa" and sdpa and measured.get("tokens_per_sec"):
            row["ratio"] = f"{measured['tokens_per_sec'] / sdpa:.2f}x sdpa"
        context.rows.append(row)


def attention_note(measured: dict, summary: dict) -> str:
    scale = summary["sdpa_bf16_vs_fp32"]
    verdict = "equal within bf16 tolerance" if measured["equal_within_bf16"] else "NOT within bf16 tolerance"
    return (f"{verdict}: vs fp32 loss {measured['vs_fp32']['loss']:.1e}, grad {measured['vs_fp32']['gradient']:.1e} "
            f"(sdpa bf16: {scale['loss']:.1e}, {scale['gradient']:.1e})")  # fmt: skip


# throughput.py's runs: smolfactory packed against TRL's defaults and its best configuration (the README's CPU table)
TRL_RUNS = {
    "smolfactory-packed": "smolfactory, packed rows",
    "trl-default": "TRL defaults: padded, gradient checkpointing",
    "trl-best": "TRL packing + padding-free",
}


def trl_piece(context: Context) -> None:
    """throughput.py on the 360M shape, one run per process; smolfactory's speed over each TRL run."""
    reason = context.setup["environment"]["available"]["trl"]
    if reason:
        context.rows.append({"run": "TRL side by side", "status": "skipped", "note": f"unmeasured ({reason})"})
        return
    shape = {"examples": 560, "max-length": 1024, "batch-size": 8, "max-steps": 10}
    if context.dry_run:
        shape = {"examples": 16, "max-length": 256, "batch-size": 2, "max-steps": 2}
    rows = {run: throughput_run(context, run, shape) for run in TRL_RUNS}
    ours = rows["smolfactory-packed"].get("tokens_per_sec")
    for run, row in rows.items():
        if run in CPU_RATIOS and ours and row.get("tokens_per_sec"):
            row["speedup"] = ours / row["tokens_per_sec"]
            row["ratio"] = f"smolfactory {row['speedup']:.2f}x this (CPU: {CPU_RATIOS[run]}x)"
    context.rows.extend(rows.values())


def throughput_run(context: Context, run: str, shape: dict[str, int]) -> dict:
    options = [item for key, value in shape.items() for item in (f"--{key}", str(value))]
    command = [sys.executable, str(BENCHMARKS / "throughput.py"), "--model", context.folder(VARIANT_MODEL),
               "--dataset", context.data, "--device", context.device, *options, "--run", run]  # fmt: skip
    outcome = run_child(context, f"throughput-{run}", command, 100)
    lines = [line for line in outcome.output.splitlines() if line.startswith("RESULT ")]
    method = f"{TRL_RUNS[run]}; LoRA r=16, {shape['batch-size']} x {shape['max-length']}"
    status = "failed" if outcome.status == "ok" and not lines else outcome.status
    row = {"run": f"throughput.py {run}", "method": method, "model": VARIANT_MODEL, "status": status,
           "note": outcome.note}  # fmt: skip
    if lines:
        result = json.loads(lines[-1][len("RESULT ") :])
        row.update(tokens_per_sec=result["tokens"] / result["train_seconds"], mfu=result["mfu"],
                   peak_above_model_gib=result["peak_mb"] / 1024)  # fmt: skip
    return row


def first_recipes(context: Context) -> None:
    """The two shapes with an MFU goal first, so that they are measured whatever else runs out of time."""
    recipes_piece(context, [VARIANT_RECIPE, "smollm2-1.7b-lora"])


def other_recipes(context: Context) -> None:
    from gpu_shapes import recipe_models

    done = {row["run"] for row in context.rows}
    recipes_piece(context, [recipe for recipe in recipe_models() if recipe not in done])


PIECES = [setup_piece, first_recipes, trl_piece, attention_piece, variants_piece, other_recipes]


# ---- the table ---------------------------------------------------------------------------------------------------


def table(report: dict) -> str:
    environment = report["environment"] or {}
    versions = environment.get("versions", {})
    lines = [
        "",
        f"{environment.get('device', '?')}, {report['date']}, torch {versions.get('torch')}, transformers "
        f"{versions.get('transformers')}, peft {versions.get('peft')}, lightning {versions.get('lightning')}"
        f"{' (DRY RUN: tiny shapes on the CPU, numbers mean nothing)' if report['dry_run'] else ''}; "
        f"{report['seconds']:.0f} s in all",
        "",
        "| run | method | model (parameters) | tokens/s | MFU | peak GiB | ratio | status |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in report["rows"]:
        lines.append(table_row(row))
    peak = next((row["peak_flops"] for row in report["rows"] if row.get("peak_flops")), None)
    warmup, measured_steps = steps_of(report["dry_run"])
    measured = f"{peak / 1e12:,.1f} TFLOP/s here" if peak else "not measured"
    lines += [
        "",
        f"tokens/s: real (non-padding) tokens of {measured_steps} optimizer steps after {warmup} of warm-up "
        "(packed batch rows: forward and backward passes of one batch; throughput.py rows: its whole training loop). "
        f"MFU: the matrix multiplies a step needs over the bf16 matmul peak smolfactory measures when fit starts "
        f"({measured}). peak GiB: torch.cuda.max_memory_allocated of the run; +x: what throughput.py's training "
        "loop added to the loaded model.",
        "",
        *goals(report["rows"]),
    ]
    return "\n".join(lines)


def table_row(row: dict) -> str:
    model = row.get("model", "").split("/")[-1]
    if row.get("parameters"):
        model += f" ({count(row['parameters'])})"
    speed = f"{row['tokens_per_sec']:,.0f}" if row.get("tokens_per_sec") else "-"
    mfu = f"{100 * row['mfu']:.1f}%" if row.get("mfu") is not None else "-"
    peak = "-"
    if row.get("peak_allocated_gib") is not None:
        peak = f"{row['peak_allocated_gib']:.1f}"
    elif row.get("peak_above_model_gib") is not None:  # throughput.py's figure: the training loop's own
        peak = f"+{row['peak_above_model_gib']:.1f}"
    ratio = row.get("ratio", "")
    status = row["status"] + (f": {row['note']}" if row.get("note") else "")
    return f"| {row['run']} | {row.get('method', '')} | {model} | {speed} | {mfu} | {peak} | {ratio} | {status} |"


def count(parameters: int) -> str:
    """134.5M, 3.08B, 32.8K."""
    for size, unit in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if parameters >= size:
            return f"{parameters / size:.{2 if unit == 'B' else 1}f}{unit}"
    return str(parameters)


def goals(rows: list[dict]) -> list[str]:
    """The issue's goals: MFU >= 45% for the 360M and 1.7B recipes; ahead of TRL by the CPU ratios."""
    found = []
    for recipe in (VARIANT_RECIPE, "smollm2-1.7b-lora"):
        row = next((row for row in rows if row["run"] == recipe and row.get("mfu") is not None), None)
        verdict = "unmeasured" if row is None else ("met" if row["mfu"] >= MFU_GOAL else "NOT met")
        found.append(f"- goal MFU >= {MFU_GOAL:.0%} for {recipe}: {verdict}")
    for trl, cpu_ratio in CPU_RATIOS.items():
        row = next((row for row in rows if row["run"] == f"throughput.py {trl}" and row.get("speedup")), None)
        verdict = "unmeasured" if row is None else ("met" if row["speedup"] >= cpu_ratio else "NOT met")
        found.append(f"- goal smolfactory-packed >= {cpu_ratio}x {trl} (the CPU ratio): {verdict}")
    return found


if __name__ == "__main__":
    main()
