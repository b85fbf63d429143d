"""Experts from several dense checkpoints (Branch-Train-MiX; mergekit-moe's main use).

`upcycle convert BASE OUT --expert-from A --expert-from B` builds the MoE layout exactly as a plain upcycle would,
but the MLP neurons behind each routed expert are read from one of the sources instead of from BASE: the recipe's
E/v whole copies (v = slices per virtual group) are split into equal, contiguous runs, one run per source in the
order given (Recipe.expert_source). Everything that is not a routed expert (attention, norms, embeddings, the
MLPs of dense layers, shared experts) comes from BASE, or with --average-shared from the element-wise mean over
BASE and the distinct sources (computed in float64, stored in float32 before the output dtype).

All of this is decided from headers and config files before a weight is read: a source of another architecture,
or one whose tensors do not have BASE's names and shapes, is refused in one line naming the first difference.
A source that is BASE itself (the same file) is not opened again, so with every source equal to BASE the
conversion is, byte for byte, the plain upcycle.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from upcycle.storage.sources import TensorMeta, TensorSource
from upcycle.core.errors import InputError, UpcycleError
from upcycle.core.tensors import FLOAT_CODES, to_f32

# What must agree, besides every tensor's name and shape, for a source's MLP to be an expert of BASE's MoE.
SAME_ARCHITECTURE = ("num_layers", "num_heads", "num_kv_heads", "head_dim", "hidden_act", "qkv_bias", "o_bias", "qk_norm",
                     "norm_style", "tie_word_embeddings")


class MeanSource(TensorSource):
    """The element-wise mean of each tensor over several checkpoints with the same names and shapes.

    Floating tensors are summed in float64 (exact for float32 inputs) and divided once, then stored as float32:
    the mean of identical tensors is the tensor itself, bit for bit.
    """

    def __init__(self, sources: list[TensorSource]):
        self.sources = sources

    def names(self):
        return self.sources[0].names()

    def __contains__(self, name):
        return name in self.sources[0]

    def meta(self, name):
        m = self.sources[0].meta(name)
        return TensorMeta("F32", m.shape) if m.dtype in FLOAT_CODES else m

    def read(self, name):
        first = self.sources[0].meta(name)
        if first.dtype not in FLOAT_CODES:
            return self.sources[0].read(name)
        total = np.zeros(first.shape, np.float64)
        for s in self.sources:
            total += to_f32(s.read(name), s.meta(name).dtype)
        return (total / len(self.sources)).astype(np.float32)


def _natural(name: str) -> tuple:
    """Sort key that puts model.layers.10 after model.layers.9: the first mismatch is the one a reader expects."""
    return tuple(int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name))


def check_same_architecture(base, other, label: str) -> None:
    """Raise InputError (one line) unless `other` has BASE's architecture and every BASE tensor, same shape."""
    b, o = base.spec, other.spec
    if o.model_type != b.model_type:
        raise InputError(f"--expert-from {label} is a {o.model_type} model and the parent is {b.model_type}: every "
                         "source must have the parent's architecture")
    for name in sorted(base.source.names(), key=_natural):
        if name not in other.source:
            raise InputError(f"--expert-from {label} has no tensor {name}, which the parent has: every source must "
                             "have the parent's tensors")
        want, got = base.source.meta(name).shape, other.source.meta(name).shape
        if tuple(want) != tuple(got):
            raise InputError(f"--expert-from {label}: tensor {name} has shape {list(got)}, the parent's has "
                             f"{list(want)}: every source must have the parent's shapes")
    for key in SAME_ARCHITECTURE:
        if getattr(o, key) != getattr(b, key):
            raise InputError(f"--expert-from {label} has {key} {getattr(o, key)!r} and the parent {getattr(b, key)!r}: "
                             "every source must have the parent's architecture")


def _identity(path: Path):
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_dev, st.st_ino


@dataclass
class ExpertSources:
    """The opened --expert-from sources (metadata only) and where every non-expert tensor comes from."""

    base: object  # the parent's ParentCheckpoint
    specs: tuple[str, ...]  # as given, one per --expert-from
    checkpoints: list = field(default_factory=list)  # distinct opened sources that are not BASE
    of_spec: tuple[int, ...] = ()  # per spec: index into checkpoints, or -1 for BASE itself
    average: bool = False
    _mean: MeanSource | None = None

    @property
    def all_base(self) -> bool:
        """Every source is the parent's own file: the conversion is the plain upcycle."""
        return all(i < 0 for i in self.of_spec)

    def source(self, j: int) -> TensorSource:
        """The tensors of the j-th --expert-from source."""
        i = self.of_spec[j]
        return self.base.source if i < 0 else self.checkpoints[i].source

    @property
    def shared_source(self) -> TensorSource:
        """Where every tensor that is not a routed expert comes from: BASE, or the mean with --average-shared."""
        if not self.average or not self.checkpoints:
            return self.base.source
        if self._mean is None:
            self._mean = MeanSource([self.base.source, *(c.source for c in self.checkpoints)])
        return self._mean

    @property
    def averaged_over(self) -> int:
        """How many distinct checkpoints the non-expert weights are averaged over (1: BASE's own)."""
        return 1 + len(self.checkpoints) if self.average else 1

    @property
    def inexact_reason(self) -> str | None:
        if self.all_base:
            return None
        others = sorted({self.specs[j] for j, i in enumerate(self.of_spec) if i >= 0})
        why = f"experts come from {len(others)} checkpoint(s) other than the parent ({', '.join(others)})"
        if self.average:
            why += f", and the other weights are the mean over {self.averaged_over} checkpoints (--average-shared)"
        return why

    def describe(self) -> str:
        """One line for the plan: which experts each source gives and where the other weights come from."""
        return "; ".join(f"{s}{' (the parent)' if self.of_spec[j] < 0 else ''}" for j, s in enumerate(self.specs))

    @property
    def shared_from(self) -> str:
        if self.averaged_over > 1:
            return f"the mean over the parent and {len(self.checkpoints)} distinct source(s)"
        return "the parent"

    def close(self) -> None:
        for c in self.checkpoints:
            c.close()


