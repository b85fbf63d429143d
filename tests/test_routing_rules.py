"""Routing-weight rules (`--routing renorm|softmax|sigmoid`): when each start is exact, what it costs, and that the
router gets a language-modelling gradient from step 0 under the rules without renormalisation.

Which type stores which rule comes from the independent matrix in tests/test_convert_exact.py (TYPES), not from
the registry. The facts checked here were read off transformers 5's routers: qwen2_moe, qwen3_moe and flex_olmo
take softmax over all experts then top-k, renormalised only with norm_topk_prob; glm4_moe and dots1 take
sigmoid scores, renormalised only with norm_topk_prob, times routed_scaling_factor.
"""

from __future__ import annotations

import json

import pytest

from tests.tiny import routers_before_and_after_patch
import torch
from typer.testing import CliRunner

from tests.test_convert_exact import FAMILIES, SUPPORT, TYPES
from upcycle.cli import app
from upcycle.convert import convert
from upcycle.core.errors import UnsupportedError, UsageError
from upcycle.families.moe.routing import moe_layers
from upcycle.train.model import load_for_training

IDS = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
RULES = ["softmax", "sigmoid"]  # renorm is what test_convert_exact.py checks for every pair


def logits(folder, ids=IDS):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    with torch.no_grad():
        return model(ids).logits


def assert_exact(ref: torch.Tensor, got: torch.Tensor, what: str) -> None:
    # float32 noise on these logits is 1e-6 of their scale; a 1e-4 relative error in a scale must fail
    diff, scale = float((ref - got).abs().max()), float(ref.abs().max())
    assert diff <= 1e-5 * scale, f"{what}: max |diff| {diff:.3g} at logits scale {scale:.3g}"


# recipes per rule that are exact with a zero router: coarse copies, a non-power-of-two E/k, slices + shared
EXACT_RECIPES = {
    "softmax": [dict(experts=8, top_k=2), dict(experts=6, top_k=4),
                dict(experts=4, top_k=2, granularity=2, shared_experts=1),  # groups of one slice + a shared slice
                dict(experts=4, top_k=2, shared_experts=1)],  # a shared whole copy: the routed half scaled
    "sigmoid": [dict(experts=8, top_k=2), dict(experts=6, top_k=3, granularity=4, shared_experts=1),
                dict(experts=4, top_k=2, granularity=2, shared_experts=2)],
}
CASES = [(fam, fmt, rule) for fam in FAMILIES for fmt in sorted(SUPPORT[fam]) for rule in RULES]


@pytest.mark.parametrize("family,fmt,rule", CASES, ids=[f"{a}-{b}-{c}" for a, b, c in CASES])
def test_rule_matrix(tiny_parent, tmp_path, family, fmt, rule):
    """A type that stores the rule reproduces the parent with a zero router; one that cannot refuses, writing nothing."""
    parent = tiny_parent(family)
    if rule not in TYPES[fmt]["routings"]:
        with pytest.raises(UnsupportedError, match=f"{fmt} cannot store --routing {rule}"):
            convert(parent, tmp_path / "out", format=fmt, routing=rule, router_std=0, verify=False, quiet=True)
        assert not (tmp_path / "out").exists()
        return
    ref = logits(parent)
    for i, options in enumerate(EXACT_RECIPES[rule]):
        if options.get("shared_experts") and not TYPES[fmt]["shared"]:
            continue
        out = tmp_path / str(i)
        res = convert(parent, out, format=fmt, routing=rule, router_std=0, verify=False, quiet=True, **options)
        from upcycle.convert import exact_claim

        assert exact_claim(res.plan), options
        cfg = json.loads((out / "config.json").read_text())
        assert cfg["norm_topk_prob"] is False
        assert_exact(ref, logits(out), f"{family} -> {fmt} --routing {rule} {options}")


