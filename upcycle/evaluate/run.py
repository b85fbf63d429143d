"""evaluate(): the whole `upcycle eval` run, as a plain function the CLI calls.

Order: validate every input first (so a typo fails in a second, not after scoring), tokenize the held-out
blocks once, score the parent and keep only its MLP weights (for expert drift), free it, then score the model
while recording its routing, and write the report folder. Only one model is in memory at a time.
"""

from __future__ import annotations

import functools
import gc
from dataclasses import dataclass
from pathlib import Path

from upcycle.core.events import Events, events_or_silent
from upcycle.core.errors import InputError, UsageError
from upcycle.core.layers import parse_layers
from upcycle.core.paths import check_output_folder
from upcycle.evaluate.report import EXPERTS, REPORT, EqualCost, Report, Side

# Below this largest per-block loss difference two models count as the same model: fp32 reordering noise on an
# exact conversion is ~1e-6; 16-bit rounding of the experts' separate matmuls is ~1e-3.
SAME_TOLERANCE = {"float32": 1e-4, "bfloat16": 2e-2, "float16": 1e-2}


@dataclass(frozen=True)
class EvalOptions:
    """Everything `upcycle eval` is asked to do, checked on construction (what needs no file or model).

    An option is one field here plus one typer option in upcycle/cli/eval.py. Lists given as lists are stored
    as tuples; `tasks` also takes the CLI's comma-separated string.
    """

    data: tuple[str, ...]  # text to score: files, folders, globs
    parent: str | None = None  # dense parent to compare with, on the same tokens
    out: Path | None = None  # report folder; None: ./eval-<model name>
    domain: tuple[str, ...] = ()  # domain text: rank experts by how much more the domain uses them
    run: Path | None = None  # training run folder whose curves join the report
    split: str = "heldout"
    seq_len: int = 512
    max_blocks: int = 64
    # the held-out split: None takes the evaluated run's own (run.json), else seed 0 and fraction 0.01 (upcycle
    # train's defaults); a value that differs from the run's is refused, as it would score training documents
    seed: int | None = None
    heldout_fraction: float | None = None
    text_field: str | None = None
    batch_size: int = 4
    dtype: str = "float32"
    device: str = "auto"
    layers: str = "auto"  # specialisation: which MoE layers get per-expert token profiles
    top_tokens: int = 10
    contexts: int = 3
    min_count: int = 3
    domain_top: int | None = None  # experts selected per layer for --domain; None: the layer's top-k
    plots: bool = True
    overwrite: bool = False
    allow_pickle: bool = False
    tasks: tuple[str, ...] = ()
    tasks_limit: int | None = None
    baseline: str | None = None  # the dense baseline trained the same way: a run of `upcycle train PARENT`, or a model
    # an MoE that runs less than its parent per token (a partition): also score the parent pruned to the same cost
    equal_cost: bool = True

    def __post_init__(self):
        set_ = functools.partial(object.__setattr__, self)
        set_("data", _strings(self.data))
        set_("domain", _strings(self.domain))
        tasks = self.tasks.split(",") if isinstance(self.tasks, str) else self.tasks or ()
        set_("tasks", tuple(t.strip() for t in tasks if t.strip()))
        if self.parent is not None:
            set_("parent", str(self.parent))
        if self.out is not None:
            set_("out", Path(self.out).expanduser())
        if self.run is not None:
            set_("run", Path(self.run).expanduser())
        if not self.data:
            raise UsageError("give the text to score with --data (files, folders or globs)")
        if self.split not in ("heldout", "all"):
            raise UsageError(f"--split {self.split!r}: use heldout or all")
        for name, v in (("--seq-len", self.seq_len), ("--max-blocks", self.max_blocks),
                        ("--batch-size", self.batch_size)):
            if v < (2 if name == "--seq-len" else 1):
                raise UsageError(f"{name} must be at least {2 if name == '--seq-len' else 1}")
        if self.dtype not in SAME_TOLERANCE:
            raise UsageError(f"unknown --dtype {self.dtype!r}; choose one of {', '.join(SAME_TOLERANCE)}")
        if self.heldout_fraction is not None and not 0.0 <= self.heldout_fraction < 1.0:
            raise UsageError(f"--heldout-fraction {self.heldout_fraction:g} must be in [0, 1)")
        for name, v, lo in (("--top-tokens", self.top_tokens, 1), ("--contexts", self.contexts, 0),
                            ("--domain-top", self.domain_top, 1), ("--tasks-limit", self.tasks_limit, 1)):
            if v is not None and v < lo:
                raise UsageError(f"{name} must be at least {lo}")


