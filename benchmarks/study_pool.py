"""Pool one study arm's final paired comparisons over seeds: a fixed-effect (inverse-variance) estimate of
MoE - dense, with its 95% interval and a heterogeneity check.

Each seed of `benchmarks/study.py` holds out other blocks, orders the data otherwise and initialises the routers
otherwise, so the seeds' paired comparisons are independent estimates of the same difference. Each seed's
interval is a Student-t interval over its held-out blocks (upcycle eval's), so its standard error is
half-width / t_{0.975, n-1}; the pooled mean weights each seed by 1 / SE^2 and its standard error is
1 / sqrt(sum of the weights), with the t quantile at the blocks' total degrees of freedom. Cochran's Q says
whether the seeds disagree by more than their own intervals allow (with two seeds it has one degree of freedom;
Q above 3.84 is a disagreement at 5%). What this does not capture: a seed-to-seed spread beyond the held-out
sampling, if there is one (with two or three seeds it cannot be estimated; Q is the check).

    python benchmarks/study_pool.py docs/results/study/epyc-avx2-expert-lr05-144-seed0.json \\
        docs/results/study/epyc-avx2-expert-lr05-144-seed1.json [--json PATH] [--variant NAME]

Results go to docs/results/study_pool/<machine>[-<variant>].json unless --json says otherwise
(benchmarks/_results.py).

The study JSONs must be one arm at one budget: every setting equal except the seed (and where files went).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _results import Run, add_arguments  # noqa: E402

# settings that may differ between the pooled runs: the seed, where the study wrote things, how often it
# checkpointed, and whether it also ran the same-FLOPs arm (none of these changes the same-tokens pair)
FREE = {"seed", "work", "json", "plot", "variant", "lock", "no_same_flops", "save_every"}
COMPARISONS = ("same_tokens", "same_flops")


class PoolError(ValueError):
    pass


def pool(estimates: list[dict]) -> dict:
    """Fixed-effect pool of [{"mean", "ci95", "blocks"}, ...] (paired differences with Student-t intervals)."""
    from upcycle.evaluate.stats import t975

    if not estimates:
        raise PoolError("nothing to pool")
    # an interval over documents (upcycle eval since it groups blocks by document) has documents - 1 degrees of
    # freedom; one over blocks (the committed studies) blocks - 1
    units = [e.get("documents") or e["blocks"] for e in estimates]
    ses = []
    for e, n in zip(estimates, units):
        lo, hi = e["ci95"]
        ses.append((hi - lo) / 2 / t975(n - 1))
    if any(se <= 0 for se in ses):
        raise PoolError("an interval of zero width cannot be weighted")
    w = [1 / se ** 2 for se in ses]
    mean = math.fsum(wi * e["mean"] for wi, e in zip(w, estimates)) / math.fsum(w)
    se = 1 / math.sqrt(math.fsum(w))
    half = t975(sum(n - 1 for n in units)) * se
    q = math.fsum(wi * (e["mean"] - mean) ** 2 for wi, e in zip(w, estimates))
    lo, hi = mean - half, mean + half
    verdict = "MoE better" if hi < 0 else "MoE worse" if lo > 0 else "no significant difference"
    return {"mean": mean, "ci95": [lo, hi], "se": se, "seeds": len(estimates), "blocks": sum(e["blocks"] for e in estimates),
            "documents": sum(units) if all(e.get("documents") for e in estimates) else None,
            "cochran_q": q, "q_df": len(estimates) - 1, "verdict": verdict}


def _same_study(studies: list[dict], paths: list[Path]) -> None:
    def key(s: dict) -> dict:
        return {k: v for k, v in s["settings"].items() if k not in FREE}

    ref = key(studies[0])
    for s, p in zip(studies[1:], paths[1:]):
        other = key(s)
        diff = sorted(k for k in set(ref) | set(other) if ref.get(k) != other.get(k))
        if diff:
            raise PoolError(f"{p} is another study than {paths[0]} (differs in {', '.join(diff)}); pool one arm at "
                            "one budget over seeds only")
    seeds = [s["settings"]["seed"] for s in studies]
    if len(set(seeds)) != len(seeds):
        raise PoolError(f"the same seed twice ({seeds}): each seed counts once")


def pool_studies(paths: list[Path]) -> dict:
    studies = [json.loads(p.read_text()) for p in paths]
    _same_study(studies, paths)
    out = {"studies": [str(p) for p in paths], "arm": studies[0]["arm"], "steps": studies[0]["settings"]["steps"],
           "seeds": [s["settings"]["seed"] for s in studies], "comparisons": {}}
    for name in COMPARISONS:
        per_seed = [(s["settings"]["seed"], (s["summary"]["paired"] or {}).get(name)) for s in studies]
        have = [(seed, e) for seed, e in per_seed if e]
        if not have:
            continue
        out["comparisons"][name] = {
            "per_seed": [{"seed": seed, "mean": e["mean"], "ci95": e["ci95"], "blocks": e["blocks"],
                          **({"documents": e["documents"]} if e.get("documents") else {})} for seed, e in have],
            "pooled": pool([e for _, e in have]),
            "missing_seeds": [seed for seed, e in per_seed if not e]}
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("studies", type=Path, nargs="+", help="benchmarks/study.py JSON files, one per seed")
    add_arguments(ap, "the pooled result")
    args = ap.parse_args(argv)
    record = Run("study_pool", argv=None if argv is None else [sys.argv[0], *argv])
    try:
        res = pool_studies(args.studies)
    except PoolError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"arm {res['arm']}, {res['steps']} steps; final MoE - dense in nats per token (negative: MoE better)")
    print(f"{'comparison':<12} {'seed':>6} {'mean':>9}  95% CI")
    for name, c in res["comparisons"].items():
        for r in c["per_seed"]:
            print(f"{name:<12} {r['seed']:>6} {r['mean']:+9.4f}  [{r['ci95'][0]:+.4f}, {r['ci95'][1]:+.4f}]")
        p = c["pooled"]
        print(f"{name:<12} {'pooled':>6} {p['mean']:+9.4f}  [{p['ci95'][0]:+.4f}, {p['ci95'][1]:+.4f}]  "
              f"{p['verdict']}; Cochran's Q {p['cochran_q']:.2f} on {p['q_df']} df"
              + (f"; seeds without it: {c['missing_seeds']}" if c["missing_seeds"] else ""))
    record.write(res, record.path(args.json, args.variant))
    return 0


if __name__ == "__main__":
    sys.exit(main())
