"""How far each expert's weights have moved: cosine similarity to where it came from.

With the converter's manifest (upcycle.json) and the dense parent, an expert's origin is exact: the parent's
gate/up rows at the intermediate neurons it was cut from, and the parent's down_proj columns at those neurons
times the factor applied at conversion. A fresh exact conversion gives 1.0; training moves it down; an expert
that stays at 1.0 after training was not trained (or never chosen).

Without a manifest (an MoE this tool did not make) or without the parent, the reference is the mean of the
layer's experts: similar experts (cos near 1) have not diverged from each other, which upcycled experts start
out as and collapse back to; the report says which reference was used.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

REFERENCE_PARENT = "parent"
REFERENCE_MEAN = "mean_expert"


@dataclass
class ExpertWeights:
    """One MoE layer's routed experts, fp32 on CPU: gate and up [E, I, H], down [E, H, I]."""

    layer: int
    gate: torch.Tensor
    up: torch.Tensor
    down: torch.Tensor

    @classmethod
    def from_fused(cls, layer: int, gate_up_proj: torch.Tensor, down_proj: torch.Tensor) -> "ExpertWeights":
        # transformers' fused layout: rows [0, I) of gate_up_proj are the gate, [I, 2I) the up projection
        gu = gate_up_proj.detach().float().cpu()
        inter = gu.shape[1] // 2
        return cls(layer, gu[:, :inter], gu[:, inter:], down_proj.detach().float().cpu())


@dataclass
class ParentMLP:
    """One dense layer's MLP, fp32 on CPU: gate and up [I, H], down [H, I]."""

    gate: torch.Tensor
    up: torch.Tensor
    down: torch.Tensor


@dataclass
class LayerDrift:
    layer: int
    reference: str
    cos_gate: list[float]
    cos_up: list[float]
    cos_down: list[float]
    cos: list[float]  # all three matrices flattened together

    @property
    def mean(self) -> float:
        return sum(self.cos) / len(self.cos)

    @property
    def min(self) -> float:
        return min(self.cos)

    def to_json(self) -> dict:
        return {"layer": self.layer, "reference": self.reference, "cos": self.cos, "cos_gate": self.cos_gate,
                "cos_up": self.cos_up, "cos_down": self.cos_down, "mean": self.mean, "min": self.min}


def parent_mlps(model) -> dict[int, ParentMLP]:
    """The MLP weights of every layer of a dense transformers model (llama-like or phi3's fused gate_up_proj)."""
    out: dict[int, ParentMLP] = {}
    layers = model.get_decoder().layers if hasattr(model, "get_decoder") else model.model.layers
    for i, block in enumerate(layers):
        mlp = getattr(block, "mlp", None)
        if mlp is None:
            continue
        if hasattr(mlp, "gate_proj") and hasattr(mlp, "up_proj"):
            gate, up = mlp.gate_proj.weight, mlp.up_proj.weight
        elif hasattr(mlp, "gate_up_proj") and hasattr(mlp.gate_up_proj, "weight"):
            gate, up = mlp.gate_up_proj.weight.chunk(2, dim=0)
        else:
            continue
        if not hasattr(mlp, "down_proj"):
            continue
        out[i] = ParentMLP(gate.detach().float().cpu().clone(), up.detach().float().cpu().clone(),
                           mlp.down_proj.weight.detach().float().cpu().clone())
    return out


def _cos(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.reshape(-1).double(), b.reshape(-1).double()
    denom = a.norm() * b.norm()
    return float((a @ b) / denom) if denom > 0 else 0.0


def drift_from_parent(w: ExpertWeights, parent: ParentMLP, manifest) -> LayerDrift:
    """Each expert against the parent neurons the manifest says it was copied from."""
    cg, cu, cd, call = [], [], [], []
    for e in range(w.gate.shape[0]):
        neurons = torch.tensor(manifest.expert_neurons(w.layer, e), dtype=torch.long)
        scale = manifest.expert_down_scale(w.layer, e)
        rg, ru, rd = parent.gate[neurons], parent.up[neurons], parent.down[:, neurons] * scale
        if rg.shape != w.gate[e].shape or rd.shape != w.down[e].shape:
            raise ValueError(f"layer {w.layer} expert {e}: shape {tuple(w.gate[e].shape)} does not match the "
                             f"parent neurons {tuple(rg.shape)}")
        cg.append(_cos(w.gate[e], rg))
        cu.append(_cos(w.up[e], ru))
        cd.append(_cos(w.down[e], rd))
        call.append(_cos(torch.cat([w.gate[e].reshape(-1), w.up[e].reshape(-1), w.down[e].reshape(-1)]),
                         torch.cat([rg.reshape(-1), ru.reshape(-1), rd.reshape(-1)])))
    return LayerDrift(w.layer, REFERENCE_PARENT, cg, cu, cd, call)


def drift_from_mean(w: ExpertWeights) -> LayerDrift:
    """Each expert against the mean of the layer's experts."""
    mg, mu, md = w.gate.mean(0), w.up.mean(0), w.down.mean(0)
    cg, cu, cd, call = [], [], [], []
    ref_all = torch.cat([mg.reshape(-1), mu.reshape(-1), md.reshape(-1)])
    for e in range(w.gate.shape[0]):
        cg.append(_cos(w.gate[e], mg))
        cu.append(_cos(w.up[e], mu))
        cd.append(_cos(w.down[e], md))
        call.append(_cos(torch.cat([w.gate[e].reshape(-1), w.up[e].reshape(-1), w.down[e].reshape(-1)]), ref_all))
    return LayerDrift(w.layer, REFERENCE_MEAN, cg, cu, cd, call)


def layer_drift(w: ExpertWeights, parents: dict[int, ParentMLP] | None, manifest) -> tuple[LayerDrift, str | None]:
    """Drift against the parent when possible, else against the mean expert; the second value says why not."""
    if manifest is None:
        return drift_from_mean(w), "no upcycle.json manifest (not made by upcycle convert)"
    if getattr(manifest, "mixed", False):
        return drift_from_mean(w), ("the experts were copied from several checkpoints (--expert-from), not from "
                                    "the parent")
    if not parents:
        return drift_from_mean(w), "no --parent given"
    if w.layer not in parents:
        return drift_from_mean(w), f"the parent has no MLP at layer {w.layer}"
    try:
        return drift_from_parent(w, parents[w.layer], manifest), None
    except (KeyError, IndexError, ValueError) as exc:
        return drift_from_mean(w), f"the manifest does not match this parent ({exc})"