def _strings(values) -> tuple[str, ...]:
    if values is None:
        return ()
    if isinstance(values, (str, Path)):
        return (str(values),)
    return tuple(str(v) for v in values)


def check_out(out: Path, overwrite: bool) -> None:
    """The report is added to the folder: only an earlier report is in the way."""
    check_output_folder(out, option="--out", overwrite=overwrite,
                        conflicts=lambda d: [REPORT] if (d / REPORT).exists() else [],
                        fix="pass --overwrite to replace the report, or choose another --out")


def same_tokenizer(a, b, names: tuple[str, str]) -> None:
    """Both models must read the held-out ids the same way, or comparing their losses means nothing."""
    va, vb = a.get_vocab(), b.get_vocab()
    if va != vb:
        only = len(set(va) ^ set(vb))
        detail = (f"vocabularies of {len(va)} and {len(vb)} tokens, {only} not shared" if only
                  else "the same tokens with different ids")
        raise InputError(f"{names[0]} and {names[1]} have different tokenizers ({detail}): losses would not be "
                         "comparable; pass the parent this model was converted from")
    probe = "Sparse upcycling: def f(x):\n    return x ** 2  # ünïcode 123"
    if a(probe)["input_ids"] != b(probe)["input_ids"]:
        raise InputError(f"{names[0]} and {names[1]} share a vocabulary but tokenize text differently "
                         "(different merges or normalisation): losses would not be comparable")


def heldout_split(opt: EvalOptions, run: Path | None) -> tuple[int, float, str | None, str]:
    """(seed, held-out fraction, text field, where they came from) of the split to score: the evaluated run's
    (run.json), so that --split heldout never scores the run's training documents. An explicit value that differs
    from the run's is refused with the reason."""
    from upcycle.evaluate.provenance import split_settings

    rec = split_settings(run)
    if rec is None:
        return (0 if opt.seed is None else opt.seed, 0.01 if opt.heldout_fraction is None else opt.heldout_fraction,
                opt.text_field, "options" if opt.seed is not None or opt.heldout_fraction is not None else "defaults")
    if opt.split == "heldout":
        for flag, given, used in (("--seed", opt.seed, rec["seed"]),
                                  ("--heldout-fraction", opt.heldout_fraction, rec["heldout_fraction"])):
            if given is not None and given != used:
                raise UsageError(f"{flag} {given:g}: the run {run} held out its documents with {flag} {used:g}; "
                                 f"another split would score some of its training documents as held out (leave "
                                 f"{flag} out to use the run's)")
        if opt.text_field is not None and (opt.text_field or "text") != (rec["text_field"] or "text"):
            raise UsageError(f"--text-field {opt.text_field}: the run {run} read --text-field "
                             f"{rec['text_field'] or 'text'}; its held-out documents are those of that field")
    seed = rec["seed"] if opt.seed is None else opt.seed
    fraction = rec["heldout_fraction"] if opt.heldout_fraction is None else opt.heldout_fraction
    return seed, fraction, opt.text_field or rec["text_field"], f"{run / 'run.json'}"


def _device(name: str):
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise UsageError(f"--device {name!r}: use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA device is available")
    return dev


