"""Hugging Face hub ids, offline: ``model = "org/name"`` resolves to a snapshot folder of the
local Hugging Face cache (``HF_HUB_CACHE`` / ``HF_HOME``, as ``huggingface_hub`` lays it out),
never to a download. A build reads only what is already on this machine; the command that
fetches a missing model is named in the error, for the user to run.
"""

from __future__ import annotations

from pathlib import Path

REVISION = "[0-9a-f]{40}"


def resolve(repo_id: str, revision: str | None = None) -> tuple[Path, str]:
    """(snapshot folder, commit hash) of ``repo_id`` in the local cache. Raises ValueError with
    the id and the command that would download it when the cache does not hold it."""
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

    at = f" at revision {revision}" if revision else ""
    fetch = f"hf download {repo_id}" + (f" --revision {revision}" if revision else "")
    try:
        folder = Path(snapshot_download(repo_id, revision=revision, local_files_only=True))
    except HFValidationError as e:
        raise ValueError(f"{repo_id!r} is not a Hugging Face model id ({e})") from None
    except (LocalEntryNotFoundError, FileNotFoundError):
        raise ValueError(
            f"{repo_id!r}{at} is not in the local Hugging Face cache ({constants.HF_HUB_CACHE}); "
            f"graftbuild never downloads during a build: run `{fetch}` (older clients: "
            f"`huggingface-cli download {repo_id}`) and build again"
        ) from None
    return folder, folder.name
