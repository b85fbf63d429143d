"""The training-time router: fp32 routing maths, jitter noise, capacity factor with token dropping, forced routing.

Installed per router *instance* (an instance attribute `forward`), never by editing a transformers class, so
the model still saves and loads as its standard class. The patched forward returns what the original returns,
(logits, weights [T, k], indices [T, k]), so the MoE block and whatever experts kernel it uses are unchanged.

Why fp32: transformers' routers compute the logits in the weight dtype, and under bf16 autocast F.linear runs in
bf16. bf16 logits tie between virtual groups for 0.3-0.4% of tokens (docs/background.md, section 2), which splits an
upcycled expert group and breaks the function-preserving start. Here the matmul runs with autocast off on fp32
copies of input and weight.

Forced routing (--force-route) replaces the choice, not the weights' rule: see `forced_selection`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

from upcycle.families.moe.routing import MoELayer, select_experts
from upcycle.train.config import ExpertSpec

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class RouterControls:
    jitter: float = 0.0  # multiplicative uniform noise 1 +- jitter on the router input, training only (Switch)
    capacity_factor: float | None = None  # None: dropless
    force: ExpertSpec | None = None  # --force-route: these experts take every token, training only


def routing_weights(layer: MoELayer, logits: "torch.Tensor", indices: "torch.Tensor") -> "torch.Tensor":
    """[T, k] fp32 weights of the experts `indices` [T, k] by the layer's own rule, as `select_experts` weighs its
    own choice: softmax probabilities of the chosen (divided by their sum with norm_topk_prob), softmax over the
    chosen logits (granite), or the chosen sigmoid scores (divided by their sum with norm_topk_prob) times
    routed_scaling_factor. The selection bias never enters the weights."""
    import torch

    logits = logits.float()
    if layer.scoring == "softmax":
        w = torch.softmax(logits, dim=-1).gather(1, indices)
        return w / w.sum(dim=-1, keepdim=True) if layer.norm_topk_prob else w
    if layer.scoring == "topk_softmax":
        return torch.softmax(logits.gather(1, indices), dim=-1)
    w = logits.sigmoid().gather(1, indices)
    if layer.norm_topk_prob:
        w = w / (w.sum(dim=-1, keepdim=True) + 1e-20)
    return w * layer.scale


def forced_selection(layer: MoELayer, logits: "torch.Tensor", bias: "torch.Tensor | None",
                     forced: "torch.Tensor") -> tuple["torch.Tensor", "torch.Tensor"]:
    """(weights [T, k], indices [T, k]) when every token must go to the experts `forced` (a 1-D index tensor).

    With k or more forced experts, each token takes the k of them its router ranks highest. With fewer, every
    token takes all of them, and the remaining k - s slots go to the router's own best among the other experts
    (ranked by what the router selects on: its logits, or for sigmoid routers score + selection bias; no group
    limit), so the block still computes k experts and the forced ones learn in the company the router gives
    them. The weights follow the layer's own rule on that set (`routing_weights`): where the router already
    chose the forced experts, nothing changes, and a trained router still gets its gradient through them."""
    import torch

    logits = logits.float()
    k = layer.top_k
    if layer.scoring == "sigmoid":
        choice = logits.sigmoid()
        if bias is not None:
            choice = choice + bias.float()
    else:
        choice = logits  # softmax and granite's softmax over the top-k rank experts by their logits
    forced = forced.to(logits.device)
    s = forced.numel()
    if s >= k:
        indices = forced[choice.index_select(1, forced).topk(k, dim=-1).indices]
    else:
        others = choice.index_fill(1, forced, float("-inf")).topk(k - s, dim=-1).indices
        indices = torch.cat([forced.expand(logits.shape[0], s), others], dim=-1)
    return routing_weights(layer, logits, indices), indices


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
    chosen = controls.force.experts_for(layer.index) if controls.force else None
    forced = torch.tensor(chosen, dtype=torch.long) if chosen else None

    def forward(hidden_states):
        h = hidden_states.reshape(-1, hidden)
        with torch.autocast(device_type=h.device.type, enabled=False):
            x = h.float()
            if module.training and controls.jitter > 0:
                x = x * torch.empty_like(x).uniform_(1.0 - controls.jitter, 1.0 + controls.jitter)
            logits = F.linear(x, module.weight.float())
            bias = getattr(module, "e_score_correction_bias", None)
            weights, indices = select_experts(layer, logits, bias)
            if forced is not None and module.training:
                # the router's own choice is what the recorder sees (aux loss, load statistics, route target)
                module._upcycle_last = (indices, None)
                weights, indices = forced_selection(layer, logits, bias, forced)
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
