"""`moemesh chat`: an interactive chat in the terminal, in the model's chat format (harmony, ChatML).

ollama-style REPL: `>>>` prompt, `\"\"\"` starts and ends a multi-line message, a trailing `\\`
continues a line, Ctrl-C stops the answer (not the program), Ctrl-D or /exit quits; /help lists
the commands (/reset, /stats, /set, /save, /load), and an unknown /command is refused rather than
sent to the model. The answer streams; the analysis channel is hidden behind a "thinking…" line
unless --show-reasoning (then dimmed). When a conversation outgrows the context, its oldest turns
are dropped with a notice, as ollama and llama-cli do. A stats line follows each answer on stderr.
"""
from __future__ import annotations

import json
import sys
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from . import harmony
from .generation import ContextLimitError, ConversationCache, GenerationStats
from .drafting import DraftParams
from .sampling import SamplingParams

DIM, RESET = "\x1b[2m", "\x1b[0m"
HELP = """/reset              forget the conversation
/stats              timings of the last answer
/set NAME VALUE     temperature, top_p, top_k, min_p, seed, max_tokens, effort (low|medium|high), reasoning (on|off)
/save FILE          write the conversation to a JSON file
/load FILE          continue a saved conversation
/exit               quit (or Ctrl-D)
\"\"\"                 start / end a multi-line message"""


@dataclass
class ChatOptions:
    system: str | None = None  # developer instructions
    reasoning_effort: str = "medium"
    params: SamplingParams = field(default_factory=SamplingParams)
    draft: DraftParams = field(default_factory=DraftParams)
    max_tokens: int = 2048
    show_reasoning: bool = False