def open_sources(base, specs: tuple[str, ...], *, average: bool, allow_pickle: bool = False) -> ExpertSources:
    """Open every --expert-from source (headers and config only) and check it against the parent."""
    from upcycle.storage.parent import open_parent

    base_id = _identity(Path(base.gguf or base.folder))
    mix = ExpertSources(base, tuple(specs), average=average)
    seen: dict = {}
    of_spec = []
    try:
        for spec in specs:
            ident = _identity(Path(spec).expanduser())
            if ident is not None and ident == base_id:
                of_spec.append(-1)
                continue
            if ident is not None and ident in seen:
                of_spec.append(seen[ident])
                continue
            try:
                ckpt = open_parent(spec, allow_pickle=allow_pickle)
            except UpcycleError as exc:
                raise type(exc)(f"--expert-from {spec}: {exc}") from None
            mix.checkpoints.append(ckpt)
            check_same_architecture(base, ckpt, spec)
            index = len(mix.checkpoints) - 1
            if ident is not None:
                seen[ident] = index
            of_spec.append(index)
    except BaseException:
        mix.close()
        raise
    mix.of_spec = tuple(of_spec)
    return mix


# ------------------------------------------------------------------------------------------------ prompts file

def load_prompts(path: Path, specs: tuple[str, ...]) -> list[list[str]]:
    """The texts of each --expert-from source (in spec order) from a JSON or YAML mapping {source: [texts]}.

    A key names a source as it was given to --expert-from, or any path to the same file or folder (relative
    paths are read from the current directory, as on the command line). Every problem is one InputError line.
    """
    where = f"--router-init prompts: {path}"
    if not path.is_file():
        raise InputError(f"{where}: no such file")
    text = path.read_text(errors="replace")
    try:
        if path.suffix.lower() == ".json":
            data = json.loads(text)
        else:
            import yaml  # YAML is a superset of JSON: .yaml, .yml and anything else

            data = yaml.safe_load(text)
    except Exception as exc:  # json and yaml raise many types for a bad file
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InputError(f"{where} is not valid {'JSON' if path.suffix.lower() == '.json' else 'YAML'}: {first}") from None
    if not isinstance(data, dict) or not data:
        raise InputError(f"{where} must map each --expert-from source to a list of example texts")

    def ident(s: str):
        return _identity(Path(s).expanduser())

    texts: list[list[str] | None] = [None] * len(specs)
    for key, value in data.items():
        key = str(key)
        hits = [j for j, s in enumerate(specs) if s == key]
        if not hits and ident(key) is not None:
            hits = [j for j, s in enumerate(specs) if ident(s) == ident(key)]
        if not hits:
            raise InputError(f"{where} names {key!r}, which is not an --expert-from source (sources: {', '.join(specs)})")
        items = [value] if isinstance(value, str) else value
        if not isinstance(items, list) or not all(isinstance(t, str) for t in items):
            raise InputError(f"{where}: the texts for {key!r} must be a list of strings")
        items = [t for t in items if t.strip()]
        if not items:
            raise InputError(f"{where}: the source {key!r} has no texts (an empty list or only blank strings)")
        for j in hits:
            if texts[j] is not None:
                raise InputError(f"{where} gives texts for the source {specs[j]!r} twice")
            texts[j] = items
    missing = [specs[j] for j, t in enumerate(texts) if t is None]
    if missing:
        raise InputError(f"{where} gives no texts for the --expert-from source {missing[0]!r}; every source needs some")
    return texts  # type: ignore[return-value]


def source_entries(mix: ExpertSources, digest) -> list[dict]:
    """upcycle.json's `sources`: every --expert-from source as given, its tensor digest, whether it is the parent."""
    digests: dict = {}
    out = []
    for j, spec in enumerate(mix.specs):
        i = mix.of_spec[j]
        if i not in digests:
            digests[i] = digest(mix.source(j))
        out.append({"source": spec, "is_parent": i < 0, "tensors_sha256": digests[i]})
    return out