def test_scales_follow_the_rule(tiny_parent, tmp_path):
    """softmax: E/k on down_proj (1/E per chosen expert); sigmoid: 2/k in routed_scaling_factor (1/2 each)."""
    from safetensors import safe_open

    parent = tiny_parent("llama")
    res = convert(parent, tmp_path / "s", format="qwen2_moe", routing="softmax", router_std=0, experts=8, top_k=2,
                  verify=False, quiet=True)
    assert {o.down_scale for o in res.plan.layouts[0].experts} == {4.0}
    with safe_open(tmp_path / "s" / "model.safetensors", "pt") as f:
        assert not f.get_tensor("model.layers.0.mlp.gate.weight").any()  # a zero router
    res = convert(parent, tmp_path / "g", format="glm4_moe", routing="sigmoid", router_std=0, experts=6, top_k=3,
                  verify=False, quiet=True)
    assert {o.down_scale for o in res.plan.layouts[0].experts} == {1.0}
    assert json.loads((tmp_path / "g" / "config.json").read_text())["routed_scaling_factor"] == pytest.approx(2 / 3)


def test_zero_router_with_split_groups_is_refused(tiny_parent, tmp_path):
    """Every expert ties under a zero router; torch.topk then picks any k, which may split a virtual group
    (it does on CPU: 8 of 32 tied values come back as indices 17-24), so only a type whose expert groups keep
    copies whole (glm4_moe, dots1) may take a zero router with granularity > 1."""
    with pytest.raises(UnsupportedError, match="may split a virtual group of 2 slices"):
        convert(tiny_parent("llama"), tmp_path / "q", format="qwen2_moe", routing="softmax", router_std=0, experts=8,
                top_k=4, granularity=2, verify=False, quiet=True)
    assert not (tmp_path / "q").exists()


def test_recipe_errors():
    from upcycle.convert.recipe import Recipe

    with pytest.raises(UsageError, match="unknown --routing 'nope'"):
        Recipe(routing="nope")
    with pytest.raises(UsageError, match="--router-std 0 with --routing renorm"):
        Recipe(router_std=0)
    with pytest.raises(UsageError, match="--router-std must be 0"):
        Recipe(router_std=-1.0)
    with pytest.raises(UsageError, match="--router-init kmeans sets it"):
        Recipe(routing="softmax", router_std=0, router_init="kmeans:x.txt")
    assert Recipe(routing="softmax", router_std=0).exact
    assert not Recipe(routing="softmax").exact and "zero router" in Recipe(routing="softmax").inexact_reason
    assert Recipe().exact and Recipe(router_init="kmeans:x.txt").exact  # renorm: exact with any router


# -------------------------------------------------------------------------------------------- not-exact starts

def test_small_router_is_near_exact_and_reported_not_failed(tiny_parent, tmp_path):
    """A random router makes the start approximately exact; verify measures it and does not fail, the manifest
    records it, and the deviation shrinks with the std."""
    parent = tiny_parent("llama")
    diffs = {}
    for std in (1e-2, 1e-4):
        out = tmp_path / str(std)
        res = convert(parent, out, format="qwen2_moe", routing="softmax", router_std=std, verify=True, quiet=True)
        v = res.verification
        assert v["exact_expected"] is False
        manifest = json.loads((out / "upcycle.json").read_text())
        assert manifest["exact_by_construction"] is False
        assert "only with a zero router" in manifest["not_exact_because"]
        assert manifest["verification"]["max_abs_diff"] == v["max_abs_diff"]
        assert manifest["recipe"]["routing"] == "softmax" and manifest["recipe"]["router_std"] == std
        diffs[std] = v["max_abs_diff"]
    assert diffs[1e-2] > 1e-4  # genuinely not exact at a 1e-2 std
    assert diffs[1e-4] < diffs[1e-2] / 10


def test_bf16_exactness_depends_on_where_the_scale_is_stored(tiny_parent, tmp_path):
    from upcycle.convert import exact_claim

    parent = tiny_parent("qwen2")
    # E/k = 4 on down_proj: a power of two, exact in bf16
    res = convert(parent, tmp_path / "a", format="qwen2_moe", routing="softmax", router_std=0, dtype="bfloat16",
                  verify=True, quiet=True)
    assert res.verification["exact_expected"] and res.verification["max_abs_diff"] < 1e-4
    # E/k = 3 on down_proj is rounded in bf16: not claimed
    res = convert(parent, tmp_path / "b", format="qwen2_moe", routing="softmax", router_std=0, dtype="bfloat16",
                  experts=6, top_k=2, verify=True, quiet=True)
    assert not exact_claim(res.plan) and "non-power-of-two scale 3" in res.plan.inexact_reason
    assert res.verification["exact_expected"] is False
    # sigmoid keeps 2/k = 2/3 in routed_scaling_factor (float32 in the router): exact in bf16
    res = convert(parent, tmp_path / "c", format="glm4_moe", routing="sigmoid", router_std=0, dtype="bfloat16",
                  experts=6, top_k=3, verify=True, quiet=True)
    assert res.verification["exact_expected"] and res.verification["max_abs_diff"] < 1e-4


