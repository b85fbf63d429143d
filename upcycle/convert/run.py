"""`upcycle convert`: a dense checkpoint in, a standard Hugging Face MoE checkpoint out.

Plan first (parent facts, format, every output tensor), then execute: stream tensors into shards inside a
temporary folder, add config, tokenizer, manifest and card, verify against the parent, and only then move
the folder into place. convert() shows progress only; the CLI prints the plan and the summary from the
returned ConvertResult (upcycle.cli.convert_report).
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass, field, fields
from pathlib import Path

from upcycle.convert import memory as convert_memory
from upcycle.core import memory
from upcycle.core.events import Events, events_or_silent
from upcycle.core.errors import InputError, UsageError
from upcycle.families.moe import choose_format
from upcycle.convert.card import manifest_dict, model_card
from upcycle.storage.manifest import write_manifest
from upcycle.convert.mix import ExpertSources, load_prompts, open_sources, source_entries
from upcycle.storage.parent import ParentCheckpoint, open_parent
from upcycle.convert.plan import Plan, make_plan
from upcycle.convert.recipe import Recipe
from upcycle.core.tensors import CODE_OF, NAME_OF, parse_size, human_bytes
from upcycle.convert.weights import ParentReader
from upcycle.convert.writer import atomic_folder, check_output, check_space, write_shards


@dataclass(frozen=True)
class ConvertOptions:
    """Everything `upcycle convert` is asked to do: the recipe (what the MoE is) and where and how to write it.

    An option is one field here or in Recipe, plus one typer option in upcycle/cli/convert.py.
    """

    out: Path
    recipe: Recipe = field(default_factory=Recipe)
    max_shard_size: str = "5GB"
    overwrite: bool = False
    dry_run: bool = False  # plan only: write nothing
    verify: bool = True  # check the folder against the parent (layer by layer, float64) before it is moved in place
    full_check: str = "auto"  # also the whole-model check through transformers: auto (when it fits), always, never
    require_exact: bool = False  # refuse a recipe that does not reproduce the parent
    allow_pickle: bool = False
    gguf_type: str = "auto"  # a .gguf OUT only (upcycle.convert.gguf_out): auto, f32, f16, bf16 or q8_0

    def __post_init__(self):
        object.__setattr__(self, "out", Path(self.out).expanduser())
        if not isinstance(self.recipe, Recipe):
            raise TypeError(f"ConvertOptions.recipe must be a Recipe, not {type(self.recipe).__name__}")
        self.max_shard_bytes  # noqa: B018 - parse now so a bad size fails before any work
        if self.full_check not in FULL_CHECKS:
            raise UsageError(f"--full-check {self.full_check!r}: use {', '.join(FULL_CHECKS)}")

    @property
    def max_shard_bytes(self) -> int:
        try:
            return parse_size(self.max_shard_size)
        except ValueError as exc:
            raise UsageError(f"--max-shard-size: {exc}") from None

    @classmethod
    def from_fields(cls, **values) -> "ConvertOptions":
        """Build from one flat set of keywords (the CLI's options, or a script's), each a field of ConvertOptions
        or of Recipe. Unknown names are a programming error (TypeError), as for any call."""
        recipe_names = {f.name for f in fields(Recipe)}
        own_names = {f.name for f in fields(cls)} - {"recipe"}
        unknown = sorted(set(values) - recipe_names - own_names)
        if unknown:
            raise TypeError(f"unknown convert option(s): {', '.join(unknown)}")
        recipe = Recipe(**{k: v for k, v in values.items() if k in recipe_names})
        return cls(recipe=recipe, **{k: v for k, v in values.items() if k in own_names})


@dataclass(frozen=True)
class ConvertResult:
    options: ConvertOptions
    plan: Plan
    verification: dict | None  # None: not verified (--no-verify or --dry-run)
    seconds: float
    estimate: "memory.Estimate | None" = None  # the memory estimate made before any work (shown by --dry-run)
    phases: dict = field(default_factory=dict)  # wall seconds of each step, in order (router init, write, verify, ...)
    beside: dict = field(default_factory=dict)  # wall seconds of work that ran on a thread beside those steps

    @property
    def out(self) -> Path | None:
        """The written folder; None after a dry run."""
        return None if self.options.dry_run else self.options.out


def exact_claim(plan: Plan) -> bool:
    """Exact by construction, and not undone by storing a non-power-of-two scale in 16 bits."""
    return plan.inexact_reason is None


def _exact_alternative(plan: Plan) -> str:
    recipe = plan.recipe
    if plan.sources is not None and plan.sources.inexact_reason:
        return "experts from other checkpoints never compute the parent's function: drop --expert-from"
    if recipe.partition:
        return (f"a partition runs part of the MLP by design; for an exact fine-grained MoE use --top-k "
                f"{recipe.experts} (every slice) or more copies (--experts {2 * recipe.experts} --top-k {recipe.experts})")
    if recipe.expert_init_mode[0] != "copy":
        return "use --expert-init copy"
    if recipe.routing != "renorm" and not recipe.zero_router:
        return f"use --router-std 0 (a zero router) with --routing {recipe.routing}, or --routing renorm"
    return "store it in float32 (--dtype float32), or pick a layout whose scale is a power of two"


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


def build_plan(ckpt: ParentCheckpoint, recipe: Recipe, router_bases: dict | None = None,
               sources: ExpertSources | None = None, grouping=None) -> tuple[Plan, ParentReader]:
    """sources: the opened --expert-from checkpoints (their experts; the shared tensors from BASE or the mean).
    grouping: the neurons' grouping (upcycle.convert.partition.Grouping) where the recipe computes one."""
    p = ckpt.spec
    if p.intermediate_size % recipe.granularity:
        raise UsageError(
            f"--granularity {recipe.granularity} does not divide the intermediate size {p.intermediate_size}; "
            f"divisors up to 16: {', '.join(str(g) for g in range(1, 17) if p.intermediate_size % g == 0)}"
        )
    moe_layers = recipe.parse_moe_layers(p.num_layers)
    fmt = choose_format(p, recipe, moe_layers, recipe.format)
    reader = ParentReader(sources.shared_source if sources is not None else ckpt.source, p)
    out_dtype = ckpt.source.float_dtype() if recipe.dtype == "auto" else CODE_OF[recipe.dtype]
    try:
        plan = make_plan(p, reader, recipe, fmt, moe_layers, out_dtype, router_bases, sources, grouping)
    except KeyError as exc:
        raise InputError(f"the parent checkpoint lacks tensor {exc.args[0]}") from None
    _check_parent_tensors(reader, plan)
    return plan, reader


