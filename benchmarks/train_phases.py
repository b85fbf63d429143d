"""Where the time of one `upcycle train` step goes: each phase of the real training loop, timed in place.

Runs `upcycle.train.train()` on a model (by default the SmolLM2-135M 8 x top-2 upcycle that bench_train.py uses,
or its dense parent with --dense) with the functions the loop calls wrapped in timers: the backward pass
(accelerate's `backward`), the router-gradient split (`RouterGradients.add` and `.summary`), the router losses,
the routing statistics, the gradient norm folded into the fused AdamW (`clip_into_fused_adamw`) and the optimizer
step. "forward and the rest" is the step time (metrics.jsonl) minus those phases. Times are the mean over the steps
after --skip (the first pays for allocating AdamW's states). Use it to bisect a slow step before changing code;
bench_train.py is the throughput table.

    python benchmarks/train_phases.py [--dense] [--steps 6] [--skip 2] [--seq-len 256] [--batch-size 2]
                                      [--precision fp32] [--model DIR] [--json PATH] [--work DIR]

Results go to docs/results/train_phases/<machine>[-<variant>].json unless --json says otherwise (a run on
--model writes only where --json says; benchmarks/_results.py).
"""

from __future__ import annotations

import argparse
import collections
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _results import Run, add_arguments  # noqa: E402

PHASES = (  # (module, attribute path, label): what the loop calls, wrapped in place
    ("accelerate", "Accelerator.backward", "backward"),
    ("torch.optim", "AdamW.step", "AdamW step"),
    ("upcycle.train.freeze", "clip_into_fused_adamw", "gradient norm (clip folded into AdamW)"),
    ("upcycle.train.losses", "RouterGradients.add", "router-gradient split: router-loss part"),
    ("upcycle.train.losses", "RouterGradients.summary", "router-gradient split: norms"),
    ("upcycle.train.losses", "router_losses", "router losses (aux, z)"),
    ("upcycle.train.losses", "RoutingStats.update", "routing statistics: update"),
    ("upcycle.train.losses", "RoutingStats.summary", "routing statistics: summary"),
)


def _wrap(times: dict) -> None:
    import importlib

    for module, path, label in PHASES:
        owner = importlib.import_module(module)
        *outer, name = path.split(".")
        for part in outer:
            owner = getattr(owner, part)
        fn = getattr(owner, name)

        def timed(*a, _fn=fn, _label=label, **k):
            t0 = time.perf_counter()
            try:
                return _fn(*a, **k)
            finally:
                times[_label].append(time.perf_counter() - t0)

        setattr(owner, name, timed)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dense", action="store_true", help="time the dense parent instead of the MoE")
    ap.add_argument("--model", type=Path, help="a model folder to train instead (MoE or dense)")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--skip", type=int, default=2, help="steps left out of the means")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--precision", default="fp32")
    add_arguments(ap)
    ap.add_argument("--work", type=Path, help="scratch folder (default: a new temp folder, removed at the end)")
    args = ap.parse_args()
    if args.steps <= args.skip:
        raise SystemExit("--steps must exceed --skip")
    record = Run("train_phases")

    import upcycle.train.checkpoint as ck
    from bench_train import _machine_extra, _models, skip_final_save, train_data
    from upcycle.train import TrainConfig, train

    work = Path(tempfile.mkdtemp(prefix="train-phases-", dir=args.work))
    try:
        if args.model:
            model = args.model
        else:
            dense, moe = _models(work, None)
            model = dense if args.dense else moe
        times: dict = collections.defaultdict(list)
        _wrap(times)
        skip_final_save()
        out = work / "run"
        cfg = TrainConfig(model=str(model), data=train_data(), out=out,
                          steps=args.steps, seq_len=args.seq_len, batch_size=args.batch_size, precision=args.precision,
                          save_every=0, eval_every=0, seed=0)
        train(cfg)
        rows = [json.loads(line) for line in (out / ck.METRICS).read_text().splitlines()]
        run = json.loads((out / ck.RUN_FILE).read_text())
    finally:
        shutil.rmtree(work, ignore_errors=True)

    kept = range(args.skip, args.steps)
    step_s = sum(rows[i]["step_time"] for i in kept) / len(kept)
    phases = {}
    for label, ts in times.items():
        per_step = len(ts) // args.steps if len(ts) >= args.steps else 1
        tail = ts[args.skip * per_step:]
        phases[label] = sum(tail) / len(kept)
    phases["forward and the rest"] = step_s - sum(phases.values())
    machine = {**record.meta["machine"], **_machine_extra()}
    name = Path(str(model)).name
    lines = [f"upcycle train step phases, {name} ({run['experts_impl'] or 'dense'}), {args.seq_len} x {args.batch_size} "
             f"tokens, {args.precision}, {run.get('optimizer', 'AdamW')}; mean of steps {args.skip + 1}-{args.steps}; "
             f"{machine['cpu']} ({' '.join(machine['flags'] or ['?'])}), torch {record.meta['software']['torch']}", "",
             "| phase | s/step | share |", "|---|---:|---:|"]
    for label, s in sorted(phases.items(), key=lambda kv: -kv[1]):
        lines.append(f"| {label} | {s:.3f} | {s / step_s:.0%} |")
    lines.append(f"| **whole step** | **{step_s:.3f}** | |")
    print("\n".join(lines))
    # another model than the SmolLM2 pair is not the benchmark the docs show: written only where --json says
    record.write({"model": name, "experts_impl": run["experts_impl"], "seq_len": args.seq_len,
                  "batch_size": args.batch_size, "precision": args.precision, "steps": args.steps, "skip": args.skip,
                  "step_s": step_s, "step_s_all": [r["step_time"] for r in rows], "phases_s": phases},
                 record.path(args.json, args.variant, default=args.model is None),
                 machine_extra={k: machine[k] for k in ("capability", "bf16_native")}, indent=2)

if __name__ == "__main__":
    main()