# -------------------------------------------------------------------------------------------- gradients

def _router_grads(folder) -> list[torch.Tensor]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    out = model(IDS, labels=IDS)
    out.loss.backward()
    return [m.router.weight.grad.clone() for m in moe_layers(model)]


def test_router_gets_an_lm_gradient_only_without_renormalisation(tiny_parent, tmp_path):
    """Identical copies: renormalised weights sum to 1 whatever the router says, so the LM loss gives it no
    gradient (float noise only); softmax and sigmoid weights do, from a zero router on."""
    parent = tiny_parent("llama")
    convert(parent, tmp_path / "renorm", format="qwen2_moe", verify=False, quiet=True)
    convert(parent, tmp_path / "softmax", format="qwen2_moe", routing="softmax", router_std=0, verify=False, quiet=True)
    convert(parent, tmp_path / "sigmoid", format="glm4_moe", routing="sigmoid", router_std=0, verify=False, quiet=True)
    norms = {name: max(float(g.norm()) for g in _router_grads(tmp_path / name)) for name in ("renorm", "softmax", "sigmoid")}
    assert norms["softmax"] > 1e-4 and norms["sigmoid"] > 1e-4, norms
    assert norms["renorm"] < 1e-6 * norms["softmax"], norms


def test_zero_router_ties_every_token_and_the_unchosen_rows(tiny_parent, tmp_path):
    """The honest cost of the exact zero-router start: every token picks the same k experts, and the unchosen
    experts' rows get identical gradients, so they stay tied after a step (as do the chosen ones)."""
    from transformers import AutoModelForCausalLM

    parent = tiny_parent("llama")
    out = tmp_path / "m"
    convert(parent, out, format="qwen2_moe", routing="softmax", router_std=0, experts=8, top_k=2, verify=False, quiet=True)
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    layer = moe_layers(model)[0]
    chosen = []
    layer.router.register_forward_hook(lambda mod, args, res: chosen.append(res[2]))
    model(IDS, labels=IDS).loss.backward()
    picks = chosen[0].sort(dim=-1).values
    assert (picks == picks[0]).all()  # one set of k experts for every token
    grad = layer.router.weight.grad
    unchosen = [e for e in range(8) if e not in set(picks[0].tolist())]
    assert all(torch.equal(grad[unchosen[0]], grad[e]) for e in unchosen[1:])
    assert not torch.equal(grad[unchosen[0]], grad[int(picks[0, 0])])


# -------------------------------------------------------------------------------------------- training router

PARITY = [("qwen2_moe", "llama", "softmax", {}), ("qwen3_moe", "qwen3", "softmax", {}),
          ("flex_olmo", "olmo2", "softmax", {}), ("glm4_moe", "llama", "sigmoid", {}),
          ("dots1", "qwen3", "sigmoid", {}),
          ("glm4_moe", "llama", "sigmoid", dict(experts=6, top_k=3, granularity=4, shared_experts=1))]


@pytest.mark.parametrize("fmt,family,rule,options", PARITY, ids=[f"{a}-{c}-{len(d)}" for a, _, c, d in PARITY])
def test_patched_router_follows_the_rule(tiny_parent, tmp_path, fmt, family, rule, options):
    """upcycle train's fp32 router returns what transformers' router returns for the rule's checkpoints: no
    renormalisation, the type's routed_scaling_factor, group-limited choice, a non-zero selection bias."""
    out = tmp_path / "m"
    convert(tiny_parent(family), out, format=fmt, routing=rule, router_std=0, verify=False, quiet=True,
            **{"experts": 4, "top_k": 2, **options})
    model = load_for_training(str(out), experts_impl="eager", allow_pickle=False)
    layers = moe_layers(model)
    cfg = json.loads((out / "config.json").read_text())
    assert layers and all(m.norm_topk_prob is False for m in layers)
    assert all(m.scale == pytest.approx(cfg.get("routed_scaling_factor", 1.0)) for m in layers)
    torch.manual_seed(1)
    h = torch.randn(32, layers[0].hidden_size)
    for m in layers:  # a trained router, so that the choice and weights vary per token
        with torch.no_grad():
            m.router.weight.copy_(torch.randn_like(m.router.weight) * 0.5)
        if m.selection_bias is not None:
            m.selection_bias.copy_(torch.randn(m.num_experts) * 0.3)
    model.eval()
    _, after, patch = routers_before_and_after_patch(layers, h)
    for _, w1, _ in after:
        assert not torch.allclose(w1.sum(dim=-1), torch.ones(w1.shape[0]) * w1.sum(dim=-1)[0])  # not renormalised
    patch.remove()


