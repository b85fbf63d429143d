"""Producing the MoE's weights from the parent's, one tensor at a time (numpy, no torch).

`ParentReader` gives the parent's tensors under canonical Llama-style names, splitting phi3's fused
projections, and keeps only the current layer's MLP in memory. `WeightFactory` turns them into expert,
shared-expert and router weights following the recipe:

* experts are neuron slices of the MLP (rows of gate/up, columns of down); down_proj carries the routed scale
  (Recipe.routed_scale) so that the routing weights of the picked groups add back up to exactly one MLP, unless
  the MoE type carries it in its config (routed_scaling_factor);
* Drop-Upcycling re-draws a ratio R of each expert's neurons from a normal with the mean and std of the
  parent matrix it replaces (Nakamura et al. 2025); noise adds N(0, STD) to every expert weight;
* every random draw comes from its own generator seeded by (seed, layer, expert, purpose), so the bytes
  written do not depend on the order in which tensors are produced.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np

from upcycle.families.parents import ParentSpec
from upcycle.convert.recipe import Recipe
from upcycle.storage.sources import TensorSource
from upcycle.core.tensors import convert, from_f32, to_f32

# purposes, for seeding
_PERM, _ROUTER, _DROP, _NOISE = 1, 2, 3, 4


def rng(seed: int, *keys: int) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, *keys])))


class ParentReader:
    """The parent's tensors by canonical name, with phi3's fused projections split on the fly."""

    def __init__(self, source: TensorSource, spec: ParentSpec, cache_size: int = 4, mapped: bool = False):
        """mapped: read through the source's memory map of one tensor (`view`) where it has one: no copy, and the
        arrays are read-only (for callers that only compare)."""
        self.source, self.spec = source, spec
        self._cache: OrderedDict[str, np.ndarray] = OrderedDict()
        self._cache_size = cache_size
        self._load = source.view if mapped and hasattr(source, "view") else source.read

    def _read(self, name: str) -> np.ndarray:
        if name in self._cache:
            self._cache.move_to_end(name)
            return self._cache[name]
        a = self._load(name)
        self._cache[name] = a
        if len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)
        return a

    def code(self, name: str) -> str:
        return self.source.meta(self._fused(name)[0] if self._fused(name) else name).dtype

    def _fused(self, name: str):
        """(fused source name, row range) for a canonical name living inside a fused tensor, else None."""
        a = self.spec.arch
        if a.fused_qkv and ".self_attn." in name and name.rsplit(".", 2)[-2] in ("q_proj", "k_proj", "v_proj"):
            prefix, proj, kind = name.rsplit(".", 2)
            hd, q, kv = self.spec.head_dim, self.spec.num_heads, self.spec.num_kv_heads
            bounds = {"q_proj": (0, q * hd), "k_proj": (q * hd, (q + kv) * hd), "v_proj": ((q + kv) * hd, (q + 2 * kv) * hd)}
            return f"{prefix}.qkv_proj.{kind}", bounds[proj]
        if a.fused_gate_up and name.endswith(("mlp.gate_proj.weight", "mlp.up_proj.weight")):
            inter = self.spec.intermediate_size
            prefix = name.rsplit(".", 2)[0]
            return f"{prefix}.gate_up_proj.weight", (0, inter) if "gate_proj" in name else (inter, 2 * inter)
        return None

    def has(self, name: str) -> bool:
        f = self._fused(name)
        return (f[0] if f else name) in self.source

    def shape(self, name: str) -> tuple[int, ...]:
        f = self._fused(name)
        if f:
            full = self.source.meta(f[0]).shape
            return (f[1][1] - f[1][0], *full[1:])
        return self.source.meta(name).shape

    def raw(self, name: str) -> np.ndarray:
        f = self._fused(name)
        if f:
            lo, hi = f[1]
            return self._read(f[0])[lo:hi]
        return self._read(name)

    def f32(self, name: str) -> np.ndarray:
        return to_f32(self.raw(name), self.code(name))

    def byte_range(self, name: str, rows: tuple[int, int] | None = None):
        """Where the bytes of `name` (or of its rows lo:hi) lie verbatim in a parent file, if they do."""
        f = self._fused(name)
        src = f[0] if f else name
        where = self.source.byte_range(src)
        if where is None:
            return None
        path, offset, length = where
        shape = self.source.meta(src).shape
        row_bytes = length // shape[0] if shape and shape[0] else length
        lo, hi = (0, shape[0]) if shape else (0, 1)
        if f:
            lo, hi = f[1]
        if rows is not None:
            lo, hi = lo + rows[0], lo + rows[1]
        return path, offset + lo * row_bytes, (hi - lo) * row_bytes


@dataclass
class ExpertOrigin:
    """Where one expert's weights come from: parent neurons, the down_proj factor, and re-drawn neurons."""

    neurons: np.ndarray  # indices into the parent's intermediate dimension
    down_scale: float
    reinit: np.ndarray | None = None  # positions (within the expert) re-drawn by Drop-Upcycling
    copies: int = 1  # shared experts holding whole MLP copies repeat the neurons this many times
    slice_key: object = None  # experts with equal slice_key (and no re-drawn neurons) have equal weights
    source: int | None = None  # the --expert-from source (its position) the neurons are read from; None: the parent