def convert(parent: str | Path, options: ConvertOptions | str | Path, *, quiet: bool = False,
            events: Events | None = None, command: list[str] | None = None, **values) -> ConvertResult:
    """Convert PARENT as OPTIONS say; return what was planned, written and verified. Prints nothing: progress goes
    to `events` (none when quiet), and the caller shows the result.

    OPTIONS is a ConvertOptions, or (a convenience for scripts and tests) the output folder, with any field of
    ConvertOptions or Recipe as a keyword: convert(parent, "out", experts=4, verify=False).
    COMMAND is the command line recorded in the manifest and model card (default: this process's, when it is
    the upcycle CLI).
    """
    if not isinstance(options, ConvertOptions):
        options = ConvertOptions.from_fields(out=options, **values)
    elif values:
        raise TypeError(f"convert(): give the options as a ConvertOptions or as keywords, not both: {sorted(values)}")
    ev = events_or_silent(events, quiet)
    start = time.perf_counter()
    phases: dict[str, float] = {}
    mark = [start]

    def phase(name: str) -> None:
        now = time.perf_counter()
        phases[name] = phases.get(name, 0.0) + now - mark[0]
        mark[0] = now

    if options.out.suffix.lower() == ".gguf":
        raise UsageError(f"{options.out} is a .gguf file: write it with upcycle.convert.gguf_out.convert_gguf "
                         "(the CLI does this for a .gguf OUT)")
    if options.gguf_type != "auto":
        raise UsageError("--gguf-type applies to a .gguf OUT only")
    recipe, out, allow_pickle = options.recipe, options.out, options.allow_pickle
    dry_run, overwrite = options.dry_run, options.overwrite
    verify, full_check = options.verify, options.full_check
    if not dry_run:
        check_output(out, overwrite)
    mode, init_file = recipe.router_init_mode
    if mode in ("kmeans", "fit") and init_file is not None and not init_file.exists():
        raise InputError(f"--router-init {mode}: no such file or folder {init_file}")
    # the prompts file is read (texts only) before any model is opened: a missing source fails in a second
    prompts = load_prompts(init_file, recipe.expert_from) if mode == "prompts" else None
    with ev.status(f"reading {parent}" + (" (GGUF metadata is slow to parse)" if str(parent).endswith(".gguf") else "")):
        ckpt = open_parent(parent, allow_pickle=allow_pickle)
    sources = None
    try:
        if recipe.expert_from:
            sources = open_sources(ckpt, recipe.expert_from, average=recipe.average_shared, allow_pickle=allow_pickle)
        plan, _ = build_plan(ckpt, recipe, sources=sources)
        if options.require_exact and not exact_claim(plan):
            raise UsageError(f"--require-exact: this recipe is not exact ({plan.inexact_reason}); "
                             f"{_exact_alternative(plan)}")
        # verification's parent run reads the parent's own source only, with or without --expert-from (the other
        # checkpoints and the --average-shared mean are read in this thread): its thread safety is what counts
        overlap = verify and convert_memory.overlap_parent(plan, ckpt.source.thread_safe)
        # the k-means pass runs beside the writer (its router tensors are written last) where the source can be
        # read by two threads and the memory of both at once is there; else before writing
        beside = mode == "kmeans" and ckpt.source.thread_safe
        estimate = convert_memory.convert_estimate(plan, verify=verify, overlap=overlap, router_beside=beside)
        probed = memory.available() if beside else None  # one reading for this decision and the check below
        if beside and estimate.total > probed[0]:
            beside = False
            estimate = convert_memory.convert_estimate(plan, verify=verify, overlap=overlap)
        if dry_run:
            return ConvertResult(options, plan, None, time.perf_counter() - start, estimate)
        check_space(out, plan.output_bytes + (64 << 20))
        have = memory.require(estimate, probed)
        whole, whole_note = whole_model_decision(plan, verify, full_check, have)
        phase("plan")
        # one thread runs convert's torch work beside the writer, in order (the k-means pass, then verification's
        # parent layers), so that the imports of the two never race each other
        executor = background = grouping = None
        sample = None  # the k-means sample's identity, for upcycle.json
        if recipe.grouping:
            # which neurons each expert holds decides every expert tensor, so this comes before anything is written
            from upcycle.convert.partition import grouping_job

            grouping = grouping_job(ckpt, plan, events=ev)()
            plan, _ = build_plan(ckpt, recipe, grouping.router_bases() or None, sources, grouping)
            phase("grouping")
        if beside or overlap:
            from concurrent.futures import ThreadPoolExecutor

            executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="upcycle-torch")
        try:
            if mode == "kmeans":
                from upcycle.convert.router_init import BackgroundBases, kmeans_job

                stop = [False]
                job = kmeans_job(ckpt, init_file, plan, events=ev, stop=lambda: stop[0])
                sample = getattr(job, "sample", None)  # the identity of the text the job clusters
                if beside:
                    background = BackgroundBases(executor.submit(job), stop)
                    plan, _ = build_plan(ckpt, recipe, background, sources, grouping)
                else:
                    plan, _ = build_plan(ckpt, recipe, job(), sources, grouping)
                    phase("router init")
            elif mode == "prompts":
                from upcycle.convert.router_init import prompt_router_bases

                bases = prompt_router_bases(ckpt, sources.shared_source, prompts, plan, events=ev)
                plan, _ = build_plan(ckpt, recipe, bases, sources, grouping)
                phase("router init")
            verification = _write_and_verify(ckpt, plan, out, options, command, ev, whole, whole_note, phase,
                                             executor if overlap else None, background, sample)
        finally:
            if background is not None:
                background.close()
            if executor is not None:
                executor.shutdown(wait=True)
    finally:
        if sources is not None:
            sources.close()
        ckpt.close()
    beside_s = {"router init": background.seconds} if background is not None and background.seconds else {}
    return ConvertResult(options, plan, verification, time.perf_counter() - start, phases=phases, beside=beside_s)


