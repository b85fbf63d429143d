"""Where a benchmark's results file goes, and what it records about how it was made.

Every script under benchmarks/ writes its JSON through `Run.write`: its own numbers, and beside them the machine
(CPU model, the ISA flags the numbers depend on, usable cores, load average when the run started), the software
(Python, torch, transformers), the commit and whether the tree had uncommitted changes, the exact command and the
date. Without `--json` the file goes to docs/results/<benchmark>/<machine>[-<variant>].json, the folder the tables
in README.md and docs/ are generated from (benchmarks/tables.py), so a new run replaces the old one of the same
benchmark on the same kind of machine and git keeps the history.

    run = Run("bench_train")                        # at the start: the load average is the start's
    ...
    path = run.path(args.json, args.variant)         # args.json if given, else the default above
    run.write({"results": ...}, path)
"""

from __future__ import annotations

import json
import os
import platform
import re
import shlex
import subprocess
import sys
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "docs" / "results"
ARCHIVE = RESULTS / "archive"
# the flags CPU results depend on: AVX2 / AVX-512 kernels, native bf16 dot products, AMX tiles
FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")
# what every results file carries at its top level, and what its "machine" block holds (null where unknown)
KEYS = ("benchmark", "machine", "software", "commit", "command", "date")
MACHINE_KEYS = ("slug", "cpu", "flags", "cores", "load_avg")
_FAMILIES = (("epyc", "epyc"), ("xeon", "xeon"), ("ryzen", "ryzen"), ("threadripper", "threadripper"),
             ("core(tm)", "core"), ("apple", "apple"), ("neoverse", "neoverse"), ("graviton", "graviton"))


def _cpuinfo() -> dict[str, str]:
    """The first processor's fields of /proc/cpuinfo ({} where there is none, e.g. macOS)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return {}
    info: dict[str, str] = {}
    for line in text.split("\n\n", 1)[0].splitlines():
        if ":" in line:
            key, value = line.split(":", 1)
            info.setdefault(key.strip(), value.strip())
    return info


def cpu_model(info: dict[str, str] | None = None) -> str | None:
    info = _cpuinfo() if info is None else info
    return info.get("model name") or platform.processor() or None


def cpu_flags(info: dict[str, str] | None = None) -> list[str] | None:
    """Which of FLAGS the CPU has (None where the OS does not say)."""
    info = _cpuinfo() if info is None else info
    if "flags" not in info:
        return None
    have = set(info["flags"].split())
    return [f for f in FLAGS if f in have]


def slugify(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def machine_slug(cpu: str | None, flags: list[str] | None, vendor: str | None = None) -> str:
    """A short name for the kind of machine: the CPU family and the best of its matrix ISAs (xeon-amx,
    epyc-avx512bf16, epyc-avx2, ...). Two runs on the same kind of machine get the same name."""
    low = (cpu or "").lower()
    family = next((name for key, name in _FAMILIES if key in low), None)
    if family is None:
        family = {"GenuineIntel": "intel", "AuthenticAMD": "amd"}.get(vendor or "", slugify(platform.machine()) or "cpu")
    flags = set(flags or ())
    tier = ("amx" if "amx_tile" in flags else "avx512bf16" if "avx512_bf16" in flags else
            "avx512" if "avx512f" in flags else "avx2" if "avx2" in flags else None)
    return f"{family}-{tier}" if tier else family


def _cores() -> int | None:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def machine(gpu: str | None = None) -> dict:
    """The machine block: slug, CPU model, FLAGS present, usable cores, 1/5/15-minute load average now, and the
    GPU's name where the benchmark ran on one (then the slug names the GPU)."""
    info = _cpuinfo()
    cpu, flags = cpu_model(info), cpu_flags(info)
    try:
        load = [round(x, 2) for x in os.getloadavg()]
    except OSError:  # pragma: no cover - no load average on this OS
        load = None
    block = {"slug": slugify(gpu) if gpu else machine_slug(cpu, flags, info.get("vendor_id")), "cpu": cpu,
             "flags": flags, "flags_checked": list(FLAGS), "cores": _cores(), "load_avg": load,
             "os": platform.platform()}
    if gpu:
        block["gpu"] = gpu
    return block


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def software() -> dict:
    return {"python": platform.python_version(), "torch": _version("torch"),
            "transformers": _version("transformers")}


def commit() -> dict:
    """HEAD of the checkout the benchmark ran from, and whether tracked files differed from it (a dirty tree
    means the numbers belong to code that no commit holds)."""
    def git(*args: str) -> str | None:
        try:
            res = subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return res.stdout.strip() if res.returncode == 0 else None

    sha = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no") if sha else None
    return {"sha": sha, "dirty": None if status is None else bool(status)}


def command(argv: list[str] | None = None) -> str:
    """The command as it was typed, with the script's path as it was run."""
    return "python " + shlex.join(sys.argv if argv is None else argv)


def default_path(benchmark: str, slug: str, variant: str | None = None) -> Path:
    return RESULTS / benchmark / f"{slug}{'-' + slugify(variant) if variant else ''}.json"


def add_arguments(ap, what: str = "the results") -> None:
    """--json and --variant, the same in every benchmark."""
    ap.add_argument("--json", type=Path, default=None,
                    help=f"write {what} here (default: docs/results/<benchmark>/<machine>[-<variant>].json)")
    ap.add_argument("--variant", default=None,
                    help="a suffix for the default results file, for another configuration on the same machine")


class Run:
    """One run of a benchmark: the metadata is taken when it starts (the load average then says what else was
    running), the payload when it is written."""

    def __init__(self, benchmark: str, argv: list[str] | None = None, gpu: str | None = None):
        self.benchmark = benchmark
        self.meta = {"benchmark": benchmark, "machine": machine(gpu), "software": software(), "commit": commit(),
                     "command": command(argv), "date": datetime.now(timezone.utc).isoformat(timespec="seconds")}

    def path(self, json_path: Path | None, variant: str | None = None, default: bool = True) -> Path | None:
        """`--json` when given; else the default results file, or None where the run is not one to keep
        (default=False: a smoke run, another parent)."""
        if json_path is not None:
            return json_path
        return default_path(self.benchmark, self.meta["machine"]["slug"], variant) if default else None

    def write(self, payload: dict, path: Path | None, machine_extra: dict | None = None, indent: int = 1) -> Path | None:
        """The metadata first, then the payload (whose keys must not shadow it); returns the path written."""
        if path is None:
            return None
        clash = set(payload) & set(KEYS)
        if clash:
            raise ValueError(f"payload keys {sorted(clash)} would hide the run's metadata")
        meta = json.loads(json.dumps(self.meta))
        meta["machine"].update(machine_extra or {})
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".partial")
        tmp.write_text(json.dumps({**meta, **payload}, indent=indent) + "\n")
        tmp.replace(path)
        return path
