"""Which layers of a transformers model are Mixture-of-Experts, how their routers choose, and what they chose.

Shared by training (losses, routing controls, metrics) and evaluation (diagnostics). Nothing here modifies a
transformers class: `moe_layers` only looks, `RoutingRecorder` only listens (forward hooks), and the fp32 routing
maths in `select_experts` is a plain function that the training-time router (upcycle.train.router) calls.

Scoring families (each MoE type's `scoring` in upcycle.families.moe):

- "softmax": softmax over all experts in fp32, then top-k (mixtral always renormalises the k weights; qwen2_moe,
  qwen3_moe and flex_olmo when norm_topk_prob).
- "sigmoid": sigmoid scores; the selection adds e_score_correction_bias and is group-limited (n_group,
  topk_group); the weights are the un-biased scores, optionally renormalised, times routed_scaling_factor
  (glm4_moe, dots1; DeepSeek-V3 style).
- "topk_softmax": top-k of the raw logits, then softmax over those k (granitemoe, granitemoeshared).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from upcycle.families.moe import MOE_TYPES, moe_type

if TYPE_CHECKING:
    import torch
    from torch import nn

SUPPORTED_MOE = tuple(MOE_TYPES)


# What to do about routers that do not learn: said by train's dead-router warning and eval's router verdict.
DEAD_ROUTER_ADVICE = ("Convert with a router that sends different tokens to different copies (upcycle convert's "
                      "default k-means router, or --router-init kmeans:TEXT on your data) and/or break the symmetry "
                      "between the copies (--expert-init noise:STD or a small drop:R; drop:0.5 cost SmolLM2 over 4 "
                      "nats of held-out loss at 0.05M tokens); see docs/study.md")


@dataclass
class MoELayer:
    index: int  # decoder layer index
    block: "nn.Module"  # the sparse MoE block (e.g. model.model.layers[i].mlp)
    router: "nn.Module"  # its router/gate module (weight (E, H))
    experts: "nn.Module"  # the fused experts module (gate_up_proj (E, 2I, H), down_proj (E, H, I))
    num_experts: int
    top_k: int
    scoring: str  # "softmax" | "sigmoid" | "topk_softmax"
    selection_bias: "torch.Tensor | None"  # e_score_correction_bias where the format has it
    norm_topk_prob: bool = True  # renormalise the k chosen weights to sum to 1
    n_group: int = 1  # sigmoid scoring: expert groups, of which topk_group are eligible per token
    topk_group: int = 1
    scale: float = 1.0  # routed_scaling_factor (sigmoid scoring)

    @property
    def hidden_size(self) -> int:
        return int(self.router.weight.shape[1])


def _decoder_layers(model) -> list:
    base = getattr(model, "model", None) or getattr(model, "base_model", None) or model
    layers = getattr(base, "layers", None)
    return list(layers) if layers is not None else []


def _scoring(model_type: str, router) -> str:
    known = moe_type(model_type)
    if known is not None:
        return known.scoring
    # An MoE type this table does not name: recognise the router family by what it holds.
    if hasattr(router, "e_score_correction_bias"):
        return "sigmoid"
    if "granite" in type(router).__name__.lower():
        return "topk_softmax"
    return "softmax"


def moe_layers(model) -> list[MoELayer]:
    """The sparse MoE blocks of a transformers causal LM, in layer order; [] for a dense model.

    A block is recognised structurally (a router with a (E, H) weight next to a fused experts module), so dense
    layers of a partly-MoE model (qwen2_moe mlp_only_layers, glm4_moe first_k_dense_replace) are skipped.
    """
    model_type = getattr(getattr(model, "config", None), "model_type", "")
    found = []
    for i, layer in enumerate(_decoder_layers(model)):
        block = getattr(layer, "mlp", None)
        if block is None or not hasattr(block, "experts"):
            block = getattr(layer, "block_sparse_moe", block)
        if block is None:
            continue
        experts = getattr(block, "experts", None)
        router = getattr(block, "gate", None)
        if router is None or not hasattr(router, "weight"):
            router = getattr(block, "router", None)
        if experts is None or router is None or not hasattr(experts, "gate_up_proj"):
            continue
        weight = getattr(router, "weight", None)
        if weight is None or weight.dim() != 2:
            continue
        num_experts = int(weight.shape[0])
        scoring = _scoring(model_type, router)
        top_k = int(getattr(router, "top_k", None) or getattr(block, "top_k", None) or model.config.num_experts_per_tok)
        found.append(MoELayer(
            index=i, block=block, router=router, experts=experts, num_experts=num_experts, top_k=top_k,
            scoring=scoring,
            selection_bias=getattr(router, "e_score_correction_bias", None),
            # mixtral and granite have no flag: mixtral always renormalises, granite's softmax over k sums to 1
            norm_topk_prob=bool(getattr(router, "norm_topk_prob", True)),
            n_group=int(getattr(router, "num_group", 1) or 1),
            topk_group=int(getattr(router, "topk_group", 1) or 1),
            scale=float(getattr(router, "routed_scaling_factor", 1.0) or 1.0),
        ))
    return found


# ----------------------------------------------------------------------------------------------- routing maths

def scoring_probs(logits: "torch.Tensor", scoring: str) -> "torch.Tensor":
    """Per-token probabilities over all experts (fp32, rows sum to 1) of a router with this scoring rule: the P
    of the load-balancing loss and the distribution whose entropy the diagnostics report.

    softmax and topk_softmax: softmax of the logits. sigmoid: the sigmoid scores normalised per token, as in
    DeepSeek-V3's balance loss (the sum is clamped, not shifted, so normal rows are exactly normalised).
    """
    import torch

    logits = logits.float()
    if scoring == "sigmoid":
        s = torch.sigmoid(logits)
        return s / s.sum(dim=-1, keepdim=True).clamp_min(1e-30)
    return torch.softmax(logits, dim=-1)


def router_probs(layer: MoELayer, logits: "torch.Tensor") -> "torch.Tensor":
    """scoring_probs with the layer's scoring rule."""
    return scoring_probs(logits, layer.scoring)


