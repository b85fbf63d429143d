"""upcycle eval's building blocks on tiny in-memory models: cost, drift, scoring, run logs, plots."""

from __future__ import annotations

import json

import pytest
import torch

from upcycle.core.errors import InputError
from upcycle.evaluate.cost import ExpertGroup, model_cost
from upcycle.evaluate.drift import (REFERENCE_MEAN, REFERENCE_PARENT, ExpertWeights, ParentMLP, layer_drift,
                                    parent_mlps)
from upcycle.evaluate.lm import score
from upcycle.evaluate.runlog import read_run
from tests.tiny import TINY


def _llama(**kw):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(**{**TINY, "head_dim": 16, **kw})).eval()


def test_cost_dense_golden():
    m = _llama()
    c = model_cost(m, [], seq_len=32)
    per_layer = 64 * 64 + 2 * (64 * 32) + 64 * 64 + 3 * 64 * 128  # q, k and v (2 kv heads of 16), o, MLP
    matmul = 2 * per_layer + 260 * 64  # lm_head; the untied input embedding is a lookup
    assert c.active_matmul_params == matmul
    assert c.total_params == c.active_params == matmul + 260 * 64 + 2 * 2 * 64 + 64  # + embedding + norms
    attention = 2 * 4 * 4 * 16 * 32  # layers x 4 x heads x head_dim x context
    assert c.attention_flops == attention
    assert c.flops_per_token == 2 * matmul + attention


def test_cost_tied_embeddings_and_sliding_window():
    from transformers import MistralConfig, MistralForCausalLM

    m = MistralForCausalLM(MistralConfig(**{**TINY, "head_dim": 16, "sliding_window": 8, "tie_word_embeddings": True}))
    c = model_cost(m, [], seq_len=32)
    assert c.attention_flops == 2 * 4 * 4 * 16 * 8  # the window, not the 32-token context
    # tied: the one embedding matrix is counted once, as the output head's matmul
    assert c.active_matmul_params == 2 * (64 * 64 * 2 + 2 * 64 * 32 + 3 * 64 * 128) + 260 * 64


def test_cost_moe_counts_only_chosen_experts():
    from transformers import MixtralConfig, MixtralForCausalLM

    cfg = MixtralConfig(**{**TINY, "head_dim": 16, "num_local_experts": 4, "num_experts_per_tok": 2})
    m = MixtralForCausalLM(cfg)
    per_expert = 3 * 64 * 128
    c = model_cost(m, [ExpertGroup(4, 2, per_expert)] * 2, seq_len=32)
    dense = _llama()
    d = model_cost(dense, [], seq_len=32)
    router = 4 * 64
    assert c.total_params == d.total_params + 2 * (3 * per_expert + router)
    assert c.active_params == d.active_params + 2 * (per_expert + router)
    assert c.flops_per_token == d.flops_per_token + 2 * 2 * (per_expert + router)


class _Manifest:
    """The two manifest methods drift needs: expert e of 2 holds neurons [e*4, e*4+4) and down_proj x 2."""

    def expert_neurons(self, layer, expert):
        return list(range(expert * 4, expert * 4 + 4))

    def expert_down_scale(self, layer, expert):
        return 2.0


def _parent_and_experts():
    g = torch.Generator().manual_seed(0)
    parent = ParentMLP(torch.randn(8, 6, generator=g), torch.randn(8, 6, generator=g), torch.randn(6, 8, generator=g))
    gate = torch.stack([parent.gate[0:4], parent.gate[4:8]])
    up = torch.stack([parent.up[0:4], parent.up[4:8]])
    down = torch.stack([parent.down[:, 0:4] * 2, parent.down[:, 4:8] * 2])
    return parent, ExpertWeights.from_fused(0, torch.cat([gate, up], 1), down)


def test_drift_against_parent_neurons():
    parent, w = _parent_and_experts()
    d, why = layer_drift(w, {0: parent}, _Manifest())
    assert why is None and d.reference == REFERENCE_PARENT
    assert d.cos == pytest.approx([1.0, 1.0], abs=1e-6)
    w.gate[1] = -w.gate[1]  # expert 1's gate flipped: cos -1 for the gate alone
    d, _ = layer_drift(w, {0: parent}, _Manifest())
    assert d.cos_gate == pytest.approx([1.0, -1.0], abs=1e-6)
    assert d.cos_up == pytest.approx([1.0, 1.0], abs=1e-6)
    g, u, dn = parent.gate[4:8], parent.up[4:8], parent.down[:, 4:8] * 2
    n2 = lambda t: float((t.double() ** 2).sum())  # noqa: E731
    expected = (n2(u) + n2(dn) - n2(g)) / (n2(g) + n2(u) + n2(dn))
    assert d.cos[1] == pytest.approx(expected, rel=1e-6)


