"""Experts kernels, forward + backward of one MoE experts block against the parent's dense MLP.

The parent is SmolLM2-135M's MLP shape (hidden 576, intermediate 1536, SiLU, transformers' LlamaMLP). Two
FLOP-matched layouts of the same MLP: coarse (8 experts top-2, each expert the full MLP) and fine-grained
(32 experts top-8, each a quarter of the MLP). Both do exactly 2x the dense MLP's matmul FLOPs per token, so
the ideal MoE/dense time ratio is 2.0 and "x ideal" is ratio / 2.0 (the target is <= 1.10).

What is timed: the experts module alone (transformers' MixtralExperts, dispatched through its
`experts_implementation`), router excluded: routing is fixed, uniform random top-k (every token k distinct
experts, so loads are balanced in expectation), drawn afresh for every implementation in every round as training routes each step anew (a
CPU's bf16 products cost more at an expert row count they have not seen; --fixed-routing reuses one draw),
routing weights a softmax that requires grad. One step is
forward, backward of a fixed random upstream gradient into the input, the routing weights and the expert
weights (grads set to None before each step, as an optimizer's zero_grad does). bf16 means fp32 weights under
`torch.autocast(dtype=bfloat16)` (how `upcycle train --bf16` runs), backward outside the autocast.

Every round times dense and each implementation back to back (interleaved), after warm-up rounds; the ratio
reported is the median over rounds of (impl time / dense time in the same round), which holds up better than
a ratio of medians on a machine shared with other jobs. `batched_mm` gathers one weight matrix per
(token, expert) assignment; it is skipped where that gather alone would exceed --batched-limit-gb.

Floors (rows of their own, built for each round's routing): "mm floor", the per-expert products alone; "ops floor",
those plus the gathers, activation and scatters any kernel of torch ops runs; in bf16 "cast floor", that plus the
casts of fp32 master weights to bf16 and of the weight gradients back to fp32 (ops_floor_fn).

    python benchmarks/bench_experts.py [--tokens 4096,128] [--dtypes fp32,bf16] [--layouts coarse,fine]
        [--impls eager,batched_mm,grouped_mm,upcycle] [--repeats 5] [--warmup 1] [--threads N]
        [--device cpu|cuda] [--json PATH] [--variant NAME] [--quick]

Results go to docs/results/bench_experts/<machine>[-<variant>].json unless --json says otherwise (a --quick run or
another MLP shape writes only where --json says; benchmarks/_results.py).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _results import Run, add_arguments  # noqa: E402

HIDDEN, INTERMEDIATE = 576, 1536
LAYOUTS = {"coarse": (8, 2, 1), "fine": (32, 8, 4)}  # experts, top-k, granularity G (expert = MLP / G)
IMPLS = ("eager", "batched_mm", "grouped_mm", "upcycle")
# also accepted by --impls: "upcycle-whole", upcycle's kernel with each expert's rows as they are (ROW_QUANTUM 0), and
# "upcycle-split", the kernel's previous CPU bf16 layout: rows as they are, each group's product cut into a multiple
# of 32 rows plus a second product for the remainder (split_grouped_mm below, through the kernel's grouped_mm hook),
# and "upcycle-qN", the kernel with ROW_QUANTUM N (its rows padded to multiples of N on CPU in bf16)
WHOLE, SPLIT = "upcycle-whole", "upcycle-split"
CAST_FLOOR = "cast floor"  # bf16 only: the ops floor plus casting fp32 master weights and gradients (ops_floor_fn)
IDEAL = 2.0
TARGET = 1.10


def row_quantum_of(impl: str | None) -> int | None:
    """N for an "upcycle-qN" implementation name (bench_train takes them too), None for any other name."""
    return int(impl[len("upcycle-q"):]) if impl and impl.startswith("upcycle-q") else None


def bf16_native(device) -> bool:
    try:
        from upcycle.core.hardware import bf16_is_fast
    except ImportError:  # pragma: no cover
        return False
    return bf16_is_fast(device.type)


def build(layout: str, device, hidden: int, intermediate: int):
    import torch
    from transformers import AutoConfig
    from transformers.models.llama.modeling_llama import LlamaMLP
    from transformers.models.mixtral.modeling_mixtral import MixtralExperts

    E, k, G = LAYOUTS[layout]
    dense_cfg = AutoConfig.for_model("llama", hidden_size=hidden, intermediate_size=intermediate, hidden_act="silu")
    moe_cfg = AutoConfig.for_model("mixtral", hidden_size=hidden, intermediate_size=intermediate // G,
                                   num_local_experts=E, num_experts_per_tok=k, hidden_act="silu")
    g = torch.Generator().manual_seed(0)
    dense = LlamaMLP(dense_cfg)
    experts = MixtralExperts(moe_cfg)
    with torch.no_grad():
        for p in list(dense.parameters()) + list(experts.parameters()):
            p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    return dense.to(device), experts.to(device), moe_cfg, (E, k, G)


def make_inputs(T: int, E: int, k: int, hidden: int, device):
    import torch

    g = torch.Generator().manual_seed(1)
    x = torch.randn(T, hidden, generator=g)
    idx = make_routing(T, E, k, device, seed=1)
    w = torch.randn(T, k, generator=g).softmax(-1)
    gout = torch.randn(T, hidden, generator=g)
    return x.to(device), idx, w.to(device), gout.to(device)


def make_routing(T: int, E: int, k: int, device, seed: int):
    """k distinct uniform-random experts per token."""
    import torch

    g = torch.Generator().manual_seed(seed)
    return torch.rand(T, E, generator=g).topk(k, dim=-1).indices.to(device)


def step_fn(module, x, idx, w, gout, bf16: bool, moe: bool):
    import torch

    dev = x.device.type

    def step():
        for p in module.parameters():
            p.grad = None
        xx = x.detach().requires_grad_()
        ww = w.detach().requires_grad_()
        with torch.autocast(device_type=dev, dtype=torch.bfloat16, enabled=bf16):
            out = module(xx, idx, ww) if moe else module(xx)
        out.backward(gout.to(out.dtype))

    return step


def split_grouped_mm(a, b, counts, out=None, quantum: int = 32):
    """upcycle.core.kernels.grouped_mm_loop's semantics, each group of 2 quanta or more cut into a multiple of
    `quantum` rows and the rest (a second product, accumulated): the kernel's CPU bf16 layout before padding."""
    import torch

    def pieces(start, c):
        main = c - c % quantum if c >= 2 * quantum else c
        return [(start, main)] * bool(main) + [(start + main, c - main)] * bool(c - main)

    if b.dim() == 3:
        out = torch.empty(a.shape[0], b.shape[2], dtype=a.dtype, device=a.device) if out is None else out
        start = 0
        for g, c in enumerate(counts):
            for s0, n in pieces(start, c):
                torch.mm(a[s0:s0 + n], b[g], out=out[s0:s0 + n])
            start += c
        return out
    out = torch.empty(len(counts), a.shape[0], b.shape[1], dtype=a.dtype, device=a.device) if out is None else out
    start = 0
    for g, c in enumerate(counts):
        if not c:
            out[g].zero_()
        acc = None
        for s0, n in pieces(start, c):
            if acc is None:
                acc = torch.mm(a[:, s0:s0 + n], b[s0:s0 + n])
            else:
                acc.addmm_(a[:, s0:s0 + n], b[s0:s0 + n])
        if acc is not None:
            out[g].copy_(acc)
        start += c
    return out


