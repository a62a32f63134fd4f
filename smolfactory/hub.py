"""Upload a written folder (adapter or model, tokenizer, model card) to the Hugging Face Hub."""

from __future__ import annotations

from pathlib import Path

from huggingface_hub import HfApi, get_token
from huggingface_hub.errors import HfHubHTTPError

from smolfactory.errors import SmolFactoryError, first_line


def require_token(option: str) -> str:
    """The Hub token, or a one-line error naming ``option``; called before any training or export work."""
    token = get_token()
    if not token:
        raise SmolFactoryError(
            f"{option} needs a Hugging Face token with write access: run `hf auth login` or set HF_TOKEN "
            "(nothing was trained or uploaded)"
        )
    return token


def push_folder(folder: str | Path, repo_id: str, option: str = "push_to_hub") -> str:
    """Create the model repo if needed and upload the folder's files in one commit; returns the repo's URL."""
    api = HfApi(token=require_token(option))
    try:
        url = api.create_repo(repo_id, repo_type="model", exist_ok=True)
        api.upload_folder(repo_id=repo_id, folder_path=str(folder), commit_message="Upload from smolfactory")
    except (HfHubHTTPError, OSError, ValueError) as error:
        raise SmolFactoryError(
            f"could not upload {folder} to the Hub repo '{repo_id}' ({first_line(error)}); the folder is saved "
            "locally, so retry with smolfactory export or `hf upload`"
        ) from error
    return str(url)
