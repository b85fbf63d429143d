"""Memory honesty: what a command will need, estimated before anything is loaded, against what is available.

Available memory is probed, never assumed: MemAvailable from /proc/meminfo and, when the process runs in a
cgroup with a limit (containers, systemd slices, CI runners), that limit minus the cgroup's current usage; the
smaller wins. UPCYCLE_MEMORY_AVAILABLE (e.g. 4GiB) overrides the probe (for tests and for users who want a
margin). Estimates are sums of named parts (weights, gradients, AdamW states, activations, runtime) so that the
one-line refusal can say where the memory goes and which option reduces it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from upcycle.core.errors import UpcycleError
from upcycle.core.tensors import human_bytes, parse_size

# Resident size of a Python process once torch and transformers are imported (measured about 250 MB on
# Linux x86-64 with torch 2.x CPU and transformers 5; allocator slack added).
TORCH_RUNTIME = 320 << 20
NUMPY_RUNTIME = 60 << 20
TOKENIZER_RUNTIME = 64 << 20  # a tokenizer loaded through transformers' AutoTokenizer, on top of TORCH_RUNTIME
# torch, transformers, accelerate, the tokenizer and the data pipeline (train and eval)
MODEL_RUNTIME = 480 << 20
GiB = 1 << 30


class InsufficientMemory(UpcycleError):
    """The estimate of what a command needs exceeds the memory available; nothing was loaded."""


@dataclass(frozen=True)
class Estimate:
    what: str  # "convert", "train", "verification (whole model)", ...
    parts: tuple[tuple[str, int], ...]  # (label, bytes), summed
    reduce: tuple[str, ...] = ()  # options that lower the estimate, phrased for the user

    def __post_init__(self):
        if any(b < 0 for _, b in self.parts):
            raise ValueError(f"negative part in memory estimate {self.parts}")

    @property
    def total(self) -> int:
        return sum(b for _, b in self.parts)

    def describe(self) -> str:
        return ", ".join(f"{label} {human_bytes(b)}" for label, b in self.parts if b)

    def refusal(self, available: int, where: str) -> str:
        hint = f"; to reduce it: {'; '.join(self.reduce)}" if self.reduce else ""
        return (f"{self.what} needs about {human_bytes(self.total)} of memory ({self.describe()}), "
                f"{human_bytes(available)} is available ({where}){hint}")


# ------------------------------------------------------------------------------------------------ available

def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    if not text or text == "max":
        return None
    try:
        return int(text)
    except ValueError:
        return None


def _meminfo_available() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def _cgroup_headroom() -> int | None:
    """Limit minus usage of the tightest cgroup (v2 or v1) on this process's path, or None without a limit."""
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return None
    best = None
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, rel = parts
        if controllers == "":  # cgroup v2: walk up, a parent's limit binds too
            root = Path("/sys/fs/cgroup")
            p = root / rel.lstrip("/")
            while True:
                limit, used = _read_int(p / "memory.max"), _read_int(p / "memory.current")
                if limit is not None and used is not None:
                    best = min(best, limit - used) if best is not None else limit - used
                if p == root or root not in p.parents:
                    break
                p = p.parent
        elif "memory" in controllers.split(","):
            for base in (Path("/sys/fs/cgroup/memory") / rel.lstrip("/"), Path("/sys/fs/cgroup/memory")):
                limit = _read_int(base / "memory.limit_in_bytes")
                used = _read_int(base / "memory.usage_in_bytes")
                if limit is not None and used is not None and limit < (1 << 60):
                    best = min(best, limit - used) if best is not None else limit - used
                    break
    return None if best is None else max(best, 0)


def available() -> tuple[int, str]:
    """(bytes this process can still use, where that number comes from)."""
    override = os.environ.get("UPCYCLE_MEMORY_AVAILABLE")
    if override:
        try:
            return parse_size(override), "UPCYCLE_MEMORY_AVAILABLE"
        except ValueError:
            pass
    found = []
    mem = _meminfo_available()
    if mem is not None:
        found.append((mem, "MemAvailable"))
    cg = _cgroup_headroom()
    if cg is not None:
        found.append((cg, "cgroup limit"))
    if not found:
        return 1 << 62, "not measurable here"
    return min(found)


def require(estimate: Estimate, probed: tuple[int, str] | None = None) -> int:
    """Raise InsufficientMemory (one line) unless the estimate fits; return the bytes available. probed: what
    `available()` returned earlier in the same decision, so that one decision reads the memory once."""
    have, where = probed or available()
    if estimate.total > have:
        raise InsufficientMemory(estimate.refusal(have, where))
    return have


def peak_rss() -> int:
    """This process's peak resident set size so far, in bytes: VmHWM of its address space (getrusage's ru_maxrss
    would carry a parent's peak across fork and exec)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    import resource  # not Linux: the closest figure there is

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def release_unused() -> None:
    """Free what the stage that just ended left behind, so that it does not count in the next stage's RSS.

    Collects reference cycles (a trained model, its optimizer and accelerate's wrappers reference each other, so
    they outlive the call that made them until the cyclic collector runs, which in a large process can be much
    later), then asks glibc to hand freed heap pages back to the system (malloc_trim): tensors under its mmap
    threshold (32 MiB at most) live in the heap, which otherwise keeps its high-water mark.
    """
    import gc

    gc.collect()
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to trim
        pass
