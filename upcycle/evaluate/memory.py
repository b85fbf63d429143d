"""What `upcycle eval` needs in memory: the parent (then only its MLPs, for drift), then the model."""

from __future__ import annotations

from upcycle.core.memory import MODEL_RUNTIME, Estimate
from upcycle.storage.counts import parameter_counts


def eval_estimate(model: str, parent: str | None, *, dtype: str, batch_tokens: int, allow_pickle: bool = False,
                  equal_cost_share: float | None = None) -> Estimate:
    """`upcycle eval`: the parent first (then only its MLPs kept for drift), then the model; no gradients.
    equal_cost_share: the parent is also cut to that share of its MLPs in place (the equal-cost reference of a
    cheaper MoE), so the smaller projections sit beside it and its MLP copies while they are made."""
    size = {"float32": 4, "bfloat16": 2, "float16": 2}.get(dtype, 4)
    counts, cfg = parameter_counts(model, allow_pickle=allow_pickle)
    m = sum(counts.values()) * size
    p_all = p_mlp = 0
    if parent is not None:
        pc, _ = parameter_counts(parent, allow_pickle=allow_pickle)
        p_all = sum(pc.values()) * size
        p_mlp = sum(n for name, n in pc.items() if ".mlp." in name) * 4
    H, V = int(cfg.get("hidden_size") or 0), int(cfg.get("vocab_size") or 0)
    acts = batch_tokens * (H * 4 * 16 + V * 4 * 3)
    weights = max(p_all, m + p_mlp)
    if parent is not None and equal_cost_share is not None:
        # the pruned projections are made while the parent and its float32 MLP copies for drift are still held
        pruned = int(equal_cost_share * sum(n for name, n in pc.items() if ".mlp." in name) * size)
        weights = max(p_all + p_mlp + pruned, m + p_mlp)
    return Estimate("eval", (("runtime", MODEL_RUNTIME), ("weights", weights), ("activations", acts)),
                    ("a smaller --batch-size or --seq-len", "--dtype bfloat16"))