def _release_memory() -> None:
    """After the caller dropped its last reference to a model: give its memory back before the next one loads."""
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _model_type(model) -> str:
    return str(getattr(model.config, "model_type", type(model).__name__))


@dataclass
class _Inputs:
    """Everything `evaluate` checks and prepares before any model is loaded."""

    model_spec: str
    out_dir: Path
    runlog: object  # upcycle.evaluate.runlog.RunLog | None
    run_dir: Path | None
    tok: object
    ptok: object
    manifest: object  # upcycle.storage.manifest.Manifest | None
    baseline: object  # upcycle.evaluate.provenance.Baseline | None
    prov: object  # upcycle.evaluate.provenance.Provenance
    notes: list[str]
    blocks: object  # [n, seq_len] token ids
    block_docs: list
    domain_blocks: object
    domain_docs: list | None
    data_info: dict
    device: object


@dataclass
class _ModelSide:
    side: Side
    routing: list
    drift: list
    drift_note: str | None
    specialisation: list
    domain_layers: list | None
    has_moe: bool


def evaluate(model: str | Path, options: EvalOptions, *, quiet: bool = False, events: Events | None = None) -> Report:
    """Score MODEL (and the dense parent, if OPTIONS name one) on the same held-out blocks; report routing
    diagnostics for an MoE. Writes the report folder and returns the Report; the caller prints it. Progress and
    warnings go to `events` (none when quiet)."""
    ev = events_or_silent(events, quiet)
    opt = options
    inp = _prepare(model, opt, ev)
    from upcycle.evaluate.equal_cost import equal_cost_plan

    # an MoE cheaper per token than its parent: the dense reference of the same cost is built from the parent
    plan = equal_cost_plan(inp.manifest) if opt.parent is not None else None
    if inp.device.type == "cpu":  # on an accelerator the weights live in device memory
        from upcycle.core import memory
        from upcycle.evaluate.memory import eval_estimate

        memory.require(eval_estimate(inp.model_spec, str(opt.parent) if opt.parent is not None else None,
                                     dtype=opt.dtype, batch_tokens=opt.batch_size * opt.seq_len,
                                     allow_pickle=opt.allow_pickle,
                                     equal_cost_share=plan.mlp_share if plan and opt.equal_cost else None))
    tasks: dict = {}
    parent_side, parent_mlp, equal = _score_parent(inp, opt, ev, tasks, plan)
    baseline_side = _score_baseline(inp, opt, ev)
    # the converted checkpoint the MoE run started from: routing now is measured against routing then
    change, start_choices = _start_routing(inp.manifest, inp.prov, inp.run_dir, inp.blocks, opt, inp.device, ev)
    m = _score_model(inp, opt, ev, parent_mlp, change, start_choices, tasks)
    return _report(inp, opt, ev, m, parent_side, baseline_side, change, tasks, equal)


