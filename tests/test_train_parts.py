"""Goldens for the pieces of `upcycle train`: option parsing, the learning-rate schedule, the fp32 router (parity
with every transformers router family, jitter, capacity dropping), the aux and z losses, routing statistics,
aux-loss-free bias updates, what trains (roles, masks, optimizer groups) and the run folder bookkeeping."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest

from tests.tiny import routers_before_and_after_patch
import torch

from upcycle.core.errors import OutputError, TrainingError, UsageError
from upcycle.families.moe.routing import MoELayer, RouterRecord, RoutingRecorder, moe_layers, router_probs, select_experts
from upcycle.train import checkpoint as ck
from upcycle.train.config import TrainConfig, parse_count, parse_train
from upcycle.train.freeze import apply_selection, param_groups, parameter_role
from upcycle.train.loop import lr_lambda
from upcycle.train.losses import RoutingStats, load_balancing_loss, router_losses, z_loss
from upcycle.train.model import load_for_training
from upcycle.train.router import (RouterControls, RouterPatch, capacity, capacity_mask, update_selection_bias)


def fake_layer(E=4, k=2, scoring="softmax", H=8) -> MoELayer:
    return MoELayer(index=0, block=None, router=torch.nn.Linear(H, E, bias=False), experts=None, num_experts=E,
                    top_k=k, scoring=scoring, selection_bias=None)


# ------------------------------------------------------------------------------------------------------- options

@pytest.mark.parametrize("text,value", [("4096", 4096), ("20M", 20_000_000), ("1.5B", 1_500_000_000), ("2k", 2000),
                                        ("1e3", 1000), (None, None), (77, 77)])
def test_parse_count(text, value):
    assert parse_count(text, "--tokens") == value


def test_parse_count_rejects_garbage():
    with pytest.raises(UsageError, match="expected a number like 500000, 20M or 1.5B"):
        parse_count("lots", "--tokens")


def test_parse_train_goldens(tmp_path):
    s = parse_train([])
    assert s.everything and s.touches_router and not s.some_experts
    s = parse_train(["router,attention", "embeddings"])
    assert s.groups == {"router", "attention", "embeddings"} and not s.everything
    s = parse_train(["experts:0-2,5"])
    assert s.experts_all_layers == (0, 1, 2, 5) and s.experts_for(7) == (0, 1, 2, 5) and not s.touches_router
    s = parse_train(["experts:0=1,2;5=0-3", "router"])
    assert s.experts_by_layer == ((0, (1, 2)), (5, (0, 1, 2, 3))) and s.experts_for(1) is None
    assert s.experts_for(5) == (0, 1, 2, 3) and s.touches_router
    f = tmp_path / "domain_experts.json"
    f.write_text(json.dumps({"1": [3, 0], "0": [2]}))
    s = parse_train([str(f)])
    assert s.experts_by_layer == ((0, (2,)), (1, (0, 3)))


@pytest.mark.parametrize("values,message", [
    (["all,router"], "--train all trains everything"),
    (["experts", "experts:1"], "--train experts trains every expert"),
    (["nope"], "--train 'nope': use all, router"),
    (["experts:3-1"], "empty range"),
    (["experts:a"], "is not an index or a range"),
    (["experts:0=;"], "write LAYER=EXPERTS entries"),
    (["missing.json"], "no such file"),
])
def test_parse_train_errors(values, message):
    with pytest.raises(UsageError, match=message):
        parse_train(values)


def test_config_derived_budget_and_warmup(tmp_path):
    cfg = TrainConfig(model="m", data=["d"], out=tmp_path / "r", tokens="1000", seq_len=32, batch_size=2,
                      grad_accum=2)
    assert cfg.tokens == 1000 and cfg.tokens_per_step(1) == 128 and cfg.tokens_per_step(2) == 256
    assert cfg.total_steps(1) == 8 and cfg.total_steps(2) == 4  # rounded up to whole steps
    assert cfg.warmup(100) == 2 and cfg.warmup(10) == 1 and cfg.warmup(1) == 0
    cfg = dataclasses.replace(cfg, warmup_steps=50)
    assert cfg.warmup(10) == 10
    assert json.loads(json.dumps(cfg.to_json()))["out"] == str(tmp_path / "r")


# ------------------------------------------------------------------------------------------------- lr schedule

def test_lr_schedule_warmup_then_cosine_to_min():
    f = lr_lambda(total=10, warmup=2, min_ratio=0.1)
    got = [f(s) for s in range(10)]  # s = optimizer steps already taken; the 10th step uses f(9)
    assert got[0] == pytest.approx(0.5) and got[1] == pytest.approx(1.0)
    assert got[2] == pytest.approx(1.0)  # the first step after warmup is at the peak
    assert got[9] == pytest.approx(0.1)  # the last step is at min_lr_ratio
    # halfway through the decay the cosine is at the midpoint
    assert f(2 + 7 / 2) == pytest.approx(0.1 + 0.9 * 0.5)
    assert all(a >= b for a, b in zip(got[1:], got[2:]))
    g = lr_lambda(total=5, warmup=0, min_ratio=0.0)
    assert [round(g(s), 6) for s in range(5)] == [1.0, round(0.5 * (1 + math.cos(math.pi / 4)), 6), 0.5,
                                                  round(0.5 * (1 + math.cos(3 * math.pi / 4)), 6), 0.0]
    assert lr_lambda(total=1, warmup=0, min_ratio=0.1)(0) == pytest.approx(1.0)


# ---------------------------------------------------------------------------------------------------- capacity

def test_capacity_formula():
    assert capacity(16, 2, 4, 1.0) == 8  # the balanced share
    assert capacity(10, 2, 4, 1.25) == 7  # ceil(6.25)
    assert capacity(1, 1, 64, 0.1) == 1  # at least one


def test_capacity_mask_first_choices_first():
    # E=4, cap=2. First choices in token order: e0, e0, e0 (3rd: dropped), e3. Then second choices: e1, e2, e1,
    # e0 (e0 is already full with the two first choices).
    idx = torch.tensor([[0, 1], [0, 2], [0, 1], [3, 0]])
    kept = capacity_mask(idx, 4, 2)
    assert kept.tolist() == [[True, True], [True, True], [False, True], [True, False]]
    assert capacity_mask(idx, 4, 100).all()


# ------------------------------------------------------------------------------------------------------ losses

def test_load_balancing_loss_is_one_when_balanced_and_e_over_k_when_collapsed():
    E, k, T = 4, 2, 8
    layer = fake_layer(E, k)
    idx = torch.tensor([[0, 1], [2, 3]] * (T // 2))
    balanced = RouterRecord(0, idx, logits=torch.zeros(T, E))
    assert float(load_balancing_loss(layer, balanced)) == pytest.approx(1.0)
    logits = torch.tensor([[50.0, 50.0, -50.0, -50.0]]).repeat(T, 1)
    collapsed = RouterRecord(0, torch.tensor([[0, 1]]).repeat(T, 1), logits=logits)
    assert float(load_balancing_loss(layer, collapsed)) == pytest.approx(E / k)


def test_load_balancing_loss_matches_transformers_divided_by_k():
    """transformers' mixtral load_balancing_loss_func counts each of the k choices as a whole token (its value at
    balance is k); ours divides by T*k so that balance is 1 for any k."""
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    torch.manual_seed(0)
    E, k, T = 8, 2, 64
    layer = fake_layer(E, k)
    logits = torch.randn(T, E) * 2
    _, idx = select_experts(layer, logits)
    ours = load_balancing_loss(layer, RouterRecord(0, idx, logits=logits))
    theirs = load_balancing_loss_func((logits,), E, k)
    assert float(ours) == pytest.approx(float(theirs) / k, rel=1e-6)


def test_z_loss_and_layer_average():
    E, T = 4, 6
    rec = RouterRecord(0, torch.zeros(T, 2, dtype=torch.long), logits=torch.zeros(T, E))
    assert float(z_loss(rec)) == pytest.approx(math.log(E) ** 2)
    rec2 = RouterRecord(1, torch.zeros(T, 2, dtype=torch.long), logits=torch.full((T, E), 3.0))
    assert float(z_loss(rec2)) == pytest.approx((3 + math.log(E)) ** 2)
    a, b = fake_layer(E), fake_layer(E)
    b.index = 1
    aux, z = router_losses([a, b], {0: rec, 1: rec2})
    assert float(z) == pytest.approx((math.log(E) ** 2 + (3 + math.log(E)) ** 2) / 2)  # mean, not sum
    aux0, z0 = router_losses([], {})
    assert float(aux0) == 0.0 and float(z0) == 0.0


def test_sigmoid_router_probs_are_normalised_scores():
    layer = fake_layer(4, 2, "sigmoid")
    logits = torch.tensor([[0.0, 1.0, -1.0, 2.0]])
    s = torch.sigmoid(logits)
    assert torch.allclose(router_probs(layer, logits), s / s.sum())


def test_routing_stats_summary():
    a, b = fake_layer(4, 2), fake_layer(4, 2)
    b.index = 3
    st = RoutingStats([a, b])
    # layer 0: loads 2,2,2,2 (balanced), nothing dropped; layer 3: loads 6,2,0,0 with 2 of 8 assignments dropped
    r0 = RouterRecord(0, torch.tensor([[0, 1], [2, 3], [0, 1], [2, 3]]), logits=torch.zeros(4, 4))
    r3 = RouterRecord(3, torch.tensor([[0, 1], [0, 1], [0, 0], [0, 0]]), logits=torch.zeros(4, 4),
                      kept=torch.tensor([[True, True], [True, True], [True, True], [False, False]]))
    st.update({0: r0, 3: r3})
    s = st.summary()
    cv3 = float(torch.tensor([6.0, 2, 0, 0]).std(unbiased=False)) / 2.0
    assert s["layer_load_cv"] == [0.0, pytest.approx(cv3, abs=1e-6)]
    assert s["load_cv"] == pytest.approx(cv3 / 2, abs=1e-6)
    assert s["load_imbalance"] == pytest.approx(3.0)
    assert s["layer_dropped_frac"] == [0.0, 0.25] and s["dropped_frac"] == pytest.approx(0.125)
    assert s["layer_router_entropy"] == [pytest.approx(math.log(4), abs=1e-6)] * 2
    assert s["expert_load"] == {"0": [0.25] * 4, "3": [0.75, 0.25, 0.0, 0.0]}
    # packing for the all-reduce round-trips
    st2 = RoutingStats([a, b])
    st2.load_tensor(st.tensor())
    assert st2.summary() == s


def test_update_selection_bias_moves_towards_equal_load():
    layer = fake_layer(4, 2, "sigmoid")
    layer.router.register_buffer("e_score_correction_bias", torch.zeros(4))
    update_selection_bias([layer], torch.tensor([[10.0, 0.0, 5.0, 5.0]]), 1e-3)
    # overloaded expert 0 is made less attractive, idle expert 1 more, the two at the mean stay
    assert layer.router.e_score_correction_bias.tolist() == pytest.approx([-1e-3, 1e-3, 0.0, 0.0])


# -------------------------------------------------------------------------------------------- fp32 router parity

ROUTER_CASES = [("mixtral", "llama"), ("qwen2_moe", "llama"), ("glm4_moe", "llama"), ("granitemoe", "llama"),
                ("granitemoeshared", "llama"), ("qwen3_moe", "qwen3"), ("dots1", "qwen3"), ("flex_olmo", "olmo2")]


@pytest.mark.parametrize("fmt,family", ROUTER_CASES)
def test_patched_router_matches_transformers(moe, fmt, family):
    """Without jitter or capacity, the training router returns what the transformers router returns (fp32)."""
    model = load_for_training(str(moe(fmt, family)), experts_impl="eager", allow_pickle=False)
    layers = moe_layers(model)
    assert layers and layers[0].scoring == {"glm4_moe": "sigmoid", "dots1": "sigmoid", "granitemoe": "topk_softmax",
                                            "granitemoeshared": "topk_softmax"}.get(fmt, "softmax")
    torch.manual_seed(1)
    h = torch.randn(32, layers[0].hidden_size)  # MoE blocks hand their router flattened tokens
    for m in layers:
        if m.selection_bias is not None:  # a non-zero bias: it must shift the choice, not the weights
            m.selection_bias.copy_(torch.randn(m.num_experts) * 0.3)
    model.eval()
    _, _, patch = routers_before_and_after_patch(layers, h)
    patch.remove()
    assert "forward" not in vars(layers[0].router)


def test_group_limited_sigmoid_selection_matches_glm4_router():
    from transformers.models.glm4_moe.configuration_glm4_moe import Glm4MoeConfig
    from transformers.models.glm4_moe.modeling_glm4_moe import Glm4MoeTopkRouter

    cfg = Glm4MoeConfig(hidden_size=16, n_routed_experts=8, num_experts_per_tok=2, n_group=4, topk_group=2,
                        routed_scaling_factor=2.5, norm_topk_prob=True)
    torch.manual_seed(0)
    router = Glm4MoeTopkRouter(cfg)
    torch.nn.init.normal_(router.weight, std=0.5)
    router.e_score_correction_bias.copy_(torch.randn(8) * 0.2)
    layer = MoELayer(0, None, router, None, 8, 2, "sigmoid", router.e_score_correction_bias, True, 4, 2, 2.5)
    h = torch.randn(64, 16)
    logits, w0, i0 = router(h)
    w1, i1 = select_experts(layer, logits, router.e_score_correction_bias)
    s0, s1 = i0.sort(dim=-1), i1.sort(dim=-1)
    assert torch.equal(s0.values, s1.values)
    assert torch.allclose(w0.gather(1, s0.indices), w1.gather(1, s1.indices), atol=1e-6)


def test_router_computes_in_fp32_under_bf16_autocast(moe):
    model = load_for_training(str(moe("mixtral")), experts_impl="eager", allow_pickle=False)
    layers = moe_layers(model)
    RouterPatch(layers, RouterControls())
    h = torch.randn(32, layers[0].hidden_size)
    ref, _, _ = layers[0].router(h)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits, weights, idx = layers[0].router(h)
    assert logits.dtype == torch.float32 and torch.equal(logits, ref)


def test_jitter_only_while_training(moe):
    model = load_for_training(str(moe("mixtral")), experts_impl="eager", allow_pickle=False)
    layers = moe_layers(model)
    router = layers[0].router
    h = torch.randn(32, layers[0].hidden_size)
    clean = router(h)[0]
    RouterPatch(layers, RouterControls(jitter=0.1))
    model.train()
    noisy = router(h)[0]
    assert not torch.allclose(noisy, clean)
    x = h.float()
    # multiplicative noise in [1 - J, 1 + J] on each input element bounds the logit change
    bound = 0.1 * (x.abs() @ router.weight.float().abs().t())
    assert ((noisy - clean).abs() <= bound + 1e-5).all()
    model.eval()
    assert torch.equal(router(h)[0], clean)


@pytest.mark.parametrize("impl", ["eager", "grouped_mm", "batched_mm", "upcycle"])
def test_capacity_drops_are_skipped_by_every_experts_kernel(moe, impl):
    """Dropped assignments carry the sentinel index E and weight 0: every kernel must give what it gives for the
    original indices with those weights zeroed, and the recorder must see the pre-drop choice and kept mask."""
    if impl == "upcycle":
        pytest.importorskip("upcycle.core.kernels")
        from upcycle.train.model import resolve_experts_impl

        impl = resolve_experts_impl("upcycle", True)
    model = load_for_training(str(moe("mixtral")), experts_impl=impl, allow_pickle=False)
    layers = moe_layers(model)
    m = layers[0]
    RouterPatch(layers, RouterControls(capacity_factor=0.5))
    model.train()
    torch.manual_seed(0)
    h = torch.randn(64, m.hidden_size)
    with RoutingRecorder(model, layers=layers) as rec:
        logits, w, idx = m.router(h)
        got = rec.drain()[m.index]
    assert got.kept is not None and not got.kept.all()
    assert (idx == m.num_experts).sum() == (~got.kept).sum()
    assert torch.equal(idx[got.kept], got.indices[got.kept])
    assert float(w.detach()[~got.kept].abs().sum()) == 0.0
    w = w.detach()
    outs = []
    for indices in (idx, got.indices):  # with the sentinel / the original choice, dropped weights zero either way
        x = h.clone().requires_grad_(True)
        ww = w.clone().requires_grad_(True)
        y = m.experts(x, indices, ww)
        y.square().sum().backward()
        outs.append((y.detach(), x.grad, ww.grad * got.kept))
    for a, b in zip(*outs):
        assert torch.isfinite(a).all() and torch.allclose(a, b, atol=1e-5)
    assert capacity(64, 2, 4, 0.5) == 16 and int(got.kept.sum()) <= 4 * 16


# ---------------------------------------------------------------------------------------------------- freezing

@pytest.mark.parametrize("name,role", [
    ("model.embed_tokens.weight", "embeddings"), ("lm_head.weight", "embeddings"),
    ("model.layers.0.input_layernorm.weight", "norms"), ("model.norm.weight", "norms"),
    ("model.layers.0.self_attn.q_norm.weight", "norms"), ("model.layers.0.self_attn.q_proj.weight", "attention"),
    ("model.layers.0.self_attn.q_proj.bias", "attention"), ("model.layers.0.mlp.shared_expert.up_proj.weight", "shared"),
    ("model.layers.0.mlp.shared_expert_gate.weight", "shared"), ("model.layers.0.shared_mlp.input_linear.weight", "shared"),
    ("model.layers.0.mlp.shared_experts.down_proj.weight", "shared"), ("model.layers.0.mlp.down_proj.weight", "dense_mlp"),
    ("R", "router"), ("X", "experts"),
])
def test_parameter_roles(name, role):
    assert parameter_role(name, {"R"}, {"X"}) == role


def test_apply_selection_groups(moe):
    model = load_for_training(str(moe("qwen2_moe")), experts_impl="eager", allow_pickle=False)
    layers = moe_layers(model)
    plan = apply_selection(model, layers, parse_train(["router", "shared"]))
    on = {n for n, p in model.named_parameters() if p.requires_grad}
    assert on == set(plan.trainable)
    assert all(".gate.weight" in n or "shared_expert" in n for n in on)
    assert any(n.endswith("mlp.gate.weight") for n in on) and set(plan.counts) == {"router", "shared"}
    mixtral = load_for_training(str(moe("mixtral")), experts_impl="eager", allow_pickle=False)
    with pytest.raises(UsageError, match="--train shared: selects no parameter"):  # mixtral has no shared expert
        apply_selection(mixtral, moe_layers(mixtral), parse_train(["shared"]))


def test_apply_selection_errors(moe):
    model = load_for_training(str(moe("mixtral")), experts_impl="eager", allow_pickle=False)
    layers = moe_layers(model)
    with pytest.raises(UsageError, match="layer 5 is not an MoE layer"):
        apply_selection(model, layers, parse_train(["experts:5=0"]))
    with pytest.raises(UsageError, match="layer 1 has 4 experts; no expert 7"):
        apply_selection(model, layers, parse_train(["experts:1=7"]))
    with pytest.raises(UsageError, match="the model has 4 experts per layer"):
        apply_selection(model, layers, parse_train(["experts:4"]))


@pytest.mark.parametrize("impl", ["eager", "grouped_mm"])
def test_some_experts_train_others_get_zero_gradient(moe, impl):
    model = load_for_training(str(moe("mixtral")), experts_impl=impl, allow_pickle=False)
    layers = moe_layers(model)
    plan = apply_selection(model, layers, parse_train(["experts:0=1,3"]))
    assert plan.masked == {0: [1, 3]}
    ids = torch.randint(0, 256, (2, 32))
    model(input_ids=ids, labels=ids).loss.backward()
    g = layers[0].experts.gate_up_proj.grad
    assert g is not None and float(g[[0, 2]].abs().sum()) == 0.0 and float(g[[1, 3]].abs().sum()) > 0
    assert float(layers[0].experts.down_proj.grad[[0, 2]].abs().sum()) == 0.0
    # layer 1 is named by no list: its experts are frozen whole, and so is everything else
    assert not layers[1].experts.gate_up_proj.requires_grad and not layers[0].router.weight.requires_grad
    groups = param_groups(model, layers, lr=1e-3, weight_decay=0.1, router_lr_mult=1.0)
    assert [g["weight_decay"] for g in groups] == [0.0]  # no decay may move the frozen experts


def test_param_groups_mlp_lr(moe, tiny_parent):
    """--mlp-lr-mult: every MLP weight at lr x mult (routed and shared experts; a dense model's MLP), the router and
    everything else untouched, so an MoE and its dense parent trained with the same options match part for part."""
    model = load_for_training(str(moe("qwen2_moe", shared_experts=1)), experts_impl="eager", allow_pickle=False)
    layers = moe_layers(model)
    apply_selection(model, layers, parse_train([]))
    groups = param_groups(model, layers, lr=1e-3, weight_decay=0.1, router_lr_mult=10.0, mlp_lr_mult=0.5)
    expert_ids = {id(p) for m in layers for p in m.experts.parameters()}
    router_ids = {id(m.router.weight) for m in layers}
    lrs = {id(p): g["lr"] for g in groups for p in g["params"]}
    assert expert_ids and all(lrs[i] == pytest.approx(5e-4) for i in expert_ids)
    assert all(lrs[i] == pytest.approx(1e-2) for i in router_ids)
    shared = [p for n, p in model.named_parameters() if "shared_expert." in n]
    assert shared and all(lrs[id(p)] == pytest.approx(5e-4) for p in shared)
    attention = [p for n, p in model.named_parameters() if "self_attn" in n]
    assert attention and all(lrs[id(p)] == pytest.approx(1e-3) for p in attention)
    dense = load_for_training(str(tiny_parent("llama")), experts_impl="eager", allow_pickle=False)
    apply_selection(dense, [], parse_train([]))
    lrs = {n: g["lr"] for g in param_groups(dense, [], lr=1e-3, weight_decay=0.1, router_lr_mult=1.0, mlp_lr_mult=0.5)
           for p in g["params"] for n, q in dense.named_parameters() if q is p}
    assert {n for n, lr in lrs.items() if lr == pytest.approx(5e-4)} == {n for n in lrs if ".mlp." in n}
    others = [lr for n, lr in lrs.items() if ".mlp." not in n]
    assert others and all(lr == pytest.approx(1e-3) for lr in others)


def test_param_groups_router_lr_and_decay(moe):
    model = load_for_training(str(moe("mixtral")), experts_impl="eager", allow_pickle=False)
    layers = moe_layers(model)
    apply_selection(model, layers, parse_train([]))
    groups = param_groups(model, layers, lr=1e-3, weight_decay=0.1, router_lr_mult=10.0)
    router_ids = {id(m.router.weight) for m in layers}
    for g in groups:
        for p in g["params"]:
            assert g["lr"] == pytest.approx(1e-2 if id(p) in router_ids else 1e-3)
            assert g["weight_decay"] == (0.1 if p.dim() >= 2 else 0.0)
    assert sum(len(g["params"]) for g in groups) == sum(1 for p in model.parameters() if p.requires_grad)


# ------------------------------------------------------------------------------------------------- run folder

def test_check_run_dir(tmp_path):
    from upcycle.core.integrity import write_checksums

    out = tmp_path / "run"
    assert ck.check_run_dir(out, resume=False) is None
    with pytest.raises(TrainingError, match="nothing to resume: .* does not exist"):
        ck.check_run_dir(out, resume=True)
    out.mkdir()
    (out / ".checkpoint-4.partial").mkdir()  # a killed run's half-written checkpoint is not "content"
    assert ck.check_run_dir(out, resume=False) is None
    (out / "checkpoint-2").mkdir()  # no checksums.json (written last): incomplete, never resumed from
    with pytest.raises(TrainingError, match=r"no intact checkpoint in .* \(checkpoint-2: no checksums.json"):
        ck.check_run_dir(out, resume=True)
    with pytest.raises(OutputError, match="is not empty"):
        ck.check_run_dir(out, resume=False)
    for step in (2, 10):
        (out / f"checkpoint-{step}").mkdir(exist_ok=True)
        (out / f"checkpoint-{step}" / ck.STATE_FILE).write_text("{}")
        write_checksums(out / f"checkpoint-{step}")
    assert ck.check_run_dir(out, resume=True) == out / "checkpoint-10"  # numeric, not lexical order
    ck.prune(out, 1)
    assert [s for s, _ in ck.checkpoints(out)] == [10]
    ck.remove_partials(out)
    assert not (out / ".checkpoint-4.partial").exists()
    with pytest.raises(TrainingError, match="not written by this version"):
        ck.read_state(out / "checkpoint-10")
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputError, match="is a file"):
        ck.check_run_dir(tmp_path / "file", resume=False)


def test_metrics_log_truncates_on_resume(tmp_path):
    path = tmp_path / "metrics.jsonl"
    log = ck.MetricsLog(path, None)
    for s in range(1, 6):
        log.write({"step": s, "loss": float(s)})
    log.close()
    with open(path, "a") as f:
        f.write('{"step": 6, "lo')  # the line a SIGKILL cut
    log = ck.MetricsLog(path, 3)
    log.write({"step": 4, "loss": 40.0})
    log.close()
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert [(r["step"], r["loss"]) for r in rows] == [(1, 1.0), (2, 2.0), (3, 3.0), (4, 40.0)]
    ck.MetricsLog(path, None).close()  # a fresh run starts a fresh file
    assert path.read_text() == ""
    with pytest.raises(ValueError):
        ck.MetricsLog(path, None).write({"step": 1, "loss": float("nan")})  # never writes NaN into JSON
