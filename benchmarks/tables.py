"""The measured tables of README.md and docs/*.md, generated from the results files in docs/results/.

A page holds a generated table between two markers:

    <!-- table: NAME -->
    ...what TABLES[NAME] writes: the table, then where it came from (file, machine, commit, command)...
    <!-- /table -->

Each NAME is one small function below that reads its results file(s) and picks the rows and columns, so a number
on a page cannot drift from the file it came from, and a new results file is one `python benchmarks/tables.py` away
from the docs.

    python benchmarks/tables.py            # rewrite every table in place
    python benchmarks/tables.py --check    # change nothing; exit 1 naming every table that differs from its files
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]
MARKER = re.compile(r"(<!-- table: ([\w-]+) -->\n)(.*?)(<!-- /table -->)", re.S)
LAYOUT = {"coarse": "8x top-2", "fine": "32x top-8 (G=4)"}
GOAL = {4096: 1.10, 128: 1.50}  # the experts kernel's speed goal in x ideal, at a micro-batch and at a tiny step


class Ctx:
    """What a table function sees: the results files (read once) and the page it is written into (for links)."""

    def __init__(self, root: Path, page: Path):
        self.root, self.page, self._cache = root, page, {}

    def load(self, rel: str) -> dict:
        if rel not in self._cache:
            self._cache[rel] = json.loads((self.root / "docs" / "results" / rel).read_text())
        return self._cache[rel]

    def link(self, rel: str) -> str:
        target = os.path.relpath(self.root / "docs" / "results" / rel, self.page.parent)
        return f"[{rel}]({Path(target).as_posix()})"

    def source(self, rel: str, what: str = "") -> str:
        """One line under a table: the file, the machine, the software, the commit, the date and the command."""
        d = self.load(rel)
        m = d["machine"]
        where = m.get("gpu") or m.get("cpu") or m.get("described") or "machine not recorded"
        if m.get("cpu") and m.get("described"):
            where = m["described"]
        parts = [where]
        if m.get("flags") is not None:
            parts.append("flags " + (" ".join(m["flags"]) or "none of " + " ".join(m.get("flags_checked") or [])))
        if m.get("cores"):
            parts.append(f"{m['cores']} cores")
        load = (m.get("load_avg") or [None])[0]
        parts.append(f"load {load:.2f} at the start" if load is not None else "load not recorded")
        torch = d["software"].get("torch")
        if torch:
            parts.append(f"torch {torch}")
        c = d["commit"]
        legacy = d.get("legacy") or {}
        if c.get("sha"):
            parts.append(f"commit {c['sha'][:10]}" + (" with local changes" if c.get("dirty") else ""))
        else:
            parts.append("commit not recorded" + (f" (file from {legacy['added_in_commit'][:7]}, "
                                                   f"{legacy['added_on']})" if legacy else ""))
        if d.get("date"):
            parts.append(d["date"][:10])
        cmd = d.get("command")
        return (f"<sub>{what}{self.link(rel)}: {', '.join(parts)}"
                + (f"; `{cmd}`" if cmd else "; command not recorded") + "</sub>")


TABLES: dict[str, Callable[[Ctx], str]] = {}


def table(name: str):
    def register(fn):
        TABLES[name] = fn
        return fn
    return register


def md(header: list[str], rows: list[list], align: str | None = None) -> str:
    """A markdown table; align holds one of l/r per column (default: first columns left, numbers right)."""
    align = align or "l" * len(header)
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---:" if a == "r" else "---" for a in align) + "|"]
    lines += ["| " + " | ".join("" if c is None else str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def join(*blocks: str) -> str:
    return "\n\n".join(b for b in blocks if b) + "\n"


def f2(x) -> str:
    return "-" if x is None else f"{x:.2f}"


def f4(x) -> str:
    return "-" if x is None else f"{x:.4f}"


def signed(x) -> str:
    return f"{x:+.4f}"


def ci(c: dict | None) -> str:
    """A paired difference and its 95% interval, in nats."""
    if not c:
        return "not run"
    lo, hi = c["ci95"]
    return f"{signed(c['mean'])} [{signed(lo)}, {signed(hi)}]"


def verdict(c: dict | None, better: str = "MoE better", worse: str = "MoE worse") -> str:
    if not c:
        return ""
    lo, hi = c["ci95"]
    return better if hi < 0 else worse if lo > 0 else "no significant difference"


def millions(n) -> str:
    return f"{n / 1e6:,.1f}M"


# ---------------------------------------------------------------------------------------------- bench_convert

def _convert_rows(d: dict) -> list[list]:
    rows = []
    for r in d["rows"]:
        case = (r["case"].replace("upcycle convert --no-verify", "`upcycle convert --no-verify`")
                .replace("upcycle convert, default", "`upcycle convert`, default"))
        rows.append([case, f2(r["wall_s"]), f2(r["vs_copy"]), f"{r['peak_rss_mib']:,}"])
    return rows


@table("convert-speed")
def _convert_speed(ctx: Ctx) -> str:
    rel = "bench_convert/xeon-amx.json"
    return join(md(["case", "wall (s)", "x cp", "peak RSS (MiB)"], _convert_rows(ctx.load(rel)), "lrrr"),
                ctx.source(rel))


@table("convert-1b-steps")
def _convert_1b_steps(ctx: Ctx) -> str:
    """The two 1B-class runs side by side, with the step times convert's summary line reports."""
    rels = ["bench_convert/xeon-amx.json", "bench_convert/xeon-amx-1b.json"]
    rows = []
    for i, rel in enumerate(rels, 1):
        rs = ctx.load(rel)["rows"]
        cp = next(r for r in rs if r["case"].startswith("1B-class: cp"))
        conv = next(r for r in rs if r["case"].startswith("1B-class: upcycle convert"))
        ph = conv.get("phases_s", {})
        rows.append([f"run {i}", f2(cp["wall_s"]), f2(conv["wall_s"]), f2(conv["vs_copy"]),
                     f"{conv['peak_rss_mib']:,}", ph.get("write"), ph.get("router init wait"), ph.get("verify"),
                     ph.get("router init beside the writer")])
    header = ["1B-class", "cp (s)", "convert (s)", "x cp", "peak RSS (MiB)", "write (s)", "waiting for the router (s)",
              "verify (s)", "k-means pass beside the writer (s)"]
    return join(md(header, rows, "lrrrrrrrr"), *(ctx.source(r, f"run {i}: ") for i, r in enumerate(rels, 1)))


# ---------------------------------------------------------------------------------------------- bench_experts

def _cells(d: dict) -> list[tuple]:
    """(tokens, dtype, layout) in the file's order."""
    seen = []
    for r in d["rows"]:
        key = (r["tokens"], r["dtype"], r["layout"])
        if key not in seen:
            seen.append(key)
    return seen


def _row(d: dict, key: tuple, impl: str) -> dict | None:
    return next((r for r in d["rows"] if (r["tokens"], r["dtype"], r["layout"]) == key and r["impl"] == impl
                 and "skipped" not in r), None)


def experts_table(ctx: Ctx, rel: str, cols: list[tuple[str, str]], ms: list[tuple[str, str]] = (),
                  goal: bool = True, keep=lambda key: True) -> str:
    """One row per (tokens, dtype, layout): the dense MLP's ms, each impl's x ideal (time / (2 x dense), median of
    the per-round ratios), chosen impls' ms, and the goal."""
    d = ctx.load(rel)
    header = ["layout", "dtype", "tokens", "dense MLP ms"] + [c for _, c in cols] + [c for _, c in ms]
    header += ["goal", "within"] if goal else []
    rows = []
    for key in _cells(d):
        if not keep(key):
            continue
        tokens, dtype, layout = key
        dense = _row(d, key, "dense")
        row = [LAYOUT[layout], dtype, tokens, f"{dense['ms']:.1f}"]
        for impl, _ in cols:
            r = _row(d, key, impl)
            v = f2(r["vs_ideal"]) if r else "-"
            row.append(f"**{v}**" if impl == "upcycle" and r else v)
        row += [f"{_row(d, key, impl)['ms']:.1f}" if _row(d, key, impl) else "-" for impl, _ in ms]
        if goal:
            up, g = _row(d, key, "upcycle"), GOAL.get(tokens)
            row += [f2(g), "" if up is None or g is None else ("yes" if up["vs_ideal"] <= g else "no")]
        rows.append(row)
    return join(md(header, rows, "llr" + "r" * (len(header) - 3)), ctx.source(rel))


FLOORS = [("upcycle", "**upcycle**"), ("mm floor", "mm floor"), ("ops floor", "ops floor")]


@table("kernels-epyc-avx512bf16")
def _kernels_epyc_bf16(ctx: Ctx) -> str:
    return experts_table(ctx, "bench_experts/epyc-avx512bf16.json", FLOORS + [("cast floor", "cast floor")])


