"""push_to_hub: without a token, fit and export stop with one line before any work; with one, the written
folder is what gets uploaded (the Hub itself is unreachable here, so HfApi's two calls are recorded)."""

from __future__ import annotations

from pathlib import Path

import pytest

from smolfactory.cli import main
from tests.conftest import QUICKSTART, tiny_overrides


@pytest.fixture
def no_token(monkeypatch, tmp_path):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    monkeypatch.setenv("HF_TOKEN_PATH", str(tmp_path / "no-token-here"))


@pytest.mark.slow
def test_fit_without_a_token_stops_before_training(no_token, tmp_path, tiny_model_dir, capsys):
    args = ["fit", "--config", QUICKSTART, "--config", tiny_overrides(tmp_path, tiny_model_dir)]
    with pytest.raises(SystemExit) as exit_info:
        main([*args, "--export.push_to_hub=someone/quill"])
    assert exit_info.value.code == 2
    assert (
        capsys.readouterr()
        .err.strip()
        .splitlines()[-1]
        .startswith("error: export.push_to_hub needs a Hugging Face token with write access")
    )
    assert not (tmp_path / "checkpoints").exists() and not (tmp_path / "final").exists()  # nothing trained


def test_export_without_a_token_stops_before_reading_the_checkpoint(no_token, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["export", "--checkpoint", str(tmp_path / "missing.ckpt"), "--output", str(tmp_path / "out"),
              "--push_to_hub", "someone/quill"])  # fmt: skip
    assert exit_info.value.code == 2
    assert "error: --push_to_hub needs a Hugging Face token" in capsys.readouterr().err  # not "missing.ckpt"


@pytest.mark.slow
def test_fit_uploads_the_final_folder(monkeypatch, tmp_path, tiny_model_dir):
    monkeypatch.setenv("HF_TOKEN", "hf_test_token")
    calls = []

    def create_repo(self, repo_id, **kwargs):
        calls.append(("create_repo", repo_id, self.token))
        return f"https://huggingface.co/{repo_id}"

    def upload_folder(self, repo_id, folder_path, **kwargs):
        calls.append(("upload_folder", repo_id, sorted(path.name for path in Path(folder_path).iterdir())))

    monkeypatch.setattr("huggingface_hub.HfApi.create_repo", create_repo)
    monkeypatch.setattr("huggingface_hub.HfApi.upload_folder", upload_folder)
    args = ["fit", "--config", QUICKSTART, "--config", tiny_overrides(tmp_path, tiny_model_dir)]
    main([*args, "--export.push_to_hub=someone/quill", "--samples.prompts=[]"])
    assert calls[0] == ("create_repo", "someone/quill", "hf_test_token")
    assert calls[1][:2] == ("upload_folder", "someone/quill")
    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json"} <= set(calls[1][2])
    assert sorted(calls[1][2]) == sorted(p.name for p in (tmp_path / "final").iterdir())
