"""`upcycle convert`: options only; upcycle.convert.convert() does the work and the CLI prints its result."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, List, Optional

import typer

from upcycle.cli.options import EXPERTS, OUTPUT, AllowPickle, Dtype, Experts, Overwrite, Seed, TopK
from upcycle.families.moe import ROUTINGS, format_names

FORMATS = ", ".join(format_names())
ROUTER = "Router"
SOURCES = "Experts from several checkpoints"
VERIFICATION = "Verification"


def convert_command(
    parent: Annotated[str, typer.Argument(help="Dense parent: a Hugging Face folder, a .gguf file, or a hub id (online only).")],
    out: Annotated[Path, typer.Argument(help="Output folder for the MoE checkpoint (must not exist or be empty, unless --overwrite), or a .gguf file (from a GGUF parent: llama.cpp's MoE, the parent's quant blocks kept).")],
    experts: Experts = 8,
    top_k: TopK = 2,
    granularity: Annotated[int, typer.Option("--granularity", "-g", rich_help_panel=EXPERTS, help="Each expert is 1/G of the dense MLP (fine-grained experts).")] = 1,
    shared_experts: Annotated[int, typer.Option("--shared-experts", rich_help_panel=EXPERTS, help="Always-on shared experts, each 1/G of the dense MLP.")] = 0,
    moe_layers: Annotated[str, typer.Option("--moe-layers", rich_help_panel=EXPERTS, help="Layers that become MoE: all, every:N, or a list like 0,2,4-7 (others stay dense where the format allows).")] = "all",
    expert_init: Annotated[str, typer.Option("--expert-init", rich_help_panel=EXPERTS, help="copy (exact), drop:R (Drop-Upcycling, re-initialise ratio R) or noise:STD (Gaussian noise).")] = "copy",
    slice_order: Annotated[str, typer.Option("--slice-order", rich_help_panel=EXPERTS, help="How fine-grained experts split the MLP neurons: contiguous, random (seeded permutation), cluster (balanced k-means of the neurons' gate_proj rows) or coactivation (balanced k-means of their activations on sample text: the --router-init fit:TEXT text, else a built-in sample). A partition (--experts G --granularity G --top-k below G: one MLP copy, fewer FLOPs, not exact) loses least with cluster or coactivation.")] = "contiguous",
    expert_from: Annotated[Optional[List[str]], typer.Option("--expert-from", rich_help_panel=SOURCES, help="A dense checkpoint (folder or .gguf) with the parent's architecture whose MLPs become experts; repeat for several (Branch-Train-MiX). --experts must be a multiple of (sources x G): the copies are split evenly, in order; PARENT gives everything else.")] = None,
    average_shared: Annotated[bool, typer.Option("--average-shared", rich_help_panel=SOURCES, help="With --expert-from: attention, norms, embeddings, dense MLPs and shared experts are the mean over PARENT and the sources instead of PARENT's.")] = False,
    router_init: Annotated[str, typer.Option("--router-init", rich_help_panel=ROUTER, help="auto (kmeans for --routing renorm, random otherwise), random (--router-std), kmeans (centroids of the parent's hidden states on a built-in sample of standard library text: runs the parent over 2,048 tokens, seconds for a 135M parent, even with --no-verify; random skips that) or kmeans:TEXT (on your files); with --expert-from also prompts:FILE (JSON/YAML {source: [texts]}: each source's row from the hidden states of its texts); for a partition fit (its default) or fit:TEXT: rows fitted so that top-k picks the experts carrying most of each token's MLP output.")] = "auto",
    router_std: Annotated[float, typer.Option("--router-std", rich_help_panel=ROUTER, help="Standard deviation of the random router weights; 0: a zero router (softmax/sigmoid routing: an exact start, every token ties).")] = 0.02,
    routing: Annotated[str, typer.Option("--routing", rich_help_panel=ROUTER, help=f"Routing weights: {', '.join(ROUTINGS)}. renorm: top-k renormalised (exact with any router); softmax (qwen*/flex_olmo) and sigmoid (glm4_moe/dots1): not renormalised, so the router learns from step 0, exact only with --router-std 0.")] = "renorm",
    format: Annotated[str, typer.Option("--format", "-f", rich_help_panel=OUTPUT, help=f"Output model type: {FORMATS}. auto picks the most widely supported type that holds the parent exactly.")] = "auto",
    gguf_type: Annotated[str, typer.Option("--gguf-type", rich_help_panel=OUTPUT, help="For a .gguf OUT: auto (the parent's own types, quant blocks copied byte for byte), f32, f16, bf16 or q8_0 (re-typed from the dequantized parent).")] = "auto",
    max_shard_size: Annotated[str, typer.Option("--max-shard-size", rich_help_panel=OUTPUT, help="Largest output shard, e.g. 500MB, 5GB.")] = "5GB",
    dry_run: Annotated[bool, typer.Option("--dry-run", rich_help_panel=OUTPUT, help="Print the plan (layout, sizes, parameters) and write nothing.")] = False,
    verify: Annotated[bool, typer.Option("--verify/--no-verify", rich_help_panel=VERIFICATION, help="Check the written folder against the parent: copied tensors by bytes, experts against their parent neurons, every MoE block against the parent's MLP layer by layer in float64 (about one layer of memory); fail if an exact recipe is not exact.")] = True,
    full_check: Annotated[str, typer.Option("--full-check", rich_help_panel=VERIFICATION, help="Also load parent and MoE whole through transformers (float32 logits, greedy decoding): auto (only when that needs under 1 GiB and half the free memory), always, or never.")] = "auto",
    require_exact: Annotated[bool, typer.Option("--require-exact", rich_help_panel=VERIFICATION, help="Refuse (before any work) a recipe whose start is not the parent's function, e.g. --routing softmax with a random router or --expert-init drop:R.")] = False,
    seed: Seed = 0,
    dtype: Dtype = "auto",
    overwrite: Overwrite = False,
    allow_pickle: AllowPickle = False,
) -> None:
    """Convert a dense checkpoint into a Mixture-of-Experts checkpoint that computes what the parent computed.

    Examples:

    8 experts top-2, the output type chosen for you:
      upcycle convert ./SmolLM2-135M ./smol-moe

    Fine-grained experts plus shared experts (DeepSeekMoE style):
      upcycle convert model.gguf out -e 32 -k 4 -g 4 --shared-experts 2

    Drop-Upcycling (not exact, on purpose):
      upcycle convert ./parent out --expert-init drop:0.5

    A partition, cheaper than its parent (not exact, on purpose):
      upcycle convert ./parent out -e 8 -g 8 -k 2 --slice-order coactivation

    See the plan first:
      upcycle convert ./parent out --moe-layers every:2 --dry-run

    Branch-Train-MiX: experts from fine-tunes of the parent:
      upcycle convert ./base out -e 2 -k 2 --expert-from ./a --expert-from ./b

    A GGUF MoE for llama.cpp, the Q4_1 parent's blocks kept:
      upcycle convert SmolLM2-135M-Instruct.Q4_1.gguf smol-moe.gguf -e 8 -k 2
    """
    options = {name: value for name, value in locals().items() if name != "parent"}
    from upcycle.cli.show import events, show
    from upcycle.convert import ConvertOptions, convert

    if out.suffix.lower() == ".gguf":
        from upcycle.cli.convert_gguf import run_gguf

        run_gguf(parent, ConvertOptions.from_fields(**options))
        return
    show(convert(parent, ConvertOptions.from_fields(**options), events=events()))