@table("kernels-xeon-amx")
def _kernels_xeon(ctx: Ctx) -> str:
    return experts_table(ctx, "bench_experts/xeon-amx.json", FLOORS)


@table("kernels-xeon-amx-fp32")
def _kernels_xeon_fp32(ctx: Ctx) -> str:
    return experts_table(ctx, "bench_experts/xeon-amx-row-quantum.json",
                         [("upcycle", "**upcycle**"), ("mm floor", "mm floor")], keep=lambda k: k[1] == "fp32")


@table("kernels-epyc-avx2")
def _kernels_avx2(ctx: Ctx) -> str:
    return experts_table(ctx, "bench_experts/epyc-avx2-512.json", FLOORS, goal=False)


@table("kernels-epyc-avx512bf16-512")
def _kernels_epyc_512(ctx: Ctx) -> str:
    return experts_table(ctx, "bench_experts/epyc-avx512bf16-512.json", FLOORS + [("cast floor", "cast floor")],
                         goal=False)


@table("kernels-impls")
def _kernels_impls(ctx: Ctx) -> str:
    return experts_table(ctx, "bench_experts/epyc-avx512bf16-impls.json",
                         [("eager", "eager"), ("grouped_mm", "grouped_mm"), ("upcycle", "**upcycle**"),
                          ("mm floor", "mm floor")], ms=[("upcycle", "upcycle ms")])


@table("kernels-padding")
def _kernels_padding(ctx: Ctx) -> str:
    return experts_table(ctx, "bench_experts/xeon-amx-padding.json",
                         [("upcycle", "**upcycle** (padded)"), ("upcycle-split", "split"),
                          ("upcycle-whole", "whole rows"), ("mm floor", "mm floor (padded)")],
                         ms=[("upcycle", "padded ms"), ("upcycle-split", "split ms")], goal=False)


@table("kernels-128-bf16")
def _kernels_128(ctx: Ctx) -> str:
    return experts_table(ctx, "bench_experts/epyc-avx512bf16-128-bf16.json",
                         FLOORS + [("cast floor", "cast floor")])


@table("kernels-cast-traffic")
def _kernels_cast_traffic(ctx: Ctx) -> str:
    """What the two casts of 8 experts' weights cost at the memory's streaming rates, next to the 128-token bf16 row:
    fp32 read + bf16 write, then bf16 read + fp32 write, 12 bytes per expert parameter."""
    rel_e, rel_o = "bench_experts/epyc-avx512bf16-128-bf16.json", "bench_optimizer/epyc-avx512bf16.json"
    e, o = ctx.load(rel_e), ctx.load(rel_o)
    meta = e["meta"]
    params = 8 * 3 * meta["hidden"] * meta["intermediate"]
    rates = [r["gb_per_s"] for r in o["rows"] if r["case"].startswith("memory:")]
    key = (128, "bf16", "coarse")
    ideal_ms = 2 * _row(e, key, "dense")["ms"]
    cast_ms = [12 * params / (rate * 1e9) * 1e3 for rate in (max(rates), min(rates))]
    mm = _row(e, key, "mm floor")["vs_ideal"]
    lo, hi = (mm + ms / ideal_ms for ms in cast_ms)
    rows = [["8x top-2", f"{params / 1e6:.1f}M", f"{12 * params / 1e6:.0f}", f"{min(rates):.0f}-{max(rates):.0f}",
             f"{cast_ms[0]:.1f}-{cast_ms[1]:.1f}", f"{ideal_ms:.1f}", f2(mm), f"{lo:.2f}-{hi:.2f}", f2(GOAL[128])]]
    header = ["layout (bf16, 128 tokens)", "expert parameters", "MB cast per call", "memory GB/s", "casts ms",
              "ideal ms (2 x dense)", "mm floor", "mm floor + casts (x ideal)", "goal"]
    return join(md(header, rows, "lrrrrrrrr"), ctx.source(rel_e), ctx.source(rel_o))


@table("kernels-quantum")
def _kernels_quantum(ctx: Ctx) -> str:
    """Row quantum 32 (the kernel's), 16, 8 and whole rows, in two runs of the same script."""
    rels = ["bench_experts/epyc-avx512bf16-quantum.json", "bench_experts/epyc-avx512bf16-quantum-4096.json"]
    impls = [("upcycle", "q 32 (the kernel's)"), ("upcycle-q16", "q 16"), ("upcycle-q8", "q 8"),
             ("upcycle-whole", "whole rows")]
    rows = []
    for rel in rels:
        d = ctx.load(rel)
        for key in _cells(d):
            tokens, dtype, layout = key
            rows.append([LAYOUT[layout], dtype, tokens] + [f2(_row(d, key, i)["vs_ideal"]) for i, _ in impls])
    return join(md(["layout", "dtype", "tokens"] + [h for _, h in impls], rows, "llrrrrr"),
                *(ctx.source(r) for r in rels))


# ---------------------------------------------------------------------------------------------- bench_train

def _x_dense(d: dict, r: dict) -> float:
    """The file's ratio, or (files older than that field) the same ratio from its dense row."""
    if "x_dense" in r:
        return r["x_dense"]
    dense = next(x for x in d["results"] if x["model"] == "dense parent" and x["precision"] == r["precision"])
    return r["tokens_per_s"] / dense["tokens_per_s"]


def _train_rows(d: dict, rounds: bool) -> list[list]:
    rows = []
    for r in d["results"]:
        row = [r["model"], r["experts_impl"] or "-", r["precision"], r.get("optimizer", "AdamW (for-loop)"),
               f"{r['tokens_per_s']:,.0f}", f2(r["step_s"]), f2(_x_dense(d, r))]
        if rounds:
            row.append(" ".join(f2(x) for x in r["x_dense_rounds"]) if r["model"] != "dense parent" else "")
        row += [millions(r["trainable_params"]), f"{r['peak_rss_gb']:.1f}"]
        rows.append(row)
    return rows


def train_table(ctx: Ctx, rel: str) -> str:
    d = ctx.load(rel)
    rounds = d.get("rounds", 1) > 1
    header = ["model", "experts impl", "precision", "optimizer", "tokens/s", "s/step",
              "x dense" + (" (median of rounds)" if rounds else "")]
    header += ["x dense per round"] if rounds else []
    header += ["trainable params", "peak RSS GB"]
    return join(md(header, _train_rows(d, rounds), "llll" + "rrr" + ("l" if rounds else "") + "rr"), ctx.source(rel))


@table("train-epyc-avx512bf16")
def _train_epyc_bf16(ctx: Ctx) -> str:
    return train_table(ctx, "bench_train/epyc-avx512bf16.json")


@table("train-xeon-amx")
def _train_xeon(ctx: Ctx) -> str:
    return train_table(ctx, "bench_train/xeon-amx.json")


@table("train-epyc-avx2")
def _train_avx2(ctx: Ctx) -> str:
    return train_table(ctx, "bench_train/epyc-avx2.json")


@table("train-grouped-mm")
def _train_grouped(ctx: Ctx) -> str:
    return train_table(ctx, "bench_train/epyc-avx512bf16-grouped-mm.json")


TRAIN_MACHINES = [("AMD EPYC, AVX512-BF16", "bench_train/epyc-avx512bf16.json"),
                  ("Intel Xeon, AMX", "bench_train/xeon-amx.json"),
                  ("AMD EPYC, AVX2 only", "bench_train/epyc-avx2.json")]


@table("train-summary")
def _train_summary(ctx: Ctx) -> str:
    """Every machine's current run in one table: dense and MoE tokens/s and their ratio."""
    rows = []
    for label, rel in TRAIN_MACHINES:
        d = ctx.load(rel)
        for prec in ("bf16", "fp32"):
            dense = next((r for r in d["results"] if r["model"] == "dense parent" and r["precision"] == prec), None)
            moe = next((r for r in d["results"] if r["model"] != "dense parent" and r["precision"] == prec), None)
            if dense and moe:
                n = d.get("rounds", 1)
                rows.append([label, prec, f"{dense['tokens_per_s']:,.0f}", f"{moe['tokens_per_s']:,.0f}",
                             f2(moe["x_dense"]), f"median of {n} interleaved rounds" if n > 1 else "one run"])
    header = ["machine (2 cores)", "precision", "dense tokens/s", "8x top-2 MoE tokens/s", "MoE / dense", "measured as"]
    return join(md(header, rows, "llrrrl"), *(ctx.source(rel) for _, rel in TRAIN_MACHINES))


