"""What convert writes beside the weights: the manifest's content (upcycle.storage.manifest holds its format) and
the model card (README.md)."""

from __future__ import annotations

from dataclasses import asdict


from upcycle import __version__
from upcycle.core.tensors import NAME_OF, human_bytes, human_count
from upcycle.families.moe import ROUTINGS
from upcycle.storage.manifest import neuron_range


def manifest_dict(plan, parent_label: str, command: list[str] | None, verification: dict | None,
                  fingerprints: dict | None = None) -> dict:
    """fingerprints: {"parent": tensor_digest of the parent, "weights": folder_digest of the written MoE}."""
    fp = fingerprints or {}
    r = plan.recipe
    layers = []
    for lay in plan.layouts:
        entry: dict = {"index": lay.index, "moe": lay.moe}
        if lay.moe:
            entry["experts"] = [
                {"neurons": neuron_range(o.neurons), "down_scale": o.down_scale,
                 **({"source": o.source} if o.source is not None else {}),
                 **({"reinit": o.reinit.astype(int).tolist()} if o.reinit is not None else {})}
                for o in lay.experts
            ]
            if lay.shared is not None:
                entry["shared"] = {"neurons": neuron_range(lay.shared.neurons), "down_scale": lay.shared.down_scale,
                                   "copies": lay.shared.copies}
        layers.append(entry)
    return {
        "tool": "upcycle",
        "version": __version__,
        "command": command,
        "parent": {"source": parent_label, "model_type": plan.parent.model_type,
                   "intermediate_size": plan.parent.intermediate_size, "num_layers": plan.parent.num_layers,
                   "tensors_sha256": fp.get("parent")},
        "weights_sha256": fp.get("weights"),
        "recipe": asdict(r),
        # --router-init kmeans: which text the centroids came from (the built-in sample depends on the Python version)
        **({"router_init_sample": fp["router_init_sample"]} if fp.get("router_init_sample") else {}),
        "format": plan.fmt.model_type,
        "dtype": NAME_OF[plan.out_dtype],
        "moe_layers": plan.moe_layers,
        "virtual_group_size": r.group_size,
        # glm4_moe / dots1 apply the group scale through routed_scaling_factor instead of down_proj
        "routed_scaling_factor": plan.config.get("routed_scaling_factor", 1.0),
        "exact_by_construction": r.exact and (plan.sources is None or plan.sources.all_base),
        # why the start is not the parent's function (None: it is, to float32 noise); verification has the measure
        "not_exact_because": plan.inexact_reason,
        "parameters": {"total": plan.total_params, "active_per_token": plan.active_params, "parent": plan.parent_params},
        # 2 per weight a token multiplies (embedding lookups and attention over the context left out)
        "per_token": {"mlp_share": plan.mlp_share, "forward_flops": plan.flops_per_token,
                      "parent_forward_flops": plan.parent_flops_per_token},
        "partition": r.partition,
        # how the neurons were grouped (upcycle.convert.partition): the sample and, per layer, the router fit
        **({"grouping": plan.grouping.summary()} if plan.grouping is not None else {}),
        "verification": verification,
        # --expert-from: every source as given (an expert's "source" is its position here) and its tensor digest
        **({"sources": fp.get("sources"), "shared_from": plan.sources.shared_from} if plan.sources is not None else {}),
        "layers": layers,
    }


def grouping_text(plan) -> str:
    """The neurons' grouping in words, with what the fitted router measured on its sample (summary, model card)."""
    r, g = plan.recipe, plan.grouping
    how = {"contiguous": "contiguous slices", "random": "a seeded random permutation",
           "cluster": "balanced k-means of the neurons' gate_proj rows",
           "coactivation": "balanced k-means of the neurons' activations"}[r.slice_order]
    text = how + (f" on {g.sample}" if r.slice_order == "coactivation" and g is not None and g.sample else "")
    if r.partition and r.shared_experts and g is not None and g.sample:
        text += f"; the shared expert holds the {r.shared_experts * plan.parent.intermediate_size // r.granularity} most used neurons"
    s = g.summary() if g is not None else {}
    if s.get("mean_agreement") is not None:
        text += (f"; the fitted router's top-{r.top_k} holds {s['mean_agreement']:.0%} of each token's top-{r.top_k} "
                 f"experts by output on its {g.tokens}-token sample (chance {r.top_k / r.experts:.0%}); the MoE blocks "
                 f"are off the parent's MLP by {s['mean_rel_error']:.3f} relative there (the true top-{r.top_k}: "
                 f"{s['mean_oracle_rel_error']:.3f}), mean over layers")
    return text


def _why_close(r) -> str:
    if r.partition:
        return f"a partition: each token runs {r.top_k} of {r.experts} routed slices of the MLP"
    if r.expert_init_mode[0] != "copy":
        return "the recipe perturbs the experts on purpose"
    return r.inexact_reason


