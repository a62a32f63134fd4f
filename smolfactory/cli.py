"""The ``smolfactory`` command: LightningCLI with our module, data module and export callback.

smolfactory fit --config configs/quickstart.yaml
smolfactory fit --config configs/quickstart.yaml --print_config
smolfactory preview --config configs/quickstart.yaml
smolfactory export --checkpoint outputs/quickstart/checkpoints/last.ckpt --output outputs/quill --merge
smolfactory chat --model outputs/quickstart/final
smolfactory evaluate --model outputs/quickstart/final --tasks arc_easy --limit 100
smolfactory plot outputs/quickstart
"""

from __future__ import annotations

import os
import sys
from typing import Any

import lightning as L
from jsonargparse import set_parsing_settings
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.utilities import rank_zero_info

from smolfactory import chat, evaluation, export, plot
from smolfactory.callbacks.evaluation import TaskEvaluation
from smolfactory.callbacks.export import HFExport
from smolfactory.callbacks.host_memory import HostMemory
from smolfactory.callbacks.interrupt import SaveOnInterrupt
from smolfactory.callbacks.predictions import PredictionWriter
from smolfactory.callbacks.samples import GenerationSamples
from smolfactory.callbacks.throughput import TokenThroughput
from smolfactory.data.base import TokenizedDataModule
from smolfactory.data.preview import preview
from smolfactory.data.sft import SFTDataModule
from smolfactory.errors import SmolFactoryError
from smolfactory.model.precision import hardware_precision
from smolfactory.model.recipe import RecipeModule
from smolfactory.model.sft import SFTModule
from smolfactory.run_folder import add_run_defaults, prepare_run

# The settings dataclasses (LoraSettings, the losses, DatasetSource, Reward) document their YAML keys in an
# ``Attributes:`` section of the class docstring, which jsonargparse reads with the rest of it. Docstrings under
# each field would need jsonargparse's attribute-docstring parsing, which reads and tokenizes the source of every
# class in the schema (the Trainer's and LightningModule's whole classes, for each subcommand): a second more for
# every command.
set_parsing_settings(docstring_parse_attribute_docstrings=False)


class SmolFactoryTrainer(L.Trainer):
    """Lightning's Trainer plus ``preview``, so that LightningCLI offers it as a subcommand with the same config."""

    def preview(
        self,
        model: L.LightningModule | None = None,
        datamodule: TokenizedDataModule | None = None,
        num_examples: int = 3,
    ) -> None:
        """Print a few training examples with the trained tokens marked, and statistics of the prepared data.

        Args:
            model: Unused; the subcommand shares the fit config.
            datamodule: The data module to preview.
            num_examples: How many training examples to print.
        """
        print(preview(datamodule, num_examples, color=sys.stdout.isatty()))