@table("train-param-bound")
def _train_param_bound(ctx: Ctx) -> str:
    """The work that grows with the parameters (norm, AdamW, bf16 casts) and the ratio it leaves if the rest of a
    step scaled with the FLOPs."""
    rows = []
    for label, rel in TRAIN_MACHINES:
        d = ctx.load(rel)
        measured = {(r["model"], r["precision"]): r for r in d["results"]}
        for f in d.get("floor", []):
            if f["model"] == "dense parent":
                continue
            dense = next(x for x in d["floor"] if x["model"] == "dense parent" and x["precision"] == f["precision"])
            moe = next(r for (m, p), r in measured.items() if m != "dense parent" and p == f["precision"])
            rows.append([label, f["precision"], f2(dense["param_bound_s"]), f2(f["param_bound_s"]),
                         f2(f["flop_matched_x_dense"]), f2(f["best_x_dense"]), f2(moe["x_dense"])])
    header = ["machine", "precision", "dense: parameter-bound s/step", "MoE: parameter-bound s/step",
              "FLOP-matched x dense", "x dense if the rest scaled with FLOPs", "measured x dense"]
    return join(md(header, rows, "llrrrrr"), *(ctx.source(rel) for _, rel in TRAIN_MACHINES))


@table("train-parts-estimate")
def _train_parts(ctx: Ctx) -> str:
    """The MoE step estimated from its parts: the dense step with its 30 MLP blocks replaced by experts blocks at
    their ops floor (bench_experts at 512 tokens), plus the extra parameter-bound work; against the rounds."""
    rel_t, rel_e = "bench_train/epyc-avx512bf16.json", "bench_experts/epyc-avx512bf16-512.json"
    t, e = ctx.load(rel_t), ctx.load(rel_e)
    rows = []
    for prec in ("bf16", "fp32"):
        dense = next(r for r in t["results"] if r["model"] == "dense parent" and r["precision"] == prec)
        moe = next(r for r in t["results"] if r["model"] != "dense parent" and r["precision"] == prec)
        bound = {f["model"]: f["param_bound_s"] for f in t["floor"] if f["precision"] == prec}
        key = (512, prec, "coarse")
        mlp_ms, ops = _row(e, key, "dense")["ms"], _row(e, key, "ops floor")["vs_ideal"]
        extra = bound["8x top-2 MoE"] - bound["dense parent"]
        est = dense["step_s"] + 30 * mlp_ms / 1000 * (2 * ops - 1) + extra
        rows.append([prec, f2(dense["step_s"]), f"{mlp_ms:.1f}", f2(ops), f2(extra), f2(est),
                     f2(dense["step_s"] / est), " ".join(f2(x) for x in moe["x_dense_rounds"])])
    header = ["precision", "dense s/step (median)", "dense MLP block ms", "experts ops floor (x ideal)",
              "extra parameter-bound s", "estimated MoE s/step", "estimated x dense", "measured x dense per round"]
    return join(md(header, rows, "lrrrrrrl"), ctx.source(rel_t), ctx.source(rel_e))


@table("train-quantum")
def _train_quantum(ctx: Ctx) -> str:
    rel = "bench_train/epyc-avx512bf16-quantum.json"
    d = ctx.load(rel)
    names = {"-": "dense parent", "upcycle": "MoE, row quantum 32 (the kernel's)", "upcycle-q8": "MoE, row quantum 8"}
    rows = []
    for r in d["results"]:
        rows.append([names.get(r["impl"], r["impl"]), r["precision"],
                     " ".join(f2(x["step_s"]) for x in r["rounds"]), f2(r["step_s"]),
                     " ".join(f2(x) for x in r["x_dense_rounds"]) if r["impl"] != "-" else "", f2(r["x_dense"])])
    header = ["case", "precision", "s/step per round", "median s/step", "x dense per round", "x dense (median)"]
    return join(md(header, rows, "lllrlr"), ctx.source(rel))


@table("train-single-runs")
def _train_single(ctx: Ctx) -> str:
    """Three single runs of the same code on one machine: why bench_train has --rounds."""
    rels = ["archive/bench_train/epyc-avx512bf16-single-run.json", "archive/bench_train/epyc-avx512bf16-single-runs.json"]
    runs = [ctx.load(rels[0])] + ctx.load(rels[1])["runs"]
    rows = []
    for i, d in enumerate(runs, 1):
        res = d["results"]
        for prec in ("bf16", "fp32"):
            dense = next(r for r in res if r["model"] == "dense parent" and r["precision"] == prec)
            moe = next(r for r in res if r["model"] != "dense parent" and r["precision"] == prec)
            rows.append([f"run {i}", prec, f2(dense["step_s"]), f2(moe["step_s"]), f2(moe["x_dense"])])
    return join(md(["run", "precision", "dense s/step", "MoE s/step", "x dense"], rows, "llrrr"),
                *(ctx.source(r) for r in rels))


@table("train-phases")
def _train_phases(ctx: Ctx) -> str:
    rels = ["train_phases/epyc-avx2-before-fix.json", "train_phases/epyc-avx2.json"]
    before, after = (ctx.load(r) for r in rels)
    labels = sorted(set(before["phases_s"]) | set(after["phases_s"]), key=lambda k: -after["phases_s"].get(k, 0))
    rows = [[k, f2(before["phases_s"].get(k)), f2(after["phases_s"].get(k))] for k in labels]
    rows.append(["**whole step**", f"**{f2(before['step_s'])}**", f"**{f2(after['step_s'])}**"])
    return join(md(["phase", "s/step before", "s/step after"], rows, "lrr"),
                ctx.source(rels[0], "before: "), ctx.source(rels[1], "after: "))


CHECKSUMS = "bench_checksums/xeon-avx512.json"


@table("train-checksums")
def _train_checksums(ctx: Ctx) -> str:
    """What a checkpoint's checksums cost on one file in the page cache: the hashes against a plain read, and the two
    calls upcycle train makes."""
    d = ctx.load(CHECKSUMS)
    rows = [[f"`{r['case']}`" if r["case"].startswith(("write_", "checksum_")) else r["case"],
             f"{r['s'] * 1e3:,.1f}" if r["s"] >= 1e-3 else f"{r['s'] * 1e3:.3f}",
             f"{r['mb_per_s']:,.0f}" if not r["case"].endswith("sizes only") else "-"] for r in d["rows"]]
    header = [f"one {d['bytes'] / 1e6:,.0f} MB file, warm page cache", f"ms (median of {d['repeats']})", "MB/s"]
    return join(md(header, rows, "lrr"), ctx.source(CHECKSUMS))


@table("optimizer-epyc-avx512bf16")
def _optimizer(ctx: Ctx) -> str:
    rel = "bench_optimizer/epyc-avx512bf16.json"
    d = ctx.load(rel)
    rows = [[r["case"], f"{r['s_per_100M']:.3f}", r["bytes_per_param"], f"{r['gb_per_s']:.0f}"] for r in d["rows"]]
    return join(md(["case", "s per 100M parameters", "minimum bytes per parameter", "GB/s"], rows, "lrrr"),
                ctx.source(rel))


# ---------------------------------------------------------------------------------------------- GGUF in llama.cpp

GGUF = "bench_gguf/epyc-avx512bf16.json"


def _gguf_row(r: dict) -> list:
    """One case: the MoE file against the dense file stored the same way, llama.cpp's own noise in brackets."""
    if "kld" not in r:
        verdict = r["llama_cpp_load"]
        if not verdict.startswith("convert_hf_to_gguf.py"):
            verdict = "llama.cpp refuses it: " + verdict.split("error loading model: ")[-1]
        return [r["case"], verdict, "", "", "", "", ""]
    k, n = r["kld"], r["kld_noise"]
    ties = [f"{t['margin']:.2f}" for t in r["divergence_margin"] if t]
    return [r["case"],
            f"{max(r['logits_max_rel_diff']):.3g} ({min(r['noise_max_rel_diff']):.3g}-{max(r['noise_max_rel_diff']):.3g})",
            _gguf_greedy(r), f"{', '.join(ties) or '-'} ({r['noise_abs']:.2f})",
            f"{k['mean_kld']:.2g} ({n['mean_kld']:.2g})", f"{k['same_top_pct']:.1f}% ({n['same_top_pct']:.1f}%)",
            f"{k['ppl_model']:.3f} / {k['ppl_base']:.3f}"]


def _gguf_greedy(r: dict) -> str:
    """Prompts whose greedy text the MoE shares with the dense file; in brackets, where recorded, how many the dense
    file itself keeps under every other micro-batch size."""
    n = len(r["greedy_same"])
    text = f"{sum(r['greedy_same'])}/{n}"
    own = r.get("dense_greedy_changed_by_noise")
    return text if own is None else f"{text} ({n - sum(own)}/{n})"


