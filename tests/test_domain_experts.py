"""The domain-expert workflow of `upcycle train`: forced routing (--force-route), router steering (--route-target),
the expert-spec grammar they share with --train experts:SPEC, the MoE layout read from config.json, and bad input
answered with one line before any weight is loaded. LoRA is in tests/test_train_lora.py."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from tests.test_train_loop import config, weights
from tests.tiny import one_line
from upcycle.cli import app
from upcycle.core.assets import stdlib_dir
from upcycle.core.errors import UsageError
from upcycle.families.moe.routing import MoELayer, RoutingRecorder, moe_layers, select_experts
from upcycle.train import TrainConfig, train
from upcycle.train import checkpoint as ck
from upcycle.train.config import ExpertSpec, parse_expert_spec
from upcycle.train.losses import log_router_probs, route_target_loss
from upcycle.train.model import load_for_training, moe_layout
from upcycle.train.router import RouterControls, RouterPatch, forced_selection, routing_weights

DATA = stdlib_dir() / "json"
TYPES = [("mixtral", "llama"), ("qwen2_moe", "llama"), ("qwen3_moe", "qwen3"), ("glm4_moe", "llama"),
         ("dots1", "qwen3"), ("granitemoe", "llama"), ("granitemoeshared", "llama"), ("flex_olmo", "olmo2")]
runner = CliRunner()


def changed_experts(before: dict, after: dict) -> tuple[set[tuple[int, int]], set[str]]:
    """({(layer, expert)} whose bytes changed, {other tensor names that changed}). Per-expert keys
    (experts.E.w1.weight) and granite's fused input_linear / output_linear [E, ...] are both split per expert."""
    experts, others = set(), set()
    for k, a in before.items():
        if a.numel() == 0 and k not in after:  # save_pretrained leaves out zero-width tensors (granitemoeshared)
            continue
        b = after[k]
        parts = k.split(".")
        if ".experts." in k:
            layer, e = int(parts[2]), int(parts[parts.index("experts") + 1])
            if not torch.equal(a, b):
                experts.add((layer, e))
        elif ("input_linear" in k or "output_linear" in k) and "shared" not in k:
            layer = int(parts[2])
            experts.update((layer, e) for e in range(a.shape[0]) if not torch.equal(a[e], b[e]))
        elif not torch.equal(a, b):
            others.add(k)
    return experts, others


# ------------------------------------------------------------------------------------------------ expert specs

def test_expert_spec_grammar(tmp_path):
    assert parse_expert_spec("3", "--force-route 3") == ExpertSpec((3,), ())
    s = parse_expert_spec("0=3;1=5,6", "x")
    assert s.by_layer == ((0, (3,)), (1, (5, 6))) and s.experts_for(0) == (3,) and s.experts_for(2) is None
    assert parse_expert_spec("0-2", "x").experts_for(9) == (0, 1, 2)
    f = tmp_path / "domain_experts.json"
    f.write_text(json.dumps({"1": [3, 0], "0": [2], "4": []}))
    assert parse_expert_spec(str(f), "x").by_layer == ((0, (2,)), (1, (0, 3)))
    layers = {0: 4, 1: 4}
    parse_expert_spec("0=3;1=0", "x").check("--force-route", layers)
    with pytest.raises(UsageError, match="--force-route: layer 2 is not an MoE layer \\(MoE layers: 0, 1\\)"):
        parse_expert_spec("2=1", "x").check("--force-route", layers)
    with pytest.raises(UsageError, match="--route-target: layer 1 has 4 experts; no expert 4"):
        parse_expert_spec("1=4", "x").check("--route-target", layers)
    with pytest.raises(UsageError, match="the model has 4 experts per layer; no expert 7"):
        parse_expert_spec("1,7", "x").check("--force-route", layers)


