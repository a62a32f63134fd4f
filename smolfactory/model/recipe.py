"""RecipeModule: what every recipe (SFT, DPO, and those to come) shares, so a recipe holds only its own batch,
loss and metrics.

The contract a recipe fulfils (see docs/architecture.md for the hook order):

- ``METRICS``: the names it reports, each a ``sum / count`` over examples, tokens or pairs;
- ``batch_sums(batch) -> dict[str, Sum]``: for one batch, the sum and count behind every metric; ``"loss"``
  is differentiable;
- optionally ``configure_model`` (calling this one first) for what it needs beside the model, such as a
  reference model.

The base builds the model (``build_model``), turns the sums of every micro-batch of an optimizer step, on every
rank, into means (the gradient is that of the step's mean loss), logs per-step and epoch metrics, keeps only
the trained weights in checkpoints and refuses checkpoints of other settings, restores the RNG on resume,
builds the optimizer and schedule from their class paths, and generates for ``predict``.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import random
from typing import Any, ClassVar, NamedTuple

import lightning as L
import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable, instantiate_class
from lightning.pytorch.plugins.precision import MixedPrecision
from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy
from peft import PeftModel
from torchmetrics import MeanMetric
from transformers import PreTrainedModel

from smolfactory.checkpoints import check_same_settings
from smolfactory.errors import SmolFactoryError
from smolfactory.model.build import (
    AttnImplementation,
    ModelSettings,
    attends_example_by_example,
    build_model,
    causal_lm_of,
)
from smolfactory.model.loading import DEFAULT_MODEL
from smolfactory.model.lora import LoraSettings
from smolfactory.model.packed_attention import PackedLayout, without_padding
from smolfactory.model.precision import Quantization, WeightsDtype
from smolfactory.model.sharding import is_sharded, unwrapped_name

# Settings a resumed run may change: they change speed or memory, or what predict generates, not what trains.
RESUMABLE_CHANGES = {"max_new_tokens", "gradient_checkpointing", "compile", "liger", "attn_implementation"}
# An optimizer or schedule as LightningCLI writes it: {"class_path": ..., "init_args": {...}}.
ClassConfig = dict[str, Any]
ADAMW: ClassConfig = {"class_path": "torch.optim.AdamW", "init_args": {"lr": 2e-4, "weight_decay": 0.0}}


class Sum(NamedTuple):
    """A metric's total over a batch and what it is a mean over (tokens, pairs, sequences)."""

    total: torch.Tensor
    count: torch.Tensor


