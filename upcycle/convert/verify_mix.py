"""How far a conversion with experts from other checkpoints (--expert-from) is from its parent, end to end.

Such a conversion is not the parent's function, so verification cannot bound it; it measures it instead. Both
models run one decoder layer at a time in float64 on the verification prompts (upcycle.convert.verify.PROMPTS):
the parent as it is, and the MoE with the weights just written: attention, norms and embeddings from the
parent (or their mean over the checkpoints, --average-shared) rounded through the output dtype, which the byte
checks showed equal to what was written, and at every MoE layer the MoE block rebuilt from the written experts
and router. Their logits are then compared: the largest difference, the mean KL divergence of the MoE's
next-token distribution from the parent's, and how often both rank the same token first.
"""

from __future__ import annotations

import numpy as np

HEAD_ROWS = 8192  # vocabulary rows of the output head read at a time


def head_logits(source, spec, hidden, round_code: str | None):
    """Logits [T, V] (float64) of the final hidden states through the output head read from `source`."""
    import torch

    from upcycle.convert.parent_pass import f64, read_rows
    from upcycle.core.tensors import from_f32, to_f32

    name = "lm_head.weight" if not spec.tie_word_embeddings and "lm_head.weight" in source else "model.embed_tokens.weight"
    meta = source.meta(name)
    whole = None if source.byte_range(name) is not None else source.read(name)
    parts = []
    for lo in range(0, meta.shape[0], HEAD_ROWS):
        hi = min(meta.shape[0], lo + HEAD_ROWS)
        raw = read_rows(source, name, lo, hi) if whole is None else whole[lo:hi]
        w = f64(from_f32(to_f32(raw, meta.dtype), round_code), round_code) if round_code else f64(raw, meta.dtype)
        parts.append(hidden @ w.T)
    logits = torch.cat(parts, dim=1)
    scaling = float(spec.multipliers.get("logits_scaling", 1.0) or 1.0)  # granite divides its logits
    return logits / scaling


def compare_logits(parent, moe) -> dict:
    """The numbers the model card and convert's summary give for a function that is not the parent's."""
    import torch

    lp, lq = torch.log_softmax(parent, dim=-1), torch.log_softmax(moe, dim=-1)
    kl = (lp.exp() * (lp - lq)).sum(-1)
    diff = float((moe - parent).abs().max())
    largest = float(parent.abs().max()) or 1.0
    return {"tokens": int(parent.shape[0]), "max_abs_logit_diff": diff, "max_abs_logit": largest,
            "max_rel_logit_diff": diff / largest, "mean_kl": float(kl.mean()), "max_kl": float(kl.max()),
            "top1_agree": int((parent.argmax(-1) == moe.argmax(-1)).sum())}


def measure_mixed(chk, ckpt, plan, ids: np.ndarray, parent_round: str | None, parent_hidden) -> dict:
    """Run the written MoE layer by layer on `ids` and compare its logits with the parent's (parent_hidden: the
    parent's final hidden states on the same ids, from the verification pass)."""
    from upcycle.convert.parent_pass import stream_parent

    parent_logits = head_logits(ckpt.source, plan.parent, parent_hidden, parent_round)

    def moe_block(i: int, x):
        y, _, _ = chk.moe_output(i, x, chk.written_experts(i))
        return y

    shared = plan.sources.shared_source
    hidden = stream_parent(ckpt, ids, plan.out_dtype, lambda i, x, y: None, source=shared, replace_mlp=moe_block,
                           replace_layers=set(plan.moe_layers), final_norm=True)
    res = compare_logits(parent_logits, head_logits(shared, plan.parent, hidden, plan.out_dtype))
    res["method"] = "streamed, float64: the parent and the written MoE, one decoder layer at a time"
    return res