def _source_rows(plan, fingerprints: dict | None) -> list[str]:
    """Table rows for --expert-from: which experts each source gives (with its digest), where the rest comes from."""
    r, src = plan.recipe, plan.sources
    per = r.copies_per_source * r.group_size
    digests = {e["source"]: e["tensors_sha256"] for e in (fingerprints or {}).get("sources") or []}
    rows = []
    for j, spec in enumerate(src.specs):
        digest = digests.get(spec)
        which = f"expert {j}" if per == 1 else f"experts {j * per}-{(j + 1) * per - 1}"
        rows.append(f"| {which} from | `{spec}`"
                    + (" (the parent itself)" if src.of_spec[j] < 0 else "")
                    + (f", tensors sha256 `{digest[:16]}...`" if digest else "") + " |")
    rows.append(f"| attention, norms, embeddings{', dense MLPs' if len(plan.moe_layers) < plan.parent.num_layers else ''}"
                f"{', shared experts' if r.shared_experts else ''} | {src.shared_from} |")
    return rows


def model_card(plan, parent_label: str, command: list[str] | None, verification: dict | None,
               fingerprints: dict | None = None) -> str:
    r, p, fmt = plan.recipe, plan.parent, plan.fmt
    dense = [i for i in range(p.num_layers) if i not in set(plan.moe_layers)]
    mode, value = r.expert_init_mode
    init = {"copy": "exact copies of the parent MLP",
            "drop": f"Drop-Upcycling: {value:g} of each expert's neurons re-drawn from the parent matrix statistics",
            "noise": f"copies plus Gaussian noise of std {value:g}"}[mode]
    if plan.sources is not None and not plan.sources.all_base:
        init = init.replace("the parent MLP", "the MLPs of their --expert-from sources")
    if verification is None:
        check = "not verified (`--no-verify`)"
    else:
        from upcycle.convert.verify import summary

        check = summary(verification)
    cmd = " ".join(command) if command else f"upcycle convert {parent_label} OUT"
    mixed = plan.sources is not None and not plan.sources.all_base
    if mixed:
        computes = ("does NOT compute what the parent computes: " + plan.sources.inexact_reason
                    + (" (how far it is, on the verification prompts, is in the check below)" if verification
                       else " (not measured: converted with `--no-verify`)"))
    else:
        computes = ("until trained, computes "
                    + ('what the parent computes' if r.exact else 'close to what the parent computes (' + _why_close(r) + ')'))
    lines = [
        "---",
        "library_name: transformers",
        "tags: [moe, mixture-of-experts, upcycling, upcycle]",
        "---",
        "",
        f"# {fmt.model_type} MoE upcycled from `{parent_label}`",
        "",
        f"Made by [upcycle](https://pypi.org/project/upcycle/) {__version__} from a dense {p.model_type} parent. "
        f"It loads with `AutoModelForCausalLM.from_pretrained` (no remote code) and {computes}.",
        "",
        "| | |",
        "|---|---|",
        f"| MoE type | `{fmt.model_type}` ({fmt.architecture}) |",
        f"| routed experts | {r.experts}, top-{r.top_k}, each 1/{r.granularity} of the parent MLP ({p.intermediate_size // r.granularity} wide) |",
        f"| shared experts | {r.shared_experts} |",
        f"| MoE layers | {len(plan.moe_layers)} of {p.num_layers}" + (f" (dense: {dense})" if dense else "") + " |",
        f"| expert init | {init} |",
        *([f"| partition | one MLP copy cut into {r.experts} experts, top-{r.top_k}: not exact by design |",
           f"| grouping | {grouping_text(plan)} |"] if r.partition or plan.grouping is not None else []),
        f"| router init | {r.router_description}"
        + (" (one row per expert) |" if r.partition else f" (virtual groups of {r.group_size} tied) |"),
        f"| routing | {r.routing}: {ROUTINGS[r.routing]} |",
        f"| parameters | {human_count(plan.total_params)} total, {human_count(plan.active_params)} active per token (parent: {human_count(plan.parent_params)}) |",
        f"| per token | {plan.mlp_share:.3g} of the parent's MLP per MoE layer; {human_count(plan.flops_per_token)} "
        f"forward FLOPs ({plan.flops_per_token / plan.parent_flops_per_token:.2f} of the parent's "
        f"{human_count(plan.parent_flops_per_token)}; attention over the context not counted) |",
        f"| dtype, size | {NAME_OF[plan.out_dtype]}, {human_bytes(plan.output_bytes)} |",
        *(_source_rows(plan, fingerprints) if plan.sources is not None else []),
        f"| check against the parent | {check} |",
        "",
        "Reproduce (same bytes):",
        "",
        f"```\n{cmd}\n```",
        "",
        "The full recipe, with the parent neurons behind every expert, is in `upcycle.json`.",
    ]
    from upcycle.families.moe import portability_notes

    notes = portability_notes(fmt, p, r)
    if notes:
        lines += ["", "Notes: " + "; ".join(notes) + "."]
    return "\n".join(lines) + "\n"