def test_training_moves_a_zero_router_with_the_lm_loss_alone(tiny_parent, tmp_path):
    """upcycle train on a softmax zero-router checkpoint, router only, no auxiliary losses, no weight decay:
    the router leaves zero, so the LM loss reached it."""
    from safetensors.torch import load_file

    from upcycle.core.assets import stdlib_dir
    from upcycle.train import TrainConfig, train

    src = tmp_path / "m"
    convert(tiny_parent("llama"), src, format="qwen2_moe", routing="softmax", router_std=0, experts=4, top_k=2,
            verify=False, quiet=True)
    run = tmp_path / "run"
    train(TrainConfig(model=str(src), data=[str(stdlib_dir() / "json")], out=run, steps=2, seq_len=32, batch_size=2,
                      save_every=0, precision="fp32", experts_impl="eager", eval_every=0, train=["router"],
                      aux_loss_coef=0.0, z_loss_coef=0.0, weight_decay=0.0, lr=1e-3))
    w = load_file(run / "final" / "model.safetensors")
    assert all(w[f"model.layers.{i}.mlp.gate.weight"].abs().max() > 0 for i in (0, 1))


# -------------------------------------------------------------------------------------------- CLI

runner = CliRunner()


def cli(*args):
    result = runner.invoke(app, ["convert", *map(str, args)])
    assert "Traceback" not in result.output
    return result


@pytest.mark.parametrize("args,code,message", [
    (["--routing", "softmax", "--format", "mixtral"], 1,
     "--format mixtral cannot hold this llama parent exactly: mixtral cannot store --routing softmax"),
    (["--routing", "softmax", "--format", "mixtral"], 1, "types that fit: qwen2_moe"),
    (["--routing", "sigmoid", "--format", "qwen2_moe"], 1, "types that fit: glm4_moe"),
    (["--routing", "nope"], 2, "unknown --routing 'nope'; choose one of renorm, softmax, sigmoid"),
    (["--router-std", "0"], 2, "--router-std 0 with --routing renorm"),
    (["--router-std", "-1"], 2, "--router-std must be 0 (a zero router) or positive"),
    (["--routing", "softmax", "--router-std", "0", "-e", "8", "-k", "4", "-g", "2"], 1,
     "may split a virtual group of 2 slices; use a positive --router-std"),
])
def test_cli_refuses_with_one_line(tiny_parent, tmp_path, args, code, message):
    r = cli(tiny_parent("llama"), tmp_path / "m", *args)
    assert r.exit_code == code, r.output
    assert message in " ".join(r.output.split())
    assert not (tmp_path / "m").exists()


def test_cli_plan_says_exact_or_why_not(tiny_parent, tmp_path):
    r = runner.invoke(app, ["convert", str(tiny_parent("llama")), str(tmp_path / "m"), "--routing", "softmax",
                            "--router-std", "0", "--dry-run"], env={"COLUMNS": "200"})
    assert r.exit_code == 0, r.output
    assert "qwen2_moe" in r.output and "exact         yes" in r.output and "zero router" in r.output
    r = runner.invoke(app, ["convert", str(tiny_parent("llama")), str(tmp_path / "m"), "--routing", "sigmoid",
                            "--router-std", "0.001", "--dry-run"], env={"COLUMNS": "200"})
    assert r.exit_code == 0, r.output
    assert "glm4_moe" in r.output
    assert "exact         no: --routing sigmoid reproduces the parent only with a zero router" in r.output
    r = cli(tiny_parent("llama"), tmp_path / "v", "--routing", "softmax", "--router-std", "0.001")
    assert r.exit_code == 0, r.output
    assert "verified (not exact by design)" in r.output
