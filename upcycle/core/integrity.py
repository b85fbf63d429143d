"""Whether a model folder or checkpoint on disk is whole, checked before anything loads it.

Two checks, from cheap to thorough:

- `check_model_folder` (every local folder `load_causal_lm` opens, so train, eval and resume): each
  safetensors file's header is read (8 bytes of length, then the JSON) and the tensor data it promises must
  fit in the file; index-listed shards must exist; and where the folder has a `checksums.json`, every weights
  file must have its recorded size. It reads the headers only (kilobytes), so a truncated `model.safetensors` is
  one line instead of the traceback safetensors raises while transformers loads it.
- `checksum_problem(folder, hashes=True)`: the folder's `checksums.json` (written last by `write_checksums`, so
  a folder without it was never finished) against every file: size always, and with `hashes` the xxh3-64
  of each file. `upcycle train --resume` runs it with hashes on the checkpoint it resumes from.

xxh3-64 (the `xxhash` package, which `datasets` already needs; upcycle declares it too) runs near the speed the
file can be read: on a 500 MB file in the page cache, 0.21 s against 0.14 s for reading it without hashing and
1.49 s for hashlib's blake2b (docs/bench_checksums.json: a busy 2-core Xeon, benchmarks/bench_checksums.py).
At that rate a pass over a checkpoint of the SmolLM2 8 x top-2 MoE (692M fp32 parameters and their two AdamW
moments, 8.3 GB) takes about 3.5 s, paid when it is written and again on --resume (more where the disk reads
slower). The hash detects accidental damage (a copy cut short, a disk error), not tampering; that is what it is
for here.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

from upcycle.core.errors import InputError

CHECKSUMS = "checksums.json"
FORMAT = "upcycle.checksums/1"
HASH = "xxh3_64"
_CHUNK = 8 << 20
_MAX_HEADER = 100 * 1024 * 1024  # safetensors' own limit


def file_hash(path: Path) -> str:
    import xxhash

    h = xxhash.xxh3_64()
    buf = bytearray(_CHUNK)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            h.update(view[:n])
    return h.hexdigest()


def _files(folder: Path) -> list[str]:
    """Every file under `folder` but the checksums themselves, as POSIX paths relative to it, sorted."""
    found = []
    for dirpath, _, names in os.walk(folder):
        for name in names:
            rel = Path(dirpath, name).relative_to(folder).as_posix()
            if rel != CHECKSUMS and not rel.endswith(".tmp"):
                found.append(rel)
    return sorted(found)


def write_checksums(folder: Path) -> int:
    """Record the size and hash of every file of `folder` in folder/checksums.json, written last and atomically:
    a folder is complete only once the file is there. Returns the folder's size in bytes."""
    files = {}
    for rel in _files(folder):
        p = folder / rel
        files[rel] = {"size": p.stat().st_size, HASH: file_hash(p)}
    tmp = folder / (CHECKSUMS + ".tmp")
    tmp.write_text(json.dumps({"format": FORMAT, "hash": HASH, "files": files}, indent=1) + "\n")
    os.replace(tmp, folder / CHECKSUMS)
    return sum(f["size"] for f in files.values())


def read_checksums(folder: Path) -> dict | None:
    """The recorded files ({relative path: {"size", "xxh3_64"}}) or None where there is no usable checksums.json."""
    try:
        data = json.loads((folder / CHECKSUMS).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or data.get("format") != FORMAT or not isinstance(data.get("files"), dict):
        return None
    return data["files"]


def recorded_bytes(folder: Path) -> int | None:
    """The folder's size as its checksums.json records it (None without one)."""
    files = read_checksums(folder)
    return None if files is None else sum(int(f.get("size", 0)) for f in files.values())


def checksum_problem(folder: Path, *, hashes: bool, weights_only: bool = False) -> str | None:
    """What is wrong with `folder` against its checksums.json, in a few words (None: intact).

    Sizes are always compared; with `hashes` every file is read once more and hashed (see the module docstring).
    With `weights_only`, only the safetensors files and their index are compared: a README or config edited by
    hand does not make a model folder unloadable."""
    if not (folder / CHECKSUMS).is_file():
        return f"no {CHECKSUMS}, which is written last: unfinished, or written by an older upcycle"
    files = read_checksums(folder)
    if files is None:
        return f"{CHECKSUMS} is unreadable"
    if weights_only:
        files = {k: v for k, v in files.items() if k.endswith((".safetensors", ".safetensors.index.json"))}
    for rel, rec in files.items():
        p = folder / rel
        try:
            size = p.stat().st_size
        except OSError:
            return f"{rel} is missing"
        if size != rec.get("size"):
            return f"{rel} has {size} bytes, {CHECKSUMS} recorded {rec.get('size')}"
    if hashes:
        for rel, rec in files.items():
            try:
                digest = file_hash(folder / rel)
            except OSError as exc:
                return f"{rel} is unreadable ({exc.strerror})"
            if digest != rec.get(HASH):
                return f"{rel} does not match its recorded {HASH} hash"
    return None


def safetensors_problem(path: Path) -> str | None:
    """Whether one safetensors file is whole as far as its header tells (the header only is read)."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                return f"{path.name} is truncated ({size} bytes)"
            (n,) = struct.unpack("<Q", head)
            if n > _MAX_HEADER or 8 + n > size:
                return f"{path.name} is truncated or not a safetensors file (header of {n} bytes, file of {size})"
            raw = f.read(n)
    except OSError as exc:
        return f"{path.name} is unreadable ({exc.strerror})"
    try:
        header = json.loads(raw)
        end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
    except (ValueError, TypeError, KeyError, IndexError, AttributeError):
        return f"{path.name} is corrupt: its safetensors header is not valid"
    if 8 + n + end > size:
        return f"{path.name} is truncated: its header promises {8 + n + end} bytes, the file has {size}"
    return None


def check_model_folder(folder: Path) -> None:
    """Raise InputError (one line) when a local model folder's weights are visibly damaged; see the module
    docstring for what is read (headers and sizes, never the weights)."""
    folder = Path(folder)
    files = read_checksums(folder)
    if files is not None:
        problem = checksum_problem(folder, hashes=False, weights_only=True)
        if problem is not None:
            raise InputError(f"{folder} is damaged: {problem}")
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            raise InputError(f"{index} is corrupt (no weight_map)") from None
        missing = [s for s in shards if not (folder / s).is_file()]
        if missing:
            raise InputError(f"{folder} is incomplete: missing shard(s) {', '.join(missing)}")
        paths = [folder / s for s in shards]
    else:
        paths = sorted(folder.glob("*.safetensors"))
    for p in paths:
        problem = safetensors_problem(p)
        if problem is not None:
            raise InputError(f"{folder} is damaged: {problem}")
