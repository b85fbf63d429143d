"""The evaluation report: one dataclass, written as report.json and summary.md and shown as rich tables."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from upcycle.evaluate.cost import Cost
from upcycle.evaluate.drift import LayerDrift
from upcycle.evaluate.lm import Scores
from upcycle.evaluate.routing_stats import LayerRouting
from upcycle.evaluate.specialise import DomainLayer, LayerSpecialisation
from upcycle.evaluate.stats import Comparison
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
    c = r.comparison
    if c is None:
        return f"Held-out loss {r.model.scores.loss.mean:.4f} (no parent to compare with)."
    m, p = r.model.scores.loss.mean, r.parent.scores.loss.mean
    d = c.diff
    ci = "" if d.low is None else f", 95% CI [{d.low:+.4f}, {d.high:+.4f}]"
    if c.verdict == "same":
        return (f"The model computes the same loss as its parent (largest per-block difference {c.max_abs_diff:.2g} "
                f"nats, below the {c.tolerance:g} tolerance): as expected of a fresh exact conversion, no gain yet.")
    if c.verdict == "better":
        return (f"Upcycling paid off: loss {m:.4f} vs {p:.4f} for the parent ({d.mean:+.4f} nats{ci}), "
                f"perplexity x{c.perplexity_ratio:.3f}.")
    if c.verdict == "worse":
        return (f"The model is worse than its parent: loss {m:.4f} vs {p:.4f} ({d.mean:+.4f} nats{ci}), "
                f"perplexity x{c.perplexity_ratio:.3f}.")
    return (f"No significant difference from the parent: loss {m:.4f} vs {p:.4f} ({d.mean:+.4f} nats{ci}); "
            "more held-out blocks (--max-blocks) would narrow the interval.")


def _pm(est, fmt: str, compact: bool) -> str:
    """mean with its interval: [low, high] in files, +- half-width in the terminal (narrow columns)."""
    if est.low is None:
        return fmt.format(est.mean)
    if compact:
        return f"{fmt.format(est.mean)} ± {fmt.format(est.half_width).lstrip('+')}"
    return f"{fmt.format(est.mean)} [{fmt.format(est.low)}, {fmt.format(est.high)}]"


def side_rows(r: Report, compact: bool = False) -> list[tuple[str, str, str, str]]:
    """(metric, model, parent, model vs parent) rows shared by the terminal table and summary.md."""
    m, p = r.model, r.parent
    c = r.comparison
    rows = []

    def add(name, fm, fp, delta=""):
        rows.append((name, fm, fp if p is not None else "", delta if p is not None else ""))

    add("loss (nats/token)", _pm(m.scores.loss, "{:.4f}", compact), _pm(p.scores.loss, "{:.4f}", compact) if p else "",
        _pm(c.diff, "{:+.3g}", compact) if c else "")
    if compact:  # the perplexity interval is not symmetric: only in the files
        add("perplexity", f"{m.scores.perplexity.mean:.3f}", f"{p.scores.perplexity.mean:.3f}" if p else "",
            f"x{c.perplexity_ratio:.4f}" if c else "")
    else:
        add("perplexity", _pm(m.scores.perplexity, "{:.3f}", False),
            _pm(p.scores.perplexity, "{:.3f}", False) if p else "", f"x{c.perplexity_ratio:.4f}" if c else "")
    add("next-token accuracy", f"{m.scores.accuracy:.2%}", f"{p.scores.accuracy:.2%}" if p else "",
        f"{(m.scores.accuracy - p.scores.accuracy) * 100:+.2f} pt" if p else "")
    add("tokens/s", f"{m.scores.tokens_per_second:,.0f}", f"{p.scores.tokens_per_second:,.0f}" if p else "",
        f"x{m.scores.tokens_per_second / p.scores.tokens_per_second:.2f}" if p else "")
    add("parameters", human_count(m.cost.total_params), human_count(p.cost.total_params) if p else "",
        f"x{m.cost.total_params / p.cost.total_params:.2f}" if p else "")
    add("active params/token", human_count(m.cost.active_params), human_count(p.cost.active_params) if p else "",
        f"x{m.cost.active_params / p.cost.active_params:.2f}" if p else "")
    add("GFLOPs/token", f"{m.cost.flops_per_token / 1e9:.4g}", f"{p.cost.flops_per_token / 1e9:.4g}" if p else "",
        f"x{m.cost.flops_per_token / p.cost.flops_per_token:.2f}" if p else "")
    mem_m = m.scores.peak_bytes
    mem_p = p.scores.peak_bytes if p else None
    add("peak memory", human_bytes(mem_m) if mem_m else "n/a", human_bytes(mem_p) if mem_p else "n/a",
        f"x{mem_m / mem_p:.2f}" if mem_m and mem_p else "")
    if m.domain_scores is not None:
        pd = p.domain_scores if p else None
        dc = r.domain_comparison
        add("domain loss", _pm(m.domain_scores.loss, "{:.4f}", compact),
            _pm(pd.loss, "{:.4f}", compact) if pd else "", _pm(dc.diff, "{:+.3g}", compact) if dc else "")
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
    d = r.data
    lines += [f"Data: {d.get('blocks')} blocks of {d.get('seq_len')} tokens ({d.get('tokens_scored'):,} scored tokens, "
              f"split `{d.get('split')}`) from {len(d.get('files', []))} file(s)."
              + (f" Parent: `{r.parent.path}`." if r.parent else ""), ""]
    lines += ["| metric | model | parent | model vs parent |", "|---|---|---|---|"]
    lines += [f"| {a} | {b} | {c} | {e} |" for a, b, c, e in side_rows(r)]
    lines += ["", "Intervals are 95% Student-t intervals over blocks; the difference is paired (same blocks)."]
    if r.routing:
        lines += ["", "## Routing", ""]
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


def _quote(token: str) -> str:
    from rich.markup import escape

    return escape(f"'{token}'")


def print_report(r: Report, console) -> None:
    from rich import box
    from rich.table import Table

    t = Table(title=f"upcycle eval: {r.model.path}", title_justify="left", box=box.SIMPLE_HEAD)
    t.add_column("metric")
    t.add_column("model", justify="right")
    if r.parent is not None:
        t.add_column("parent", justify="right")
        t.add_column("model vs parent", justify="right")
    for a, b, c, e in side_rows(r, compact=True):
        t.add_row(a, b, c, e) if r.parent is not None else t.add_row(a, b)
    console.print(t)
    console.print(verdict_sentence(r))
    if r.routing:
        rt = Table(box=box.SIMPLE_HEAD, title="routing per MoE layer" + (f" (cosine to {r.drift_reference.replace('_', ' ')})"
                                                    if r.drift else ""), title_justify="left")
        for h in ROUTING_HEADER:
            # two-line headers keep nine columns inside 80 terminal columns
            rt.add_column(h.replace(" ", "\n").replace("@", "\n@").replace("max/min", "max/\nmin"), justify="right")
        for row in routing_rows(r):
            rt.add_row(*row)
        console.print(rt)
        if r.drift_note:
            console.print(f"cosine against the mean expert: {r.drift_note}")
    for s in r.specialisation:
        st = Table(box=box.SIMPLE_HEAD, title=f"layer {s.layer}: tokens most routed to each expert", title_justify="left")
        st.add_column("expert", justify="right")
        st.add_column("load", justify="right")
        st.add_column("top tokens (share of their occurrences)")
        for e in s.experts:
            st.add_row(str(e.expert), f"{e.load:.1%}",
                       "  ".join(f"{_quote(t['token'])} {t['share']:.0%}" for t in e.top_tokens[:6]))
        console.print(st)
    if r.domain is not None:
        if r.experts_file:
            console.print(f"domain experts written to {r.experts_file}: "
                          + "; ".join(f"layer {d.layer}: {d.selected}" for d in r.domain if d.selected))
        else:
            console.print("the domain routes like the general text: no expert is used more by it")
    if r.out is not None:
        console.print(f"report: {r.out / REPORT}, {r.out / SUMMARY}" + (f", {len(r.plots)} plots" if r.plots else ""))
