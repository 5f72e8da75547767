"""Qwen3's chat format (coordinator/chatml.py): prompts rendered as Qwen3's template lays them out,
replies parsed into reasoning, answer and tool calls; and the chat, the Python API and the
OpenAI server (a real process, the official client) serving a Qwen3-MoE checkpoint unchanged."""
import json

import pytest

from support import ServeProcess
from coordinator import Engine
from coordinator.chatml import ChatMLFormat
from coordinator.harmony import Message, Tool
from coordinator.sampling import SamplingParams
from coordinator.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def tok(qwen3_dir):
    return Tokenizer.from_dir(qwen3_dir)


def render(tok, history, **kw) -> str:
    return tok.decode(ChatMLFormat(tok).render_prompt(history, **kw))


def test_a_conversation_renders_as_chatml_with_the_last_turns_reasoning_only(tok):
    history = [Message("user", "Hi"), Message("assistant", "old thoughts", "analysis"),
               Message("assistant", "Hello!", "final"), Message("user", "Sum 2+2"),
               Message("assistant", "add them", "analysis"), Message("assistant", "4", "final")]
    assert render(tok, history, instructions="Be brief.") == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\nHello!<|im_end|>\n<|im_start|>user\nSum 2+2<|im_end|>\n"
        "<|im_start|>assistant\n<think>\nadd them\n</think>\n\n4<|im_end|>\n<|im_start|>assistant\n")
    assert render(tok, [Message("user", "Hi")], reasoning_effort="low") == (
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n")


def test_markup_in_user_text_stays_text(tok):
    ids = ChatMLFormat(tok).render_prompt([Message("user", "a<|im_end|>b<think>")])
    assert ids.count(tok.token_id("<|im_end|>")) == 1 and tok.token_id("<think>") not in ids


def test_tools_calls_and_results_render_as_qwen3_lays_them_out(tok):
    tool = Tool("get_weather", "Weather of a city", {"type": "object", "properties": {"city": {"type": "string"}}})
    history = [Message("user", "Weather in Oslo?"),
               Message("assistant", '{"city": "Oslo"}', "commentary", "functions.get_weather", "<|constrain|>json"),
               Message("functions.get_weather", '{"temp": 3}', "commentary", "assistant")]
    text = render(tok, history, tools=[tool])
    declared = json.dumps({"type": "function", "function": {"name": "get_weather", "description": "Weather of a city",
                                                            "parameters": tool.parameters}})
    assert text.startswith("<|im_start|>system\n# Tools\n\n") and f"<tools>\n{declared}\n</tools>" in text
    assert ('<|im_start|>assistant\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n'
            '</tool_call><|im_end|>\n<|im_start|>user\n<tool_response>\n{"temp": 3}\n</tool_response><|im_end|>\n'
            '<|im_start|>assistant\n') in text


def parse(tok, text):
    parser = ChatMLFormat(tok).parser()
    deltas = [d for t in tok.encode(text) for d in parser.feed(t)] + parser.finish()
    return deltas, parser.messages


def test_reply_parses_into_reasoning_answer_and_tool_calls(tok):
    deltas, messages = parse(tok, "<think>\nLet me see.\n</think>\n\nIt is 4.<|im_end|>")
    assert "".join(d.text for d in deltas if d.channel == "analysis").strip() == "Let me see."
    assert "".join(d.text for d in deltas if d.channel == "final") == "It is 4."
    assert messages == [Message("assistant", "Let me see.", "analysis"), Message("assistant", "It is 4.", "final")]
    deltas, messages = parse(tok, '<tool_call>\n{"name": "f", "arguments": {"x": 1}}\n</tool_call><|im_end|>')
    assert [(d.recipient, json.loads(d.text)) for d in deltas] == [("functions.f", {"x": 1})]
    assert messages[0].is_tool_call and messages[0].recipient == "functions.f"


def test_a_broken_tool_call_is_shown_as_text(tok):
    deltas, _ = parse(tok, "<tool_call>\nnot json\n</tool_call>")
    assert "".join(d.text for d in deltas) == "<tool_call>\nnot json\n</tool_call>"
    deltas, _ = parse(tok, "<tool_call>\n{\"name\": ")  # cut off by the length limit
    assert "".join(d.text for d in deltas) == '<tool_call>\n{"name": '


def test_chat_session_and_python_api_use_chatml(qwen3_dir):
    import moemesh
    from coordinator.chat import ChatOptions, ChatSession

    model = moemesh.load(str(qwen3_dir), precision="exact")
    messages = [{"role": "user", "content": "Hello"}]
    assert model.tokenizer.decode(model.apply_chat_template(messages)) == \
        "<|im_start|>user\nHello<|im_end|>\n<|im_start|>assistant\n"
    answer = moemesh.generate(model, messages, max_tokens=8, temperature=0)
    session = ChatSession(model.engine, model.tokenizer, ChatOptions(params=SamplingParams(temperature=0), max_tokens=8))
    said = "".join(d.text for d in session.reply("Hello") if d.channel != "analysis")
    assert said == answer and session.history[0] == Message("user", "Hello")


def test_openai_server_serves_qwen3(qwen3_dir):
    openai = pytest.importorskip("openai")
    server = ServeProcess("-m", str(qwen3_dir), "--api-key", "k", "--precision", "exact")
    try:
        client = server.client("k")
        reply = client.chat.completions.create(model=qwen3_dir.name, max_tokens=6, temperature=0,
                                               messages=[{"role": "user", "content": "Hello"}])
        engine, tok = Engine.load(qwen3_dir, precision="exact"), Tokenizer.from_dir(qwen3_dir)
        fmt = ChatMLFormat(tok)
        prompt = fmt.render_prompt([Message("user", "Hello")])
        parser = fmt.parser()
        deltas = [d for s in engine.stream(prompt, 6, SamplingParams(temperature=0), fmt.stop_ids)
                  for d in parser.feed(s.token)] + parser.finish()
        assert reply.usage.prompt_tokens == len(prompt)
        assert (reply.choices[0].message.content or "") == "".join(d.text for d in deltas if d.channel == "final")
        assert isinstance(openai.OpenAI, type)
    finally:
        server.stop()
        server.log.close()
