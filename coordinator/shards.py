"""Writing a Hugging Face snapshot's weights: safetensors shards of at most a size, named as the
family's own tools name them, with the index file, each tensor streamed in chunks (synth makes
them up, convert transforms a source's), so no tensor is ever whole in memory.

A tensor here is anything with name, shape, dtype (safetensors' string) and nbytes.
"""
from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Callable, Iterable

from expert_node.checkpoint import INDEX_NAME, SINGLE_NAME

CHUNK_BYTES = 32 << 20  # largest piece of a tensor made at once
DEFAULT_SHARD_BYTES = 4_800_000_000  # ~ the published gpt-oss-20b shards (4.79 GB, 4.80 GB, 4.17 GB)


def shard_plan(plan: list, max_shard_bytes: int) -> list[list]:
    """Greedy split into shards of at most max_shard_bytes (a larger tensor gets its own shard)."""
    shards: list[list] = [[]]
    size = 0
    for t in plan:
        if shards[-1] and size + t.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += t.nbytes
    return shards


def shard_names(n: int, model_type: str = "gpt_oss") -> list[str]:
    """OpenAI's converter numbers gpt-oss's shards from 0 and writes n-1 as the total (spec §3.1);
    transformers' save_pretrained (Qwen's snapshots) numbers from 1 of n."""
    if n == 1:
        return [SINGLE_NAME]
    if model_type == "gpt_oss":
        return [f"model-{i:05d}-of-{n - 1:05d}.safetensors" for i in range(n)]
    return [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]


def safetensors_header(tensors: list, metadata: dict | None = None) -> bytes:
    header: dict = {"__metadata__": metadata or {"format": "pt"}}
    offset = 0
    for t in tensors:
        header[t.name] = {"dtype": t.dtype, "shape": list(t.shape), "data_offsets": [offset, offset + t.nbytes]}
        offset += t.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # keep tensor data 8-byte aligned, as safetensors does
    return struct.pack("<Q", len(raw)) + raw


def write_shards(out: Path, tensors: list, chunks: Callable[[object], Iterable[bytes]], max_shard_bytes: int,
                 model_type: str, bar) -> None:
    """Every tensor's bytes (chunks(t), in order) into shards under out, then the index when there
    are several; bar.update(n) as bytes are written. A tensor whose chunks do not add up to its
    size is an error (its header entry would lie)."""
    shards = shard_plan(tensors, max_shard_bytes)
    names = shard_names(len(shards), model_type)
    for name, shard in zip(names, shards):
        tmp = out / (name + ".partial")
        with open(tmp, "wb") as f:
            f.write(safetensors_header(shard))
            for t in shard:
                written = 0
                for chunk in chunks(t):
                    f.write(chunk)
                    written += len(chunk)
                    bar.update(len(chunk))
                if written != t.nbytes:
                    raise RuntimeError(f"{t.name}: wrote {written} bytes, planned {t.nbytes}")
        tmp.replace(out / name)
    if len(shards) > 1:
        weight_map = {t.name: name for name, shard in zip(names, shards) for t in shard}
        (out / INDEX_NAME).write_text(json.dumps({"metadata": {"total_size": sum(t.nbytes for t in tensors)},
                                                  "weight_map": weight_map}, indent=2))
