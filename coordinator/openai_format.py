"""The OpenAI API's requests and responses, as pure functions over dicts: what `moemesh serve`
accepts (chat completions with tools, completions) turned into harmony messages and sampling
parameters, and the model's harmony deltas turned back into OpenAI messages and stream chunks.

No HTTP here (coordinator.server), so every mapping is tested without a socket. Field names and
shapes follow the OpenAI API reference; gpt-oss's analysis channel comes back as
`reasoning_content`, as llama-server and vLLM return it.
"""
from __future__ import annotations

import json
import secrets
import time
from dataclasses import dataclass, field

from . import harmony
from .sampling import SamplingParams

MAX_STOP_STRINGS = 4  # the OpenAI API's limit


class ApiError(Exception):
    """A request the API refuses: HTTP status and the OpenAI error object's fields."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


def bad(message: str, param: str | None = None) -> ApiError:
    return ApiError(400, message, param)


# -- request fields ----------------------------------------------------------------------------------

def number(body: dict, name: str, default, lo: float, hi: float, integer: bool = False):
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (integer and not isinstance(value, int)):
        raise bad(f"'{name}' must be {'an integer' if integer else 'a number'}", name)
    if not lo <= value <= hi:
        raise bad(f"'{name}' must be between {lo:g} and {hi:g}, got {value}", name)
    return value


def sampling_of(body: dict) -> SamplingParams:
    return SamplingParams(
        temperature=float(number(body, "temperature", 1.0, 0.0, 2.0)),  # gpt-oss's recommended sampling
        top_p=float(number(body, "top_p", 1.0, 0.0, 1.0)),
        top_k=int(number(body, "top_k", 0, 0, 1 << 20, integer=True)),  # llama-server's extension
        min_p=float(number(body, "min_p", 0.0, 0.0, 1.0)),
        seed=number(body, "seed", None, 0, 2**63 - 1, integer=True))


def stop_strings(body: dict) -> list[str]:
    stop = body.get("stop")
    if stop is None:
        return []
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops):
        raise bad("'stop' must be a non-empty string or a list of them", "stop")
    if len(stops) > MAX_STOP_STRINGS:
        raise bad(f"'stop' holds at most {MAX_STOP_STRINGS} strings", "stop")
    return stops


def max_tokens_of(body: dict, default: int, *names: str) -> int:
    for name in names:
        if body.get(name) is not None:
            return int(number(body, name, default, 1, 1 << 31, integer=True))
    return default


def stream_flags(body: dict) -> tuple[bool, bool]:
    """(stream, include usage in a last chunk)."""
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise bad("'stream' must be true or false", "stream")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise bad("'stream_options' must be an object", "stream_options")
    return stream, bool(options.get("include_usage", False))


def text_of(content, where: str) -> str:
    """A message's content: a string, or a list of text parts (images and audio are refused)."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise bad(f"{where}: only text content parts are supported", "messages")
            texts.append(part["text"])
        return "".join(texts)
    raise bad(f"{where}: content must be a string or a list of text parts", "messages")


@dataclass
class ChatRequest:
    history: list[harmony.Message]
    instructions: str | None
    tools: list[harmony.Tool]
    reasoning_effort: str
    params: SamplingParams
    max_tokens: int
    stop: list[str]
    stream: bool
    include_usage: bool


