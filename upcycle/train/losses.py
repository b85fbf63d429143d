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

Route-target loss (--route-target): the cross-entropy of the router's distribution p (as above) against the
uniform distribution over the target experts S of the layer, -1/|S| sum_{i in S} log p_i, averaged over tokens
and over the layers the target names. It is minimal when p is uniform over S, so S becomes the router's top |S|.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from upcycle.families.moe.routing import (DEAD_ROUTER_ADVICE, MoELayer, RouterRecord, entropy_sum_tensor, expert_counts,
                                  router_probs)

if TYPE_CHECKING:
    import torch

    from upcycle.train.config import ExpertSpec


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


def log_router_probs(layer: MoELayer, logits: "torch.Tensor") -> "torch.Tensor":
    """log of router_probs, computed stably: log_softmax, or for sigmoid routers
    logsigmoid(x_i) - log sum_j sigmoid(x_j)."""
    import torch

    logits = logits.float()
    if layer.scoring == "sigmoid":
        return torch.nn.functional.logsigmoid(logits) - torch.logsumexp(
            torch.nn.functional.logsigmoid(logits), dim=-1, keepdim=True)
    return torch.log_softmax(logits, dim=-1)


def route_target_loss(layers: list[MoELayer], records: dict[int, RouterRecord], target: "ExpertSpec"
                      ) -> tuple["torch.Tensor", "torch.Tensor"]:
    """(loss, share), each the mean over the layers the target names: the cross-entropy toward the target experts
    (module docstring), and the share of tokens whose own top-k holds min(|S|, k) target experts (the router's
    choice before any forcing; 1.0 once steered). Zeros when no recorded layer is targeted."""
    import torch

    losses, shares = [], []
    for m in layers:
        chosen = target.experts_for(m.index)
        rec = records.get(m.index)
        if not chosen or rec is None or rec.logits is None:
            continue
        idx = torch.tensor(chosen, device=rec.logits.device)
        losses.append(-log_router_probs(m, rec.logits).index_select(1, idx).mean())
        with torch.no_grad():
            hits = torch.isin(rec.indices, idx.to(rec.indices.device)).sum(dim=-1)
            shares.append((hits >= min(len(chosen), m.top_k)).float().mean().to(rec.logits.device))
    if not losses:
        return torch.zeros(()), torch.zeros(())
    return torch.stack(losses).mean(), torch.stack(shares).mean()


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
                    self.entropy[j] += entropy_sum_tensor(p)
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


