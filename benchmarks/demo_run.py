"""The README's demo, run and recorded: `upcycle demo` at its defaults in a child process, its wall time and peak
RSS, and what it concluded, for the README's excerpt (benchmarks/tables.py, table `demo`).

Runs `python -m upcycle demo OUT` (OUT a temporary folder unless --out is given), measures the whole command with
its wall time and the child's peak RSS (wait4, like /usr/bin/time -v), then keeps from OUT: demo.json (options, the
time of each stage, the losses, the verdict and the routers paragraph), the start of report/summary.md (the verdict
sentence and the side-by-side table) and report/loss.png, copied beside the JSON. Takes about as long as the demo
itself (minutes on a laptop CPU); run it with nothing else on the machine if its time is to mean anything.

    python benchmarks/demo_run.py [--out DIR] [--keep] [-- DEMO OPTIONS]
    python benchmarks/demo_run.py --readme     # the README's first command on a fresh clone, install included

With --readme the repository's HEAD is cloned into a temporary folder and the README's first command (a new
virtual environment, the packages installed from the registry, then the demo) runs there under bash: the wall time
and peak RSS are those of the whole command, what a new user waits for; the demo's own stage times come from its
demo.json.

Results go to docs/results/demo_run/<machine>[-<variant>].json (and .png) unless --json says otherwise; a run with
demo options other than the defaults writes only where --json says (benchmarks/_results.py).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _results import Run, add_arguments


def excerpt(summary_md: str) -> dict:
    """The verdict sentence and the side-by-side table: the first paragraph after the title, and the first table."""
    body = summary_md.splitlines()[1:]
    verdict = next((line for line in body if line.strip()), "")
    start = next((i for i, line in enumerate(body) if line.startswith("| metric")), None)
    table = []
    if start is not None:
        for line in body[start:]:
            if not line.startswith("|"):
                break
            table.append(line)
    return {"verdict": verdict, "table": table}


ROOT = Path(__file__).resolve().parents[1]


def readme_first_command(readme: str) -> str:
    """The first line of the README's first bash block: the command a new user runs."""
    block = readme.split("```bash\n", 1)[1].split("```", 1)[0]
    return next(line for line in block.splitlines() if line.strip())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, help="the demo's folder (default: a temporary one, removed unless --keep)")
    ap.add_argument("--keep", action="store_true", help="keep the demo's folder")
    add_arguments(ap)
    ap.add_argument("--readme", action="store_true",
                    help="run the README's first command on a fresh clone of HEAD (install included)")
    ap.add_argument("demo_args", nargs="*", help="options for upcycle demo (after --)")
    args = ap.parse_args(argv)
    import torch  # only to name the GPU the demo will train on, if any (the demo picks CUDA when it is there)

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    record = Run("demo_run", argv=None if argv is None else [sys.argv[0], *argv], gpu=gpu)
    tmp, cwd, first = None, None, None
    if args.readme:
        if args.out or args.demo_args:
            ap.error("--readme runs the README's command as it is: no --out, no demo options")
        tmp = Path(tempfile.mkdtemp(prefix="upcycle-readme-"))
        cwd = tmp / "clone"
        subprocess.run(["git", "clone", "-q", str(ROOT), str(cwd)], check=True)
        first = readme_first_command((cwd / "README.md").read_text())
        out = cwd / "upcycle-demo"
        cmd = ["bash", "-c", first]
    else:
        if args.out is None:
            tmp = Path(tempfile.mkdtemp(prefix="upcycle-demo-"))
            out = tmp / "upcycle-demo"
        else:
            out = args.out
        cmd = [sys.executable, "-m", "upcycle", "demo", str(out), *args.demo_args]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=cwd)
    _, status, usage = os.wait4(proc.pid, 0)  # wait4: the child's own peak RSS, as /usr/bin/time -v reports it
    wall = time.perf_counter() - t0
    code = proc.returncode = os.waitstatus_to_exitcode(status)
    if code != 0:
        print(f"error: upcycle demo exited with {code}", file=sys.stderr)
        return 1
    demo = json.loads((out / "demo.json").read_text())
    summary_md = (out / "report" / "summary.md").read_text()
    payload = {"demo_command": "upcycle demo OUT" + "".join(f" {a}" for a in args.demo_args), "wall_s": wall,
               "peak_rss_kib": usage.ru_maxrss, "demo": demo, "summary_md": excerpt(summary_md)}
    if first is not None:
        payload.update({"readme_command": first, "fresh_clone": True,
                        "demo_s": sum(demo.get("seconds", {}).values())})
    path = record.path(args.json, args.variant, default=not args.demo_args)
    if path is not None:
        plot = out / "report" / "loss.png"
        if plot.is_file():
            payload["plot"] = path.with_suffix(".png").name
            path.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(plot, path.with_suffix(".png"))
        record.write(payload, path)
        print(f"wrote {path}")
    if tmp is not None and not args.keep:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
