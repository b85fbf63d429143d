"""The optimizer `upcycle train` builds: torch's fused AdamW where torch has it, checked against the reference
(for-loop) AdamW on the real parameter groups of a tiny MoE (weight decay on matrices only, a router learning
rate multiplier, partly frozen experts). Exact resume with it is tests/test_train_resume.py."""

from __future__ import annotations

import copy

import pytest
import torch

from upcycle.convert import convert
from upcycle.core.kernels import register_experts_kernel
from upcycle.families.moe.routing import moe_layers
from upcycle.train.config import parse_train
from upcycle.train.freeze import (adamw, apply_selection, clear_fused_clip, clip_into_fused_adamw,
                                   global_grad_norm, param_groups)
from upcycle.train.model import load_for_training


@pytest.fixture(scope="module")
def tiny_moe(tiny_parent, tmp_path_factory):
    out = tmp_path_factory.mktemp("moe") / "m"
    convert(tiny_parent("llama"), out, experts=4, top_k=2, verify=False, quiet=True)
    return out


def _setup(folder, train: list[str], impl: str):
    register_experts_kernel()
    model = load_for_training(str(folder), experts_impl="upcycle", allow_pickle=False)
    layers = moe_layers(model)
    apply_selection(model, layers, parse_train(train))
    groups = param_groups(model, layers, lr=3e-3, weight_decay=0.1, router_lr_mult=5.0)
    opt, used = adamw(groups, lr=3e-3, betas=(0.9, 0.95), eps=1e-8, device="cpu", impl=impl)
    return model, opt, used


def _gradients(model, steps: int, seed: int = 0) -> list[list[torch.Tensor | None]]:
    """Real gradients of `steps` different batches at the model's current weights (zeros where frozen)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(steps):
        ids = torch.randint(0, model.config.vocab_size, (2, 16), generator=g)
        model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
        out.append([None if p.grad is None else p.grad.clone() for p in model.parameters()])
        model.zero_grad(set_to_none=True)
    return out


def _apply(model, opt, grads: list[list[torch.Tensor | None]]) -> list[torch.Tensor]:
    """AdamW steps with the given gradients (the same for every implementation, so that only the optimizer
    differs: a trajectory through the model would amplify round-off through discrete routing choices)."""
    for step in grads:
        for p, gr in zip(model.parameters(), step):
            p.grad = None if gr is None else gr.clone()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return [p.detach().clone() for p in model.parameters()]


def test_auto_picks_fused_on_cpu():
    p = torch.nn.Parameter(torch.zeros(3))
    opt, used = adamw([{"params": [p]}], lr=1e-3, betas=(0.9, 0.95), eps=1e-8, device="cpu")
    assert used == "fused" and opt.defaults["fused"] is True
    opt, used = adamw([{"params": [p]}], lr=1e-3, betas=(0.9, 0.95), eps=1e-8, device="cpu", impl="for-loop")
    assert used == "for-loop" and not opt.defaults["fused"] and opt.defaults["foreach"] is False
    with pytest.raises(ValueError):
        adamw([{"params": [p]}], lr=1e-3, betas=(0.9, 0.95), eps=1e-8, impl="apex")


@pytest.mark.parametrize("train", [[], ["experts:0=1,3", "router"]], ids=["all", "some-experts"])
def test_fused_updates_equal_the_reference(tiny_moe, train):
    """Five AdamW steps (with warm bias corrections, weight decay, two learning rates): every parameter equals
    the for-loop implementation's within float32 round-off, and what is frozen stays bit-identical."""
    model_ref, opt_ref, _ = _setup(tiny_moe, train, "for-loop")
    model_fused, opt_fused, used = _setup(tiny_moe, train, "fused")
    assert used == "fused"
    before = [p.detach().clone() for p in model_fused.parameters()]
    grads = _gradients(model_ref, 5)
    ref = _apply(model_ref, opt_ref, grads)
    got = _apply(model_fused, opt_fused, grads)
    moved = 0
    for (name, _), r, f, b in zip(model_fused.named_parameters(), ref, got, before):
        # the update itself (not the weight, whose size would hide a wrong update) within float32 round-off
        torch.testing.assert_close(f - b, r - b, rtol=1e-4, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}")
        moved += int(not torch.equal(f, b))
    assert moved > 0
    if train:  # experts 0 and 2 of layer 0 and all of layer 1 are frozen: not one bit may change
        names = [n for n, _ in model_fused.named_parameters()]
        for m in moe_layers(model_fused):
            for pname, p in m.experts.named_parameters(recurse=False):
                full = next(n for n in names if n.endswith(f"layers.{m.index}.mlp.experts.{pname}"))
                b = before[names.index(full)]
                frozen = [0, 2] if m.index == 0 else list(range(m.num_experts))
                assert torch.equal(p.detach()[frozen], b[frozen]), full


