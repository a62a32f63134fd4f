"""Third-party warnings and log lines a smolfactory user cannot act on, silenced one by one at their source.

Imported first by ``smolfactory/__init__.py``: bitsandbytes logs its line while peft imports it. Each filter
names its message and the module or logger it comes from, so nothing else is hidden.
"""

from __future__ import annotations

import logging
import warnings


class DropMessages(logging.Filter):
    """Drops a logger's records whose message contains one of ``fragments``."""

    def __init__(self, *fragments: str) -> None:
        super().__init__()
        self.fragments = fragments

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(fragment in message for fragment in self.fragments)


# bitsandbytes on CPUs with AVX512-BF16: its optional 4-bit kernels come from the Hub's `kernels` package.
logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(DropMessages("Failed to load CPU gemm_4bit_forward"))
# Lightning's advertisement for its cloud logger, and a line about TPUs on machines that have none.
logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(DropMessages("Tip: For seamless cloud logging",
                                                                                  "TPU available: False"))  # fmt: skip
# datasets logs a JSON parse error before raising it; our one-line error names the file's line instead.
logging.getLogger("datasets.packaged_modules.json.json").addFilter(DropMessages("Failed to load JSON from file"))
# Deprecations that libraries raise from their own calls (peft calls this transformers property; Lightning
# builds torch's LeafSpec).
warnings.filterwarnings("ignore", message=r"`is_gradient_checkpointing` is deprecated", category=FutureWarning,
                        module=r"transformers\.modeling_utils")  # fmt: skip
warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated", category=FutureWarning,
                        module=r"lightning\.pytorch\.utilities")  # fmt: skip
# torchdata's StatefulDataLoader calls a torch function that torch deprecated, at every loader it builds.
warnings.filterwarnings("ignore", message=r"'set_vital' is deprecated", category=UserWarning,
                        module=r"torchdata\.stateful_dataloader")  # fmt: skip
# Lightning's model summary cannot size bf16-mixed weights (they are float32, so its estimate is right anyway).
warnings.filterwarnings("ignore", message=r"Precision bf16-mixed is not supported by the model summary",
                        module=r"lightning\.pytorch\.utilities\.model_summary")  # fmt: skip
