"""The evidence behind each default of `upcycle convert` and `upcycle train`, gathered from the committed study files.

Nothing is run: every number comes from a committed results file under docs/results/ (study, study_pair,
study_pool, router_probe) and the number of documents each comparison rests on from the study_documents results
(benchmarks/study_documents.py; --documents, default the newest file in docs/results/study_documents/). For each
default (the k-means router, the MLP's learning-rate multiplier, the renormalised routing rule) it lists the
comparisons that decide it, with their intervals over blocks as committed, the documents behind them, and whether
`upcycle eval`'s document rule (at least MIN_DOCUMENTS documents) gives them a verdict.

    python benchmarks/study_defaults.py

The results go to docs/results/study_defaults/<machine>.json unless --json says otherwise (benchmarks/_results.py).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from _results import RESULTS, Run, add_arguments  # noqa: E402

# the committed results each default rests on (paths under docs/results/)
KMEANS = {0: "study/xeon-amx-kmeans.json", 1: "study/unrecorded-kmeans-uncentred-seed1.json"}
LR05 = {0: "study/unrecorded-expert-lr05-seed0.json", 1: "study/unrecorded-expert-lr05-seed1.json"}
LR05_144 = {0: "study/epyc-avx2-expert-lr05-144-seed0.json", 1: "study/epyc-avx2-expert-lr05-144-seed1.json"}
POOLED_144 = "study_pool/epyc-avx2-expert-lr05-144.json"
RANDOM = {0: "study/unrecorded-random-router.json", 1: "study/unrecorded-random-router-seed1.json"}
PAIRS = "study_pair/unrecorded-random-vs-kmeans.json"
PROBE, PROBE_CENTRED = "router_probe/xeon-amx.json", "router_probe/unrecorded-centred.json"


def _load(rel: str) -> dict:
    return json.loads((RESULTS / rel).read_text())


def _file(rel: str) -> str:
    return f"docs/results/{rel}"


def _documents(docs: dict, study: str) -> int | None:
    for s in docs["studies"]:
        if s["study"] == _file(study):
            return s["documents"]
    return None


def _paired(docs: dict, study: str, comparison: str, what: str) -> dict:
    c = _load(study)["summary"]["paired"][comparison]
    return {"what": what, "file": _file(study), "mean": c["mean"], "ci95_over_blocks": c["ci95"],
            "blocks": c["blocks"], "documents": _documents(docs, study)}


def _relative(path: Path) -> str:
    path = path.resolve()
    return path.relative_to(ROOT).as_posix() if path.is_relative_to(ROOT) else str(path)


def newest_documents() -> Path:
    files = sorted((RESULTS / "study_documents").glob("*.json"))
    if not files:
        raise SystemExit("no docs/results/study_documents/*.json: run benchmarks/study_documents.py first")
    return max(files, key=lambda p: json.loads(p.read_text()).get("date") or "")


def _final_val(study: str, curve: str) -> float:
    return _load(study)["curves"][curve][-1]["val_loss"]


def gather(documents: Path) -> dict:
    from upcycle.evaluate.stats import MIN_DOCUMENTS

    docs = json.loads(documents.read_text())
    pairs = {(p["seed"], p["a"], p["b"]): p for p in _load(PAIRS)["pairs"]}
    pooled = _load(POOLED_144)["comparisons"]["same_tokens"]["pooled"]
    probe = {a["arm"]: a for a in _load(PROBE)["arms"]}
    centred = _load(PROBE_CENTRED)["arms"][0]

    mult = {
        "default": 0.5,
        "paired": [
            _paired(docs, KMEANS[0], "same_tokens", "seed 0, 96 steps: k-means MoE, experts x1.0, minus "
                    "dense, MLP x1.0"),
            _paired(docs, KMEANS[1], "same_tokens", "seed 1, 96 steps: the same"),
            _paired(docs, LR05[0], "same_tokens", "seed 0, 96 steps: k-means MoE, experts "
                    "x0.5, minus dense, MLP x0.5"),
            _paired(docs, LR05[1], "same_tokens", "seed 1, 96 steps: the same"),
            _paired(docs, LR05_144[0], "same_tokens", "seed 0, 144 steps: the same"),
            _paired(docs, LR05_144[1], "same_tokens", "seed 1, 144 steps: the same"),
            {"what": "both seeds pooled, 144 steps", "file": _file(POOLED_144),
             "mean": pooled["mean"], "ci95_over_blocks": pooled["ci95"], "blocks": pooled["blocks"],
             "documents": sum(_documents(docs, f) for f in LR05_144.values())},
        ],
        # each side's own held-out loss at the end of 96 steps (24 blocks, not paired): x0.5 against x1.0
        "final_val_loss_96_steps": [
            {"side": side, "seed": seed, "x1.0": _final_val(f1, curve), "x0.5": _final_val(f5, curve)}
            for seed, f1, f5 in ((0, KMEANS[0], LR05[0]), (1, KMEANS[1], LR05[1]))
            for side, curve in (("MoE", "moe"), ("dense", "dense_same_tokens"))],
    }
    router = {
        "default": "kmeans (for --routing renorm)",
        "paired": [
            {"what": f"seed {seed}, 96 steps, experts x1.0: random router minus k-means router",
             "file": _file(PAIRS), "mean": p["mean"], "ci95_over_blocks": p["ci95"], "blocks": p["blocks"],
             "documents": _documents(docs, RANDOM[seed])}
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
                              | {_file(PROBE), _file(PROBE_CENTRED),
                                 _relative(documents)})}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--documents", type=Path, default=None, help="a benchmarks/study_documents.py results file "
                                                                  "(default: the newest in docs/results/study_documents/)")
    add_arguments(ap, "the evidence")
    args = ap.parse_args(argv)
    record = Run("study_defaults", argv=None if argv is None else [sys.argv[0], *argv])
    res = gather(args.documents or newest_documents())
    for name in ("mlp_lr_mult", "router_init"):
        print(f"{name} (default {res[name]['default']}):")
        for r in res[name]["paired"]:
            lo, hi = r["ci95_over_blocks"]
            print(f"  {r['what']}: {r['mean']:+.4f} [{lo:+.4f}, {hi:+.4f}] over {r['blocks']} blocks of "
                  f"{r['documents']} documents ({r['then']}; by the document rule: {r['verdict_now']})")
    for r in res["mlp_lr_mult"]["final_val_loss_96_steps"]:
        print(f"  {r['side']} seed {r['seed']}: held-out loss x1.0 {r['x1.0']:.4f}, x0.5 {r['x0.5']:.4f}")
    print("routing (default renorm), router probe at 40 steps:")
    for r in res["routing"]["router_probe_40_steps"]:
        print(f"  {r['arm']}: exact {r['exact']}, entropy {r['entropy_first']:.4f} -> {r['entropy_last']:.4f}, "
              f"train loss {r['train_loss_last']:.4f}")
    record.write(res, record.path(args.json, args.variant))
    return 0


if __name__ == "__main__":
    sys.exit(main())
