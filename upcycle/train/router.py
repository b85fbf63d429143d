"""The training-time router: fp32 routing maths, jitter noise, capacity factor with token dropping.

Installed per router *instance* (an instance attribute `forward`), never by editing a transformers class, so
the model still saves and loads as its standard class. The patched forward returns what the original returns,
(logits, weights [T, k], indices [T, k]), so the MoE block and whatever experts kernel it uses are unchanged.

Why fp32: transformers' routers compute the logits in the weight dtype, and under bf16 autocast F.linear runs in
bf16. bf16 logits tie between virtual groups for 0.3-0.4% of tokens (docs/background.md, section 2), which splits an
upcycled expert group and breaks the function-preserving start. Here the matmul runs with autocast off on fp32
copies of input and weight.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

from upcycle.core.routing import MoELayer, select_experts

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class RouterControls:
    jitter: float = 0.0  # multiplicative uniform noise 1 +- jitter on the router input, training only (Switch)
    capacity_factor: float | None = None  # None: dropless


def capacity(tokens: int, top_k: int, num_experts: int, factor: float) -> int:
    """Assignments each expert may take: ceil(factor * tokens * k / E) (factor 1: exactly the balanced share)."""
    return max(1, math.ceil(factor * tokens * top_k / num_experts))


def capacity_mask(indices: "torch.Tensor", num_experts: int, cap: int) -> "torch.Tensor":
    """[T, k] bool: which assignments fit in their expert's capacity.

    Priority as in GShard: every token's first choice before any second choice, then token order within a
    choice rank. Deterministic, so a resumed run drops exactly what an uninterrupted one drops.
    """
    import torch

    T, k = indices.shape
    order = indices.t().reshape(-1)  # choice-rank major: all first choices, then all second choices, ...
    onehot = torch.nn.functional.one_hot(order.long(), num_experts)
    position = (onehot.cumsum(dim=0) * onehot).sum(dim=-1)  # 1-based slot of each assignment in its expert
    return (position <= cap).view(k, T).t()


def _make_forward(layer: MoELayer, module, controls: RouterControls):
    import torch
    import torch.nn.functional as F

    hidden = layer.hidden_size
    E = layer.num_experts

    def forward(hidden_states):
        h = hidden_states.reshape(-1, hidden)
        with torch.autocast(device_type=h.device.type, enabled=False):
            x = h.float()
            if module.training and controls.jitter > 0:
                x = x * torch.empty_like(x).uniform_(1.0 - controls.jitter, 1.0 + controls.jitter)
            logits = F.linear(x, module.weight.float())
            bias = getattr(module, "e_score_correction_bias", None)
            weights, indices = select_experts(layer, logits, bias)
        if module.training and controls.capacity_factor is not None:
            kept = capacity_mask(indices, E, capacity(h.shape[0], layer.top_k, E, controls.capacity_factor))
            # RoutingRecorder reads the pre-drop choice from here (aux loss and load statistics use it)
            module._upcycle_last = (indices, kept)
            # The sentinel E marks a dropped assignment: the eager and upcycle kernels skip it, grouped_mm and
            # batched_mm do only with the experts module's expert-parallel flag on (RouterPatch sets it); the
            # zero weight keeps the result right for any kernel that computes it anyway.
            weights = weights * kept
            indices = indices.masked_fill(~kept, E)
        return logits, weights.to(hidden_states.dtype), indices

    return forward


class RouterPatch:
    """Install the training router on every MoE layer; `remove()` restores the class forward."""

    def __init__(self, layers: list[MoELayer], controls: RouterControls):
        self.layers, self.controls = layers, controls
        for m in layers:
            m.router.forward = _make_forward(m, m.router, controls)
            if controls.capacity_factor is not None and hasattr(m.experts, "_is_expert_parallel"):
                # transformers' grouped_mm and batched_mm treat indices >= E as dropped only under this flag (it
                # gates nothing else); without it grouped_mm reads uninitialised rows for them (NaN * 0 can reach
                # the output and the input gradient) and batched_mm indexes out of bounds.
                m.experts._upcycle_expert_parallel = m.experts._is_expert_parallel
                m.experts._is_expert_parallel = True
            # mixtral's block has its own jitter, applied to the hidden states (experts input too); ours replaces it
            if getattr(m.block, "jitter_noise", 0):
                m.block._upcycle_jitter_noise = m.block.jitter_noise
                m.block.jitter_noise = 0.0

    def remove(self) -> None:
        for m in self.layers:
            if "forward" in vars(m.router):
                del m.router.forward
            m.router.__dict__.pop("_upcycle_last", None)
            if hasattr(m.experts, "_upcycle_expert_parallel"):
                m.experts._is_expert_parallel = m.experts._upcycle_expert_parallel
                del m.experts._upcycle_expert_parallel
            if hasattr(m.block, "_upcycle_jitter_noise"):
                m.block.jitter_noise = m.block._upcycle_jitter_noise
                del m.block._upcycle_jitter_noise


def update_selection_bias(layers: list[MoELayer], counts: "torch.Tensor", rate: float) -> None:
    """Aux-loss-free balancing (DeepSeek-V3): nudge each expert's selection bias by +-rate towards equal load.

    counts: [L, E] assignments per expert this step, summed over micro-batches and processes, so every process
    applies the same update. An expert with exactly the mean load is left alone (sign 0).
    """
    import torch

    with torch.no_grad():
        for m, c in zip(layers, counts):
            bias = getattr(m.router, "e_score_correction_bias", None)  # the live buffer: .to(device) replaces it
            if bias is None:
                continue
            c = c.to(bias.device, torch.float32)
            bias.add_(rate * torch.sign(c.mean() - c).to(bias.dtype))
