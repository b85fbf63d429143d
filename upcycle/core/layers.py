"""Layer selections on the command line: one grammar for every option that names decoder layers, and the compact
form ("0-3,6") that messages print them in.

Grammar (case and spaces ignored): a word the option accepts, or a comma-separated list of indices and ranges.

- all: every candidate layer;  none: no layer;  auto: the first, middle and last candidate (eval's default);
- every:N: layers N-1, 2N-1, ... (like decoder_sparse_step);
- I or A-B: one layer or an inclusive range; a negative index counts from the end of the model's layers
  (-1 is the last, -4--1 the last four); empty items ("0,,2") are skipped.
"""

from __future__ import annotations

import re
from typing import Sequence

from upcycle.core.errors import UsageError

_ITEM = re.compile(r"(-?\d+)(?:-(-?\d+))?")


def format_ranges(xs: Sequence[int]) -> str:
    """[0, 1, 2, 5, 7, 8] -> "0-2,5,7-8" (xs sorted)."""
    out, i = [], 0
    while i < len(xs):
        j = i
        while j + 1 < len(xs) and xs[j + 1] == xs[j] + 1:
            j += 1
        out.append(str(xs[i]) if i == j else f"{xs[i]}-{xs[j]}")
        i = j + 1
    return ",".join(out)


def parse_layers(spec: str, num_layers: int, *, option: str, words: Sequence[str] = ("all", "every:N"),
                 candidates: Sequence[int] | None = None, what: str = "MoE layers") -> list[int]:
    """The sorted layer indices `spec` selects, out of `candidates` (default: all `num_layers` layers).

    `words` are the keywords this option accepts (they are also what its usage message lists). A list naming a
    layer outside 0..num_layers-1 is refused; with `candidates`, so is one that is not a candidate (`what`
    names them in the message). Without `candidates` a selection must name at least one layer.
    """
    pool = list(range(num_layers)) if candidates is None else sorted(candidates)
    s = spec.strip().lower()
    usage = f"{option} {spec!r}: use {', '.join(words)}{',' if len(words) > 1 else ''} or a list like 0,2,4-7"
    if s == "all" and "all" in words:
        return pool
    if s == "none" and "none" in words:
        return []
    if s == "auto" and "auto" in words:
        return sorted({pool[0], pool[len(pool) // 2], pool[-1]}) if pool else []
    if s.startswith("every:") and "every:N" in words:
        if not re.fullmatch(r"every:\d+", s):
            raise UsageError(usage)
        n = int(s.split(":")[1])
        if n < 1:
            raise UsageError(f"{option} every:N needs N >= 1")
        chosen = {i for i in range(num_layers) if (i + 1) % n == 0}
    else:
        chosen = set()
        for part in s.split(","):
            part = part.strip()
            if not part:
                continue
            m = _ITEM.fullmatch(part)
            if not m:
                raise UsageError(usage)
            a = int(m.group(1))
            b = int(m.group(2)) if m.group(2) is not None else a
            a, b = (x + num_layers if x < 0 else x for x in (a, b))
            if candidates is None and not (0 <= a <= b < num_layers):
                raise UsageError(f"{option} {spec!r}: layer {part} is outside 0..{num_layers - 1}")
            if b < a:
                raise UsageError(f"{option} {spec!r}: {part} is an empty range")
            chosen.update(range(a, b + 1))
    if candidates is not None:
        missing = sorted(chosen - set(pool))
        if missing:
            raise UsageError(f"{option}: {missing} are not {what} of this model ({what}: {format_ranges(pool)})")
    elif not chosen:
        raise UsageError(f"{option} {spec!r} selects no layer")
    return sorted(chosen)