def mm_floor_fn(experts, idx, bf16: bool, hidden: int):
    """Only the per-expert matmuls of one forward + backward (2 + 4 products per expert, all buffers
    preallocated, no gather, activation, scatter or autograd), with the kernel's row layout (rows padded to its
    ROW_QUANTUM on CPU in bf16): the floor for any kernel built on them."""
    import torch

    from upcycle.core import kernels as K

    E = experts.num_experts
    dt = torch.bfloat16 if bf16 else torch.float32
    w1, w2 = experts.gate_up_proj.detach().to(dt), experts.down_proj.detach().to(dt)  # [E, 2I, H], [E, H, I]
    I = w2.shape[2]
    dev = w1.device
    counts = K.padded_counts(torch.bincount(idx.reshape(-1), minlength=E).tolist(), K._quantum(dt, dev))
    n = sum(counts)
    xs, h1, a = (torch.randn(n, d, device=dev).to(dt) for d in (hidden, 2 * I, I))
    go, da, dh1 = (torch.randn(n, d, device=dev).to(dt) for d in (hidden, I, 2 * I))
    y, dxs = torch.zeros(n, hidden, dtype=dt, device=dev), torch.zeros(n, hidden, dtype=dt, device=dev)
    g1, g2 = torch.zeros_like(w1), torch.zeros_like(w2)  # mapped in before the (single) timed call

    def step():
        K.grouped_mm_loop(xs, w1.transpose(1, 2), counts, out=h1)
        K.grouped_mm_loop(a, w2.transpose(1, 2), counts, out=y)
        K.grouped_mm_loop(go.t(), a, counts, out=g2)
        K.grouped_mm_loop(go, w2, counts, out=da)
        K.grouped_mm_loop(dh1.t(), xs, counts, out=g1)
        K.grouped_mm_loop(dh1, w1, counts, out=dxs)

    return step


