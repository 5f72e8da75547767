"""The `moemesh` console script as a user runs it: real subprocesses, real files."""
import json
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