@pytest.mark.parametrize("kw,message", [
    (dict(force_route="a"), "--force-route a: 'a' is not an index or a range"),
    (dict(force_route="0=;"), "--force-route 0=;: write LAYER=EXPERTS entries separated by ';', e.g. 0=1,2"),
    (dict(force_route="x.json"), "--force-route x.json: no such file"),
    (dict(force_route="1", capacity_factor=1.0), "--force-route and --capacity-factor cannot be combined"),
    (dict(route_target="3", train=["experts"]), "--route-target steers the router, but it does not train"),
    (dict(route_target_coef=2.0), "--route-target-coef is set but --route-target names no expert"),
    (dict(route_target="3", route_target_coef=0.0), "--route-target-coef 0 must be positive"),
])
def test_domain_options_validate_themselves(kw, message):
    with pytest.raises(UsageError) as info:
        TrainConfig(model="m", data=["d"], out="r", steps=1, **kw)
    assert message in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize("fmt,family,kw", [
    *[(f, fam, {}) for f, fam in TYPES],
    ("qwen2_moe", "llama", {"moe_layers": "1"}), ("glm4_moe", "llama", {"moe_layers": "1"}),
])
def test_moe_layout_from_config_matches_the_loaded_model(moe, fmt, family, kw):
    """What the checks read from config.json before loading (MoE layers, experts, top-k, shared width) is what the
    loaded transformers model has, for every type the tool writes and with dense layers."""
    folder = moe(fmt, family, **kw)
    layout = moe_layout(json.loads((folder / "config.json").read_text()))
    model = load_for_training(str(folder), experts_impl="eager", allow_pickle=False)
    layers = moe_layers(model)
    assert layout.moe_layers == tuple(m.index for m in layers) and layout.num_layers == 2
    assert layout.experts_per_layer == {m.index: m.num_experts for m in layers}
    assert {m.top_k for m in layers} == {layout.top_k}
    # qwen2_moe keeps a (1, H) shared_expert_gate even when its shared expert has zero width
    shared = [p for n, p in model.named_parameters() if "shared" in n and "gate.weight" not in n and p.numel()]
    assert bool(layout.shared_width) == bool(shared)


# ------------------------------------------------------------------------------------------------ forced routing

def _layer(scoring: str, k: int = 2, E: int = 6, norm: bool = True, scale: float = 1.0) -> MoELayer:
    return MoELayer(0, None, torch.nn.Linear(8, E, bias=False), None, E, k, scoring, None, norm, scale=scale)


@pytest.mark.parametrize("scoring,norm", [("softmax", True), ("softmax", False), ("topk_softmax", True),
                                          ("sigmoid", True), ("sigmoid", False)])
def test_forced_selection_rules(scoring, norm):
    layer = _layer(scoring, norm=norm, scale=2.5 if scoring == "sigmoid" else 1.0)
    torch.manual_seed(0)
    logits = torch.randn(64, 6)
    # forcing what the router picks anyway changes nothing: same experts, same weights
    boosted = logits.clone()
    boosted[:, [1, 4]] += 20.0
    w0, i0 = select_experts(layer, boosted)
    w1, i1 = forced_selection(layer, boosted, None, torch.tensor([1, 4]))
    s0, s1 = i0.sort(dim=-1), i1.sort(dim=-1)
    assert torch.equal(s0.values, s1.values)
    assert torch.allclose(w0.gather(1, s0.indices), w1.gather(1, s1.indices), atol=1e-6)
    # one forced expert in top-2: every token takes it, plus its router's best other expert
    w, i = forced_selection(layer, logits, None, torch.tensor([5]))
    assert (i[:, 0] == 5).all() and (i[:, 1] != 5).all()
    masked = logits.clone()
    masked[:, 5] = float("-inf")
    assert torch.equal(i[:, 1], masked.argmax(dim=-1))
    assert torch.allclose(w, routing_weights(layer, logits, i))
    if norm or scoring == "topk_softmax":
        assert torch.allclose(w.sum(-1), torch.full((64,), layer.scale))
    # three forced experts for two slots: each token takes the two of them its router ranks highest
    w, i = forced_selection(layer, logits, None, torch.tensor([0, 2, 3]))
    sub = logits[:, [0, 2, 3]]
    assert torch.equal(i.sort(-1).values, torch.tensor([0, 2, 3])[sub.topk(2, -1).indices].sort(-1).values)


def test_forced_selection_ranks_the_fill_by_score_plus_bias():
    layer = _layer("sigmoid", k=3)
    logits = torch.zeros(4, 6)
    bias = torch.tensor([0.0, 0.5, 0.0, 0.0, 0.0, 0.2])
    _, i = forced_selection(layer, logits, bias, torch.tensor([3]))
    assert i.tolist() == [[3, 1, 5]] * 4