def _prepare(model: str | Path, opt: EvalOptions, ev: Events) -> _Inputs:
    """Every input checked, the provenance read and the held-out blocks tokenized, before any model is loaded (so
    a typo fails in a second, not after scoring)."""
    from upcycle.core.data import resolve_data_files, spread_blocks
    from upcycle.core.loading import load_tokenizer
    from upcycle.evaluate import collect
    from upcycle.evaluate.provenance import Provenance, check_parent, compare_runs, resolve_baseline, \
        resolve_model, run_of, trained_tokens, weights_digest
    from upcycle.evaluate.runlog import read_run
    from upcycle.storage.manifest import read_manifest

    parent, run = opt.parent, opt.run
    device = _device(opt.device)
    model_spec, model_run = resolve_model(model)  # a run folder: its final/
    if run is None:
        run = model_run
    out_dir = Path(opt.out).expanduser() if opt.out is not None else Path(f"eval-{Path(model_spec).name or 'model'}")
    check_out(out_dir, opt.overwrite)
    if opt.tasks:
        collect.check_lm_eval()

    files = resolve_data_files(opt.data)
    domain_files = resolve_data_files(opt.domain) if opt.domain else None
    if run is None:
        run = run_of(model_spec)  # a run folder holding the final checkpoint, or RUN/final, RUN/checkpoint-N
    runlog = read_run(run) if run is not None else None
    run_dir = runlog.path.parent if runlog else None
    seed, heldout_fraction, text_field, split_source = heldout_split(opt, run_dir)
    tok = load_tokenizer(model_spec)
    manifest = read_manifest(model_spec) if Path(model_spec).is_dir() else None
    notes: list[str] = []
    ptok = None
    if parent is not None:
        ptok = load_tokenizer(str(parent))
        same_tokenizer(tok, ptok, ("MODEL", "--parent"))
    elif manifest is not None:
        notes.append(f"made by upcycle convert from {manifest.parent}; pass --parent {manifest.parent} to compare "
                     "with it and to measure expert drift from the parent MLP")
    baseline = None
    if opt.baseline is not None:
        baseline = resolve_baseline(opt.baseline)
        same_tokenizer(tok, load_tokenizer(str(baseline.model)), ("MODEL", "--baseline"))

    # where the models came from: decides which verdicts may be spoken (upcycle.evaluate.provenance)
    prov = Provenance(model_tokens=trained_tokens(model_spec, runlog))
    if manifest is not None:
        prov.recorded_parent = manifest.parent
        if parent is not None:
            check_parent(prov, manifest, parent, opt.allow_pickle)
            if prov.parent_match is None:
                notes.append(f"could not confirm that --parent {parent} is the recorded parent {manifest.parent} "
                             "(upcycle.json holds no parent digest and the paths differ)")
        if manifest.weights_digest:
            digest = weights_digest(model_spec)
            prov.untrained = None if digest is None else digest == manifest.weights_digest
        elif runlog is None:
            notes.append("upcycle.json records no weights digest (converted by an older upcycle) and no training "
                         "run was given (--run): whether the model was trained since conversion is unknown")
    if baseline is not None:
        prov.baseline_tokens = baseline.tokens
        compare_runs(prov, manifest, run_dir, baseline.run, allow_pickle=opt.allow_pickle)
    prov.split_source = split_source

    # spread over documents: the paired interval is over documents (upcycle.evaluate.stats)
    blocks, block_docs = spread_blocks(tok, files, seq_len=opt.seq_len, max_blocks=opt.max_blocks, split=opt.split,
                                       heldout_fraction=heldout_fraction, seed=seed, text_field=text_field)
    if blocks.shape[0] == 0:
        if opt.split == "heldout":
            raise InputError(f"the held-out share ({heldout_fraction:g}) of --data holds no complete block of "
                             f"{opt.seq_len} tokens; pass --split all for files kept apart for evaluation")
        raise InputError(f"--data holds no complete block of {opt.seq_len} tokens; give more text or a smaller --seq-len")
    domain_blocks = domain_docs = None
    if domain_files:
        domain_blocks, domain_docs = spread_blocks(tok, domain_files, seq_len=opt.seq_len, max_blocks=opt.max_blocks,
                                                   split="all", seed=seed, text_field=text_field)
        if domain_blocks.shape[0] == 0:
            raise InputError("--domain gave no complete block of --seq-len tokens")
    data_info = {"files": [str(f) for f in files], "split": opt.split, "heldout_fraction": heldout_fraction,
                 "seed": seed, "split_from": split_source, "seq_len": opt.seq_len, "blocks": int(blocks.shape[0]),
                 "documents": len(set(block_docs)),
                 "tokens_scored": int(blocks.shape[0] * (opt.seq_len - 1)), "text_field": text_field,
                 "domain_files": [str(f) for f in domain_files] if domain_files else None,
                 "domain_blocks": int(domain_blocks.shape[0]) if domain_blocks is not None else None}
    if blocks.shape[0] < opt.max_blocks:
        ev.warn(f"only {blocks.shape[0]} blocks of {opt.seq_len} tokens in the data (asked for up to "
                f"{opt.max_blocks}): intervals will be wide")
    return _Inputs(model_spec, out_dir, runlog, run_dir, tok, ptok, manifest, baseline, prov, notes, blocks,
                   block_docs, domain_blocks, domain_docs, data_info, device)


