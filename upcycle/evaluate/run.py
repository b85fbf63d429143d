"""evaluate(): the whole `upcycle eval` run, as a plain function the CLI calls.

Order: validate every input first (so a typo fails in a second, not after scoring), tokenize the held-out
blocks once, score the parent and keep only its MLP weights (for expert drift), free it, then score the model
while recording its routing, and write the report folder. Only one model is in memory at a time.
"""

from __future__ import annotations

import gc
from dataclasses import dataclass, field
from pathlib import Path

from upcycle.core import ui
from upcycle.core.errors import InputError, OutputError, UsageError
from upcycle.evaluate.report import EXPERTS, REPORT, Report, Side

# Below this largest per-block loss difference two models count as the same model: fp32 reordering noise on an
# exact conversion is ~1e-6; 16-bit rounding of the experts' separate matmuls is ~1e-3.
SAME_TOLERANCE = {"float32": 1e-4, "bfloat16": 2e-2, "float16": 1e-2}


@dataclass
class EvalOptions:
    split: str = "heldout"
    seq_len: int = 512
    max_blocks: int = 64
    seed: int = 0
    heldout_fraction: float = 0.01
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
    tasks: list[str] = field(default_factory=list)
    tasks_limit: int | None = None


def parse_layers(spec: str, moe_indices: list[int]) -> list[int]:
    """auto (first, middle and last MoE layer), all, none, or a list like 0,2,4-7 (of MoE layers)."""
    s = spec.strip().lower()
    if not moe_indices or s == "none":
        return []
    if s == "auto":
        picks = [moe_indices[0], moe_indices[len(moe_indices) // 2], moe_indices[-1]]
        return sorted(set(picks))
    if s == "all":
        return list(moe_indices)
    chosen: set[int] = set()
    try:
        for part in s.split(","):
            if "-" in part:
                a, b = part.split("-")
                chosen.update(range(int(a), int(b) + 1))
            elif part:
                chosen.add(int(part))
    except ValueError:
        raise UsageError(f"--layers {spec!r}: use auto, all, none or a list like 0,2,4-7") from None
    missing = sorted(chosen - set(moe_indices))
    if missing:
        raise UsageError(f"--layers: {missing} are not MoE layers of this model (MoE layers: "
                         f"{_ranges(moe_indices)})")
    return sorted(chosen)


def _ranges(xs: list[int]) -> str:
    out, start = [], None
    for i, x in enumerate(xs):
        if start is None:
            start = x
        if i + 1 == len(xs) or xs[i + 1] != x + 1:
            out.append(str(start) if start == x else f"{start}-{x}")
            start = None
    return ",".join(out)


def check_out(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise OutputError(f"--out {out} is a file, not a folder")
    if out.is_dir() and (out / REPORT).exists() and not overwrite:
        raise OutputError(f"{out} already holds a report; pass --overwrite to replace it, or choose another --out")


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


def evaluate(model: str | Path, *, data: list[str], parent: str | Path | None = None, out: str | Path | None = None,
             domain: list[str] | None = None, run: str | Path | None = None, options: EvalOptions | None = None,
             quiet: bool = False) -> Report:
    """Score MODEL (and the dense PARENT) on the same held-out blocks; report routing diagnostics for an MoE."""

    from upcycle.core.data import heldout_blocks, resolve_data_files
    from upcycle.evaluate import collect
    from upcycle.evaluate.cost import model_cost
    from upcycle.evaluate.drift import layer_drift, parent_mlps
    from upcycle.evaluate.lm import score
    from upcycle.evaluate.runlog import find_metrics, read_run
    from upcycle.evaluate.stats import paired_comparison
    from upcycle.core.loading import load_causal_lm, load_tokenizer
    from upcycle.convert.card import read_manifest

    opt = options or EvalOptions()
    if opt.split not in ("heldout", "all"):
        raise UsageError(f"--split {opt.split!r}: use heldout or all")
    for name, v in (("--seq-len", opt.seq_len), ("--max-blocks", opt.max_blocks), ("--batch-size", opt.batch_size)):
        if v < (2 if name == "--seq-len" else 1):
            raise UsageError(f"{name} must be at least {2 if name == '--seq-len' else 1}")
    if opt.dtype not in SAME_TOLERANCE:
        raise UsageError(f"--dtype {opt.dtype!r}: use float32, bfloat16 or float16")
    device = _device(opt.device)
    model_spec = str(model)
    out_dir = Path(out).expanduser() if out is not None else Path(f"eval-{Path(model_spec).name or 'model'}")
    check_out(out_dir, opt.overwrite)
    if opt.tasks:
        collect.check_lm_eval()

    # every input checked before any model is loaded
    files = resolve_data_files(data)
    domain_files = resolve_data_files(domain) if domain else None
    if run is None and Path(model_spec).is_dir() and find_metrics(model_spec):
        run = model_spec  # a run folder that also holds the final checkpoint
    runlog = read_run(run) if run is not None else None
    tok = load_tokenizer(model_spec)
    manifest = read_manifest(model_spec) if Path(model_spec).is_dir() else None
    notes: list[str] = []
    if parent is not None:
        ptok = load_tokenizer(str(parent))
        same_tokenizer(tok, ptok, ("MODEL", "--parent"))
    elif manifest is not None:
        notes.append(f"made by upcycle convert from {manifest.parent}; pass --parent {manifest.parent} to compare "
                     "with it and to measure expert drift from the parent MLP")

    blocks = heldout_blocks(tok, files, seq_len=opt.seq_len, max_blocks=opt.max_blocks, split=opt.split,
                            heldout_fraction=opt.heldout_fraction, seed=opt.seed, text_field=opt.text_field)
    if blocks.shape[0] == 0:
        if opt.split == "heldout":
            raise InputError(f"the held-out share ({opt.heldout_fraction:g}) of --data holds no complete block of "
                             f"{opt.seq_len} tokens; pass --split all for files kept apart for evaluation")
        raise InputError(f"--data holds no complete block of {opt.seq_len} tokens; give more text or a smaller --seq-len")
    domain_blocks = None
    if domain_files:
        domain_blocks = heldout_blocks(tok, domain_files, seq_len=opt.seq_len, max_blocks=opt.max_blocks, split="all",
                                       seed=opt.seed, text_field=opt.text_field)
        if domain_blocks.shape[0] == 0:
            raise InputError("--domain gave no complete block of --seq-len tokens")
    data_info = {"files": [str(f) for f in files], "split": opt.split, "heldout_fraction": opt.heldout_fraction,
                 "seed": opt.seed, "seq_len": opt.seq_len, "blocks": int(blocks.shape[0]),
                 "tokens_scored": int(blocks.shape[0] * (opt.seq_len - 1)), "text_field": opt.text_field,
                 "domain_files": [str(f) for f in domain_files] if domain_files else None,
                 "domain_blocks": int(domain_blocks.shape[0]) if domain_blocks is not None else None}
    if blocks.shape[0] < opt.max_blocks and not quiet:
        ui.warn(f"only {blocks.shape[0]} blocks of {opt.seq_len} tokens in the data (asked for up to "
                f"{opt.max_blocks}): intervals will be wide")

    if device.type == "cpu":  # on an accelerator the weights live in device memory
        from upcycle.core import memory

        memory.require(memory.eval_estimate(model_spec, str(parent) if parent is not None else None, dtype=opt.dtype,
                                            batch_tokens=opt.batch_size * opt.seq_len, allow_pickle=opt.allow_pickle))
    prog = ui.progress(transient=True) if not quiet else None
    if prog is not None:
        prog.start()
    try:
        parent_side, parent_mlp = None, None
        tasks: dict = {}
        if parent is not None:
            if not quiet:
                ui.info(f"loading the parent {parent}")
            pm = load_causal_lm(str(parent), dtype=opt.dtype, allow_pickle=opt.allow_pickle, device=str(device))
            pscores = score(pm, blocks, batch_size=opt.batch_size, progress=prog, description="scoring the parent")
            pdomain = (score(pm, domain_blocks, batch_size=opt.batch_size, progress=prog,
                             description="parent on --domain") if domain_blocks is not None else None)
            pmoe = collect.moe_info(pm)
            parent_side = Side(str(parent), _model_type(pm), bool(pmoe), pscores,
                               model_cost(pm, [g.group for g in pmoe], opt.seq_len), pdomain)
            if pmoe:
                notes.append("the --parent is itself an MoE: drift is measured against the mean expert")
            else:
                parent_mlp = parent_mlps(pm)
            if opt.tasks:
                tasks["parent"] = collect.run_tasks(pm, ptok, opt.tasks, opt.tasks_limit, opt.batch_size)
            del pm
            _release_memory()

        if not quiet:
            ui.info(f"loading the model {model_spec}")
        mm = load_causal_lm(model_spec, dtype=opt.dtype, allow_pickle=opt.allow_pickle, device=str(device))
        moe = collect.moe_info(mm)
        spec_layers = parse_layers(opt.layers, [m.index for m in moe])
        collector = collect.RoutingCollector(mm, moe, spec_layers, vocab_size=max(len(tok), int(blocks.max()) + 1),
                                             contexts=opt.contexts, seq_len=opt.seq_len)
        with collector:
            mscores = score(mm, blocks, batch_size=opt.batch_size, progress=prog, description="scoring the model",
                            on_batch=collector.on_batch)
        routing = collector.routing()
        drift, drift_note = [], None
        for m in moe:
            d, why = layer_drift(m.weights(), parent_mlp, manifest)
            drift.append(d)
            drift_note = drift_note or why
        specialisation = [collector.tokens[i].profiles(
            next(r.load for r in routing if r.layer == i), next(m.top_k for m in moe if m.index == i),
            lambda ids: tok.decode(ids), blocks, top_tokens=opt.top_tokens, min_count=opt.min_count)
            for i in spec_layers]
        mdomain, domain_layers = None, None
        if domain_blocks is not None:
            dcol = collect.RoutingCollector(mm, moe, [], vocab_size=1, contexts=0, seq_len=opt.seq_len)
            with dcol:
                mdomain = score(mm, domain_blocks, batch_size=opt.batch_size, progress=prog,
                                description="model on --domain", on_batch=dcol.on_batch)
            if moe:
                from upcycle.evaluate.specialise import domain_ranking

                droute = {r.layer: r for r in dcol.routing()}
                domain_layers = [domain_ranking(r.layer, r.load, droute[r.layer].load,
                                                opt.domain_top or r.top_k) for r in routing]
            else:
                notes.append("--domain ranks experts; the model is dense, so only its domain loss is reported")
        model_side = Side(model_spec, _model_type(mm), bool(moe), mscores,
                          model_cost(mm, [m.group for m in moe], opt.seq_len), mdomain)
        if opt.tasks:
            tasks["model"] = collect.run_tasks(mm, tok, opt.tasks, opt.tasks_limit, opt.batch_size)
        del mm
        _release_memory()
    finally:
        if prog is not None:
            prog.stop()

    tol = SAME_TOLERANCE[opt.dtype]
    comparison = (paired_comparison(mscores.block_loss, parent_side.scores.block_loss, tol)
                  if parent_side is not None else None)
    domain_comparison = (paired_comparison(mdomain.block_loss, parent_side.domain_scores.block_loss, tol)
                         if parent_side is not None and mdomain is not None else None)
    if manifest is not None and manifest.recipe.get("expert_init", "copy") != "copy" and drift and \
            drift[0].reference == "parent":
        notes.append(f"expert init {manifest.recipe['expert_init']} perturbed the experts at conversion: "
                     "their cosine to the parent starts below 1")
    report = Report(model=model_side, parent=parent_side, comparison=comparison, data=data_info, routing=routing,
                    drift=drift, drift_note=drift_note, specialisation=specialisation, domain=domain_layers,
                    domain_comparison=domain_comparison, training=runlog.summary() if runlog else None,
                    tasks=tasks or None, notes=notes, out=out_dir)
    write_report_folder(report, out_dir, runlog, with_plots=opt.plots, quiet=quiet)
    return report


def write_report_folder(report: Report, out: Path, runlog=None, *, with_plots: bool = True, quiet: bool = False) -> None:
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
        report.plots = _plots(report, out, runlog, quiet)
    report.write(out)


def _plots(r: Report, out: Path, runlog, quiet: bool) -> list[str]:
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
        if not quiet:
            ui.warn(str(exc))
    return [str(p) for p in made]

