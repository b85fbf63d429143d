"""The evaluation report: one dataclass, written as report.json and summary.md and shown as rich tables."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from upcycle.evaluate.cost import Cost
from upcycle.evaluate.drift import LayerDrift
from upcycle.evaluate.lm import Scores
from upcycle.evaluate.provenance import Provenance
from upcycle.evaluate.routing_stats import LayerRouting
from upcycle.evaluate.specialise import DomainLayer, LayerSpecialisation
from upcycle.evaluate.stats import MIN_DOCUMENTS, Comparison
from upcycle.families.moe.routing import DEAD_ROUTER_ADVICE
from upcycle.core.tensors import human_bytes, human_count

REPORT = "report.json"
SUMMARY = "summary.md"
EXPERTS = "domain_experts.json"


@dataclass
class Side:
    """One model's results: the evaluated model or the dense parent."""

    path: str
    model_type: str
    moe: bool
    scores: Scores
    cost: Cost
    domain_scores: Scores | None = None

    def to_json(self) -> dict:
        s = self.scores.to_json()
        return {"path": self.path, "model_type": self.model_type, "moe": self.moe, **s,
                "params": {"total": self.cost.total_params, "active_per_token": self.cost.active_params},
                "flops_per_token": self.cost.flops_per_token, "cost": self.cost.to_json(),
                "domain": None if self.domain_scores is None else self.domain_scores.to_json()}


@dataclass
class EqualCost:
    """The dense reference of the same inference cost as a cheaper MoE (upcycle.evaluate.equal_cost): the parent
    pruned to the MoE's active MLP width, scored on the same blocks; or why it was not built."""

    mlp_share: float  # upcycle.json's per_token.mlp_share: the share of each MoE layer's MLP a token runs
    reference: Side | None = None  # the pruned parent (None: not built, see skipped)
    comparison: Comparison | None = None  # model minus the pruned parent, paired
    widths: dict | None = None  # {decoder layer: neurons kept}
    sample: str | None = None  # the text the neurons were ranked on
    skipped: str | None = None  # why no reference was built

    def to_json(self, parent: Side | None) -> dict:
        ref = self.reference
        return {"reference": None if ref is None else equal_cost_name(self, parent),
                "mlp_share": self.mlp_share, "skipped": self.skipped, "sample": self.sample,
                "neurons_kept": None if self.widths is None else {str(k): v for k, v in self.widths.items()},
                "flops_share": flops_share(self, parent),
                "pruned_parent": None if ref is None else ref.to_json(),
                "comparison": None if self.comparison is None else self.comparison.to_json()}


def flops_share(e: EqualCost, parent: Side | None) -> float | None:
    """The pruned parent's forward FLOPs per token over the parent's (eval's own count, upcycle.evaluate.cost)."""
    if e.reference is None or parent is None:
        return None
    return e.reference.cost.flops_per_token / parent.cost.flops_per_token


def equal_cost_name(e: EqualCost, parent: Side | None, model: Side | None = None) -> str:
    """The reference as the verdict names it, with its FLOPs per token as a share of the parent's (and the
    model's, which adds its routers)."""
    share = flops_share(e, parent)
    if share is None:
        return "the parent pruned to the same active MLP width"
    theirs = f"; the model: {model.cost.flops_per_token / parent.cost.flops_per_token:.0%}" if model else ""
    return f"the parent pruned to the same active MLP width ({share:.0%} of its FLOPs per token{theirs})"


