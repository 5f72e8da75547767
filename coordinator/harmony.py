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
    role: str  # system, developer, user, assistant, or a tool's name (functions.NAME) for its result
    content: str
    channel: str | None = None  # assistant: analysis, commentary, final
    recipient: str | None = None  # a tool call's functions.NAME; a tool result's "assistant"
    content_type: str | None = None  # a tool call's "<|constrain|>json"

    @property
    def is_tool_call(self) -> bool:
        return self.role == "assistant" and (self.recipient or "").startswith("functions.")


@dataclass(frozen=True)
class Tool:
    """A function the model may call: its name, description and JSON-schema parameters (as the
    OpenAI API's `tools` carry them)."""
    name: str
    description: str = ""
    parameters: dict | None = None


def system_text(reasoning_effort: str = "medium", date: str | None = None, tools: bool = False) -> str:
    if reasoning_effort not in REASONING_EFFORTS:
        raise ValueError(f"reasoning effort must be one of {', '.join(REASONING_EFFORTS)}")
    lines = ["You are ChatGPT, a large language model trained by OpenAI.", "Knowledge cutoff: 2024-06"]
    if date:
        lines.append(f"Current date: {date}")
    text = "\n".join(lines) + f"\n\nReasoning: {reasoning_effort}\n\n" \
        "# Valid channels: analysis, commentary, final. Channel must be included for every message."
    return text + "\nCalls to these tools must go to the commentary channel: 'functions'." if tools else text


def developer_text(instructions: str | None, tools: list[Tool] = ()) -> str:
    parts = [f"# Instructions\n\n{instructions}"] if instructions else []
    if tools:
        parts.append("# Tools\n\n## functions\n\nnamespace functions {\n\n" +
                     "".join(tool_declaration(t) + "\n\n" for t in tools) + "} // namespace functions")
    return "\n\n".join(parts)


def tool_declaration(tool: Tool) -> str:
    """A tool as harmony declares it to the model: a TypeScript-like type over its JSON schema."""
    head = f"// {tool.description}\n" if tool.description else ""
    props = (tool.parameters or {}).get("properties") or {}
    if not props:
        return f"{head}type {tool.name} = () => any;"
    required = set((tool.parameters or {}).get("required") or ())
    lines = []
    for name, schema in props.items():
        if schema.get("description"):
            lines.append(f"// {schema['description']}")
        default = f" // default: {schema['default']}" if "default" in schema else ""
        optional = "" if name in required else "?"
        lines.append(f"{name}{optional}: {schema_type(schema)},{default}")
    return f"{head}type {tool.name} = (_: {{\n" + "\n".join(lines) + "\n}) => any;"


def schema_type(schema: dict) -> str:
    """The TypeScript spelling of a JSON-schema type (the subset tools use)."""
    import json

    if "enum" in schema:
        return " | ".join(json.dumps(v) for v in schema["enum"])
    kind = schema.get("type")
    if isinstance(kind, list):
        return " | ".join(schema_type({**schema, "type": k}) for k in kind)
    if kind == "array":
        return f"{schema_type(schema.get('items') or {})}[]"
    if kind == "object" and schema.get("properties"):
        required = set(schema.get("required") or ())
        fields = ", ".join(f"{k}{'' if k in required else '?'}: {schema_type(v)}"
                           for k, v in schema["properties"].items())
        return f"{{ {fields} }}"
    return {"string": "string", "integer": "number", "number": "number", "boolean": "boolean",
            "null": "null", "object": "object"}.get(kind, "any")


def visible_history(history: list[Message]) -> list[Message]:
    """Drop analysis messages of turns that already ended in a final answer (harmony's rule)."""
    last_final = max((i for i, m in enumerate(history) if m.role == "assistant" and m.channel == "final"),
                     default=-1)
    return [m for i, m in enumerate(history) if not (m.channel == "analysis" and i < last_final)]


def render_message(tok, m: Message) -> list[int]:
    """<|start|>role[ to=recipient][<|channel|>channel][ <|constrain|>type]<|message|>content, then
    <|call|> for a tool call (as history keeps it), <|end|> otherwise."""
    ids = [START] + tok.encode_ordinary(m.role + (f" to={m.recipient}" if m.recipient else ""))
    if m.channel:
        ids += [CHANNEL] + tok.encode_ordinary(m.channel)
    if m.content_type:
        constraint = m.content_type.removeprefix("<|constrain|>")
        ids += tok.encode_ordinary(" ") + [CONSTRAIN] + tok.encode_ordinary(constraint)
    return ids + [MESSAGE] + tok.encode_ordinary(m.content) + [CALL if m.is_tool_call else END]


