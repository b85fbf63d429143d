"""What a partition costs in next-token loss right after conversion, on held-out text.

A partition is not the parent's function by design, so verification measures how far it is instead of bounding
it: the parent and the written MoE each run one decoder layer at a time (upcycle.convert.parent_pass.stream_parent,
float32 with torch's fused attention) over HELDOUT_TOKENS tokens of standard library sources that the built-in
sample of the grouping and the router fit never sees (the held-out side of upcycle.core.assets.stdlib_split). The
MoE's blocks are rebuilt from the written experts and router and run in float64 with the output type's routing rule
(the same code as the layer-by-layer check); everything else is the parent's, rounded through the output dtype
where that is narrower (as for the parent), which the byte checks have shown equal to what was written.

Both models' next-token losses come from one sweep over the output head's rows (never a [tokens, vocabulary]
matrix), with the 95% interval of the mean difference taken over chunks of CHUNK consecutive tokens (neighbouring
tokens' losses are not independent).
"""

from __future__ import annotations

import numpy as np

HELDOUT_TOKENS = 1024
BLOCK = 512
CHUNK = 64
HEAD_ROWS = 8192


def heldout_ids(ckpt) -> tuple[np.ndarray, str]:
    """[B, BLOCK] token ids of the held-out standard library sources, and their description."""
    from upcycle.convert.parent_pass import encode
    from upcycle.core.assets import stdlib_split

    _, held = stdlib_split()
    chars, texts = 0, []
    for f in held:
        t = f.read_text(errors="replace")
        texts.append(t)
        chars += len(t)
        if chars > HELDOUT_TOKENS * 8:  # ~4 characters per token, with room to spare
            break
    ids = encode(ckpt.load_spec, "\n\n".join(texts))[:HELDOUT_TOKENS]
    block = min(BLOCK, ids.size)
    n = ids.size // block
    return ids[: n * block].reshape(n, block), f"{len(texts)} held-out standard library sources"


def head_stats(source, spec, hidden, targets, round_code: str | None):
    """(negative log-likelihood [N], top-1 token [N]) of the final hidden states [N, H] through the output head,
    swept over the vocabulary HEAD_ROWS rows at a time (float32)."""
    import torch

    from upcycle.convert.parent_pass import read_rows
    from upcycle.core.tensors import from_f32, to_f32

    name = "lm_head.weight" if not spec.tie_word_embeddings and "lm_head.weight" in source else "model.embed_tokens.weight"
    meta = source.meta(name)
    whole = None if source.byte_range(name) is not None else source.read(name)
    scaling = float(spec.multipliers.get("logits_scaling", 1.0) or 1.0)  # granite divides its logits
    h = hidden.float()
    n = h.shape[0]
    lse = torch.full((n,), -float("inf"))
    best = torch.full((n,), -float("inf"))
    top = torch.zeros(n, dtype=torch.long)
    chosen = torch.zeros(n)
    targets = torch.as_tensor(targets, dtype=torch.long)
    for lo in range(0, meta.shape[0], HEAD_ROWS):
        hi = min(meta.shape[0], lo + HEAD_ROWS)
        raw = read_rows(source, name, lo, hi) if whole is None else whole[lo:hi]
        w = to_f32(raw, meta.dtype)
        if round_code:
            w = to_f32(from_f32(w, round_code), round_code)
        logits = (h @ torch.from_numpy(np.ascontiguousarray(w, dtype=np.float32)).T) / scaling
        lse = torch.logaddexp(lse, torch.logsumexp(logits, dim=1))
        m, arg = logits.max(dim=1)
        better = m > best
        best, top = torch.where(better, m, best), torch.where(better, arg + lo, top)
        inside = (targets >= lo) & (targets < hi)
        rows = torch.nonzero(inside, as_tuple=True)[0]
        chosen[rows] = logits[rows, targets[rows] - lo]
    return (lse - chosen).double(), top


def measure_heldout(chk, ckpt, plan) -> dict:
    """The parent's and the written MoE's next-token loss on the held-out ids, paired token by token."""
    import torch

    from upcycle.convert.parent_pass import parent_round_code, stream_parent

    ids, text = heldout_ids(ckpt)
    round_code = parent_round_code(ckpt, plan)
    moe_layers = set(plan.moe_layers)

    def moe_block(i: int, x):
        y, _, _ = chk.moe_output(i, x.double(), chk.written_experts(i))
        return y.to(x.dtype)

    def run(**kw):
        return stream_parent(ckpt, ids, round_code, lambda i, x, y: None, dtype=torch.float32, attention="sdpa",
                             final_norm=True, **kw)

    parent = run()
    moe = run(replace_mlp=moe_block, replace_layers=moe_layers)
    B, T = ids.shape
    keep = torch.arange(B * T).reshape(B, T)[:, :-1].reshape(-1)  # the last position of a block predicts nothing
    targets = torch.from_numpy(ids[:, 1:].reshape(-1).astype(np.int64))
    nll, top = head_stats(ckpt.source, plan.parent, torch.cat([parent[keep], moe[keep]]),
                          torch.cat([targets, targets]), round_code)
    n = keep.numel()
    a, b = nll[:n], nll[n:]
    diff = b - a
    chunks = diff[: n // CHUNK * CHUNK].reshape(-1, CHUNK).mean(dim=1)
    half = 1.96 * float(chunks.std(unbiased=True)) / chunks.numel() ** 0.5 if chunks.numel() > 1 else float("nan")
    mean = float(diff.mean())
    return {"text": text, "tokens": int(n), "parent_loss": float(a.mean()), "moe_loss": float(b.mean()),
            "diff": mean, "ci95": [mean - half, mean + half], "chunk": CHUNK,
            "top1_agree": int((top[:n] == top[n:]).sum()),
            "method": "streamed, float32 (the MoE blocks in float64 from the written weights): the parent and the "
                      "written MoE, one decoder layer at a time"}
