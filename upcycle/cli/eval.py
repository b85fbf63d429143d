"""`upcycle eval`: options only; upcycle.evaluate.run.evaluate() does the work and the CLI prints its report.

Each parameter is named after its EvalOptions field: an option is one field there plus one parameter here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, List, Optional

import typer

from upcycle.cli.options import (
    opt as _opt,
    DATA,
    HARDWARE,
    OUTPUT,
    AllowPickle,
    Data,
    Dtype,
    HeldoutFraction,
    Overwrite,
    Seed,
    SeqLen,
    TextField,
)

COMPARISON = "Comparison"
EXPERT_PROFILES = "Expert profiles"


def eval_command(
    model: Annotated[str, typer.Argument(help="Model to evaluate: an MoE folder (from upcycle convert/train, or an existing Mixtral, Qwen2-MoE, ... checkpoint), a run folder of upcycle train (its final/ is scored, and its run is the --run), or a dense model.")],
    # data
    data: Data = ...,
    split: Annotated[str, _opt("--split", panel=DATA, help="heldout: only the held-out share of --data, chosen as the evaluated run chose it (its --seed and --heldout-fraction, from run.json), so evaluating on the training files never scores training tokens. all: every token, for dedicated evaluation files.")] = "heldout",
    heldout_fraction: HeldoutFraction = None,
    seq_len: SeqLen = 512,
    max_blocks: Annotated[int, _opt("--max-blocks", panel=DATA, help="Most blocks to score (more blocks: narrower confidence intervals, slower).")] = 64,
    text_field: TextField = None,
    # comparison
    parent: Annotated[Optional[str], _opt("--parent", "-p", panel=COMPARISON, help="Dense parent to compare with, scored on the same tokens (folder, .gguf file or hub id). Must share MODEL's tokenizer.")] = None,
    baseline: Annotated[Optional[str], _opt("--baseline", panel=COMPARISON, help="The dense baseline trained the same way: the run folder of `upcycle train PARENT` with the MoE's data and budget (or its final/ folder). Only against it may the verdict credit upcycling.")] = None,
    equal_cost: Annotated[bool, _opt("--equal-cost/--no-equal-cost", panel=COMPARISON, help="For an MoE that runs less than its parent per token (a partition, see upcycle.json's per_token): also score the parent pruned to the same active MLP width (its most used neurons on a built-in sample), and give the verdict at equal inference cost. --no-equal-cost skips it and the extra parent pass it needs.")] = True,
    run: Annotated[Optional[Path], _opt("--run", panel=COMPARISON, help="A training run folder (with metrics.jsonl): adds its training curves to the report.")] = None,
    tasks: Annotated[Optional[str], _opt("--tasks", panel=COMPARISON, help="lm-eval-harness tasks to run on both models, comma-separated (needs `pip install lm-eval` and its datasets).")] = None,
    tasks_limit: Annotated[Optional[int], _opt("--tasks-limit", panel=COMPARISON, help="Examples per lm-eval task (default: all).")] = None,
    # expert profiles
    layers: Annotated[str, _opt("--layers", panel=EXPERT_PROFILES, help="MoE layers whose experts get token and context profiles: auto (first, middle, last), all, none, or a list like 0,2,4-7.")] = "auto",
    top_tokens: Annotated[int, _opt("--top-tokens", panel=EXPERT_PROFILES, help="Tokens listed per expert in the profiles.")] = 10,
    contexts: Annotated[int, _opt("--contexts", panel=EXPERT_PROFILES, help="Contexts listed per expert in the profiles (where the router was most sure).")] = 3,
    domain: Annotated[Optional[List[str]], _opt("--domain", panel=EXPERT_PROFILES, help="Domain text (all of it is scored): ranks the experts by how much more the domain uses them than --data does, and writes domain_experts.json for upcycle train --train.")] = None,
    domain_top: Annotated[Optional[int], _opt("--domain-top", panel=EXPERT_PROFILES, help="Experts to select per layer for --domain (default: the layer's top-k).")] = None,
    # output
    out: Annotated[Optional[Path], _opt("--out", "-o", panel=OUTPUT, help="Report folder (report.json, summary.md, PNG plots). Default: ./eval-<MODEL name>.")] = None,
    plots: Annotated[bool, _opt("--plots/--no-plots", panel=OUTPUT, help="Write PNG plots.")] = True,
    json_out: Annotated[bool, _opt("--json", panel=OUTPUT, help="Print report.json to stdout instead of the tables.")] = False,
    # hardware
    batch_size: Annotated[int, _opt("--batch-size", "-b", panel=HARDWARE, help="Blocks per forward pass.")] = 4,
    device: Annotated[str, _opt("--device", panel=HARDWARE, help="auto (CUDA when available), cpu, cuda or cuda:N.")] = "auto",
    # common
    seed: Seed = None,
    dtype: Dtype = "float32",
    overwrite: Overwrite = False,
    allow_pickle: AllowPickle = False,
) -> None:
    """Compare an MoE with its dense parent on the same held-out tokens, and show how the experts are used.

    Loss and perplexity with confidence intervals, speed, parameters, FLOPs and
    memory side by side; per layer, routing diagnostics (load balance, entropy,
    capacity drops, co-selection, expert drift) and what each expert receives.
    Tells whether the model beats its parent, whether the routers learned, and,
    against a dense baseline trained on the same tokens (--baseline), whether
    upcycling paid off. An MoE cheaper per token than its parent (a partition)
    is also judged at equal inference cost, against the parent pruned to the
    same active MLP width (--no-equal-cost skips it).

    Examples:

    The held-out share of the training data:
      upcycle eval ./smol-moe --parent ./SmolLM2-135M --data corpus/

    Dedicated evaluation text, with the training curves of the run:
      upcycle eval ./run/final --parent ./SmolLM2-135M --data eval.jsonl \\
        --split all --run ./run

    Did upcycling pay off? Against the dense parent trained the same way
    (upcycle train PARENT with the MoE run's options; run folders, whose
    final/ is scored and whose run.json must match):
      upcycle eval ./moe-run --parent ./SmolLM2-135M --baseline ./dense-run \\
        --data corpus/

    Which experts a legal fine-tune should train:
      upcycle eval ./smol-moe --data corpus/ --domain legal/ -o report

    An existing MoE, no parent:
      upcycle eval ./Mixtral-folder --data eval.txt --split all --layers all
    """
    options = {name: value for name, value in locals().items() if name not in ("model", "json_out")}
    from upcycle.cli.show import events, show
    from upcycle.evaluate.run import EvalOptions, evaluate

    report = evaluate(model, EvalOptions(**options), events=events())
    if json_out:
        import json

        typer.echo(json.dumps(report.to_json(), indent=1))
    else:
        show(report)