def ops_floor_fn(experts, x, idx, w, gout, bf16: bool, hidden: int, casts: bool = False):
    """The 'mm floor' products plus the data movement no kernel made of torch ops can skip: gather the routed
    rows, SiLU(gate) * up and its backward, scale by the routing weight, scatter-add the outputs (and, backward,
    gather the upstream gradient and scatter-add the input gradient), each op once, over all experts' rows at
    once, every buffer preallocated, no sort, no weight cast, no autograd. The dense MLP it is compared with does the
    products and the activation over T rows; an MoE does them over k*T rows and adds the gathers and scatters.

    casts=True (the 'cast floor', bf16 only): also the two copies a bf16 kernel over fp32 master weights cannot
    skip when it runs once per optimizer step (training under autocast, no gradient accumulation): the experts'
    fp32 weights cast to bf16 into preallocated buffers, and their bf16 weight gradients converted to the
    parameters' fp32 (torch's CPU mm has no bf16-in, fp32-out form) expert by expert, as the kernel does."""
    import torch

    from upcycle.core import kernels as K

    E, T = experts.num_experts, x.shape[0]
    dt = torch.bfloat16 if bf16 else torch.float32
    acc = torch.float32
    w1, w2 = experts.gate_up_proj.detach().to(dt), experts.down_proj.detach().to(dt)  # [E, 2I, H], [E, H, I]
    I = w2.shape[2]
    dev = w1.device
    order, token, counts = K._plan(idx, E)
    rows, token, ws, _ = K.pad_rows(counts, token, w.detach().reshape(-1)[order].to(acc), K._quantum(dt, dev), T)
    xz = torch.cat([x.detach().to(dt), x.new_zeros(1, hidden, dtype=dt)])  # row T: the padding rows' zero input
    goz = torch.cat([gout.to(dt), gout.new_zeros(1, hidden, dtype=dt)])
    n = sum(rows)
    wsa, wsc = ws.unsqueeze(1), ws.to(dt).unsqueeze(1)

    # every buffer allocated once, outside the timed step (fresh blocks over 32 MiB would be page-faulted in on
    # every step, which the kernel avoids by chunking; a floor must not pay for it)
    def buf(cols, dtype=dt):
        return torch.empty(n, cols, dtype=dtype, device=dev)

    xs, h1, sg, a, y, yw = buf(hidden), buf(2 * I), buf(I), buf(I), buf(hidden), buf(hidden, acc)
    go, da, dh1, dxs, dxa = buf(hidden), buf(I), buf(2 * I), buf(hidden), buf(hidden, acc)
    g1, g2 = torch.empty_like(w1), torch.empty_like(w2)
    masters = tuple(p.detach().float().clone() for p in (experts.gate_up_proj, experts.down_proj)) if casts else ()
    # with casts the weight-gradient products go straight into fp32 buffers, one expert at a time while the bf16
    # product is in cache (grouped_mm_loop converts), as the kernel does
    gw1, gw2 = (torch.zeros_like(m) for m in masters) if casts else (g1, g2)
    out, gx = torch.empty(T + 1, hidden, dtype=acc, device=dev), torch.empty(T + 1, hidden, dtype=acc, device=dev)
    for t in (xs, h1, sg, a, y, yw, go, da, dh1, dxs, dxa, g1, g2):
        t.zero_()  # mapped in now: the step is built afresh for every round's routing and timed once
    silu_out, silu_backward = torch.ops.aten.silu.out, torch.ops.aten.silu_backward.grad_input

    def step():
        for cast, master in zip((w1, w2), masters):
            cast.copy_(master)
        out.zero_()
        gx.zero_()
        torch.index_select(xz, 0, token, out=xs)
        K.grouped_mm_loop(xs, w1.transpose(1, 2), rows, out=h1)
        silu_out(h1[:, :I], out=sg)
        torch.mul(sg, h1[:, I:], out=a)
        K.grouped_mm_loop(a, w2.transpose(1, 2), rows, out=y)
        torch.mul(y, wsa, out=yw)
        out.index_add_(0, token, yw)
        torch.index_select(goz, 0, token, out=go)
        go.mul_(wsc)
        K.grouped_mm_loop(go.t(), a, rows, out=gw2)
        K.grouped_mm_loop(go, w2, rows, out=da)
        torch.mul(da, sg, out=dh1[:, I:])
        silu_backward(da.mul_(h1[:, I:]), h1[:, :I], grad_input=dh1[:, :I])
        K.grouped_mm_loop(dh1.t(), xs, rows, out=gw1)
        K.grouped_mm_loop(dh1, w1, rows, out=dxs)
        dxa.copy_(dxs)
        gx.index_add_(0, token, dxa)

    # output, input gradient (row T: padding), expert weight gradients (fp32 with casts=True)
    step.results = (out, gx, gw1, gw2)
    return step