@dataclass
class LayerLayout:
    index: int
    moe: bool
    experts: list[ExpertOrigin] = field(default_factory=list)
    shared: ExpertOrigin | None = None


def layer_layout(spec: ParentSpec, recipe: Recipe, layer: int, moe: bool, shared_gate_factor: float,
                 routed_scale_in_config: bool = False, order: np.ndarray | None = None) -> LayerLayout:
    """Which neurons and scale each expert of `layer` gets (no weights touched).

    With routed_scale_in_config the format multiplies routed outputs itself (routed_scaling_factor), so the
    experts keep the parent's weights unscaled: exact in bf16 even when the group scale is not a power of two.
    order: the neurons in slice order where upcycle.convert.partition grouped them (clustered, or a partition's
    shared neurons first); else the slice order gives it (contiguous, or a seeded permutation).
    """
    if not moe:
        return LayerLayout(layer, False)
    inter, g, s = spec.intermediate_size, recipe.granularity, recipe.shared_experts
    width = inter // g
    if order is not None:
        perm = np.asarray(order)
    elif recipe.slice_order == "contiguous":
        perm = np.arange(inter)
    else:
        perm = rng(recipe.seed, layer, _PERM).permutation(inter)
    slices = perm.reshape(g, width)
    v = recipe.group_size
    first_routed = s if 0 < s < g else 0
    mode, ratio = recipe.expert_init_mode
    experts = []
    for e in range(recipe.experts):
        neurons = slices[first_routed + e % v]
        reinit = None
        if mode == "drop":
            k = int(round(ratio * width))
            reinit = np.sort(rng(recipe.seed, layer, e, _DROP).choice(width, size=k, replace=False))
        scale = 1.0 if routed_scale_in_config else recipe.routed_scale
        src = recipe.expert_source(e)
        key = first_routed + e % v if src is None else (src, first_routed + e % v)
        experts.append(ExpertOrigin(neurons, scale, reinit, slice_key=key, source=src))
    shared = None
    if s:
        c = recipe.shared_full_copies
        neurons = perm if c else slices[:s].reshape(-1)
        shared = ExpertOrigin(neurons, recipe.shared_down_scale * shared_gate_factor, copies=max(c, 1), slice_key="shared")
    return LayerLayout(layer, True, experts, shared)


def _layer_prefix(i: int) -> str:
    return f"model.layers.{i}."