def parse_tools(body: dict) -> list[harmony.Tool]:
    tools = body.get("tools") or []
    if not isinstance(tools, list):
        raise bad("'tools' must be a list", "tools")
    out = []
    for i, t in enumerate(tools):
        fn = t.get("function") if isinstance(t, dict) and t.get("type") == "function" else None
        name = fn.get("name") if isinstance(fn, dict) else None
        if not isinstance(name, str) or not name.replace("_", "a").replace("-", "a").isalnum():
            raise bad(f"tools[{i}]: expected {{\"type\": \"function\", \"function\": {{\"name\": ...}}}} with a name "
                      "of letters, digits, _ and -", "tools")
        params = fn.get("parameters")
        if params is not None and not isinstance(params, dict):
            raise bad(f"tools[{i}]: 'parameters' must be a JSON schema object", "tools")
        out.append(harmony.Tool(name, str(fn.get("description") or ""), params))
    choice = body.get("tool_choice", "auto")
    if choice == "none":
        return []
    if choice not in ("auto", "required") and not (isinstance(choice, dict) and choice.get("type") == "function"):
        raise bad("'tool_choice' must be \"none\", \"auto\", \"required\" or a function", "tool_choice")
    return out


def parse_messages(messages) -> tuple[list[harmony.Message], str | None]:
    """OpenAI messages -> (harmony history, developer instructions from system/developer messages)."""
    if not isinstance(messages, list) or not messages:
        raise bad("'messages' must be a non-empty list", "messages")
    history, instructions, call_names = [], [], {}
    for i, m in enumerate(messages):
        role = m.get("role") if isinstance(m, dict) else None
        where = f"messages[{i}]"
        if role in ("system", "developer"):
            instructions.append(text_of(m.get("content"), where))
        elif role == "user":
            history.append(harmony.Message("user", text_of(m.get("content"), where)))
        elif role == "assistant":
            reasoning = m.get("reasoning_content") or m.get("reasoning")
            if isinstance(reasoning, str) and reasoning:
                history.append(harmony.Message("assistant", reasoning, "analysis"))
            for call in m.get("tool_calls") or []:
                fn = call.get("function") if isinstance(call, dict) else None
                if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
                    raise bad(f"{where}: each tool call needs a function with a name", "messages")
                arguments = fn.get("arguments") or "{}"
                call_names[call.get("id")] = fn["name"]
                history.append(harmony.Message("assistant", arguments if isinstance(arguments, str) else json.dumps(arguments),
                                               "commentary", f"functions.{fn['name']}", "<|constrain|>json"))
            content = text_of(m.get("content"), where)
            if content:
                history.append(harmony.Message("assistant", content, "final"))
        elif role == "tool":
            name = m.get("name") or call_names.get(m.get("tool_call_id"))
            if not name:
                raise bad(f"{where}: a tool message must answer a tool_call_id of an earlier assistant message",
                          "messages")
            history.append(harmony.Message(f"functions.{name}", text_of(m.get("content"), where), "commentary",
                                           "assistant"))
        else:
            raise bad(f"{where}: role must be system, developer, user, assistant or tool, got {role!r}", "messages")
    return history, "\n\n".join(instructions) or None


def parse_chat_request(body, default_max_tokens: int) -> ChatRequest:
    if not isinstance(body, dict):
        raise bad("the request body must be a JSON object")
    if body.get("n", 1) != 1:
        raise bad("only n = 1 is supported", "n")
    history, instructions = parse_messages(body.get("messages"))
    effort = body.get("reasoning_effort") or "medium"
    if effort not in harmony.REASONING_EFFORTS:
        raise bad(f"'reasoning_effort' must be one of {', '.join(harmony.REASONING_EFFORTS)}", "reasoning_effort")
    stream, usage = stream_flags(body)
    return ChatRequest(history, instructions, parse_tools(body), effort, sampling_of(body),
                       max_tokens_of(body, default_max_tokens, "max_completion_tokens", "max_tokens"),
                       stop_strings(body), stream, usage)


@dataclass
class CompletionRequest:
    prompt: str
    params: SamplingParams
    max_tokens: int
    stop: list[str]
    stream: bool
    include_usage: bool


def parse_completion_request(body) -> CompletionRequest:
    if not isinstance(body, dict):
        raise bad("the request body must be a JSON object")
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if not isinstance(prompt, str) or not prompt:
        raise bad("'prompt' must be a non-empty string", "prompt")
    stream, usage = stream_flags(body)
    return CompletionRequest(prompt, sampling_of(body), max_tokens_of(body, 16, "max_tokens"),  # OpenAI's default
                             stop_strings(body), stream, usage)


