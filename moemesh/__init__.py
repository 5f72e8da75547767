"""moemesh's public Python API, shaped like mlx-lm's: load a model (a folder or a Hugging Face
repository id in the local cache, optionally with its experts on a cluster), then generate or
stream. The engine, the cluster and the server live in `coordinator` and `expert_node`; this is
only their small public face.

    import moemesh
    model = moemesh.load("openai/gpt-oss-20b")
    print(moemesh.generate(model, [{"role": "user", "content": "Hi"}], max_tokens=256))
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

from coordinator.drafting import DraftParams
from coordinator.engine import Engine
from coordinator.hub import resolve
from coordinator.sampling import SamplingParams
from coordinator.tokenizer import Tokenizer

__all__ = ["Model", "GenerationResponse", "load", "generate", "stream_generate"]


@dataclass
class Model:
    """An engine with its tokenizer."""
    engine: Engine
    tokenizer: Tokenizer

    def apply_chat_template(self, messages, reasoning_effort: str = "medium", tools=None) -> list[int]:
        """OpenAI-style messages (dicts with role and content; system messages become the
        developer instructions) -> the prompt's token ids in the model's chat format (harmony,
        ChatML), ending where the assistant answers."""
        from coordinator.openai_format import parse_messages, parse_tools

        history, instructions = parse_messages(list(messages))
        return self.chat_format.render_prompt(history, reasoning_effort, instructions,
                                              tools=parse_tools({"tools": tools}) if tools else ())

    @property
    def chat_format(self):
        return self.engine.chat_format(self.tokenizer)


@dataclass(frozen=True)
class GenerationResponse:
    """One streamed piece, as mlx-lm's stream_generate yields: the text it adds (the answer's
    final channel for chat messages), its token, and the running figures."""
    text: str
    token: int
    finish_reason: str | None
    prompt_tokens: int
    prompt_tps: float
    generation_tokens: int
    generation_tps: float
    channel: str = "final"  # chat: "analysis" for the model's reasoning


def load(path_or_repo: str, cluster: list[str] | None = None, precision: str = "fast", insecure: bool = False) -> Model:
    """A model ready to generate. cluster: expert nodes' HOST:PORT addresses (paired devices; or
    insecure=True for a lab), which then compute the experts."""
    folder = resolve(path_or_repo)
    experts = None
    if cluster:
        from coordinator import cluster as mesh
        from expert_node.checkpoint import Checkpoint

        experts, _ = mesh.connect(Checkpoint(folder), precision, list(cluster), creds=mesh.credentials(insecure),
                                  progress=False)
    engine = Engine.load(folder, precision=precision, experts=experts)
    return Model(engine, Tokenizer.from_dir(folder))


def stream_generate(model: Model, prompt, max_tokens: int = 256, temperature: float = 1.0, top_p: float = 1.0,
                    top_k: int = 0, min_p: float = 0.0, seed: int | None = None, draft: int = 0,
                    reasoning_effort: str = "medium") -> Iterator[GenerationResponse]:
    """prompt: text (completed as is), token ids, or chat messages (rendered with the chat
    template; the reasoning comes with channel "analysis")."""
    chat = isinstance(prompt, list) and prompt and isinstance(prompt[0], dict)
    if chat:
        ids = model.apply_chat_template(prompt, reasoning_effort)
    elif isinstance(prompt, str):
        ids = model.tokenizer.encode(prompt)
    else:
        ids = [int(t) for t in prompt]
    gen = model.engine.stream(ids, max_tokens, SamplingParams(temperature, top_p, top_k, min_p, seed),
                              model.chat_format.stop_ids if chat else (), tokenizer=None if chat else model.tokenizer,
                              draft=DraftParams(draft))
    parser = model.chat_format.parser() if chat else None
    for step in gen:
        s = gen.stats
        pieces = [(d.text, d.channel) for d in parser.feed(step.token)] if chat else [(step.text, "final")]
        if step.finish_reason and chat:
            pieces += [(d.text, d.channel) for d in parser.finish()]
        for text, channel in pieces or [("", "final")]:
            yield GenerationResponse(text, step.token, step.finish_reason, s.prompt_tokens, s.prefill_tps,
                                     s.generated_tokens, s.decode_tps, channel)


def generate(model: Model, prompt, max_tokens: int = 256, **kwargs) -> str:
    """The whole answer: the final channel's text for chat messages, the completion for a prompt."""
    return "".join(r.text for r in stream_generate(model, prompt, max_tokens, **kwargs) if r.channel != "analysis")
