"""Branch-Train-MiX (Sukhbaatar et al., 2024): experts from domain fine-tunes of the parent, then train the router.

1. branch: two copies of the dense parent are fine-tuned, one per domain, with `upcycle train` (every weight):
   Python source code (the standard library) and English prose (the Python reference's topics, pydoc_data,
   which ships with every Python);
2. mix: the MoE takes three experts per layer, the parent's own MLP and the two branches' MLPs, top-2; attention,
   norms and embeddings are averaged over the three (--average-shared); each expert's router row starts from the
   parent's hidden states on texts of its domain (--router-init prompts:FILE; the parent's expert gets both);
3. train the router only, on both domains;
4. eval: each domain's held-out text, the MoE against the parent and against each branch (paired, same blocks).

The domains are fixed; --data and --heldout replace the code domain's files. --quick runs the whole pipeline with
tiny step counts (a check that it runs, not a result). On the command line:

  upcycle train PARENT -d CODE -o branch-code --train all --steps 20
  upcycle train PARENT -d PROSE -o branch-prose --train all --steps 20
  upcycle convert PARENT moe -e 3 -k 2 --expert-from PARENT --expert-from branch-code/final \\
      --expert-from branch-prose/final --average-shared --router-init prompts:prompts.json
  upcycle train moe -d CODE -d PROSE -o run --train router --lr 1e-3 --steps 20
  upcycle eval run/final --parent PARENT --baseline branch-code -d CODE_HELDOUT --split all
  (and so on for each domain and each branch)
"""

import json
import sys
from pathlib import Path

import _common as c
from upcycle.convert import convert
from upcycle.train import train

ROUTER_LR = 1e-3  # only the routers train (a few thousand weights): a larger step than the experts' fine-tune
PROMPT_CHARS = 2000  # of each example text given to --router-init prompts
PROMPT_TEXTS = 4  # example texts per domain


def prose_files(work: Path, every: int = 10) -> tuple[Path, Path]:
    """The English prose of pydoc_data's topics as two .jsonl files (train, held out: every 10th topic by name).
    The text is Python's own documentation, only moved into files the data loader reads."""
    import pydoc_data.topics

    topics = sorted(pydoc_data.topics.topics.items())
    folder = work / "data"
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for name, keep in (("prose-train.jsonl", lambda i: i % every), ("prose-heldout.jsonl", lambda i: not i % every)):
        path = folder / name
        path.write_text("".join(json.dumps({"text": text}) + "\n" for i, (_, text) in enumerate(topics) if keep(i)))
        out.append(path)
    return out[0], out[1]


def balanced(files: list[str], budget: int) -> list[str]:
    """The first files (by name) up to about `budget` bytes: neither domain drowns the other in the router's data."""
    chosen, size = [], 0
    for f in sorted(files):
        if size >= budget:
            break
        chosen.append(f)
        size += Path(f).stat().st_size
    return chosen


def first_texts(files: list[str], n: int) -> list[str]:
    """n real example texts from the start of a domain's training files (.jsonl rows or whole files)."""
    texts: list[str] = []
    for f in files:
        if f.endswith(".jsonl"):
            rows = [json.loads(line)["text"] for line in Path(f).read_text().splitlines() if line.strip()]
        else:
            rows = [Path(f).read_text(errors="replace")]
        texts += [t[:PROMPT_CHARS] for t in rows if t.strip()]
        if len(texts) >= n:
            break
    return texts[:n]


def eval_domain(args, model, parent, baseline, data, out):
    from upcycle.cli import ui
    from upcycle.cli.eval_report import print_report
    from upcycle.evaluate.run import EvalOptions, evaluate

    opts = EvalOptions(data=data, parent=parent, baseline=str(baseline), out=out, split="all", seq_len=args.seq_len,
                       max_blocks=args.eval_blocks, plots=False)
    report = evaluate(model, opts)
    print_report(report, ui.out)
    return report.to_json()


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    quick = "--quick" in argv
    if quick:
        argv = [a for a in argv if a != "--quick"]
        argv = ["--steps", "2", "--seq-len", "64", "--batch-size", "2", "--eval-blocks", "4", *argv]
    args = c.options(__doc__, "branch-train-mix", argv)
    parent = c.parent(args)
    work = args.work

    prose_train, prose_heldout = prose_files(work)
    domains = {"code": (balanced(c.train_data(args), prose_train.stat().st_size), c.heldout_data(args)),
               "prose": ([str(prose_train)], [str(prose_heldout)])}

    # 1. branch: one dense fine-tune per domain
    branches = {}
    for name, (data, _) in domains.items():
        run = train(c.train_config(args, parent, work / f"branch-{name}", data=data, train=["all"]))
        branches[name] = run.final

    # 2. mix: the parent's MLP and each branch's MLP become the experts
    prompts = work / "prompts.json"
    texts = {name: first_texts(data, PROMPT_TEXTS) for name, (data, _) in domains.items()}
    mapping = {str(parent): [t for pair in zip(texts["code"], texts["prose"]) for t in pair][:PROMPT_TEXTS],
               **{str(branches[name]): texts[name] for name in domains}}
    prompts.write_text(json.dumps(mapping, indent=1) + "\n")
    moe = work / "moe"
    c.print_conversion(convert(parent, moe, experts=3, top_k=2, expert_from=[str(parent), *map(str, branches.values())],
                               average_shared=True, router_init=f"prompts:{prompts}"))

    # 3. the router alone learns which expert a token needs
    both = [f for data, _ in domains.values() for f in data]
    run = train(c.train_config(args, moe, work / "run", data=both, train=["router"], lr=ROUTER_LR))

    # 4. each domain, against the parent and each branch
    table = {}
    for domain, (_, heldout) in domains.items():
        for name, branch in branches.items():
            rep = eval_domain(args, run.final, parent, branch, heldout, work / "reports" / f"{domain}-vs-{name}")
            table.setdefault(domain, {"parent": rep["parent"]["loss"], "MoE": rep["model"]["loss"]})
            table[domain][f"branch-{name}"] = rep["baseline"]["loss"]
            table[domain][f"MoE - branch-{name}"] = rep["baseline_comparison"]["loss_diff"]
    c.evaluate(args, run.final, parent, work / "report")  # the MoE on the code domain, the shared report layout

    print("\nheld-out loss (nats per token; MoE - branch: paired mean and 95% interval over the same blocks)")
    cols = ["parent", *(f"branch-{n}" for n in branches), "MoE"]
    print("| text | " + " | ".join(cols) + " | " + " | ".join(f"MoE - branch-{n}" for n in branches) + " |")
    for domain, row in table.items():
        diffs = [row[f"MoE - branch-{n}"] for n in branches]
        print(f"| {domain} | " + " | ".join(f"{row[k]:.3f}" for k in cols) + " | "
              + " | ".join(f"{d['mean']:+.3f}" + (f" [{d['ci95'][0]:+.3f}, {d['ci95'][1]:+.3f}]" if d["ci95"] else "")
                           for d in diffs) + " |")
    (work / "summary.json").write_text(json.dumps(table, indent=1) + "\n")


if __name__ == "__main__":
    sys.exit(main())