@dataclass
class Report:
    model: Side
    parent: Side | None
    comparison: Comparison | None
    data: dict
    routing: list[LayerRouting] = field(default_factory=list)
    drift: list[LayerDrift] = field(default_factory=list)
    drift_note: str | None = None
    specialisation: list[LayerSpecialisation] = field(default_factory=list)
    domain: list[DomainLayer] | None = None
    domain_comparison: Comparison | None = None
    experts_file: str | None = None
    training: dict | None = None
    tasks: dict | None = None
    plots: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    out: Path | None = None
    baseline: Side | None = None  # the dense baseline trained the same way (--baseline)
    baseline_comparison: Comparison | None = None  # model minus baseline, paired
    provenance: Provenance | None = None
    routing_change: object | None = None  # upcycle.evaluate.learned.RoutingChange: routing against the start
    equal_cost: EqualCost | None = None  # an MoE cheaper per token than its parent: the dense reference of its cost

    @property
    def drift_reference(self) -> str | None:
        return self.drift[0].reference if self.drift else None

    def routing_json(self) -> dict | None:
        if not self.routing:
            return None
        drift = {d.layer: d for d in self.drift}
        layers = []
        for r in self.routing:
            entry = r.to_json()
            d = drift.get(r.layer)
            entry["drift"] = d.to_json() if d is not None else None
            layers.append(entry)
        return {
            "layers": layers,
            "drift_reference": self.drift_reference,
            "drift_note": self.drift_note,
            "mean_cv": sum(r.cv for r in self.routing) / len(self.routing),
            "max_drop_at_1": max(r.drop_at["1"] for r in self.routing),
            "dead_experts": {str(r.layer): r.dead_experts for r in self.routing if r.dead_experts},
        }

    def to_json(self) -> dict:
        from upcycle import __version__

        return _clean({
            "tool": "upcycle eval",
            "version": __version__,
            "model": self.model.to_json(),
            "parent": None if self.parent is None else self.parent.to_json(),
            "comparison": None if self.comparison is None else self.comparison.to_json(),
            "baseline": None if self.baseline is None else self.baseline.to_json(),
            "baseline_comparison": None if self.baseline_comparison is None else self.baseline_comparison.to_json(),
            "provenance": None if self.provenance is None else self.provenance.to_json(),
            "verdict": dict(zip(("kind", "text"), verdict(self))),
            "routers": router_verdict(self),
            "equal_cost": None if self.equal_cost is None else {**self.equal_cost.to_json(self.parent),
                                                                "verdict": equal_cost_verdict(self)},
            "routing_change": None if self.routing_change is None else self.routing_change.to_json(),
            "data": self.data,
            "routing": self.routing_json(),
            "specialisation": [s.to_json() for s in self.specialisation] or None,
            "domain": None if self.domain is None else {
                "layers": [d.to_json() for d in self.domain],
                "experts_file": self.experts_file,
                "comparison": None if self.domain_comparison is None else self.domain_comparison.to_json(),
            },
            "training": self.training,
            "tasks": self.tasks,
            "plots": self.plots,
            "notes": self.notes,
        })

    def write(self, out: Path) -> None:
        # each file appears whole or not at all (a kill mid-write leaves a .partial, never a short report), and
        # report.json, which marks the folder as finished, comes last
        for name, text in ((SUMMARY, summary_markdown(self)), (REPORT, json.dumps(self.to_json(), indent=1) + "\n")):
            tmp = out / f".{name}.partial"
            tmp.write_text(text)
            tmp.replace(out / name)