GGUF_HEADER = ["case (MoE vs dense file)", "logits: max rel diff (llama.cpp's own)", "greedy text same (own)",
               "parts at margin (own noise)", "mean KLD (own)", "same top token (own)", "PPL MoE / dense"]


def _gguf_other_builds(ctx: Ctx) -> str:
    """The cold-build time recorded by every other bench_gguf results file: it varies by CPU far more than by pin."""
    others = sorted(f"bench_gguf/{p.name}" for p in (ctx.root / "docs" / "results" / "bench_gguf").glob("*.json"))
    builds = [f"{ctx.load(rel)['cold_build_s']:,.0f} s on {ctx.load(rel)['machine']['cpu']} ({ctx.link(rel)})"
              for rel in others if rel != GGUF]
    return f" The same pinned build took {', '.join(builds)}." if builds else ""


def _gguf_size(ctx: Ctx) -> str:
    d = ctx.load(GGUF)
    s = d["size_and_time"]
    return (f"Size and time: the 8 x top-2 MoE file is {s['moe_bytes'] / 1e6:,.0f} MB (parent "
            f"{s['parent_bytes'] / 1e6:,.0f} MB); `upcycle convert` takes {s['convert_s']:.1f} s against "
            f"{s['cp_s']:.2f} s for a cp of the same bytes ({s['vs_cp']:,.0f}x), medians of {len(s['runs']) // 2} "
            f"runs each. llama.cpp: {d['llama_cpp']}, built from cold on the machine below in {d['cold_build_s']:,.0f} s. "
            f"Text: {d['text']}; {len(d['prompts'])} paragraphs as prompts, llama.cpp on {d['threads']} threads, "
            f"its own noise from micro-batch sizes {', '.join(map(str, d['ubatches_for_noise']))}."
            + _gguf_other_builds(ctx))


@table("gguf-llama-cpp")
def _gguf_llama_cpp(ctx: Ctx) -> str:
    d = ctx.load(GGUF)
    return join(md(GGUF_HEADER, [_gguf_row(r) for r in d["rows"]], "lllllll"), _gguf_size(ctx), ctx.source(GGUF))


@table("gguf-summary")
def _gguf_summary(ctx: Ctx) -> str:
    """The README's rows: the parent's Q4_1 blocks kept, coarse and fine-grained, and the negative control."""
    d = ctx.load(GGUF)
    rows = [_gguf_row(r) for r in d["rows"] if "Q4_1 kept" in r["case"] or r["case"].startswith("negative")]
    return join(md(GGUF_HEADER, rows, "lllllll"), _gguf_size(ctx), ctx.source(GGUF))


# ---------------------------------------------------------------------------------------------- studies

def _paired(d: dict, key: str) -> dict | None:
    return (d["summary"].get("paired") or {}).get(key)


STUDY_RUNS = [
    ("random router (old default), bf16", "study/epyc-avx512bf16-random-router-bf16.json"),
    ("k-means router (default)", "study/xeon-amx-kmeans.json"),
    ("random router", "study/unrecorded-random-router.json"),
    ("random router", "study/unrecorded-random-router-seed1.json"),
    ("k-means router, rows not centred", "study/unrecorded-kmeans-uncentred-seed1.json"),
    ("fine-grained 32x top-8, k-means", "study/unrecorded-fine-32x8.json"),
    ("k-means, experts at half the rate", "study/unrecorded-expert-lr05-seed0.json"),
    ("k-means, experts at half the rate", "study/unrecorded-expert-lr05-seed1.json"),
    ("k-means, experts at half the rate", "study/epyc-avx2-expert-lr05-144-seed0.json"),
    ("k-means, experts at half the rate", "study/epyc-avx2-expert-lr05-144-seed1.json"),
]


@table("study-summary")
def _study_summary(ctx: Ctx) -> str:
    """Every study run: final MoE minus the dense parent trained on the same tokens and on the same FLOPs, and how
    far its routers and experts moved."""
    rows = []
    for label, rel in STUDY_RUNS:
        d = ctx.load(rel)
        s = d["settings"]
        dense_lr = " (dense MLP at half the rate too)" if s.get("dense_mlp_lr_mult") else ""
        router = d.get("router") or []
        entropy = (f"{router[0]['entropy_frac']:.3f} -> {router[-1]['entropy_frac']:.3f}" if router else "-")
        per_layer = (_paired(d, "same_tokens") or {}).get("drift_min_cos")
        cos = min(per_layer) if per_layer else None
        rows.append([label + dense_lr, s["steps"], f"{d['summary']['moe_final']['tokens']:,}", s["seed"],
                     s["precision"], ci(_paired(d, "same_tokens")), verdict(_paired(d, "same_tokens")),
                     ci(_paired(d, "same_flops")), entropy, f"{cos:.6f}" if cos is not None else "-",
                     ctx.link(rel)])
    header = ["MoE arm", "steps", "tokens", "seed", "precision", "MoE - dense, same tokens", "",
              "MoE - dense, same FLOPs", "router entropy / log E, step 1 -> last",
              "experts' lowest cosine to their layer's mean", "file"]
    return join(md(header, rows, "lrrrllllrrl"),
                "<sub>Final held-out loss, paired over 64 held-out blocks, nats per token, 95% intervals; negative: "
                "the MoE is better. The cosine is that of each expert's weights to the mean of its layer's experts "
                "(fine-grained experts are different slices of the MLP, so theirs says nothing about training). "
                "Machines and commands: each file's line under the tables below.</sub>")


def router_table(ctx: Ctx, rel: str, steps: list[int]) -> str:
    """The routers along one MoE run: entropy, load CV and where their gradient comes from."""
    by_step = {r["step"]: r for r in ctx.load(rel)["router"]}
    rows = []
    for step in steps:
        r = by_step[step]
        lm, aux = r["router_grad_norm_lm"], r["router_grad_norm_aux"]
        rows.append([step, f"{r['entropy_frac']:.3f}", f2(r["load_cv"]), f"{lm:.2g}", f"{aux:.2g}",
                     f"{lm / (lm + aux):.0%}" if lm + aux else "-", f"{r['z_loss']:.1f}"])
    header = ["step", "router entropy / log E", "load CV", "router gradient from the LM loss",
              "from the router losses", "LM share", "z-loss"]
    return join(md(header, rows, "rrrrrrr"), ctx.source(rel))


@table("study-kmeans-router")
def _study_kmeans_router(ctx: Ctx) -> str:
    return router_table(ctx, "study/xeon-amx-kmeans.json", [1, 2, 5, 12, 24, 48, 96])


def _curve_rows(label: str, curve: list[dict], steps: list[int]) -> list:
    at = {p["step"]: p["val_loss"] for p in curve}
    return [label] + [f4(at.get(s)) if s in at else "" for s in steps]


def curves_table(ctx: Ctx, arms: list[tuple[str, str, str]], extra_sources: list[str] = ()) -> str:
    """Held-out loss (24 blocks) along the way; arms are (label, file, curve name)."""
    steps = sorted({p["step"] for _, rel, name in arms for p in ctx.load(rel)["curves"][name]})
    rows = [_curve_rows(label, ctx.load(rel)["curves"][name], steps) for label, rel, name in arms]
    rels = list(dict.fromkeys([rel for _, rel, _ in arms] + list(extra_sources)))
    return join(md(["step (x 1,024 tokens)"] + [str(s) for s in steps], rows, "l" + "r" * len(steps)),
                *(ctx.source(r) for r in rels))


def final_table(ctx: Ctx, rel: str) -> str:
    """One study's final points and paired comparisons (same tokens, same FLOPs)."""
    d = ctx.load(rel)
    sm = d["summary"]
    rows = [["start (all arms: the MoE is exact)", 0, 0, 0, f4(sm["start_val_loss"]), ""]]
    pts = [("**upcycled MoE**", sm["moe_final"], None), ("dense parent, same tokens", sm["dense_same_tokens"],
                                                         _paired(d, "same_tokens")),
           ("dense parent, same FLOPs", sm.get("dense_same_flops"), _paired(d, "same_flops"))]
    for label, p, c in pts:
        if not p:
            continue
        rows.append([label, p["step"], f"{p['tokens']:,}", f"{p['train_flops'] / 1e15:.3f}", f4(p["val_loss"]),
                     f"{ci(c)}, {verdict(c)}" if c else ""])
    header = ["arm", "steps", "tokens", "training PFLOPs", "held-out loss (24 blocks)",
              "final MoE minus this arm (64 blocks, 95% CI)"]
    return join(md(header, rows, "lrrrrl"), ctx.source(rel))


