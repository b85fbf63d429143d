"""`upcycle convert PARENT OUT.gguf`: the options that apply to a GGUF file, the call, and its summary."""

from __future__ import annotations

from upcycle.core.errors import UsageError


def run_gguf(parent: str, options) -> None:
    from upcycle.convert.gguf_out import convert_gguf
    from upcycle.cli import ui
    from upcycle.cli.show import events
    from upcycle.core.tensors import human_bytes

    if options.dry_run:
        raise UsageError("--dry-run plans a folder; for a .gguf OUT run without it (nothing is left behind on error)")
    if options.full_check == "always":
        raise UsageError("--full-check runs the folder through transformers; a .gguf OUT is checked against the "
                         "parent's bytes (--verify), and in llama.cpp by tests/test_llama_cpp.py")
    import sys

    command = ["upcycle", *sys.argv[1:]]
    res = convert_gguf(parent, options.out, options.recipe, gguf_type=options.gguf_type,
                       overwrite=options.overwrite, verify=options.verify, command=command, events=events())
    types = ", ".join(f"{n} x {q}" for q, n in sorted(res.expert_types.items()))
    lines = [
        f"wrote {res.out} ({human_bytes(res.output_bytes)}; parent {human_bytes(res.parent_bytes)})",
        f"llama.cpp arch {res.arch} ({res.moe_type} layout): {res.experts} experts, top-{res.top_k}, "
        f"granularity {res.granularity}; expert tensors {types}"
        + ("" if res.out_type == "auto" else f"; --gguf-type {res.out_type}"),
        f"router         {res.router} (float32)",
    ]
    v = res.verification
    if v is None:
        lines.append("verification   skipped (--no-verify)")
    else:
        lines.append(f"verification   {v['copied_tensors']} tensors identical to the parent's, every expert equal to "
                     f"its parent neurons ({human_bytes(v['expert_bytes'])}), {v['tokenizer_keys']} tokenizer keys "
                     "unchanged")
    lines.append(f"time           {res.seconds:.1f} s (" + ", ".join(f"{k} {s:.1f} s" for k, s in res.phases.items())
                 + ")")
    ui.console.print("\n".join(lines), soft_wrap=True)
