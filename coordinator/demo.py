"""The embedded demo model: a tiny synthetic gpt-oss generated on first use and cached.

Its weights are RANDOM: it runs the real code paths and tokenizer but writes gibberish.
"""
from __future__ import annotations

import sys
from pathlib import Path

from . import synth
from .tokenizer import cache_dir

DEMO_PRESET, DEMO_SEED = "tiny", 0
RANDOM_WEIGHTS_NOTICE = "note: using the embedded demo model (tiny gpt-oss, RANDOM weights: expect gibberish)"


def demo_model_dir() -> Path:
    folder = cache_dir() / "models" / f"{DEMO_PRESET}-seed{DEMO_SEED}"
    if not (folder / "config.json").exists():
        print(f"generating the demo model in {folder} ...", file=sys.stderr)
        synth.write_checkpoint(folder.with_suffix(".partial"), synth.make_config(DEMO_PRESET), seed=DEMO_SEED)
        folder.with_suffix(".partial").replace(folder)
    return folder
