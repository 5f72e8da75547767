"""Memory-mapped, zero-copy reading of Hugging Face safetensors checkpoints.

A snapshot folder holds `config.json` and either `model.safetensors` or
`model.safetensors.index.json` + shards. Tensors come back as read-only numpy views of the mapped
file (bf16 as uint16: numpy has no bf16). Any defect — a missing tensor, a wrong shape or dtype, a
truncated or corrupt file — raises CheckpointError naming the file and the tensor.
Not here: what the tensors mean (that is the model family's module).
"""
from __future__ import annotations

import json
import mmap
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

# safetensors dtype strings -> numpy storage dtype. BF16 is stored as its raw 16 bits.
SAFETENSORS_DTYPES: dict[str, np.dtype] = {
    "BF16": np.dtype("<u2"),
    "F16": np.dtype("<f2"),
    "F32": np.dtype("<f4"),
    "F64": np.dtype("<f8"),
    "U8": np.dtype("u1"),
    "I8": np.dtype("i1"),
    "I16": np.dtype("<i2"),
    "I32": np.dtype("<i4"),
    "I64": np.dtype("<i8"),
    "BOOL": np.dtype("?"),
}
HEADER_LIMIT = 100 * 1024 * 1024  # safetensors caps its JSON header at 100 MB
READ_CHUNK = 64 << 20  # bytes per read() when a tensor is loaded into memory
INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"


class CheckpointError(ValueError):
    """A checkpoint that cannot be used as it is; the message names file and tensor."""


@dataclass(frozen=True)
class TensorInfo:
    dtype: str
    shape: tuple[int, ...]
    begin: int  # absolute byte offset in the file
    end: int


def huge_page_buffer(nbytes: int) -> mmap.mmap:
    """Private anonymous memory advised to use transparent huge pages. (Python's default anonymous
    mmap is shared memory, which gets none where shmem THP is off, as it is on this project's
    machine: expert nodes held their experts in 4 KiB pages until this was found.)"""
    buf = mmap.mmap(-1, max(nbytes, 1), flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    if hasattr(mmap, "MADV_HUGEPAGE"):
        try:
            buf.madvise(mmap.MADV_HUGEPAGE)
        except OSError:
            pass  # not supported by this kernel: a speed hint only
    return buf


def bf16_to_f32(a: np.ndarray) -> np.ndarray:
    """Widen bf16 (stored as uint16) to float32 exactly: bf16 is the top half of an fp32."""
    return (a.astype(np.uint32) << 16).view(np.float32)


def f32_to_bf16(a: np.ndarray) -> np.ndarray:
    """Round float32 to bf16 (round to nearest even), returned as uint16."""
    bits = np.ascontiguousarray(a, dtype=np.float32).view(np.uint32)
    rounded = bits + np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1))
    return (rounded >> np.uint32(16)).astype(np.uint16)