def test_drift_falls_back_to_mean_expert_and_says_why():
    parent, w = _parent_and_experts()
    d, why = layer_drift(w, None, None)
    assert d.reference == REFERENCE_MEAN and "manifest" in why
    d, why = layer_drift(w, None, _Manifest())
    assert d.reference == REFERENCE_MEAN and "--parent" in why
    wrong = ParentMLP(parent.gate[:4], parent.up[:4], parent.down[:, :4])  # expert 1's neurons do not exist
    d, why = layer_drift(w, {0: wrong}, _Manifest())
    assert d.reference == REFERENCE_MEAN and "does not match" in why
    same = ExpertWeights(0, w.gate[[0, 0]], w.up[[0, 0]], w.down[[0, 0]])
    assert layer_drift(same, None, None)[0].cos == pytest.approx([1.0, 1.0], abs=1e-6)


def test_parent_mlps_reads_llama_and_fused_phi3():
    m = _llama()
    mlps = parent_mlps(m)
    assert sorted(mlps) == [0, 1]
    assert torch.equal(mlps[1].down, m.model.layers[1].mlp.down_proj.weight)
    from transformers import Phi3Config, Phi3ForCausalLM

    phi = Phi3ForCausalLM(Phi3Config(**TINY))
    got = parent_mlps(phi)[0]
    assert torch.equal(torch.cat([got.gate, got.up]), phi.model.layers[0].mlp.gate_up_proj.weight)


def test_score_matches_cross_entropy_by_hand():
    m = _llama()
    blocks = torch.randint(0, 256, (5, 16), generator=torch.Generator().manual_seed(1))
    seen = []
    s = score(m, blocks, batch_size=2, on_batch=lambda start, ids: seen.append((start, ids.shape[0])))
    assert seen == [(0, 2), (2, 2), (4, 1)]
    with torch.no_grad():
        logits = m(blocks).logits
    nll = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 260), blocks[:, 1:].reshape(-1),
                                            reduction="none").view(5, 15)
    assert s.block_loss == pytest.approx(nll.mean(1).tolist(), rel=1e-5)
    assert s.loss.mean == pytest.approx(float(nll.mean()), rel=1e-5)
    acc = (logits[:, :-1].argmax(-1) == blocks[:, 1:]).float().mean(1)
    assert s.block_accuracy == pytest.approx(acc.tolist())
    assert s.tokens_scored == 5 * 15 and s.input_tokens == 80 and s.tokens_per_second > 0
    assert s.peak_bytes is None or s.peak_bytes >= sum(p.numel() * 4 for p in m.parameters())


def test_read_run_and_training_plot(tmp_path):
    rows = [{"step": i, "loss": 5 - i / 10, "lr": 1e-4, "tokens": 64 * i, "aux_loss": 1.0, "z_loss": 0.1}
            for i in range(1, 41)]
    rows[19]["val_loss"] = 3.5
    rows[39]["val_loss"] = 3.2
    (tmp_path / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + '\n{"step": 41, "lo')
    run = read_run(tmp_path)  # a truncated last line (run killed mid-write) is ignored
    s = run.summary()
    assert s["steps"] == 40 and s["tokens"] == 2560 and s["best_val_loss"] == 3.2 and s["final_val_loss"] == 3.2
    assert s["final_loss"] == pytest.approx((1.1 + 1.0) / 2)  # mean of the last 5% (2 steps)
    from upcycle.evaluate import plots

    out = plots.training_curves(run, tmp_path / "training.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_read_run_errors(tmp_path):
    with pytest.raises(InputError, match="no such file"):
        read_run(tmp_path / "nope")
    with pytest.raises(InputError, match="metrics.jsonl"):
        read_run(tmp_path)
    (tmp_path / "metrics.jsonl").write_text("")
    with pytest.raises(InputError, match="empty"):
        read_run(tmp_path)
    (tmp_path / "metrics.jsonl").write_text('[1]\n{"step": 1}\n')
    with pytest.raises(InputError, match=":1: expected"):
        read_run(tmp_path)


def test_plots_write_pngs(tmp_path):
    from upcycle.evaluate import plots
    from upcycle.evaluate.specialise import domain_ranking

    paths = [
        plots.expert_load([0, 1, 2], [[0.25] * 4, [0.7, 0.1, 0.1, 0.1], [0.5, 0.5, 0, 0]], tmp_path / "load.png"),
        plots.loss_comparison([2.0, 2.1, 2.2], [2.05, 2.1, 2.3], ("moe", "parent"), tmp_path / "loss.png"),
        plots.loss_comparison([2.0, 2.1], None, ("dense", ""), tmp_path / "loss1.png"),
        plots.routing_overview([0, 1], [0.1, 0.5], [0.99, None], [0.1, 0.2], [0, 0.05], [1.0, 0.9], [1.0, 0.8],
                               "parent", tmp_path / "routing.png"),
        plots.domain_usage([domain_ranking(0, [0.5, 0.5, 0.0], [0.2, 0.8, 0.0], 1)], tmp_path / "domain.png"),
    ]
    for p in paths:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 1000
