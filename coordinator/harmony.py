"""The harmony chat format of gpt-oss (spec/gpt-oss.md §4.2): render a conversation to token ids
and parse the model's reply as it streams.

Written here rather than taken from `openai-harmony` because that library is a Rust extension
without wheels for every phone; tests check this renderer against it token for token.
The parser never raises: a malformed header becomes plain `final` text, so a confused model (or
the random demo model) still shows its output.
"""
from __future__ import annotations

from dataclasses import dataclass

START, END, MESSAGE, CHANNEL, CONSTRAIN = 200006, 200007, 200008, 200005, 200003
RETURN, CALL, ENDOFTEXT = 200002, 200012, 199999
STOP_IDS = (RETURN, CALL, ENDOFTEXT)  # stop sampling an assistant turn on these
REASONING_EFFORTS = ("low", "medium", "high")
MAX_HEADER_TOKENS = 16  # longer than any real header (role, recipient, channel, constraint): show as text


@dataclass(frozen=True)
class Message:
    role: str  # system, developer, user, assistant
    content: str
    channel: str | None = None  # assistant: analysis, commentary, final


def system_text(reasoning_effort: str = "medium", date: str | None = None) -> str:
    if reasoning_effort not in REASONING_EFFORTS:
        raise ValueError(f"reasoning effort must be one of {', '.join(REASONING_EFFORTS)}")
    lines = ["You are ChatGPT, a large language model trained by OpenAI.", "Knowledge cutoff: 2024-06"]
    if date:
        lines.append(f"Current date: {date}")
    return "\n".join(lines) + f"\n\nReasoning: {reasoning_effort}\n\n" \
        "# Valid channels: analysis, commentary, final. Channel must be included for every message."


def developer_text(instructions: str) -> str:
    return f"# Instructions\n\n{instructions}"


def visible_history(history: list[Message]) -> list[Message]:
    """Drop analysis messages of turns that already ended in a final answer (harmony's rule)."""
    last_final = max((i for i, m in enumerate(history) if m.role == "assistant" and m.channel == "final"),
                     default=-1)
    return [m for i, m in enumerate(history) if not (m.channel == "analysis" and i < last_final)]


def render_message(tok, m: Message) -> list[int]:
    ids = [START] + tok.encode_ordinary(m.role)
    if m.channel:
        ids += [CHANNEL] + tok.encode_ordinary(m.channel)
    return ids + [MESSAGE] + tok.encode_ordinary(m.content) + [END]


def render_prompt(tok, history: list[Message], reasoning_effort: str = "medium", instructions: str | None = None,
                  date: str | None = None) -> list[int]:
    """System (+ developer) messages, the visible history, then `<|start|>assistant` to complete."""
    msgs = [Message("system", system_text(reasoning_effort, date))]
    if instructions:
        msgs.append(Message("developer", developer_text(instructions)))
    ids = []
    for m in msgs + visible_history(history):
        ids += render_message(tok, m)
    return ids + [START] + tok.encode_ordinary("assistant")


@dataclass(frozen=True)
class Delta:
    channel: str
    text: str


class StreamParser:
    """Feed the reply's token ids one at a time; get text deltas tagged with their channel.

    The prompt ends in `<|start|>assistant`, so parsing starts inside a header. Finished messages
    accumulate in `messages` (role assistant) for the conversation history.
    """

    def __init__(self, tok):
        self.tok = tok
        self.messages: list[Message] = []
        self._in_header, self._header, self._channel = True, [], "final"
        self._content: list[int] = []
        self._shown = ""

    def feed(self, token: int) -> list[Delta]:
        if token in (END, RETURN, CALL, ENDOFTEXT):
            out = self._flush_header_as_text() if self._in_header else []
            self._finish()
            return out
        if token == START:
            self._finish()
            self._in_header, self._header = True, []
            return []
        if self._in_header:
            if token == MESSAGE:
                self._channel = self._channel_from_header()
                self._in_header, self._content, self._shown = False, [], ""
                return []
            self._header.append(token)
            return self._flush_header_as_text() if len(self._header) > MAX_HEADER_TOKENS else []
        self._content.append(token)
        return self._emit()

    def _channel_from_header(self) -> str:
        if CHANNEL not in self._header:
            return "final"
        after = self._header[self._header.index(CHANNEL) + 1:]
        if CONSTRAIN in after:
            after = after[:after.index(CONSTRAIN)]
        words = self.tok.decode(after).strip().split()
        return words[0] if words else "final"

    def _flush_header_as_text(self) -> list[Delta]:
        """A malformed header: what the model wrote is shown as final text."""
        self._in_header, self._channel = False, "final"
        self._content, self._shown = list(self._header), ""
        self._header = []
        return self._emit()

    def _emit(self) -> list[Delta]:
        text = self.tok.decode(self._content)
        if text.endswith("\ufffd"):
            return []
        piece, self._shown = text[len(self._shown):], text
        return [Delta(self._channel, piece)] if piece else []

    def _finish(self) -> None:
        if not self._in_header and self._content:
            self.messages.append(Message("assistant", self.tok.decode(self._content), self._channel))
        self._content, self._shown = [], ""
        self._in_header, self._header = True, []