def _score_parent(inp: _Inputs, opt: EvalOptions, ev: Events, tasks: dict, plan=None):
    """(the parent's Side, its MLP weights for drift or None, the EqualCost of a cheaper MoE or None); the parent
    is freed before the next model loads."""
    from upcycle.core.loading import load_causal_lm
    from upcycle.evaluate import collect
    from upcycle.evaluate.cost import model_cost
    from upcycle.evaluate.drift import parent_mlps
    from upcycle.evaluate.lm import score

    parent = opt.parent
    if parent is None:
        return None, None, None
    ev.info(f"loading the parent {parent}")
    pm = load_causal_lm(str(parent), dtype=opt.dtype, allow_pickle=opt.allow_pickle, device=str(inp.device))
    pscores = score(pm, inp.blocks, batch_size=opt.batch_size, events=ev, description="scoring the parent")
    pdomain = (score(pm, inp.domain_blocks, batch_size=opt.batch_size, events=ev,
                     description="parent on --domain") if inp.domain_blocks is not None else None)
    pmoe = collect.moe_info(pm)
    side = Side(str(parent), _model_type(pm), bool(pmoe), pscores,
                model_cost(pm, [g.group for g in pmoe], opt.seq_len), pdomain)
    parent_mlp = None
    if pmoe:
        inp.notes.append("the --parent is itself an MoE: drift is measured against the mean expert")
    elif inp.prov.parent_match is False:
        inp.notes.append("--parent is not the recorded parent: drift is measured against the mean expert")
    else:
        parent_mlp = parent_mlps(pm)
    if opt.tasks:
        tasks["parent"] = collect.run_tasks(pm, inp.ptok, list(opt.tasks), opt.tasks_limit, opt.batch_size)
    equal = _equal_cost(pm, inp, opt, ev, plan, bool(pmoe)) if plan is not None else None  # prunes pm: last
    del pm
    _release_memory()
    return side, parent_mlp, equal


def _equal_cost(pm, inp: _Inputs, opt: EvalOptions, ev: Events, plan, parent_moe: bool) -> EqualCost:
    """The parent cut to the MoE's active MLP width (upcycle.evaluate.equal_cost) and scored on the held-out
    blocks, or the reason it was not built. Prunes `pm` in place: call it when nothing else needs the parent."""
    from upcycle.core.errors import UnsupportedError
    from upcycle.evaluate import equal_cost as eqc
    from upcycle.evaluate.cost import model_cost
    from upcycle.evaluate.lm import score

    out = EqualCost(plan.mlp_share)
    if not opt.equal_cost:
        out.skipped = "not built (--no-equal-cost)"
    elif parent_moe:
        out.skipped = "the --parent is itself an MoE, so pruning it gives no dense reference"
    elif inp.prov.parent_match is False:
        out.skipped = "--parent is not the model this MoE was converted from, so pruning it gives no reference of its cost"
    if out.skipped:
        return out
    try:
        keep = eqc.widths(pm, plan)
    except UnsupportedError as exc:
        out.skipped = str(exc)
        return out
    ids = eqc.sample_ids(inp.ptok, getattr(pm.config, "max_position_embeddings", None))
    out.sample = eqc.describe_sample(ids)
    both = eqc.sample_files_in(inp.data_info["files"])
    if both:
        inp.notes.append(f"the equal-cost reference ranked the parent's neurons on text that --data also holds "
                         f"({', '.join(both)}): scored blocks from those files are not unseen by the ranking")
    ev.info(f"equal-cost reference: ranking the parent's neurons on {out.sample}")
    use = eqc.sample_use(pm, ids, keep, batch_size=opt.batch_size)
    eqc.prune_mlps(pm, eqc.chosen_neurons(use, keep))
    out.widths = keep
    scores = score(pm, inp.blocks, batch_size=opt.batch_size, events=ev, description="scoring the pruned parent")
    out.reference = Side(f"{opt.parent} pruned to {plan.mlp_share:.3g} of each MoE layer's MLP", _model_type(pm),
                         False, scores, model_cost(pm, [], opt.seq_len))
    return out


