"""`upcycle train --lora`: PEFT LoRA adapters on routers, fused expert tensors, attention and MLPs, for every MoE
type the tool writes; the run folder (base weights + adapter in checkpoints, a merged standard final/, the final
adapter), exact resume, and bad input refused from config.json before any weight is loaded."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from typer.testing import CliRunner

from tests.test_domain_experts import DATA, TYPES, changed_experts, config, weights
from tests.test_train_loop import metrics
from tests.tiny import assert_same_logits, one_line
from upcycle.cli import app
from upcycle.core.errors import UsageError
from upcycle.families.moe.routing import moe_layers
from upcycle.train import TrainConfig, train
from upcycle.train import checkpoint as ck
from upcycle.train.model import load_for_training

runner = CliRunner()


def _logits(model, ids):
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("fmt,family", TYPES)
def test_lora_on_router_and_fused_experts_of_every_type(moe, tmp_path, fmt, family):
    """Adapters on the router and the fused expert tensors of each type: every expert of every layer learns (one
    rank-R pair per expert), nothing outside router and experts changes, final/ is a plain checkpoint, and the
    saved adapter applied to the input with PEFT computes what final/ computes."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    src = moe(fmt, family)
    run = tmp_path / "r"
    train(config(src, run, lora=["router,experts"], lora_rank=4, lr=1e-2, steps=2))
    before, after = weights(src), weights(run / "final")
    experts, others = changed_experts(before, after)
    assert experts == {(lay, e) for lay in (0, 1) for e in range(4)}
    assert others and all(k.endswith(("gate.weight", "router.layer.weight", "router.weight")) for k in others), others
    final = AutoModelForCausalLM.from_pretrained(run / "final")
    adapted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(src), run / ck.ADAPTER_DIR)
    ids = torch.randint(0, 256, (2, 16))
    assert_same_logits(_logits(final, ids), _logits(adapted, ids), f"{fmt}: adapter on the input vs final/")
    config_json = json.loads((run / ck.ADAPTER_DIR / "adapter_config.json").read_text())
    assert config_json["r"] == 4 and config_json["base_model_name_or_path"] == str(src)
    run_json = json.loads((run / "run.json").read_text())
    assert set(run_json["trainable"]) == {"lora"} and run_json["lora"]["targets"] == {"experts": 4, "router": 2}


def test_merged_weights_are_peft_merge(moe):
    """The merged state dict final/ is written from equals PEFT's own merge_and_unload, bit for bit, under the
    Hugging Face names, with nothing missing."""
    import copy

    from upcycle.train.lora import apply_lora, merge_into_base

    model = load_for_training(str(moe()), experts_impl="eager", allow_pickle=False)
    layers = moe_layers(model)
    cfg = TrainConfig(model=str(moe()), data=["d"], out="r", steps=1, lora=["router", "experts", "attention"])
    setup = apply_lora(model, layers, cfg)
    torch.manual_seed(0)
    with torch.no_grad():
        for n, p in setup.model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    assert set(setup.modules) == {"attention"} and len(setup.modules["attention"]) == 8  # q, k, v, o x 2 layers
    twin = copy.deepcopy(setup.model)
    base = {k.replace(".base_layer", ""): v.clone() for k, v in model.state_dict().items() if ".lora_" not in k}
    mine = merge_into_base(setup.model, setup.model.state_dict())
    theirs = twin.merge_and_unload().state_dict()
    assert set(mine) == set(theirs) and all(torch.equal(mine[k], theirs[k]) for k in theirs)
    adapted = {k for k in theirs if not torch.equal(theirs[k], base[k])}
    assert len(adapted) == 2 + 4 + 8  # 2 routers, 2 x 2 fused expert tensors, 8 attention projections


