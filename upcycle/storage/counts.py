"""Parameter counts of a checkpoint on disk, from file headers only (memory estimates read them before loading)."""

from __future__ import annotations

from pathlib import Path


def parameter_counts(spec: str, *, allow_pickle: bool = False) -> tuple[dict[str, int], dict]:
    """({tensor name: parameters}, config) of a model folder or .gguf file, from file headers only."""
    import json

    p = Path(spec)
    if p.suffix.lower() == ".gguf":
        from upcycle.storage.parent import open_parent

        ckpt = open_parent(p)
        try:
            counts = {n: numel(ckpt.source.meta(n).shape) for n in ckpt.source.names()}
            return counts, dict(ckpt.spec.raw)
        finally:
            ckpt.close()
    from upcycle.storage.sources import PickleSource, SafetensorsSource

    if not (p / "config.json").is_file():  # a hub id: nothing to read before it is fetched
        return {}, {}
    cfg = json.loads((p / "config.json").read_text())
    source = SafetensorsSource(p) if any(p.glob("*.safetensors")) else PickleSource(p) if allow_pickle else None
    if source is None:
        return {}, cfg
    try:
        return {n: numel(source.meta(n).shape) for n in source.names()}, cfg
    finally:
        source.close()


def numel(shape) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


