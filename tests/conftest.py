"""Shared fixtures: tiny checkpoints written by the project's own generator, once per session."""
from __future__ import annotations

import pytest

from coordinator import synth

# A small shard limit splits tiny-wide across shards + index, the layout of the real 20b snapshot.
SHARDED_BYTES = 20_000_000


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    return synth.write_checkpoint(tmp_path_factory.mktemp("tiny"), synth.make_config("tiny"), seed=1,
                                  progress=False)


@pytest.fixture(scope="session")
def wide_dir(tmp_path_factory):
    return synth.write_checkpoint(tmp_path_factory.mktemp("tiny-wide"), synth.make_config("tiny-wide"), seed=2,
                                  max_shard_bytes=SHARDED_BYTES, progress=False)
