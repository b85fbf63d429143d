"""Options that several commands share, each defined once: name, type, help text and help panel.

A command writes `seed: Seed = 0`; the default stays in its signature because it may differ per command, the
meaning and the spelling may not. Only typer is imported here, so `upcycle --help` stays instant.

Same spelling, deliberately not shared, because the meaning differs: --batch-size (train: per micro-batch and
process; eval: per forward pass), --steps (train: an optional budget beside --tokens; demo: the budget),
--eval-blocks (train: per validation; demo: the final comparison), --out (an argument of convert and demo, an
option of train and eval).
"""

from __future__ import annotations

from typing import Annotated, List, Optional

import typer

# Help panels. Every command shows the shared options under the same names.
COMMON = "Common options"
DATA = "Data"
EXPERTS = "Experts"
OPTIMISATION = "Optimisation"
HARDWARE = "Hardware and numerics"
OUTPUT = "Output"

Seed = Annotated[Optional[int], typer.Option(
    "--seed", rich_help_panel=COMMON,
    help="Seed of every random choice (router init, slicing, data order, held-out split): the same command with the "
         "same seed and inputs gives the same result with the same software (torch, transformers, tokenizer). Not "
         "across Python versions with convert's default k-means sample, which is read from this Python's standard "
         "library (upcycle.json records which files and a hash of the text; --router-init kmeans:TEXT pins it). "
         "upcycle eval: default the evaluated run's seed (run.json), so its held-out split is the run's.")]
Overwrite = Annotated[bool, typer.Option(
    "--overwrite", rich_help_panel=COMMON,
    help="Replace an earlier result instead of refusing (convert: a non-empty OUT; eval: a report in --out; "
         "demo: a folder an earlier demo made).")]
AllowPickle = Annotated[bool, typer.Option(
    "--allow-pickle", rich_help_panel=COMMON,
    help="Allow reading models stored as PyTorch pickle (.bin); only for files you trust.")]
Dtype = Annotated[str, typer.Option(
    "--dtype", rich_help_panel=COMMON,
    help="dtype of the weights: float32, bfloat16 or float16 (convert also takes auto: the parent's).")]

Data = Annotated[List[str], typer.Option(
    "--data", "-d", rich_help_panel=DATA,
    help="Text: .txt/.md/.py files (one document each), .jsonl/.json/.parquet/.csv (one document per row), "
         "folders or globs; upcycle train also takes a hub dataset name when online. Repeat for several.")]
SeqLen = Annotated[int, typer.Option(
    "--seq-len", rich_help_panel=DATA, help="Tokens per packed block (documents joined with EOS).")]
TextField = Annotated[Optional[str], typer.Option(
    "--text-field", rich_help_panel=DATA,
    help="Field holding the text in .jsonl/.json/.parquet/.csv files (default: text).")]
HeldoutFraction = Annotated[Optional[float], typer.Option(
    "--heldout-fraction", rich_help_panel=DATA,
    help="Share of --data's documents held out from training; upcycle train and upcycle eval --split heldout "
         "choose the same documents when given the same value and --seed. upcycle eval: default the evaluated "
         "run's (run.json), else 0.01; a value that differs from the run's is refused (it would score training "
         "documents).")]

Experts = Annotated[int, typer.Option("--experts", "-e", rich_help_panel=EXPERTS, help="Routed experts per MoE layer.")]
TopK = Annotated[int, typer.Option("--top-k", "-k", rich_help_panel=EXPERTS, help="Routed experts chosen per token.")]

Lr = Annotated[float, typer.Option(
    "--lr", rich_help_panel=OPTIMISATION, help="Peak learning rate (AdamW), after linear warmup, then cosine decay.")]
Precision = Annotated[str, typer.Option(
    "--precision", rich_help_panel=HARDWARE,
    help="auto (bf16 where the device runs bf16 matmuls natively: CUDA, or CPUs with AMX/AVX512-BF16; else fp32), "
         "bf16 (autocast over fp32 master weights) or fp32. Routers always compute in fp32.")]

__all__ = ["COMMON", "DATA", "EXPERTS", "HARDWARE", "OPTIMISATION", "OUTPUT", "AllowPickle", "Data", "Dtype",
           "Experts", "HeldoutFraction", "Lr", "Overwrite", "Precision", "Seed", "SeqLen", "TextField", "TopK"]


def opt(*names: str, panel: str, help: str):
    """A typer option shown in a help panel: what every command-specific option is made of."""
    return typer.Option(*names, rich_help_panel=panel, help=help)