class SmolFactoryCLI(LightningCLI):
    """LightningCLI over the recipes (SFTModule, DPOModule: siblings on RecipeModule) and their data modules, with
    the export, predictions, interrupt, throughput, host-memory, generation-samples and task-evaluation callbacks
    always on."""

    def __init__(self, *args, **kwargs) -> None:
        """Takes LightningCLI's arguments; only the defaults below differ."""
        # Subclass mode: `model: {class_path: smolfactory.DPOModule, init_args: ...}` picks another recipe; a
        # config without class_path configures the defaults, SFTModule and SFTDataModule.
        kwargs.setdefault("model_class", RecipeModule)
        kwargs.setdefault("datamodule_class", TokenizedDataModule)
        kwargs.setdefault("subclass_mode_model", True)
        kwargs.setdefault("subclass_mode_data", True)
        kwargs.setdefault("trainer_class", SmolFactoryTrainer)
        # Each recipe takes model.optimizer and model.lr_scheduler by class path and builds them itself (weight
        # decay on matrices only), so LightningCLI adds no top-level optimizer/lr_scheduler keys of its own.
        kwargs.setdefault("auto_configure_optimizers", False)
        # A rerun into the same folder replaces config.yaml instead of refusing to start.
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        super().__init__(*args, **kwargs)

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        return {**LightningCLI.subcommands(), "preview": {"model", "datamodule"}}

    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        """Parse, then settle what the run folder and ``--ckpt_path`` mean, before anything loads."""
        super().parse_arguments(parser, args)
        subcommand = self.config.get("subcommand")
        if subcommand is None:
            return
        config = self.config[subcommand]
        ckpt_path = prepare_run(subcommand, config)
        if "ckpt_path" in config:  # (preview has none)
            # LightningCLI next replaces the model's settings with those saved in a --ckpt_path file; held back
            # until the classes are built, the path cannot override the command line. The module refuses a
            # checkpoint saved with other settings instead (on_load_checkpoint).
            self.ckpt_path, config.ckpt_path = ckpt_path, None

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config
        if "ckpt_path" in config:
            config.ckpt_path = self.ckpt_path
        add_run_defaults(config.trainer)
        if config.trainer.precision is None:
            config.trainer.precision = choose_precision(config.trainer.accelerator)

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.set_defaults({"model": SFTModule.__module__ + ".SFTModule"})
        parser.set_defaults({"data": SFTDataModule.__module__ + ".SFTDataModule"})
        # The user names the model once; the data module loads the same model's tokenizer.
        parser.link_arguments("model.init_args.model_name", "data.init_args.tokenizer")
        # Always present (not replaced when a config lists its own callbacks); options under `export:`.
        parser.add_lightning_class_args(HFExport, "export")
        parser.add_lightning_class_args(PredictionWriter, "predictions")
        parser.add_lightning_class_args(SaveOnInterrupt, "interrupt")
        parser.add_lightning_class_args(TokenThroughput, "throughput")
        parser.add_lightning_class_args(HostMemory, "host_memory")
        parser.add_lightning_class_args(GenerationSamples, "samples")
        parser.add_lightning_class_args(TaskEvaluation, "evaluation")  # off (and lm-eval not imported) without tasks
        parser.add_argument(
            "--overwrite",
            type=bool,
            default=False,
            help="fit without --ckpt_path in a trainer.default_root_dir that holds another run's checkpoints or "
            "final folder: delete those checkpoints now, replace the final folder when this run has trained",
        )


def choose_precision(accelerator: Any) -> str:
    """The precision for a config that names none: what suits the hardware, said in one line at start."""
    if not isinstance(accelerator, str):  # an Accelerator instance, or its class path and arguments
        accelerator = getattr(accelerator, "class_path", type(accelerator).__name__).rpartition(".")[2]
        accelerator = {"CUDAAccelerator": "cuda", "CPUAccelerator": "cpu"}.get(accelerator, accelerator)
    choice = hardware_precision(accelerator)
    rank_zero_info(f"Precision: {choice.precision}, because {choice.reason} (set trainer.precision to choose)")
    return choice.precision


# Not Trainer subcommands: no training config, each with its own few options.
STANDALONE_COMMANDS = {"export": export.main, "chat": chat.main, "plot": plot.main, "evaluate": evaluation.main}


def main(args: list[str] | None = None) -> None:
    """Console entry point; configuration and data problems end with one line on stderr, status 2."""
    from_command_line = args is None
    args = list(sys.argv[1:] if args is None else args)
    # A bare --print_config prints every option with its type and help as comments.
    args = ["--print_config=comments" if arg == "--print_config" else arg for arg in args]
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        if args[:1] and args[0] in STANDALONE_COMMANDS:
            STANDALONE_COMMANDS[args[0]](args[1:])
            return
        if from_command_line:  # LightningCLI reads sys.argv itself (and warns when also given args)
            sys.argv[1:] = args
            SmolFactoryCLI()
        else:
            SmolFactoryCLI(args=args)
    except Exception as error:
        # jsonargparse raises its own error *from* the one a class it builds (a subclass-mode model or data
        # module) raised. Only such explicit causes count: an error raised while handling a SmolFactoryError
        # (its __context__) is another problem, a bug, and keeps its traceback.
        cause: BaseException | None = error
        while cause is not None and not isinstance(cause, SmolFactoryError):
            cause = cause.__cause__
        if cause is None:
            raise
        print(f"error: {cause}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