def timed(fn, device) -> float:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def run_cell(layout, dtype, T, impls, args, device):

    dense, experts, cfg, (E, k, G) = build(layout, device, args.hidden, args.intermediate)
    x, idx, w, gout = make_inputs(T, E, k, args.hidden, device)
    bf16 = dtype == "bf16"
    steps = {"dense": step_fn(dense, x, idx, w, gout, bf16, moe=False)}
    skipped = {}
    I_e = args.intermediate // G
    for impl in impls:
        if impl == "batched_mm":
            gather_gb = T * k * 3 * args.hidden * I_e * 4 / 1e9  # fp32 parameters are gathered, then cast
            if gather_gb > args.batched_limit_gb:
                skipped[impl] = f"weight gather {gather_gb:.0f} GB > {args.batched_limit_gb:g} GB"
                continue
        steps[impl] = impl
    if args.floor:
        steps["mm floor"] = None  # built per round, for that round's routing
        steps["ops floor"] = None
        if bf16:
            steps[CAST_FLOOR] = None
    times = {name: [] for name in steps}
    ratios = {name: [] for name in steps if name != "dense"}

    def run(name, idx):
        if name == "dense":
            return timed(steps[name], device)
        if name == "mm floor":
            return timed(mm_floor_fn(experts, idx, bf16, args.hidden), device)
        if name == "ops floor":
            return timed(ops_floor_fn(experts, x, idx, w, gout, bf16, args.hidden), device)
        if name == CAST_FLOOR:
            return timed(ops_floor_fn(experts, x, idx, w, gout, bf16, args.hidden, casts=True), device)
        from upcycle.core import kernels as K

        quantum, mm = K.ROW_QUANTUM, K.grouped_mm
        if name in (WHOLE, SPLIT):
            K.ROW_QUANTUM = 0
            if name == SPLIT and device.type == "cpu" and bf16:
                K.grouped_mm = split_grouped_mm
            name = "upcycle"
        elif row_quantum_of(name) is not None:
            K.ROW_QUANTUM, name = row_quantum_of(name), "upcycle"
        cfg._experts_implementation = name  # the decorator reads it at every call
        try:
            return timed(step_fn(experts, x, idx, w, gout, bf16, moe=True), device)
        finally:
            K.ROW_QUANTUM, K.grouped_mm = quantum, mm

    names = list(steps)
    for r in range(args.warmup + args.repeats):
        # a routing of its own for every implementation in every round: one shared by the round would hand the
        # shapes the first implementation paid for to the ones timed after it
        round_t = {name: run(name, idx if args.fixed_routing else
                             make_routing(T, E, k, device, seed=100 + r * len(names) + j))
                   for j, name in enumerate(names)}
        if r < args.warmup:
            continue
        for name, t in round_t.items():
            times[name].append(t)
            if name != "dense":
                ratios[name].append(t / round_t["dense"])
    rows = []
    dense_ms = statistics.median(times["dense"]) * 1e3
    for name in ["dense", *impls, *(["mm floor", "ops floor"] if args.floor else []),
                 *([CAST_FLOOR] if args.floor and bf16 else [])]:
        row = dict(layout=layout, experts=E, top_k=k, granularity=G, dtype=dtype, tokens=T, impl=name)
        if name in skipped:
            row.update(skipped=skipped[name])
        elif name == "dense":
            row.update(ms=dense_ms, ratio=1.0, ms_all=[t * 1e3 for t in times[name]])
        else:
            ratio = statistics.median(ratios[name])
            row.update(ms=statistics.median(times[name]) * 1e3, ratio=ratio, vs_ideal=ratio / IDEAL,
                       meets_target=ratio / IDEAL <= TARGET, ratios_all=ratios[name])
        rows.append(row)
    return rows


