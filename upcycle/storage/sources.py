"""Lazy tensor sources: read one tensor at a time, never a whole checkpoint.

Safetensors files are parsed here rather than memory-mapped: a mapping keeps every page it touched resident
(in RSS) until the file is closed, so a streamed conversion of a large model would look as big as the model.
Explicit positioned reads into a fresh buffer keep peak memory at the tensors actually in flight, and let us
detect a truncated or corrupt file with a precise message before anything is written.
"""

from __future__ import annotations

import json
import os
import struct
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import numpy as np

from upcycle.core.errors import InputError, UnsupportedError
from upcycle.core.tensors import FLOAT_CODES, STORAGE, nbytes

_MAX_HEADER = 100 * 1024 * 1024


@dataclass(frozen=True)
class TensorMeta:
    dtype: str  # safetensors code: F32, BF16, ...
    shape: tuple[int, ...]


class TensorSource:
    """Names, metadata and lazy reads of a checkpoint's tensors, in Hugging Face naming."""

    # Whether two threads may read at the same time (verification runs the parent in a thread beside the writer).
    thread_safe = False

    def names(self) -> Iterable[str]:
        raise NotImplementedError

    def meta(self, name: str) -> TensorMeta:
        raise NotImplementedError

    def read(self, name: str) -> np.ndarray:
        """The tensor in its storage type (BF16 as raw uint16), shaped."""
        raise NotImplementedError

    def __contains__(self, name: str) -> bool:
        raise NotImplementedError

    def close(self) -> None:
        pass

    def byte_range(self, name: str) -> tuple[Path, int, int] | None:
        """(file, offset, length) when the tensor's stored bytes sit verbatim in a file, else None."""
        return None

    def float_dtype(self) -> str:
        """The storage type of the checkpoint's floating weights (the most common one by bytes)."""
        weight: dict[str, int] = {}
        for n in self.names():
            m = self.meta(n)
            if m.dtype in FLOAT_CODES:
                weight[m.dtype] = weight.get(m.dtype, 0) + nbytes(m.dtype, m.shape)
        return max(weight, key=weight.get) if weight else "F32"


# ---------------------------------------------------------------------------------------------------- safetensors


@dataclass(frozen=True)
class _Entry:
    file: Path
    dtype: str
    shape: tuple[int, ...]
    start: int  # absolute file offset
    length: int


