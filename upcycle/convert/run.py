"""`upcycle convert`: a dense checkpoint in, a standard Hugging Face MoE checkpoint out.

Plan first (parent facts, format, every output tensor), then execute: stream tensors into shards inside a
temporary folder, add config, tokenizer, manifest and card, verify against the parent, and only then move
the folder into place.
"""

from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from upcycle.core import memory, ui
from upcycle.core.errors import InputError, UsageError
from upcycle.families.moe import choose_format, portability_notes
from upcycle.convert.card import manifest_dict, model_card, write_manifest
from upcycle.convert.parent import ParentCheckpoint, open_parent
from upcycle.convert.plan import Plan, make_plan
from upcycle.convert.recipe import Recipe
from upcycle.core.tensors import CODE_OF, NAME_OF, human_bytes, human_count, parse_size
from upcycle.convert.weights import ParentReader
from upcycle.convert.writer import atomic_folder, check_output, check_space, write_shards


@dataclass
class ConvertResult:
    out: Path | None
    plan: Plan
    verification: dict | None
    seconds: float


def _is_pow2(x: float) -> bool:
    return x > 0 and math.frexp(x)[0] == 0.5


def exact_claim(plan: Plan) -> bool:
    """Exact by construction, and not undone by storing a non-power-of-two scale in 16 bits."""
    if not plan.recipe.exact:
        return False
    if plan.out_dtype == "F32":
        return True
    scales = {o.down_scale for lay in plan.layouts for o in lay.experts + ([lay.shared] if lay.shared else [])}
    return all(_is_pow2(s) for s in scales)


def _check_parent_tensors(reader: ParentReader, plan: Plan) -> None:
    p = plan.parent
    want = {"gate": (p.intermediate_size, p.hidden_size), "up": (p.intermediate_size, p.hidden_size),
            "down": (p.hidden_size, p.intermediate_size)}
    for i in range(p.num_layers):
        for w, shape in want.items():
            name = f"model.layers.{i}.mlp.{w}_proj.weight"
            if not reader.has(name):
                raise InputError(f"the parent checkpoint lacks {name}")
            if tuple(reader.shape(name)) != shape:
                raise InputError(f"{name} has shape {list(reader.shape(name))}, config.json implies {list(shape)}")


def build_plan(ckpt: ParentCheckpoint, recipe: Recipe, router_bases: dict | None = None) -> tuple[Plan, ParentReader]:
    p = ckpt.spec
    if p.intermediate_size % recipe.granularity:
        raise UsageError(
            f"--granularity {recipe.granularity} does not divide the intermediate size {p.intermediate_size}; "
            f"divisors up to 16: {', '.join(str(g) for g in range(1, 17) if p.intermediate_size % g == 0)}"
        )
    moe_layers = recipe.parse_moe_layers(p.num_layers)
    fmt = choose_format(p, recipe, moe_layers)
    reader = ParentReader(ckpt.source, p)
    out_dtype = ckpt.source.float_dtype() if recipe.dtype == "auto" else CODE_OF[recipe.dtype]
    try:
        plan = make_plan(p, reader, recipe, fmt, moe_layers, out_dtype, router_bases)
    except KeyError as exc:
        raise InputError(f"the parent checkpoint lacks tensor {exc.args[0]}") from None
    _check_parent_tensors(reader, plan)
    return plan, reader