@table("study-lr05-144-curves")
def _study_144_curves(ctx: Ctx) -> str:
    s0, s1 = "study/epyc-avx2-expert-lr05-144-seed0.json", "study/epyc-avx2-expert-lr05-144-seed1.json"
    return curves_table(ctx, [("seed 0, MoE (experts x 0.5)", s0, "moe"),
                              ("seed 0, dense (MLP x 0.5), same tokens", s0, "dense_same_tokens"),
                              ("seed 0, dense (MLP x 0.5), same FLOPs", s0, "dense"),
                              ("seed 1, MoE (experts x 0.5)", s1, "moe"),
                              ("seed 1, dense (MLP x 0.5), same tokens", s1, "dense_same_tokens")])


# the study_documents and study_defaults results: which documents the committed comparisons rest on
DOCUMENTS = "study_documents/xeon-avx512.json"
DEFAULTS = "study_defaults/xeon-avx512.json"


def _study_entry(ctx: Ctx, study: str) -> dict:
    """The study_documents entry of one study results file (a path under docs/results/)."""
    return next(s for s in ctx.load(DOCUMENTS)["studies"] if s["study"] == f"docs/results/{study}")


def rule(c: dict | None, documents: int | None, min_documents: int) -> str:
    """What eval's document rule says of a comparison: its verdict, or why there is none."""
    if documents is not None and documents < min_documents:
        return f"too few documents for a verdict ({documents}; eval needs {min_documents})"
    return verdict(c) if c else "not computed"


@table("study-lr05-144-pooled")
def _study_144_pooled(ctx: Ctx) -> str:
    """Each seed and the seeds pooled, over blocks as the studies computed them, with the documents behind the blocks
    (study_documents) and what eval's document rule makes of them."""
    rel = "study_pool/epyc-avx2-expert-lr05-144.json"
    d = ctx.load(rel)
    entries = [_study_entry(ctx, f.removeprefix("docs/results/")) for f in d["studies"]]
    docs = {e["seed"]: e["documents"] for e in entries}
    need = ctx.load(DOCUMENTS)["min_documents"]
    rows = []
    labels = {"same_tokens": "dense, same tokens", "same_flops": "dense, same training FLOPs"}
    for key, c in d["comparisons"].items():
        per = {e["seed"]: e for e in c["per_seed"]}
        pooled = c["pooled"]
        n = sum(docs[s] for s in per)
        rows.append([labels[key]] + [ci(per.get(s)) if s in per else "not run" for s in d["seeds"]]
                    + ([f"**{ci(pooled)}**, over blocks {pooled['verdict']} (Cochran's Q {pooled['cochran_q']:.2f} "
                        f"on {pooled['q_df']} df)"] if pooled["seeds"] > 1 else [""])
                    + [" + ".join(str(docs[s]) for s in per), rule(pooled, n, need)])
    header = (["MoE minus"] + [f"seed {s}" for s in d["seeds"]] + ["seeds pooled", "documents",
                                                                  "by eval's document rule"])
    return join(md(header, rows), ctx.source(rel), ctx.source(DOCUMENTS, "documents: "))


@table("study-documents")
def _study_documents(ctx: Ctx) -> str:
    """Per seed: the documents the committed studies' final held-out blocks come from, and whether the rebuild
    reproduced each study's recorded start loss (which holds only for the studies' own blocks)."""
    d = ctx.load(DOCUMENTS)
    rows = []
    for seed in sorted({s["seed"] for s in d["studies"]}):
        studies = [s for s in d["studies"] if s["seed"] == seed]
        counts = {json.dumps(s["blocks_per_document"], sort_keys=True) for s in studies}
        assert len(counts) == 1, f"seed {seed}: the studies' final blocks differ"
        per = sorted(studies[0]["blocks_per_document"].items(), key=lambda kv: (-kv[1], kv[0]))
        same = sum(s["start_val_loss"]["same_blocks"] for s in studies)
        rows.append([seed, len(studies), studies[0]["final_blocks"], len(per),
                     ", ".join(f"{name} {n}" for name, n in per),
                     f"{studies[0]['start_val_loss']['recomputed']:.4f}", f"{same} of {len(studies)}"])
    header = ["seed", "studies", "final blocks", "documents", "blocks per file", "parent's start loss, rebuilt",
              "studies whose recorded start loss it reproduces (4 decimals)"]
    return join(md(header, rows, "rrrrlrr"), ctx.source(DOCUMENTS))


PROBE12 = "archive/study/unrecorded-probe12-expert-lr05-control.json"
PROBE12_RERUN = "study/xeon-avx512-probe12-expert-lr05-control-rerun.json"


@table("study-probe12-documents")
def _study_probe12_documents(ctx: Ctx) -> str:
    """The seed-1 12-step probe and its rerun: held-out losses, and the paired difference over blocks and over
    documents, on the committed blocks and on blocks spread over documents."""
    need = ctx.load(DOCUMENTS)["min_documents"]
    committed, rerun = ctx.load(PROBE12), ctx.load(PROBE12_RERUN)
    c_entry, r_entry = _study_entry(ctx, PROBE12), _study_entry(ctx, PROBE12_RERUN)
    c_pair = _paired(committed, "same_tokens")
    r_cmp = r_entry["comparisons"]["same_tokens"]
    on_committed, spread = r_cmp.get("rescored_on_committed_blocks"), r_cmp["recomputed"]

    def losses(d):
        return [f4(d["summary"]["moe_final"]["val_loss"]), f4(d["summary"]["dense_same_tokens"]["val_loss"])]

    def by_docs(r):
        n = r["documents"]["documents"]
        return f"{ci(r['documents'])}: {rule(r['documents'], n, need)}"

    rows = [["committed run, its blocks", *losses(committed), c_pair["blocks"], c_entry["documents"], ci(c_pair),
             "not recorded"]]
    if on_committed:
        rows.append(["rerun, the committed blocks rescored", *losses(rerun), on_committed["blocks"]["n"],
                     on_committed["documents"]["documents"], ci(on_committed["blocks"]), by_docs(on_committed)])
    rows.append(["rerun, blocks spread over documents (eval's selection)", "", "", spread["blocks"]["n"],
                 spread["documents"]["documents"], ci(spread["blocks"]), f"**{by_docs(spread)}**"])
    header = ["seed 1, 12 steps: MoE (experts x 0.5) minus dense (MLP x 0.5)",
              "MoE held-out loss at step 12 (training's 24 blocks)", "dense held-out loss at step 12",
              "final blocks", "documents", "over blocks", "over documents"]
    return join(md(header, rows, "lrrrrll"), ctx.source(PROBE12, "committed: "), ctx.source(PROBE12_RERUN, "rerun: "),
                ctx.source(DOCUMENTS, "documents and rescoring: "))


@table("study-defaults")
def _study_defaults(ctx: Ctx) -> str:
    """The comparisons behind --mlp-lr-mult and --router-init: intervals over blocks as committed, the documents
    behind them, and what eval's document rule makes of them."""
    d = ctx.load(DEFAULTS)
    rows = []
    for block, (first, second) in (("mlp_lr_mult", ("MoE", "dense")), ("router_init", ("random", "k-means"))):
        for r in d[block]["paired"]:
            c = {"mean": r["mean"], "ci95": r["ci95_over_blocks"]}
            v = verdict(c, f"{first} better", f"{second} better")
            rows.append([r["what"], f"{ci(c)}" + (f", {v}" if v != "no significant difference" else ""),
                         r["blocks"], r["documents"], rule(c, r["documents"], d["min_documents"])])
    header = ["comparison (final held-out loss, paired, nats)", "over blocks, as committed", "blocks", "documents",
              "by eval's document rule"]
    return join(md(header, rows, "llrrl"), ctx.source(DEFAULTS))


@table("study-defaults-own-loss")
def _study_defaults_own_loss(ctx: Ctx) -> str:
    """Each side's own held-out loss at the end of 96 steps (24 blocks, not paired), MLP at x1.0 against x0.5."""
    d = ctx.load(DEFAULTS)
    rows = [[r["side"], r["seed"], f4(r["x1.0"]), f4(r["x0.5"]), signed(r["x0.5"] - r["x1.0"])]
            for r in d["mlp_lr_mult"]["final_val_loss_96_steps"]]
    header = ["side", "seed", "held-out loss, MLP x 1.0", "held-out loss, MLP x 0.5", "x 0.5 minus x 1.0"]
    return join(md(header, rows, "lrrrr"), ctx.source(DEFAULTS))


