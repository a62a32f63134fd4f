"""TaskEvaluation: lm-eval tasks scored on the model being trained, at every validation or every N steps."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import lightning as L
import torch
from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy
from lightning.pytorch.utilities import rank_zero_info
from torch.distributed.fsdp import FSDPModule, FullyShardedDataParallel

from smolfactory.callbacks.export import trained_tokenizer
from smolfactory.model.build import causal_lm_of


class TaskEvaluation(L.Callback):
    def __init__(
        self,
        tasks: list[str] | None = None,
        include_path: list[str] | None = None,
        limit: float | None = None,
        num_fewshot: int | None = None,
        batch_size: int = 8,
        apply_chat_template: bool = False,
        every_n_steps: int | None = None,
    ) -> None:
        """Score the model being trained on lm-eval tasks and log each metric as ``eval_<task>_<metric>``.

        The in-memory model is scored (a LoRA model with its adapters, no second copy), in eval mode without
        gradients; its training mode and ``use_cache`` are restored after, and so are the random generators.
        Under DDP rank 0 scores while the others wait; under FSDP every rank runs the same requests in lockstep
        (each forward needs them all); rank 0 logs, and every rank gets the same numbers.

        Args:
            tasks: lm-eval task, group or tag names, task YAML files or folders, or builtin:quickstart-grpo; none
                or empty: nothing is evaluated (and lm-eval is not imported).
            include_path: Folders of task YAML files added to lm-eval's registry.
            limit: Documents per task: a count (100) or a fraction (0.1); null: every document.
            num_fewshot: Few-shot examples; null: each task's own setting.
            batch_size: Requests per forward pass.
            apply_chat_template: Render each prompt with the tokenizer's chat template (for chat models).
            every_n_steps: Evaluate every this many optimizer steps; null: at the end of every validation.
        """
        self.tasks = list(tasks or [])
        self.include_path = list(include_path or [])
        self.limit, self.num_fewshot, self.batch_size = limit, num_fewshot, batch_size
        self.apply_chat_template = apply_chat_template
        self.every_n_steps = every_n_steps
        self.selection: Any = None  # the checked tasks (smolfactory.evaluation.TaskSelection), once fit starts
        self.latest: dict[str, float] = {}
        self._last_step = -1

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        """Check the tasks before training starts: an unknown one stops fit now, not at the first validation."""
        if stage == "fit":
            self.check_tasks()

    def check_tasks(self) -> None:
        """Resolve the task names once (lm-eval's registry takes seconds to index)."""
        if self.tasks and self.selection is None:
            from smolfactory.evaluation import resolve_tasks

            self.selection = resolve_tasks(self.tasks, self.include_path)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # A resumed run starts at a step already scored before the stop: not again, mid-way through an accumulation.
        self._last_step = trainer.global_step

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        step = trainer.global_step
        # Micro-batches of an accumulated step end at the same global_step (0 before the first step): once per step.
        if self.every_n_steps and step % self.every_n_steps == 0 and step != self._last_step:
            self._last_step = step
            self.evaluate(trainer, pl_module)

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self.every_n_steps and not trainer.sanity_checking and trainer.state.fn == "fit":
            self.evaluate(trainer, pl_module)

    def evaluate(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, float]:
        """Score the tasks now, log the metrics, and return them (on every rank)."""
        if not self.tasks:
            return {}
        self.check_tasks()
        from smolfactory.evaluation import evaluate, results_table, task_metrics

        strategy = trainer.strategy
        sharded = isinstance(strategy, FSDPStrategy | ModelParallelStrategy)
        results = None
        if sharded or strategy.is_global_zero:
            tokenizer = trained_tokenizer(trainer, pl_module)
            with scoring(pl_module.model, strategy), trainer.precision_plugin.forward_context():
                results = evaluate(
                    pl_module.model,
                    tokenizer,
                    self.selection,
                    limit=self.limit,
                    num_fewshot=self.num_fewshot,
                    batch_size=self.batch_size,
                    apply_chat_template=self.apply_chat_template,
                    bootstrap_iters=0,  # the means only: no resampled standard errors
                )
        metrics = task_metrics(results) if strategy.is_global_zero else {}
        if strategy.is_global_zero:
            rank_zero_info(f"Task evaluation at step {trainer.global_step}:\n{results_table(results)}")
        self.latest = strategy.broadcast(metrics, src=0)  # the other ranks wait here under DDP
        if strategy.is_global_zero:
            for logger in trainer.loggers:
                # Straight to the loggers: a metric logged in a hook off Lightning's log_every_n_steps would be lost.
                logger.log_metrics(self.latest, step=trainer.global_step)
        return self.latest


@contextmanager
def scoring(model: torch.nn.Module, strategy: Any) -> Iterator[None]:
    """Eval mode without gradients for the block (the root's sharded weights gathered), then every module's
    training mode and ``use_cache`` as before."""
    modes = {module: module.training for module in model.modules()}
    config = causal_lm_of(model).config
    use_cache = config.use_cache
    try:
        with torch.no_grad(), root_weights_gathered(model, strategy):
            model.eval()
            yield
    finally:
        for module, training in modes.items():
            module.train(training)
        config.use_cache = use_cache


@contextmanager
def root_weights_gathered(model: torch.nn.Module, strategy: Any) -> Iterator[None]:
    """The sharded root group's weights (embeddings, final norm, LM head: those outside every decoder layer's group)
    gathered for the block, for a model that is called other than through the root's own forward.

    lm-eval calls the model, but also ``generate``, which under a PeftModel calls the transformers model inside it:
    the root's gathering hooks would not run. Each decoder layer gathers its own weights in its forward, as in
    training. FSDP2 (ModelParallelStrategy): the root is the model; FSDPStrategy: the wrapped LightningModule.
    """
    root = strategy.model if isinstance(strategy, FSDPStrategy) else model
    if isinstance(root, FullyShardedDataParallel):
        with FullyShardedDataParallel.summon_full_params(root, recurse=False, writeback=False):
            yield
    elif isinstance(root, FSDPModule):
        root.unshard()
        try:
            yield
        finally:
            root.reshard()
    else:
        yield
