"""A tool call emitted by a model, end to end through `moemesh serve` and the official client
(issue 20). Random weights never call a tool, so this checkpoint is scripted: attention and the
experts add nothing (their output projections are zero), so each logit row depends only on the
current token, and the unembedding maps every token of a harmony tool call to the next one."""
import shutil

import pytest

from coordinator.tokenizer import Tokenizer
from support import ServeProcess

torch = pytest.importorskip("torch")
openai = pytest.importorskip("openai")
from safetensors.torch import load_file, save_file  # noqa: E402

CALL = '<|channel|>commentary to=functions.get_weather <|constrain|>json<|message|>{"city":"Paris"}<|call|>'
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Gets the weather.",
          "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]


@pytest.fixture(scope="module")
def scripted_dir(tiny_dir, tmp_path_factory):
    """The tiny checkpoint with greedy decoding after `assistant` spelling out CALL."""
    out = tmp_path_factory.mktemp("scripted")
    for f in tiny_dir.iterdir():
        if f.name != "model.safetensors":
            shutil.copy(f, out / f.name)
    tok = Tokenizer.from_dir(tiny_dir)
    script = tok.encode_ordinary("assistant") + tok.encode(CALL)
    assert len(set(script[:-1])) == len(script) - 1, "each scripted token needs one successor"
    t = load_file(tiny_dir / "model.safetensors")
    hidden = t["model.norm.weight"].numel()
    for name in t:
        if name.endswith(("o_proj.weight", "o_proj.bias", "down_proj_blocks", "down_proj_bias")):
            t[name] = torch.zeros_like(t[name])
    t["model.norm.weight"] = torch.ones_like(t["model.norm.weight"])
    directions = torch.randn(len(script), hidden, generator=torch.Generator().manual_seed(0))
    directions /= directions.norm(dim=1, keepdim=True)
    embed, head = t["model.embed_tokens.weight"].float(), torch.zeros_like(t["lm_head.weight"], dtype=torch.float32)
    for i, (token, following) in enumerate(zip(script, script[1:])):
        embed[token] = directions[i]
        head[following] += 4 * directions[i]
    t["model.embed_tokens.weight"], t["lm_head.weight"] = embed.bfloat16(), head.bfloat16()
    save_file(t, out / "model.safetensors", metadata={"format": "pt"})
    return out


@pytest.fixture(scope="module")
def server(scripted_dir):
    s = ServeProcess("-m", str(scripted_dir), "--no-api-key")
    yield s
    s.stop()
    s.log.close()


def test_the_model_calls_a_tool_and_gets_its_result(server):
    client = server.client("none")
    messages = [{"role": "user", "content": "Weather in Paris?"}]
    reply = client.chat.completions.create(model="x", messages=messages, tools=TOOLS, temperature=0, max_tokens=64)
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls" and not choice.message.content
    [call] = choice.message.tool_calls
    assert call.type == "function" and call.function.name == "get_weather"
    assert call.function.arguments == '{"city":"Paris"}' and call.id.startswith("call_")

    chunks = list(client.chat.completions.create(model="x", messages=messages, tools=TOOLS, temperature=0,
                                                 max_tokens=64, stream=True))
    deltas = [tc for c in chunks if c.choices for tc in (c.choices[0].delta.tool_calls or [])]
    assert deltas[0].function.name == "get_weather" and deltas[0].id
    assert "".join(d.function.arguments or "" for d in deltas) == '{"city":"Paris"}'
    assert chunks[-1].choices[0].finish_reason == "tool_calls"

    # the round trip's second half: the call and its result go back; the request is answered
    messages += [choice.message.model_dump(exclude_none=True),
                 {"role": "tool", "tool_call_id": call.id, "content": '{"temp_c": 21}'}]
    again = client.chat.completions.create(model="x", messages=messages, tools=TOOLS, temperature=0, max_tokens=64)
    assert again.choices[0].finish_reason == "tool_calls"  # this scripted model always calls
    assert again.usage.prompt_tokens > reply.usage.prompt_tokens