class RouterGradients:
    """The routers' gradient of one optimizer step, split by where it comes from.

    A router's weight W receives gradient only through its logits, and its logits have two consumers: the routing
    weights (so the model's output, the LM loss) and the layer's own load-balancing, z and route-target losses. The
    second part is local and cheap: the router losses' gradient at each layer's own logits, with every logit tensor
    cut from the graph (a [T, E] tensor per layer, from the losses recomputed on detached copies), then back through
    the router's own matmul only. The LM part is the step's total router gradient minus it, exactly (gradients
    add). The LM part so also holds whatever the router losses of later layers send back through the hidden
    states and this layer's routing weights: it is everything that reaches the router through what the router
    does to the model's output.

    Cutting the logits from the graph is also what keeps this cheap: the router losses' gradient at the live
    logits would include those later-layer paths, a second backward through every expert and attention block
    (it was 3.2 s of a 12 s SmolLM2 8 x top-2 step).

    Nothing here writes a .grad or draws a random number, so the training step is unchanged. With gradient
    checkpointing the autograd call re-runs each layer's checkpointed forward once more.
    """

    def __init__(self, layers: list[MoELayer]):
        self.layers = [m for m in layers if m.router.weight.requires_grad]
        self.direct: list = [None] * len(self.layers)

    def add(self, records: dict[int, RouterRecord], router_loss_of) -> None:
        """Before backward, per micro-batch. router_loss_of(records) is the weighted aux + z (+ route-target) term
        exactly as it enters the backward (divided by the gradient accumulation steps); it is called here once more
        on copies of the records whose logits are detached leaves."""
        import dataclasses

        import torch

        cut, pairs = dict(records), []
        for j, m in enumerate(self.layers):
            rec = records.get(m.index)
            if rec is None or rec.logits is None or not rec.logits.requires_grad:
                continue
            leaf = rec.logits.detach().requires_grad_()
            cut[m.index] = dataclasses.replace(rec, logits=leaf)
            pairs.append((j, rec.logits, leaf))
        if not pairs:
            return
        with torch.enable_grad():
            loss = router_loss_of(cut)
        if not loss.requires_grad:
            return
        at_logits = torch.autograd.grad(loss, [leaf for _, _, leaf in pairs], allow_unused=True)
        for (j, lg, _), g in zip(pairs, at_logits):
            if g is None:
                continue
            (w,) = torch.autograd.grad(lg, self.layers[j].router.weight, grad_outputs=g, retain_graph=True)
            w = w.detach().double()
            self.direct[j] = w if self.direct[j] is None else self.direct[j] + w

    def summary(self, reduce_mean=None) -> dict:
        """After backward and before clipping: norms of the total, LM and router-loss parts (all routers
        together). reduce_mean averages a tensor over processes (DDP averages the gradients the same way)."""
        import math

        import torch

        totals = [m.router.weight.grad for m in self.layers]
        if not self.layers or any(t is None for t in totals):
            return {}
        direct = [torch.zeros(t.shape, dtype=torch.float64, device=t.device) if d is None else d.to(t.device)
                  for t, d in zip(totals, self.direct)]
        if reduce_mean is not None:
            flat = reduce_mean(torch.cat([d.reshape(-1) for d in direct]))
            direct = [x.view_as(d) for x, d in zip(flat.split([d.numel() for d in direct]), direct)]
        total = math.sqrt(sum(float(t.double().square().sum()) for t in totals))
        aux = math.sqrt(sum(float(d.square().sum()) for d in direct))
        lm = math.sqrt(sum(float((t.double() - d).square().sum()) for t, d in zip(totals, direct)))
        return {"router_grad_norm": total, "router_grad_norm_lm": lm, "router_grad_norm_aux": aux,
                "router_grad_lm_share": lm / (lm + aux) if lm + aux > 0 else None}


# The dead-router check of the progress line: routers this close to uniform, or with this little LM gradient,
# after this many steps (or at the end of a shorter run) are not learning to route.
ROUTER_CHECK_STEPS = 20
UNIFORM_ENTROPY = 0.98  # mean router entropy / log E above this: near uniform
LM_SHARE_DEAD = 0.01  # LM part / (LM + router-loss parts) below this: the LM loss hardly reaches the routers
LM_NORM_DEAD = 1e-7  # or, with no router losses, an LM router gradient norm below this


def dead_router_warning(rows: list[dict]) -> str | None:
    """One line for the progress display when the routers are not learning, from the last few metrics rows."""
    rows = [r for r in rows if r.get("router_entropy_max")]
    if not rows:
        return None
    ratio = sum(r["router_entropy"] / r["router_entropy_max"] for r in rows) / len(rows)
    shares = [r["router_grad_lm_share"] for r in rows if r.get("router_grad_lm_share") is not None]
    lm_norms = [r["router_grad_norm_lm"] for r in rows if "router_grad_norm_lm" in r]
    share = sum(shares) / len(shares) if shares else None
    lm_norm = max(lm_norms) if lm_norms else None
    uniform = ratio > UNIFORM_ENTROPY
    no_lm = (share is not None and share < LM_SHARE_DEAD) or (share is None and lm_norm is not None
                                                            and lm_norm < LM_NORM_DEAD)
    if not (uniform or no_lm):
        return None
    step = rows[-1]["step"]
    found = []
    if uniform:
        found.append(f"the routers are still near uniform after {step} steps (mean entropy {ratio:.3f} of log E, "
                     f"above {UNIFORM_ENTROPY})")
    if no_lm:
        what = (f"{share:.1%} of their gradient, below {LM_SHARE_DEAD:.0%}" if share is not None
                else f"norm {lm_norm:.1e}")
        found.append(f"the LM loss sends them almost no gradient ({what}; router_grad_* in metrics.jsonl)")
    return "; ".join(found) + ": the experts will not specialise. " + DEAD_ROUTER_ADVICE
