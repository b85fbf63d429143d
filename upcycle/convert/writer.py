"""Streaming safetensors writer and the atomic output folder.

A safetensors file is an 8-byte header length, a JSON header with every tensor's offsets, then the bytes.
Since the plan knows every shape in advance, the header of a shard is written first and the tensors follow
as they are produced: nothing larger than one tensor chunk is ever held, whatever the shard size.

The output is built in a hidden sibling folder and renamed onto OUT only when complete, so a crash, a kill or
a full disk never leaves an OUT that looks finished.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from upcycle.core.errors import OutputError
from upcycle.core.paths import check_output_folder
from upcycle.convert.plan import OutTensor
from upcycle.core.tensors import human_bytes


def assign_shards(tensors: list[OutTensor], max_shard_bytes: int) -> list[list[OutTensor]]:
    shards: list[list[OutTensor]] = [[]]
    size = 0
    for t in tensors:
        if shards[-1] and size + t.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += t.nbytes
    return shards


def shard_names(n: int) -> list[str]:
    if n == 1:
        return ["model.safetensors"]
    return [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]


def _header(tensors: list[OutTensor]) -> bytes:
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for t in tensors:
        header[t.name] = {"dtype": t.dtype, "shape": list(t.shape), "data_offsets": [offset, offset + t.nbytes]}
        offset += t.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-(8 + len(raw)) % 8)  # data starts 8-byte aligned, as the reference writer does
    return len(raw).to_bytes(8, "little") + raw


def _write_all(fd: int, data: memoryview) -> None:
    while data:
        n = os.write(fd, data)
        data = data[n:]


def _copy_range(src_fds: dict, fd: int, where: tuple) -> bool:
    """Copy a verbatim byte range from a parent file inside the kernel; False if the system cannot."""
    path, offset, length = where
    if not hasattr(os, "copy_file_range"):
        return False
    src = src_fds.get(path)
    if src is None:
        src = src_fds[path] = os.open(path, os.O_RDONLY)
    done = 0
    try:
        while done < length:
            n = os.copy_file_range(src, fd, length - done, offset + done)
            if n <= 0:
                break
            done += n
    except OSError as exc:
        if exc.errno in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.EBADF) and done == 0:
            return False
        raise
    if done != length:  # nothing partial may stay: rewind to where the tensor began
        os.lseek(fd, -done, os.SEEK_CUR)
        return False
    return True


def write_shards(folder: Path, tensors: list[OutTensor], max_shard_bytes: int,
                 on_tensor: Callable[[OutTensor], None] | None = None,
                 defer: Callable[[OutTensor], bool] | None = None,
                 before_deferred: Callable[[], None] | None = None) -> list[str]:
    """Write all tensors into safetensors shards under `folder` (plus the index when sharded).

    Tensors for which defer(t) is true keep their planned place in the files but are written last, after every
    other tensor of every shard (the writer skips over their bytes): their producers may wait for work that runs
    beside the writer, such as the k-means router. before_deferred() is called once before they are written."""
    shards = assign_shards(tensors, max_shard_bytes)
    names = shard_names(len(shards))
    weight_map: dict[str, str] = {}
    src_fds: dict = {}
    later: list[tuple[str, int, OutTensor]] = []  # (file, byte offset, tensor) of the deferred tensors
    for fname, shard in zip(names, shards):
        fd = os.open(folder / fname, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            header = _header(shard)
            _write_all(fd, memoryview(header))
            offset = len(header)
            for t in shard:
                weight_map[t.name] = fname
                if defer is not None and defer(t):
                    later.append((fname, offset, t))
                    os.lseek(fd, t.nbytes, os.SEEK_CUR)  # a hole until the tensor is written
                else:
                    if not (t.copy_from is not None and _copy_range(src_fds, fd, t.copy_from)):
                        _write_produced(fd, t)
                    if on_tensor:
                        on_tensor(t)
                offset += t.nbytes
            os.ftruncate(fd, offset)  # the full size even when the last tensor is deferred
        finally:
            os.close(fd)
    for src in src_fds.values():
        os.close(src)
    if later and before_deferred is not None:
        before_deferred()
    for fname, offset, t in later:
        fd = os.open(folder / fname, os.O_WRONLY)
        try:
            os.lseek(fd, offset, os.SEEK_SET)
            _write_produced(fd, t)
        finally:
            os.close(fd)
        if on_tensor:
            on_tensor(t)
    if len(shards) > 1:
        index = {"metadata": {"total_size": sum(t.nbytes for t in tensors)}, "weight_map": weight_map}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return names


def _write_produced(fd: int, t: OutTensor) -> None:
    written = 0
    for chunk in t.produce():
        chunk = np.ascontiguousarray(chunk)
        if chunk.size:
            _write_all(fd, memoryview(chunk).cast("B"))
        written += chunk.nbytes
    if written != t.nbytes:  # a planner/producer mismatch is a bug, never a user error
        raise AssertionError(f"{t.name}: produced {written} bytes, planned {t.nbytes}")


def check_output(out: Path, overwrite: bool) -> None:
    """The whole folder is replaced (see atomic_folder): refuse a non-empty one unless overwrite."""
    check_output_folder(out, overwrite=overwrite, parents=False)


def check_space(out: Path, need: int) -> None:
    free = shutil.disk_usage(out.resolve().parent).free
    if free < need:
        raise OutputError(f"not enough disk space for {out}: need {human_bytes(need)}, {human_bytes(free)} free")


def _remove_stale_partials(out: Path) -> None:
    """Partial folders left by killed runs (their process is gone) are removed before a new attempt."""
    for p in out.parent.glob(f".{out.name}.upcycle-partial-*"):
        try:
            pid = int(p.name.rsplit("-", 1)[1])
            os.kill(pid, 0)
        except ProcessLookupError:
            shutil.rmtree(p, ignore_errors=True)
        except (ValueError, PermissionError):
            continue


@contextmanager
def atomic_folder(out: Path, overwrite: bool) -> Iterator[Path]:
    """Yield a temporary sibling folder; on success it replaces `out`, on any failure it is removed."""
    out = Path(out)
    _remove_stale_partials(out)
    tmp = out.with_name(f".{out.name}.upcycle-partial-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=False)
    try:
        yield tmp
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
            raise OutputError(f"the disk filled up while writing {out}; nothing was left behind") from None
        raise
    old = None
    if out.exists():
        if any(out.iterdir()) and not overwrite:  # appeared while we worked
            shutil.rmtree(tmp, ignore_errors=True)
            raise OutputError(f"{out} is not empty; pass --overwrite to replace it")
        old = out.with_name(f".{out.name}.upcycle-old-{os.getpid()}")
        os.rename(out, old)
    os.rename(tmp, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
