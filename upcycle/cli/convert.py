"""`upcycle convert`: options only; the work is done by upcycle.convert.convert()."""

from __future__ import annotations

from pathlib import Path

import typer

FORMATS = "auto|mixtral|qwen2_moe|qwen3_moe|glm4_moe|dots1|granitemoe|granitemoeshared|flex_olmo"


def convert_command(
    parent: str = typer.Argument(..., help="Dense parent: a Hugging Face folder, a .gguf file, or a hub id (online only)."),
    out: Path = typer.Argument(..., help="Output folder for the MoE checkpoint (must not exist or be empty, unless --overwrite)."),
    experts: int = typer.Option(8, "--experts", "-e", help="Routed experts per MoE layer."),
    top_k: int = typer.Option(2, "--top-k", "-k", help="Routed experts chosen per token."),
    granularity: int = typer.Option(1, "--granularity", "-g", help="Each expert is 1/G of the dense MLP (fine-grained experts)."),
    shared_experts: int = typer.Option(0, "--shared-experts", help="Always-on shared experts, each 1/G of the dense MLP."),
    format: str = typer.Option("auto", "--format", "-f", help=f"Output model type: {FORMATS}. auto picks the most widely supported type that holds the parent exactly."),
    moe_layers: str = typer.Option("all", "--moe-layers", help="Layers that become MoE: all, every:N, or a list like 0,2,4-7 (others stay dense where the format allows)."),
    router_init: str = typer.Option("random", "--router-init", help="random (fp32, small std, virtual groups tied) or kmeans:TEXT_FILE (centroids of the parent's hidden states)."),
    router_std: float = typer.Option(0.02, "--router-std", help="Standard deviation of the random router weights."),
    expert_init: str = typer.Option("copy", "--expert-init", help="copy (exact), drop:R (Drop-Upcycling, re-initialise ratio R) or noise:STD (Gaussian noise)."),
    slice_order: str = typer.Option("contiguous", "--slice-order", help="How fine-grained experts split the MLP neurons: contiguous or random (seeded permutation)."),
    seed: int = typer.Option(0, "--seed", help="Seed for every random choice; the same command writes the same bytes."),
    dtype: str = typer.Option("auto", "--dtype", help="auto (the parent's), float32, bfloat16 or float16."),
    max_shard_size: str = typer.Option("5GB", "--max-shard-size", help="Largest output shard, e.g. 500MB, 5GB."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a non-empty OUT."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the plan (layout, sizes, parameters) and write nothing."),
    verify: bool = typer.Option(True, "--verify/--no-verify", help="Check the written folder against the parent: copied tensors by bytes, experts against their parent neurons, every MoE block against the parent's MLP layer by layer in float64 (about one layer of memory); fail if an exact recipe is not exact."),
    full_check: str = typer.Option("auto", "--full-check", help="Also load parent and MoE whole through transformers (float32 logits, greedy decoding): auto (only when that needs under 1 GiB and half the free memory), always, or never. The layer-by-layer float64 check runs whenever --verify does."),
    allow_pickle: bool = typer.Option(False, "--allow-pickle", help="Allow reading a parent stored as PyTorch pickle (.bin); only for files you trust."),
) -> None:
    """Convert a dense checkpoint into a Mixture-of-Experts checkpoint that computes what the parent computed.

    Examples:

      upcycle convert ./SmolLM2-135M ./smol-moe                     # 8 experts top-2, type chosen for you

      upcycle convert model.gguf out -e 32 -k 4 -g 4 --shared-experts 2   # fine-grained + shared (DeepSeekMoE style)

      upcycle convert ./parent out --expert-init drop:0.5           # Drop-Upcycling (not exact, on purpose)

      upcycle convert ./parent out --moe-layers every:2 --dry-run   # see the plan first
    """
    from upcycle.convert import convert

    convert(
        parent,
        out,
        experts=experts,
        top_k=top_k,
        granularity=granularity,
        shared_experts=shared_experts,
        format=format,
        moe_layers=moe_layers,
        router_init=router_init,
        router_std=router_std,
        expert_init=expert_init,
        slice_order=slice_order,
        seed=seed,
        dtype=dtype,
        max_shard_size=max_shard_size,
        overwrite=overwrite,
        dry_run=dry_run,
        verify=verify,
        allow_pickle=allow_pickle,
        full_check=full_check,
    )