def _score_baseline(inp: _Inputs, opt: EvalOptions, ev: Events) -> Side | None:
    from upcycle.core.loading import load_causal_lm
    from upcycle.evaluate import collect
    from upcycle.evaluate.cost import model_cost
    from upcycle.evaluate.lm import score

    baseline = inp.baseline
    if baseline is None:
        return None
    ev.info(f"loading the baseline {baseline.model}")
    bm = load_causal_lm(str(baseline.model), dtype=opt.dtype, allow_pickle=opt.allow_pickle, device=str(inp.device))
    bscores = score(bm, inp.blocks, batch_size=opt.batch_size, events=ev, description="scoring the baseline")
    bmoe = collect.moe_info(bm)
    side = Side(str(baseline.model), _model_type(bm), bool(bmoe), bscores,
                model_cost(bm, [g.group for g in bmoe], opt.seq_len))
    del bm
    _release_memory()
    return side


def _score_model(inp: _Inputs, opt: EvalOptions, ev: Events, parent_mlp, change, start_choices,
                 tasks: dict) -> _ModelSide:
    """The model scored while its routing is recorded: load, entropy, drift, what each expert receives, --domain."""
    from upcycle.core.loading import load_causal_lm
    from upcycle.evaluate import collect
    from upcycle.evaluate.cost import model_cost
    from upcycle.evaluate.drift import layer_drift
    from upcycle.evaluate.lm import score

    tok, blocks, manifest = inp.tok, inp.blocks, inp.manifest
    ev.info(f"loading the model {inp.model_spec}")
    mm = load_causal_lm(inp.model_spec, dtype=opt.dtype, allow_pickle=opt.allow_pickle, device=str(inp.device))
    moe = collect.moe_info(mm)
    # auto: the first, middle and last MoE layer
    spec_layers = parse_layers(opt.layers, mm.config.num_hidden_layers, option="--layers",
                               words=("auto", "all", "none", "every:N"), candidates=[m.index for m in moe]
                               ) if moe else []
    collector = collect.RoutingCollector(mm, moe, spec_layers, vocab_size=max(len(tok), int(blocks.max()) + 1),
                                         contexts=opt.contexts, seq_len=opt.seq_len,
                                         keep_choices=start_choices is not None)
    with collector:
        mscores = score(mm, blocks, batch_size=opt.batch_size, events=ev, description="scoring the model",
                        on_batch=collector.on_batch)
    routing = collector.routing()
    drift, drift_note = [], None
    for m in moe:
        d, why = layer_drift(m.weights(), parent_mlp, manifest)
        drift.append(d)
        drift_note = drift_note or why
    if change is not None and moe:
        _finish_change(change, start_choices, collector, routing, drift, manifest)
    specialisation = [collector.tokens[i].profiles(
        next(r.load for r in routing if r.layer == i), next(m.top_k for m in moe if m.index == i),
        lambda ids: tok.decode(ids), blocks, top_tokens=opt.top_tokens, min_count=opt.min_count)
        for i in spec_layers]
    mdomain, domain_layers = None, None
    if inp.domain_blocks is not None:
        dcol = collect.RoutingCollector(mm, moe, [], vocab_size=1, contexts=0, seq_len=opt.seq_len)
        with dcol:
            mdomain = score(mm, inp.domain_blocks, batch_size=opt.batch_size, events=ev,
                            description="model on --domain", on_batch=dcol.on_batch)
        if moe:
            from upcycle.evaluate.specialise import domain_ranking

            droute = {r.layer: r for r in dcol.routing()}
            domain_layers = [domain_ranking(r.layer, r.load, droute[r.layer].load,
                                            opt.domain_top or r.top_k) for r in routing]
        else:
            inp.notes.append("--domain ranks experts; the model is dense, so only its domain loss is reported")
    side = Side(inp.model_spec, _model_type(mm), bool(moe), mscores,
                model_cost(mm, [m.group for m in moe], opt.seq_len), mdomain)
    if opt.tasks:
        tasks["model"] = collect.run_tasks(mm, tok, list(opt.tasks), opt.tasks_limit, opt.batch_size)
    del mm
    _release_memory()
    return _ModelSide(side, routing, drift, drift_note, specialisation, domain_layers, bool(moe))


