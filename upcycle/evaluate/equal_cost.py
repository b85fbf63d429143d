"""The dense reference of equal inference cost for an MoE cheaper per token than its parent (a partition).

A partition runs only part of the parent's MLP per token, so beating (or losing to) the whole parent says little
about whether the MoE uses its FLOPs well. The fair dense reference costs the same: the parent with each MLP cut
to the number of neurons a token runs in the MoE (upcycle.json's per_token.mlp_share of the layer's
intermediate size, shared experts counted), keeping the parent's most used neurons (upcycle.core.neurons: mean
|activation| on the built-in sample times the norm of the neuron's down_proj column, the score convert ranks a
partition's shared neurons by). The sample is the built-in standard library text convert reads
(upcycle.core.sample), never eval's held-out blocks.

The reference is built in memory from the loaded parent after the parent has been scored (its MLP projections
are replaced by smaller ones in place), then scored on the same held-out blocks as the parent and the MoE.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from upcycle.core.neurons import most_used, neuron_use
from upcycle.core.sample import BLOCK, MAX_TOKENS, default_texts, describe_default

REFERENCE = "the parent pruned to the same active MLP width"


@dataclass(frozen=True)
class EqualCostPlan:
    """What the manifest says a token runs: the share of each MoE layer's MLP, and which layers are MoE."""

    mlp_share: float
    moe_layers: tuple[int, ...]
    forward_flops: float  # convert's count (embedding lookup and attention over the context left out)
    parent_forward_flops: float


def equal_cost_plan(manifest) -> EqualCostPlan | None:
    """The plan for an MoE that runs less than its parent per token (upcycle.json's per_token), else None: copies
    and virtual groups run the whole MLP or more, and nothing is built for them."""
    if manifest is None:
        return None
    per = manifest.data.get("per_token") or {}
    share, flops, parent_flops = per.get("mlp_share"), per.get("forward_flops"), per.get("parent_forward_flops")
    if share is None or flops is None or parent_flops is None or not (share < 1 and flops < parent_flops):
        return None
    return EqualCostPlan(float(share), tuple(int(i) for i in manifest.data.get("moe_layers") or ()), float(flops),
                         float(parent_flops))


def _mlps(model) -> dict[int, object]:
    layers = model.get_decoder().layers if hasattr(model, "get_decoder") else model.model.layers
    out = {}
    for i, block in enumerate(layers):
        mlp = getattr(block, "mlp", None)
        if mlp is not None and hasattr(mlp, "down_proj") and (
                hasattr(mlp, "gate_proj") and hasattr(mlp, "up_proj") or hasattr(mlp, "gate_up_proj")):
            out[i] = mlp
    return out


def widths(model, plan: EqualCostPlan) -> dict[int, int]:
    """{decoder layer: neurons kept}: the MoE layers' share of the layer's MLP, rounded to whole neurons."""
    from upcycle.core.errors import UnsupportedError

    mlps = _mlps(model)
    missing = [i for i in plan.moe_layers if i not in mlps]
    if missing:
        raise UnsupportedError(f"the parent has no gate/up/down MLP in layer(s) {missing}: no equal-cost reference")
    return {i: max(1, round(plan.mlp_share * mlps[i].down_proj.in_features)) for i in plan.moe_layers}


def sample_ids(tokenizer, max_positions: int | None = None) -> np.ndarray:
    """The built-in sample's token ids in blocks [B, T] (T = BLOCK, or the parent's context when shorter)."""
    ids = np.asarray(tokenizer("\n\n".join(t for t in default_texts() if t.strip()))["input_ids"],
                     dtype=np.int64)[:MAX_TOKENS]
    block = min(BLOCK, ids.size, max_positions or BLOCK)
    return ids[: ids.size // block * block].reshape(-1, block)


def sample_use(model, ids: np.ndarray, layers, *, batch_size: int) -> dict[int, np.ndarray]:
    """{layer: (I,) use of each neuron} (upcycle.core.neurons.neuron_use) over the tokens of `ids`: the mean
    |activation| is what each MLP's down_proj receives, summed in float64 over every token."""
    import torch

    mlps = _mlps(model)
    sums = {i: torch.zeros(mlps[i].down_proj.in_features, dtype=torch.float64) for i in layers}
    tokens = [0]

    def hook(i):
        def pre(_mod, args):
            x = args[0]
            sums[i] += x.detach().abs().reshape(-1, x.shape[-1]).sum(0, dtype=torch.float64).cpu()

        return pre

    handles = [mlps[i].down_proj.register_forward_pre_hook(hook(i)) for i in layers]
    device = next(model.parameters()).device
    try:
        with torch.inference_mode():
            for s in range(0, ids.shape[0], batch_size):
                batch = torch.from_numpy(ids[s:s + batch_size]).to(device)
                model(input_ids=batch, use_cache=False)
                tokens[0] += batch.numel()
    finally:
        for h in handles:
            h.remove()
    def down(i):  # one layer at a time on the CPU, float32 unless the parent is float64
        w = mlps[i].down_proj.weight.detach()
        return w.to(torch.float64 if w.dtype == torch.float64 else torch.float32).cpu().numpy()

    return {i: neuron_use((sums[i] / tokens[0]).numpy(), down(i)) for i in layers}


def chosen_neurons(use: dict[int, np.ndarray], keep: dict[int, int]) -> dict[int, np.ndarray]:
    """{layer: the most used neurons, ascending}."""
    return {i: most_used(use[i], keep[i]) for i in keep}


def prune_mlps(model, neurons: dict[int, np.ndarray]) -> None:
    """Cut each listed layer's MLP to `neurons` in place: gate and up keep those rows, down those columns, so the
    layer computes exactly the parent's MLP restricted to them. config.intermediate_size follows when every layer
    ends up the same width."""
    import torch

    mlps = _mlps(model)

    def linear(weight, bias):
        lin = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device=weight.device,
                              dtype=weight.dtype)
        with torch.no_grad():
            lin.weight.copy_(weight)
            if bias is not None:
                lin.bias.copy_(bias)
        return lin

    with torch.no_grad():
        for i, keep in neurons.items():
            mlp = mlps[i]
            idx = torch.from_numpy(np.ascontiguousarray(keep, dtype=np.int64)).to(mlp.down_proj.weight.device)
            if hasattr(mlp, "gate_proj"):
                for name in ("gate_proj", "up_proj"):
                    old = getattr(mlp, name)
                    setattr(mlp, name, linear(old.weight[idx], None if old.bias is None else old.bias[idx]))
            else:  # phi3: gate rows then up rows in one projection
                old = mlp.gate_up_proj
                inter = old.weight.shape[0] // 2
                both = torch.cat([idx, idx + inter])
                mlp.gate_up_proj = linear(old.weight[both], None if old.bias is None else old.bias[both])
            old = mlp.down_proj
            mlp.down_proj = linear(old.weight[:, idx], old.bias)
            if hasattr(mlp, "intermediate_size"):
                mlp.intermediate_size = int(keep.size)
    sizes = {m.down_proj.in_features for m in mlps.values()}
    if len(sizes) == 1:
        model.config.intermediate_size = sizes.pop()


def sample_files_in(files) -> list[str]:
    """The built-in sample's files among `files` (the text eval scores)."""
    from pathlib import Path

    from upcycle.core.sample import default_files

    sample = {f.resolve() for f in default_files()}
    return [str(f) for f in files if Path(f).resolve() in sample]


def describe_sample(ids: np.ndarray) -> str:
    return f"{describe_default()} ({ids.size} tokens)"
