"""Where moemesh keeps what it writes for itself (identity, pushed experts, plans, generated
models and tokenizers): one root for every role a device plays, $MOEMESH_CACHE or
~/.cache/moemesh, so a test or a second instance moves all of it with one variable."""
from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    return Path(os.environ.get("MOEMESH_CACHE", Path.home() / ".cache" / "moemesh"))