class SafetensorsFile:
    """One .safetensors file, mapped read-only; tensors are views into the mapping.

    in_memory: each tensor asked for is read into anonymous memory of its own, advised to use
    transparent huge pages, instead (llama.cpp's --no-mmap; only what is asked for is read, so a
    cluster's coordinator still skips the experts). Page-cache pages are 4 KiB; on a VM whose host
    backs them with small pages too, every TLB miss is a two-level page walk, and this machine was
    measured reading its mapped checkpoint at 15-20 GB/s for long spells while huge-page memory read
    27-31 (at other times both read 33-35). The copy costs a read at load and the RSS a fully touched
    mapping has anyway.
    """

    def __init__(self, path: Path, in_memory: bool = False, on_read: Callable[[int], None] | None = None):
        """on_read(n): called as every n bytes are read in memory (a progress bar)."""
        self.path = Path(path)
        self.in_memory, self.on_read = in_memory, on_read
        self._loaded: dict[str, tuple[np.ndarray, mmap.mmap]] = {}  # in_memory: name -> (copy, its memory)
        try:
            size = self.path.stat().st_size
            with open(self.path, "rb") as f:
                head = f.read(8)
                if len(head) < 8:
                    raise CheckpointError(f"{self.path}: truncated file ({size} bytes, no safetensors header)")
                (n,) = struct.unpack("<Q", head)
                if n > HEADER_LIMIT or 8 + n > size:
                    raise CheckpointError(f"{self.path}: header length {n} does not fit a {size}-byte file")
                raw = f.read(n)
                mapped = size and not in_memory
                self._mmap = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if mapped else None
        except OSError as e:
            raise CheckpointError(f"{self.path}: cannot read ({e.strerror})") from None
        try:
            header = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{self.path}: header is not valid JSON ({e})") from None
        if not isinstance(header, dict):
            raise CheckpointError(f"{self.path}: header is not a JSON object")
        self.metadata = header.pop("__metadata__", None) or {}
        data_start = 8 + n
        self.tensors: dict[str, TensorInfo] = {}
        for name, spec in header.items():
            self.tensors[name] = self._parse_entry(name, spec, data_start, size)

    def _parse_entry(self, name: str, spec, data_start: int, size: int) -> TensorInfo:
        where = f"{self.path}: tensor '{name}'"
        try:
            dtype, shape, (b, e) = spec["dtype"], tuple(int(d) for d in spec["shape"]), spec["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{where}: malformed header entry {spec!r}") from None
        if dtype not in SAFETENSORS_DTYPES:
            raise CheckpointError(f"{where}: unsupported dtype {dtype}")
        if any(d < 0 for d in shape):
            raise CheckpointError(f"{where}: negative dimension in shape {shape}")
        expected = int(np.prod(shape, dtype=np.int64)) * SAFETENSORS_DTYPES[dtype].itemsize
        if not (isinstance(b, int) and isinstance(e, int)) or e - b != expected or b < 0:
            raise CheckpointError(f"{where}: data_offsets {[b, e]} do not hold {dtype}{list(shape)} ({expected} bytes)")
        if data_start + e > size:
            raise CheckpointError(
                f"{where}: file is truncated (tensor ends at byte {data_start + e}, file has {size})")
        return TensorInfo(dtype, shape, data_start + b, data_start + e)

    def array(self, name: str) -> np.ndarray:
        info = self.tensors[name]
        dt = SAFETENSORS_DTYPES[info.dtype]
        count = (info.end - info.begin) // dt.itemsize
        if count == 0:
            return np.zeros(info.shape, dt)
        if not self.in_memory:
            return np.frombuffer(self._mmap, dtype=dt, count=count, offset=info.begin).reshape(info.shape)
        if name not in self._loaded:
            try:
                buf = self._read(info.begin, info.end)
            except OSError as e:
                raise CheckpointError(f"{self.path}: cannot read tensor '{name}' ({e.strerror})") from None
            a = np.frombuffer(buf, dtype=dt, count=count).reshape(info.shape)
            a.flags.writeable = False  # weights are read-only, mapped or not
            self._loaded[name] = (a, buf)
        return self._loaded[name][0]

    def _read(self, begin: int, end: int) -> mmap.mmap:
        buf = huge_page_buffer(end - begin)
        with memoryview(buf) as view, open(self.path, "rb") as f:
            f.seek(begin)
            done = 0
            while done < len(view):
                got = f.readinto(view[done:done + READ_CHUNK])
                if not got:
                    raise CheckpointError(f"{self.path}: file shrank while being read")
                done += got
                if self.on_read:
                    self.on_read(got)
        return buf

    def release(self, a: np.ndarray) -> bool:
        """Drop the pages wholly inside `a` (a view of this file) from the process; they are read
        from the page cache again if touched. Loaded in memory, the copy is dropped instead and
        reads as zeros: only what nothing reads again may be released. False when `a` is not in
        this file."""
        for loaded, buf in self._loaded.values():
            if loaded is a:
                buf.madvise(mmap.MADV_DONTNEED)
                return True
        if self._mmap is None:
            return False
        base = np.frombuffer(self._mmap, np.uint8).__array_interface__["data"][0]
        start = a.__array_interface__["data"][0] - base
        if not 0 <= start < len(self._mmap):
            return False
        page = mmap.PAGESIZE
        lo, hi = -(-start // page) * page, (start + a.nbytes) // page * page
        if hi > lo:
            self._mmap.madvise(mmap.MADV_DONTNEED, lo, hi - lo)
        return True

    def advise_hugepages(self) -> None:
        """Ask for transparent huge pages on the mapping (THP is often madvise-only)."""
        if self._mmap is not None and hasattr(mmap, "MADV_HUGEPAGE"):
            try:
                self._mmap.madvise(mmap.MADV_HUGEPAGE)
            except OSError:
                pass  # not supported by this kernel or filesystem: a speed hint only


class Checkpoint:
    """A Hugging Face snapshot folder: config plus tensors resolved through the index."""

    def __init__(self, folder: str | os.PathLike, in_memory: bool = False,
                 on_read: Callable[[int], None] | None = None):
        """in_memory: tensors are read into huge-page memory when asked for, on_read(n) called as
        n more bytes are (see SafetensorsFile)."""
        self.folder = Path(folder)
        self.in_memory, self.on_read = in_memory, on_read
        if self.folder.exists() and not self.folder.is_dir():
            raise CheckpointError(f"{self.folder}: not a folder (-m takes a Hugging Face snapshot folder holding "
                                  "config.json and the .safetensors files)")
        if not self.folder.is_dir():
            raise CheckpointError(f"{self.folder}: model folder does not exist")
        self.config = self._read_json(self.folder / "config.json")
        self._files: dict[str, SafetensorsFile] = {}
        self._where: dict[str, str] = {}
        index = self.folder / INDEX_NAME
        if index.exists():
            weight_map = self._read_json(index).get("weight_map")
            if not isinstance(weight_map, dict):
                raise CheckpointError(f"{index}: has no 'weight_map' object")
            self._where = {str(k): str(v) for k, v in weight_map.items()}
        elif (self.folder / SINGLE_NAME).exists():
            self._where = {name: SINGLE_NAME for name in self._file(SINGLE_NAME).tensors}
        else:
            raise CheckpointError(f"{self.folder}: neither {INDEX_NAME} nor {SINGLE_NAME} found")

    @staticmethod
    def _read_json(path: Path) -> dict:
        try:
            value = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise CheckpointError(f"{path}: missing") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{path}: not valid JSON ({e})") from None
        if not isinstance(value, dict):
            raise CheckpointError(f"{path}: expected a JSON object")
        return value

    def _file(self, filename: str) -> SafetensorsFile:
        if filename not in self._files:
            path = self.folder / filename
            if not path.exists():
                raise CheckpointError(f"{path}: shard listed in the index is missing")
            self._files[filename] = SafetensorsFile(path, self.in_memory, self.on_read)
        return self._files[filename]

    @property
    def tensor_names(self) -> list[str]:
        return list(self._where)

    def has(self, name: str) -> bool:
        return name in self._where

    def tensor(self, name: str, shape: tuple[int, ...] | None = None, dtypes: tuple[str, ...] | None = None) -> np.ndarray:
        """A zero-copy view of `name`, checked against the expected shape and dtypes."""
        if name not in self._where:
            raise CheckpointError(f"{self.folder}: tensor '{name}' is missing from the checkpoint")
        f = self._file(self._where[name])
        if name not in f.tensors:
            raise CheckpointError(f"{f.path}: tensor '{name}' is listed in the index but not in the file")
        info = f.tensors[name]
        if shape is not None and info.shape != tuple(shape):
            raise CheckpointError(f"{f.path}: tensor '{name}' has shape {list(info.shape)}, expected {list(shape)}")
        if dtypes is not None and info.dtype not in dtypes:
            raise CheckpointError(f"{f.path}: tensor '{name}' has dtype {info.dtype}, expected {' or '.join(dtypes)}")
        return f.array(name)

    def info(self, name: str) -> tuple[tuple[int, ...], str]:
        """(shape, safetensors dtype) of `name`, from the header: nothing is read."""
        if name not in self._where:
            raise CheckpointError(f"{self.folder}: tensor '{name}' is missing from the checkpoint")
        info = self._file(self._where[name]).tensors[name]
        return info.shape, info.dtype

    def where(self, name: str) -> Path:
        """The file that holds `name`."""
        return self.folder / self._where[name]

    def first_nonfinite(self, names: list[str]) -> str | None:
        """The first of the float tensors `names` holding NaN or Inf, as "FILE: tensor 'NAME'" (reads
        them all: for diagnosing a failure, not for every load)."""
        for name in names:
            a = self.tensor(name)
            if a.dtype == np.uint16:  # bf16: exponent bits all ones
                bad = bool(((a & 0x7F80) == 0x7F80).any())
            elif a.dtype.kind == "f":
                bad = not bool(np.isfinite(a).all())
            else:
                continue
            if bad:
                return f"{self.where(name)}: tensor '{name}'"
        return None

    def float_tensor(self, name: str, shape: tuple[int, ...] | None = None) -> np.ndarray:
        """A small tensor (bias, norm, sinks) widened to float32 whatever its stored float dtype."""
        a = self.tensor(name, shape, ("BF16", "F16", "F32"))
        return bf16_to_f32(a) if a.dtype == np.uint16 else a.astype(np.float32)

    def advise_hugepages(self) -> None:
        for filename in set(self._where.values()):
            self._file(filename).advise_hugepages()

    def release(self, a: np.ndarray) -> None:
        """Drop a tensor's pages from this process (e.g. once an 8-bit copy replaces it)."""
        for filename in set(self._where.values()):
            if self._file(filename).release(a):
                return