class WeightFactory:
    """Makes output tensors (in the output storage type) from the parent, caching within one layer."""

    def __init__(self, reader: ParentReader, recipe: Recipe, out_code: str, router_bases: dict[int, np.ndarray] | None = None,
                 expert_readers: list[ParentReader] | None = None):
        self.reader, self.recipe, self.out = reader, recipe, out_code
        self.router_bases = router_bases or {}
        self.expert_readers = expert_readers or []  # one per --expert-from source, in the order given
        self._layer: int | None = None
        # the current layer's MLP in float32, per source (None: the parent); at most two at a time, since the
        # experts of one source are written one after another
        self._mlps: OrderedDict[int | None, dict[str, np.ndarray]] = OrderedDict()
        self._stats: dict[tuple, tuple[float, float]] = {}
        self._copies: dict[tuple, np.ndarray] = {}

    def reader_of(self, origin: ExpertOrigin) -> ParentReader:
        return self.reader if origin.source is None else self.expert_readers[origin.source]

    # -------------------------------------------------------------------------------------------- plain tensors

    def passthrough_range(self, name: str):
        """Byte range to copy verbatim for a pass-through tensor, when no conversion is needed."""
        return self.reader.byte_range(name) if self.reader.code(name) == self.out else None

    def expert_range(self, layer: int, origin: ExpertOrigin, which: str):
        """Byte range for an expert tensor that is an unscaled, unperturbed run of whole parent rows."""
        mode, _ = self.recipe.expert_init_mode
        if mode != "copy" or origin.copies != 1 or which == "down" and origin.down_scale != 1.0:
            return None
        name = f"model.layers.{layer}.mlp.{which}_proj.weight"
        reader = self.reader_of(origin)
        if reader.code(name) != self.out:
            return None
        n = origin.neurons
        inter = reader.spec.intermediate_size
        if which == "down":
            # down_proj is (H, I): only the whole matrix is contiguous
            return reader.byte_range(name) if n.size == inter and np.array_equal(n, np.arange(inter)) else None
        if n.size and np.array_equal(n, np.arange(n[0], n[0] + n.size)):
            return reader.byte_range(name, rows=(int(n[0]), int(n[0]) + n.size))
        return None

    def passthrough(self, name: str) -> np.ndarray:
        return convert(self.reader.raw(name), self.reader.code(name), self.out)

    def zeros(self, shape: tuple[int, ...], code: str | None = None) -> np.ndarray:
        return from_f32(np.zeros(shape, np.float32), code or self.out)

    # -------------------------------------------------------------------------------------------- MLP pieces

    def _load_layer(self, layer: int, origin: ExpertOrigin) -> dict[str, np.ndarray]:
        if self._layer != layer:
            self._layer, self._copies, self._stats = layer, {}, {}
            self._mlps.clear()
        if origin.source in self._mlps:
            self._mlps.move_to_end(origin.source)
        else:
            if len(self._mlps) >= 2:
                self._mlps.popitem(last=False)
            p = _layer_prefix(layer) + "mlp."
            reader = self.reader_of(origin)
            self._mlps[origin.source] = {w: reader.f32(f"{p}{w}_proj.weight") for w in ("gate", "up", "down")}
        return self._mlps[origin.source]

    def _stat(self, mlp: dict, source: int | None, which: str, scale: float) -> tuple[float, float]:
        key = (source, which, scale)
        if key not in self._stats:
            w = mlp[which]
            self._stats[key] = (float(w.mean()) * (scale if which == "down" else 1.0), float(w.std()) * (scale if which == "down" else 1.0))
        return self._stats[key]

    def expert(self, layer: int, origin: ExpertOrigin, which: str, expert: int) -> np.ndarray:
        """gate (I_e, H), up (I_e, H) or down (H, I_e) of one routed or shared expert, in the output type."""
        mode, value = self.recipe.expert_init_mode
        # Only routed experts are perturbed: breaking the symmetry between copies is the point, and the
        # always-on shared expert has no copy to differ from (expert < 0 marks it).
        randomised = expert >= 0 and ((mode == "drop" and origin.reinit is not None and len(origin.reinit)) or mode == "noise")
        key = (layer, which, origin.slice_key, origin.down_scale, origin.copies)
        if not randomised and key in self._copies:
            return self._copies[key]
        mlp = self._load_layer(layer, origin)
        w = mlp[which]
        full = origin.neurons.size == w.shape[0 if which != "down" else 1] and np.array_equal(origin.neurons, np.arange(origin.neurons.size))
        if which == "down":
            part = w if full else w[:, origin.neurons]
            if origin.down_scale != 1.0:
                part = part * np.float32(origin.down_scale)
        else:
            part = w if full else w[origin.neurons]
        if origin.copies > 1:
            part = np.concatenate([part] * origin.copies, axis=1 if which == "down" else 0)
        if randomised:
            part = np.array(part, dtype=np.float32, copy=True)
            if mode == "drop":
                mean, std = self._stat(mlp, origin.source, which, origin.down_scale)
                g = rng(self.recipe.seed, layer, expert, _DROP, ("gate", "up", "down").index(which) + 1)
                pos = origin.reinit
                if which == "down":
                    part[:, pos] = g.normal(mean, std, size=(part.shape[0], pos.size)).astype(np.float32)
                else:
                    part[pos] = g.normal(mean, std, size=(pos.size, part.shape[1])).astype(np.float32)
            else:
                g = rng(self.recipe.seed, layer, expert, _NOISE, ("gate", "up", "down").index(which) + 1)
                part += g.normal(0.0, value, size=part.shape).astype(np.float32)
        out = from_f32(part, self.out)
        if not randomised:
            self._copies[key] = out
        return out

    def router(self, layer: int, hidden: int) -> np.ndarray:
        """(E, H): one base row per copy, repeated over its virtual group so that groups are picked whole; a
        partition's experts differ, so each has its own row (fitted, or drawn)."""
        r = self.recipe
        base = self.router_bases.get(layer)
        if r.partition:
            if base is None:
                base = rng(r.seed, layer, _ROUTER).normal(0.0, r.router_std, size=(r.experts, hidden)).astype(np.float32)
            return from_f32(np.asarray(base, dtype=np.float32), self.out)
        if base is None and r.zero_router:
            base = np.zeros((r.copies, hidden), np.float32)
        elif base is None:
            base = rng(r.seed, layer, _ROUTER).normal(0.0, r.router_std, size=(r.copies, hidden)).astype(np.float32)
        rows = np.repeat(base, r.group_size, axis=0)
        return from_f32(rows, self.out)
