"""Grouping the MLP's neurons into experts, and the router of a partition (LLaMA-MoE, MoEfication).

A partition (MoEShape.partition) cuts one copy of each MoE layer's MLP into E experts of I/G neurons and lets a
token run k < E of them: the parameters stay, the MLP's FLOPs per token drop to (k + S)/G of the parent's, and the
start is not the parent's function (what the skipped experts would add is lost). Which neurons go together decides
how much is lost, and so does whether the router picks the experts that matter for each token. Both are decided
here, per MoE layer, before any expert is written (the plan's layouts need the neurons):

* slice order (--slice-order): `contiguous` and `random` as for exact fine-grained recipes; `cluster`: balanced
  spherical k-means of each neuron's gate_proj row (LLaMA-MoE's clustering split: neurons that read similar input
  directions go together); `coactivation`: balanced spherical k-means of each neuron's |activation| over the tokens
  of a sample text (MoEfication: neurons that fire on the same tokens go together, so a token's activation is
  concentrated in few experts). Balanced: every group holds exactly I/G neurons, so every MoE type can hold it.
* shared experts of a partition (--shared-experts S): the S*I/G most used neurons on the sample (the mean |activation|
  times the norm of the neuron's down_proj column, i.e. the size of what it adds to the output), always on, as
  LLaMA-MoE v2 and DeepSeekMoE keep their most used neurons shared; the rest are grouped as above.
* the router of a partition (--router-init fit, its default): on the sample, each routed expert's share of each
  token's MLP output is the norm of what its neurons add. The router rows are the ridge least-squares fit of the
  centred log of those norms on the parent's hidden states (the MLP's inputs), so the router's top-k predicts the
  experts that carry the most of each token's output (MoEfication trains a router to predict the most active
  clusters; the closed form here needs no training). The fitted logits are then scaled by the factor in LOGIT_SCALES
  that makes the MoE block closest to the parent's MLP on the sample, under the output type's own routing rule: a
  partition counts each chosen expert once at a tie (MoEShape.routed_scale), and the closest start on SmolLM2 is
  near-equal weights among the chosen, so the scale is small; it never goes below the smallest factor so that the
  fitted ranking is not undone by the first optimiser steps.

Clustering runs on `--seed` (k-means++ seeding from a generator keyed by seed and layer): the same seed gives the
same groups, byte for byte. The sample is the k-means router's (upcycle.convert.router_init: --router-init fit:TEXT,
or a built-in sample of standard library sources), run through the parent one decoder layer at a time.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from upcycle.core.errors import InputError
from upcycle.core.events import SILENT, Events
from upcycle.core.neurons import most_used, neuron_use

ITERATIONS = 30  # balanced k-means rounds (it stops earlier when no neuron changes group)
# Factors on the least-squares logits tried for the router's scale, largest first; see the module docstring
LOGIT_SCALES = (1.0, 0.5, 0.25, 0.125, 0.0625)
SCALE_TOKENS = 512  # sample tokens the scale is chosen on: E x T x H float32 of expert outputs stay small
RIDGE = 1e-3  # ridge term, relative to the mean diagonal of X^T X
_CLUSTER = 5  # purpose key for the seeded generators (upcycle.convert.weights keeps 1..4)


# ------------------------------------------------------------------------------------------------ balanced k-means

def _assign_balanced(sim: np.ndarray, capacity: int) -> np.ndarray:
    """Labels (n,) with exactly `capacity` points per cluster, each point as close to its most similar cluster as
    the capacities allow: in rounds, every unplaced point asks for the most similar cluster that still has room, and
    each cluster takes the most similar of those who asked, up to its room. At most k rounds."""
    n, k = sim.shape
    labels = np.full(n, -1, dtype=np.int64)
    room = np.full(k, capacity, dtype=np.int64)
    while True:
        free = np.flatnonzero(labels < 0)
        if not free.size:
            return labels
        s = sim[free].copy()
        s[:, room == 0] = -np.inf
        want = s.argmax(axis=1)
        score = s[np.arange(free.size), want]
        order = np.lexsort((-score, want))  # by cluster, then most similar first
        w = want[order]
        rank = np.arange(order.size) - np.searchsorted(w, w)  # position among those asking for the same cluster
        take = rank < room[w]
        labels[free[order[take]]] = w[take]
        room -= np.bincount(w[take], minlength=k)


def balanced_kmeans(features: np.ndarray, k: int, rng: np.random.Generator, iterations: int = ITERATIONS) -> np.ndarray:
    """Labels (n,) of balanced spherical k-means on the rows of `features` (n, d): k clusters of exactly n/k rows
    each (n must be a multiple of k), cosine similarity, k-means++ seeding from `rng`."""
    n = features.shape[0]
    if n % k:
        raise ValueError(f"{n} points do not split into {k} equal clusters")
    x = np.asarray(features, dtype=np.float32)
    x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    centroids = [x[int(rng.integers(n))]]
    best = x @ centroids[0]
    for _ in range(1, k):
        dist = np.maximum(1.0 - best, 0.0).astype(np.float64)
        total = dist.sum()
        pick = int(rng.choice(n, p=dist / total)) if total > 0 else int(rng.integers(n))
        centroids.append(x[pick])
        best = np.maximum(best, x @ centroids[-1])
    c = np.stack(centroids)
    labels = None
    for _ in range(iterations):
        new = _assign_balanced(x @ c.T, n // k)
        if labels is not None and np.array_equal(new, labels):
            break
        labels = new
        c = np.zeros_like(c)
        np.add.at(c, labels, x)
        c /= np.maximum(np.linalg.norm(c, axis=1, keepdims=True), 1e-12)
    return labels


def groups_from_labels(neurons: np.ndarray, labels: np.ndarray, k: int) -> list[np.ndarray]:
    """The neurons of each label, ascending; groups ordered by their first neuron (labels are arbitrary names)."""
    groups = [np.sort(neurons[labels == j]) for j in range(k)]
    return sorted(groups, key=lambda g: int(g[0]))


# ------------------------------------------------------------------------------------------------ one layer

@dataclass
class LayerGroups:
    """The neurons of one MoE layer in slice order (shared neurons first, then each routed expert's), the fitted
    router rows of a partition (None: the recipe's random router), and what the fit measured on the sample."""

    order: np.ndarray  # (I,) parent neuron indices; slice j is order[j*w:(j+1)*w]
    router: np.ndarray | None = None  # (E, H) float32
    stats: dict = field(default_factory=dict)


@dataclass
class Grouping:
    """Every MoE layer's LayerGroups, and the sample they were computed on (None: from the weights alone)."""

    layers: dict[int, LayerGroups]
    sample: str | None = None
    tokens: int = 0

    def order(self, layer: int) -> np.ndarray | None:
        g = self.layers.get(layer)
        return None if g is None else g.order

    def router_bases(self) -> dict[int, np.ndarray]:
        return {i: g.router for i, g in self.layers.items() if g.router is not None}

    def summary(self) -> dict:
        """What the manifest keeps: the sample, and per layer what the router fit measured."""
        stats = [{"layer": i, **g.stats} for i, g in sorted(self.layers.items()) if g.stats]
        out: dict = {"sample": self.sample, "tokens": self.tokens, "layers": stats}
        for key in ("agreement", "rel_error", "oracle_rel_error"):
            vals = [s[key] for s in stats if s.get(key) is not None]
            if vals:
                out[f"mean_{key}"] = float(np.mean(vals))
        return out


def _activation(name: str):
    from transformers.activations import ACT2FN

    return ACT2FN[name]


class _LayerMaths:
    """Everything computed for one layer from its MLP weights (and the sample's hidden states, when there are)."""

    def __init__(self, plan, layer: int, gate: np.ndarray, up: np.ndarray, down: np.ndarray):
        self.plan, self.layer, self.r = plan, layer, plan.recipe
        self.gate, self.up, self.down = gate, up, down
        self.inter = gate.shape[0]
        self.width = self.inter // self.r.granularity

    def groups(self, x=None, y=None) -> LayerGroups:
        import torch

        r = self.r
        acts = None
        if x is not None:
            x = x.float()
            act = _activation(self.plan.parent.hidden_act)
            acts = act(x @ torch.from_numpy(self.gate).T) * (x @ torch.from_numpy(self.up).T)  # (T, I)
        shared = np.zeros(0, dtype=np.int64)
        if r.partition and r.shared_experts:
            use = neuron_use(acts.abs().mean(0).numpy(), self.down)
            shared = most_used(use, r.shared_experts * self.width)
        rest = np.setdiff1d(np.arange(self.inter), shared)
        count = r.group_size if r.partition else r.granularity
        groups = self._group(rest, count, acts)
        order = np.concatenate([shared, *groups]).astype(np.int64)
        out = LayerGroups(order)
        if r.partition and acts is not None:
            out.router, out.stats = self._router(x, y, acts, shared, groups)
        return out

    def _group(self, neurons: np.ndarray, count: int, acts) -> list[np.ndarray]:
        from upcycle.convert.weights import _PERM, rng

        r, w = self.r, neurons.size // count
        if r.slice_order == "contiguous":
            return [neurons[j * w:(j + 1) * w] for j in range(count)]
        if r.slice_order == "random":
            # the permutation exact recipes use (upcycle.convert.weights.layer_layout), of the neurons left
            perm = neurons[rng(r.seed, self.layer, _PERM).permutation(neurons.size)]
            return [perm[j * w:(j + 1) * w] for j in range(count)]
        if r.slice_order == "cluster":
            features = self.gate[neurons]
        else:
            features = acts[:, torch_index(neurons)].abs().T.numpy()
        labels = balanced_kmeans(features, count, rng(r.seed, self.layer, _CLUSTER))
        return groups_from_labels(neurons, labels, count)

    def _router(self, x, y, acts, shared: np.ndarray, groups: list[np.ndarray]):
        """Router rows (E, H) fitted to the experts' output norms, scaled as LOGIT_SCALES says; and the stats."""
        import torch

        down = torch.from_numpy(self.down)
        outs = [acts[:, torch_index(g)] @ down[:, torch_index(g)].T for g in groups]  # E x (T, H)
        norms = torch.stack([o.norm(dim=1) for o in outs], dim=1).double()  # (T, E)
        target = norms.clamp_min(1e-30).log()
        target = target - target.mean(dim=1, keepdim=True)
        xd = x.double()
        gram = xd.T @ xd
        ridge = RIDGE * float(gram.diagonal().mean()) or RIDGE
        w = torch.linalg.solve(gram + ridge * torch.eye(gram.shape[0], dtype=gram.dtype), xd.T @ target).T  # (E, H)
        logits = (xd @ w.T).float()
        k, E = self.r.top_k, self.r.experts
        agreement = _overlap(logits, norms, k)
        # the scale: on the first SCALE_TOKENS tokens, the block's relative error to the parent's MLP output
        t = min(SCALE_TOKENS, x.shape[0])
        stacked = torch.stack([o[:t] for o in outs], dim=1)  # (t, E, H)
        base = acts[:t, torch_index(shared)] @ down[:, torch_index(shared)].T if shared.size else 0.0
        want = y[:t].float()
        info = _routing_info(self.plan)
        factor = 1.0 if self.plan.fmt.routed_scale_in_config else self.r.routed_scale

        def error(weights, idx) -> float:
            chosen = stacked.gather(1, idx[:, :, None].expand(-1, -1, stacked.shape[2]))
            got = base + (weights[:, :, None].float() * factor * chosen).sum(dim=1)
            return float((got - want).norm() / want.norm().clamp_min(1e-30))

        from upcycle.families.moe.routing import select_experts

        errors = {c: error(*select_experts(info, logits[:t] * c)) for c in LOGIT_SCALES}
        scale = min(errors, key=lambda c: (errors[c], -c))
        # the best this grouping allows with each chosen expert counted once: the true top-k by output norm
        top = norms[:t].topk(k, dim=1).indices
        oracle = error(torch.full(top.shape, 1.0 / factor), top)
        stats = {"agreement": agreement, "chance": k / E, "rel_error": errors[scale], "oracle_rel_error": oracle,
                 "logit_scale": scale, "tokens": int(x.shape[0])}
        return (w * scale).float().numpy(), stats


def torch_index(a: np.ndarray):
    import torch

    return torch.from_numpy(np.ascontiguousarray(a, dtype=np.int64))


def _overlap(logits, norms, k: int) -> float:
    """Mean over tokens of |router top-k  intersect  true top-k| / k (true: the k largest expert output norms)."""
    import torch

    E = logits.shape[1]
    picked = torch.zeros(logits.shape, dtype=torch.bool).scatter_(1, logits.topk(k, dim=1).indices, True)
    true = torch.zeros((norms.shape[0], E), dtype=torch.bool).scatter_(1, norms.topk(k, dim=1).indices, True)
    return float((picked & true).sum()) / (k * logits.shape[0])


def _routing_info(plan):
    """The output type's routing rule as upcycle.families.moe.routing.select_experts takes it (as verify does)."""
    from upcycle.families.moe.routing import MoELayer

    fmt, cfg, r = plan.fmt, plan.config, plan.recipe
    sigmoid = fmt.scoring == "sigmoid"
    return MoELayer(index=-1, block=None, router=None, experts=None, num_experts=r.experts, top_k=r.top_k,
                    scoring=fmt.scoring, selection_bias=None,
                    norm_topk_prob=bool(cfg.get("norm_topk_prob", True)) if fmt.scoring != "topk_softmax" else True,
                    n_group=int(cfg.get("n_group") or 1) if sigmoid else 1,
                    topk_group=int(cfg.get("topk_group") or 1) if sigmoid else 1,
                    scale=float(cfg.get("routed_scaling_factor") or 1.0) if sigmoid else 1.0)


# ------------------------------------------------------------------------------------------------ every layer

def grouping_job(ckpt, plan, events: Events = SILENT):
    """Read and tokenise the sample now (a bad fit:TEXT fails here, before anything is written) and return the job
    that computes the Grouping of every MoE layer: from the weights alone, or with one pass of the parent over the
    sample (float32, one decoder layer at a time) where the recipe needs activations."""
    from upcycle.convert.weights import ParentReader

    r = plan.recipe
    moe_layers = sorted(plan.moe_layers)
    reader = ParentReader(ckpt.source, plan.parent, cache_size=3)

    def weights(i: int):
        pre = f"model.layers.{i}.mlp."
        return [np.ascontiguousarray(reader.f32(f"{pre}{w}_proj.weight")) for w in ("gate", "up", "down")]

    if not r.sample_pass:
        def from_weights() -> Grouping:
            events.info(f"grouping neurons: balanced k-means of the gate_proj rows in {len(moe_layers)} layer(s)")
            return Grouping({i: _LayerMaths(plan, i, *weights(i)).groups() for i in moe_layers})

        return from_weights

    ids, sample = sample_ids(ckpt, r.sample_text, plan)

    def run() -> Grouping:
        import torch

        from upcycle.convert.parent_pass import stream_parent

        what = " and ".join(w for w, on in (("coactivation groups", r.slice_order == "coactivation"),
                                            ("shared neurons", r.partition and r.shared_experts > 0),
                                            ("the router", r.partition and r.router_init_mode[0] == "fit")) if on)
        events.info(f"{what[0].upper()}{what[1:]}: running the parent on {sample} ({ids.size} tokens)")
        layers: dict[int, LayerGroups] = {}
        wanted = set(moe_layers)

        def on_mlp(i: int, x, y) -> None:
            if i in wanted:
                layers[i] = _LayerMaths(plan, i, *weights(i)).groups(x.float(), y.float())

        last = max(wanted)
        # float32 whatever the parent's type: the fit's least squares and the small logit scales want it
        stream_parent(ckpt, ids, None, on_mlp, dtype=torch.float32, attention="sdpa", stop=lambda: last in layers)
        return Grouping(layers, sample, int(ids.size))

    return run


def sample_ids(ckpt, text: Path | None, plan) -> tuple[np.ndarray, str]:
    """The sample's token ids in blocks ([B, T]) and its description."""
    from upcycle.convert.parent_pass import encode
    from upcycle.convert.router_init import BLOCK, MAX_TOKENS, _texts, describe

    texts = [t for t in _texts(text) if t.strip()]
    if not texts:
        raise InputError(f"--router-init fit: {text} holds no text")
    ids = encode(ckpt.load_spec, "\n\n".join(texts))[:MAX_TOKENS]
    need = 4 * plan.recipe.experts
    if ids.size < need:
        raise InputError(f"--router-init fit: {describe(text)} gives {ids.size} tokens; a partition into "
                         f"{plan.recipe.experts} experts needs at least {need}")
    block = min(BLOCK, ids.size)
    return ids[: ids.size // block * block].reshape(-1, block), describe(text)