def test_lora_experts_with_a_full_router(moe, tmp_path):
    """--lora experts --train router: checkpoints hold the base weights (experts as in the input, the router as
    trained) plus adapter/; final/ merges the adapter; the router of final/ is the last checkpoint's."""
    src = moe()
    run = tmp_path / "r"
    train(config(src, run, lora=["experts"], train=["router"], lr=1e-2, steps=4, save_every=2))
    assert sorted(p.name for p in run.iterdir()) == ["adapter", "checkpoint-2", "checkpoint-4", "final",
                                                     "metrics.jsonl", "run.json"]
    w0, w4, wf = weights(src), weights(run / "checkpoint-4"), weights(run / "final")
    assert changed_experts(w0, w4) == (set(), {f"model.layers.{i}.block_sparse_moe.gate.weight" for i in (0, 1)})
    assert (run / "checkpoint-4" / ck.ADAPTER_DIR / "adapter_model.safetensors").is_file()
    experts, others = changed_experts(w0, wf)
    assert len(experts) == 8 and others == {f"model.layers.{i}.block_sparse_moe.gate.weight" for i in (0, 1)}
    assert all(torch.equal(w4[k], wf[k]) for k in others)
    run_json = json.loads((run / "run.json").read_text())
    assert set(run_json["trainable"]) == {"lora", "router"}
    assert run_json["config"]["train"] == ["router"] and run_json["config"]["lora"] == ["experts"]
    assert all("router_grad_norm" in r for r in metrics(run))  # the fully trained router keeps its diagnostics


def test_lora_resume_is_exact_and_refuses_other_options(moe, tmp_path):
    src = moe()
    opts = dict(lora=["experts", "attention"], train=["router"], lr=1e-2, steps=4, save_every=2, router_jitter=0.05)
    full = tmp_path / "full"
    train(config(src, full, **opts))
    cut = tmp_path / "cut"
    shutil.copytree(full, cut)
    for name in ("checkpoint-4", "final", "adapter"):
        shutil.rmtree(cut / name)
    train(config(src, cut, resume=True, **opts))
    a, b = metrics(full), metrics(cut)
    assert [r["step"] for r in b] == [1, 2, 3, 4]
    for ra, rb in zip(a, b):
        assert (ra["loss"], ra["grad_norm"]) == (rb["loss"], rb["grad_norm"]), ra["step"]
    wa, wb = weights(full / "final"), weights(cut / "final")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    from safetensors.torch import load_file

    ad_a = load_file(full / ck.ADAPTER_DIR / "adapter_model.safetensors")
    ad_b = load_file(cut / ck.ADAPTER_DIR / "adapter_model.safetensors")
    assert all(torch.equal(ad_a[k], ad_b[k]) for k in ad_a)
    shutil.rmtree(cut / "final")
    with pytest.raises(UsageError, match="was trained with --lora experts,attention --lora-rank 8 --lora-alpha 16; "
                                         "give the same LoRA options"):
        train(config(src, cut, resume=True, **{**opts, "lora_rank": 4, "steps": 6}))
    with pytest.raises(UsageError, match="was trained with --lora"):
        train(config(src, cut, resume=True, **{**opts, "lora": None, "steps": 6}))
    plain = tmp_path / "plain"
    train(config(src, plain, steps=2, save_every=1))
    with pytest.raises(UsageError, match="has no LoRA adapter; resume without --lora"):
        train(config(src, plain, resume=True, steps=3, lora=["experts"]))


def test_lora_under_bf16_with_gradient_checkpointing(moe, tmp_path):
    src = moe("qwen2_moe", shared_experts=1)
    run = tmp_path / "r"
    train(config(src, run, lora=["experts", "shared", "attention"], precision="bf16", gradient_checkpointing=True,
                 lr=1e-2, steps=2))
    rows = metrics(run)
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in rows)
    _, others = changed_experts(weights(src), weights(run / "final"))
    assert any("shared_expert." in k for k in others) and any("self_attn" in k for k in others)
    assert not any("embed" in k or "norm" in k or k.endswith(".gate.weight") for k in others)


def test_lora_on_the_dense_parent(tiny_parent, tmp_path):
    """The dense baseline can be fine-tuned with LoRA too (attention and MLP)."""
    src = tiny_parent("llama")
    train(config(src, tmp_path / "r", lora=["attention,dense_mlp"], lr=1e-2, steps=2))
    before, after = weights(src), weights(tmp_path / "r" / "final")
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(("self_attn" in k or ".mlp." in k) and k.endswith("proj.weight") for k in changed)


def test_dry_run_counts_the_adapters(moe, tmp_path):
    r = runner.invoke(app, ["train", str(moe()), "-d", str(DATA), "-o", str(tmp_path / "r"), "--steps", "1",
                            "--lora", "experts", "--train", "router", "--dry-run"], env={"COLUMNS": "200"})
    assert r.exit_code == 0, r.output
    text = one_line(r.output)
    assert "adapter parameters at most (rank 8 on experts)" in text and "adapted weights per forward" in text
    assert not (tmp_path / "r").exists()


# ------------------------------------------------------------------------------------------------ bad input

