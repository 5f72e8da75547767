"""Qwen3-MoE against Hugging Face transformers' Qwen3MoeForCausalLM (CPU, float32 from the same
bf16 weights) on two tiny synthetic configs: one as the hub writes Qwen3-30B-A3B's config
(renormalised top-k, plain RoPE), one as transformers 5 writes keys, with the other branches
(top-k weights from the full softmax, YaRN, tied embeddings, attention biases). Single device at
every precision, and a cluster of two real node processes hosting bf16 experts.

Tolerances as for gpt-oss (tests/test_parity_hf.py): logits max-abs <= 1e-3 (fast: 2e-2, its
activations carry 15 bits per 32-block), router top-k identical at every layer, 16 greedy tokens
identical.
"""
import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="parity needs torch==2.13.0 (installed by .ci/run)")
transformers = pytest.importorskip("transformers")

from coordinator import Engine, cluster  # noqa: E402
from expert_node.checkpoint import Checkpoint  # noqa: E402

pytestmark = pytest.mark.parity
SEQ_LEN = 72
GREEDY_TOKENS = 16
LOGITS_ATOL = {"reference": 1e-3, "exact": 1e-3, "fast": 2e-2}


def load_hf(folder):
    return transformers.Qwen3MoeForCausalLM.from_pretrained(folder, dtype=torch.float32,
                                                            attn_implementation="eager").eval()


@pytest.fixture(scope="module", params=["qwen3_dir", "qwen3_wide_dir"])
def case(request):
    folder = request.getfixturevalue(request.param)
    return folder, load_hf(folder)


def prompt(seed=0):
    return np.random.default_rng(seed).integers(0, 151_643, SEQ_LEN)


def hf_greedy(hf, ids, n):
    seq = list(ids)
    with torch.no_grad():
        for _ in range(n):  # full recompute each step: no HF cache involved
            seq.append(int(hf(torch.tensor(seq)[None]).logits[0, -1].argmax()))
    return seq[len(ids):]


@pytest.mark.parametrize("precision", ["reference", "exact", "fast"])
def test_logits_and_router_match(case, precision):
    folder, hf = case
    engine = Engine.load(folder, precision=precision)
    assert engine.model.cfg.rope_original_max_positions < SEQ_LEN or engine.model.cfg.rope_factor == 1.0
    ids = prompt()
    with torch.no_grad():
        out = hf(torch.tensor(ids)[None], output_router_logits=True)
    router_log = []
    ours = engine.model.forward(ids, engine.model.new_cache(), all_logits=True, router_log=router_log)
    assert np.abs(ours - out.logits[0].numpy()).max() <= LOGITS_ATOL[precision]
    k = engine.config.num_experts_per_tok
    assert len(router_log) == len(out.router_logits) == engine.config.num_hidden_layers
    if precision != "fast":  # fast rounds the router's input less finely: a near tie may flip
        for (layer, ours_topk), hf_logits in zip(router_log, out.router_logits):
            hf_topk = torch.topk(hf_logits.reshape(SEQ_LEN, -1), k, dim=-1).indices.numpy()
            np.testing.assert_array_equal(np.sort(ours_topk, 1), np.sort(hf_topk, 1), err_msg=f"layer {layer}")


@pytest.mark.parametrize("precision", ["reference", "exact"])
def test_greedy_tokens_match(case, precision):
    folder, hf = case
    ids = list(prompt(1))
    ours = list(Engine.load(folder, precision=precision).generate(ids, max_new_tokens=GREEDY_TOKENS, temperature=0))
    assert ours == hf_greedy(hf, ids, GREEDY_TOKENS)


@pytest.mark.timeout(240)
def test_cluster_of_bf16_expert_nodes_matches_transformers(qwen3_dir, start_node):
    """Two real node processes host the bf16 experts (format 'bf16', activation 'swiglu' in the
    assignment): the cluster's greedy tokens equal transformers' and its logits the single device's."""
    nodes = [start_node("--no-mdns", "--host", "127.0.0.1") for _ in range(2)]
    experts, reports = cluster.connect(Checkpoint(qwen3_dir), "exact", [n.address for n in nodes], progress=False)
    remote = Engine.load(qwen3_dir, precision="exact", experts=experts)
    try:
        assert sum(r.pieces for r in reports) == 3 * 8 and all(r.bytes_pushed > 0 for r in reports)
        ids = list(prompt(1))
        np.testing.assert_allclose(remote.logits(ids), Engine.load(qwen3_dir, precision="exact").logits(ids),
                                   atol=1e-6, rtol=0)
        ours = list(remote.generate(ids, max_new_tokens=GREEDY_TOKENS, temperature=0))
        assert ours == hf_greedy(load_hf(qwen3_dir), ids, GREEDY_TOKENS)
    finally:
        remote.model.experts.close()
