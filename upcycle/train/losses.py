"""Router losses and routing statistics, computed from what RoutingRecorder saw in one forward pass.

Load-balancing loss (Switch Transformer, generalised to top-k): for each MoE layer
    aux = E * sum_i f_i * P_i
with f_i the fraction of the T*k assignments that chose expert i (before any capacity dropping, so that the
loss sees the router's intent) and P_i the mean router probability of expert i (softmax of the logits; for
sigmoid routers the per-token normalised sigmoid scores, as DeepSeek-V3). It is 1 at perfect balance for any
k and E and grows to E/k when every token goes to the same k experts. Layers are averaged, not summed, so the
coefficient does not depend on depth. Each process balances its own tokens (micro-batch balancing, as in
Switch and Megatron); the statistics in the metrics are reduced over all processes.

Router z-loss (ST-MoE): mean over tokens of logsumexp(logits)^2, averaged over layers.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from upcycle.core.routing import MoELayer, RouterRecord, expert_counts, router_probs

if TYPE_CHECKING:
    import torch


def load_balancing_loss(layer: MoELayer, rec: RouterRecord) -> "torch.Tensor":
    E, k = layer.num_experts, layer.top_k
    P = router_probs(layer, rec.logits).mean(dim=0)
    f = expert_counts(rec, E) / (rec.tokens * k)
    return E * (f.to(P.device) * P).sum()


def z_loss(rec: RouterRecord) -> "torch.Tensor":
    import torch

    return torch.logsumexp(rec.logits.float(), dim=-1).square().mean()


def router_losses(layers: list[MoELayer], records: dict[int, RouterRecord]) -> tuple["torch.Tensor", "torch.Tensor"]:
    """(aux, z), each the mean over the MoE layers of this forward; zeros for a dense model."""
    import torch

    aux, z = [], []
    for m in layers:
        rec = records.get(m.index)
        if rec is None or rec.logits is None:
            continue
        aux.append(load_balancing_loss(m, rec))
        z.append(z_loss(rec))
    if not aux:
        return torch.zeros(()), torch.zeros(())
    return torch.stack(aux).mean(), torch.stack(z).mean()


class RoutingStats:
    """Per-step routing statistics, summed over micro-batches; `tensor()` packs them for one all-reduce.

    `update` only queues tensor operations on the records' device (no `float()`, `.cpu()` or `.item()`), so on
    an accelerator the step never waits for them; the loop reads everything back once per optimizer step, in
    the same transfer as the losses.
    """

    def __init__(self, layers: list[MoELayer]):
        import torch

        self.layers = layers
        E = max((m.num_experts for m in layers), default=1)
        L = len(layers)
        self.counts = torch.zeros(L, E, dtype=torch.float64)  # assignments chosen, before dropping
        self.dropped = torch.zeros(L, dtype=torch.float64)
        self.entropy = torch.zeros(L, dtype=torch.float64)  # sum over tokens, nats
        self.tokens = torch.zeros(L, dtype=torch.float64)

    def _to(self, device) -> None:
        import torch

        if self.counts.device != device:  # once per step: accumulate where the records are
            dtype = torch.float32 if device.type == "mps" else torch.float64  # mps has no float64
            for name in ("counts", "dropped", "entropy", "tokens"):
                setattr(self, name, getattr(self, name).to(device, dtype))

    def update(self, records: dict[int, RouterRecord]) -> None:
        import torch

        with torch.no_grad():
            for j, m in enumerate(self.layers):
                rec = records.get(m.index)
                if rec is None:
                    continue
                self._to(rec.indices.device)
                self.counts[j, : m.num_experts] += expert_counts(rec, m.num_experts)
                if rec.kept is not None:
                    self.dropped[j] += (~rec.kept).sum()
                if rec.logits is not None:
                    p = router_probs(m, rec.logits.detach())
                    self.entropy[j] += -(p * torch.log(p.clamp_min(1e-30))).sum()
                else:
                    self.entropy[j] += rec.entropy_sum
                self.tokens[j] += rec.tokens

    def tensor(self) -> "torch.Tensor":
        import torch

        return torch.cat([self.counts.reshape(-1), self.dropped, self.entropy, self.tokens])

    def load_tensor(self, packed: "torch.Tensor") -> None:
        L, E = self.counts.shape
        n = L * E
        self.counts = packed[:n].reshape(L, E).double().cpu()
        self.dropped = packed[n:n + L].double().cpu()
        self.entropy = packed[n + L:n + 2 * L].double().cpu()
        self.tokens = packed[n + 2 * L:n + 3 * L].double().cpu()

    def summary(self) -> dict:
        """Metrics of the step: mean and per-layer coefficient of variation of expert load, max/mean imbalance,
        dropped-token fraction, router entropy (nats) and per-layer load fractions."""
        import math

        import torch

        if not self.layers:
            return {}
        self._to(torch.device("cpu"))
        cvs, imbalance, entropy, drop, loads = [], [], [], [], {}
        for j, m in enumerate(self.layers):
            c = self.counts[j, : m.num_experts]
            total = float(c.sum())
            mean = total / m.num_experts
            if total == 0:
                continue
            std = float(((c - mean) ** 2).mean().sqrt())
            cvs.append(std / mean)
            imbalance.append(float(c.max()) / mean)
            entropy.append(float(self.entropy[j]) / max(1.0, float(self.tokens[j])))
            drop.append(float(self.dropped[j]) / total)
            loads[str(m.index)] = [round(float(x) / total, 6) for x in c]
        if not cvs:
            return {}
        n = len(cvs)
        return {
            "load_cv": sum(cvs) / n,
            "load_imbalance": max(imbalance),
            "dropped_frac": sum(drop) / n,
            "router_entropy": sum(entropy) / n,
            "router_entropy_max": math.log(max(m.num_experts for m in self.layers)),
            "layer_load_cv": [round(x, 6) for x in cvs],
            "layer_dropped_frac": [round(x, 6) for x in drop],
            "layer_router_entropy": [round(x, 6) for x in entropy],
            "expert_load": loads,
        }
