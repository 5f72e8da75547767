"""The single-device engine: a model family over a checkpoint, with its experts in-process.

`Engine.load(dir)` maps the checkpoint and picks the compute for the dense part and the experts by
precision: `reference` (pure numpy, the spec), `exact` (native kernels, fp32 activations) or `fast`
(native kernels, int16-block activations for the experts). `logits()` runs one full forward pass;
`generate()` yields token ids as they are sampled. The cluster engine swaps only the expert backend.
"""
from __future__ import annotations

import math
from typing import Iterable, Iterator

import numpy as np

from expert_node.checkpoint import Checkpoint, CheckpointError
from expert_node.experts import ExpertBackend, NativeExpertBackend, ReferenceExpertBackend
from expert_node.formats import Q8
from expert_node.heap import keep_large_buffers

from .drafting import DraftParams
from .generation import ContextLimitError, ConversationCache, Generation, NonFiniteError
from .models import family_of, layer_experts
from .models.layers import LayerOps, Q8Matrix, attention_with_sinks, matrix_arrays, reference_linear
from .sampling import SamplingParams

PRECISIONS = ("reference", "exact", "fast")
DENSE_FORMATS = ("bf16", "q8")  # q8: an 8-bit copy of the dense matrices, with the fast precision


def native_linear(x: np.ndarray, w, b: np.ndarray | None) -> np.ndarray:
    """x @ w^T (+ b) with fp32 activations: w bf16, or a Q8Matrix stored by `convert --dense q8`."""
    from expert_node import native

    out = np.empty((x.shape[0], w.shape[0]), np.float32)
    if isinstance(w, Q8Matrix):
        native.q8_matmul(np.ascontiguousarray(x, np.float32), w.values, w.scales, "natural", out, precision="exact")
    else:
        native.bf16_matmul(np.ascontiguousarray(x, np.float32), w, None, out)
    return out if b is None else out + b


def native_softmax(scores: np.ndarray, sinks: np.ndarray, q_pos: np.ndarray, k_pos: np.ndarray,
                   window: int | None, d: int) -> np.ndarray:
    """softmax_with_sinks in place on the kernel threads (numpy's passes over the scores were most
    of attention's time on long prompts)."""
    from expert_node import native

    scores = np.ascontiguousarray(scores, np.float32)
    native.attention_softmax(scores, np.ascontiguousarray(sinks, np.float32), np.ascontiguousarray(q_pos, np.int64),
                             np.ascontiguousarray(k_pos, np.int64), window or 0, float(np.float32(math.sqrt(d))))
    return scores


def native_attend(q: np.ndarray, k: np.ndarray, v: np.ndarray, sinks: np.ndarray, q_pos: np.ndarray,
                  k_pos: np.ndarray, window: int | None) -> np.ndarray:
    """attention_with_sinks in one native call, each key read once per query and kv head group
    (numpy's batched matmuls ran single-threaded: 1.6 ms a decoded token's layer at 2048 keys).
    Head dimensions the kernel lacks go through numpy's matmuls and the native softmax."""
    from expert_node import native

    T, nq, d = q.shape
    if d % 16 or d > 256:  # the native kernel's head dimensions: multiples of 16 up to 256
        return attention_with_sinks(q, k, v, sinks, q_pos, k_pos, window, native_softmax)
    out = np.empty((T, nq * d), np.float32)
    native.attend(np.ascontiguousarray(q, np.float32), np.ascontiguousarray(k, np.float32),
                  np.ascontiguousarray(v, np.float32), np.ascontiguousarray(sinks, np.float32),
                  np.ascontiguousarray(q_pos, np.int64), np.ascontiguousarray(k_pos, np.int64), window or 0,
                  float(np.float32(math.sqrt(d))), out.reshape(T, nq, d))
    return out