@table("study-lr05-96")
def _study_96(ctx: Ctx) -> str:
    full = ["study/xeon-amx-kmeans.json", "study/unrecorded-kmeans-uncentred-seed1.json"]
    half = ["study/unrecorded-expert-lr05-seed0.json", "study/unrecorded-expert-lr05-seed1.json"]
    rows = [["k-means MoE, experts at 1e-4, vs dense at 1e-4"]
            + [f"{ci(_paired(ctx.load(r), 'same_tokens'))} {verdict(_paired(ctx.load(r), 'same_tokens'))}"
               for r in full],
            ["k-means MoE, experts at 5e-5, vs dense with its MLP at 5e-5"]
            + [f"{ci(_paired(ctx.load(r), 'same_tokens'))} {verdict(_paired(ctx.load(r), 'same_tokens'))}"
               for r in half]]
    return join(md(["final held-out loss, paired over 64 blocks", "seed 0", "seed 1"], rows),
                *(ctx.source(r) for r in full + half))


@table("study-lr05-96-curves")
def _study_96_curves(ctx: Ctx) -> str:
    s0, s1 = "study/unrecorded-expert-lr05-seed0.json", "study/unrecorded-expert-lr05-seed1.json"
    return curves_table(ctx, [("seed 0, MoE (experts x 0.5)", s0, "moe"),
                              ("seed 0, dense (MLP x 0.5)", s0, "dense_same_tokens"),
                              ("seed 1, MoE (experts x 0.5)", s1, "moe"),
                              ("seed 1, dense (MLP x 0.5)", s1, "dense_same_tokens")])


@table("study-routers")
def _study_routers(ctx: Ctx) -> str:
    """Random against k-means router, two seeds: each against the dense parent, and directly (study_pair)."""
    rnd = ["study/unrecorded-random-router.json", "study/unrecorded-random-router-seed1.json"]
    km = ["study/xeon-amx-kmeans.json", "study/unrecorded-kmeans-uncentred-seed1.json"]
    pair_rel = "study_pair/unrecorded-random-vs-kmeans.json"
    pairs = {p["seed"]: p for p in ctx.load(pair_rel)["pairs"]}

    def cell(c, better="better", worse="worse"):
        return f"{ci(c)} {verdict(c, better, worse)}"

    rows = [["random router - dense parent, same tokens"] + [cell(_paired(ctx.load(r), "same_tokens")) for r in rnd],
            ["k-means router - dense parent, same tokens"] + [cell(_paired(ctx.load(r), "same_tokens")) for r in km],
            ["random router - k-means router"] + [f"**{cell(pairs[s], 'random better', 'k-means better')}**"
                                                  for s in (0, 1)]]
    return join(md(["", "seed 0", "seed 1"], rows), *(ctx.source(r) for r in rnd + km + [pair_rel]))


@table("study-seed1-curves")
def _study_seed1_curves(ctx: Ctx) -> str:
    rnd, km = "study/unrecorded-random-router-seed1.json", "study/unrecorded-kmeans-uncentred-seed1.json"
    return curves_table(ctx, [("dense parent, same tokens", rnd, "dense_same_tokens"),
                              ("random router", rnd, "moe"), ("k-means router", km, "moe")])


@table("study-probes")
def _study_probes(ctx: Ctx) -> str:
    """The 12-step probes at seed 1 (a 12-step schedule: not comparable with the longer runs)."""
    probes = [("k-means MoE, router losses on (default)", "archive/study/unrecorded-probe12-router-losses.json"),
              ("k-means MoE, --aux-loss-coef 0 --z-loss-coef 0", "archive/study/unrecorded-probe12-no-router-losses.json"),
              ("k-means MoE, --expert-lr-mult 0.5", "archive/study/unrecorded-probe12-expert-lr05.json"),
              ("k-means MoE, --expert-lr-mult 0.5; dense MLP at half the rate too",
               "archive/study/unrecorded-probe12-expert-lr05-control.json")]
    rows = []
    for label, rel in probes:
        d = ctx.load(rel)
        c = _paired(d, "same_tokens")
        rows.append([label, f4(d["summary"]["moe_final"]["val_loss"]), f4(d["summary"]["dense_same_tokens"]["val_loss"]),
                     f"{ci(c)} {verdict(c)}"])
    return join(md(["probe (12 steps, seed 1)", "MoE held-out loss", "dense held-out loss", "MoE - dense, paired"],
                   rows, "lrrl"), *(ctx.source(r) for _, r in probes))


@table("study-centring")
def _study_centring(ctx: Ctx) -> str:
    """The k-means rows before and after subtracting their mean row, seed 1: the z-loss at step 1 and the held-out
    loss at step 12 (the centred run was stopped after step 21)."""
    before, after = "study/unrecorded-kmeans-uncentred-seed1.json", "archive/study/unrecorded-kmeans-centred-seed1-partial.json"
    b, a = ctx.load(before), ctx.load(after)
    b12 = next(p["val_loss"] for p in b["curves"]["moe"] if p["step"] == 12)
    a12 = next(r["val_loss"] for r in a["rows"] if r["step"] == 12 and r.get("val_loss") is not None)
    rows = [["k-means rows as clustered", f"{b['router'][0]['z_loss']:.1f}", f4(b12)],
            ["mean row subtracted (what `upcycle convert` writes)", f"{a['rows'][0]['z_loss']:.1f}", f4(a12)]]
    return join(md(["k-means MoE, seed 1", "z-loss at step 1", "held-out loss at step 12"], rows, "lrr"),
                ctx.source(before), ctx.source(after))


@table("study-arms-curves")
def _study_arms(ctx: Ctx) -> str:
    km, fine = "study/xeon-amx-kmeans.json", "study/unrecorded-fine-32x8.json"
    drop_rel = "archive/study/unrecorded-drop-partial.json"
    text = curves_table(ctx, [("dense parent, same tokens", km, "dense_same_tokens"),
                              ("default (8x top-2, k-means router)", km, "moe"),
                              ("fine-32x8 (32x top-8, quarter-width experts, k-means)", fine, "moe")], [drop_rel])
    drop = ctx.load(drop_rel)["rows"]
    vals = [f"step {r['step']}: {f4(r['val_loss'])}" for r in drop if r.get("val_loss") is not None]
    first = drop[0]
    return text.rstrip("\n") + (f"\n\n<sub>drop (8x top-2, `--expert-init drop:0.5`), stopped after step "
                                f"{drop[-1]['step']}: training loss {first['loss']:.1f} at step {first['step']}; "
                                f"held-out {', '.join(vals)}.</sub>\n")


@table("study-kmeans")
def _study_kmeans(ctx: Ctx) -> str:
    return final_table(ctx, "study/xeon-amx-kmeans.json")


@table("study-random-bf16")
def _study_random_bf16(ctx: Ctx) -> str:
    return final_table(ctx, "study/epyc-avx512bf16-random-router-bf16.json")


@table("study-random-curves")
def _study_random_curves(ctx: Ctx) -> str:
    rnd, km = "study/unrecorded-random-router.json", "study/xeon-amx-kmeans.json"
    return curves_table(ctx, [("dense parent, same tokens", rnd, "dense_same_tokens"),
                              ("random router (8x top-2, renorm)", rnd, "moe"), ("k-means router (default)", km, "moe")])


@table("router-probe")
def _router_probe(ctx: Ctx) -> str:
    rels = ["router_probe/xeon-amx.json", "router_probe/unrecorded-centred.json"]
    labels = {"softmax-zero": "`--routing softmax --router-std 0`",
              "softmax-kmeans": "`--routing softmax --router-init kmeans:<8 stdlib files>`",
              "renorm-kmeans": "`--routing renorm --router-init kmeans:<8 stdlib files>`",
              "default": "plain `upcycle convert` (renorm, k-means on the built-in sample)"}
    rows = []
    for rel in rels:
        for a in ctx.load(rel)["arms"]:
            if a.get("start_max_abs_logits_diff") is not None:
                start = f"max abs logits diff {a['start_max_abs_logits_diff']:.3g}, greedy {a['start_greedy_agree']}"
            else:
                start = f"layer-wise float64 {a['start_layer_max_rel_diff']:.1e}"
            lm = (f"{a['router_grad_lm_first']:.1e} -> {a['router_grad_lm_last']:.3f}" if "router_grad_lm_first" in a
                  else "not logged")
            label = labels.get(a["arm"], a["arm"]) + (" (rows centred)" if "centred" in rel else "")
            rows.append([label, a["format"], "yes" if a["exact_claimed"] else "**no**", start,
                         f"{a['entropy_frac_first']:.5f} -> {a['entropy_frac_last']:.5f} ({a['entropy_frac_min']:.3f})",
                         f2(a["load_cv_last"]), lm, f"{a['loss_last']:.3f}"])
    header = ["arm", "type", "exact", "start vs parent", "entropy / log E, step 1 -> 40 (min)", "load CV at 40",
              "router LM gradient, step 1 -> 40", "train loss at 40"]
    return join(md(header, rows, "lllllrlr"), *(ctx.source(r) for r in rels))