def read_safetensors_header(path: Path) -> dict[str, _Entry]:
    """Parse and validate one safetensors file's header; raise InputError naming the file if it is damaged."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise InputError(f"{path} is truncated or not a safetensors file (only {size} bytes)")
            (n,) = struct.unpack("<Q", head)
            if n > _MAX_HEADER or 8 + n > size:
                raise InputError(f"{path} is truncated or not a safetensors file (header length {n}, file {size} bytes)")
            raw = f.read(n)
    except OSError as exc:
        raise InputError(f"cannot read {path}: {exc.strerror}") from None
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise InputError(f"{path} is corrupt: its safetensors header is not valid JSON") from None
    if not isinstance(header, dict):
        raise InputError(f"{path} is corrupt: its safetensors header is not a JSON object")
    base = 8 + n
    entries: dict[str, _Entry] = {}
    data_end = 0
    for name, spec in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (begin, end) = spec["dtype"], tuple(int(d) for d in spec["shape"]), spec["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise InputError(f"{path} is corrupt: bad header entry for {name}") from None
        if dtype not in STORAGE:
            raise UnsupportedError(f"{path}: tensor {name} has dtype {dtype}, which upcycle does not read")
        if end - begin != nbytes(dtype, shape) or begin < 0:
            raise InputError(f"{path} is corrupt: tensor {name} has {end - begin} bytes for shape {list(shape)} {dtype}")
        data_end = max(data_end, end)
        entries[name] = _Entry(path, dtype, shape, base + begin, end - begin)
    if base + data_end > size:
        raise InputError(f"{path} is truncated: the header promises {base + data_end} bytes, the file has {size}")
    return entries


def _pread_into(fd: int, buf: memoryview, offset: int) -> None:
    done = 0
    while done < len(buf):
        got = os.preadv(fd, [buf[done:]], offset + done)
        if got <= 0:
            raise InputError(f"unexpected end of file while reading at offset {offset + done}")
        done += got


class SafetensorsSource(TensorSource):
    """All *.safetensors files of a folder (sharded through model.safetensors.index.json, or not)."""

    thread_safe = True  # positioned reads on shared descriptors; the descriptor table is filled under a lock

    def __init__(self, folder: Path):
        self.folder = folder
        index = folder / "model.safetensors.index.json"
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError):
                raise InputError(f"{index} is corrupt (no weight_map)") from None
            files = sorted({folder / f for f in weight_map.values()})
            missing = [f.name for f in files if not f.is_file()]
            if missing:
                raise InputError(f"{folder} is incomplete: missing shard(s) {', '.join(missing)}")
        else:
            files = sorted(folder.glob("*.safetensors"))
        if not files:
            raise InputError(f"{folder} holds no *.safetensors files")
        self._entries: dict[str, _Entry] = {}
        for f in files:
            self._entries.update(read_safetensors_header(f))
        self._fds: dict[Path, int] = {}
        self._lock = threading.Lock()

    def names(self):
        return self._entries.keys()

    def __contains__(self, name):
        return name in self._entries

    def meta(self, name):
        e = self._entries[name]
        return TensorMeta(e.dtype, e.shape)

    def byte_range(self, name):
        e = self._entries[name]
        return e.file, e.start, e.length

    def _fd(self, path: Path) -> int:
        fd = self._fds.get(path)
        if fd is None:
            with self._lock:
                fd = self._fds.get(path)
                if fd is None:
                    fd = self._fds[path] = os.open(path, os.O_RDONLY)
        return fd

    def read(self, name):
        e = self._entries[name]
        fd = self._fd(e.file)
        buf = np.empty(e.length, dtype=np.uint8)
        _pread_into(fd, memoryview(buf), e.start)
        return buf.view(STORAGE[e.dtype]).reshape(e.shape)

    def view(self, name):
        """The tensor as a read-only array over a memory map of its own bytes only (no copy).

        The map lives as long as the array or any view of it: its pages count in RSS until then, so a caller holds
        one tensor this way at a time (verification reads back the shards just written, which are in the page
        cache: mapping them is about twice as fast as copying them out)."""
        import mmap

        e = self._entries[name]
        if e.length == 0:
            return np.empty(e.shape, dtype=STORAGE[e.dtype])
        fd = self._fd(e.file)
        base = e.start - e.start % mmap.ALLOCATIONGRANULARITY
        mapped = mmap.mmap(fd, e.start + e.length - base, offset=base, access=mmap.ACCESS_READ)
        return np.frombuffer(mapped, dtype=STORAGE[e.dtype], count=e.length // STORAGE[e.dtype].itemsize,
                             offset=e.start - base).reshape(e.shape)

    def close(self):
        with self._lock:
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()


# ---------------------------------------------------------------------------------------------------- pickle


class PickleSource(TensorSource):
    """PyTorch .bin shards, read only when the user passed --allow-pickle (pickle can execute code)."""

    def __init__(self, folder: Path):
        import torch

        self._torch = torch
        index = folder / "pytorch_model.bin.index.json"
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            self._file_of = {k: folder / v for k, v in weight_map.items()}
        else:
            files = sorted(folder.glob("*.bin"))
            self._file_of = {}
            for f in files:
                for k in self._load(f):
                    self._file_of[k] = f
        self._cache_file: Path | None = None
        self._cache: dict = {}

    def _load(self, f: Path) -> dict:
        try:
            # weights_only refuses arbitrary objects; mmap keeps only touched tensors in memory.
            return self._torch.load(f, map_location="cpu", mmap=True, weights_only=True)
        except Exception as exc:  # torch raises many types for a bad pickle
            raise InputError(f"cannot read {f}: {str(exc).splitlines()[0]}") from None

    def _tensor(self, name):
        f = self._file_of[name]
        if f != self._cache_file:
            self._cache, self._cache_file = self._load(f), f
        return self._cache[name]

    def names(self):
        return self._file_of.keys()

    def __contains__(self, name):
        return name in self._file_of

    def meta(self, name):
        t = self._tensor(name)
        code = {"torch.float32": "F32", "torch.bfloat16": "BF16", "torch.float16": "F16"}.get(str(t.dtype), "F32")
        return TensorMeta(code, tuple(t.shape))

    def read(self, name):
        t = self._tensor(name)
        if t.dtype == self._torch.bfloat16:
            return t.contiguous().view(self._torch.int16).numpy().view(np.uint16).copy()
        return t.contiguous().numpy().copy()


# ---------------------------------------------------------------------------------------------------- GGUF

# llama.cpp's per-layer tensor names -> Hugging Face names (after the "model.layers.{i}." prefix).
_GGUF_LAYER = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_qkv": "self_attn.qkv_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_norm": "post_attention_layernorm",
    "post_attention_norm": "post_attention_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_GGUF_GLOBAL = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}


class GGUFSource(TensorSource):
    """A GGUF file, dequantized one tensor at a time to float32, renamed to Hugging Face names.

    llama.cpp stores q/k projections of llama-style models with their rotary halves interleaved; they are put
    back into Hugging Face order here (`permute_qk`), as transformers does when it loads such a file.
    phi3's fused gate/up projection is stored as ffn_up: it is renamed to mlp.gate_up_proj.
    """

    thread_safe = True  # reads dequantize from a read-only memory map; nothing is cached

    def __init__(self, path: Path, *, permute_qk: bool, num_heads: int, num_kv_heads: int, fused_gate_up: bool):
        try:
            from gguf import GGUFReader
        except ImportError:
            raise InputError("reading GGUF files needs the gguf package: pip install 'upcycle[gguf]'") from None
        try:
            self._reader = GGUFReader(str(path))
        except Exception as exc:  # gguf raises ValueError/struct.error/... on damaged files
            raise InputError(f"{path} is not a readable GGUF file: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None
        self._tensors = {}
        for t in self._reader.tensors:
            name = self._hf_name(t.name, fused_gate_up)
            if name is not None:
                self._tensors[name] = t
        self.permute_qk, self.num_heads, self.num_kv_heads = permute_qk, num_heads, num_kv_heads

    @staticmethod
    def _hf_name(name: str, fused_gate_up: bool) -> str | None:
        base, _, kind = name.rpartition(".")
        if base.startswith("blk."):
            _, layer, part = base.split(".", 2)
            hf = _GGUF_LAYER.get(part)
            if hf == "mlp.up_proj" and fused_gate_up:
                hf = "mlp.gate_up_proj"
            return f"model.layers.{layer}.{hf}.{kind}" if hf else None
        hf = _GGUF_GLOBAL.get(base)
        return f"{hf}.{kind}" if hf else None

    def names(self):
        return self._tensors.keys()

    def __contains__(self, name):
        return name in self._tensors

    def meta(self, name):
        t = self._tensors[name]
        # ggml lists dimensions fastest-first; numpy/HF order is the reverse.
        return TensorMeta("F32", tuple(int(d) for d in reversed(t.shape.tolist())))

    def read(self, name):
        from gguf import dequantize

        t = self._tensors[name]
        shape = self.meta(name).shape
        w = np.ascontiguousarray(dequantize(t.data, t.tensor_type), dtype=np.float32).reshape(shape)
        if self.permute_qk and (".self_attn.q_proj." in name or ".self_attn.k_proj." in name):
            heads = self.num_heads if ".q_proj." in name else self.num_kv_heads
            w = np.ascontiguousarray(w.reshape(heads, w.shape[0] // heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(shape))
        return w

    def close(self):
        # GGUFReader holds a numpy memmap; dropping the reader unmaps it.
        self._reader = None
