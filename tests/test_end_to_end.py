"""End to end on the real built-in SmolLM2-135M-Instruct (slow: a few training steps on the CPU)."""

from __future__ import annotations

import pytest
import torch
import yaml
from peft import AutoPeftModelForCausalLM
from transformers import AutoModelForCausalLM

from smolfactory.cli import main
from smolfactory.model import loading
from smolfactory.model.loading import DEFAULT_MODEL, resolve_model_path
from tests.conftest import QUICKSTART

pytestmark = pytest.mark.slow


def test_builtin_model_converts_once_into_the_cache_with_the_gguf_logits(tmp_path, monkeypatch):
    monkeypatch.setenv("SMOLFACTORY_CACHE", str(tmp_path))
    # The model transformers reads from the GGUF file during the conversion is kept as the reference (reading
    # the file a second time, for the same weights, took 15-20 s of this test).
    read_from_gguf = []
    from_pretrained = AutoModelForCausalLM.from_pretrained

    def recording_from_pretrained(*args, **kwargs):
        model = from_pretrained(*args, **kwargs)
        read_from_gguf.extend([model] if kwargs.get("gguf_file") else [])
        return model

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", recording_from_pretrained)
    converted_path = resolve_model_path(DEFAULT_MODEL)
    assert converted_path == str(tmp_path / "smollm2-135m-instruct") and len(read_from_gguf) == 1
    # A second resolution reuses the cached folder instead of converting again.
    monkeypatch.setattr(loading, "_convert_gguf", lambda *args: pytest.fail("converted twice"))
    assert resolve_model_path(DEFAULT_MODEL) == converted_path

    converted = AutoModelForCausalLM.from_pretrained(converted_path, dtype=torch.float32)
    assert converted.config.to_dict().get("quantization_config") is None  # transformers refuses to train "gguf"
    input_ids = torch.tensor([[1, 4093, 198, 26843, 665, 2, 198]])
    with torch.no_grad():
        torch.testing.assert_close(converted(input_ids).logits, read_from_gguf[0](input_ids).logits, rtol=0, atol=0)


def test_quickstart_recipe_fits_the_builtin_model(tmp_path):
    override = {
        "trainer": {
            "max_steps": 2,
            "val_check_interval": 2,
            "limit_val_batches": 1,
            "default_root_dir": str(tmp_path),
            "enable_progress_bar": False,
            "logger": False,
            "callbacks": [],
            "enable_checkpointing": False,
        },
        "data": {"batch_size": 2},
    }
    (tmp_path / "override.yaml").write_text(yaml.safe_dump(override))
    main(["fit", "--config", QUICKSTART, "--config", str(tmp_path / "override.yaml")])

    final = tmp_path / "final"
    tuned = AutoPeftModelForCausalLM.from_pretrained(final).eval()
    base = AutoModelForCausalLM.from_pretrained(tuned.peft_config["default"].base_model_name_or_path).eval()
    input_ids = torch.tensor([[1, 4093, 198, 26843, 665, 2, 198]])
    with torch.no_grad():
        difference = (tuned(input_ids).logits - base(input_ids).logits).abs().max()
    assert difference > 1e-4  # two steps at lr 1e-3 moved the adapter away from zero
