"""`upcycle eval`: options only; the work is done by upcycle.evaluate.run.evaluate()."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer


def eval_command(
    model: str = typer.Argument(..., help="Model to evaluate: an MoE folder (from upcycle convert/train, or an existing Mixtral, Qwen2-MoE, ... checkpoint), or a dense model."),
    parent: Optional[str] = typer.Option(None, "--parent", "-p", help="Dense parent to compare with, scored on the same tokens (folder, .gguf file or hub id). Must share MODEL's tokenizer."),
    baseline: Optional[str] = typer.Option(None, "--baseline", help="The dense baseline trained the same way: the run folder of `upcycle train PARENT` with the MoE's data and budget (or its final/ folder). Only against it may the verdict credit upcycling."),
    data: List[str] = typer.Option(..., "--data", "-d", help="Text to score: files, folders or globs (.txt, .md, .py, .jsonl, .parquet, ...). Repeat for several."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Report folder (report.json, summary.md, PNG plots). Default: ./eval-<MODEL name>."),
    split: str = typer.Option("heldout", "--split", help="heldout: only the held-out share of --data, chosen as upcycle train chooses it (same --seed and --heldout-fraction), so evaluating on the training files never scores training tokens. all: every token, for dedicated evaluation files."),
    heldout_fraction: float = typer.Option(0.01, "--heldout-fraction", help="Share of --data held out from training (match the value used for upcycle train)."),
    seq_len: int = typer.Option(512, "--seq-len", help="Tokens per scored block."),
    max_blocks: int = typer.Option(64, "--max-blocks", help="Most blocks to score (more blocks: narrower confidence intervals, slower)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the held-out split and block order (match upcycle train)."),
    text_field: Optional[str] = typer.Option(None, "--text-field", help="Field holding the text in .jsonl/.json/.parquet/.csv files (default: text)."),
    domain: Optional[List[str]] = typer.Option(None, "--domain", help="Domain text (all of it is scored): ranks the experts by how much more the domain uses them than --data does, and writes domain_experts.json for upcycle train --train."),
    domain_top: Optional[int] = typer.Option(None, "--domain-top", help="Experts to select per layer for --domain (default: the layer's top-k)."),
    layers: str = typer.Option("auto", "--layers", help="MoE layers whose experts get token and context profiles: auto (first, middle, last), all, none, or a list like 0,2,4-7."),
    top_tokens: int = typer.Option(10, "--top-tokens", help="Tokens listed per expert in the profiles."),
    contexts: int = typer.Option(3, "--contexts", help="Contexts listed per expert in the profiles (where the router was most sure)."),
    run: Optional[Path] = typer.Option(None, "--run", help="A training run folder (with metrics.jsonl): adds its training curves to the report."),
    tasks: Optional[str] = typer.Option(None, "--tasks", help="lm-eval-harness tasks to run on both models, comma-separated (needs `pip install lm-eval` and its datasets)."),
    tasks_limit: Optional[int] = typer.Option(None, "--tasks-limit", help="Examples per lm-eval task (default: all)."),
    batch_size: int = typer.Option(4, "--batch-size", "-b", help="Blocks per forward pass."),
    dtype: str = typer.Option("float32", "--dtype", help="float32, bfloat16 or float16 for both models."),
    device: str = typer.Option("auto", "--device", help="auto (CUDA when available), cpu, cuda or cuda:N."),
    plots: bool = typer.Option(True, "--plots/--no-plots", help="Write PNG plots (needs matplotlib)."),
    json_out: bool = typer.Option(False, "--json", help="Print report.json to stdout instead of the tables."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a report already in --out."),
    allow_pickle: bool = typer.Option(False, "--allow-pickle", help="Allow models stored as PyTorch pickle (.bin); only for files you trust."),
) -> None:
    """Compare an MoE with its dense parent on the same held-out tokens, and show how the experts are used.

    Loss and perplexity with confidence intervals, speed, parameters, FLOPs and memory side by side; per layer,
    routing diagnostics (load balance, entropy, capacity drops, co-selection, expert drift) and what each expert
    receives. Tells whether the model beats its parent, whether the routers learned, and, against a dense
    baseline trained on the same tokens (--baseline), whether upcycling paid off.

    Examples:

      upcycle eval ./smol-moe --parent ./SmolLM2-135M --data corpus/     # held-out share of the training data

      upcycle eval ./run/final --parent ./SmolLM2-135M --data eval.jsonl --split all --run ./run

      upcycle eval ./moe-run --parent ./SmolLM2-135M --baseline ./dense-run --data corpus/   # did upcycling pay off?

      upcycle eval ./smol-moe --data corpus/ --domain legal/ -o report   # which experts a legal fine-tune should train

      upcycle eval ./Mixtral-folder --data eval.txt --split all --layers all   # an existing MoE, no parent
    """
    from upcycle.core import ui
    from upcycle.evaluate.report import print_report
    from upcycle.evaluate.run import EvalOptions, evaluate

    options = EvalOptions(
        split=split, seq_len=seq_len, max_blocks=max_blocks, seed=seed, heldout_fraction=heldout_fraction,
        text_field=text_field, batch_size=batch_size, dtype=dtype, device=device, layers=layers,
        top_tokens=top_tokens, contexts=contexts, domain_top=domain_top, plots=plots, overwrite=overwrite,
        allow_pickle=allow_pickle, tasks=[t.strip() for t in tasks.split(",") if t.strip()] if tasks else [],
        tasks_limit=tasks_limit, baseline=baseline,
    )
    report = evaluate(model, data=data, parent=parent, out=out, domain=domain, run=run, options=options)
    if json_out:
        import json

        typer.echo(json.dumps(report.to_json(), indent=1))
    else:
        print_report(report, ui.out)