def print_table(rows, header: str) -> None:
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:  # pragma: no cover
        Console = None
    cols = ["layout", "dtype", "tokens", "impl", "ms", "x dense", "x ideal", "<= 1.10"]

    def cells(r):
        if "skipped" in r:
            return [r["layout"], r["dtype"], str(r["tokens"]), r["impl"], "skipped", r["skipped"], "", ""]
        if r["impl"] == "dense":
            return [r["layout"], r["dtype"], str(r["tokens"]), "dense MLP", f"{r['ms']:.1f}", "1.00", "", ""]
        return [r["layout"], r["dtype"], str(r["tokens"]), r["impl"], f"{r['ms']:.1f}", f"{r['ratio']:.2f}",
                f"{r['vs_ideal']:.2f}", "yes" if r["meets_target"] else "no"]

    if Console is not None:
        t = Table(title=header)
        for c in cols:
            t.add_column(c, justify="left" if c in ("layout", "dtype", "impl") else "right")
        for r in rows:
            t.add_row(*cells(r))
        Console(width=max(100, Console().width)).print(t)
        return
    print(header)
    print(" | ".join(cols))
    for r in rows:
        print(" | ".join(cells(r)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", default="4096,128")
    ap.add_argument("--dtypes", default="fp32,bf16")
    ap.add_argument("--layouts", default="coarse,fine")
    ap.add_argument("--impls", default=",".join(IMPLS))
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: the usable CPU cores)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--hidden", type=int, default=HIDDEN)
    ap.add_argument("--intermediate", type=int, default=INTERMEDIATE)
    ap.add_argument("--batched-limit-gb", type=float, default=2.0)
    ap.add_argument("--no-floor", dest="floor", action="store_false",
                    help="leave out the 'mm floor' row (the per-expert matmuls alone), the 'ops floor' row "
                         "(those plus the gathers, activation and scatters any kernel of torch ops runs) and, in "
                         "bf16, the 'cast floor' row (that plus casting fp32 master weights and gradients)")
    ap.add_argument("--fixed-routing", action="store_true",
                    help="one routing for every round (default: a fresh draw per round, as in training)")
    add_arguments(ap)
    ap.add_argument("--quick", action="store_true", help="smoke run: 512 and 128 tokens, 2 rounds after 1 warm-up")
    args = ap.parse_args()
    if args.quick:
        args.tokens, args.repeats, args.warmup = "512,128", 2, 1

    import torch

    from upcycle.core.kernels import register_experts_kernel

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    threads = args.threads or cores
    torch.set_num_threads(threads)
    device = torch.device(args.device)
    record = Run("bench_experts", gpu=torch.cuda.get_device_name(device) if device.type == "cuda" else None)
    machine = record.meta["machine"]
    if not register_experts_kernel():
        print("the upcycle kernel declined on this machine; it is left out", file=sys.stderr)
    impls = [i for i in args.impls.split(",") if i]
    header = (f"{device.type}: {machine.get('gpu') or machine['cpu']} ({' '.join(machine['flags'] or ['?'])}), "
              f"torch {torch.__version__}, {threads} threads; "
              f"bf16 {'native' if bf16_native(device) else 'emulated'}; "
              f"experts fwd+bwd, router excluded; median of {args.repeats} rounds after {args.warmup} warm-up")
    rows = []
    for T in [int(t) for t in args.tokens.split(",")]:
        for dtype in args.dtypes.split(","):
            for layout in args.layouts.split(","):
                cell = run_cell(layout, dtype, T, impls, args, device)
                rows += cell
                print_table(cell, f"{layout} {dtype} {T} tokens")
    print_table(rows, header)
    # a smoke run or another MLP shape is not the benchmark the docs show: written only where --json says
    standard = not args.quick and (args.hidden, args.intermediate) == (HIDDEN, INTERMEDIATE)
    meta = dict(device=device.type, threads=threads, hidden=args.hidden, intermediate=args.intermediate,
                repeats=args.repeats, warmup=args.warmup, ideal=IDEAL, target=TARGET,
                bf16_native=bf16_native(device), glibc_tunables=os.environ.get("GLIBC_TUNABLES"),
                timed="experts module forward+backward, router excluded", fixed_routing=args.fixed_routing,
                row_quantum=__import__("upcycle.core.kernels", fromlist=["ROW_QUANTUM"]).ROW_QUANTUM)
    record.write(dict(meta=meta, rows=rows), record.path(args.json, args.variant, default=standard))


if __name__ == "__main__":
    main()
