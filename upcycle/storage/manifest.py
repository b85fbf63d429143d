"""The manifest of a converted folder (upcycle.json): its format, reading and writing, and tensor digests.

upcycle.json holds everything needed to reproduce the bytes (tool version, every option, the seed) and to
trace each expert back to the parent: which intermediate neurons it was cut from, the factor on its down_proj,
and which of its neurons Drop-Upcycling re-drew. Convert writes it; train and eval read it (provenance, drift).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

MANIFEST = "upcycle.json"


def neuron_range(a: np.ndarray) -> dict | list:
    """A contiguous range as {start, stop}; anything else as the explicit list."""
    a = np.asarray(a)
    if a.size and np.array_equal(a, np.arange(a[0], a[0] + a.size)):
        return {"start": int(a[0]), "stop": int(a[0] + a.size)}
    return a.astype(int).tolist()


def _expand(n: dict | list) -> list[int]:
    if isinstance(n, dict):
        return list(range(n["start"], n["stop"]))
    return list(n)


# ------------------------------------------------------------------------------------------------ fingerprints
# What makes `upcycle eval` honest about provenance: a digest of the parent's tensors (is --parent the model this
# MoE came from?) and of the MoE's own tensors as written (has it been trained since?). A digest covers every
# tensor in name order as float32 values, so the same weights stored in bf16 and in fp32, or sharded differently,
# give the same digest. The output head is left out: writers store a tied head differently (or not at all).


DIGEST_WINDOW = 4096  # elements read at the start, middle and end of each tensor


def tensor_digest(source) -> str:
    """sha256 over (name, shape, float32 values of three windows) of every tensor of a TensorSource.

    Three windows of DIGEST_WINDOW elements per tensor instead of all of it: the digest then reads a few MB of a
    multi-GB checkpoint (convert stays near the speed of a copy, which reading everything back would double),
    and it still changes whenever training touched a tensor, because AdamW (decoupled weight decay included)
    moves every element of a tensor it updates. It is a fingerprint for provenance, not a checksum of the files.
    """
    import hashlib

    h = hashlib.sha256()
    for name in sorted(source.names()):
        if name == "lm_head.weight":
            continue
        meta = source.meta(name)
        h.update(f"{name}:{list(meta.shape)}:".encode())
        for window in _windows(source, name, meta):
            h.update(np.ascontiguousarray(window).tobytes())
    return h.hexdigest()


def _windows(source, name: str, meta) -> list[np.ndarray]:
    """The float32 values at the start, middle and end of a tensor (all of it when it is small)."""
    import os

    from upcycle.core.tensors import FLOAT_CODES, STORAGE, to_f32

    n = int(np.prod(meta.shape)) if meta.shape else 1
    w = DIGEST_WINDOW
    starts = [0] if n <= 3 * w else [0, (n - w) // 2, n - w]
    size = n if n <= 3 * w else w
    item = STORAGE[meta.dtype].itemsize
    where = source.byte_range(name)
    out = []
    if where is not None:
        path, offset, _ = where
        fd = os.open(path, os.O_RDONLY)
        try:
            for s0 in starts:
                raw = os.pread(fd, size * item, offset + s0 * item)
                out.append(np.frombuffer(raw, dtype=STORAGE[meta.dtype]))
        finally:
            os.close(fd)
    else:
        flat = source.read(name).reshape(-1)
        out = [flat[s0:s0 + size] for s0 in starts]
    return [to_f32(a, meta.dtype) if meta.dtype in FLOAT_CODES else a for a in out]


def folder_digest(folder: str | Path) -> str:
    """tensor_digest of a folder of safetensors files (a converted or trained MoE, a dense parent)."""
    from upcycle.storage.sources import SafetensorsSource

    src = SafetensorsSource(Path(folder))
    try:
        return tensor_digest(src)
    finally:
        src.close()


def model_digest(spec: str | Path, allow_pickle: bool = False) -> str | None:
    """tensor_digest of a model as `upcycle convert` reads a parent (folder, .gguf, ...), so that the digest of a dense
    parent equals the one its MoE's upcycle.json records; for a folder convert cannot read as a parent (an MoE), the
    folder_digest of its safetensors files; None when neither works."""
    from upcycle.storage.parent import open_parent
    from upcycle.core.errors import UpcycleError

    try:
        ckpt = open_parent(spec, allow_pickle=allow_pickle)
    except UpcycleError:
        p = Path(spec)
        if p.is_dir() and any(p.glob("*.safetensors")):
            return folder_digest(p)
        return None
    try:
        return tensor_digest(ckpt.source)
    finally:
        ckpt.close()


def write_manifest(folder: Path, data: dict) -> None:
    # Long neuron lists on one line each keep the file readable without bloating it.
    (folder / MANIFEST).write_text(json.dumps(data, indent=1) + "\n")


@dataclass
class Manifest:
    data: dict

    @property
    def parent(self) -> str:
        return self.data["parent"]["source"]

    @property
    def parent_digest(self) -> str | None:
        return self.data["parent"].get("tensors_sha256")

    @property
    def weights_digest(self) -> str | None:
        return self.data.get("weights_sha256")

    @property
    def recipe(self) -> dict:
        return self.data["recipe"]

    def _layer(self, layer: int) -> dict:
        for entry in self.data["layers"]:
            if entry["index"] == layer:
                return entry
        raise KeyError(f"layer {layer} is not in the manifest")

    def is_moe(self, layer: int) -> bool:
        return bool(self._layer(layer)["moe"])

    def expert_neurons(self, layer: int, expert: int) -> list[int]:
        return _expand(self._layer(layer)["experts"][expert]["neurons"])

    def expert_down_scale(self, layer: int, expert: int) -> float:
        return float(self._layer(layer)["experts"][expert]["down_scale"])

    def expert_reinit(self, layer: int, expert: int) -> list[int]:
        return list(self._layer(layer)["experts"][expert].get("reinit", []))

    def expert_source(self, layer: int, expert: int) -> str | None:
        """The --expert-from checkpoint an expert's neurons were read from; None: the parent."""
        j = self._layer(layer)["experts"][expert].get("source")
        return None if j is None else self.data["sources"][j]["source"]

    @property
    def mixed(self) -> bool:
        """Some experts come from checkpoints other than the parent (--expert-from)."""
        return any(not s.get("is_parent") for s in self.data.get("sources") or [])

    def shared_neurons(self, layer: int) -> list[int] | None:
        s = self._layer(layer).get("shared")
        return None if s is None else _expand(s["neurons"]) * int(s.get("copies", 1))


def read_manifest(folder: str | Path) -> Manifest | None:
    path = Path(folder) / MANIFEST
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError:
        return None
    return Manifest(data) if data.get("tool") == "upcycle" else None