def _report(inp: _Inputs, opt: EvalOptions, ev: Events, m: _ModelSide, parent_side: Side | None,
            baseline_side: Side | None, change, tasks: dict, equal: EqualCost | None = None) -> Report:
    """The paired comparisons over documents, the Report, and the report folder written."""
    from upcycle.evaluate.stats import paired_comparison

    tol = SAME_TOLERANCE[opt.dtype]
    mscores, mdomain = m.side.scores, m.side.domain_scores
    block_docs, domain_docs = inp.block_docs, inp.domain_docs
    for side_scores, docs in ((mscores, block_docs), (mdomain, domain_docs)):
        if side_scores is not None:
            side_scores.documents = docs
    for side in (parent_side, baseline_side):
        if side is not None:
            side.scores.documents = block_docs
            if side.domain_scores is not None:
                side.domain_scores.documents = domain_docs
    comparison = (paired_comparison(mscores.block_loss, parent_side.scores.block_loss, tol, block_docs)
                  if parent_side is not None else None)
    if equal is not None and equal.reference is not None:
        equal.reference.scores.documents = block_docs
        equal.comparison = paired_comparison(mscores.block_loss, equal.reference.scores.block_loss, tol, block_docs)
    domain_comparison = (paired_comparison(mdomain.block_loss, parent_side.domain_scores.block_loss, tol, domain_docs)
                         if parent_side is not None and mdomain is not None else None)
    manifest = inp.manifest
    if manifest is not None and manifest.recipe.get("expert_init", "copy") != "copy" and m.drift and \
            m.drift[0].reference == "parent":
        inp.notes.append(f"expert init {manifest.recipe['expert_init']} perturbed the experts at conversion: "
                         "their cosine to the parent starts below 1")
    report = Report(model=m.side, parent=parent_side, comparison=comparison, data=inp.data_info, routing=m.routing,
                    drift=m.drift, drift_note=m.drift_note, specialisation=m.specialisation, domain=m.domain_layers,
                    domain_comparison=domain_comparison, training=inp.runlog.summary() if inp.runlog else None,
                    tasks=tasks or None, notes=inp.notes, out=inp.out_dir, baseline=baseline_side,
                    baseline_comparison=(paired_comparison(mscores.block_loss, baseline_side.scores.block_loss, tol,
                                                           block_docs) if baseline_side is not None else None),
                    provenance=inp.prov, routing_change=change if m.has_moe else None, equal_cost=equal)
    write_report_folder(report, inp.out_dir, inp.runlog, with_plots=opt.plots, events=ev)
    return report