@pytest.fixture
def no_weights(monkeypatch):
    import upcycle.train.model as model

    def refuse(*a, **k):
        raise AssertionError("weights were loaded before the bad input was reported")

    monkeypatch.setattr(model, "load_for_training", refuse)


@pytest.mark.parametrize("case,args,message", [
    ("dense", ["--lora", "router"], "--lora router only apply to a Mixture-of-Experts model"),
    ("moe", ["--lora", "shared"], "--lora shared: {model} has no shared expert"),
    ("moe", ["--lora", "dense_mlp"], "--lora dense_mlp: every layer of {model} is an MoE layer; it has no dense MLP"),
    ("moe", ["--lora", "norms"], "--lora 'norms': use router, experts, shared, attention, dense_mlp"),
    ("moe", ["--lora-rank", "4"], "--lora-rank and --lora-alpha are set but --lora names no group"),
    ("moe", ["--lora", "experts", "--lora-rank", "0"], "--lora-rank 0 must be at least 1"),
    ("moe", ["--lora", "experts", "--train", "all"], "--train all trains every weight fully; with --lora"),
    ("moe", ["--lora", "experts", "--train", "experts:1"], "--train and --lora both name experts"),
    ("moe", ["--lora", "attention,router", "--train", "attention"], "--train and --lora both name attention"),
])
def test_lora_bad_input(case, args, message, moe, tiny_parent, tmp_path, no_weights):
    model = tiny_parent("llama") if case == "dense" else moe()
    out = tmp_path / "run"
    r = runner.invoke(app, ["train", str(model), "-d", str(DATA), "-o", str(out), "--steps", "1", "--seq-len", "32",
                            *args], env={"COLUMNS": "300"})
    assert r.exit_code == 2, r.output
    assert message.format(model=model) in one_line(r.output), r.output
    lines = [line for line in r.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), r.output
    assert not out.exists()


def test_lora_targets_that_match_nothing_after_loading(moe):
    """After loading (where no config.json check could run first: a .gguf parent, a hub model), a group that
    matches no parameter is one line too."""
    from upcycle.train.lora import find_targets

    model = load_for_training(str(moe()), experts_impl="eager", allow_pickle=False)
    with pytest.raises(UsageError, match="--lora shared: matches no parameter of m"):
        find_targets(model, moe_layers(model), ("experts", "shared"), "m")


@pytest.mark.slow  # two accelerate launches of two processes each
def test_lora_and_force_route_under_ddp_match_one_process(moe, tmp_path):
    """2 processes x batch 2 under DDP give the losses and final weights of 1 process x batch 4, with LoRA on the
    experts, a fully trained router and forced routing (aux loss off: it balances each process's micro-batch)."""
    from tests.test_train_ddp import launch

    src = moe()
    opts = ["--steps", "3", "--lora", "experts", "--train", "router", "--force-route", "1", "--aux-loss-coef", "0",
            "--lr", "1e-2", "--seq-len", "32", "--precision", "fp32", "--experts-impl", "eager", "--eval-every", "0"]
    ddp = tmp_path / "ddp"
    res = launch("ddp_cpu.yaml", src, "-d", DATA, "-o", ddp, "-b", "2", "--save-every", "2", *opts)
    assert res.returncode == 0, res.stderr[-3000:]
    assert json.loads((ddp / "run.json").read_text())["world_size"] == 2
    assert (ddp / "checkpoint-2" / ck.ADAPTER_DIR / "adapter_model.safetensors").is_file()
    one = tmp_path / "one"
    r = runner.invoke(app, ["train", str(src), "-d", str(DATA), "-o", str(one), "-b", "4", "--save-every", "0", *opts])
    assert r.exit_code == 0, r.output
    a, b = metrics(ddp), metrics(one)
    for key in ("loss", "grad_norm", "router_grad_norm"):
        assert [x[key] for x in a] == pytest.approx([x[key] for x in b], rel=1e-5), key
    wa, wb = weights(ddp / "final"), weights(one / "final")
    # Relative to what the three steps changed: AdamW divides each gradient by its own running size, so an element
    # whose gradient is a near-cancelling sum (the router's, under forced routing) carries the summation order's
    # rounding into its update at full scale (measured: 7.6e-5 of the router's update in layer 0, 2e-5 absolute).
    # A process that skipped the all-reduce would be off by the order of the update itself.
    start = weights(src)
    for k in wa:
        update = float((wb[k] - start[k]).norm())
        assert float((wa[k] - wb[k]).norm()) <= 1e-3 * update + 1e-7, k
