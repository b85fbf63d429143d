"""Routing diagnostics of one MoE layer, accumulated batch by batch from router logits and chosen experts.

Definitions (all over the held-out tokens; an "assignment" is one (token, chosen expert) pair, k per token):

- load[e]: share of assignments that went to expert e (sums to 1; uniform is 1/E).
- cv: population standard deviation of load divided by its mean (0 = perfectly balanced).
- max_over_min: largest load / smallest load (None when an expert got nothing: a dead expert).
- entropy: mean over tokens of the entropy (nats) of the router's distribution over all experts; normalised
  by log E in entropy_norm (1 = the router cannot tell experts apart, 0 = always certain).
- load_entropy_norm: entropy of `load` itself over log E (1 = balanced, 0 = everything on one expert).
- mean_prob[e], balance_loss: the Switch load-balancing term E * sum_e load[e] * mean_prob[e] (1.0 when balanced).
- drop_at[cf]: share of assignments a token-dropping implementation with capacity factor cf would drop, with
  capacity = ceil(cf * tokens_in_sequence * k / E) per expert and each sequence (block) routed on its own.
- pairs[i][j]: share of tokens that chose both i and j (the diagonal: share of tokens that chose i);
  lift = pairs[i][j] / (pairs[i][i] * pairs[j][j]) compares that with independent choices; jaccard =
  pairs[i][j] / (pairs[i][i] + pairs[j][j] - pairs[i][j]) is 1.0 for experts that are always chosen together
  (the virtual groups of a fine-grained conversion, until training pulls them apart).

The router's distribution depends on the model type's scoring: softmax (mixtral, qwen2_moe, top-k-then-softmax
granitemoe: softmax over all experts) or sigmoid (glm4_moe, dots1: sigmoid scores normalised to sum 1).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from upcycle.families.moe.routing import entropy_sum, scoring_probs

CAPACITY_FACTORS = (1.0, 1.25)


@dataclass
class LayerRouting:
    layer: int
    num_experts: int
    top_k: int
    tokens: int
    load: list[float]
    cv: float
    max_load: float
    min_load: float
    max_over_min: float | None
    dead_experts: list[int]
    entropy: float | None
    entropy_norm: float | None
    load_entropy_norm: float
    mean_prob: list[float] | None
    balance_loss: float | None
    drop_at: dict[str, float]
    pairs: list[list[float]]
    top_pairs: list[dict] = field(default_factory=list)
    always_together: list[list[int]] = field(default_factory=list)  # pairs with jaccard >= 0.99

    def to_json(self) -> dict:
        from dataclasses import asdict

        return asdict(self)


class RoutingAccumulator:
    """Running sums for one layer; update() per forward, result() at the end. Memory is O(E^2), not O(tokens)."""

    def __init__(self, layer: int, num_experts: int, top_k: int, scoring: str = "softmax"):
        self.layer, self.E, self.k, self.scoring = layer, num_experts, top_k, scoring
        self.tokens = 0
        self.counts = torch.zeros(num_experts, dtype=torch.float64)
        self.pair_counts = torch.zeros(num_experts, num_experts, dtype=torch.float64)
        self.prob_sum = torch.zeros(num_experts, dtype=torch.float64)
        self.entropy_sum = 0.0
        self.has_logits = True
        self.dropped = {cf: 0.0 for cf in CAPACITY_FACTORS}

    def update(self, indices: torch.Tensor, logits: torch.Tensor | None = None, *, seq_len: int | None = None) -> None:
        """indices [T, k] chosen experts; logits [T, E] (optional); seq_len: tokens per sequence, to split T into
        the sequences that capacity is computed for (default: all T tokens are one sequence)."""
        idx = indices.reshape(-1, indices.shape[-1]).long()
        T, k = idx.shape
        if T == 0:
            return
        E = self.E
        mask = torch.zeros(T, E, dtype=torch.float64)
        # scatter_ (not add): a token lists an expert at most once
        mask.scatter_(1, idx, 1.0)
        self.tokens += T
        self.counts += mask.sum(0)
        self.pair_counts += mask.T @ mask
        L = seq_len or T
        if T % L:
            raise ValueError(f"{T} routed tokens do not split into sequences of {L}")
        per_seq = mask.view(T // L, L, E).sum(1)  # [sequences, E] assignments per expert
        for cf in CAPACITY_FACTORS:
            cap = math.ceil(cf * L * k / E)
            self.dropped[cf] += float((per_seq - cap).clamp_min(0).sum())
        if logits is None:
            self.has_logits = False
            return
        p = scoring_probs(logits.reshape(-1, logits.shape[-1]), self.scoring).double()
        self.prob_sum += p.sum(0)
        self.entropy_sum += entropy_sum(p)

    def result(self) -> LayerRouting:
        E, k, T = self.E, self.k, self.tokens
        if T == 0:
            raise ValueError(f"layer {self.layer}: no tokens were routed")
        assignments = float(self.counts.sum())
        load = self.counts / assignments
        mean = 1.0 / E
        cv = float(load.std(unbiased=False) / mean)
        mx, mn = float(load.max()), float(load.min())
        dead = [i for i in range(E) if self.counts[i] == 0]
        load_entropy = entropy_sum(load)
        logE = math.log(E) if E > 1 else 1.0
        entropy = entropy_norm = balance = None
        mean_prob = None
        if self.has_logits:
            entropy = self.entropy_sum / T
            entropy_norm = entropy / logE
            mp = self.prob_sum / T
            mean_prob = mp.tolist()
            balance = float(E * (load * mp).sum())
        pairs = (self.pair_counts / T)
        diag = torch.diagonal(pairs)
        top, together = [], []
        for i in range(E):
            for j in range(i + 1, E):
                f = float(pairs[i, j])
                if f > 0:
                    lift = f / float(diag[i] * diag[j])
                    jaccard = f / float(diag[i] + diag[j] - f)
                    top.append({"experts": [i, j], "share": f, "lift": lift, "jaccard": jaccard})
                    if jaccard >= 0.99:
                        together.append([i, j])
        top.sort(key=lambda d: (-d["share"], d["experts"]))
        return LayerRouting(
            layer=self.layer, num_experts=E, top_k=k, tokens=T, load=load.tolist(), cv=cv, max_load=mx, min_load=mn,
            max_over_min=(mx / mn) if mn > 0 else None, dead_experts=dead, entropy=entropy, entropy_norm=entropy_norm,
            load_entropy_norm=load_entropy / logE, mean_prob=mean_prob, balance_loss=balance,
            drop_at={f"{cf:g}": self.dropped[cf] / assignments for cf in CAPACITY_FACTORS},
            pairs=pairs.tolist(), top_pairs=top[:5], always_together=together,
        )