@table("domain-study")
def _domain(ctx: Ctx) -> str:
    rel = "domain_study/xeon-amx.json"
    d = ctx.load(rel)
    rows = []
    for name, r in d["rows"].items():
        trainable = millions(sum(r["trainable"].values())) if "trainable" in r else ""
        rows.append([name, trainable, f"{r['lr']:g}" if "lr" in r else "", f4(r["domain_loss"]),
                     signed(r["gain"]) if "gain" in r else "", f4(r["general_loss"]),
                     signed(r["forgot"]) if "forgot" in r else "", f2(r.get("target_share")) if "target_share" in r
                     else "", f"{r['seconds']:.0f}" if "seconds" in r else ""])
    header = ["arm", "trainable (run.json)", "lr", "domain loss", "gain", "general loss", "forgot",
              "share to forced expert", "wall s"]
    return join(md(header, rows, "lrrrrrrrr"), ctx.source(rel))


# ---------------------------------------------------------------------------------------------- the demo

@table("demo")
def _demo(ctx: Ctx) -> str:
    """The README's excerpt of the demo: the newest run benchmarks/demo_run.py recorded."""
    runs = sorted((ctx.root / "docs" / "results" / "demo_run").glob("*.json"))
    if not runs:
        return ("*No run of the demo is recorded in docs/results/demo_run/ yet: `python benchmarks/demo_run.py` "
                "records one, and `python benchmarks/tables.py` puts its result here.*\n")
    rel = max((p.relative_to(ctx.root / "docs" / "results").as_posix() for p in runs),
              key=lambda r: ctx.load(r).get("date") or "")
    d = ctx.load(rel)
    ex = d["summary_md"]
    if d.get("readme_command"):
        first = (f"The first command above, run on a fresh clone (a new virtual environment, the packages "
                 f"installed from the registry, then the demo at its defaults), took {d['wall_s'] / 60:.1f} min, "
                 f"of which the demo {d['demo_s'] / 60:.1f} min, with a peak RSS of {d['peak_rss_kib'] / 2**20:.2f} GiB.")
    else:
        first = (f"One run of the demo at its defaults took {d['wall_s'] / 60:.1f} min with a peak RSS of "
                 f"{d['peak_rss_kib'] / 2**20:.2f} GiB.")
    text = [first + " The start of the summary it wrote (`upcycle-demo/report/summary.md`):", "",
            "> " + ex["verdict"], "", *ex["table"]]
    if d.get("plot"):
        target = Path(os.path.relpath(ctx.root / "docs" / "results" / "demo_run" / d["plot"], ctx.page.parent))
        text += ["", f"![the demo's held-out loss, per block and with intervals]({target.as_posix()})"]
    return join("\n".join(text), ctx.source(rel))


# ---------------------------------------------------------------------------------------------- the rewriting

def pages(root: Path) -> list[Path]:
    return [root / "README.md"] + sorted((root / "docs").rglob("*.md"))


PARTITION = "partition_study/xeon-avx512.json"


def _partition_rows(d: dict) -> list[list]:
    vs = {(v["order"], v["top_k"]): v for v in d["versus"]}
    rows = []
    for a in sorted(d["arms"], key=lambda a: (a["top_k"], ORDERS_P.index(a["order"]))):
        g, c = a["grouping"], a["converted"]
        agree = (f"{g['mean_agreement']:.2f} ({a['top_k'] / d['experts']:.2f})"
                 if g.get("mean_agreement") is not None else "-")
        err = (f"{g['mean_rel_error']:.3f} / {g['mean_oracle_rel_error']:.3f}"
               if g.get("mean_rel_error") is not None else "-")
        rows.append([f"top-{a['top_k']}", a["order"], f"{a['mlp_share']:.3g}",
                     f"{a['flops_per_token'] / a['parent_flops_per_token']:.2f}", agree, err, f"{c['loss']:.3f}",
                     ci(c["vs_parent"]), ci(vs.get((a["order"], a["top_k"]))) if a["order"] != "contiguous" else "-"])
    return rows


ORDERS_P = ("contiguous", "random", "cluster", "coactivation")


@table("partition-convert")
def _partition_convert(ctx: Ctx) -> str:
    d = ctx.load(PARTITION)
    e = d["eval"]
    header = ["top-k", "--slice-order", "MLP share", "FLOPs / parent's", "router agreement (chance)",
              "block error: router / true top-k", "held-out loss", "- parent's loss [95%]", "- contiguous [95%]"]
    note = (f"Parent: held-out loss {e['parent_loss']:.3f} on the same {e['tokens']} tokens ({e['eval_blocks']} "
            f"blocks of {e['eval_seq']}; intervals over chunks of {e['chunk']} tokens). Router agreement and block "
            "error: convert's fit on its own sample, mean over the 30 layers.")
    return join(md(header, _partition_rows(d), "llrrllrll"), note, ctx.source(PARTITION))


@table("partition-train")
def _partition_train(ctx: Ctx) -> str:
    d = ctx.load(PARTITION)
    t = d["train"]
    s = t["settings"]
    start = {f"{a['order']}-k{a['top_k']}": a["converted"]["loss"] for a in d["arms"]}
    rows = []
    for r in t["rows"]:
        before = d["eval"]["parent_loss"] if r["arm"] == "parent" else start[r["arm"]]
        rows.append([r["arm"], f"{before:.3f}", f"{r['loss']:.3f}", ci(r.get("recovered")) if r["arm"] != "parent"
                     else ci(r["vs_parent_start"]), ci(r["vs_parent_trained"]) if r["arm"] != "parent" else "-",
                     f"{r['tokens_per_s']:.0f}" if r.get("tokens_per_s") else "-"])
    header = ["model", "held-out loss, converted", "after training", "training's change [95%]",
              "- trained parent [95%]", "training tokens/s"]
    note = (f"`upcycle train`, {s['steps']} steps of {s['batch_size']} x {s['seq_len']} tokens, lr {s['lr']:g} "
            f"(warmup {s['warmup']}, cosine), precision {s['precision']}, its default routing losses; the parent "
            "trained the same way. Same held-out tokens as above.")
    return join(md(header, rows, "lrrllr"), note, ctx.source(PARTITION))


@table("partition-equal-cost")
def _partition_equal_cost(ctx: Ctx) -> str:
    """Each partition against the dense model of the same inference cost: the parent pruned to the same MLP share
    (its most used neurons on convert's sample), as upcycle eval compares them."""
    d = ctx.load(PARTITION)
    rows = []
    for r in d.get("equal_cost") or []:
        rows.append([f"{r['mlp_share']:.3g}", "parent pruned to this share", f"{r['loss']:.3f}", ci(r["vs_parent"]),
                     "-"])
        arms = {a["arm"]: a for a in r["arms"]}
        for a in sorted(d["arms"] + d.get("shared_arms", []), key=lambda a: (a.get("shared", 0),
                                                                            ORDERS_P.index(a["order"]))):
            name = f"{a['order']}-k{a['top_k']}" + (f"-s{a['shared']}" if a.get("shared") else "")
            if name in arms:
                rows.append(["", f"partition {name}", f"{a['converted']['loss']:.3f}", ci(a["converted"]["vs_parent"]),
                             f"{ci(arms[name])} {'lower' if arms[name]['ci95'][1] < 0 else 'higher' if arms[name]['ci95'][0] > 0 else 'no difference'}"])
    header = ["MLP share per token", "model", "held-out loss", "- parent's loss [95%]", "- pruned parent [95%]"]
    note = ("At conversion, before any training; the same held-out tokens as above. The pruned parent keeps each "
            "layer's most used neurons (mean |activation| on convert's built-in sample times the norm of the "
            "neuron's down_proj column). `-sS`: S of the 8 slices are a shared expert holding the most used neurons "
            "(qwen2_moe), k routed among the other 8 - S.")
    return join(md(header, rows, "llrll"), note, ctx.source(PARTITION))


@table("partition-summary")
def _partition_summary(ctx: Ctx) -> str:
    """The README's rows: the clustered partitions at each top-k, what they cost and save."""
    d = ctx.load(PARTITION)
    order = d["speed"].get("order", "cluster")
    pruned = {(a["arm"], r["mlp_share"]): a for r in d.get("equal_cost") or [] for a in r["arms"]}
    speed = {(r["model"], r["batch"]): r for r in d["speed"]["rows"]}
    batch = max(r["batch"] for r in d["speed"]["rows"])
    trained = {r["arm"]: r for r in d["train"]["rows"]}
    rows = []
    for a in sorted((a for a in d["arms"] if a["order"] == order), key=lambda a: a["top_k"]):
        name = f"{order}-k{a['top_k']}"
        sp = speed.get((f"{name} (upcycle)", batch))
        t = trained.get(name)
        rows.append([f"8 experts, top-{a['top_k']}", f"{a['flops_per_token'] / a['parent_flops_per_token']:.2f}",
                     ci(a["converted"]["vs_parent"]), ci(pruned.get((name, a["mlp_share"]))),
                     ci(t["vs_parent_trained"]) if t else "not trained",
                     f"{sp['x_parent']:.2f}x" if sp else "-"])
    header = [f"--slice-order {order}", "FLOPs / parent's", "loss - parent [95%]", "loss - pruned parent [95%]",
              f"after {d['train']['settings']['steps']} steps: - parent trained the same way",
              f"forward tokens/s, batch {batch} (x parent)"]
    return join(md(header, rows, "lrlllr"), ctx.source(PARTITION))


