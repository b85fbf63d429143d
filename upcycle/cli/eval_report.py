"""What `upcycle eval` shows on the terminal, from a Report (the library computes it; only the CLI prints)."""

from __future__ import annotations

from upcycle.evaluate.report import REPORT, ROUTING_HEADER, SUMMARY, Report, equal_cost_verdict, others, \
    routing_rows, router_verdict, side_rows, verdict_sentence


def _quote(token: str) -> str:
    from rich.markup import escape

    return escape(f"'{token}'")


def print_report(r: Report, console) -> None:
    from rich import box
    from rich.table import Table

    t = Table(title=f"upcycle eval: {r.model.path}", title_justify="left", box=box.SIMPLE_HEAD)
    t.add_column("metric")
    t.add_column("model", justify="right")
    for name, _, _ in others(r):
        t.add_column(name, justify="right")
        t.add_column(f"model vs {name}", justify="right")
    for row in side_rows(r, compact=True):
        t.add_row(*row)
    console.print(t)
    console.print(verdict_sentence(r))
    ec = equal_cost_verdict(r)
    if ec:
        console.print(ec["text"])
    rv = router_verdict(r)
    if rv:
        console.print(rv["text"])
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