def describe(plan: Plan, out: Path | None, max_shard_bytes: int) -> None:
    from rich.table import Table

    from upcycle.convert.writer import assign_shards

    r, p = plan.recipe, plan.parent
    t = Table(title=f"upcycle plan: {p.model_type} -> {plan.fmt.model_type}", show_header=True, header_style="bold")
    t.add_column("layer")
    t.add_column("block")
    t.add_column("experts")
    width = p.intermediate_size // r.granularity
    for lay in plan.layouts:
        if lay.moe:
            shared = f" + shared {r.shared_experts}x{width}" if r.shared_experts else ""
            t.add_row(str(lay.index), "MoE", f"{r.experts}x{width} top-{r.top_k}{shared}")
        else:
            t.add_row(str(lay.index), "dense", f"MLP {p.intermediate_size}")
    ui.out.print(t)
    shards = len(assign_shards(plan.tensors, max_shard_bytes))
    mode, value = r.expert_init_mode
    lines = [
        f"format        {plan.fmt.model_type} ({plan.fmt.architecture})",
        f"experts       {r.experts} routed of {width} neurons (1/{r.granularity} of {p.intermediate_size}), top-{r.top_k}, "
        f"{r.shared_experts} shared; virtual groups of {r.group_size}, {r.copies} copies",
        f"parameters    {human_count(plan.total_params)} total, {human_count(plan.active_params)} active per token "
        f"(parent {human_count(plan.parent_params)})",
        f"output        {human_bytes(plan.output_bytes)} in {shards} shard(s), {NAME_OF[plan.out_dtype]}" + (f" -> {out}" if out else ""),
        f"exact         {'yes' if exact_claim(plan) else 'no: ' + ('expert init ' + r.expert_init + ' perturbs experts on purpose' if mode != 'copy' else 'a non-power-of-two scale is rounded in ' + NAME_OF[plan.out_dtype])}",
    ]
    for note in portability_notes(plan.fmt, plan.parent, plan.recipe):
        lines.append(f"note          {note}")
    ui.out.print("\n".join(lines))


