"""Checking a converted folder against its parent: logits on real sentences and greedy decoding.

Both models run in float32. When the MoE was written in a lower precision, the parent's weights are first
rounded through that precision too, so that what is measured is the conversion, not the storage rounding:
an exact recipe must then agree to float32 accumulation noise (<= 1e-4 on the logits).
"""

from __future__ import annotations

from pathlib import Path

from upcycle.core.errors import VerificationError

PROMPTS = (
    "The capital of France is",
    "def fibonacci(n):\n    if n < 2:\n        return n\n",
    "In 1905, Albert Einstein published four papers that",
    "Mixture-of-experts models route each token to a few experts, which",
)
TOLERANCE = 1e-4


def verify_conversion(parent_spec: str, out: Path, *, out_dtype: str, exact: bool, max_new_tokens: int = 8,
                      tolerance: float = TOLERANCE, allow_pickle: bool = False) -> dict:
    import torch

    from upcycle.core.loading import load_causal_lm, load_tokenizer

    torch.manual_seed(0)
    parent = load_causal_lm(parent_spec, dtype="float32", allow_pickle=allow_pickle)
    if out_dtype != "float32":
        low = getattr(torch, out_dtype)
        with torch.no_grad():
            for p in parent.parameters():
                p.copy_(p.to(low).to(torch.float32))
    moe = load_causal_lm(out, dtype="float32")
    tok = load_tokenizer(out)
    max_diff, mean_num, tokens, agree, total, samples = 0.0, 0.0, 0, 0, 0, []
    with torch.no_grad():
        for prompt in PROMPTS:
            ids = tok(prompt, return_tensors="pt").input_ids
            a = parent(ids).logits.float()
            b = moe(ids).logits.float()
            d = (a - b).abs()
            max_diff = max(max_diff, float(d.max()))
            mean_num += float(d.mean()) * ids.shape[1]
            tokens += ids.shape[1]
            kw = dict(max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tok.pad_token_id or tok.eos_token_id)
            ga = parent.generate(ids, attention_mask=torch.ones_like(ids), **kw)[0, ids.shape[1]:]
            gb = moe.generate(ids, attention_mask=torch.ones_like(ids), **kw)[0, ids.shape[1]:]
            n = min(len(ga), len(gb))
            # agreement counts the common prefix: after the first difference the contexts differ anyway
            same = 0
            while same < n and int(ga[same]) == int(gb[same]):
                same += 1
            agree += same
            total += max(len(ga), len(gb))
            samples.append({"prompt": prompt, "parent": tok.decode(ga), "moe": tok.decode(gb)})
    report = {
        "max_abs_diff": max_diff,
        "mean_abs_diff": mean_num / max(tokens, 1),
        "tokens": tokens,
        "greedy_agree": agree,
        "greedy_total": total,
        "exact_expected": exact,
        "tolerance": tolerance,
        "samples": samples,
    }
    if exact and max_diff > tolerance:
        raise VerificationError(
            f"the converted model does not reproduce the parent: max |logits diff| {max_diff:.3g} > {tolerance:g} "
            f"for a recipe that should be exact; nothing was written. Please report this with the command you ran"
        )
    return report
