"""Qwen3's chat format, ChatML with a think block: render a conversation to token ids and parse
the model's reply as it streams, behind the same interface as coordinator.harmony's HarmonyFormat
(the history is harmony.Message's: analysis = the think block, final = the answer, tool calls and
results by recipient), so chat, the server and the Python API serve either family unchanged.

Follows Qwen3's own chat template: a system turn only when there are instructions or tools; the
tools declared as JSON inside <tools></tools> with the instruction to answer calls as
<tool_call>{"name": ..., "arguments": ...}</tool_call>; tool results as a user turn of
<tool_response> blocks; reasoning kept only for the assistant turns after the last user message;
the prompt ends with the assistant's header. The parser never raises: an unterminated or invalid
tool call is shown as text.
"""
from __future__ import annotations

import json

from .harmony import Delta, Message, Tool

IM_START, IM_END, ENDOFTEXT = "<|im_start|>", "<|im_end|>", "<|endoftext|>"
THINK, END_THINK, TOOL_CALL, END_TOOL_CALL = "<think>", "</think>", "<tool_call>", "</tool_call>"
TOOLS_PREAMBLE = ("# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
                  "You are provided with function signatures within <tools></tools> XML tags:\n<tools>")
TOOLS_POSTAMBLE = ("\n</tools>\n\nFor each function call, return a json object with function name and arguments "
                   "within <tool_call></tool_call> XML tags:\n<tool_call>\n"
                   '{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call>')


def tool_json(tool: Tool) -> str:
    return json.dumps({"type": "function", "function": {"name": tool.name, "description": tool.description,
                                                        "parameters": tool.parameters or {}}}, ensure_ascii=False)


def system_text(instructions: str | None, tools: list[Tool]) -> str | None:
    if not tools:
        return instructions
    head = f"{instructions}\n\n" if instructions else ""
    return head + TOOLS_PREAMBLE + "".join("\n" + tool_json(t) for t in tools) + TOOLS_POSTAMBLE


# A rendered prompt is a list of segments (text, markup): markup is ours and its tags become
# special tokens; everything else is encoded as plain text, so a user's '<|im_end|>' stays text.
Segments = list[tuple[str, bool]]


def tool_call_segments(m: Message) -> Segments:
    try:
        arguments = json.loads(m.content)
    except json.JSONDecodeError:
        arguments = m.content
    name = (m.recipient or "").removeprefix("functions.")
    return [(f"{TOOL_CALL}\n", True), (json.dumps({"name": name, "arguments": arguments}, ensure_ascii=False), False),
            (f"\n{END_TOOL_CALL}", True)]


def turns(history: list[Message]) -> list[tuple[str, Segments]]:
    """(role, content segments) ChatML turns: consecutive assistant messages (reasoning, answer,
    calls) make one assistant turn, consecutive tool results one user turn."""
    last_user = max((i for i, m in enumerate(history) if m.role == "user"), default=-1)
    out: list[list] = []  # [role, segments, reasoning]
    for i, m in enumerate(history):
        if m.role == "assistant":
            if not out or out[-1][0] != "assistant":
                out.append(["assistant", [], ""])
            turn = out[-1]
            if m.channel == "analysis":
                turn[2] += m.content if i > last_user else ""
            elif m.is_tool_call:
                turn[1] += ([("\n", False)] if turn[1] else []) + tool_call_segments(m)
            else:
                turn[1].append((m.content, False))
        elif m.role.startswith("functions."):
            if not out or out[-1][0] != "tool":
                out.append(["tool", [], ""])
            out[-1][1] += ([("\n", False)] if out[-1][1] else []) + [
                ("<tool_response>\n" + m.content + "\n</tool_response>", False)]
        else:
            out.append([m.role, [(m.content, False)], ""])
    rendered = []
    for role, segments, reasoning in out:
        if reasoning:
            if segments:
                segments[0] = (segments[0][0].lstrip(), segments[0][1])
            segments = [(f"{THINK}\n", True), (reasoning.strip(), False), (f"\n{END_THINK}\n\n", True)] + segments
        rendered.append(("user" if role == "tool" else role, segments))
    return rendered