class RecipeModule(L.LightningModule):
    """The base of every recipe: model, step-wide normalisation, metrics, checkpoints, optimizer, generation."""

    METRICS: ClassVar[tuple[str, ...]] = ("loss",)
    """The metrics ``batch_sums`` returns, logged as train_<name>, val_<name> and test_<name>."""
    EXP_METRICS: ClassVar[dict[str, str]] = {}
    """Metrics that are exp of another's mean (SFT: perplexity of the loss)."""
    PROGRESS_BAR: ClassVar[frozenset[str]] = frozenset({"loss"})
    """Metrics shown on the progress bar."""
    loss_count_name: ClassVar[str] = "items"
    """What the loss is a mean over (tokens, pairs): logged as train_<name>, the epoch's total."""

    def __init__(
        self,
        model_name: str = DEFAULT_MODEL,
        lora: LoraSettings | None = LoraSettings(),  # noqa: B008 (frozen, so sharing is safe)
        optimizer: OptimizerCallable = ADAMW,  # noqa: B006 (never mutated)
        lr_scheduler: LRSchedulerCallable | None = None,
        attn_implementation: AttnImplementation = "sdpa",
        dtype: WeightsDtype = "float32",
        quantization: Quantization | None = None,
        gradient_checkpointing: bool = False,
        compile: bool = False,
        liger: bool = False,
        freeze_embeddings: bool = False,
        max_new_tokens: int = 256,
    ) -> None:
        """The settings every recipe shares.

        Args:
            model_name: Hub id, model or adapter folder, or builtin:smollm2-135m-instruct (also names the tokenizer).
            lora: LoRA settings; null trains every weight. An adapter folder as model_name keeps training that adapter.
            optimizer: Optimizer class path and arguments (torch.optim.AdamW, bitsandbytes.optim.AdamW8bit, ...);
                weight_decay applies to matrices only, never to norms or biases.
            lr_scheduler: Learning-rate schedule class path and arguments, stepped every optimizer step; null keeps
                the learning rate constant.
            attn_implementation: Attention kernel of the transformers model: sdpa, eager or flash_attention_2.
            dtype: Dtype the weights are stored in (float32, bfloat16, float16); trainer.precision sets the compute.
            quantization: Quantize the frozen base weights with bitsandbytes: nf4 or fp4 (QLoRA), int8, or null.
            gradient_checkpointing: Recompute activations in the backward pass (non-reentrant): less memory, slower.
            compile: torch.compile each decoder layer's training steps (weights and checkpoint keys unchanged;
                validation and generation stay eager). The first step compiles (about a minute on a CPU; torch
                keeps the kernels in /tmp for reruns): worth it for runs of a few hundred steps.
            liger: CUDA only: Liger's Triton kernels for RMSNorm, SwiGLU and RoPE (pip install liger-kernel).
            freeze_embeddings: Full fine-tuning only: keep the input embeddings (and a tied LM head) frozen.
            max_new_tokens: Longest answer generated by `smolfactory predict` (greedy decoding).
        """
        super().__init__()
        self.save_hyperparameters()
        # Under LightningCLI, hparams hold the parsed config (plain dicts); keep the typed settings here and plain
        # values in hparams, so that checkpoints load with torch.load(weights_only=True).
        self.lora = LoraSettings(**lora) if isinstance(lora, dict) else lora
        if self.lora is not None:
            self.lora.check()
            self.hparams.lora = dataclasses.asdict(self.lora)
        # Under LightningCLI the arguments are callables and hparams their configs; in Python, hparams are what was
        # given (a config dict, a class, or functools.partial of one).
        self.hparams.optimizer = class_config(self.hparams.optimizer, "model.optimizer")
        if self.hparams.lr_scheduler is not None:
            self.hparams.lr_scheduler = class_config(self.hparams.lr_scheduler, "model.lr_scheduler")
        self.model_settings = ModelSettings(
            name=model_name,
            dtype=dtype,
            quantization=quantization,
            attn_implementation=attn_implementation,
            gradient_checkpointing=gradient_checkpointing,
            liger=liger,
            freeze_embeddings=freeze_embeddings,
            compile=compile,
        )
        self.model: PreTrainedModel | PeftModel | None = None
        self.attends_example_by_example = False  # set by configure_model (see packed_attention.py)
        # Token- or pair-weighted epoch means (torchmetrics: synchronised across devices when computed).
        self.train_metrics, self.val_metrics, self.test_metrics = (
            torch.nn.ModuleDict(
                {name: MeanMetric() for name in self.METRICS} | {name: ExpOfMean() for name in self.EXP_METRICS}
            )
            for _ in STAGES
        )

    # ---- the model ------------------------------------------------------------------------------------------

    def configure_model(self) -> None:
        # Lightning calls this for every stage and on load_from_checkpoint: build only once.
        if self.model is not None:
            return
        trainer = self.attached_trainer
        on_cuda = trainer is not None and trainer.strategy.root_device.type == "cuda"
        precision = trainer.precision if trainer is not None else None
        self.model = build_model(
            self.model_settings, self.lora, precision=precision, on_cuda=on_cuda, device_mesh=self.device_mesh
        )
        self.attends_example_by_example = attends_example_by_example(self.model_settings, on_cuda)

    @property
    def causal_lm(self) -> PreTrainedModel:
        """The transformers model underneath any PEFT wrapper (its layers hold the adapters)."""
        return causal_lm_of(self.model)

    @property
    def attached_trainer(self) -> L.Trainer | None:
        """The Trainer, or None outside one (``load_from_checkpoint`` also calls ``on_load_checkpoint``)."""
        try:
            return self.trainer
        except RuntimeError:
            return None

    def forward(self, input_ids: torch.Tensor, **kwargs: torch.Tensor) -> torch.Tensor:
        """Vocabulary logits ``[batch, seq, vocab]`` for every position."""
        return self.model(input_ids=input_ids, **kwargs).logits

    def final_hidden_states(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The last decoder layer's output ``[batch, seq, hidden]``, before the LM head.

        The model runs through its own forward (so FSDP unshards its weights as usual) but computes no
        logits (``logits_to_keep`` is empty); the losses then run the LM head only where a label exists.
        """
        shape = batch["input_ids"].shape
        kept = None
        if self.attends_example_by_example and "attention_mask" in batch and "position_ids" not in batch:
            # A padded row is one example: without its padding the batch is one packed row, and no layer computes
            # anything for a pad token (28% of the quickstart's padded tokens).
            batch, kept = without_padding(batch["input_ids"], batch["attention_mask"])
        elif "position_ids" in batch and self.model_settings.attn_implementation == "flash_attention_2":
            # flash-attention finds packed examples only within one row: lay the rows end to end.
            batch = {key: value.reshape(1, -1) for key, value in batch.items()}
        # Packed batches carry position_ids and no attention_mask: transformers then keeps examples apart.
        outputs = model(
            input_ids=batch["input_ids"],
            attention_mask=batch.get("attention_mask"),
            position_ids=batch.get("position_ids"),
            use_cache=False,
            logits_to_keep=torch.zeros(0, dtype=torch.long, device=batch["input_ids"].device),
            output_hidden_states=True,
            **self.packed_attention_kwargs(batch),
        )
        hidden_states = outputs.hidden_states[-1]
        if kept is not None:  # back in the padded places; the losses read only labelled places
            hidden_states = hidden_states.new_zeros(shape.numel(), hidden_states.shape[-1]).index_copy(
                0, kept, hidden_states[0]
            )
        return hidden_states.reshape(*shape, -1)

    def packed_attention_kwargs(self, batch: dict[str, torch.Tensor]) -> dict[str, PackedLayout]:
        """Where a packed batch's examples sit, for attention example by example on a CPU (computed once here, used
        by every layer); nothing for other attention kernels (padded batches reach it without their padding)."""
        if not self.attends_example_by_example or "position_ids" not in batch or "attention_mask" in batch:
            return {}
        return {"packed_layout": PackedLayout.from_position_ids(batch["position_ids"])}

    # ---- the recipe's part ----------------------------------------------------------------------------------

    def batch_sums(self, batch: dict[str, Any]) -> dict[str, Sum]:
        """For one batch: the sum and count behind each of ``METRICS``; ``"loss"`` is differentiable."""
        raise NotImplementedError(f"{type(self).__name__} must define batch_sums (see RecipeModule)")

    # ---- training: sums of the step's micro-batches, on every rank, become means ------------------------------

    def on_train_start(self) -> None:
        # (total, count) of every metric since the last optimizer step
        self._step_sums = torch.zeros(2 * len(self.METRICS), device=self.device)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        """The summed loss of the micro-batch; ``on_before_optimizer_step`` turns the step's sums into a mean."""
        sums = self.batch_sums(batch)
        self._step_sums += self.flatten(sums)
        return sums["loss"].total

    def trained_batch(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """The batch the last training step ran through the model, for token counts (GRPO: its completions)."""
        return batch

    def flatten(self, sums: dict[str, Sum]) -> torch.Tensor:
        """Every (total, count) of ``METRICS`` in one detached float tensor: one all-reduce carries them all."""
        values = [value for name in self.METRICS for value in sums[name]]
        return torch.stack([value.detach().to(torch.float32) for value in values])

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Make the gradient that of the mean loss over every item of the step, and log the step's metrics."""
        totals = self.trainer.strategy.reduce(self._step_sums, reduce_op="sum").view(-1, 2)
        sums = {name: Sum(total, count) for name, (total, count) in zip(self.METRICS, totals, strict=True)}
        self.normalize_gradients(*sums["loss"])
        for name, value in self.means(sums).items():
            self.log(f"train_{name}", value, prog_bar=name in self.PROGRESS_BAR)
        self.update_epoch_metrics("train", sums, suffix="_epoch")
        self.log(f"train_{self.loss_count_name}", sums["loss"].count, reduce_fx="sum", on_step=False, on_epoch=True)
        self._step_sums.zero_()

    def normalize_gradients(self, loss_sum: torch.Tensor, count: torch.Tensor) -> None:
        """Turn the accumulated gradient of summed losses into that of the mean over ``count`` items of the step.

        Each micro-batch's backward ran on its summed loss divided by ``accumulate_grad_batches`` (Lightning
        does that division), and DDP/FSDP average gradients over ranks. Multiplying by
        ``accumulate_grad_batches * world_size / count`` leaves sum-of-losses / items-of-the-step (items are
        label tokens, or preference pairs), so a micro-batch counts by its items, never as one equal share of a
        mean of means. Gradient clipping runs after this hook, on the normalised gradient. ``loss_sum`` and
        ``count`` are the step's totals over every rank.
        """
        count = count.clamp(min=1)
        if not torch.isfinite(loss_sum):  # stop before the optimizer writes NaN into the weights
            checkpoint = getattr(self.trainer.checkpoint_callback, "last_model_path", "") or "none saved yet"
            raise SmolFactoryError(
                f"the training loss became {(loss_sum / count).item()} at step {self.trainer.global_step + 1}; "
                f"last good checkpoint: {checkpoint}. Lower the learning rate or check the data, then resume "
                "with --ckpt_path"
            )
        scale = self.trainer.accumulate_grad_batches * self.trainer.world_size / count
        for parameter in self.parameters():
            if parameter.grad is not None:
                parameter.grad.mul_(scale)

    def means(self, sums: dict[str, Sum]) -> dict[str, torch.Tensor]:
        """Each metric as its mean, and the metrics derived from them."""
        means = {name: total / count.clamp(min=1) for name, (total, count) in sums.items()}
        return means | {name: means[source].exp() for name, source in self.EXP_METRICS.items()}

    # ---- evaluation -----------------------------------------------------------------------------------------

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self.update_epoch_metrics("val", self.batch_sums(batch))

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self.update_epoch_metrics("test", self.batch_sums(batch))

    def update_epoch_metrics(self, stage: str, sums: dict[str, Sum], suffix: str = "") -> None:
        """Update the epoch's weighted means; Lightning computes, logs and resets them at the epoch's end."""
        metrics = getattr(self, f"{stage}_metrics")
        # A metric's mean over the batch, weighted by its count; an exp metric (perplexity) takes its source's.
        sources = {name: name for name in self.METRICS} | self.EXP_METRICS
        for name, source in sources.items():
            total, count = sums[source]
            weight = count.detach().float().clamp(min=1)
            metrics[name].update(total.detach().float() / weight, weight=weight)
        for name, metric in metrics.items():
            show = name in self.PROGRESS_BAR and not suffix
            self.log(f"{stage}_{name}{suffix}", metric, on_step=False, on_epoch=True, prog_bar=show)

    def predict_step(self, batch: dict, batch_idx: int) -> list[dict[str, list[int]]]:
        """Greedy answers to a batch of left-padded prompts, as token ids (PredictionWriter decodes them)."""
        prompt_length = batch["input_ids"].shape[1]
        generated = self.model.generate(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            max_new_tokens=self.hparams.max_new_tokens,
            do_sample=False,
        )
        return [
            {"prompt": prompt[mask.bool()].tolist(), "generated": answer.tolist(), "reference": reference}
            for prompt, mask, answer, reference in zip(
                batch["input_ids"],
                batch["attention_mask"],
                generated[:, prompt_length:],
                batch["references"],
                strict=True,
            )
        ]

    # ---- checkpoints ----------------------------------------------------------------------------------------

    def checkpoint_state_names(self) -> set[str]:
        """The state-dict names a (not sharded) checkpoint holds: the trained model's weights that train (LoRA),
        or all of them (full fine-tuning). Anything beside ``self.model`` (a reference model) is never saved."""
        if self.lora is not None:
            names = {name for name, parameter in self.named_parameters() if parameter.requires_grad}
        else:
            names = set(self.state_dict(keep_vars=True))
        return {unwrapped_name(name) for name in names if name.startswith("model.")}

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # The latest logged values (train_loss, val_loss, ...), for the model card `smolfactory export` writes.
        checkpoint["metrics"] = {name: float(value) for name, value in self.trainer.callback_metrics.items()}
        # The frozen base is rebuilt from model_name: keep only what trains. Not in a sharded checkpoint
        # (FSDP's default), whose loader reads back every weight the model has; each rank holds its shard.
        if not is_sharded(checkpoint["state_dict"]):
            saved = self.checkpoint_state_names()
            checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in saved}
        # Dropout draws from these generators: a resumed run continues their streams exactly. (Plain
        # tensors and tuples only, so that checkpoints load with torch.load(weights_only=True).)
        checkpoint["rng_states"] = {
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "python": random.getstate(),
        }

    @property
    def strict_loading(self) -> bool:
        """Load strictly only when a checkpoint holds every weight (full fine-tuning without a reference model);
        otherwise ``on_load_checkpoint`` has checked that it holds exactly ``checkpoint_state_names``."""
        if self.model is None or self.lora is not None:
            return False
        return self.checkpoint_state_names() == {unwrapped_name(name) for name in self.state_dict(keep_vars=True)}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        """Refuse a checkpoint of another run: other training settings (when resuming fit), or other weights."""
        trainer = self.attached_trainer
        if trainer is not None and trainer.state.fn == "fit":
            saved = checkpoint.get("hyper_parameters") or {}
            check_same_settings(saved, dict(self.hparams), "model", RESUMABLE_CHANGES, trainer.ckpt_path)
        state = checkpoint.get("state_dict")
        # A sharded checkpoint is read back into every weight by the strategy's own loader, which checks names.
        sharding = trainer is not None and isinstance(trainer.strategy, FSDPStrategy | ModelParallelStrategy)
        if state is not None and not sharding and not is_sharded(state):
            self.check_checkpoint_weights(state)
        # Restored just before the next training batch, after Lightning has set up the loops and loaders.
        self._rng_states_to_restore = checkpoint.get("rng_states")

    def check_checkpoint_weights(self, state: dict[str, torch.Tensor]) -> None:
        """One line, not a state-dict traceback or a silent fresh start, when a checkpoint's weights are not
        exactly what this module trains (another LoRA rank or target, another model)."""
        expected, own = self.checkpoint_state_names(), self.state_dict(keep_vars=True)
        problems = []
        missing, unused = expected - state.keys(), state.keys() - expected
        for kind, names in (("missing from it", missing), ("not in this model", unused)):
            if names:
                problems.append(f"{len(names)} weights {kind} (such as {min(names)})")
        resized = sorted(name for name in expected & state.keys() if own[name].shape != state[name].shape)
        if resized:
            name = resized[0]
            problems.append(
                f"{len(resized)} weights of another shape (such as {name}: {list(state[name].shape)} there, "
                f"{list(own[name].shape)} here)"
            )
        if problems:
            trainer = self.attached_trainer
            source = f"--ckpt_path {trainer.ckpt_path}" if trainer is not None else "the checkpoint"
            raise SmolFactoryError(
                f"{source} does not fit this model: {'; '.join(problems)}. It was saved with other model.lora or "
                "model.model_name settings: use the settings it was saved with, or another checkpoint"
            )

    def on_train_batch_start(self, batch: dict, batch_idx: int) -> None:
        states, self._rng_states_to_restore = getattr(self, "_rng_states_to_restore", None), None
        if states is None:
            return
        torch.set_rng_state(states["torch"])
        if states["cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(states["cuda"])
        random.setstate(states["python"])

    # ---- optimizer and schedule -----------------------------------------------------------------------------

    def configure_optimizers(self) -> dict:
        """The optimizer of ``model.optimizer`` over the trained weights, weight decay on matrices only, and the
        schedule of ``model.lr_scheduler`` stepped every optimizer step."""
        decay, no_decay = [], []
        for parameter in self.parameters():
            if parameter.requires_grad:
                (decay if parameter.ndim >= 2 else no_decay).append(parameter)
        # The first group takes the optimizer's own weight_decay; norms and biases none.
        groups = [{"params": decay}, {"params": no_decay, "weight_decay": 0.0}]
        config = self.hparams.optimizer
        if import_class(config["class_path"]) is torch.optim.AdamW:
            config = with_fused_adamw(config, decay + no_decay, self.trainer.precision_plugin)
        optimizer = instantiate_class(groups, config)
        if self.hparams.lr_scheduler is None:
            return {"optimizer": optimizer}
        config = self.hparams.lr_scheduler
        scheduler_class = import_class(config["class_path"], "model.lr_scheduler")
        if "total_steps" in inspect.signature(scheduler_class).parameters:
            if config.get("init_args", {}).get("total_steps") is None:
                config = {**config, "init_args": {**config.get("init_args", {}), "total_steps": self.total_steps()}}
        scheduler = instantiate_class(optimizer, config)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def total_steps(self) -> int:
        """The run's optimizer steps: trainer.max_steps, or the epochs' length."""
        if self.trainer.max_steps > 0:
            return self.trainer.max_steps
        total = self.trainer.estimated_stepping_batches
        if total == float("inf"):
            raise SmolFactoryError("the learning-rate schedule needs a length: set trainer.max_steps or max_epochs")
        return int(total)

    def configure_gradient_clipping(
        self, optimizer: torch.optim.Optimizer, gradient_clip_val: float | None = None,
        gradient_clip_algorithm: str | None = None,
    ) -> None:  # fmt: skip
        """Clip under every precision and strategy, where Lightning's default refuses two cases.

        Under bf16-mixed Lightning refuses any optimizer that unscales gradients itself (torch's fused AdamW),
        though bf16 has no loss scaler to undo; and FSDPStrategy cannot clip by norm through the precision
        plugin, only through the root FSDP module, which alone sees every shard.
        """
        if not gradient_clip_val:
            return
        strategy, precision = self.trainer.strategy, self.trainer.precision_plugin
        by_norm = gradient_clip_algorithm in (None, "norm")
        if isinstance(strategy, FSDPStrategy) and by_norm:
            strategy.model.clip_grad_norm_(gradient_clip_val)
        elif isinstance(precision, MixedPrecision) and precision.scaler is None:
            parameters = [p for group in optimizer.param_groups for p in group["params"]]
            clip = torch.nn.utils.clip_grad_norm_ if by_norm else torch.nn.utils.clip_grad_value_
            clip(parameters, gradient_clip_val)
        else:
            self.clip_gradients(optimizer, gradient_clip_val, gradient_clip_algorithm)


STAGES = ("train", "val", "test")


class ExpOfMean(MeanMetric):
    """exp of a weighted mean (perplexity: exp of the token-weighted mean cross-entropy)."""

    def compute(self) -> torch.Tensor:
        return super().compute().exp()


def class_config(value: Any, option: str) -> ClassConfig:
    """An optimizer or schedule setting as ``{"class_path", "init_args"}`` (what LightningCLI parses it into), from
    that dict, a class, or ``functools.partial(cls, **init_args)``; plain values, so checkpoints stay loadable."""
    if isinstance(value, dict) and "class_path" in value:
        config = {"class_path": value["class_path"], "init_args": dict(value.get("init_args") or {})}
    elif isinstance(value, type):
        config = {"class_path": class_path(value), "init_args": {}}
    elif isinstance(getattr(value, "func", None), type) and not getattr(value, "args", ()):
        config = {"class_path": class_path(value.func), "init_args": dict(value.keywords)}
    else:
        raise SmolFactoryError(
            f"{option}: give a class path and its arguments, e.g. {{class_path: torch.optim.AdamW, init_args: "
            f"{{lr: 2.0e-4}}}}, not {value!r}"
        )
    import_class(config["class_path"], option)  # a missing package fails now, in one line, not at the first step
    return config


def class_path(cls: type) -> str:
    """The dotted path a class is imported by: ``torch.optim.adamw.AdamW``."""
    return f"{cls.__module__}.{cls.__qualname__}"


def import_class(class_path: str, option: str = "class_path") -> type:
    """The class a dotted class path names."""
    module_name, _, name = class_path.rpartition(".")
    try:
        return getattr(importlib.import_module(module_name), name)
    except (ImportError, AttributeError, ValueError) as error:
        hint = " (pip install 'smolfactory[quant]')" if module_name.startswith("bitsandbytes") else ""
        raise SmolFactoryError(f"{option}: cannot import {class_path} ({error}){hint}") from error


def with_fused_adamw(config: ClassConfig, parameters: list[torch.Tensor], precision: Any) -> ClassConfig:
    """torch's AdamW with its fused kernel where it applies, unless the config chose: not under a loss scaler
    (16-mixed must unscale before clipping, which the fused kernel does only inside step())."""
    init_args = config.get("init_args", {})
    if init_args.get("fused") is not None:
        return config
    scaled = getattr(precision, "scaler", None) is not None
    return {**config, "init_args": {**init_args, "fused": None if scaled else fused_adamw_applies(parameters)}}


def fused_adamw_applies(parameters: list[torch.Tensor]) -> bool | None:
    """True where torch's fused AdamW kernel takes these parameters (plain floating tensors on the CPU or
    CUDA); None (torch's own choice: foreach or a loop) for sharded DTensors and other devices."""
    plain = (type(p) in (torch.Tensor, torch.nn.Parameter) and p.device.type in ("cpu", "cuda") for p in parameters)
    return all(plain) and all(p.is_floating_point() for p in parameters) or None


def model_from_checkpoint(saved: dict[str, Any]) -> PreTrainedModel | PeftModel:
    """The trained model of a recipe's checkpoint (a .ckpt as a dict): rebuilt from the settings it was saved
    with, then its weights loaded (the trained ones under LoRA, every one otherwise). No Trainer needed."""
    hparams = saved.get("hyper_parameters") or {}
    fields = {field.name for field in dataclasses.fields(ModelSettings)} - {"name", "compile"}
    settings = ModelSettings(
        name=hparams.get("model_name", DEFAULT_MODEL), **{k: hparams[k] for k in fields & hparams.keys()}
    )
    lora = LoraSettings(**hparams["lora"]) if hparams.get("lora") else None
    model = build_model(settings, lora)
    prefix = "model."
    weights = {name[len(prefix) :]: value for name, value in saved["state_dict"].items() if name.startswith(prefix)}
    result = model.load_state_dict(weights, strict=lora is None)
    trained = {name for name, parameter in model.named_parameters() if parameter.requires_grad}
    missing = trained & set(result.missing_keys)
    if result.unexpected_keys or missing:
        names = sorted(result.unexpected_keys) or sorted(missing)
        raise SmolFactoryError(
            f"the checkpoint's weights do not fit the model its settings build ({len(names)} such as {names[0]}); "
            "was it saved by smolfactory with these model settings?"
        )
    return model
