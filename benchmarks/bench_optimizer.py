"""The per-parameter part of a training step: AdamW implementations and gradient clipping, per 100M parameters.

`upcycle train` pays these once per optimizer step for every trainable parameter, whatever the batch: 692M for
the SmolLM2 8 x top-2 upcycle against 134.5M for its dense parent, so at small batches they decide much of the
MoE / dense throughput ratio (benchmarks/bench_train.py). Cases, on --params fp32 parameters in tensors of
--tensor-size elements with random gradients (AdamW betas 0.9, 0.95, weight decay 0.1, as `upcycle train`):

- AdamW for-loop / foreach / fused: `optimizer.step()` of torch's three implementations.
- clip_grad_norm_: torch's norm + scale (what accelerate runs on one process or DDP).
- fused AdamW + folded clip: upcycle's path, the global norm then the fused step with the clip divisor
  (upcycle.train.freeze.clip_into_fused_adamw), once with gradients over the limit (the kernel divides them and
  writes them back) and once under it (no divisor is set).
- memory: three streaming passes over the same number of fp32 elements (a sum, a copy, an in-place add), the
  machine's memory rates. "GB/s" is each case's minimum traffic (bytes per parameter: AdamW reads the parameter,
  its gradient and two moments and writes three of them, 28 B; the norm reads the gradient, 4 B; a divisor writes
  the gradient back, 4 B) over its time: an optimizer case near the in-place add's rate is bound by memory, and
  no implementation of the same update in fp32 can be much faster.

Each case: one untimed step, then the median of --repeats timed steps.

    python benchmarks/bench_optimizer.py [--params 100M] [--tensor-size 2000000] [--repeats 5] [--json PATH]

Results go to docs/results/bench_optimizer/<machine>[-<variant>].json unless --json says otherwise
(benchmarks/_results.py).
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", type=float, default=100e6)
    ap.add_argument("--tensor-size", type=int, default=2_000_000)
    ap.add_argument("--repeats", type=int, default=5)
    add_arguments(ap)
    args = ap.parse_args()
    record = Run("bench_optimizer")

    import torch

    from upcycle.train.freeze import adamw, clear_fused_clip, clip_into_fused_adamw

    n = max(1, int(args.params) // args.tensor_size)
    total = n * args.tensor_size
    g = torch.Generator().manual_seed(0)

    def fresh():
        ps = [torch.nn.Parameter(torch.randn(args.tensor_size, generator=g)) for _ in range(n)]
        for p in ps:
            p.grad = torch.randn(args.tensor_size, generator=g)
        return ps

    def timed(fn) -> float:
        fn()
        ts = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t0)
        return statistics.median(ts)

    rows = []  # (case, seconds, minimum bytes moved per parameter)
    for impl in ("for-loop", "foreach", "fused"):
        ps = fresh()
        opt, _ = adamw([{"params": ps, "weight_decay": 0.1}], lr=1e-4, betas=(0.9, 0.95), eps=1e-8, impl=impl)
        rows.append(("AdamW " + impl, timed(opt.step), 28))
        del opt, ps
    ps = fresh()
    rows.append(("clip_grad_norm_", timed(lambda: torch.nn.utils.clip_grad_norm_(ps, 1.0)), 12))
    opt, _ = adamw([{"params": ps, "weight_decay": 0.1}], lr=1e-4, betas=(0.9, 0.95), eps=1e-8, impl="fused")

    def folded(max_norm):
        clip_into_fused_adamw(opt, ps, max_norm)
        opt.step()
        clear_fused_clip(opt)

    rows.append(("fused AdamW + folded clip, clipped", timed(lambda: folded(1.0)), 36))  # random grads: norm >> 1
    rows.append(("fused AdamW + folded clip, under the limit", timed(lambda: folded(1e30)), 32))
    opt = ps = None  # free them before the memory cases
    a, b = torch.randn(total, generator=g), torch.randn(total, generator=g)
    rows.append(("memory: read (sum)", timed(a.sum), 4))
    rows.append(("memory: copy", timed(lambda: b.copy_(a)), 8))
    rows.append(("memory: in-place add", timed(lambda: a.add_(b, alpha=0.5)), 12))
    per = 100e6 / total
    machine = record.meta["machine"]
    head = (f"{machine['cpu']} ({' '.join(machine['flags'] or ['?'])}), torch {torch.__version__}, "
            f"{torch.get_num_threads()} threads; "
            f"{total / 1e6:.0f}M fp32 parameters in {n} tensors; median of {args.repeats}; "
            f"1-min load {os.getloadavg()[0]:.1f}")
    print(head)
    print("| case | s per step | s per 100M params | minimum bytes per param | GB/s |")
    print("|---|---:|---:|---:|---:|")
    for name, t, nbytes in rows:
        print(f"| {name} | {t:.3f} | {t * per:.3f} | {nbytes} | {nbytes * total / t / 1e9:.1f} |")
    record.write({"threads": torch.get_num_threads(), "params": total, "tensors": n, "repeats": args.repeats,
                  "load_avg_1min_after": os.getloadavg()[0],
                  "rows": [{"case": name, "s": t, "s_per_100M": t * per, "bytes_per_param": nb,
                            "gb_per_s": nb * total / t / 1e9} for name, t, nb in rows]},
                 record.path(args.json, args.variant))


if __name__ == "__main__":
    main()
