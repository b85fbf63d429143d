"""What a checkpoint's checksums cost: hashing a file of --size bytes with the hash upcycle uses (xxh3-64, the
`xxhash` package) against reading it without hashing and against hashlib's blake2b and sha256, then the two calls
`upcycle train` makes on a checkpoint folder holding that file: `write_checksums` (after every checkpoint) and
`checksum_problem(hashes=True)` (on --resume; sizes only, hashes=False, when a model folder is loaded).

The file is random bytes written by the script, so it is in the page cache when read: the numbers are the CPU's
cost (the case right after a checkpoint is written). A file read cold from disk adds the disk's read time to every
row alike, and the hash no longer shows where the disk is slower than xxh3. Each row: median of --repeats.

    python benchmarks/bench_checksums.py [--size 500M] [--repeats 5] [--dir /tmp]

The results go to docs/results/bench_checksums/<machine>.json unless --json says otherwise (benchmarks/_results.py).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from _results import Run, add_arguments  # noqa: E402


def _size(text: str) -> int:
    mult = {"K": 10**3, "M": 10**6, "G": 10**9}
    return int(float(text[:-1]) * mult[text[-1].upper()]) if text[-1].upper() in mult else int(text)


def _read(path: Path, update) -> None:
    buf = bytearray(8 << 20)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            update(view[:n])


def _median_s(fn, repeats: int) -> float:
    fn()  # the file into the page cache, the code warm
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="500M", help="bytes of the test file (K, M, G suffixes)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--dir", type=Path, default=None, help="where to write the test file (default: a temp folder)")
    add_arguments(ap)
    args = ap.parse_args(argv)
    record = Run("bench_checksums", argv=None if argv is None else [sys.argv[0], *argv])

    import xxhash

    from upcycle.core.integrity import checksum_problem, write_checksums

    size = _size(args.size)
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        folder = Path(tmp) / "checkpoint"
        folder.mkdir()
        path = folder / "model.safetensors"
        with open(path, "wb") as f:
            left = size
            while left:
                n = min(left, 64 << 20)
                f.write(os.urandom(n))
                left -= n
        cases = {
            "read only": lambda: _read(path, lambda b: None),
            "xxh3_64 (xxhash)": lambda: _read(path, xxhash.xxh3_64().update),
            "blake2b (hashlib)": lambda: _read(path, hashlib.blake2b().update),
            "sha256 (hashlib)": lambda: _read(path, hashlib.sha256().update),
            "write_checksums": lambda: write_checksums(folder),
            "checksum_problem, hashes": lambda: checksum_problem(folder, hashes=True),
            "checksum_problem, sizes only": lambda: checksum_problem(folder, hashes=False),
        }
        rows = []
        for name, fn in cases.items():
            s = _median_s(fn, args.repeats)
            rows.append({"case": name, "s": s, "mb_per_s": size / 1e6 / s})
            print(f"{name:<30} {s * 1e3:9.1f} ms  {size / 1e6 / s:9.0f} MB/s")

    record.write({"xxhash": xxhash.VERSION, "bytes": size, "repeats": args.repeats, "page_cache": "warm",
                  "rows": rows}, record.path(args.json, args.variant))


if __name__ == "__main__":
    main()
