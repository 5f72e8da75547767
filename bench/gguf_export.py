"""A moemesh Qwen3-MoE checkpoint with Q4 experts (`moemesh convert --experts q4`, `synth
--experts q4`) as a GGUF llama.cpp reads, its dense matrices in Q8_0, losslessly: the same-run
baseline on the very same weights, for a model whose bf16 source (61 GB for the full 30B-A3B)
does not fit the disk llama.cpp's own converter would need. Run by hand, not a test (needs the
`gguf` package).

    python bench/gguf_export.py -m QWEN3-Q4 --template SMALL.gguf -o OUT.gguf

Our Q4 is llama.cpp's Q4_0 values (code - 8 times an fp16 scale per 32), only the nibble order
differs (ours: element 2j in the low nibble of byte j, as MXFP4; Q4_0: element j low, j + 16
high); our Q8 is Q8_0's (int8 values, an fp16 scale per 32): stored Q8 matrices are repacked,
bf16 ones quantized as our engine's `--dense q8` copy quantizes them. The fused gate/up experts
(gate rows even, up rows odd) become ffn_gate_exps and ffn_up_exps; the embedding stays bf16,
norms and the router become F32 (as the converter writes them). Metadata (architecture keys,
tokenizer) come from `--template`, a GGUF of the same family made by llama.cpp's converter
(bench/llamacpp_baseline.py convert) from a smaller cut of the same synthetic model, with the
block count replaced. Tensors are written one after the other: memory holds one at a time.
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Callable

import numpy as np

from coordinator.models.layers import Q8Matrix, dense_matrix
from expert_node.checkpoint import Checkpoint, bf16_to_f32


def q4_0_blocks(codes: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """Our Q4 blocks [..., G, 16] (element 2j low nibble of byte j) and fp16 scale bits [..., G] ->
    Q4_0 blocks [..., G, 18]: the fp16 scale, then byte j = element j | element j + 16 << 4."""
    elements = np.empty(codes.shape[:-1] + (32,), np.uint8)
    elements[..., 0::2], elements[..., 1::2] = codes & 0x0F, codes >> 4
    out = np.empty(codes.shape[:-1] + (18,), np.uint8)
    out[..., :2] = scales.astype("<u2")[..., None].view(np.uint8)
    out[..., 2:] = elements[..., :16] | (elements[..., 16:] << 4)
    return out


def q8_0_blocks(values: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """Q8 values [N, K] int8 and fp16 scale bits [N, K/32] -> Q8_0 blocks [N, K/32, 34]."""
    n, k = values.shape
    out = np.empty((n, k // 32, 34), np.uint8)
    out[..., :2] = scales.astype("<u2")[..., None].view(np.uint8)
    out[..., 2:] = values.reshape(n, k // 32, 32).view(np.uint8)
    return out


def dense_q8(ckpt: Checkpoint, name: str) -> tuple[np.ndarray, np.ndarray]:
    """A dense matrix's Q8 values and fp16 scale bits: as `convert --dense q8` stored them, or
    quantized from bf16 by the native quantizer, the values of the 8-bit copy `--dense q8` makes
    at load (so llama.cpp and moemesh --dense q8 read the same numbers)."""
    from expert_node import native

    w = dense_matrix(ckpt, name, tuple(ckpt.info(name)[0]))
    if isinstance(w, Q8Matrix):
        return w.values, w.scales
    values = np.empty((w.shape[0], w.shape[1] // 32, 32), np.int8)
    scales = np.empty((w.shape[0], w.shape[1] // 32), np.uint16)
    native.quantize("q8", w, values, scales)
    return values.reshape(w.shape), scales


def tensor_plan(ckpt: Checkpoint) -> list[tuple[str, Callable[[], np.ndarray], object, tuple, np.dtype]]:
    """(GGUF name, its data, raw dtype or None for F32, the data's shape and dtype) in llama.cpp's
    order for qwen3moe."""
    from gguf import GGMLQuantizationType as T

    cfg = ckpt.config
    quant = (cfg.get("quantization_config") or {})
    if quant.get("experts") != "q4":
        raise SystemExit(f"{ckpt.folder}: needs Q4 experts (moemesh convert --experts q4, synth --experts q4), "
                         f"found {quant}")
    u8, shape = np.dtype(np.uint8), lambda name: tuple(ckpt.info(name)[0])  # noqa: E731

    def f32(name: str):
        return lambda: bf16_to_f32(ckpt.tensor(name)).astype(np.float32), None, shape(name), np.dtype(np.float32)

    def q8(name: str):
        rows, cols = shape(name)
        return lambda: q8_0_blocks(*dense_q8(ckpt, name)).reshape(rows, -1), T.Q8_0, (rows, cols // 32 * 34), u8

    def experts(prefix: str, which: str):
        def make() -> np.ndarray:
            blocks = ckpt.tensor(f"{prefix}{'down' if which == 'down' else 'gate_up'}_proj_blocks")
            scales = ckpt.tensor(f"{prefix}{'down' if which == 'down' else 'gate_up'}_proj_scales").view(np.uint16)
            if which != "down":  # gate rows even, up rows odd
                pick = slice(0, None, 2) if which == "gate" else slice(1, None, 2)
                blocks, scales = blocks[:, pick], scales[:, pick]
            out = q4_0_blocks(np.asarray(blocks), np.asarray(scales))
            return out.reshape(*out.shape[:2], -1)  # a row's blocks: GGUF reads the last axis as bytes
        E, rows, groups, _ = shape(f"{prefix}{'down' if which == 'down' else 'gate_up'}_proj_blocks")
        return make, T.Q4_0, (E, rows if which == "down" else rows // 2, groups * 18), u8

    embed = "model.embed_tokens.weight"
    plan = [("token_embd.weight", (lambda: np.asarray(ckpt.tensor(embed)), T.BF16, shape(embed), np.dtype("<u2"))),
            ("output_norm.weight", f32("model.norm.weight")),
            ("output.weight", q8("lm_head.weight"))]
    for i in range(int(cfg["num_hidden_layers"])):
        p, b = f"model.layers.{i}.", f"blk.{i}."
        plan += [(b + "attn_norm.weight", f32(p + "input_layernorm.weight")),
                 (b + "attn_q.weight", q8(p + "self_attn.q_proj.weight")),
                 (b + "attn_k.weight", q8(p + "self_attn.k_proj.weight")),
                 (b + "attn_v.weight", q8(p + "self_attn.v_proj.weight")),
                 (b + "attn_output.weight", q8(p + "self_attn.o_proj.weight")),
                 (b + "attn_q_norm.weight", f32(p + "self_attn.q_norm.weight")),
                 (b + "attn_k_norm.weight", f32(p + "self_attn.k_norm.weight")),
                 (b + "ffn_norm.weight", f32(p + "post_attention_layernorm.weight")),
                 (b + "ffn_gate_inp.weight", f32(p + "mlp.gate.weight"))]
        plan += [(b + f"ffn_{which}_exps.weight", experts(p + "mlp.experts.", which)) for which in ("gate", "up", "down")]
    return [(name, *rest) for name, rest in plan]


def export(folder: Path, template: Path, out: Path) -> None:
    import gguf

    ckpt = Checkpoint(folder)
    reader = gguf.GGUFReader(template)
    arch = reader.fields["general.architecture"].contents()
    writer = gguf.GGUFWriter(out, arch)
    for name, field in reader.fields.items():
        if name.startswith("GGUF.") or name == "general.architecture":
            continue
        value = int(ckpt.config["num_hidden_layers"]) if name == f"{arch}.block_count" else field.contents()
        sub = field.types[-1] if field.types[0] == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(name, value, field.types[0], sub)
    plan = tensor_plan(ckpt)
    for name, _, raw, shape, dtype in plan:  # the header precedes the data
        writer.add_tensor_info(name, shape, dtype, int(np.prod(shape)) * dtype.itemsize, raw_dtype=raw)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for name, make, _, shape, dtype in plan:
        a = np.ascontiguousarray(make())
        assert (a.shape, a.dtype) == (shape, dtype), (name, a.shape, shape)
        writer.write_tensor_data(a)
    writer.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-m", "--model", required=True, type=Path)
    ap.add_argument("--template", required=True, type=Path)
    ap.add_argument("-o", "--out", required=True, type=Path)
    args = ap.parse_args()
    export(args.model, args.template, args.out)
    print(args.out)


if __name__ == "__main__":
    main()
