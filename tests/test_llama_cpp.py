"""A real client runs the exported file: llama.cpp (llama-cpp-python) answers as `smolfactory chat` does.

llama-cpp-python is a source build (about 25 minutes on 2 cores), so it is not a dev dependency: this test skips,
saying so, where it is not installed. `benchmarks/gguf_check.py --install` builds it once (pip caches the wheel)
and runs the same check on the quickstart model, q8_0 included.
"""

from __future__ import annotations

import ctypes
import importlib.util

import numpy as np
import pytest
from gguf import GGUFReader

from smolfactory.chat import ChatSession, load_chat_model
from smolfactory.model.loading import DEFAULT_MODEL
from tests.conftest import smolfactory

PROMPTS = [
    "What is the capital of France?",
    "How many legs does a spider have?",
    "Who wrote Pride and Prejudice?",
    "What is 7 times 8?",
    "What do plants need to grow?",
]
MAX_NEW_TOKENS = 32

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        importlib.util.find_spec("llama_cpp") is None,
        reason="llama-cpp-python is not installed (a source build): pip install llama-cpp-python==0.3.36, "
        "or run benchmarks/gguf_check.py --install",
    ),
]


def export(capfd, file_type: str, path):
    run = smolfactory(capfd, "export", "--model", DEFAULT_MODEL, "--gguf", file_type, "--output", path)
    assert run.code == 0, run.err
    return path


def test_our_q8_0_file_holds_the_bytes_llama_cpps_own_quantizer_writes(tmp_path, capfd):
    import llama_cpp

    ours = export(capfd, "q8_0", tmp_path / "ours-q8_0.gguf")
    theirs = tmp_path / "llama-cpp-q8_0.gguf"
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0
    source = export(capfd, "f32", tmp_path / "f32.gguf")
    assert llama_cpp.llama_model_quantize(str(source).encode(), str(theirs).encode(), ctypes.byref(params)) == 0
    expected = {tensor.name: tensor for tensor in GGUFReader(theirs).tensors}
    written = {tensor.name: tensor for tensor in GGUFReader(ours).tensors}
    assert written.keys() == expected.keys()
    for name, tensor in written.items():
        assert tensor.tensor_type == expected[name].tensor_type, name
        assert np.array_equal(np.asarray(tensor.data), np.asarray(expected[name].data)), name


def test_llama_cpp_answers_from_the_f32_file_as_smolfactory_chat_does(tmp_path, capfd):
    from llama_cpp import Llama

    path = export(capfd, "f32", tmp_path / "smollm2.gguf")

    model, tokenizer = load_chat_model(DEFAULT_MODEL, "cpu")
    expected = [ChatSession(model, tokenizer, max_new_tokens=MAX_NEW_TOKENS).reply(prompt) for prompt in PROMPTS]
    # Everything llama.cpp uses comes from the file: weights, tokenizer, chat template, end-of-turn token.
    llm = Llama(model_path=str(path), n_ctx=512, n_threads=1, seed=0, verbose=False)
    answers, finished = [], []
    for prompt in PROMPTS:
        reply = llm.create_chat_completion(
            messages=[{"role": "user", "content": prompt}], temperature=0.0, top_k=1, max_tokens=MAX_NEW_TOKENS
        )
        answers.append(reply["choices"][0]["message"]["content"].strip())
        finished.append(reply["choices"][0]["finish_reason"])
    assert answers == expected
    # The short answer ends on the end-of-turn token the file names, not at the token limit (a model that rambles).
    assert "Paris" in answers[0] and finished[0] == "stop"