def entropy_sum(probs: "torch.Tensor") -> float:
    """Sum over rows of the entropy (nats) of each row's distribution; 0 log 0 counts as 0."""
    return float(entropy_sum_tensor(probs))


def entropy_sum_tensor(probs: "torch.Tensor") -> "torch.Tensor":
    """entropy_sum as a 0-d tensor on the probabilities' device: no host sync (the training loop's per-step stats)."""
    import torch

    return -torch.special.xlogy(probs, probs).sum()


def select_experts(layer: MoELayer, logits: "torch.Tensor", bias: "torch.Tensor | None" = None
                   ) -> tuple["torch.Tensor", "torch.Tensor"]:
    """(weights [T, k] fp32, indices [T, k]) from fp32 router logits [T, E], exactly as the transformers router
    of the layer's type computes them in fp32. `bias` (sigmoid scoring) shifts the selection, not the weights."""
    import torch

    if logits.dtype != torch.float64:  # float64 stays float64: conversion checks run the same maths exactly
        logits = logits.float()
    k = layer.top_k
    if layer.scoring == "softmax":
        probs = torch.softmax(logits, dim=-1)
        weights, indices = torch.topk(probs, k, dim=-1)
        if layer.norm_topk_prob:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return weights, indices
    if layer.scoring == "topk_softmax":
        top, indices = logits.topk(k, dim=-1)
        return torch.softmax(top, dim=-1), indices
    if layer.scoring != "sigmoid":
        raise ValueError(f"unknown scoring {layer.scoring!r}")
    scores = logits.sigmoid()
    choice = scores + bias if bias is not None else scores
    E, G = layer.num_experts, layer.n_group
    if G > 1:
        # group score = sum of the two best (biased) scores of the group, as DeepSeek-V3 and transformers do
        group_scores = choice.view(-1, G, E // G).topk(2, dim=-1)[0].sum(dim=-1)
        group_idx = torch.topk(group_scores, k=layer.topk_group, dim=-1, sorted=False)[1]
        group_mask = torch.zeros_like(group_scores).scatter_(1, group_idx, 1)
        score_mask = group_mask.unsqueeze(-1).expand(-1, G, E // G).reshape(-1, E)
        choice = choice.masked_fill(~score_mask.bool(), float("-inf"))
    indices = torch.topk(choice, k=k, dim=-1, sorted=False)[1]
    weights = scores.gather(1, indices)
    if layer.norm_topk_prob:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
    return weights * layer.scale, indices


# -------------------------------------------------------------------------------------------------- recording

@dataclass
class RouterRecord:
    """What one MoE layer routed in one forward pass (tokens flattened over batch and sequence)."""

    layer: int
    indices: "torch.Tensor"  # [T, k] chosen experts, before any capacity dropping
    logits: "torch.Tensor | None" = None  # [T, E] fp32 router logits (None with keep_logits=False)
    kept: "torch.Tensor | None" = None  # [T, k] bool: the assignment was computed (None: dropless, all kept)
    prob_sum: "torch.Tensor | None" = None  # [E] sum over tokens of router_probs (keep_logits=False)
    entropy_sum: float = 0.0  # sum over tokens of the entropy of router_probs, in nats (keep_logits=False)

    @property
    def tokens(self) -> int:
        return int(self.indices.shape[0])


def _cat(records: list[RouterRecord]) -> RouterRecord:
    import torch

    if len(records) == 1:
        return records[0]
    first = records[0]
    kept = None
    if any(r.kept is not None for r in records):
        kept = torch.cat([r.kept if r.kept is not None else torch.ones_like(r.indices, dtype=torch.bool)
                          for r in records])
    return RouterRecord(
        layer=first.layer,
        indices=torch.cat([r.indices for r in records]),
        logits=torch.cat([r.logits for r in records]) if first.logits is not None else None,
        kept=kept,
        prob_sum=sum(r.prob_sum for r in records) if first.prob_sum is not None else None,
        entropy_sum=sum(r.entropy_sum for r in records),
    )


class RoutingRecorder:
    """Context manager that records, for every forward pass of `model`, each MoE layer's routing.

    with RoutingRecorder(model) as rec:
        model(ids)
        got = rec.drain()   # {layer index: RouterRecord}, records of all forwards since the last drain

    It listens with forward hooks on the router modules and never changes what the model computes. With
    keep_logits=False only the chosen indices and per-expert probability / entropy sums are kept (memory
    O(T*k) instead of O(T*E)). With detach=False the logits keep their autograd graph (training losses);
    `pause()` stops recording, e.g. while activation checkpointing re-runs forwards inside backward.
    """

    def __init__(self, model, *, keep_logits: bool = True, detach: bool = True, layers: list[MoELayer] | None = None):
        self.layers = moe_layers(model) if layers is None else layers
        self.keep_logits, self.detach = keep_logits, detach
        self.records: dict[int, list[RouterRecord]] = {m.index: [] for m in self.layers}
        self._handles: list = []
        self.enabled = True

    def __enter__(self) -> "RoutingRecorder":
        for m in self.layers:
            self._handles.append(m.router.register_forward_hook(self._hook(m)))
        return self

    def __exit__(self, *exc) -> bool:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        return False

    def _hook(self, layer: MoELayer):
        import torch

        def hook(module, args, output):
            if not self.enabled:
                return
            logits, _, indices = output
            # A router patched by upcycle.train.router leaves its pre-capacity choice and kept mask here;
            # its returned indices carry dropped assignments as the sentinel E (skipped by the experts).
            extra = getattr(module, "_upcycle_last", None)
            kept = None
            if extra is not None:
                indices, kept = extra
                module._upcycle_last = None
            logits = logits.float()
            if self.detach:
                logits = logits.detach()
                indices = indices.detach()
            rec = RouterRecord(layer.index, indices, kept=kept)
            if self.keep_logits:
                rec.logits = logits
            else:
                with torch.no_grad():
                    p = router_probs(layer, logits)
                    rec.prob_sum = p.sum(dim=0)
                    rec.entropy_sum = entropy_sum(p)
            self.records[layer.index].append(rec)

        return hook

    def drain(self) -> dict[int, RouterRecord]:
        """{layer index: RouterRecord of all forwards recorded since the last drain, tokens concatenated}."""
        out = {i: _cat(recs) for i, recs in self.records.items() if recs}
        for recs in self.records.values():
            recs.clear()
        return out

    def clear(self) -> None:
        for recs in self.records.values():
            recs.clear()

    class _Paused:
        def __init__(self, rec):
            self.rec = rec

        def __enter__(self):
            self.prev, self.rec.enabled = self.rec.enabled, False

        def __exit__(self, *exc):
            self.rec.enabled = self.prev
            return False

    def pause(self) -> "RoutingRecorder._Paused":
        return RoutingRecorder._Paused(self)


def expert_counts(rec: RouterRecord, num_experts: int, *, kept_only: bool = False) -> "torch.Tensor":
    """Assignments per expert [E] (float) of a record: all chosen, or only those computed (kept_only)."""
    import torch

    idx = rec.indices
    if kept_only and rec.kept is not None:
        idx = idx[rec.kept]
    return torch.bincount(idx.reshape(-1).long(), minlength=num_experts)[:num_experts].float()

