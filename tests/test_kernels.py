"""upcycle's experts kernel (`experts_implementation="upcycle"`) against transformers' eager loop.

fp32: the kernel computes the same per-expert products as eager, so outputs and every gradient agree to 1e-5 of
their largest entry (float32 reassociation only). bf16 autocast: both run their matmuls in bf16, so neither
matches fp32 closely; the kernel is held to the accuracy of eager under the same autocast, each measured against
the fp32 result: its error may be at most twice eager's plus 2e-3 (a few bf16 ulps; the factor covers the
different but equally rounded order of the weight-gradient sums).
"""

from __future__ import annotations

import pytest
import torch

import upcycle.core.kernels as K
from upcycle.core.kernels import register_experts_kernel

H = 64


@pytest.fixture(autouse=True, scope="module")
def _registered():
    assert register_experts_kernel() is True


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest absolute difference relative to the largest entry of the reference b."""
    return ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-30)).item()


def experts_module(model_type: str, E: int, I: int, seed: int = 0, **extra):
    from transformers import AutoConfig

    keys = {"mixtral": "num_local_experts", "qwen2_moe": "num_experts", "gpt_oss": "num_local_experts"}
    cfg = AutoConfig.for_model(model_type, hidden_size=H, intermediate_size=I, moe_intermediate_size=I,
                               **{keys[model_type]: E}, num_experts_per_tok=2, **extra)
    if model_type == "mixtral":
        from transformers.models.mixtral.modeling_mixtral import MixtralExperts as cls
    elif model_type == "qwen2_moe":
        from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeExperts as cls
    else:
        from transformers.models.gpt_oss.modeling_gpt_oss import GptOssExperts as cls
    m = cls(cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return m, cfg


def routing(T: int, E: int, k: int, *, seed: int = 1, drop: float = 0.0, empty: tuple[int, ...] = ()):
    """Distinct random experts per token; `empty` experts never chosen; a fraction `drop` set to the sentinel E."""
    g = torch.Generator().manual_seed(seed)
    scores = torch.rand(T, E, generator=g)
    scores[:, list(empty)] = -1.0
    idx = scores.topk(k, dim=-1).indices
    w = torch.rand(T, k, generator=g).softmax(-1)
    if drop:
        dropped = torch.rand(T, k, generator=g) < drop
        idx = idx.masked_fill(dropped, E)
        w = w * ~dropped  # what upcycle's capacity factor does
    return idx, w


def run(module, cfg, impl: str, x, idx, w, *, bf16: bool = False):
    """Output and gradients (input, routing weights, every parameter) of one forward + backward."""
    cfg._experts_implementation = impl
    module.zero_grad(set_to_none=True)
    xx, ww = x.clone().requires_grad_(), w.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        out = module(xx, idx, ww)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(7))
    out.float().backward(g)
    grads = {"out": out.detach().float(), "x": xx.grad, "w": ww.grad}
    grads.update({n: p.grad.clone() for n, p in module.named_parameters()})
    return grads


CASES = {
    # name: (model type, experts, top-k, expert width)
    "mixtral-8x2": ("mixtral", 8, 2, 96),
    "qwen2_moe-8x2": ("qwen2_moe", 8, 2, 48),
    "fine-32x8": ("mixtral", 32, 8, 24),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("routing_kind", ["plain", "dropped+empty"])
def test_experts_match_eager_fp32(case, routing_kind):
    model_type, E, k, I = CASES[case]
    m, cfg = experts_module(model_type, E, I)
    T = 96
    x = torch.randn(T, H, generator=torch.Generator().manual_seed(3))
    kw = dict(drop=0.2, empty=(1, E - 1)) if routing_kind != "plain" else {}
    idx, w = routing(T, E, k, **kw)
    assert K.fast_path_applies(m)
    ref, got = run(m, cfg, "eager", x, idx, w), run(m, cfg, "upcycle", x, idx, w)
    for name in ref:
        assert rel(got[name], ref[name]) <= 1e-5, name
    if routing_kind != "plain":
        assert (got["w"][idx == E] == 0).all()  # a dropped assignment gets no routing gradient
        assert (got["gate_up_proj"][1] == 0).all() and (got["down_proj"][E - 1] == 0).all()  # empty experts


@pytest.mark.parametrize("case", list(CASES))
def test_experts_bf16_autocast_as_accurate_as_eager(case):
    model_type, E, k, I = CASES[case]
    m, cfg = experts_module(model_type, E, I)
    T = 96
    x = torch.randn(T, H, generator=torch.Generator().manual_seed(3))
    idx, w = routing(T, E, k, drop=0.15, empty=(2,))
    exact = run(m, cfg, "eager", x, idx, w)
    eager = run(m, cfg, "eager", x, idx, w, bf16=True)
    got = run(m, cfg, "upcycle", x, idx, w, bf16=True)
    assert got["out"].dtype == torch.float32  # fp32 hidden states in, fp32 out (as eager under autocast)
    for name in exact:
        assert rel(got[name], exact[name]) <= 2 * rel(eager[name], exact[name]) + 2e-3, name
    assert (got["w"][idx == E] == 0).all()


def test_chunked_and_all_dropped(monkeypatch):
    """One chunk per expert gives the same result; all assignments dropped gives zeros."""
    m, cfg = experts_module("mixtral", 8, 96)
    T = 64
    x = torch.randn(T, H, generator=torch.Generator().manual_seed(3))
    idx, w = routing(T, 8, 2, drop=0.1, empty=(3,))
    ref = run(m, cfg, "eager", x, idx, w)
    monkeypatch.setattr(K, "CHUNK_BYTES", 3 * 2 * 96 * 4)  # three rows: every expert its own chunk
    assert len(K._chunks(K._plan(idx, 8)[2], 3)) == 7  # expert 3 (empty) shares a chunk
    got = run(m, cfg, "upcycle", x, idx, w)
    for name in ref:
        assert rel(got[name], ref[name]) <= 1e-5, name
    none = run(m, cfg, "upcycle", x, torch.full_like(idx, 8), w * 0)
    assert all((v == 0).all() for v in none.values())


def test_recycled_grad_buffers_are_never_shared():
    """Weight gradients come from a pool; one still referenced anywhere is not handed out again."""
    m, cfg = experts_module("mixtral", 8, 2048)  # gate_up gradient 4 MiB: pooled
    cfg._experts_implementation = "upcycle"
    x = torch.randn(32, H, generator=torch.Generator().manual_seed(3))
    idx, w = routing(32, 8, 2)
    m(x, idx, w).sum().backward()
    kept = m.gate_up_proj.grad
    snapshot = kept.clone()
    m.zero_grad(set_to_none=True)
    m(x, idx, w * 2).sum().backward()
    assert m.gate_up_proj.grad.data_ptr() != kept.data_ptr() and torch.equal(kept, snapshot)
    assert torch.allclose(m.gate_up_proj.grad, 2 * snapshot)
    del kept
    ptr = m.gate_up_proj.grad.data_ptr()
    m(x, idx, w).sum().backward()  # accumulation: the pooled .grad is added to, never handed out
    assert m.gate_up_proj.grad.data_ptr() == ptr and torch.allclose(m.gate_up_proj.grad, 3 * snapshot, rtol=1e-5)
    m.zero_grad(set_to_none=True)
    m(x, idx, w).sum().backward()  # free again: reused
    assert torch.allclose(m.gate_up_proj.grad, snapshot)
    assert m.gate_up_proj.grad.data_ptr() in {s.data_ptr() for s, _ in K._POOL[(tuple(m.gate_up_proj.shape), torch.float32)]}


def test_grouped_mm_backends_agree():
    g = torch.Generator().manual_seed(0)
    counts = [3, 0, 5, 2]
    a, b = torch.randn(10, 16, generator=g), torch.randn(4, 16, 8, generator=g)
    at, b2 = torch.randn(10, 16, generator=g).t(), torch.randn(10, 8, generator=g)
    loop3, loop2 = K.grouped_mm_loop(a, b, counts), K.grouped_mm_loop(at, b2, counts)
    assert (loop2[1] == 0).all()
    if hasattr(torch, "_grouped_mm"):
        assert torch.allclose(K.grouped_mm_torch(a, b, counts), loop3, atol=1e-5)
        assert torch.allclose(K.grouped_mm_torch(at, b2, counts), loop2, atol=1e-5)


def test_padded_counts():
    assert K.padded_counts([9, 0, 7, 8, 3], 4) == [12, 0, 7, 8, 3]  # under two quanta: as they are
    assert K.padded_counts([9, 5], 0) == [9, 5]
    idx = K._pad_index([3, 0, 9, 2], [3, 0, 12, 2], "cpu")
    assert idx.tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 15, 16]


@pytest.mark.parametrize("quantum", [4, 5])
def test_bf16_padded_rows_match_unpadded(monkeypatch, quantum):
    """bf16 on CPU: each expert's rows padded with zero rows to a multiple of ROW_QUANTUM (one oneDNN kernel per
    shape) give what the same kernel gives with the rows as they are: zero rows add exact zeros to every product,
    their routing weight is 0, and dropped or empty experts stay as they were."""
    m, cfg = experts_module("mixtral", 8, 96)
    T = 96
    x = torch.randn(T, H, generator=torch.Generator().manual_seed(3))
    idx, w = routing(T, 8, 2, drop=0.15, empty=(2,))
    counts = K._plan(idx, 8)[2]
    monkeypatch.setattr(K, "ROW_QUANTUM", quantum)
    assert K.padded_counts(counts, quantum) != counts  # the padding is exercised
    padded = run(m, cfg, "upcycle", x, idx, w, bf16=True)
    monkeypatch.setattr(K, "ROW_QUANTUM", 0)
    plain = run(m, cfg, "upcycle", x, idx, w, bf16=True)
    for name in plain:
        # bitwise equal on the AMX Xeon; other CPUs may pick another oneDNN kernel per row count: one bf16 ulp
        assert rel(padded[name], plain[name]) <= 4e-3, name
    assert (padded["w"][idx == 8] == 0).all() and (padded["gate_up_proj"][2] == 0).all()


def test_general_path_gpt_oss_layout():
    """Biases, transposed weights, interleaved gate/up and a custom gate: the general path, same as eager."""
    m, cfg = experts_module("gpt_oss", 8, 32, num_attention_heads=4, num_key_value_heads=2, head_dim=16)
    assert not K.fast_path_applies(m)
    T = 48
    x = torch.randn(T, H, generator=torch.Generator().manual_seed(3))
    idx, w = routing(T, 8, 2, empty=(5,))
    ref, got = run(m, cfg, "eager", x, idx, w), run(m, cfg, "upcycle", x, idx, w)
    for name in ref:
        assert rel(got[name], ref[name]) <= 1e-5, name


def test_transposed_fast_path_matches_batched_mm():
    """A SiLU experts class with transposed weights (aria's layout) takes the fast path."""
    from transformers import AutoConfig
    from transformers.activations import ACT2FN
    from transformers.integrations.moe import use_experts_implementation

    @use_experts_implementation(is_transposed=True)
    class TransposedExperts(torch.nn.Module):
        def __init__(self, config):
            super().__init__()
            self.num_experts, I = 8, 40
            self.gate_up_proj = torch.nn.Parameter(torch.randn(8, H, 2 * I) * 0.2)
            self.down_proj = torch.nn.Parameter(torch.randn(8, I, H) * 0.2)
            self.act_fn = ACT2FN["silu"]

    cfg = AutoConfig.for_model("mixtral", hidden_size=H)
    torch.manual_seed(0)
    m = TransposedExperts(cfg)
    assert K.fast_path_applies(m)
    x = torch.randn(40, H)
    idx, w = routing(40, 8, 2, empty=(0,))
    ref, got = run(m, cfg, "batched_mm", x, idx, w), run(m, cfg, "upcycle", x, idx, w)
    for name in ref:
        assert rel(got[name], ref[name]) <= 1e-5, name


# --------------------------------------------------------------------------------------------------------------
# whole models


def tiny_moe(model_type: str, tmp_path, **extra):
    from transformers import AutoConfig, AutoModelForCausalLM

    from tests.tiny import TINY, _randomize_

    cfg = AutoConfig.for_model(model_type, **{**TINY, "head_dim": 16, **extra})
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    _randomize_(model, 0)
    model.save_pretrained(tmp_path / model_type)
    return tmp_path / model_type


def loss_and_grads(model, ids):
    model.zero_grad(set_to_none=True)
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    return out.logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("model_type,extra", [
    ("mixtral", dict(num_local_experts=8, num_experts_per_tok=2)),
    ("qwen2_moe", dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32,
                       shared_expert_intermediate_size=64, norm_topk_prob=True)),
])
def test_full_model_loaded_with_upcycle_matches_eager(model_type, extra, tmp_path):
    from transformers import AutoModelForCausalLM

    path = tiny_moe(model_type, tmp_path, **extra)
    eager = AutoModelForCausalLM.from_pretrained(path, experts_implementation="eager")
    ours = AutoModelForCausalLM.from_pretrained(path, experts_implementation="upcycle")
    assert type(ours) is type(eager)  # still the standard class
    assert ours.config._experts_implementation == "upcycle"
    ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(5))
    l_ref, g_ref = loss_and_grads(eager, ids)
    l_got, g_got = loss_and_grads(ours, ids)
    assert rel(l_got, l_ref) <= 1e-5
    assert g_ref.keys() == g_got.keys()
    for name in g_ref:
        assert rel(g_got[name], g_ref[name]) <= 1e-4, name
    ours.save_pretrained(tmp_path / "saved")
    assert "upcycle" not in (tmp_path / "saved" / "config.json").read_text()


