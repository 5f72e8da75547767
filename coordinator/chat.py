"""`moemesh chat`: an interactive harmony chat with gpt-oss in the terminal.

ollama-style REPL: `>>>` prompt, `\"\"\"` starts and ends a multi-line message, a trailing `\\`
continues a line, Ctrl-C stops the answer (not the program), Ctrl-D or /exit quits, /reset
forgets the conversation, /stats shows timings. The answer streams; the analysis channel is
hidden unless --show-reasoning (then dimmed). A stats line follows each answer on stderr.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass, field

from . import harmony
from .generation import ContextLimitError, ConversationCache, GenerationStats
from .drafting import DraftParams
from .sampling import SamplingParams

DIM, RESET = "\x1b[2m", "\x1b[0m"
HELP = "/reset  forget the conversation\n/stats  timings of the last answer\n/exit   quit (or Ctrl-D)\n" \
       '"""     start / end a multi-line message'


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
        self.history: list[harmony.Message] = []
        self.conversation = ConversationCache()
        self.last_stats = GenerationStats()

    def reset(self) -> None:
        self.history = []
        self.conversation = ConversationCache()

    def reply(self, user_text: str):
        """Yield harmony Deltas of the answer; the history gets the user turn and the reply."""
        self.history.append(harmony.Message("user", user_text))
        prompt = harmony.render_prompt(self.tok, self.history, self.options.reasoning_effort, self.options.system)
        parser = harmony.StreamParser(self.tok)
        gen = self.engine.stream(prompt, self.options.max_tokens, self.options.params, harmony.STOP_IDS,
                                 conversation=self.conversation, draft=self.options.draft)
        try:
            for step in gen:
                yield from parser.feed(step.token)
            yield from parser.feed(harmony.END)  # shows a malformed, unfinished header as text
        finally:  # also on Ctrl-C: keep what was said
            parser.feed(harmony.END)
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
        answer(session, text, out, err, color)


def answer(session: ChatSession, text: str, out, err, color: bool) -> None:
    channel = None
    try:
        for delta in session.reply(text):
            if delta.channel == "analysis" and not session.options.show_reasoning:
                continue
            if delta.channel != channel:
                if channel is not None:
                    out.write((RESET if color else "") + "\n")
                if delta.channel == "analysis":
                    out.write(DIM if color else "[reasoning] ")
                channel = delta.channel
            out.write(delta.text)
            out.flush()
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
