"""The evidence behind each default of `upcycle convert` and `upcycle train`, gathered from the committed study files.

Nothing is run: every number comes from a committed results file (docs/study*.json, docs/router_probe*.json) and
the number of documents each comparison rests on from docs/study_documents.json (benchmarks/study_documents.py).
For each default (the k-means router, the MLP's learning-rate multiplier, the renormalised routing rule) it lists
the comparisons that decide it, with their intervals over blocks as committed, the documents behind them, and
whether `upcycle eval`'s document rule (at least MIN_DOCUMENTS documents) would give them a verdict now.

    python benchmarks/study_defaults.py --json docs/study_defaults.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
DOCS = ROOT / "docs"


def _load(name: str) -> dict:
    return json.loads((DOCS / name).read_text())


def _documents(docs: dict, study: str) -> int | None:
    for s in docs["studies"]:
        if Path(s["study"]).name == study:
            return s["documents"]
    return None


def _paired(docs: dict, study: str, comparison: str, what: str) -> dict:
    c = _load(study)["summary"]["paired"][comparison]
    return {"what": what, "file": f"docs/{study}", "mean": c["mean"], "ci95_over_blocks": c["ci95"],
            "blocks": c["blocks"], "documents": _documents(docs, study)}


def _final_val(study: str, curve: str) -> float:
    return _load(study)["curves"][curve][-1]["val_loss"]


def gather() -> dict:
    from upcycle.evaluate.stats import MIN_DOCUMENTS

    docs = _load("study_documents.json")
    pairs = {(p["seed"], p["a"], p["b"]): p for p in _load("study_pairs.json")["pairs"]}
    pooled = _load("study_expert_lr05_144_pooled.json")["comparisons"]["same_tokens"]["pooled"]
    probe = {a["arm"]: a for a in _load("router_probe.json")["arms"]}
    centred = _load("router_probe_centred.json")["arms"][0]

    mult = {
        "default": 0.5,
        "paired": [
            _paired(docs, "study_default.json", "same_tokens", "seed 0, 96 steps: k-means MoE, experts x1.0, minus "
                    "dense, MLP x1.0"),
            _paired(docs, "study_kmeans_raw_seed1.json", "same_tokens", "seed 1, 96 steps: the same"),
            _paired(docs, "study_expert_lr05_seed0.json", "same_tokens", "seed 0, 96 steps: k-means MoE, experts "
                    "x0.5, minus dense, MLP x0.5"),
            _paired(docs, "study_expert_lr05_seed1.json", "same_tokens", "seed 1, 96 steps: the same"),
            _paired(docs, "study_expert_lr05_seed0_144.json", "same_tokens", "seed 0, 144 steps: the same"),
            _paired(docs, "study_expert_lr05_seed1_144.json", "same_tokens", "seed 1, 144 steps: the same"),
            {"what": "both seeds pooled, 144 steps", "file": "docs/study_expert_lr05_144_pooled.json",
             "mean": pooled["mean"], "ci95_over_blocks": pooled["ci95"], "blocks": pooled["blocks"],
             "documents": sum(_documents(docs, f) for f in ("study_expert_lr05_seed0_144.json",
                                                              "study_expert_lr05_seed1_144.json"))},
        ],
        # each side's own held-out loss at the end of 96 steps (24 blocks, not paired): x0.5 against x1.0
        "final_val_loss_96_steps": [
            {"side": side, "seed": seed, "x1.0": _final_val(f1, curve), "x0.5": _final_val(f5, curve)}
            for seed, f1, f5 in ((0, "study_default.json", "study_expert_lr05_seed0.json"),
                                 (1, "study_kmeans_raw_seed1.json", "study_expert_lr05_seed1.json"))
            for side, curve in (("MoE", "moe"), ("dense", "dense_same_tokens"))],
    }
    router = {
        "default": "kmeans (for --routing renorm)",
        "paired": [
            {"what": f"seed {seed}, 96 steps, experts x1.0: random router minus k-means router",
             "file": "docs/study_pairs.json", "mean": p["mean"], "ci95_over_blocks": p["ci95"], "blocks": p["blocks"],
             "documents": _documents(docs, "study_random.json" if seed == 0 else "study_random_seed1.json")}
            for (seed, a, b), p in sorted(pairs.items())],
        "not_measured": "the random router with the experts at x0.5 (the multiplier that made the k-means MoE "
                        "level with, then ahead of, its parent trained the same way)",
    }
    routing = {
        "default": "renorm",
        "router_probe_40_steps": [
            {"arm": name, "exact": probe[name]["exact_claimed"], "entropy_first": probe[name]["entropy_frac_first"],
             "entropy_last": probe[name]["entropy_frac_last"], "train_loss_last": probe[name]["loss_last"]}
            for name in ("softmax-zero", "softmax-kmeans", "renorm-kmeans", "default")]
        + [{"arm": "default, centred rows", "exact": centred["exact_claimed"],
            "entropy_first": centred["entropy_frac_first"], "entropy_last": centred["entropy_frac_last"],
            "train_loss_last": centred["loss_last"]}],
    }
    for block, (first, second) in ((mult, ("MoE", "dense")), (router, ("random router", "k-means router"))):
        for row in block["paired"]:
            lo, hi = row["ci95_over_blocks"]
            row["then"] = (f"{first} better" if hi < 0 else f"{second} better" if lo > 0
                           else "no significant difference")
            row["verdict_now"] = ("too few documents" if row["documents"] is not None and row["documents"] < MIN_DOCUMENTS
                                  else "needs the interval over documents")
    return {"min_documents": MIN_DOCUMENTS, "mlp_lr_mult": mult, "router_init": router, "routing": routing,
            "sources": sorted({r["file"] for b in (mult, router) for r in b["paired"]}
                              | {"docs/router_probe.json", "docs/router_probe_centred.json",
                                 "docs/study_documents.json"})}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", type=Path, help="write the evidence here")
    args = ap.parse_args(argv)
    res = gather()
    for name in ("mlp_lr_mult", "router_init"):
        print(f"{name} (default {res[name]['default']}):")
        for r in res[name]["paired"]:
            lo, hi = r["ci95_over_blocks"]
            print(f"  {r['what']}: {r['mean']:+.4f} [{lo:+.4f}, {hi:+.4f}] over {r['blocks']} blocks of "
                  f"{r['documents']} documents ({r['then']}; now: {r['verdict_now']})")
    for r in res["mlp_lr_mult"]["final_val_loss_96_steps"]:
        print(f"  {r['side']} seed {r['seed']}: held-out loss x1.0 {r['x1.0']:.4f}, x0.5 {r['x0.5']:.4f}")
    print("routing (default renorm), router probe at 40 steps:")
    for r in res["routing"]["router_probe_40_steps"]:
        print(f"  {r['arm']}: exact {r['exact']}, entropy {r['entropy_first']:.4f} -> {r['entropy_last']:.4f}, "
              f"train loss {r['train_loss_last']:.4f}")
    if args.json:
        res["command"] = " ".join(["python", "benchmarks/study_defaults.py", *(argv if argv is not None
                                                                                 else sys.argv[1:])])
        args.json.write_text(json.dumps(res, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
