"""What `upcycle convert` shows: the plan (a dry run, or before writing) and the summary, from a ConvertResult.

The library computes (upcycle.convert.convert); only the command line prints.
"""

from __future__ import annotations

from rich.console import Console

from upcycle.convert.run import ConvertResult, exact_claim
from upcycle.core.tensors import NAME_OF, human_bytes, human_count
from upcycle.families.moe import ROUTINGS, portability_notes


def print_plan(result: ConvertResult, console: Console) -> None:
    """The layer table and the facts of the plan: format, expert sizes, parameters, output size, exactness."""
    from rich.table import Table

    from upcycle.convert.writer import assign_shards

    plan, out = result.plan, result.out
    r, p = plan.recipe, plan.parent
    t = Table(title=f"upcycle plan: {p.model_type} -> {plan.fmt.model_type}", show_header=True, header_style="bold")
    t.add_column("layer")
    t.add_column("block")
    t.add_column("experts")
    width = p.intermediate_size // r.granularity
    layout = (f"a partition of one MLP copy, slice order {r.slice_order}" if r.partition
              else f"virtual groups of {r.group_size}, {r.copies} copies")
    for lay in plan.layouts:
        if lay.moe:
            shared = f" + shared {r.shared_experts}x{width}" if r.shared_experts else ""
            t.add_row(str(lay.index), "MoE", f"{r.experts}x{width} top-{r.top_k}{shared}")
        else:
            t.add_row(str(lay.index), "dense", f"MLP {p.intermediate_size}")
    console.print(t)
    shards = len(assign_shards(plan.tensors, result.options.max_shard_bytes))
    lines = [
        f"format        {plan.fmt.model_type} ({plan.fmt.architecture})",
        f"experts       {r.experts} routed of {width} neurons (1/{r.granularity} of {p.intermediate_size}), top-{r.top_k}, "
        f"{r.shared_experts} shared; {layout}",
        f"parameters    {human_count(plan.total_params)} total, {human_count(plan.active_params)} active per token "
        f"(parent {human_count(plan.parent_params)})",
        f"per token     {per_token(plan)}",
        f"output        {human_bytes(plan.output_bytes)} in {shards} shard(s), {NAME_OF[plan.out_dtype]}" + (f" -> {out}" if out else ""),
        *(_source_lines(plan) if plan.sources is not None else []),
        f"routing       {r.routing}: {ROUTINGS[r.routing]}",
        f"router        {r.router_description}",
        f"exact         {'yes' if exact_claim(plan) else 'no: ' + plan.inexact_reason}",
    ]
    if result.estimate is not None:
        lines.append(f"memory        about {human_bytes(result.estimate.total)} ({result.estimate.describe()})")
    for note in portability_notes(plan.fmt, plan.parent, plan.recipe):
        lines.append(f"note          {note}")
    console.print("\n".join(lines))


def per_token(plan) -> str:
    """The MLP share and forward FLOPs a token costs, against the parent's."""
    share = plan.mlp_share
    mlp = f"{share:.3g} of the parent's MLP" if share != 1 else "the parent's whole MLP"
    layers = len(plan.moe_layers)
    return (f"{mlp} in {layers} MoE layer(s); {human_count(plan.flops_per_token)} FLOPs forward "
            f"({plan.flops_per_token / plan.parent_flops_per_token:.2f} of the parent's "
            f"{human_count(plan.parent_flops_per_token)}, attention over the context not counted)")


def _source_lines(plan) -> list[str]:
    r, src = plan.recipe, plan.sources
    per = r.copies_per_source * r.group_size
    lines = [f"experts from  {spec}: " + (f"expert {j}" if per == 1 else f"experts {j * per}-{(j + 1) * per - 1}")
             + (" (the parent itself)" if src.of_spec[j] < 0 else "") for j, spec in enumerate(src.specs)]
    return lines + [f"other weights {src.shared_from}"]


def print_summary(result: ConvertResult, console: Console) -> None:
    """One line on what was written, one on how it verified (or a warning that an inexact recipe was not measured)."""
    plan, r, v = result.plan, result.plan.recipe, result.verification
    console.print(f"[green]wrote[/] {result.out}: {plan.fmt.model_type}, {r.experts} experts top-{r.top_k}, "
                  f"{human_count(plan.total_params)} params ({human_count(plan.active_params)} active), "
                  f"{human_bytes(plan.output_bytes)} in {result.seconds:.1f}s{_phases(result.phases, result.beside)}")
    if r.router_init_mode[0] == "kmeans":
        # the parent runs over a text sample even with --no-verify: say what it cost and how to skip it
        spent = result.phases.get("router init", 0.0) + result.phases.get("router init wait", 0.0) + \
            (result.beside or {}).get("router init", 0.0)
        console.print(f"router: k-means of the parent's hidden states ({spent:.1f}s of the parent run; "
                      "--router-init random skips it, docs/study.md says why k-means is the default)", soft_wrap=True)
    console.print(f"per token: {per_token(plan)}", soft_wrap=True)
    if plan.grouping is not None and plan.grouping.layers:
        console.print(f"grouping: {grouping_line(plan)}", soft_wrap=True)
    if v is not None:
        from upcycle.convert.verify import summary

        verdict = "exact" if v["exact_expected"] else "not exact by design"
        if v.get("mixed") is not None:
            verdict = "not the parent's function: experts from other checkpoints"
        console.print(f"verified ({verdict}): {summary(v)}", soft_wrap=True)
    elif plan.sources is not None and not plan.sources.all_base:
        console.print(f"[yellow]warning:[/] this model is not the parent's function ({plan.inexact_reason}); run "
                      "with --verify to measure how far it is from the parent", soft_wrap=True)
    elif not exact_claim(plan):
        console.print("[yellow]warning:[/] this recipe is not exact; run with --verify to measure how far it is "
                      "from the parent", soft_wrap=True)


def grouping_line(plan) -> str:
    """How the neurons were grouped and, for a fitted router, how well it predicts the experts that matter."""
    from upcycle.convert.card import grouping_text

    return grouping_text(plan)


def _phases(phases: dict, beside: dict | None = None) -> str:
    """' (router init 31.0s, write 20.1s, verify 38.2s)': the steps that took a second or more, then what ran on a
    thread beside them (' (write 12.0s, verify 11.7s; beside the writer: router init 13.1s)')."""
    parts = [", ".join(f"{name} {sec:.1f}s" for name, sec in phases.items() if sec >= 1.0)]
    if beside:
        parts.append("beside the writer: " + ", ".join(f"{name} {sec:.1f}s" for name, sec in beside.items()))
    text = "; ".join(p for p in parts if p)
    return f" ({text})" if text else ""