def _start_routing(manifest, prov, run_dir, blocks, opt: EvalOptions, device, ev: Events):
    """(RoutingChange with the start's routing, the start's expert choices) for a trained MoE made by upcycle
    convert; (RoutingChange saying why not, None) when its start cannot be used; (None, None) when there is
    nothing to measure (not an upcycled MoE, or untrained)."""
    from upcycle.evaluate import collect
    from upcycle.evaluate.fairness import read_run_record
    from upcycle.evaluate.learned import RoutingChange, lm_share, mean_entropy, router_trained, start_checkpoint
    from upcycle.evaluate.lm import score
    from upcycle.evaluate.runlog import read_run
    from upcycle.core.loading import load_causal_lm

    if manifest is None or prov.untrained:
        return None, None
    record = read_run_record(run_dir)
    start, why = start_checkpoint(record, manifest)
    change = RoutingChange(str(start) if start else None, why, router_trained=router_trained(record))
    if run_dir is not None:
        change.lm_share, change.lm_share_steps = lm_share(read_run(run_dir).rows)
    if start is None:
        return change, None
    sm = load_causal_lm(str(start), dtype=opt.dtype, allow_pickle=opt.allow_pickle, device=str(device))
    moe = collect.moe_info(sm)
    col = collect.RoutingCollector(sm, moe, [], vocab_size=1, contexts=0, seq_len=opt.seq_len, keep_choices=True)
    with col:
        score(sm, blocks, batch_size=opt.batch_size, events=ev, description="routing at the start",
              on_batch=col.on_batch)
    change.entropy_start = mean_entropy(col.routing())
    del sm
    _release_memory()
    return change, col.choices


def _finish_change(change, start_choices, collector, routing, drift, manifest) -> None:
    from upcycle.evaluate.learned import mean_entropy, topk_changed

    change.entropy_end = mean_entropy(routing)
    if start_choices is not None:
        by_layer = topk_changed(start_choices, collector.choices)
        change.topk_changed_by_layer = by_layer
        # every layer routes the same tokens: the mean over layers is the share over (token, layer) pairs
        change.topk_changed = sum(by_layer.values()) / len(by_layer) if by_layer else None
    # exact copies of the parent's MLP (with --parent): the drift reference is the experts' start itself
    if drift and drift[0].reference == "parent" and manifest.recipe.get("expert_init", "copy") == "copy":
        cos = [c for d in drift for c in d.cos]
        change.expert_drift = sum(1 - c for c in cos) / len(cos)


def write_report_folder(report: Report, out: Path, runlog=None, *, with_plots: bool = True,
                        events: Events | None = None) -> None:
    import json

    out.mkdir(parents=True, exist_ok=True)
    if report.domain is not None:
        from upcycle.evaluate.specialise import experts_file

        chosen = experts_file(report.domain)
        path = out / EXPERTS
        if chosen:
            path.write_text(json.dumps(chosen, indent=1) + "\n")
            report.experts_file = str(path)
        elif path.exists():
            path.unlink()  # a stale file from an earlier run must not be mistaken for this one's
    if with_plots:
        report.plots = _plots(report, out, runlog, events_or_silent(events))
    report.write(out)


def _plots(r: Report, out: Path, runlog, ev: Events) -> list[str]:
    from upcycle.evaluate import plots
    from upcycle.core.errors import UnsupportedError

    made = []
    try:
        made.append(plots.loss_comparison(r.model.scores.block_loss,
                                          r.parent.scores.block_loss if r.parent else None,
                                          ("model", "parent"), out / "loss.png"))
        if r.routing:
            made.append(plots.expert_load([x.layer for x in r.routing], [x.load for x in r.routing],
                                          out / "expert_load.png"))
            drift = {d.layer: d for d in r.drift}
            made.append(plots.routing_overview(
                [x.layer for x in r.routing], [x.cv for x in r.routing], [x.entropy_norm for x in r.routing],
                [x.drop_at["1"] for x in r.routing], [x.drop_at["1.25"] for x in r.routing],
                [drift[x.layer].mean if x.layer in drift else None for x in r.routing],
                [drift[x.layer].min if x.layer in drift else None for x in r.routing],
                r.drift_reference, out / "routing.png"))
        if r.domain:
            made.append(plots.domain_usage(r.domain, out / "domain.png"))
        if runlog is not None:
            made.append(plots.training_curves(runlog, out / "training.png"))
    except UnsupportedError as exc:
        ev.warn(str(exc))
    return [str(p) for p in made]