def render_prompt(tok, history: list[Message], reasoning_effort: str = "medium", instructions: str | None = None,
                  date: str | None = None, tools: list[Tool] = ()) -> list[int]:
    """System (+ developer) messages, the visible history, then `<|start|>assistant` to complete."""
    msgs = [Message("system", system_text(reasoning_effort, date, bool(tools)))]
    if instructions or tools:
        msgs.append(Message("developer", developer_text(instructions, tools)))
    ids = []
    for m in msgs + visible_history(history):
        ids += render_message(tok, m)
    return ids + [START] + tok.encode_ordinary("assistant")


@dataclass(frozen=True)
class Delta:
    channel: str
    text: str
    recipient: str | None = None  # functions.NAME: the text is a tool call's arguments


class StreamParser:
    """Feed the reply's token ids one at a time; get text deltas tagged with their channel.

    The prompt ends in `<|start|>assistant`, so parsing starts inside a header. Finished messages
    accumulate in `messages` (role assistant) for the conversation history.
    """

    def __init__(self, tok):
        self.tok = tok
        self.messages: list[Message] = []
        self._in_header, self._header, self._channel, self._recipient = True, [], "final", None
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
                self._channel, self._recipient = self._parse_header()
                self._in_header, self._content, self._shown = False, [], ""
                return []
            self._header.append(token)
            return self._flush_header_as_text() if len(self._header) > MAX_HEADER_TOKENS else []
        self._content.append(token)
        return self._emit()

    def finish(self) -> list[Delta]:
        """The reply ended (a stop token, the length limit, Ctrl-C): what is left to show, and the
        unfinished message kept in `messages`."""
        return self.feed(END)

    def _parse_header(self) -> tuple[str, str | None]:
        """(channel, recipient) of a header: `[role][ to=R]<|channel|>C[ to=R][ <|constrain|>T]`
        (the model may put the recipient before or after the channel; harmony accepts both)."""
        header = self._header
        constrain = header.index(CONSTRAIN) if CONSTRAIN in header else len(header)
        if CHANNEL in header[:constrain]:
            at = header.index(CHANNEL)
            before, after = self.tok.decode(header[:at]), self.tok.decode(header[at + 1:constrain])
        else:
            before, after = self.tok.decode(header[:constrain]), ""
        words = after.split()
        channel = next((w for w in words if not w.startswith("to=")), "final")
        recipient = next((w[3:] for w in before.split() + words if w.startswith("to=")), None)
        return channel, recipient

    def _flush_header_as_text(self) -> list[Delta]:
        """A malformed header: what the model wrote is shown as final text."""
        self._in_header, self._channel, self._recipient = False, "final", None
        self._content, self._shown = list(self._header), ""
        self._header = []
        return self._emit()

    def _emit(self) -> list[Delta]:
        text = self.tok.decode(self._content)
        if text.endswith("\ufffd"):
            return []
        piece, self._shown = text[len(self._shown):], text
        return [Delta(self._channel, piece, self._recipient)] if piece else []

    def _finish(self) -> None:
        if not self._in_header and self._content:
            call = (self._recipient or "").startswith("functions.")
            self.messages.append(Message("assistant", self.tok.decode(self._content), self._channel, self._recipient,
                                         "<|constrain|>json" if call else None))
        self._content, self._shown = [], ""
        self._in_header, self._header = True, []


class HarmonyFormat:
    """gpt-oss's chat format behind the interface every family's format offers (coordinator.chatml
    is Qwen3's): the ids that end an assistant turn, a prompt from a history, a reply parser."""

    stop_ids = STOP_IDS

    def __init__(self, tok):
        self.tok = tok

    def render_prompt(self, history: list[Message], reasoning_effort: str = "medium", instructions: str | None = None,
                      date: str | None = None, tools: list[Tool] = ()) -> list[int]:
        return render_prompt(self.tok, history, reasoning_effort, instructions, date, tools)

    def parser(self) -> StreamParser:
        return StreamParser(self.tok)