@pytest.mark.parametrize("fmt,family", TYPES)
def test_force_route_reaches_the_experts_of_every_type(moe, fmt, family):
    """Through the model's own MoE block: in training every token's top-k handed to the experts holds the forced
    expert (per-layer spec here); the recorder sees the router's own choice; in eval mode routing is untouched."""
    model = load_for_training(str(moe(fmt, family)), experts_impl="eager", allow_pickle=False)
    layers = moe_layers(model)
    spec = parse_expert_spec(";".join(f"{m.index}={m.index % 4 + 1}" for m in layers), "x")
    seen: dict[int, torch.Tensor] = {}
    for m in layers:
        m.experts.register_forward_pre_hook(lambda mod, args, i=m.index: seen.__setitem__(i, args[1].clone()))
    RouterPatch(layers, RouterControls(force=spec))
    ids = torch.randint(0, 256, (2, 24))
    with torch.no_grad(), RoutingRecorder(model, layers=layers) as rec:
        model.train()
        model(input_ids=ids)
        own = rec.drain()
        for m in layers:
            e = m.index % 4 + 1
            assert (seen[m.index] == e).any(dim=-1).all(), (fmt, m.index)
            assert not (own[m.index].indices == e).any(dim=-1).all()  # the router alone does not do that
        model.eval()
        model(input_ids=ids)
        routed = rec.drain()
        for m in layers:
            assert torch.equal(seen[m.index], routed[m.index].indices)


@pytest.mark.parametrize("fmt,family,spec", [("mixtral", "llama", "0=1;1=2"), ("granitemoe", "llama", "3"),
                                             ("qwen2_moe", "llama", "0=0,3")])
def test_force_route_with_the_same_experts_trained_changes_exactly_them(moe, tmp_path, fmt, family, spec):
    """--force-route SPEC --train experts:SPEC: byte for byte, the named experts of the saved final/ differ from
    the input and no other tensor (nor any other expert of a fused tensor) does."""
    src = moe(fmt, family, **({"shared_experts": 1} if fmt == "qwen2_moe" else {}))
    train(config(src, tmp_path / "r", force_route=spec, train=[f"experts:{spec}"], lr=1e-3))
    experts, others = changed_experts(weights(src), weights(tmp_path / "r" / "final"))
    s = parse_expert_spec(spec, "x")
    assert experts == {(lay, e) for lay in (0, 1) for e in s.experts_for(lay) or ()} and not others


def test_force_route_trains_an_expert_its_router_never_picks(moe, tmp_path):
    """glm4_moe with a selection bias of -10 on expert 3: the router never picks it, so --train experts:3 alone
    leaves every byte as it was; with --force-route 3 expert 3 learns, and nothing else changes."""
    from safetensors.torch import load_file, save_file

    src = tmp_path / "shunned"
    shutil.copytree(moe("glm4_moe"), src)
    tensors = load_file(src / "model.safetensors")
    for k in tensors:
        if k.endswith("e_score_correction_bias"):
            tensors[k][3] = -10.0
    save_file(tensors, src / "model.safetensors", metadata={"format": "pt"})
    train(config(src, tmp_path / "plain", train=["experts:3"], lr=1e-2))
    assert changed_experts(weights(src), weights(tmp_path / "plain" / "final")) == (set(), set())
    train(config(src, tmp_path / "forced", train=["experts:3"], force_route="3", lr=1e-2))
    assert changed_experts(weights(src), weights(tmp_path / "forced" / "final")) == ({(0, 3), (1, 3)}, set())
    rows = [json.loads(line) for line in (tmp_path / "forced" / ck.METRICS).read_text().splitlines()]
    assert all(r["expert_load"]["0"][3] == 0.0 for r in rows)  # the metrics show the router's own choice


# ------------------------------------------------------------------------------------------------ router steering

def test_route_target_loss_is_the_cross_entropy_toward_the_targets():
    layer = _layer("softmax", E=4)
    logits = torch.randn(16, 4)
    from upcycle.families.moe.routing import RouterRecord

    rec = RouterRecord(0, logits.topk(2, -1).indices, logits=logits)
    loss, share = route_target_loss([layer], {0: rec}, ExpertSpec((1, 2)))
    assert torch.allclose(loss, -torch.log_softmax(logits, -1)[:, [1, 2]].mean())
    both = (rec.indices.sort(-1).values == torch.tensor([1, 2])).all(-1).float().mean()
    assert torch.allclose(share, both)
    sig = _layer("sigmoid", E=4)
    p = torch.sigmoid(logits) / torch.sigmoid(logits).sum(-1, keepdim=True)
    assert torch.allclose(log_router_probs(sig, logits), p.log(), atol=1e-6)
    zero, _ = route_target_loss([layer], {0: rec}, ExpertSpec((), ((5, (1,)),)))
    assert float(zero) == 0.0


