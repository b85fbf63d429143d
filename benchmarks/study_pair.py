"""Two finished study runs against each other on the study's own held-out blocks: which MoE recipe is better at the
same seed, data and budget, with a paired 95% interval (benchmarks/study.py compares each arm with the dense
parent only; arms share that parent's blocks, so this is the direct comparison of two arms).

    python benchmarks/study_pair.py --work /work/study --seed 0 \\
        --pair random-router=run-moe-random-router-626e2c7927,kmeans=run-moe-default-9e3c4bc170

Each --pair is A=RUN_A,B=RUN_B (run folders under --work, each with a final/ model); the result is A - B in
nats per token (negative: A is better), through `upcycle eval` with B as the reference. --seq-len,
--final-blocks, --heldout-fraction and --seed must be the study's (its defaults are). Results go to
docs/results/study_pair/<machine>[-<variant>].json unless --json says otherwise; a file that exists keeps its
other pairs (one run per seed adds to it; benchmarks/_results.py).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from _results import Run, add_arguments


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", type=Path, required=True, help="the study's folder")
    ap.add_argument("--pair", action="append", required=True, help="A=RUN_A,B=RUN_B (repeatable)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--final-blocks", type=int, default=64)
    ap.add_argument("--heldout-fraction", type=float, default=0.1)
    add_arguments(ap)
    args = ap.parse_args(argv)
    record = Run("study_pair", argv=None if argv is None else [sys.argv[0], *argv])

    from study import _paired, study_data  # this folder: the study's corpus and its paired comparison

    data = study_data()
    results = []
    for spec in args.pair:
        try:
            (name_a, run_a), (name_b, run_b) = (part.split("=", 1) for part in spec.split(","))
        except ValueError:
            ap.error(f"--pair {spec!r}: use A=RUN_A,B=RUN_B")
        for run in (run_a, run_b):
            if not (args.work / run / "final").is_dir():
                ap.error(f"{args.work / run} has no final model")
        c = _paired(args.work / run_a / "final", args.work / run_b / "final", data,
                    args.work / f"pair-{run_a}-vs-{run_b}", args)
        row = {"a": name_a, "b": name_b, "run_a": run_a, "run_b": run_b, "seed": args.seed,
               "loss_a": c["moe_loss"], "loss_b": c["dense_loss"], "mean": c["mean"], "ci95": c["ci95"],
               "blocks": c["blocks"]}
        results.append(row)
        lo, hi = row["ci95"]
        verdict = "A better" if hi < 0 else "B better" if lo > 0 else "no significant difference"
        print(f"seed {args.seed}: {name_a} - {name_b} = {row['mean']:+.4f} nats, 95% CI [{lo:+.4f}, {hi:+.4f}] over "
              f"{row['blocks']} held-out blocks ({verdict}; {row['loss_a']:.4f} vs {row['loss_b']:.4f})")
    path = record.path(args.json, args.variant)
    old = json.loads(path.read_text()) if path.is_file() else {}
    done = {(r["run_a"], r["run_b"]) for r in results}
    pairs = [r for r in old.get("pairs", []) if (r["run_a"], r["run_b"]) not in done] + results
    # every command that added pairs to this file, so each pair can be traced to the run that wrote it
    commands = sorted(set(old.get("commands", [])) | {record.meta["command"]})
    record.write({"commands": commands, "pairs": pairs}, path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
