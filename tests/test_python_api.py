"""The public Python API (`import moemesh`, issue 20) and models by name: a repository id is found
in the local Hugging Face cache (offline) by the API and the CLI, and a missing one says how to
download it."""
import os
import shutil
import subprocess

import pytest

import moemesh
from coordinator import Engine, harmony
from coordinator.sampling import SamplingParams
from coordinator.tokenizer import Tokenizer
from support import MOEMESH, TESTS

GREEDY = dict(temperature=0.0)


@pytest.fixture(scope="module")
def hf_home(tiny_dir, tmp_path_factory):
    """A Hugging Face cache holding the tiny checkpoint as the snapshot of `moemesh-test/tiny`."""
    home = tmp_path_factory.mktemp("hf")
    repo = home / "hub" / "models--moemesh-test--tiny"
    snapshot = repo / "snapshots" / ("0" * 40)
    shutil.copytree(tiny_dir, snapshot)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    return home


def test_load_generate_and_stream_like_mlx_lm(tiny_dir):
    model = moemesh.load(str(tiny_dir))
    engine, tok = Engine.load(tiny_dir, precision="fast"), Tokenizer.from_dir(tiny_dir)
    ids = [s.token for s in engine.stream(tok.encode("Hello there"), 12, SamplingParams(temperature=0))]
    assert moemesh.generate(model, "Hello there", max_tokens=12, **GREEDY) == tok.decode(ids)
    pieces = list(moemesh.stream_generate(model, "Hello there", max_tokens=12, **GREEDY))
    assert [p.token for p in pieces] == ids and pieces[-1].finish_reason == "length"
    assert pieces[-1].generation_tokens == 12 and pieces[-1].prompt_tokens == len(tok.encode("Hello there"))


def test_chat_messages_use_the_template(tiny_dir):
    model = moemesh.load(str(tiny_dir))
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    prompt = model.apply_chat_template(messages)
    assert prompt == harmony.render_prompt(model.tokenizer, [harmony.Message("user", "Hi")], "medium", "Be brief.")
    parser = harmony.StreamParser(model.tokenizer)
    deltas = [d for s in model.engine.stream(prompt, 10, SamplingParams(temperature=0), harmony.STOP_IDS)
              for d in parser.feed(s.token)] + parser.feed(harmony.END)
    assert moemesh.generate(model, messages, max_tokens=10, **GREEDY) == "".join(
        d.text for d in deltas if d.channel != "analysis")


def test_a_repository_id_is_found_in_the_hugging_face_cache(hf_home):
    env = dict(os.environ, HF_HOME=str(hf_home), HF_HUB_OFFLINE="1")
    out = subprocess.run(MOEMESH + ["generate", "-m", "moemesh-test/tiny", "--tokens", "1,2,3", "-n", "4", "--json",
                                    "--temp", "0"], capture_output=True, text=True, env=env, timeout=120, cwd=TESTS)
    assert out.returncode == 0, out.stderr
    missing = subprocess.run(MOEMESH + ["generate", "-m", "moemesh-test/absent", "-p", "x"], capture_output=True,
                             text=True, env=env, timeout=120, cwd=TESTS)
    assert missing.returncode == 1 and "hf download moemesh-test/absent" in missing.stderr
    assert "Traceback" not in missing.stderr


def test_prompt_from_stdin_and_file(tiny_dir, tmp_path):
    (tmp_path / "p.txt").write_text("Hello there")
    runs = [subprocess.run(MOEMESH + ["generate", "-m", str(tiny_dir), *src, "-n", "5", "--temp", "0", "--json"],
                           input="Hello there", capture_output=True, text=True, timeout=120, cwd=TESTS).stdout
            for src in (["-p", "Hello there"], ["-p", "-"], ["-f", str(tmp_path / "p.txt")])]
    assert runs[0] and runs[0] == runs[1] == runs[2]