def convert(parent: str | Path, out: str | Path, *, experts: int = 8, top_k: int = 2, granularity: int = 1,
            shared_experts: int = 0, format: str = "auto", moe_layers: str = "all", router_init: str = "random",
            router_std: float = 0.02, expert_init: str = "copy", slice_order: str = "contiguous", seed: int = 0,
            dtype: str = "auto", max_shard_size: str = "5GB", overwrite: bool = False, dry_run: bool = False,
            verify: bool = True, allow_pickle: bool = False, command: list[str] | None = None,
            quiet: bool = False, full_check: str = "auto") -> ConvertResult:
    start = time.perf_counter()
    recipe = Recipe(experts=experts, top_k=top_k, granularity=granularity, shared_experts=shared_experts, format=format,
                    moe_layers=moe_layers, router_init=router_init, router_std=router_std, expert_init=expert_init,
                    slice_order=slice_order, seed=seed, dtype=dtype)
    try:
        max_shard_bytes = parse_size(max_shard_size)
    except ValueError as exc:
        raise UsageError(f"--max-shard-size: {exc}") from None
    if full_check not in FULL_CHECKS:
        raise UsageError(f"--full-check {full_check!r}: use {', '.join(FULL_CHECKS)}")
    out = Path(out).expanduser()
    if not dry_run:
        check_output(out, overwrite)
    mode, kmeans_file = recipe.router_init_mode
    if mode == "kmeans" and not kmeans_file.exists():
        raise InputError(f"--router-init kmeans: no such file or folder {kmeans_file}")
    if quiet:
        ckpt = open_parent(parent, allow_pickle=allow_pickle)
    else:
        with ui.console.status(f"reading {parent}" + (" (GGUF metadata is slow to parse)" if str(parent).endswith(".gguf") else "")):
            ckpt = open_parent(parent, allow_pickle=allow_pickle)
    try:
        plan, _ = build_plan(ckpt, recipe)
        estimate = memory.convert_estimate(plan, verify=verify)
        if dry_run:
            describe(plan, None, max_shard_bytes)
            ui.out.print(f"memory        about {human_bytes(estimate.total)} ({estimate.describe()})")
            return ConvertResult(None, plan, None, time.perf_counter() - start)
        check_space(out, plan.output_bytes + (64 << 20))
        have = memory.require(estimate)
        whole, whole_note = whole_model_decision(plan, verify, full_check, have)
        if mode == "kmeans":
            from upcycle.convert.router_init import kmeans_router_bases

            bases = kmeans_router_bases(ckpt.load_spec, kmeans_file, plan, quiet=quiet, allow_pickle=allow_pickle)
            plan, _ = build_plan(ckpt, recipe, bases)
        if command is None:
            command = ["upcycle", *sys.argv[1:]] if Path(sys.argv[0]).name in ("upcycle", "__main__.py") else None
        verification = None
        with atomic_folder(out, overwrite) as tmp:
            _write_weights(plan, tmp, max_shard_bytes, quiet)
            (tmp / "config.json").write_text(json.dumps(plan.config, indent=2, sort_keys=True) + "\n")
            if not quiet:
                ui.info("copying the tokenizer" + (" (converted from GGUF, slow)" if ckpt.gguf else ""))
            copied = ckpt.copy_tokenizer(tmp)
            if "generation_config.json" not in copied:
                gen = {k: v for k, v in plan.parent.token_ids.items() if v is not None}
                (tmp / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
            if verify:
                verification = _verify(ckpt, plan, tmp, whole, whole_note, allow_pickle, quiet)
            write_manifest(tmp, manifest_dict(plan, ckpt.label, command, verification))
            (tmp / "README.md").write_text(model_card(plan, ckpt.label, command, verification))
    finally:
        ckpt.close()
    seconds = time.perf_counter() - start
    if not quiet:
        _summary(plan, out, verification, seconds)
    return ConvertResult(out, plan, verification, seconds)


FULL_CHECKS = ("auto", "always", "never")
FULL_CHECK_AUTO_BUDGET = 1 << 30  # auto keeps the default convert light: the layer-wise check is the exact one


def whole_model_decision(plan: Plan, verify: bool, full_check: str, have: int) -> tuple[bool, str | None]:
    """Whether to also run the whole-model check through transformers, and the one line that says why not."""
    if not verify:
        return False, None
    if full_check == "never":
        return False, "whole-model check skipped (--full-check never)"
    est = memory.whole_model_estimate(plan)
    if full_check == "always":
        if est.total > have:
            _, where = memory.available()
            raise memory.InsufficientMemory(est.refusal(have, where))
        return True, None
    budget = min(have // 2, FULL_CHECK_AUTO_BUDGET)
    if est.total <= budget:
        return True, None
    return False, (f"whole-model check skipped: it needs about {human_bytes(est.total)} (parent and MoE in float32), "
                   f"over the {human_bytes(budget)} --full-check auto allows (the smaller of 1 GiB and half the "
                   f"available memory); --full-check always runs it")


def _verify(ckpt: ParentCheckpoint, plan: Plan, tmp: Path, whole: bool, whole_note: str | None, allow_pickle: bool,
            quiet: bool) -> dict:
    from upcycle.convert.verify import verify_layers, verify_whole_model

    exact = exact_claim(plan)
    if quiet:
        report = verify_layers(ckpt, plan, tmp, exact=exact)
    else:
        with ui.progress(transient=True) as prog:
            task = prog.add_task("verifying layer by layer (float64)", total=plan.parent.num_layers)
            report = verify_layers(ckpt, plan, tmp, exact=exact, on_layer=lambda i: prog.advance(task))
    report["whole_model"], report["whole_model_note"] = None, whole_note
    if whole:
        if not quiet:
            ui.info("whole-model check: parent and MoE through transformers (logits and greedy decoding)")
        w = verify_whole_model(ckpt.load_spec, tmp, out_dtype=NAME_OF[plan.out_dtype], exact=exact,
                               allow_pickle=allow_pickle)
        report["whole_model"] = w
        for key in ("max_abs_diff", "greedy_agree", "greedy_total", "samples"):  # the headline numbers, as before
            report[key] = w[key]
    return report


def _write_weights(plan: Plan, folder: Path, max_shard_bytes: int, quiet: bool) -> None:
    from rich.progress import DownloadColumn, TransferSpeedColumn

    with ui.progress(DownloadColumn(), TransferSpeedColumn(), transient=True) if not quiet else _Null() as prog:
        task = prog.add_task("writing experts", total=plan.output_bytes) if not quiet else None
        write_shards(folder, plan.tensors, max_shard_bytes,
                     on_tensor=(lambda t: prog.advance(task, t.nbytes)) if not quiet else None)


class _Null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _summary(plan: Plan, out: Path, verification: dict | None, seconds: float) -> None:
    r = plan.recipe
    msg = (f"[green]wrote[/] {out}: {plan.fmt.model_type}, {r.experts} experts top-{r.top_k}, "
           f"{human_count(plan.total_params)} params ({human_count(plan.active_params)} active), "
           f"{human_bytes(plan.output_bytes)} in {seconds:.1f}s")
    ui.console.print(msg)
    if verification is not None:
        from upcycle.convert.verify import summary

        verdict = "exact" if verification["exact_expected"] else "not exact by design"
        ui.console.print(f"verified ({verdict}): {summary(verification)}", soft_wrap=True)
    elif not exact_claim(plan):
        ui.warn("this recipe is not exact; run with --verify to measure how far it is from the parent")
