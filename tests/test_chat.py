"""`moemesh chat` and the streaming generator: scripted sessions, real subprocesses."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from coordinator import Engine, harmony
from coordinator.chat import ChatOptions, ChatSession
from coordinator.generation import ContextLimitError
from coordinator.sampling import SamplingParams
from coordinator.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def session_parts(tiny_dir):
    return Engine.load(tiny_dir, precision="fast"), Tokenizer.from_dir(tiny_dir)


def test_stream_reports_steps_stats_and_finish(session_parts):
    engine, tok = session_parts
    gen = engine.stream(tok.encode("Hello"), 5, SamplingParams(temperature=0), tokenizer=tok)
    steps = list(gen)
    assert len(steps) == 5 and steps[-1].finish_reason == "length"
    assert all(s.finish_reason is None for s in steps[:-1])
    assert "".join(s.text for s in steps) == tok.decode([s.token for s in steps])
    assert gen.stats.generated_tokens == 5 and gen.stats.prompt_tokens == 1 and gen.stats.decode_tps > 0


def test_stop_token_ends_generation(session_parts):
    engine, tok = session_parts
    first = list(engine.generate([1, 2, 3], max_new_tokens=3, temperature=0))
    steps = list(engine.stream([1, 2, 3], 10, SamplingParams(temperature=0), stop_ids=[first[1]]))
    assert [s.token for s in steps] == first[:2] and steps[-1].finish_reason == "stop"


def test_context_limit_is_a_clear_error(session_parts):
    engine, _ = session_parts
    with pytest.raises(ContextLimitError, match="context holds 1024"):
        list(engine.stream(np.zeros(1024, np.int64), 4))
    steps = list(engine.stream(np.zeros(1020, np.int64), 10, SamplingParams(temperature=0)))
    assert len(steps) == 4 and steps[-1].finish_reason == "length"


def test_session_keeps_history_and_resets(session_parts):
    engine, tok = session_parts
    s = ChatSession(engine, tok, ChatOptions(params=SamplingParams(temperature=0), max_tokens=6))
    text = "".join(d.text for d in s.reply("Hi"))
    assert s.history[0] == harmony.Message("user", "Hi") and len(s.history) == 2
    assert s.history[1].content == text and s.last_stats.generated_tokens == 6
    list(s.reply("Again"))
    assert [m.content for m in s.history if m.role == "user"] == ["Hi", "Again"]
    s.reset()
    assert s.history == []


def test_next_turn_prefills_only_what_is_new(session_parts):
    """The KV state after a turn's prompt is kept; the next turn restores it and prefills the rest,
    with the same answer as prefilling the whole conversation from scratch."""
    engine, tok = session_parts
    opts = ChatOptions(params=SamplingParams(temperature=0), max_tokens=12)
    s = ChatSession(engine, tok, opts)
    list(s.reply("Tell me a story"))
    first_prompt = s.last_stats.prompt_tokens
    second = [d.text for d in s.reply("And then?")]
    assert s.last_stats.cached_tokens == first_prompt > 0
    prompt = harmony.render_prompt(tok, s.history[:-1], opts.reasoning_effort, opts.system)
    assert s.last_stats.prompt_tokens == len(prompt) - first_prompt
    fresh = list(engine.stream(prompt, 12, opts.params, harmony.STOP_IDS))
    parser = harmony.StreamParser(tok)
    again = [d.text for step in fresh for d in parser.feed(step.token)] + [d.text for d in parser.feed(harmony.END)]
    assert "".join(second) == "".join(again)
    s.reset()
    list(s.reply("New topic"))
    assert s.last_stats.cached_tokens == 0


def run_chat(tiny_dir, stdin, *args):
    return subprocess.run([sys.executable, "-m", "coordinator.cli", "chat", "-m", str(tiny_dir), "-n", "8",
                           "--temp", "0", *args], input=stdin, capture_output=True, text=True, timeout=300,
                          cwd=Path(__file__).parent)


def test_chat_repl_commands_and_clean_exit_on_ctrl_d(tiny_dir):
    proc = run_chat(tiny_dir, 'Hello\n/stats\n"""\nline one\nline two\n"""\n/reset\n')
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.count("generated 8 tok") == 3  # two answers + /stats
    assert "(conversation cleared)" in proc.stderr and "Traceback" not in proc.stderr


def test_chat_with_missing_model_is_one_line(tmp_path):
    proc = run_chat(tmp_path / "nope", "Hello\n")
    assert proc.returncode == 1 and "model folder does not exist" in proc.stderr and "Traceback" not in proc.stderr


def test_chat_survives_invalid_utf8_input(tiny_dir):
    proc = subprocess.run([sys.executable, "-m", "coordinator.cli", "chat", "-m", str(tiny_dir), "-n", "4"],
                          input=b"caf\xe9 \xff\n/exit\n", capture_output=True, timeout=300, cwd=Path(__file__).parent)
    assert proc.returncode == 0 and b"Traceback" not in proc.stderr and b"generated 4 tok" in proc.stderr


def test_chat_commands_set_save_load_and_unknown(tiny_dir, tmp_path):
    saved = tmp_path / "talk.json"
    proc = run_chat(tiny_dir, f"/set temperature 0\n/set top_k x\n/wat\nHello\n/save {saved}\n/reset\n"
                              f"/load {saved}\n/load {tmp_path / 'missing.json'}\n")
    assert proc.returncode == 0, proc.stderr
    assert "(set temperature 0)" in proc.stderr and "/set top_k: bad value 'x'" in proc.stderr
    assert "unknown command /wat" in proc.stderr and proc.stderr.count("generated 8 tok") == 1
    assert "(loaded 2 messages" in proc.stderr and "not a saved conversation" in proc.stderr
    messages = json.loads(saved.read_text())["messages"]
    assert [m["role"] for m in messages] == ["user", "assistant"] and messages[0]["content"] == "Hello"


def test_a_full_context_drops_the_oldest_turns(tiny_dir):
    turns = "".join(f"Turn {i}: " + "words and more words " * 6 + "\n" for i in range(6))
    proc = run_chat(tiny_dir, turns, "-c", "200")
    assert proc.returncode == 0, proc.stderr
    assert "the context is full: dropped the" in proc.stderr
    assert proc.stderr.count("generated 8 tok") == 6 and "error" not in proc.stderr