def test_full_model_with_capacity_factor(tmp_path):
    """upcycle's training router with a capacity factor (dropped assignments) gives eager's logits and grads."""
    from transformers import AutoModelForCausalLM

    from upcycle.families.moe.routing import moe_layers
    from upcycle.train.router import RouterControls, RouterPatch

    path = tiny_moe("mixtral", tmp_path, num_local_experts=8, num_experts_per_tok=2)
    results = []
    for impl in ("eager", "upcycle"):
        model = AutoModelForCausalLM.from_pretrained(path, experts_implementation=impl).train()
        layers = moe_layers(model)
        RouterPatch(layers, RouterControls(capacity_factor=0.5))
        ids = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(5))
        results.append(loss_and_grads(model, ids))
        indices, kept = layers[0].router._upcycle_last
        assert not kept.all()  # some assignments were dropped
    (l_ref, g_ref), (l_got, g_got) = results
    assert rel(l_got, l_ref) <= 1e-5
    for name in g_ref:
        assert rel(g_got[name], g_ref[name]) <= 1e-4, name


def test_resolve_experts_impl_uses_the_kernel():
    from upcycle.train.model import resolve_experts_impl

    assert register_experts_kernel() is True  # idempotent
    assert resolve_experts_impl("auto", True) == "upcycle"
    assert resolve_experts_impl("upcycle", True) == "upcycle"
    assert resolve_experts_impl("auto", False) is None