def native_rmsnorm(x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
    """rmsnorm in one native call (numpy's seven passes cost more than the norm's arithmetic on a
    decoded token: 72 calls a token)."""
    from expert_node import native

    x = np.ascontiguousarray(x, np.float32)
    out = np.empty_like(x)
    native.rmsnorm(x, np.ascontiguousarray(w, np.float32), float(eps), out)
    return out


def native_rotate(x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    """rotate_half_split in place on x (a fresh projection), the same float ops."""
    from expert_node import native

    x = np.ascontiguousarray(x, np.float32)
    native.rope_rotate(x, np.ascontiguousarray(cos.reshape(cos.shape[0], -1), np.float32),
                       np.ascontiguousarray(sin.reshape(sin.shape[0], -1), np.float32))
    return x


def native_topk(logits: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """router_topk in one native call (its exp is libm's: weights within an ulp of numpy's)."""
    from expert_node import native

    return native.router_topk(np.ascontiguousarray(logits, np.float32), k)


def native_add_experts(x: np.ndarray, outputs: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """add_experts in one native call: the same float operations, the same bits."""
    from expert_node import native

    out = np.empty(x.shape, np.float32)
    native.add_experts(np.ascontiguousarray(x, np.float32), np.ascontiguousarray(outputs, np.float32),
                       np.ascontiguousarray(weights, np.float32), out)
    return out


NATIVE_OPS = LayerOps(native_attend, native_rmsnorm, native_rotate, native_topk, native_add_experts)


class Q8DenseLinear:
    """The native linear over 8-bit copies (Q8: int8 per 32, fp16 scales) of the dense matrices,
    made once at load: quantized from bf16 (`--dense q8`), or the matrices `convert --dense q8`
    stored, their values put in the kernels' order. They halve the bytes a decoded token reads
    outside the experts; the cost in accuracy is measured against exact in tests/test_kernels.py.
    Other matrices (the router) stay bf16. With the fast precision only (int16 activations)."""

    def __init__(self, matrices: list):
        from expert_node import native

        self._native = native
        self.copies = {id(w): self._copy(w) for w in matrices}
        self._sources = matrices  # keeps the ids above valid
        self.replaced = {id(a) for w in matrices for a in matrix_arrays(w)}

    def _copy(self, w) -> tuple[np.ndarray, np.ndarray, str]:
        if not isinstance(w, Q8Matrix):
            return self._native.q8_quantize(w)
        values = np.array(w.values)
        layout = self._native.weight_layout("q8", values.reshape(values.shape[0], -1, Q8.block_size))
        return values, np.ascontiguousarray(w.scales), layout

    def __call__(self, x: np.ndarray, w: np.ndarray, b: np.ndarray | None) -> np.ndarray:
        copy = self.copies.get(id(w))
        if copy is None:
            return native_linear(x, w, b)
        values, scales, layout = copy
        out = np.empty((x.shape[0], values.shape[0]), np.float32)
        self._native.q8_matmul(np.ascontiguousarray(x, np.float32), values, scales, layout, out)
        return out if b is None else out + b


def limit_blas_threads() -> None:
    """One BLAS thread for numpy in this process: the native pool has the cores. numpy's BLAS
    workers spin after each call (attention over a long context crosses their threading
    threshold) and slowed the kernels that ran next by a third."""
    from threadpoolctl import threadpool_limits

    threadpool_limits(1, user_api="blas")


def make_expert_backend(ckpt: Checkpoint, precision: str) -> ExpertBackend:
    family = family_of(ckpt)
    shape = family.expert_shape(ckpt.config)
    layers = layer_experts(ckpt, range(int(ckpt.config["num_hidden_layers"])))
    if precision == "reference":
        return ReferenceExpertBackend(layers, shape)
    return NativeExpertBackend(layers, shape, precision)


class Engine:
    def __init__(self, ckpt: Checkpoint, model, precision: str):
        self.checkpoint, self.model, self.precision = ckpt, model, precision
        self.config = model.cfg
        self._context_cap: int | None = None

    @classmethod
    def load(cls, folder, precision: str = "exact", experts: ExpertBackend | None = None,
             dense: str = "bf16", mmap: bool = True, progress: bool | None = None) -> "Engine":
        """mmap=False reads the weights into huge-page memory instead of mapping them, with a
        progress bar (expert_node.checkpoint.SafetensorsFile says why that can be faster)."""
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
        if dense not in DENSE_FORMATS:
            raise ValueError(f"dense must be one of {', '.join(DENSE_FORMATS)}, got {dense!r}")
        if dense == "q8" and precision != "fast":
            raise ValueError("the 8-bit dense copy (dense q8) runs with the fast precision only")
        if precision != "reference":
            limit_blas_threads()
            keep_large_buffers()
        from tqdm import tqdm

        with tqdm(unit="B", unit_scale=True, desc="reading", leave=False,
                  disable=mmap or (None if progress is None else not progress)) as bar:
            return cls._load(Checkpoint(folder, in_memory=not mmap, on_read=bar.update), precision, experts, dense)

    @classmethod
    def _load(cls, ckpt: Checkpoint, precision: str, experts: ExpertBackend | None, dense: str) -> "Engine":
        family = family_of(ckpt)
        if experts is None:
            experts = make_expert_backend(ckpt, precision)
        linear = reference_linear if precision == "reference" else native_linear
        if precision != "reference":
            ckpt.advise_hugepages()
        model = family.build_model(ckpt, linear, experts, LayerOps() if precision == "reference" else NATIVE_OPS)
        matrices = model.matmul_weights()
        stored_q8 = any(isinstance(w, Q8Matrix) for w in matrices)  # `convert --dense q8` wrote them
        if dense == "q8" or (stored_q8 and precision == "fast"):
            model.linear = Q8DenseLinear(matrices)
            for a in (a for w in matrices if w is not model.embed for a in matrix_arrays(w)):
                ckpt.release(a)  # read once for the copy; never again (a tied unembedding is the embedding table)
        return cls(ckpt, model, precision)

    def chat_format(self, tokenizer):
        """The model family's chat format over `tokenizer` (render a history, parse a reply)."""
        return family_of(self.checkpoint).chat_format(tokenizer)

    def expert_arrays(self) -> list[np.ndarray]:
        """The experts' weights when they are in-process (none for a cluster)."""
        return [a for layer in getattr(self.model.experts, "layers", {}).values() for a in layer.arrays()]

    def weight_arrays(self) -> list[np.ndarray]:
        """What this device reads to compute: dense weights (8-bit copies where made) and, when
        the experts are in-process, theirs."""
        q8 = self.model.linear if isinstance(self.model.linear, Q8DenseLinear) else None
        arrays = [a for a in self.model.weight_arrays() if q8 is None or id(a) not in q8.replaced]
        arrays += [a for values, scales, _ in (q8.copies.values() if q8 else ()) for a in (values, scales)]
        return arrays + self.expert_arrays()

    def set_tracer(self, tracer) -> None:
        """Trace the model's stages and, for a cluster, every hop (see coordinator.tracing)."""
        self.model.tracer = tracer
        if hasattr(self.model.experts, "tracer"):
            self.model.experts.tracer = tracer

    def warm(self, progress: bool | None = None) -> None:
        """Read the weights this device computes with into memory, with a progress bar: the
        mapping is lazy, so without this the first answer would pay for the disk reads."""
        from tqdm import tqdm

        from expert_node import native

        arrays = self.weight_arrays()
        step = 64 << 20
        with tqdm(total=sum(a.nbytes for a in arrays), unit="B", unit_scale=True, desc="loading",
                  disable=None if progress is None else not progress, leave=False) as bar:
            for a in arrays:
                flat = a.reshape(-1).view(np.uint8)
                for i in range(0, flat.size, step):
                    native.stream_read(flat[i:i + step])
                    bar.update(min(step, flat.size - i))

    @property
    def context_length(self) -> int:
        """Tokens a sequence may hold: the model's context, or less (limit_context)."""
        return min(self.config.max_position_embeddings, self._context_cap or self.config.max_position_embeddings)

    def limit_context(self, n: int) -> None:
        """Cap every sequence at n tokens (-c/--ctx-size): the KV cache never grows past it."""
        if n < 2:
            raise ValueError(f"the context must hold at least 2 tokens, got {n}")
        self._context_cap = n

    def logits(self, ids: Iterable[int]) -> np.ndarray:
        """float32 [T, vocab] logits of one forward pass over `ids` from an empty context."""
        ids = np.asarray(list(ids), np.int64)
        if ids.size > self.context_length:
            raise ContextLimitError(f"{ids.size} tokens exceed the model's context of {self.context_length}")
        return self.forward(ids, self.model.new_cache(), all_logits=True)

    def forward(self, ids: np.ndarray, cache, all_logits: bool) -> np.ndarray:
        """The model's forward pass, with logits checked finite: NaN or Inf from the weights (a
        corrupt checkpoint) is reported by file and tensor, not by the activation it reached."""
        return self.forward_batch([(ids, cache, all_logits)])[0]

    def forward_batch(self, batch: list[tuple[np.ndarray, object, bool]]) -> list[np.ndarray]:
        """forward() for several sequences in one pass (coordinator.batching): (ids, cache,
        all_logits) each; every sequence's logits are what forward() would give it alone."""
        from expert_node import native

        try:
            logits = self.model.forward_batch(batch)
            if all(np.isfinite(native.max_abs(np.ascontiguousarray(a, np.float32))) for a in logits):
                return logits
        except NonFiniteError:
            pass
        except ValueError as e:  # the native kernels refuse NaN inputs with this wording
            if "NaN or Inf" not in str(e):
                raise
        where = family_of(self.checkpoint).nonfinite_weights(self.checkpoint)
        raise CheckpointError(f"{where} contains NaN or Inf" if where else
                              "the forward pass produced NaN or Inf from finite weights (the expert weights' "
                              "scales may be corrupt)")

    def stream(self, ids: Iterable[int], max_new_tokens: int = 128, params: SamplingParams | None = None,
               stop_ids: Iterable[int] = (), tokenizer=None, conversation: ConversationCache | None = None,
               draft: DraftParams | None = None, drafter=None) -> Generation:
        """The streaming generator: iterate it for Steps; its .stats holds the timings. A
        conversation keeps the KV cache between turns, so a prompt extending the last one
        prefills only its new tokens. draft: speculative decoding with prompt-lookup drafts
        (coordinator.drafting), lossless."""
        return Generation(self, [int(i) for i in ids], params or SamplingParams(), max_new_tokens, stop_ids,
                          tokenizer, conversation, draft or DraftParams(), drafter)

    def generate(self, ids: Iterable[int], max_new_tokens: int = 128, temperature: float = 1.0,
                 top_p: float = 1.0, top_k: int = 0, min_p: float = 0.0, seed: int | None = None,
                 stop_ids: Iterable[int] = (), draft: int = 0,
                 draft_ngram: tuple[int, int] = (DraftParams.ngram_min, DraftParams.ngram_max)) -> Iterator[int]:
        """Yield up to max_new_tokens sampled ids; a stop id is yielded, then generation ends.
        draft: most draft tokens verified per round (0 = no speculation); draft_ngram: the n-gram
        sizes a draft's lookup matches (coordinator.drafting)."""
        params = SamplingParams(temperature, top_p, top_k, min_p, seed)
        for step in self.stream(ids, max_new_tokens, params, stop_ids, draft=DraftParams(draft, *draft_ngram)):
            yield step.token