def _clean(x):
    """JSON has no inf/nan: write them as null (the field docs say what null means)."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    return x


# ---------------------------------------------------------------------------------------------- wording


def verdict_sentence(r: Report) -> str:
    return verdict(r)[1]


def _numbers(m: float, o: float, c: Comparison, other: str) -> str:
    d = c.diff
    if c.verdict == "too few documents":
        ci = f", over {d.n} blocks of only {d.documents} documents"
    elif d.low is None:
        ci = ""
    else:
        over = f" over {d.documents} documents" if d.documents is not None else ""
        ci = f", 95% CI{over} [{d.low:+.4f}, {d.high:+.4f}]"
    return f"loss {m:.4f} vs {o:.4f} for {other} ({d.mean:+.4f} nats{ci}, perplexity x{c.perplexity_ratio:.3f})"


def too_few_documents(c: Comparison) -> str:
    return (f"the {c.diff.n} held-out blocks come from {c.diff.documents} documents, fewer than the "
            f"{c.min_documents} an interval over documents needs (blocks of one document are not independent): give "
            "--data more documents, or a larger --max-blocks where the split has more")


def withheld_reason(d) -> str:
    """One upcycle.evaluate.fairness.Difference as the verdict names it."""
    if d.setting == "training tokens" and not d.unknown:
        return f"they were not trained on the same number of tokens ({d.model} for the model, {d.baseline} for the baseline)"
    return d.text()


MISSING_BASELINE = ("Not an upcycling claim: that needs a dense baseline trained on the same data and tokens "
                    "(upcycle train PARENT with the same options, then --baseline RUN).")


def verdict(r: Report) -> tuple[str, str]:
    """(kind, sentences). Upcycling is credited only against a dense baseline trained on the same tokens, for a
    model trained since conversion; against the untrained parent the words are "better/worse than the parent".

    kinds: paid_off, did_not_pay, no_difference (vs the baseline); untrained; wrong_parent; unfair (the baseline
    was not trained as the MoE was, or that cannot be checked: provenance.baseline_differences names each
    setting); too_few_documents (the interval would rest on fewer than MIN_DOCUMENTS documents);
    better_than_parent, worse_than_parent, same_as_parent, no_difference_from_parent; no_reference.
    """
    prov = r.provenance or Provenance()
    m = r.model.scores.loss.mean
    out: list[str] = []
    kind = None
    if prov.parent_match is False:
        out.append(f"--parent {r.parent.path if r.parent else ''} is not the model this MoE was converted from "
                   f"(upcycle.json records {prov.recorded_parent}; the tensors differ): no upcycling claim.")
        kind = "wrong_parent"
    if prov.untrained:
        out.append("Untrained since conversion: the weights are still those upcycle convert wrote, so upcycling "
                   "cannot have paid off yet.")
        kind = kind or "untrained"

    bc = r.baseline_comparison
    if bc is not None:
        b = r.baseline.scores.loss.mean
        nums = _numbers(m, b, bc, f"the dense baseline `{r.baseline.path}`")
        unfair = [withheld_reason(d) for d in prov.baseline_differences]
        if any(d.unknown for d in prov.baseline_differences):
            unfair.append("(pass the run folders, --run for the MoE and --baseline RUN, of runs made by this upcycle)")
        if r.baseline.moe:
            unfair.append("the baseline is itself an MoE, not the dense parent trained the same way")
        word = {"better": "better than", "worse": "worse than", "same": "the same as"}.get(
            bc.verdict, "not significantly different from")
        if bc.verdict == "too few documents":
            word = "compared with"
        if kind is not None or unfair:
            out.append(f"Against the baseline: {word} it, {nums}."
                       + (" No upcycling verdict, the baseline was not trained the same way as the MoE: "
                          + "; ".join(unfair) + "." if unfair else ""))
            kind = kind or "unfair"
        elif bc.verdict == "too few documents":
            out.append(f"No upcycling verdict against the dense baseline trained the same way: {nums}; "
                       f"{too_few_documents(bc)}.")
            kind = "too_few_documents"
        elif bc.verdict == "better":
            out.append(f"Upcycling paid off against the dense baseline trained the same way: {nums}.")
            kind = "paid_off"
        elif bc.verdict == "worse":
            out.append(f"Upcycling did not pay off: the dense baseline trained the same way is better; {nums}.")
            kind = "did_not_pay"
        else:
            out.append(f"Upcycling made no significant difference against the dense baseline trained the same way: "
                       f"{nums}; more held-out blocks (--max-blocks) would narrow the interval.")
            kind = "no_difference"

    c = r.comparison
    if c is not None:
        p = r.parent.scores.loss.mean
        if c.verdict == "same":
            out.append(f"The model computes the same loss as its parent (largest per-block difference "
                       f"{c.max_abs_diff:.2g} nats, below the {c.tolerance:g} tolerance)"
                       + (": as expected of a fresh exact conversion, no gain yet." if prov.untrained is not False
                          else "."))
            pk = "same_as_parent"
        else:
            label = "the parent" if prov.parent_match is not False else "--parent"
            pk = {"better": "better_than_parent", "worse": "worse_than_parent"}.get(
                c.verdict, "no_difference_from_parent")
            head = {"better": f"Better than {label}", "worse": f"Worse than {label}",
                    "too few documents": f"Compared with {label}"}.get(c.verdict, f"No significant difference from {label}")
            out.append(f"{head}: {_numbers(m, p, c, label)}"
                       + (f"; no verdict: {too_few_documents(c)}." if c.verdict == "too few documents" else "."))
            if c.verdict == "too few documents":
                pk = "too_few_documents"
        if kind is None:
            kind = pk
            if r.model.moe or (r.provenance and r.provenance.recorded_parent):
                out.append(MISSING_BASELINE)
    if not out:
        return "no_reference", f"Held-out loss {m:.4f} (no parent to compare with)."
    return kind or "no_reference", " ".join(out)


def equal_cost_verdict(r: Report) -> dict | None:
    """{"kind", "text"} at equal inference cost, for an MoE that runs less than its parent per token; None for any
    other model. Better or worse is said only when the interval over at least MIN_DOCUMENTS documents excludes 0.

    kinds: better_at_equal_cost, worse_at_equal_cost, no_difference_at_equal_cost, same_at_equal_cost,
    too_few_documents, not_built (the reason is in the text)."""
    e = r.equal_cost
    if e is None:
        return None
    if e.reference is None:
        return {"kind": "not_built", "text": f"No verdict at equal inference cost (the model runs {e.mlp_share:.0%} "
                                             f"of the parent's MLP per token): {e.skipped}."}
    name = equal_cost_name(e, r.parent, r.model)
    c = e.comparison
    nums = _numbers(r.model.scores.loss.mean, e.reference.scores.loss.mean, c, "the pruned parent")
    if c.verdict == "better":
        return {"kind": "better_at_equal_cost", "text": f"Better at equal inference cost than {name}: {nums}."}
    if c.verdict == "worse":
        return {"kind": "worse_at_equal_cost", "text": f"Worse at equal inference cost than {name}: {nums}."}
    if c.verdict == "same":
        return {"kind": "same_at_equal_cost",
                "text": f"No verdict at equal inference cost: the model computes the same loss as {name} (largest "
                        f"per-block difference {c.max_abs_diff:.2g} nats, below the {c.tolerance:g} tolerance)."}
    if c.verdict == "too few documents":
        return {"kind": "too_few_documents",
                "text": f"No verdict at equal inference cost against {name}: {nums}; {too_few_documents(c)}."}
    return {"kind": "no_difference_at_equal_cost",
            "text": f"No verdict at equal inference cost: against {name}, {nums}; the interval includes 0 (more "
                    "held-out blocks, --max-blocks, would narrow it)."}


# A sign of collapse beside any verdict on the routers (docs/eval.md)
SKEWED_CV = 1.0  # load CV above this, or dead experts: routing collapses onto few experts


def router_verdict(r: Report) -> dict | None:
    """{"learned": True/False/None, "text": one paragraph naming the numbers and the thresholds} for an MoE.

    Learned is judged against the start (upcycle.evaluate.learned); the absolute levels (entropy, load CV, the
    experts' cosine to their reference) are printed beside it, never judged on their own: a k-means router starts
    decisive."""
    if not r.routing:
        return None
    from upcycle.evaluate.learned import RoutingChange, judge

    ents = [x.entropy_norm for x in r.routing if x.entropy_norm is not None]
    ent = sum(ents) / len(ents) if ents else None
    cv = sum(x.cv for x in r.routing) / len(r.routing)
    dead = sum(len(x.dead_experts) for x in r.routing)
    cos = sum(d.mean for d in r.drift) / len(r.drift) if r.drift else None
    ref = {"parent": "the parent neurons they were cut from", "mean_expert": "their layer's mean expert"}.get(
        r.drift_reference or "", "their origin")
    facts = []
    if ent is not None:
        facts.append(f"mean router entropy {ent:.3f} of log E")
    facts.append(f"load CV {cv:.3f}" + (f", {dead} dead experts" if dead else ""))
    if cos is not None:
        facts.append(f"experts' mean cosine to {ref} {cos:.6f}")
    numbers = "; ".join(facts)
    prov = r.provenance
    if prov is not None and prov.untrained:
        return {"learned": False, "text": f"The routers are untrained (fresh from conversion; {numbers}): what they "
                                          "do is their initialisation."}
    change = r.routing_change
    if change is None:
        change = RoutingChange(None, "not an MoE made by upcycle convert (no upcycle.json), so its start is unknown")
    learned, text = judge(change)
    text += f" Levels now: {numbers}."
    if learned is False and ent is not None and ent > UNIFORM_ENTROPY:
        text += " " + DEAD_ROUTER_ADVICE + "."
    if dead or cv > SKEWED_CV:
        text += f" The load is concentrated on few experts (CV above {SKEWED_CV:g} or dead experts): a sign of collapse."
    return {"learned": learned, "text": text}


UNIFORM_ENTROPY = 0.98  # above: the router barely prefers any expert (then the dead-router advice is added)


def _pm(est, fmt: str, compact: bool) -> str:
    """mean with its interval: [low, high] in files, +- half-width in the terminal (narrow columns)."""
    if est.low is None:
        return fmt.format(est.mean)
    if compact:
        return f"{fmt.format(est.mean)} ± {fmt.format(est.half_width).lstrip('+')}"
    return f"{fmt.format(est.mean)} [{fmt.format(est.low)}, {fmt.format(est.high)}]"


def others(r: Report) -> list[tuple[str, Side, Comparison | None]]:
    """The references the model is compared with, in table order: (column name, side, model-minus-it)."""
    out = []
    if r.parent is not None:
        out.append(("parent", r.parent, r.comparison))
    if r.baseline is not None:
        out.append(("baseline", r.baseline, r.baseline_comparison))
    if r.equal_cost is not None and r.equal_cost.reference is not None:
        out.append(("pruned parent", r.equal_cost.reference, r.equal_cost.comparison))
    return out


def side_rows(r: Report, compact: bool = False) -> list[tuple[str, ...]]:
    """(metric, model, then for each reference: its value and model vs it) rows, shared by the terminal table and
    summary.md."""
    m = r.model
    refs = others(r)
    rows = []

    def add(name, fm, per_ref):
        cells = [name, fm]
        for _, o, c in refs:
            cells += list(per_ref(o, c))
        rows.append(tuple(cells))

    add("loss (nats/token)", _pm(m.scores.loss, "{:.4f}", compact),
        lambda o, c: (_pm(o.scores.loss, "{:.4f}", compact), _pm(c.diff, "{:+.3g}", compact) if c else ""))
    if compact:  # the perplexity interval is not symmetric: only in the files
        add("perplexity", f"{m.scores.perplexity.mean:.3f}",
            lambda o, c: (f"{o.scores.perplexity.mean:.3f}", f"x{c.perplexity_ratio:.4f}" if c else ""))
    else:
        add("perplexity", _pm(m.scores.perplexity, "{:.3f}", False),
            lambda o, c: (_pm(o.scores.perplexity, "{:.3f}", False), f"x{c.perplexity_ratio:.4f}" if c else ""))
    add("next-token accuracy", f"{m.scores.accuracy:.2%}",
        lambda o, c: (f"{o.scores.accuracy:.2%}", f"{(m.scores.accuracy - o.scores.accuracy) * 100:+.2f} pt"))
    add("tokens/s", f"{m.scores.tokens_per_second:,.0f}",
        lambda o, c: (f"{o.scores.tokens_per_second:,.0f}",
                      f"x{m.scores.tokens_per_second / o.scores.tokens_per_second:.2f}"))
    add("parameters", human_count(m.cost.total_params),
        lambda o, c: (human_count(o.cost.total_params), f"x{m.cost.total_params / o.cost.total_params:.2f}"))
    add("active params/token", human_count(m.cost.active_params),
        lambda o, c: (human_count(o.cost.active_params), f"x{m.cost.active_params / o.cost.active_params:.2f}"))
    add("GFLOPs/token", f"{m.cost.flops_per_token / 1e9:.4g}",
        lambda o, c: (f"{o.cost.flops_per_token / 1e9:.4g}", f"x{m.cost.flops_per_token / o.cost.flops_per_token:.2f}"))
    mem_m = m.scores.peak_bytes
    add("peak memory", human_bytes(mem_m) if mem_m else "n/a",
        lambda o, c: (human_bytes(o.scores.peak_bytes) if o.scores.peak_bytes else "n/a",
                      f"x{mem_m / o.scores.peak_bytes:.2f}" if mem_m and o.scores.peak_bytes else ""))
    if r.provenance is not None and (r.provenance.model_tokens is not None or r.provenance.baseline_tokens is not None):
        prov = r.provenance

        def tok(n):
            return f"{n:,}" if n is not None else "?"

        add("training tokens", tok(prov.model_tokens),
            lambda o, c: (tok(prov.baseline_tokens) if o is r.baseline else "not trained here", ""))
    if m.domain_scores is not None:
        dc = r.domain_comparison
        add("domain loss", _pm(m.domain_scores.loss, "{:.4f}", compact),
            lambda o, c: (_pm(o.domain_scores.loss, "{:.4f}", compact) if o.domain_scores else "",
                          _pm(dc.diff, "{:+.3g}", compact) if dc and o is r.parent else ""))
    return rows


def routing_rows(r: Report) -> list[tuple[str, ...]]:
    drift = {d.layer: d for d in r.drift}
    rows = []
    for lr in r.routing:
        d = drift.get(lr.layer)
        rows.append((
            str(lr.layer),
            f"{lr.cv:.3f}",
            "inf" if lr.max_over_min is None else f"{lr.max_over_min:.2f}",
            f"{len(lr.dead_experts)}" if lr.dead_experts else "0",
            "" if lr.entropy_norm is None else f"{lr.entropy_norm:.3f}",
            f"{lr.drop_at['1']:.1%}",
            f"{lr.drop_at['1.25']:.1%}",
            "" if d is None else f"{d.mean:.4f}",
            "" if d is None else f"{d.min:.4f}",
        ))
    return rows


# entropy: router entropy / log E; drop: share of assignments over capacity at factor 1.0 / 1.25; cos: expert weights'
# cosine similarity to their reference (parent MLP neurons, or the mean expert)
ROUTING_HEADER = ("layer", "load CV", "max/min", "dead", "entropy", "drop@1.0", "drop@1.25", "cos mean", "cos min")


def summary_markdown(r: Report) -> str:
    lines = [f"# upcycle eval: `{r.model.path}`", ""]
    lines += [verdict_sentence(r), ""]
    ec = equal_cost_verdict(r)
    if ec:
        lines += [ec["text"], ""]
    d = r.data
    lines += [f"Data: {d.get('blocks')} blocks of {d.get('seq_len')} tokens ({d.get('tokens_scored'):,} scored tokens, "
              f"split `{d.get('split')}`) from {len(d.get('files', []))} file(s)."
              + (f" Parent: `{r.parent.path}`." if r.parent else "")
              + (f" Dense baseline: `{r.baseline.path}`." if r.baseline else "")
              + (f" Equal-cost reference: {equal_cost_name(r.equal_cost, r.parent)}, its neurons ranked on "
                 f"{r.equal_cost.sample}." if r.equal_cost and r.equal_cost.reference else ""), ""]
    header = ["metric", "model"] + [x for name, _, _ in others(r) for x in (name, f"model vs {name}")]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in side_rows(r)]
    docs = d.get("documents")
    lines += ["", "Intervals are 95% Student-t intervals over documents (cluster-robust: blocks grouped by the "
                  f"document they come from; {docs} documents) and the difference is paired (same blocks); fewer than "
                  f"{MIN_DOCUMENTS} documents give no verdict." if docs is not None else
              "Intervals are 95% Student-t intervals over blocks; the difference is paired (same blocks)."]
    if r.routing:
        lines += ["", "## Routing", ""]
        rv = router_verdict(r)
        if rv:
            lines += [rv["text"], ""]
        lines += _routing_findings(r)
        lines += ["", "| " + " | ".join(ROUTING_HEADER) + " |", "|" + "---|" * len(ROUTING_HEADER)]
        lines += ["| " + " | ".join(row) + " |" for row in routing_rows(r)]
        if r.drift_note:
            lines += ["", f"Expert cosine similarity is measured against the mean expert: {r.drift_note}."]
    if r.specialisation:
        lines += ["", "## What experts receive", "",
                  "Tokens most often sent to each expert (share of their occurrences, among tokens seen at least "
                  "3 times) and the context where the router was most sure; `[[ ]]` marks the routed token.", ""]
        for s in r.specialisation:
            lines += [f"Layer {s.layer}:", ""]
            for e in s.experts:
                toks = ", ".join(f"{_md_code(t['token'])} {t['share']:.0%}" for t in e.top_tokens[:6])
                lines.append(f"- expert {e.expert} (load {e.load:.1%}): {toks or '(no token seen often enough)'}")
                if e.contexts:
                    lines.append(f"  - most sure: {_md_code(e.contexts[0]['text'])}")
            lines.append("")
    if r.domain is not None:
        lines += ["## Domain", ""]
        chosen = {d.layer: d.selected for d in r.domain if d.selected}
        if chosen:
            lines.append(f"Experts the domain uses more than general text (per layer, domain/general load > 1, "
                         f"strongest first): written to `{r.experts_file}` for `upcycle train --train`.")
            lines.append("")
            for d in r.domain:
                if d.selected:
                    ratios = ", ".join(f"{e} (x{d.ratio[e]:.2f})" for e in d.selected)
                    lines.append(f"- layer {d.layer}: {ratios}")
        else:
            lines.append("The domain routes like the general text: no expert is used more by it.")
        lines.append("")
    if r.training:
        t = r.training
        lines += ["## Training run", "",
                  f"{t['steps']} steps" + (f", {t['tokens']:,} tokens" if t.get("tokens") else "")
                  + (f"; train loss {t['first_loss']:.4f} -> {t['final_loss']:.4f}" if t.get("final_loss") is not None else "")
                  + (f"; best val loss {t['best_val_loss']:.4f}" if t.get("best_val_loss") is not None else "") + ".", ""]
    if r.tasks:
        lines += ["## Tasks (lm-eval-harness)", "", "```", json.dumps(r.tasks, indent=1), "```", ""]
    if r.notes:
        lines += ["## Notes", ""] + [f"- {n}" for n in r.notes] + [""]
    if r.plots:
        lines += ["## Plots", ""] + [f"![{Path(p).stem}]({Path(p).name})" for p in r.plots] + [""]
    return "\n".join(lines).rstrip() + "\n"


def _md_code(text: str) -> str:
    """Inline code that survives backticks and edge spaces in the text (CommonMark rules)."""
    fence = "``" if "`" in text else "`"
    return f"{fence} {text} {fence}" if "`" in text or text.startswith(" ") or text.endswith(" ") else f"`{text}`"


def _routing_findings(r: Report) -> list[str]:
    out = []
    dead = {lr.layer: lr.dead_experts for lr in r.routing if lr.dead_experts}
    worst = max(r.routing, key=lambda lr: lr.cv)
    out.append(f"- Load balance: mean CV {sum(lr.cv for lr in r.routing) / len(r.routing):.3f}; "
               f"worst layer {worst.layer} (CV {worst.cv:.3f}, busiest expert {worst.max_load:.1%} of assignments "
               f"vs {1 / worst.num_experts:.1%} uniform).")
    if dead:
        out.append("- Dead experts (no tokens): " + "; ".join(f"layer {k}: {v}" for k, v in dead.items())
                   + ". A sign of routing collapse.")
    drop = max(r.routing, key=lambda lr: lr.drop_at["1"])
    out.append(f"- A capacity factor of 1.0 would drop up to {drop.drop_at['1']:.1%} of assignments (layer "
               f"{drop.layer}); 1.25 up to {max(lr.drop_at['1.25'] for lr in r.routing):.1%}.")
    together = {lr.layer: lr.always_together for lr in r.routing if lr.always_together}
    if together:
        n = sum(len(v) for v in together.values())
        first = next(iter(together.items()))
        out.append(f"- {n} expert pairs in {len(together)} layers are always chosen together (e.g. layer {first[0]}: "
                   f"{first[1][:4]}): fine-grained virtual groups that training has not pulled apart.")
    ents = [lr.entropy_norm for lr in r.routing if lr.entropy_norm is not None]
    if ents:
        hint = ("near 1: the router barely prefers any expert, as a fresh random router does" if min(ents) > 0.95
                else "1 would mean no preference; lower values: the router has become decisive")
        out.append(f"- Router entropy / log E: {min(ents):.3f} to {max(ents):.3f} ({hint}).")
    if r.drift:
        ref = "the parent MLP they were copied from" if r.drift_reference == "parent" else "the mean expert"
        lo = min(d.min for d in r.drift)
        mean = sum(d.mean for d in r.drift) / len(r.drift)
        out.append(f"- Experts' cosine similarity to {ref}: mean {mean:.4f}, lowest {lo:.4f}.")
    return out