# -- responses ---------------------------------------------------------------------------------------

class StopMatcher:
    """Text out, cut before the first stop string: text that may begin one is held back until it
    can't (a stop string may arrive split over several tokens)."""

    def __init__(self, stops: list[str]):
        self.stops, self.held, self.stopped = stops, "", False

    def feed(self, text: str) -> str:
        if not self.stops:
            return text
        self.held += text
        cut = min((i for i in (self.held.find(s) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            out, self.held, self.stopped = self.held[:cut], "", True
            return out
        keep = max((k for s in self.stops for k in range(1, len(s)) if self.held.endswith(s[:k])), default=0)
        out, self.held = self.held[:len(self.held) - keep], self.held[len(self.held) - keep:]
        return out

    def flush(self) -> str:
        out, self.held = self.held, ""
        return out


@dataclass
class ChatReply:
    """Harmony deltas -> the OpenAI assistant message and its stream deltas."""
    stop: StopMatcher
    content: str = ""
    reasoning: str = ""
    tool_calls: list[dict] = field(default_factory=list)
    calling: str | None = None  # the function whose call's arguments are streaming now

    def add(self, delta: harmony.Delta) -> list[dict]:
        """The stream deltas (choices[0].delta objects) that one harmony delta makes."""
        if delta.recipient and delta.recipient.startswith("functions."):
            out = []
            if delta.recipient != self.calling:
                self.calling = delta.recipient
                name, call_id = delta.recipient.removeprefix("functions."), f"call_{secrets.token_hex(12)}"
                self.tool_calls.append({"id": call_id, "type": "function", "function": {"name": name, "arguments": ""}})
                out.append({"tool_calls": [{"index": len(self.tool_calls) - 1, "id": call_id, "type": "function",
                                            "function": {"name": name, "arguments": ""}}]})
            self.tool_calls[-1]["function"]["arguments"] += delta.text
            return out + [{"tool_calls": [{"index": len(self.tool_calls) - 1,
                                           "function": {"arguments": delta.text}}]}]
        self.calling = None
        if delta.channel == "analysis":
            self.reasoning += delta.text
            return [{"reasoning_content": delta.text}]
        text = self.stop.feed(delta.text)
        self.content += text
        return [{"content": text}] if text else []

    def finish(self) -> list[dict]:
        """What the stop matcher still held (no stop string came)."""
        self.calling = None
        text = self.stop.flush()
        self.content += text
        return [{"content": text}] if text else []

    def message(self) -> dict:
        msg = {"role": "assistant", "content": self.content or (None if self.tool_calls else "")}
        if self.reasoning:
            msg["reasoning_content"] = self.reasoning
        if self.tool_calls:
            msg["tool_calls"] = self.tool_calls
        return msg


def new_id(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(12)}"


def usage(prompt_tokens: int, stats) -> dict:
    """The usage object; stats is the generation's (None when it produced nothing)."""
    completion_tokens = stats.generated_tokens if stats else 0
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def timings(stats) -> dict:
    """llama-server's `timings` object (what its web page and clients show as the token rate)."""
    return {"prompt_n": stats.prompt_tokens, "prompt_ms": stats.prompt_seconds * 1e3,
            "prompt_per_second": stats.prefill_tps, "predicted_n": stats.generated_tokens,
            "predicted_ms": stats.decode_seconds * 1e3, "predicted_per_second": stats.decode_tps}


def chunk(kind: str, rid: str, model: str, created: int, choice: dict | None, **extra) -> dict:
    return {"id": rid, "object": kind, "created": created, "model": model,
            "choices": [dict(index=0, **choice)] if choice is not None else [], **extra}


def now() -> int:
    return int(time.time())
