"""Models by name: `-m openai/gpt-oss-20b` finds the snapshot in the local Hugging Face cache, as
ollama, llama.cpp (`-hf`) and mlx-lm let users name a model. Offline only (nothing is downloaded
at run time): a model that is not cached is an error that prints the command that downloads it.
huggingface_hub does the cache lookup (its layout, revisions and HF_HOME/HF_HUB_CACHE rules are
its own to keep).
"""
from __future__ import annotations

import re
from pathlib import Path

REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


class ModelNotFound(FileNotFoundError):
    """Neither a folder nor a cached repository; the message says how to get it."""


def resolve(name: str) -> Path:
    """A checkpoint folder: `name` itself when it is a folder or cannot be a repository id (the
    checkpoint reader then says what is wrong with it), else the cached snapshot of the Hugging
    Face repository it names."""
    path = Path(name).expanduser()
    if path.is_dir() or not REPO_ID.match(name):
        return path
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(snapshot_download(name, local_files_only=True))
    except LocalEntryNotFoundError:
        raise ModelNotFound(f"{name} is not in the Hugging Face cache ({constants.HF_HUB_CACHE}); download it "
                            f"with:\n  hf download {name}") from None