class ChatMLParser:
    """Feed the reply's token ids one at a time; get text deltas tagged with their channel
    (analysis inside <think>, final outside) and tool calls (recipient functions.NAME, their
    arguments as one delta when </tool_call> closes them). Finished messages accumulate in
    `messages` (role assistant) for the conversation history."""

    def __init__(self, tok):
        self.tok = tok
        self.ids = {name: tok.token_id(name) for name in (THINK, END_THINK, TOOL_CALL, END_TOOL_CALL, IM_END,
                                                            ENDOFTEXT)}
        self.messages: list[Message] = []
        self._channel, self._content, self._shown, self._in_call = "final", [], "", False
        self._skip = 0  # leading newlines of the current message, not shown

    def feed(self, token: int) -> list[Delta]:
        ids = self.ids
        if token in (ids[IM_END], ids[ENDOFTEXT]):
            return self.finish()
        if token == ids[THINK] and not self._in_call:
            out = self._close()
            self._channel = "analysis"
            return out
        if token == ids[END_THINK] and not self._in_call:
            out = self._close()
            self._channel = "final"
            return out
        if token == ids[TOOL_CALL] and not self._in_call:
            out = self._close()
            self._in_call = True
            return out
        if token == ids[END_TOOL_CALL] and self._in_call:
            return self._end_call()
        self._content.append(token)
        return [] if self._in_call else self._emit()

    def finish(self) -> list[Delta]:
        if self._in_call:  # never closed: what was written shows as text
            self._in_call, self._channel = False, "final"
            self._content = self.tok.encode_ordinary(TOOL_CALL) + self._content
            out = self._emit()
        else:
            out = []
        return out + self._close()

    def _end_call(self) -> list[Delta]:
        text = self.tok.decode(self._content)
        self._content, self._shown, self._in_call = [], "", False
        try:
            call = json.loads(text)
            name, arguments = call["name"], call.get("arguments", {})
            if not isinstance(name, str):
                raise TypeError
        except (json.JSONDecodeError, KeyError, TypeError):  # not a call: show it as it was written
            delta = Delta("final", f"{TOOL_CALL}{text}{END_TOOL_CALL}")
            self.messages.append(Message("assistant", delta.text, "final"))
            return [delta]
        arguments = arguments if isinstance(arguments, str) else json.dumps(arguments, ensure_ascii=False)
        self.messages.append(Message("assistant", arguments, "commentary", f"functions.{name}", "<|constrain|>json"))
        return [Delta("commentary", arguments, f"functions.{name}")]

    def _emit(self) -> list[Delta]:
        text = self.tok.decode(self._content)
        if text.endswith("\ufffd"):
            return []
        if not self._shown:  # the newlines after <think> / </think> are not shown
            self._skip = len(text) - len(text.lstrip("\n"))
        shown = text[self._skip:]
        piece = shown[len(self._shown):]
        if not piece:
            return []
        self._shown = shown
        return [Delta(self._channel, piece)]

    def _close(self) -> list[Delta]:
        """End the current message (at a tag or the reply's end)."""
        text = self.tok.decode(self._content).strip("\n") if self._content else ""
        if text:
            self.messages.append(Message("assistant", text, self._channel))
        self._content, self._shown = [], ""
        return []


class ChatMLFormat:
    """Qwen3's chat format (see the module docstring). reasoning_effort "low" switches thinking
    off the way Qwen3's template does for enable_thinking=False (an empty think block opens the
    answer); "medium" and "high" let the model think."""

    def __init__(self, tok):
        self.tok = tok
        self.stop_ids = (tok.token_id(IM_END), tok.token_id(ENDOFTEXT))

    def render_prompt(self, history: list[Message], reasoning_effort: str = "medium", instructions: str | None = None,
                      date: str | None = None, tools: list[Tool] = ()) -> list[int]:
        system = system_text(instructions, list(tools))
        segments: Segments = [(f"{IM_START}system\n", True), (system, False), (f"{IM_END}\n", True)] if system else []
        for role, content in turns(history):
            segments += [(f"{IM_START}{role}\n", True), *content, (f"{IM_END}\n", True)]
        segments.append((f"{IM_START}assistant\n", True))
        if reasoning_effort == "low":
            segments.append((f"{THINK}\n\n{END_THINK}\n\n", True))
        ids: list[int] = []
        for text, markup in segments:
            ids += self.tok.encode(text) if markup else self.tok.encode_ordinary(text)
        return ids

    def parser(self) -> ChatMLParser:
        return ChatMLParser(self.tok)
