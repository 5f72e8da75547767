"""The checkpoint reader: zero-copy views that agree with the safetensors library, and clear
errors naming file and tensor for every kind of broken checkpoint."""
import json
import os
import shutil

import numpy as np
import pytest
from safetensors import safe_open

from coordinator.engine import Engine
from expert_node.checkpoint import Checkpoint, CheckpointError, SafetensorsFile, huge_page_buffer


def test_views_match_the_safetensors_library(wide_dir):
    torch = pytest.importorskip("torch", reason="safetensors' numpy backend has no bf16; torch reads it")
    ckpt = Checkpoint(wide_dir)
    shards = sorted(wide_dir.glob("model-*.safetensors"))
    assert len(shards) > 1 and (wide_dir / "model.safetensors.index.json").exists()
    seen = 0
    for shard in shards:
        with safe_open(shard, framework="pt") as f:
            for name in f.keys():
                expected = f.get_tensor(name)
                if expected.dtype == torch.bfloat16:
                    expected = expected.view(torch.int16).numpy().view(np.uint16)
                else:
                    expected = expected.numpy()
                ours = ckpt.tensor(name)
                assert ours.dtype == expected.dtype and ours.shape == expected.shape, name
                np.testing.assert_array_equal(ours, expected, err_msg=name)
                seen += 1
    assert seen == len(ckpt.tensor_names)


def test_views_are_zero_copy_and_read_only(tiny_dir):
    t = Checkpoint(tiny_dir).tensor("lm_head.weight")
    assert t.dtype == np.uint16 and not t.flags.writeable and not t.flags.owndata


def test_in_memory_copies_equal_the_mapping_and_only_what_is_asked_is_read(wide_dir):
    """--no-mmap: each tensor asked for is read into memory of its own (a cluster's coordinator
    still skips the experts), byte for byte the mapped one, read-only; a released copy is dropped."""
    mapped, read = Checkpoint(wide_dir), []
    in_memory = Checkpoint(wide_dir, in_memory=True, on_read=read.append)
    name = mapped.tensor_names[0]
    copy = in_memory.tensor(name)
    assert sum(read) == copy.nbytes  # the one tensor, not its file
    assert not copy.flags.writeable
    for n in mapped.tensor_names:
        np.testing.assert_array_equal(in_memory.tensor(n), mapped.tensor(n), err_msg=n)
    assert in_memory.tensor(name) is copy  # read once
    big = max(mapped.tensor_names, key=lambda n: mapped.tensor(n).nbytes)
    in_memory.release(in_memory.tensor(big))
    assert not in_memory.tensor(big).any()  # dropped: zero pages, as documented


@pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="reads Linux's /proc/self/maps")
def test_huge_page_buffers_are_private_memory():
    """Shared anonymous memory (Python's default) gets no transparent huge pages where shmem THP
    is off: the buffers that hold in-memory weights and a node's experts must be private."""
    buf = huge_page_buffer(4 << 20)
    address = np.frombuffer(buf, np.uint8).ctypes.data
    with open("/proc/self/maps") as maps:
        lines = maps.read().splitlines()
    for line in lines:
        lo, hi = (int(v, 16) for v in line.split()[0].split("-"))
        if lo <= address < hi:
            assert line.split()[1].endswith("p"), line  # private (read-only once weights are in)
            return
    pytest.fail("the buffer is not in /proc/self/maps")


def test_in_memory_read_failure_is_named(tiny_dir, tmp_path):
    dst = copy_ckpt(tiny_dir, tmp_path)
    ckpt = Checkpoint(dst, in_memory=True)
    first, second = ckpt.tensor_names[:2]
    ckpt.tensor(first)
    for f in dst.glob("*.safetensors"):
        f.unlink()  # gone between two reads
    with pytest.raises(CheckpointError, match=r"safetensors: cannot read tensor '.+'"):
        ckpt.tensor(second)


def test_engine_in_memory_gives_the_same_logits(tiny_dir):
    ids = np.arange(12)
    for options in ({"precision": "fast"}, {"precision": "fast", "dense": "q8"}):
        expected = Engine.load(tiny_dir, **options).logits(ids)
        np.testing.assert_array_equal(Engine.load(tiny_dir, mmap=False, **options).logits(ids), expected)


def copy_ckpt(src, tmp_path):
    dst = tmp_path / "ckpt"
    shutil.copytree(src, dst)
    return dst


def test_missing_tensor_is_named(tiny_dir):
    with pytest.raises(CheckpointError, match=r"tensor 'nope' is missing"):
        Checkpoint(tiny_dir).tensor("nope")


def test_wrong_shape_and_dtype_are_named(tiny_dir):
    ckpt = Checkpoint(tiny_dir)
    with pytest.raises(CheckpointError, match=r"model.safetensors: tensor 'model.norm.weight' has shape \[64\], expected \[65\]"):
        ckpt.tensor("model.norm.weight", (65,))
    with pytest.raises(CheckpointError, match=r"'model.norm.weight' has dtype BF16, expected U8"):
        ckpt.tensor("model.norm.weight", None, ("U8",))


def test_truncated_file_is_detected(tiny_dir, tmp_path):
    d = copy_ckpt(tiny_dir, tmp_path)
    f = d / "model.safetensors"
    size = f.stat().st_size
    with open(f, "r+b") as fh:
        fh.truncate(size - 1000)
    with pytest.raises(CheckpointError, match=r"model.safetensors: tensor 'lm_head.weight': file is truncated"):
        Engine.load(d, precision="reference")


def test_corrupt_header_is_detected(tiny_dir, tmp_path):
    d = copy_ckpt(tiny_dir, tmp_path)
    f = d / "model.safetensors"
    with open(f, "r+b") as fh:
        fh.seek(8)
        fh.write(b"\xff\xfe garbage")
    with pytest.raises(CheckpointError, match="header is not valid JSON"):
        SafetensorsFile(f)


def test_missing_shard_is_named(wide_dir, tmp_path):
    d = copy_ckpt(wide_dir, tmp_path)
    victim = sorted(d.glob("model-*.safetensors"))[-1]
    victim.unlink()
    with pytest.raises(CheckpointError, match=f"{victim.name}: shard listed in the index is missing"):
        Engine.load(d, precision="reference")


def test_unknown_model_type_and_missing_folder(tiny_dir, tmp_path):
    d = copy_ckpt(tiny_dir, tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    cfg["model_type"] = "llama"
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="unknown model_type 'llama'"):
        Engine.load(d)
    with pytest.raises(CheckpointError, match="model folder does not exist"):
        Engine.load(tmp_path / "absent")


def test_shape_mismatch_between_config_and_tensors(tiny_dir, tmp_path):
    d = copy_ckpt(tiny_dir, tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    cfg["intermediate_size"] = 96
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"gate_up_proj_blocks' has shape \[8, 128, 2, 16\], expected \[8, 192, 2, 16\]"):
        Engine.load(d)
