"""The `moemesh` console script as a user runs it: real subprocesses, real files."""
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np

from coordinator import Engine


def run(*args, check=True, cwd=None):
    # cwd away from the source tree: the installed package (with its native extension) is tested
    proc = subprocess.run([sys.executable, "-m", "coordinator.cli", *map(str, args)], capture_output=True,
                          text=True, timeout=300, cwd=cwd or Path(__file__).parent)
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


def test_logits_command_writes_the_forward_pass(tiny_dir, tmp_path):
    out = tmp_path / "l.npy"
    run("logits", "-m", tiny_dir, "--tokens", "1,2,3,200006", "--out", out)
    logits = np.load(out)
    assert logits.dtype == np.float32 and logits.shape == (4, 201088)
    np.testing.assert_allclose(logits, Engine.load(tiny_dir).logits([1, 2, 3, 200006]), atol=0, rtol=0)


def test_generate_json_is_seeded_and_reproducible(tiny_dir):
    args = ["generate", "-m", tiny_dir, "-p", "Hello, world", "-n", 6, "--temp", 0.8, "--top-p", 0.9,
            "--seed", 5, "--json"]
    a = json.loads(run(*args).stdout)
    b = json.loads(run(*args).stdout)
    assert a == b
    assert a["prompt_ids"] == [13225, 11, 2375] and len(a["generated_ids"]) == 6
    engine = Engine.load(tiny_dir)
    assert a["generated_ids"] == list(engine.generate(a["prompt_ids"], max_new_tokens=6, temperature=0.8,
                                                      top_p=0.9, seed=5))


def test_bad_model_folder_is_one_clear_line(tmp_path):
    proc = run("generate", "-m", tmp_path / "missing", "-p", "hi", check=False)
    assert proc.returncode == 1
    assert "model folder does not exist" in proc.stderr and "Traceback" not in proc.stderr


def test_bad_token_ids_are_rejected(tiny_dir, tmp_path):
    proc = run("logits", "-m", tiny_dir, "--tokens", "1,x", "--out", tmp_path / "o.npy", check=False)
    assert proc.returncode == 2 and "comma-separated integers" in proc.stderr
    proc = run("logits", "-m", tiny_dir, "--tokens", "1,999999", "--out", tmp_path / "o.npy", check=False)
    assert proc.returncode == 1 and "token ids must be in [0, 201088)" in proc.stderr


def test_demo_runs_the_whole_idea_on_loopback(tmp_path):
    import os

    proc = subprocess.run([sys.executable, "-m", "coordinator.cli", "demo", "-n", "4"], capture_output=True, text=True,
                          timeout=300, cwd=Path(__file__).parent, env=dict(os.environ, MOEMESH_CACHE=str(tmp_path)))
    assert proc.returncode == 0, proc.stderr
    assert "RANDOM weights" in proc.stderr
    assert proc.stdout.count("demo-node") >= 4 and "== topology ==" in proc.stdout
    assert "wire" in proc.stdout and "critical path" in proc.stdout


def copy_checkpoint(src, dst, config_change=None, drop=()):
    """A copy of a tiny checkpoint folder with its config.json edited and some files left out."""
    import shutil

    shutil.copytree(src, dst, ignore=shutil.ignore_patterns(*drop))
    if config_change:
        cfg = json.loads((Path(dst) / "config.json").read_text())
        config_change(cfg)
        (Path(dst) / "config.json").write_text(json.dumps(cfg))
    return dst


def test_config_defects_are_one_clear_line(tiny_dir, tmp_path):
    for key in ("hidden_size", "num_local_experts"):
        folder = copy_checkpoint(tiny_dir, tmp_path / key, lambda c: c.pop(key))
        proc = run("generate", "-m", folder, "--tokens", "1,2", "-n", 1, check=False)
        assert proc.returncode == 1 and key in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    trimmed = copy_checkpoint(tiny_dir, tmp_path / "trimmed",
                              lambda c: c.update(num_hidden_layers=3, layer_types=c["layer_types"][:3]))
    proc = run("generate", "-m", trimmed, "--tokens", "1,2", "-n", 1, check=False)
    assert proc.returncode == 1 and "num_hidden_layers is 3, but the checkpoint holds layer 3" in proc.stderr