class ChatSession:
    """A conversation: history in, streamed deltas out. No terminal I/O here (see run_repl)."""

    def __init__(self, engine, tokenizer, options: ChatOptions):
        self.engine, self.tok, self.options = engine, tokenizer, options
        self.format = engine.chat_format(tokenizer)
        self.history: list[harmony.Message] = []
        self.conversation = ConversationCache()
        self.last_stats = GenerationStats()
        self.dropped = 0  # messages the last reply dropped to fit the context

    def reset(self) -> None:
        self.history = []
        self.conversation = ConversationCache()

    def save(self, path: str) -> None:
        data = {"reasoning_effort": self.options.reasoning_effort, "system": self.options.system,
                "messages": [{k: v for k, v in asdict(m).items() if v is not None} for m in self.history]}
        Path(path).write_text(json.dumps(data, indent=1, ensure_ascii=False), encoding="utf-8")

    def load(self, path: str) -> None:
        """A conversation written by save(); raises ValueError naming what is wrong with it."""
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
            history = [harmony.Message(**m) for m in data["messages"]]
        except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
            raise ValueError(f"{path}: not a saved conversation ({e})") from None
        self.reset()
        self.history = history
        self.options.system = data.get("system")
        self.options.reasoning_effort = data.get("reasoning_effort", self.options.reasoning_effort)

    def render(self) -> list[int]:
        """The prompt for the history, oldest turns dropped until it leaves room for an answer
        (a quarter of the context, at most max_tokens); the last user message always stays."""
        room = min(self.options.max_tokens, self.engine.context_length // 4)
        self.dropped = 0
        while True:
            prompt = self.format.render_prompt(self.history, self.options.reasoning_effort, self.options.system)
            users = [i for i, m in enumerate(self.history) if m.role == "user"]
            if len(prompt) + room <= self.engine.context_length or len(users) < 2:
                return prompt
            cut = users[1]  # the first turn, up to the next user message
            self.history = self.history[cut:]
            self.dropped += cut

    def reply(self, user_text: str):
        """Yield Deltas of the answer; the history gets the user turn and the reply."""
        self.history.append(harmony.Message("user", user_text))
        prompt = self.render()
        parser = self.format.parser()
        gen = self.engine.stream(prompt, self.options.max_tokens, self.options.params, self.format.stop_ids,
                                 conversation=self.conversation, draft=self.options.draft)
        try:
            for step in gen:
                yield from parser.feed(step.token)
            yield from parser.finish()  # shows a malformed, unfinished header as text
        finally:  # also on Ctrl-C: keep what was said
            parser.finish()
            self.history += parser.messages
            self.last_stats = gen.stats


def read_message(prompt: str = ">>> ") -> str:
    """One user message; raises EOFError on Ctrl-D."""
    line = input(prompt)
    if line.strip().startswith('"""'):
        lines = [line.strip()[3:]]
        while not lines[-1].rstrip().endswith('"""'):
            lines.append(input("... "))
        lines[-1] = lines[-1].rstrip()[:-3]
        return "\n".join(lines).strip()
    lines = [line]
    while lines[-1].endswith("\\"):
        lines[-1] = lines[-1][:-1]
        lines.append(input("... "))
    return "\n".join(lines).strip()


def run_repl(session: ChatSession, out=sys.stdout, err=sys.stderr) -> int:
    try:
        import readline  # noqa: F401  (line editing and history for input())
    except ImportError:
        pass
    color = out.isatty()
    print("Type a message; /help for commands, Ctrl-D to quit.", file=err)
    while True:
        try:
            text = read_message()
        except EOFError:
            print(file=out)
            return 0
        except KeyboardInterrupt:
            print("\n(use /exit or Ctrl-D to quit)", file=err)
            continue
        except UnicodeDecodeError:
            print("error: the terminal sent text that is not valid UTF-8; try again", file=err)
            continue
        if not text:
            continue
        if text in ("/exit", "/bye", "/quit"):
            return 0
        if text == "/reset":
            session.reset()
            print("(conversation cleared)", file=err)
            continue
        if text == "/stats":
            print(session.last_stats.summary(), file=err)
            continue
        if text in ("/help", "/?"):
            print(HELP, file=err)
            continue
        if text.startswith("/") and not text.startswith("//"):
            command(session, text, err)
            continue
        answer(session, text, out, err, color)


def command(session: ChatSession, text: str, err) -> None:
    """/set, /save, /load; anything else starting with / is refused (// sends a literal slash)."""
    name, _, rest = text.partition(" ")
    try:
        if name == "/set":
            key, _, value = rest.strip().partition(" ")
            set_option(session.options, key, value.strip())
            print(f"(set {key} {value.strip()})", file=err)
        elif name == "/save" and rest.strip():
            session.save(rest.strip())
            print(f"(saved {len(session.history)} messages to {rest.strip()})", file=err)
        elif name == "/load" and rest.strip():
            session.load(rest.strip())
            print(f"(loaded {len(session.history)} messages from {rest.strip()})", file=err)
        else:
            print(f"unknown command {name}; /help lists the commands (start with // to send a slash)", file=err)
    except ValueError as e:
        print(f"error: {e}", file=err)


def set_option(options: ChatOptions, key: str, value: str) -> None:
    """/set KEY VALUE on the options the next answer uses; ValueError for a bad key or value."""
    numbers = {"temperature": float, "temp": float, "top_p": float, "top_k": int, "min_p": float, "seed": int,
               "max_tokens": int}
    if key in numbers:
        try:
            number = numbers[key](value)
        except ValueError:
            raise ValueError(f"/set {key}: bad value {value!r}") from None
        if key == "max_tokens":
            options.max_tokens = number
        else:  # SamplingParams says what is out of range ("... must be ...")
            options.params = replace(options.params, **{"temperature" if key == "temp" else key: number})
    elif key in ("effort", "reasoning_effort") and value in harmony.REASONING_EFFORTS:
        options.reasoning_effort = value
    elif key == "reasoning" and value in ("on", "off"):
        options.show_reasoning = value == "on"
    else:
        raise ValueError(f"/set {key} {value}: see /help for what can be set")


def answer(session: ChatSession, text: str, out, err, color: bool) -> None:
    if text.startswith("//"):
        text = text[1:]
    channel, thinking = None, False
    try:
        for delta in session.reply(text):
            if session.dropped:
                print(f"(the context is full: dropped the {session.dropped} oldest messages)", file=err)
                session.dropped = 0
            if delta.channel == "analysis" and not session.options.show_reasoning:
                if color and not thinking:
                    out.write(DIM + "thinking…" + RESET)
                    out.flush()
                    thinking = True
                continue
            if thinking:
                out.write("\r\x1b[K")  # the indicator goes when the answer starts
                thinking = False
            if delta.channel != channel:
                if channel is not None:
                    out.write((RESET if color else "") + "\n")
                if delta.channel == "analysis":
                    out.write(DIM if color else "[reasoning] ")
                channel = delta.channel
            out.write(delta.text)
            out.flush()
        if session.dropped:  # an answer with nothing shown
            print(f"(the context is full: dropped the {session.dropped} oldest messages)", file=err)
    except KeyboardInterrupt:
        out.write(" [stopped]")
    except ContextLimitError as e:
        session.history.pop()  # the message that did not fit
        print(f"error: {e}; /reset to start over", file=err)
        return
    if color:
        out.write(RESET)
    out.write("\n")
    out.flush()
    print((DIM if color else "") + session.last_stats.summary() + (RESET if color else ""), file=err)