def _write_and_verify(ckpt: ParentCheckpoint, plan: Plan, out: Path, options: ConvertOptions, command, ev: Events,
                      whole: bool, whole_note: str | None, phase, executor, background,
                      sample: dict | None = None) -> dict | None:
    """Write the folder (atomically), verify it, add the manifest and card; return the verification report."""
    if command is None:
        command = ["upcycle", *sys.argv[1:]] if Path(sys.argv[0]).name in ("upcycle", "__main__.py") else None
    verification = None
    with atomic_folder(out, options.overwrite) as tmp:
        (tmp / "config.json").write_text(json.dumps(plan.config, indent=2, sort_keys=True) + "\n")
        ev.info("copying the tokenizer" + (" (converted from GGUF, slow)" if ckpt.gguf else ""))
        copied = ckpt.copy_tokenizer(tmp)
        if "generation_config.json" not in copied:
            gen = {k: v for k, v in plan.parent.token_ids.items() if v is not None}
            (tmp / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
        parent_states = None
        if executor is not None:
            from upcycle.convert.parent_pass import ParentStates

            # the parent's float64 layers (and the imports they need) run while the shards are written
            parent_states = ParentStates(ckpt, plan, tmp, background=True, executor=executor)
        try:
            phase("tokenizer")

            def routers_ready() -> None:  # the writer has written everything but the routers
                phase("write")
                background.result()
                phase("router init wait")

            _write_weights(plan, tmp, options.max_shard_bytes, ev,
                           routers_ready=routers_ready if background is not None else None)
            phase("write")
            if options.verify:
                verification = _verify(ckpt, plan, tmp, whole, whole_note, options.allow_pickle, ev, parent_states)
                phase("verify")
        finally:
            if parent_states is not None:
                parent_states.close()
        from upcycle.storage.manifest import folder_digest, tensor_digest

        fingerprints = {"parent": tensor_digest(ckpt.source), "weights": folder_digest(tmp)}
        if plan.sources is not None:
            fingerprints["sources"] = source_entries(plan.sources, tensor_digest)
        if sample is not None:
            fingerprints["router_init_sample"] = sample
        write_manifest(tmp, manifest_dict(plan, ckpt.label, command, verification, fingerprints))
        (tmp / "README.md").write_text(model_card(plan, ckpt.label, command, verification, fingerprints))
        phase("manifest")
    return verification



FULL_CHECKS = ("auto", "always", "never")
FULL_CHECK_AUTO_BUDGET = 1 << 30  # auto keeps the default convert light: the layer-wise check is the exact one


def whole_model_decision(plan: Plan, verify: bool, full_check: str, have: int) -> tuple[bool, str | None]:
    """Whether to also run the whole-model check through transformers, and the one line that says why not."""
    if not verify:
        return False, None
    if full_check == "never":
        return False, "whole-model check skipped (--full-check never)"
    est = convert_memory.whole_model_estimate(plan)
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
            ev: Events, parent_states=None) -> dict:
    from upcycle.convert.verify import verify_layers, verify_whole_model

    exact = exact_claim(plan)
    with ev.task("verifying layer by layer (float64)", plan.parent.num_layers) as task:
        report = verify_layers(ckpt, plan, tmp, exact=exact, on_layer=lambda i: task.advance(), parent=parent_states)
    report["whole_model"], report["whole_model_note"] = None, whole_note
    if whole:
        ev.info("whole-model check: parent and MoE through transformers (logits and greedy decoding)")
        w = verify_whole_model(ckpt.load_spec, tmp, out_dtype=NAME_OF[plan.out_dtype], exact=exact,
                               allow_pickle=allow_pickle)
        report["whole_model"] = w
        for key in ("max_abs_diff", "greedy_agree", "greedy_total", "samples"):  # the headline numbers, as before
            report[key] = w[key]
    return report


def _write_weights(plan: Plan, folder: Path, max_shard_bytes: int, ev: Events, routers_ready=None) -> None:
    """routers_ready: given when the router rows are computed beside the writer; the router tensors are then
    written last, after routers_ready() has waited for them."""
    with ev.task("writing experts", plan.output_bytes, unit="bytes") as task:

        def waiting() -> None:
            task.update(description="waiting for the k-means router")
            routers_ready()

        write_shards(folder, plan.tensors, max_shard_bytes, on_tensor=lambda t: task.advance(t.nbytes),
                     defer=(lambda t: t.kind == "router") if routers_ready is not None else None,
                     before_deferred=waiting if routers_ready is not None else None)