def _interval(c: dict) -> str:
    lo, hi = c["ci95"]
    return f"{c['mean']:+.2f} nats [{lo:+.2f}, {hi:+.2f}]"


@table("partition-findings")
def _partition_findings(ctx: Ctx) -> str:
    """The study's conclusions as sentences whose numbers come from the results file."""
    d = ctx.load(PARTITION)
    out = []
    by = {(a["order"], a["top_k"]): a for a in d["arms"]}
    for k in sorted({a["top_k"] for a in d["arms"]}):
        vs = [v for v in d["versus"] if v["top_k"] == k]
        lower = [v for v in vs if v["ci95"][1] < 0]
        parts = [f"{v['order']} {_interval(v)}" for v in vs]
        best = min((a for a in d["arms"] if a["top_k"] == k), key=lambda a: a["converted"]["loss"])
        out.append(f"- **Top-{k}** (MLP share {by[('contiguous', k)]['mlp_share']:.3g}): against contiguous, "
                   + "; ".join(parts) + f". Measurably lower: {', '.join(v['order'] for v in lower) or 'none'}. "
                   f"The best grouping, {best['order']}, is still {_interval(best['converted']['vs_parent'])} above "
                   "the parent.")
    for r in d.get("equal_cost") or []:
        lower = [a["arm"] for a in r["arms"] if a["ci95"][1] < 0]
        higher = [a["arm"] for a in r["arms"] if a["ci95"][0] > 0]
        best = min(r["arms"], key=lambda a: a["mean"])
        out.append(f"- **At equal inference cost, MLP share {r['mlp_share']:g}**: the parent pruned to that share is "
                   f"{_interval(r['vs_parent'])} above the parent; against it, {len(lower)} of {len(r['arms'])} "
                   f"partitions are lower ({', '.join(lower) or 'none'}), {len(higher)} higher; the closest, "
                   f"{best['arm']}, {_interval(best)}.")
    scales = [layer["logit_scale"] for a in d["arms"] if a["top_k"] > 1 for layer in a.get("grouping_layers") or []]
    if scales:
        smallest = min(scales)
        out.append(f"- **Router logit scale** (top-k above 1; at top-1 the one chosen expert's weight is 1 whatever the "
                   f"scale): the smallest factor, {smallest:g} of the least-squares logits, is the closest start in "
                   f"{sum(x == smallest for x in scales)} of {len(scales)} layers; the full scale in "
                   f"{sum(x == 1.0 for x in scales)}.")
    rows = {r["arm"]: r for r in d["train"]["rows"]}
    if rows:
        parent = rows.get("parent")
        arms = [r for name, r in rows.items() if name != "parent"]
        text = "; ".join(f"{r['arm']} {_interval(r['recovered'])} by training, then {_interval(r['vs_parent_trained'])} "
                         "above the trained parent" for r in arms)
        out.append(f"- **After {d['train']['settings']['steps']} training steps**: {text}. The parent itself moved "
                   f"{_interval(parent['vs_parent_start'])}." if parent else f"- **After training**: {text}.")
    sp = d["speed"]
    if sp.get("rows"):
        by_batch: dict = {}
        for r in sp["rows"]:
            if r["model"] != "parent":
                by_batch.setdefault(r["batch"], []).append(f"{r['model']} {r['x_parent']:.2f}x")
        out.append("- **Forward speed against the parent** (tokens/s ratio, above 1 is faster): "
                   + "; ".join(f"batch {b}: " + ", ".join(v) for b, v in sorted(by_batch.items())) + ".")
        bd = sp["breakdown"]
        parent = bd.get("parent")
        moe = [(m, x) for m, x in bd.items() if m != "parent"]
        if parent and moe:
            out.append(f"- **Where the time goes** (batch {sp['breakdown_batch']}): the parent's MLPs take "
                       f"{parent['mlp_s']:.2f} s of a {parent['forward_s']:.2f} s forward; "
                       + "; ".join(f"{m}: MoE blocks {x['mlp_s']:.2f} s, of which the experts modules "
                                   f"{x['experts_s']:.2f} s and router, top-k and dispatch around them "
                                   f"{x['router_and_dispatch_s']:.2f} s" for m, x in moe) + ".")
    return join("\n".join(out), ctx.source(PARTITION))


@table("partition-speed")
def _partition_speed(ctx: Ctx) -> str:
    d = ctx.load(PARTITION)
    sp = d["speed"]
    batches = sorted({r["batch"] for r in sp["rows"]})
    models = list(dict.fromkeys(r["model"] for r in sp["rows"]))
    by = {(r["model"], r["batch"]): r for r in sp["rows"]}
    rows = [[m, *(f"{by[(m, b)]['tokens_per_s']:.0f} ({by[(m, b)]['x_parent']:.2f}x; median "
                  f"{by[(m, b)]['x_parent_median']:.2f}x)" for b in batches)] for m in models]
    header = ["model (experts implementation)",
              *(f"batch {b} x {sp['seq']}: tokens/s (x parent; median round x parent)" for b in batches)]
    bd = sp["breakdown"]
    parts = [[m, f"{x['forward_s']:.2f}", f"{x['mlp_s']:.2f}", f"{x['experts_s']:.2f}" if x["experts_s"] else "-",
              f"{x['router_and_dispatch_s']:.2f}" if x["experts_s"] else "-", f"{x['rest_s']:.2f}"]
             for m, x in bd.items()]
    header2 = [f"model, batch {sp['breakdown_batch']} x {sp['seq']}, fastest of {sp['breakdown_reps']} forwards",
               "forward s", "MLP / MoE blocks s",
               "experts modules s", "router, top-k, dispatch s", "attention, norms, head s"]
    note = (f"Forward passes without a cache in transformers, float32, {sp['threads']} thread(s), the fastest of "
            f"{sp['reps']} rounds with the models interleaved (on a machine shared with other jobs the fastest round "
            f"is the least disturbed; the median round's ratio beside it); the partitions are --slice-order "
            f"{sp['order']} (the grouping does not change the cost).")
    return join(md(header, rows, "l" + "r" * len(batches)), md(header2, parts, "lrrrrr"), note, ctx.source(PARTITION))


def render(root: Path, page: Path, text: str) -> tuple[str, list[str], list[str]]:
    """The page with every table regenerated, the names of the tables that changed, and unknown names."""
    changed, unknown = [], []
    ctx = Ctx(root, page)

    def sub(m: re.Match) -> str:
        name = m.group(2)
        if name not in TABLES:
            unknown.append(name)
            return m.group(0)
        body = TABLES[name](ctx)
        if body != m.group(3):
            changed.append(name)
        return m.group(1) + body + m.group(4)

    return MARKER.sub(sub, text), changed, unknown


def run(root: Path, check: bool) -> int:
    """Every page is rendered before any is written, so a table that cannot be made leaves every page as it was."""
    stale, used, new_texts, bad = [], set(), {}, False
    for page in pages(root):
        text = page.read_text()
        new, changed, unknown = render(root, page, text)
        used |= {m.group(2) for m in MARKER.finditer(text)}
        rel = page.relative_to(root).as_posix()
        for name in unknown:
            print(f"{rel}: no table named {name!r} in benchmarks/tables.py", file=sys.stderr)
            bad = True
        stale += [f"{rel}: {name}" for name in changed]
        if changed:
            new_texts[page] = new
    unused = sorted(set(TABLES) - used)
    if unused:
        print(f"tables that no page shows: {', '.join(unused)}", file=sys.stderr)
        bad = True
    if bad:
        return 2
    if check:
        if stale:
            print("stale tables (run python benchmarks/tables.py):\n  " + "\n  ".join(stale), file=sys.stderr)
        return 1 if stale else 0
    for page, new in new_texts.items():
        page.write_text(new)
    if stale:
        print("rewrote:\n  " + "\n  ".join(stale))
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="change nothing; exit 1 if a table differs from its files")
    ap.add_argument("--root", type=Path, default=ROOT, help="the checkout whose pages and results to use")
    args = ap.parse_args(argv)
    return run(args.root.resolve(), args.check)


if __name__ == "__main__":
    sys.exit(main())