def test_nan_weights_are_named_by_file_and_tensor(tiny_dir, tmp_path):
    from expert_node.checkpoint import Checkpoint

    folder = copy_checkpoint(tiny_dir, tmp_path / "nan")
    name = "model.layers.1.self_attn.q_proj.weight"
    shard = Checkpoint(folder).where(name)
    info = Checkpoint(folder)._file(shard.name).tensors[name]
    with open(shard, "r+b") as f:
        f.seek(info.begin)
        f.write(b"\xc0\x7f" * ((info.end - info.begin) // 2))  # bf16 NaN
    proc = run("generate", "-m", folder, "--tokens", "1,2", "-n", 2, check=False)
    assert proc.returncode == 1 and f"{shard}: tensor '{name}' contains NaN or Inf" in proc.stderr, proc.stderr


def test_token_ids_need_no_tokenizer(tiny_dir, tmp_path):
    folder = copy_checkpoint(tiny_dir, tmp_path / "notok", drop=("tokenizer*",))
    out = json.loads(run("generate", "-m", folder, "--tokens", "1,2,3", "-n", 3, "--temp", 0, "--json").stdout)
    assert out["text"] is None and len(out["generated_ids"]) == 3
    assert out["generated_ids"] == list(Engine.load(tiny_dir).generate([1, 2, 3], 3, temperature=0))


def test_cli_edges_behave_like_llama_cpp(tiny_dir, tmp_path):
    proc = run("generate", "-m", tiny_dir, "-p", "", check=False)
    assert proc.returncode == 1 and "the prompt is empty" in proc.stderr and "tok/s" not in proc.stderr
    proc = run("generate", "-m", tiny_dir, "--tokens", "1,999999", check=False)
    assert proc.returncode == 1 and "token ids must be in [0, 201088)" in proc.stderr and "tok/s" not in proc.stderr
    proc = run("generate", "-m", tiny_dir, "--tokens", "1,2", "-n", 2, "--seed", -1, "--json")
    seed = int(re.search(r"seed: (\d+)", proc.stderr).group(1))
    again = run("generate", "-m", tiny_dir, "--tokens", "1,2", "-n", 2, "--seed", seed, "--json")
    assert json.loads(again.stdout) == json.loads(proc.stdout)
    proc = run("generate", "-m", tiny_dir, "--tokens", "1,2", "--seed", -5, check=False)
    assert proc.returncode == 2 and "--seed" in proc.stderr
    proc = run("generate", "-m", tiny_dir, "--tokens", "1,2", "-n", -3, check=False)
    assert proc.returncode == 2 and "-n/--max-tokens" in proc.stderr
    proc = run("generate", "-m", Path(tiny_dir) / "config.json", "-p", "hi", check=False)
    assert proc.returncode == 1 and "not a folder" in proc.stderr
    proc = run("node", "serve", "--port", 80000, check=False)
    assert proc.returncode == 2 and "TCP port" in proc.stderr


def test_minus_one_generates_until_a_stop_token(tiny_dir):
    from coordinator.sampling import SamplingParams

    import dataclasses

    engine = Engine.load(tiny_dir)
    engine.config = dataclasses.replace(engine.config, max_position_embeddings=40)
    gen = engine.stream([1, 2, 3], -1, SamplingParams(temperature=0))
    tokens = [s.token for s in gen]
    assert 0 < len(tokens) <= engine.context_length - 3 and gen.stats.finish_reason in ("stop", "length")


def test_max_memory_takes_binary_units():
    from coordinator.commands.common import parse_bytes

    assert parse_bytes("6GiB") == 6 * 2**30 and parse_bytes("6G") == 6 * 10**9 and parse_bytes("512MiB") == 512 << 20
