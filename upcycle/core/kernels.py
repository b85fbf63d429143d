"""upcycle's experts kernel for training: transformers' `experts_implementation="upcycle"`.

transformers 5 MoE classes (mixtral, qwen2_moe, qwen3_moe, glm4_moe, dots1, granitemoe, flex_olmo, ...) hold
their experts as fused `gate_up_proj` [E, 2I, H] and `down_proj` [E, H, I] and dispatch the experts forward
through a registry (`transformers.integrations.moe.ALL_EXPERTS_FUNCTIONS`). `register_experts_kernel()` adds
this module's forward there under the name "upcycle"; a model loaded with
`from_pretrained(..., experts_implementation="upcycle")` stays its standard class and saves as such.

The common layout (gated, [gate; up] concatenated, the class's default gate, SiLU, no biases, no post-expert
norm; every model upcycle writes) runs a custom autograd Function:

- one stable argsort of the flattened expert ids and one bincount (the only host sync). Dropped assignments
  (id == E, the sentinel of upcycle's capacity factor; or an expert-parallel sentinel > E) sort to the end and
  are never computed; their routing-weight gradient is zero, as in transformers' eager loop.
- the sorted rows are cut into chunks of whole experts, each chunk's largest buffer at most `CHUNK_BYTES`
  (16 MiB). Per chunk: gather the tokens once, one mm per expert for gate and up together, SiLU(gate) * up
  over the whole chunk, one mm per expert for down, scale by the routing weight, `index_add_` into an fp32
  output. Chunks keep every allocation under glibc's largest mmap threshold (32 MiB): bigger blocks are
  mmap'ed fresh and page-faulted on every step, which on a VM cost as much as a third of the matmul time.
- backward reuses the saved gather, gate/up output, SiLU(gate) and product (nothing is recomputed, no second
  sort or gather of the input), runs the transposed per-expert mms, gets d(gate) with one fused
  `silu_backward`, and writes the expert weight gradients straight into tensors in the parameters' layout.
- under autocast the mms run in the autocast dtype (bf16): weights are cast once per call into recycled buffers,
  accumulation into the output and the input gradient stays fp32, the routing-weight gradient is summed in fp32.
  On CPU each expert's rows are padded with zero rows to a multiple of `ROW_QUANTUM` (oneDNN's per-shape cost;
  see there): padding rows read a zero input row, carry routing weight 0 and are never written back.

Everything else a transformers experts class may declare (biases, transposed weights with a custom gate,
interleaved gate/up, no gate, a post-expert norm, another activation) takes a general path: the same sort,
gather and sentinel handling with plain autograd ops per expert (`self._apply_gate`, `self.act_fn`,
`self.post_expert_norm`), so "upcycle" is a drop-in for every class decorated with `@use_experts_implementation`.

The per-expert products go through the module-level `grouped_mm(a, b, counts, out=None)` (the semantics of
`torch._grouped_mm`, with group sizes instead of offsets); assign another function to it to swap the backend.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

NAME = "upcycle"
CHUNK_BYTES = 16 << 20  # the largest per-chunk buffer (gate/up output); see the module docstring


# ---------------------------------------------------------------------------------------------------------------
# the grouped matrix product (the one overridable piece)


# oneDNN, which runs torch's bf16 and fp16 matmuls on CPU, builds and caches one kernel per problem shape: a row
# count it has not seen costs about three times the product itself (measured on the AMX Xeon, SmolLM2's expert
# shapes at ~128 rows: 3.1 ms against 1.1 ms per gate_up + down pair). Training routes a different number of tokens
# to each expert at every step, so on CPU in bf16/fp16 the experts kernel lays each expert's rows out padded with
# zero rows to a multiple of ROW_QUANTUM (groups under two quanta stay as they are): a few dozen shapes per product,
# all reused after the first steps, and one product per expert. Cutting the rows into a multiple of the quantum plus
# a remainder instead (the previous layout) costs a second product per expert, and a product of a few rows costs
# about as much as one of 64 here, because it is bound by reading the weights (bench_experts, docs/kernels.md).
# fp32 (MKL) and GPU products have no per-shape cost and take the rows as they are.
ROW_QUANTUM = 32


def _quantum(dtype: "torch.dtype", device: "torch.device") -> int:
    import torch

    return ROW_QUANTUM if device.type == "cpu" and dtype in (torch.bfloat16, torch.float16) else 0


def padded_counts(counts: list[int], quantum: int) -> list[int]:
    """Each group's rows rounded up to a multiple of `quantum` (0: unchanged; groups under two quanta unchanged:
    their few shapes are cached after a few steps and padding them would add up to half their work)."""
    if not quantum:
        return list(counts)
    return [c + (-c) % quantum if c >= 2 * quantum else c for c in counts]


def grouped_mm_loop(a: "torch.Tensor", b: "torch.Tensor", counts: list[int], out: "torch.Tensor | None" = None):
    """Per-expert products over expert-contiguous rows; `counts[g]` rows (or columns) belong to group g.

    a [S, K], b [G, K, N]  -> [S, N]:     out[rows of g] = a[rows of g] @ b[g]
    a [K, S], b [S, N]     -> [G, K, N]:  out[g] = a[:, cols of g] @ b[rows of g]   (zeros for an empty group)
    S may exceed sum(counts): the rows past it are not read (and, 3D case, not written). One mm per group. `out`
    (optional) receives the result; in the 2D x 2D case it may have another dtype than a and b (the product is
    made in a's dtype and converted).
    """
    import torch

    if b.dim() == 3:
        if out is None:
            out = torch.empty(a.shape[0], b.shape[2], dtype=a.dtype, device=a.device)
        start = 0
        for g, c in enumerate(counts):
            if c:
                torch.mm(a[start:start + c], b[g], out=out[start:start + c])
            start += c
        return out
    if out is None:
        out = torch.empty(len(counts), a.shape[0], b.shape[1], dtype=a.dtype, device=a.device)
    same = out.dtype == a.dtype  # else e.g. a bf16 product into an fp32 weight gradient: converted once
    start = 0
    for g, c in enumerate(counts):
        if not c:
            out[g].zero_()
        elif same:
            torch.mm(a[:, start:start + c], b[start:start + c], out=out[g])
        else:
            out[g].copy_(torch.mm(a[:, start:start + c], b[start:start + c]))
        start += c
    return out


def grouped_mm_torch(a: "torch.Tensor", b: "torch.Tensor", counts: list[int], out: "torch.Tensor | None" = None):
    """The same through one `torch._grouped_mm` call (torch >= 2.9 on CPU; strides must be 16-byte multiples)."""
    import torch

    n = sum(counts)
    offs = torch.tensor(counts, dtype=torch.int64).cumsum(0).to(device=a.device, dtype=torch.int32)
    if b.dim() == 3:
        res = torch._grouped_mm(a[:n], b, offs=offs)
    else:
        res = torch._grouped_mm(a[:, :n], b[:n], offs=offs)
        for g, c in enumerate(counts):
            if not c:
                res[g].zero_()
    if out is None:
        return res
    (out[:n] if b.dim() == 3 else out).copy_(res)
    return out


grouped_mm = grouped_mm_loop


# ---------------------------------------------------------------------------------------------------------------
# recycled buffers (CPU): weight gradients and the weights cast to the compute dtype

REUSE_BUFFERS = True  # see _recycled
_POOL: dict = {}  # (shape, dtype) -> [(storage, baseline use count)]


def _storage_uses(storage) -> int:
    import torch

    return torch._C._storage_Use_Count(storage._cdata)


def _recycled(shape, dtype, device) -> "torch.Tensor":
    """An uninitialised tensor, on CPU taken from a pool when one is free.

    The expert weight gradients, and the expert weights cast to bf16 under autocast, are the biggest fresh
    allocations of a training step (as big as the expert weights). glibc hands blocks over 32 MiB out as new mmaps,
    so every step page-faults them in again (about 5 us per 4 KiB page on a VM: ~60 ms for a 57 MB gradient, more
    than all the matmuls of a 128-token step; casting SmolLM2's [8, 3072, 576] gate_up weights into fresh memory
    takes 13.6 ms, into a mapped buffer 5.8 ms). AccumulateGrad adopts a returned gradient as `param.grad`, and
    autograd keeps a cast weight saved for backward; once the optimizer's zero_grad drops the gradient (or backward
    frees the saved weight), the pool holds the only reference left to its storage and hands the same, already
    mapped memory out again. A buffer that anything else still references (grads kept, accumulated, or stored by the
    user; a graph kept for a second backward) is never reused. Costs: the pool keeps as many buffers alive between
    steps as a step uses at once (per MoE layer: its gradients, and its cast weights until backward).
    """
    import torch

    device = torch.device(device)
    nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    if not REUSE_BUFFERS or device.type != "cpu" or nbytes < (1 << 20):
        return torch.empty(shape, dtype=dtype, device=device)
    entries = _POOL.setdefault((tuple(shape), dtype), [])
    for storage, baseline in entries:
        if _storage_uses(storage) <= baseline:
            return torch.empty(0, dtype=dtype).set_(storage, 0, shape)
    storage = torch.empty(shape, dtype=dtype).untyped_storage()
    entries.append((storage, _storage_uses(storage)))
    return torch.empty(0, dtype=dtype).set_(storage, 0, shape)


def _cast(weight: "torch.Tensor", dtype: "torch.dtype") -> "torch.Tensor":
    """`weight.to(dtype)` (no copy when it already has it), into a recycled buffer."""
    if weight.dtype == dtype:
        return weight
    return _recycled(weight.shape, dtype, weight.device).copy_(weight)


def release_buffers() -> None:
    """Drop the pool of recycled buffers (the end of a training run): it would otherwise keep a set of expert
    gradients and cast weights alive for the rest of the process."""
    _POOL.clear()


# ---------------------------------------------------------------------------------------------------------------
# routing plan


def _plan(top_k_index: "torch.Tensor", num_experts: int):
    """(order [n], token [n], counts list[E]) of the kept assignments sorted by expert (stable: token order)."""
    import torch

    ids = top_k_index.reshape(-1)
    k = top_k_index.shape[-1]
    counts = torch.bincount(ids.clamp(max=num_experts), minlength=num_experts + 1).tolist()[:num_experts]
    order = torch.argsort(ids, stable=True)[: sum(counts)]
    return order, torch.div(order, k, rounding_mode="floor"), counts


def _chunks(counts: list[int], max_rows: int) -> list[tuple[int, int, int, int]]:
    """Consecutive expert ranges (e0, e1, r0, r1) of at most max_rows rows each (one expert may exceed it)."""
    chunks = []
    e0 = r0 = rows = 0
    for e, c in enumerate(counts):
        if rows and rows + c > max_rows:
            chunks.append((e0, e, r0, r0 + rows))
            e0, r0, rows = e, r0 + rows, 0
        rows += c
    chunks.append((e0, len(counts), r0, r0 + rows))
    return chunks


def _pad_index(counts: list[int], padded: list[int], device) -> "torch.Tensor":
    """For each sorted row (expert-contiguous, `counts` per expert): its row in the layout with `padded` rows per
    expert (each expert's rows first, its zero rows after them)."""
    import torch

    c, p = torch.tensor(counts), torch.tensor(padded)
    shift = (p.cumsum(0) - p) - (c.cumsum(0) - c)
    return (torch.arange(int(c.sum())) + shift.repeat_interleave(c)).to(device)


def pad_rows(counts: list[int], token: "torch.Tensor", ws: "torch.Tensor", quantum: int, T: int):
    """(rows per expert, token, ws, dest): the sorted assignments laid out with each expert's rows padded to
    `quantum` (padded_counts); dest is each real row's place in that layout, None when nothing was padded.

    Padding rows read token T, a zero row the caller appends to the input, and write to row T of the output, which
    is dropped; their routing weight is 0. Zero rows add exact zeros to every product."""
    import torch

    rows = padded_counts(counts, quantum)
    if rows == counts:
        return rows, token, ws, None
    dest = _pad_index(counts, rows, token.device)
    token = torch.full((sum(rows),), T, dtype=token.dtype, device=token.device).index_copy_(0, dest, token)
    ws = torch.zeros(sum(rows), dtype=ws.dtype, device=ws.device).index_copy_(0, dest, ws)
    return rows, token, ws, dest


def _compute_dtype(x: "torch.Tensor", weight: "torch.Tensor") -> "torch.dtype":
    import torch

    dev = x.device.type
    if dev in ("cpu", "cuda") and torch.is_autocast_enabled(dev):
        return torch.get_autocast_dtype(dev)
    return weight.dtype


def _acc_dtype(dtype: "torch.dtype") -> "torch.dtype":
    import torch

    return torch.float32 if dtype in (torch.bfloat16, torch.float16) else dtype


# ---------------------------------------------------------------------------------------------------------------
# fast path: gated, concatenated [gate; up], default gate with SiLU, no bias, no post-expert norm


def _make_function():
    import contextlib

    import torch
    import torch.nn.functional as F
    from torch.autograd.function import once_differentiable

    silu_backward = torch.ops.aten.silu_backward.grad_input

    def no_autocast(device_type: str):
        if device_type in ("cpu", "cuda"):
            return torch.autocast(device_type=device_type, enabled=False)
        return contextlib.nullcontext()

    class GatedExperts(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, weights, w_gate_up, w_down, order, token, counts, transposed, cdtype):
            T, H = x.shape
            k = weights.shape[-1]
            acc = _acc_dtype(x.dtype)
            w1, w2 = _cast(w_gate_up, cdtype), _cast(w_down, cdtype)
            # [E, H, 2I] and [E, I, H] views: the right operands of x @ W
            w1f, w2f = (w1, w2) if transposed else (w1.transpose(1, 2), w2.transpose(1, 2))
            i = w1f.shape[2] // 2
            with no_autocast(x.device.type):
                ws = weights.reshape(-1).index_select(0, order)
                xc = x.to(cdtype)
                rows, token, ws, dest = pad_rows(counts, token, ws, _quantum(cdtype, x.device), T)
                if dest is not None:
                    xc = torch.cat([xc, xc.new_zeros(1, H)])
                max_rows = max(1, CHUNK_BYTES // (2 * i * torch.finfo(cdtype).bits // 8))
                chunks = _chunks(rows, max_rows)
                out = torch.zeros(T + (dest is not None), H, dtype=acc, device=x.device)
                wsa = ws.to(acc).unsqueeze(1)
                saved = []
                for e0, e1, r0, r1 in chunks:
                    if r0 == r1:
                        saved += [None] * 5
                        continue
                    cnt, tok = rows[e0:e1], token[r0:r1]
                    xs = xc.index_select(0, tok)
                    h1 = grouped_mm(xs, w1f[e0:e1], cnt)  # [rows, 2I]
                    sg = F.silu(h1[:, :i])
                    a = sg * h1[:, i:]
                    y = grouped_mm(a, w2f[e0:e1], cnt)  # [rows, H]
                    out.index_add_(0, tok, y * wsa[r0:r1])  # a bf16 y is promoted to the fp32 of wsa
                    saved += [xs, h1, sg, a, y]
            ctx.save_for_backward(w1, w2, order, token, ws, dest, *saved)
            ctx.meta = (rows, chunks, transposed, cdtype, T, k, acc, i)
            ctx.w_dtypes = (w_gate_up.dtype, w_down.dtype)
            return out[:T].to(x.dtype)

        @staticmethod
        @once_differentiable
        def backward(ctx, grad_out):
            w1, w2, order, token, ws, dest, *saved = ctx.saved_tensors
            rows, chunks, transposed, cdtype, T, k, acc, i = ctx.meta
            need_x, need_w, need_w1, need_w2 = ctx.needs_input_grad[:4]
            gx = gw = gw1 = gw2 = None
            with no_autocast(grad_out.device.type):
                go_all = grad_out.to(cdtype)
                if dest is not None:  # row T: the padding rows' (zero) output
                    go_all = torch.cat([go_all, go_all.new_zeros(1, go_all.shape[1])])
                wsc = ws.to(cdtype).unsqueeze(1)
                if need_x:
                    gx = torch.zeros(go_all.shape[0], grad_out.shape[1], dtype=acc, device=grad_out.device)
                if need_w:
                    dws = torch.zeros(ws.shape[0], dtype=acc, device=grad_out.device)
                # the weight gradients go straight into tensors of the parameters' dtype (fp32 under autocast)
                if need_w1:
                    gw1 = _recycled(w1.shape, ctx.w_dtypes[0], w1.device)
                if need_w2:
                    gw2 = _recycled(w2.shape, ctx.w_dtypes[1], w2.device)
                # [E, H, I] / [E, 2I, H] views: the right operands of grad @ W (the transposed products)
                w2b, w1b = (w2.transpose(1, 2), w1.transpose(1, 2)) if transposed else (w2, w1)
                for c, (e0, e1, r0, r1) in enumerate(chunks):
                    cnt, tok = rows[e0:e1], token[r0:r1]
                    if r0 == r1:  # no rows: the experts of this chunk get zero gradients
                        for g in (gw1, gw2):
                            if g is not None:
                                g[e0:e1].zero_()
                        continue
                    xs, h1, sg, a, y = saved[5 * c:5 * c + 5]
                    go = go_all.index_select(0, tok)  # [rows, H]
                    if need_w:
                        dws[r0:r1] = torch.mul(go, y).sum(-1, dtype=acc)
                    go.mul_(wsc[r0:r1])  # the gradient of the unweighted expert output
                    if need_w2:
                        if transposed:
                            grouped_mm(a.t(), go, cnt, out=gw2[e0:e1])
                        else:
                            grouped_mm(go.t(), a, cnt, out=gw2[e0:e1])
                    if not (need_x or need_w1):
                        continue
                    da = grouped_mm(go, w2b[e0:e1], cnt)  # [rows, I]
                    del go
                    dh1 = torch.empty_like(h1)
                    torch.mul(da, sg, out=dh1[:, i:])  # d up = da * silu(gate)
                    silu_backward(da.mul_(h1[:, i:]), h1[:, :i], grad_input=dh1[:, :i])  # d gate
                    del da
                    if need_w1:
                        if transposed:
                            grouped_mm(xs.t(), dh1, cnt, out=gw1[e0:e1])
                        else:
                            grouped_mm(dh1.t(), xs, cnt, out=gw1[e0:e1])
                    if need_x:
                        dxs = grouped_mm(dh1, w1b[e0:e1], cnt)  # [rows, H]
                        gx.index_add_(0, tok, dxs.to(acc))
                if need_x:
                    gx = gx[:T].to(grad_out.dtype)
                if need_w:
                    if dest is not None:
                        dws = dws.index_select(0, dest)
                    gw = torch.zeros(T * k, dtype=ws.dtype, device=ws.device)
                    gw = gw.index_copy_(0, order, dws.to(ws.dtype)).view(T, k)
            return gx, gw, gw1, gw2, None, None, None, None, None

    return GatedExperts


_FUNCTION = None


def _function():
    global _FUNCTION
    if _FUNCTION is None:
        _FUNCTION = _make_function()
    return _FUNCTION


def _is_silu(act) -> bool:
    import torch

    if isinstance(act, torch.nn.SiLU):
        return True
    try:
        from transformers.activations import SiLUActivation
    except ImportError:  # pragma: no cover
        return False
    return type(act) is SiLUActivation


def fast_path_applies(module) -> bool:
    """Whether `module` (an experts module) runs the custom Function rather than the general path."""
    from transformers.integrations.moe import _default_apply_gate

    return bool(
        getattr(module, "has_gate", True)
        and getattr(module, "is_concatenated", True)
        and not getattr(module, "has_bias", False)
        and not getattr(module, "has_post_expert_norm", False)
        and getattr(type(module), "_apply_gate", _default_apply_gate) is _default_apply_gate
        and _is_silu(getattr(module, "act_fn", None))
        and hasattr(module, "gate_up_proj")
    )


# ---------------------------------------------------------------------------------------------------------------
# general path: any `@use_experts_implementation` layout, plain autograd per expert


def _general_forward(module, x, top_k_index, top_k_weights):
    import torch
    import torch.nn.functional as F

    T, H = x.shape
    order, token, counts = _plan(top_k_index, module.num_experts)
    has_gate = getattr(module, "has_gate", True)
    has_bias = getattr(module, "has_bias", False)
    transposed = getattr(module, "is_transposed", False)
    w_in = module.gate_up_proj if has_gate else module.up_proj
    b_in = (module.gate_up_proj_bias if has_gate else module.up_proj_bias) if has_bias else None
    xs = x[token]
    parts = []
    start = 0
    for e, c in enumerate(counts):
        if not c:
            continue
        h = xs[start:start + c]
        h = h @ w_in[e] if transposed else F.linear(h, w_in[e])
        if b_in is not None:
            h = h + b_in[e]
        h = module._apply_gate(h) if has_gate else module.act_fn(h)
        h = h @ module.down_proj[e] if transposed else F.linear(h, module.down_proj[e])
        if has_bias:
            h = h + module.down_proj_bias[e]
        if getattr(module, "has_post_expert_norm", False):
            h = module.post_expert_norm(h)
        parts.append(h)
        start += c
    acc = _acc_dtype(x.dtype)
    out = torch.zeros(T, H, dtype=acc, device=x.device)
    if parts:
        y = torch.cat(parts) if len(parts) > 1 else parts[0]
        ws = top_k_weights.reshape(-1)[order]
        out = out.index_add(0, token, (y * ws.unsqueeze(1)).to(acc))
    return out.to(x.dtype)


# ---------------------------------------------------------------------------------------------------------------
# the registered forward


def upcycle_experts_forward(self, hidden_states, top_k_index, top_k_weights):
    """Drop-in for transformers' experts forward (eager / grouped_mm): same arguments, same result."""
    if not fast_path_applies(self):
        return _general_forward(self, hidden_states, top_k_index, top_k_weights)
    order, token, counts = _plan(top_k_index, self.num_experts)
    return _function().apply(
        hidden_states, top_k_weights, self.gate_up_proj, self.down_proj, order, token, counts,
        bool(getattr(self, "is_transposed", False)), _compute_dtype(hidden_states, self.gate_up_proj),
    )


def register_experts_kernel() -> bool:
    """Register "upcycle" in transformers' experts registry (idempotent); False where transformers has none."""
    try:
        from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS, ExpertsInterface
    except ImportError:  # transformers 4.x: no experts registry
        return False
    if not hasattr(ExpertsInterface, "register"):
        return False
    if ALL_EXPERTS_FUNCTIONS.get(NAME) is not upcycle_experts_forward:
        ExpertsInterface.register(NAME, upcycle_experts_forward)
    return True