def test_fused_state_continues_like_the_reference(tiny_moe):
    """A state dict saved by the fused optimizer and loaded into a new one continues the same trajectory as
    never stopping (what --resume relies on), and the state has the reference implementation's keys."""
    model_a, opt_a, _ = _setup(tiny_moe, [], "fused")
    _apply(model_a, opt_a, _gradients(model_a, 2))
    model_b = copy.deepcopy(model_a)
    groups = param_groups(model_b, moe_layers(model_b), lr=3e-3, weight_decay=0.1, router_lr_mult=5.0)
    opt_b, _ = adamw(groups, lr=3e-3, betas=(0.9, 0.95), eps=1e-8, device="cpu")
    state = opt_a.state_dict()
    opt_b.load_state_dict(copy.deepcopy(state))
    assert set(next(iter(state["state"].values()))) == {"step", "exp_avg", "exp_avg_sq"}
    grads = _gradients(model_a, 2, seed=1)
    a = _apply(model_a, opt_a, grads)
    b = _apply(model_b, opt_b, grads)
    for x, y in zip(a, b):
        assert torch.equal(x, y)


@pytest.mark.parametrize("max_norm", [0.05, 1e6, 0.0], ids=["clipping", "under-the-limit", "off"])
def test_clip_folded_into_the_fused_kernel_equals_clip_then_reference_step(tiny_moe, max_norm):
    """`clip_into_fused_adamw` (the clip done by the fused kernel's gradient divisor) gives the norm and the
    updates of torch's clip_grad_norm_ followed by the for-loop AdamW."""
    model_ref, opt_ref, _ = _setup(tiny_moe, [], "for-loop")
    model_fused, opt_fused, _ = _setup(tiny_moe, [], "fused")
    before = [p.detach().clone() for p in model_fused.parameters()]
    grads = _gradients(model_ref, 3)
    norms_ref, norms_fused = [], []
    for step in grads:
        for model, opt, norms in ((model_ref, opt_ref, norms_ref), (model_fused, opt_fused, norms_fused)):
            params = list(model.parameters())
            for p, gr in zip(params, step):
                p.grad = None if gr is None else gr.clone()
            if opt is opt_ref:
                norms.append(float(torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else float("inf"))))
            else:
                norms.append(float(clip_into_fused_adamw(opt, params, max_norm)))
                # a divisor only when the factor is below 1 (a divisor of 1 would change nothing)
                assert (opt.grad_scale is not None) == (0 < max_norm < norms[-1] + 1e-6)
            opt.step()
            if opt is opt_fused:
                clear_fused_clip(opt)
                assert opt.grad_scale is None
            opt.zero_grad(set_to_none=True)
    assert norms_fused == pytest.approx(norms_ref, rel=1e-6)
    for (name, p), r, b in zip(model_fused.named_parameters(), model_ref.parameters(), before):
        torch.testing.assert_close(p.detach() - b, r.detach() - b, rtol=1e-4, atol=1e-6,
                                   msg=lambda m, n=name: f"{n}: {m}")


def test_global_grad_norm_matches_float64():
    """The dot-product norm of fp32 CPU gradients is the float64 norm to float32 rounding, like torch's own; other
    gradients (bf16, non-contiguous) take torch's path."""
    g = torch.Generator().manual_seed(0)
    grads = [torch.randn(3072, 576, generator=g) * 1e-3, torch.zeros(7), torch.randn(1_000_003, generator=g) * 50,
             torch.randn(5, generator=g)]
    exact = torch.stack([x.double().square().sum() for x in grads]).sum().sqrt()
    ours = global_grad_norm(grads)
    assert ours.dtype == torch.float32 and float(ours) == pytest.approx(float(exact), rel=2e-6)
    transposed = [grads[0].t()]
    assert torch.equal(global_grad_norm(transposed), torch.nn.utils.get_total_norm(transposed, 2.0))
    half = [x.bfloat16() for x in grads]
    assert torch.equal(global_grad_norm(half), torch.nn.utils.get_total_norm(half, 2.0))
    assert float(global_grad_norm([torch.full((4,), 1e20)])) == float("inf")  # overflow shows, as a non-finite norm