def _target_share(folder: Path, blocks: torch.Tensor, target: int) -> float:
    """Share of tokens whose top-k holds `target`, mean over MoE layers, from the saved model as transformers
    runs it (no upcycle patch)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    with torch.no_grad(), RoutingRecorder(model) as rec:
        model(input_ids=blocks)
        recs = rec.drain()
    return sum(float((r.indices == target).any(-1).float().mean()) for r in recs.values()) / len(recs)


def test_route_target_moves_the_routing_toward_the_target(moe, tmp_path):
    """A router-only fine-tune with --route-target 3 sends held-out tokens of the domain to expert 3: measured on
    the saved models, the share of tokens routed to it goes from about k/E to nearly all; the same run without the
    target loss does not move it."""
    from upcycle.core.data import heldout_blocks
    from upcycle.core.loading import load_tokenizer

    src = moe()
    blocks = heldout_blocks(load_tokenizer(str(src)), [DATA], seq_len=32, max_blocks=16, heldout_fraction=0.2)
    common = dict(steps=10, batch_size=4, train=["router"], aux_loss_coef=0.0, lr=1e-2, heldout_fraction=0.2)
    train(config(src, tmp_path / "steered", route_target="3", **common))
    train(config(src, tmp_path / "plain", **common))
    before = _target_share(src, blocks, 3)
    steered = _target_share(tmp_path / "steered" / "final", blocks, 3)
    plain = _target_share(tmp_path / "plain" / "final", blocks, 3)
    assert before < 0.6 and plain < 0.6, (before, plain)
    assert steered > 0.85 and steered - before > 0.3, (before, steered)
    rows = [json.loads(line) for line in (tmp_path / "steered" / ck.METRICS).read_text().splitlines()]
    assert rows[-1]["route_target_loss"] < rows[0]["route_target_loss"]
    assert rows[-1]["route_target_share"] > rows[0]["route_target_share"] + 0.3
    assert "route_target_loss" not in json.loads((tmp_path / "plain" / ck.METRICS).read_text().splitlines()[0])


# ------------------------------------------------------------------------------------------------ bad input

FAST = ["--seq-len", "32", "-b", "2", "--precision", "fp32", "--experts-impl", "eager", "--eval-every", "0",
        "--steps", "1"]


@pytest.fixture
def no_weights(monkeypatch):
    import upcycle.train.model as model

    def refuse(*a, **k):
        raise AssertionError("weights were loaded before the bad input was reported")

    monkeypatch.setattr(model, "load_for_training", refuse)


@pytest.mark.parametrize("case,args,code,message", [
    ("dense", ["--force-route", "3"], 2, "--force-route only apply to a Mixture-of-Experts model"),
    ("dense", ["--route-target", "1"], 2, "--route-target only apply to a Mixture-of-Experts model"),
    ("moe", ["--force-route", "5=1"], 2, "--force-route 5=1: layer 5 is not an MoE layer (MoE layers: 0, 1)"),
    ("moe", ["--force-route", "0=7"], 2, "--force-route 0=7: layer 0 has 4 experts; no expert 7"),
    ("moe", ["--force-route", "4"], 2, "--force-route 4: the model has 4 experts per layer; no expert 4"),
    ("moe", ["--route-target", "1=9", "--train", "router"], 2, "--route-target 1=9: layer 1 has 4 experts; no expert 9"),
    ("moe", ["--train", "experts:9"], 2, "--train: the model has 4 experts per layer; no expert 9"),
    ("moe", ["--force-route", "1", "--capacity-factor", "1"], 2, "--force-route and --capacity-factor cannot"),
    ("moe", ["--route-target", "1", "--train", "experts"], 2, "--route-target steers the router, but it does not"),
])
def test_bad_input_one_line_nothing_written_no_weights(case, args, code, message, moe, tiny_parent, tmp_path,
                                                       no_weights):
    model = tiny_parent("llama") if case == "dense" else moe()
    out = tmp_path / "run"
    r = runner.invoke(app, ["train", str(model), "-d", str(DATA), "-o", str(out), *FAST, *args],
                      env={"COLUMNS": "200"})
    assert r.exit_code == code, r.output
    assert message in one_line(r.output), r.output
    lines = [line for line in r.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), r.output
    assert not out.exists()
