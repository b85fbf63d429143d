"""What trains: parameter groups by role, experts by index, and the optimizer's parameter groups.

Whole groups are frozen with requires_grad=False, which every accelerate mode handles (FSDP1 needs
use_orig_params, see examples/accelerate/fsdp.yaml). Experts are stored fused per layer (one (E, 2I, H) tensor),
so freezing some experts of a layer cannot use requires_grad: the experts module instead computes with
where(trainable, W, W.detach()), which has the same values and a zero gradient for the frozen experts. That
happens inside the forward, so it is the same under DDP and FSDP. AdamW with a zero gradient from the start
moves nothing, and such tensors get no weight decay, so frozen experts stay bit-identical.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from upcycle.core.errors import UsageError
from upcycle.families.moe.routing import MoELayer
from upcycle.train.config import MLP_GROUPS, TrainSelection

if TYPE_CHECKING:
    import torch
    from torch import nn

_SHARED = ("shared_expert", "shared_experts", "shared_mlp")


def parameter_role(name: str, routers: set[str], experts: set[str]) -> str:
    """The --train group a parameter belongs to, from its name (unwrapped model names)."""
    if name in routers:
        return "router"
    if name in experts:
        return "experts"
    if any(s in name for s in _SHARED):
        return "shared"
    if "embed_tokens" in name or name.startswith("lm_head") or ".lm_head" in name:
        return "embeddings"
    parts = name.split(".")
    if "norm" in (parts[-2] if len(parts) > 1 else name):  # input_layernorm, q_norm, model.norm, ...
        return "norms"
    if "self_attn" in name or ".attention." in name:
        return "attention"
    if ".mlp." in name or "block_sparse_moe" in name:
        return "dense_mlp"
    return "other"


@dataclass
class Plan:
    trainable: list[str] = field(default_factory=list)
    frozen: list[str] = field(default_factory=list)
    masked: dict[int, list[int]] = field(default_factory=dict)  # layer -> trained expert indices (partial)
    counts: dict[str, int] = field(default_factory=dict)  # trainable parameters per role
    totals: dict[str, int] = field(default_factory=dict)  # all parameters per role (run.json: what could train)


def _module_param_names(model, layers: list[MoELayer]) -> tuple[set[str], set[str], dict[str, int]]:
    ids_router = {id(m.router.weight): m.index for m in layers}
    ids_experts = {}
    for m in layers:
        for p in m.experts.parameters(recurse=False):
            ids_experts[id(p)] = m.index
    routers, experts, layer_of = set(), set(), {}
    for name, p in model.named_parameters():
        if id(p) in ids_router:
            routers.add(name)
        elif id(p) in ids_experts:
            experts.add(name)
            layer_of[name] = ids_experts[id(p)]
    return routers, experts, layer_of


def apply_selection(model, layers: list[MoELayer], sel: TrainSelection, adapters: frozenset[int] = frozenset()) -> Plan:
    """Set requires_grad per parameter and install expert masks; raise UsageError for impossible choices.

    adapters: ids of LoRA adapter parameters (upcycle.train.lora), which stay trainable and are counted as
    "lora"; with adapters, a selection of nothing else is allowed."""
    import torch

    by_index = {m.index: m for m in layers}
    for lay, es in sel.experts_by_layer:
        if lay not in by_index:
            moe = ", ".join(str(i) for i in by_index) or "none"
            raise UsageError(f"--train: layer {lay} is not an MoE layer (MoE layers: {moe})")
        bad = [e for e in es if e >= by_index[lay].num_experts]
        if bad:
            raise UsageError(f"--train: layer {lay} has {by_index[lay].num_experts} experts; no expert {bad[0]}")
    for e in sel.experts_all_layers:
        if layers and e >= min(m.num_experts for m in layers):
            raise UsageError(f"--train experts:{e}: the model has {min(m.num_experts for m in layers)} experts per layer")

    routers, experts, layer_of = _module_param_names(model, layers)
    plan = Plan()
    for name, p in model.named_parameters():
        if id(p) in adapters:
            p.requires_grad_(True)
            plan.trainable.append(name)
            plan.counts["lora"] = plan.counts.get("lora", 0) + p.numel()
            plan.totals["lora"] = plan.totals.get("lora", 0) + p.numel()
            continue
        role = parameter_role(name, routers, experts)
        plan.totals[role] = plan.totals.get(role, 0) + p.numel()
        on = sel.everything or role in sel.groups
        if role == "experts" and not on and sel.experts_for(layer_of[name]) is not None:
            on = True  # partly trained: masked below
        p.requires_grad_(on)
        (plan.trainable if on else plan.frozen).append(name)
        if on:
            plan.counts[role] = plan.counts.get(role, 0) + p.numel()
    if sel.some_experts and not (sel.everything or "experts" in sel.groups):
        for m in layers:
            chosen = sel.experts_for(m.index)
            if chosen is None:
                continue
            plan.masked[m.index] = list(chosen)
            mask = torch.zeros(m.num_experts, dtype=torch.bool)
            mask[list(chosen)] = True
            mask_experts(m.experts, mask)
    if not plan.trainable:
        raise UsageError(f"--train {', '.join(sorted(sel.groups))}: selects no parameter of this model")
    return plan


def mask_experts(experts: "nn.Module", mask: "torch.Tensor") -> None:
    """Make the experts module compute with zero gradient for the experts where mask is False.

    torch.func.functional_call swaps in where(mask, W, W.detach()) for the duration of the call and runs the
    class forward (whatever experts kernel it dispatches to); the flag stops the swapped call from recursing.
    """
    import torch

    cls_forward = type(experts).forward
    state = {"inside": False}

    def forward(*args, **kwargs):
        if state["inside"]:
            return cls_forward(experts, *args, **kwargs)
        params = {}
        for name, p in experts.named_parameters(recurse=False):
            m = mask.to(p.device).view(-1, *([1] * (p.dim() - 1)))
            params[name] = torch.where(m, p, p.detach())
        state["inside"] = True
        try:
            return torch.func.functional_call(experts, params, args, kwargs)
        finally:
            state["inside"] = False

    experts.forward = forward
    experts._upcycle_expert_mask = mask


def param_groups(model, layers: list[MoELayer], *, lr: float, weight_decay: float, router_lr_mult: float,
                 router_adapters: frozenset[int] = frozenset(), mlp_lr_mult: float = 1.0,
                 expert_adapters: frozenset[int] = frozenset()) -> list[dict]:
    """AdamW groups: decay on matrices, none on vectors (norms, biases, selection bias is a buffer anyway) and
    none on partly frozen expert tensors; the router (and its LoRA adapters, router_adapters) at lr * router_lr_mult,
    every MLP weight (routed experts, shared experts, MLP layers left dense, a dense model's MLP, and their
    adapters; expert_adapters names the routed experts' ones) at lr * mlp_lr_mult.

    The MLP multiplier covers every weight that came from the parent's MLP, so that an MoE and its dense parent
    trained with the same options train the same parts at the same rates (the fair baseline)."""
    router_ids = {id(m.router.weight) for m in layers} | set(router_adapters)
    expert_ids = {id(p) for m in layers for p in m.experts.parameters()} | set(expert_adapters)
    routers, experts, _ = _module_param_names(model, layers)
    mlp_ids = expert_ids | {id(p) for n, p in model.named_parameters()
                            if parameter_role(n, routers, experts) in MLP_GROUPS}
    masked_ids = {id(p) for m in layers if hasattr(m.experts, "_upcycle_expert_mask")
                  for p in m.experts.parameters(recurse=False)}
    groups: dict[tuple[float, float], list] = {}
    for p in model.parameters():
        if not p.requires_grad:
            continue
        g_lr = lr * router_lr_mult if id(p) in router_ids else lr * mlp_lr_mult if id(p) in mlp_ids else lr
        wd = weight_decay if p.dim() >= 2 and id(p) not in masked_ids else 0.0
        groups.setdefault((g_lr, wd), []).append(p)
    return [{"params": ps, "lr": k[0], "weight_decay": k[1]} for k, ps in groups.items()]


def adamw(groups: list[dict], *, lr: float, betas: tuple[float, float], eps: float, device: str = "cpu",
          impl: str = "auto") -> tuple["torch.optim.AdamW", str]:
    """(AdamW over `groups`, the implementation used: "fused", "foreach" or "for-loop").

    auto: torch's fused kernel wherever torch has one for the device (CPU included) and every parameter is a
    floating-point tensor; it reads and writes each parameter and its two moments once per step, where the
    for-loop implementation makes about ten passes (on a 2-core CPU, 100M fp32 parameters: 0.07-0.08 s fused
    against 0.2-0.3 s for-loop and 0.4 s foreach). Otherwise torch's own default (foreach on CUDA). The fused
    kernel computes the same update in a different order of operations: the same within float32 round-off
    (tests/test_optimizer.py); its state dict has the same keys, so a checkpoint of either loads into either.
    """
    import torch
    from torch.utils._foreach_utils import _get_fused_kernels_supported_devices

    if impl not in ("auto", "fused", "foreach", "for-loop"):
        raise ValueError(f"unknown AdamW implementation {impl!r}")
    params = [p for g in groups for p in g["params"]]
    if impl == "auto":
        fusable = device in _get_fused_kernels_supported_devices() and all(p.is_floating_point() for p in params)
        impl = "fused" if fusable else ("foreach" if device == "cuda" else "for-loop")
    kw = {"fused": True} if impl == "fused" else {"foreach": impl == "foreach"}
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, **kw), impl


def global_grad_norm(grads: list) -> "torch.Tensor":
    """The L2 norm of all `grads` together (float32 scalar), as `torch.nn.utils.get_total_norm(grads, 2.0)`.

    For contiguous fp32 CPU gradients it sums BLAS dot products instead: on the 2-core AMD EPYC 692M gradients
    take 0.14 s against 0.24 s (a memory-bound pass at 19 against 11 GB/s), and the result is closer to the
    float64 norm (relative error 6e-5 against 4e-4 there: each dot accumulates in blocks, and the per-tensor sums
    add in float64). Anything else keeps torch's own.
    """
    import torch

    if not all(g.device.type == "cpu" and g.dtype == torch.float32 and g.is_contiguous() for g in grads):
        return torch.nn.utils.get_total_norm(grads, 2.0)
    squares = torch.stack([torch.dot(g.view(-1), g.view(-1)) for g in grads])
    return squares.double().sum().sqrt().float()


def clip_into_fused_adamw(optimizer: "torch.optim.Optimizer", params: list, max_norm: float) -> "torch.Tensor":
    """The global L2 norm of the gradients (before clipping); the clip itself is left to the fused AdamW kernel.

    `torch.nn.utils.clip_grad_norm_` reads every gradient for the norm and then reads and writes every gradient
    again to scale it (even when the factor is 1). The fused kernel takes a divisor for the gradients it reads
    anyway (its `grad_scale` input, which torch's GradScaler uses to unscale fp16 gradients), so the clip costs
    no pass of its own: 692M fp32 gradients are 5.5 GB of memory traffic saved per step. The divisor is
    1 / min(1, max_norm / (norm + 1e-6)), torch's clip factor, and is set for the next `step()` only (`max_norm`
    <= 0: no clip). It is set only when the factor is below 1: with a divisor the CPU kernel also writes the divided
    gradients back (0.07 s per step for 692M on an AVX-512 EPYC), and dividing by 1 changes nothing. That test reads
    the norm on the host, which the training loop does right after anyway. Only for a fused optimizer whose
    parameters hold whole gradients (one process or DDP; FSDP and DeepSpeed shard them and clip through accelerate).
    """
    import torch

    inner = optimizer
    while hasattr(inner, "optimizer") and not isinstance(inner, torch.optim.Optimizer):
        inner = inner.optimizer  # accelerate's AcceleratedOptimizer
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros(())
    norm = global_grad_norm(grads)
    inner.grad_scale = None
    if max_norm > 0:
        coef = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
        if bool(coef < 1.0):
            inner.grad_scale = (1.0 / coef).to(torch.float32)
    return norm


def clear_fused_clip(optimizer: "torch.optim.Optimizer") -> None:
    """Remove the divisor `clip_into_fused_adamw` set (call after the optimizer step)."""
    import torch

    inner = optimizer
    while hasattr(inner, "optimizer") and not isinstance(inner, torch.optim.Optimizer):
        inner = inner.optimizer
    if getattr(inner, "grad_scale", None) is not None:
        inner.grad_scale = None
