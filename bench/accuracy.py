"""Accuracy, run by hand, not a test. Last line: JSON.

    python bench/accuracy.py -m /path/gpt-oss-20b [--prompts 3] [--tokens 48]

For `fast` and `fast --dense q8` (issues 3 and 4): mean KL divergence of the next-token
distributions against `exact` over every position of a few random prompts, and top-1 agreement.

    python bench/accuracy.py --formats [--prompts 4] [--tokens 32]

What quantized experts cost a bf16-trained model (issue 21), on the tiny Qwen3-MoE models (written
here by synth): `moemesh convert`'s MXFP4, Q4 and Q8 (the real converted checkpoints through the
native kernels), and llama.cpp's own quantizers (the `gguf` package's numpy MXFP4, Q4_0 and Q8_0)
applied to the same experts, dequantized and stored back as bf16 (exact for MXFP4; Q4_0's and
Q8_0's values pick up a bf16 rounding, ~0.2% of a weight: far below Q4_0's own ~9% error, about
Q8_0's own). Per format: rms error per weight relative to the weights' rms, mean KL against the
bf16 source, top-1 agreement.
"""
from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import numpy as np

from coordinator import Engine


def log_softmax(a: np.ndarray) -> np.ndarray:
    a = a.astype(np.float64)
    m = a.max(axis=1, keepdims=True)
    return a - m - np.log(np.exp(a - m).sum(axis=1, keepdims=True))


def with_experts(src: Path, dst: Path, transform) -> Path:
    """A copy of the checkpoint src whose bf16 experts are transform(float32 weights), stored as bf16."""
    from coordinator.convert import Planned
    from coordinator.shards import DEFAULT_SHARD_BYTES, write_shards
    from expert_node.checkpoint import Checkpoint, bf16_to_f32, f32_to_bf16

    ckpt = Checkpoint(src)

    def chunks(name: str):
        a = ckpt.tensor(name)
        if ".mlp.experts." in name:
            a = f32_to_bf16(transform(bf16_to_f32(a)).astype(np.float32))
        return [np.ascontiguousarray(a).tobytes()]
    tensors = [Planned(n, *ckpt.info(n), lambda n=n: chunks(n)) for n in ckpt.tensor_names]
    dst.mkdir(parents=True)

    class NoBar:
        def update(self, n):
            pass
    write_shards(dst, tensors, lambda t: t.chunks(), DEFAULT_SHARD_BYTES, ckpt.config["model_type"], NoBar())
    for f in src.iterdir():
        if f.is_file() and not f.name.endswith(".safetensors") and not f.name.endswith(".index.json"):
            shutil.copyfile(f, dst / f.name)
    return dst


def formats_report(prompts: int, tokens: int) -> dict:
    import tempfile

    import gguf
    from gguf import quants

    from coordinator import synth
    from coordinator.convert import accuracy, convert
    from expert_node.checkpoint import Checkpoint, bf16_to_f32
    from expert_node.formats import QUANT_FORMATS

    ggml = lambda kind: (lambda w: quants.dequantize(quants.quantize(w, kind), kind))  # noqa: E731
    ours = {f"moemesh {f.name}": (lambda w, f=f: f.dequant(*f.quantize(w))) for f in QUANT_FORMATS.values()}
    schemes = {**ours,
               "llama.cpp MXFP4": ggml(gguf.GGMLQuantizationType.MXFP4),
               "llama.cpp Q4_0": ggml(gguf.GGMLQuantizationType.Q4_0),
               "llama.cpp Q8_0": ggml(gguf.GGMLQuantizationType.Q8_0)}
    result = {}
    with tempfile.TemporaryDirectory() as tmp:
        for preset, seed in (("qwen3-tiny", 3), ("qwen3-tiny-wide", 4)):
            src = synth.write_checkpoint(Path(tmp) / preset, synth.make_config(preset), seed=seed, progress=False)
            experts = [bf16_to_f32(Checkpoint(src).tensor(n)) for n in Checkpoint(src).tensor_names
                       if ".mlp.experts." in n]
            for name, fn in schemes.items():
                err = np.sqrt(np.mean([np.mean((fn(w) - w) ** 2) for w in experts]) /
                              np.mean([np.mean(w ** 2) for w in experts]))
                if name in ours:  # the real thing: convert's checkpoint on the native kernels
                    fmt = name.split()[-1]
                    dst = convert(src, Path(tmp) / f"{preset}-convert-{fmt}", fmt, progress=False)
                else:
                    dst = with_experts(src, Path(tmp) / f"{preset}-{name.split()[-1]}", fn)
                cost = accuracy(src, dst, prompts=prompts, tokens=tokens)
                result[f"{preset} {name}"] = {"weight_rel_rms_error": float(err), **cost}
                print(f"{preset:<16} {name:<16} weight rms error {err:6.2%}  mean KL {cost['mean_kl']:.3e} nats  "
                      f"top-1 agreement {cost['top1_agreement']:.1%}")
    return result


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("-m", "--model")
    ap.add_argument("--formats", action="store_true",
                    help="expert formats (ours and llama.cpp's) on the tiny Qwen3-MoE models")
    ap.add_argument("--prompts", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=48)
    args = ap.parse_args()
    if args.formats:
        print(json.dumps(formats_report(args.prompts, args.tokens)))
        return
    if not args.model:
        ap.error("-m/--model is required (or --formats)")
    prompts = [np.random.default_rng(s).integers(0, 150_000, args.tokens) for s in range(args.prompts)]
    exact = [log_softmax(l) for l in map(Engine.load(args.model, "exact").logits, prompts)]
    result = {}
    for name, dense in (("fast", "bf16"), ("fast+q8", "q8")):
        engine = Engine.load(args.model, "fast", dense=dense)
        kls, agree = [], []
        for p, la in zip(prompts, exact):
            lb = log_softmax(engine.logits(p))
            kls += list((np.exp(la) * (la - lb)).sum(axis=1))
            agree += list(la.argmax(axis=1) == lb.argmax(axis=1))
        result[name] = {"mean_kl": float(np.mean(kls)), "top1_agreement": float(np.mean(agree))}
        print(f"{name:<8} mean KL {np.mean(kls):.3e} nats, top-1 agreement {np.mean(agree):.1%} "
              f"({len(kls)} positions)")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
