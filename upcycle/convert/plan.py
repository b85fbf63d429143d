"""Plan, then execute: every output tensor's name, shape, type and producer, decided before a byte is written.

Knowing all shapes up front is what lets the writer stream: each shard's safetensors header is written
first, then tensors are produced and written one by one. The plan also gives --dry-run its numbers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Iterator

import numpy as np

from upcycle.families.parents import ParentSpec
from upcycle.families.moe import MoEType, TensorSpec
from upcycle.convert.recipe import Recipe
from upcycle.core.tensors import NAME_OF, nbytes
from upcycle.convert.weights import LayerLayout, ParentReader, WeightFactory, layer_layout


@dataclass
class OutTensor:
    name: str
    dtype: str
    shape: tuple[int, ...]
    produce: Callable[[], Iterator[np.ndarray]]  # chunks whose bytes, in order, are the tensor
    kind: str = "other"  # embed | attention | norm | router | expert | shared | dense_mlp | buffer
    layer: int | None = None
    # (file, offset, length) when the output bytes are a verbatim run of a parent file: copied in the kernel
    copy_from: tuple | None = None

    @property
    def nbytes(self) -> int:
        return nbytes(self.dtype, self.shape)

    @property
    def numel(self) -> int:
        return int(np.prod(self.shape)) if self.shape else 1


@dataclass
class Plan:
    parent: ParentSpec
    recipe: Recipe
    fmt: MoEType
    moe_layers: list[int]
    out_dtype: str  # safetensors code
    config: dict
    layouts: list[LayerLayout]
    tensors: list[OutTensor] = field(default_factory=list)
    sources: object = None  # upcycle.convert.mix.ExpertSources with --expert-from, else None
    grouping: object = None  # upcycle.convert.partition.Grouping where the neurons were grouped there, else None

    @property
    def output_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)

    @property
    def total_params(self) -> int:
        return sum(t.numel for t in self.tensors if t.kind != "buffer")

    @property
    def active_params(self) -> int:
        """Parameters a token touches: all but the routed experts it does not pick (embedding rows counted whole)."""
        per_expert = 3 * self.parent.hidden_size * (self.parent.intermediate_size // self.recipe.granularity)
        idle = (self.recipe.experts - self.recipe.top_k) * per_expert * len(self.moe_layers)
        return self.total_params - idle

    @property
    def mlp_share(self) -> float:
        """The fraction of the parent's MLP a token runs in an MoE layer: k routed and S shared slices of G (whole
        copies count once each: an exact recipe runs at least the whole MLP)."""
        r = self.recipe
        return (r.top_k + r.shared_experts) / r.granularity

    @property
    def flops_per_token(self) -> int:
        """Forward FLOPs per token of the weights a token multiplies, 2 per weight: the active parameters less the
        embedding lookup (the output head counts, tied or not). Attention over the context is left out: it grows with
        the context and is the same in the parent and the MoE."""
        return 2 * (self.active_params - self._lookup_params)

    @property
    def parent_flops_per_token(self) -> int:
        return 2 * (self.parent_params - self._lookup_params)

    @property
    def _lookup_params(self) -> int:
        """Embedding rows that are looked up, never multiplied: the input table, unless it is also the head."""
        p = self.parent
        return 0 if p.tie_word_embeddings else p.vocab_size * p.hidden_size

    @property
    def inexact_reason(self) -> str | None:
        """Why the converted model will not reproduce the parent (None: it will, to float32 noise)."""
        mixed = self.sources.inexact_reason if self.sources is not None else None
        return mixed or self.layout_inexact_reason

    @property
    def layout_inexact_reason(self) -> str | None:
        """Why the recipe itself (whatever the experts' sources) would not reproduce the parent it copies."""
        if self.recipe.inexact_reason:
            return self.recipe.inexact_reason
        if self.out_dtype == "F32":
            return None
        # a scale in config.json (routed_scaling_factor) stays a float32 number; one on down_proj is rounded
        scales = {o.down_scale for lay in self.layouts for o in lay.experts + ([lay.shared] if lay.shared else [])}
        bad = sorted(s for s in scales if not (s > 0 and math.frexp(s)[0] == 0.5))
        if bad:
            return f"the non-power-of-two scale {bad[0]:g} on down_proj is rounded in {NAME_OF[self.out_dtype]}"
        return None

    @property
    def parent_params(self) -> int:
        p = self.parent
        attn = p.hidden_size * p.head_dim * (2 * p.num_heads + 2 * p.num_kv_heads)
        attn += (p.num_heads + 2 * p.num_kv_heads) * p.head_dim * p.qkv_bias + p.hidden_size * p.o_bias
        qk = {None: 0, "head": 2 * p.head_dim, "full": (p.num_heads + p.num_kv_heads) * p.head_dim}[p.qk_norm]
        layer = attn + qk + 3 * p.hidden_size * p.intermediate_size + 2 * p.hidden_size
        emb = p.vocab_size * p.hidden_size * (1 if p.tie_word_embeddings else 2)
        return p.num_layers * layer + emb + p.hidden_size


def _one(f: Callable[[], np.ndarray]) -> Callable[[], Iterator[np.ndarray]]:
    return lambda: iter((f(),))


def make_plan(parent: ParentSpec, reader: ParentReader, recipe: Recipe, fmt: MoEType, moe_layers: list[int],
              out_dtype: str, router_bases: dict | None = None, sources=None, grouping=None) -> Plan:
    """sources: the ExpertSources of --expert-from (reader then reads their shared tensors: BASE or the mean).
    grouping: upcycle.convert.partition.Grouping, where the recipe groups the neurons by their weights or use."""
    p = parent
    from upcycle.core.tensors import NAME_OF

    config = fmt.build_config(p, recipe, moe_layers, NAME_OF[out_dtype])
    moe = set(moe_layers)
    layouts = [layer_layout(p, recipe, i, i in moe, fmt.shared_gate_factor, fmt.routed_scale_in_config,
                            grouping.order(i) if grouping is not None else None)
               for i in range(p.num_layers)]
    plan = Plan(p, recipe, fmt, moe_layers, out_dtype, config, layouts, sources=sources, grouping=grouping)
    expert_readers = None
    if sources is not None:
        # one small cache per source: an expert's three projections are read one after another
        expert_readers = [ParentReader(sources.source(j), p, cache_size=1) for j in range(len(sources.specs))]
    wf = WeightFactory(reader, recipe, out_dtype, router_bases, expert_readers)
    T = plan.tensors
    H = p.hidden_size

    def copy(name: str, kind: str, layer: int | None = None, src: str | None = None) -> None:
        src = src or name
        T.append(OutTensor(name, out_dtype, reader.shape(src), _one(lambda: wf.passthrough(src)), kind, layer,
                           wf.passthrough_range(src)))

    def zeros(name: str, shape: tuple, kind: str, layer: int | None, code: str | None = None) -> None:
        T.append(OutTensor(name, code or out_dtype, shape, _one(lambda: wf.zeros(shape, code)), kind, layer))

    copy("model.embed_tokens.weight", "embed")
    for i in range(p.num_layers):
        pre = f"model.layers.{i}."
        for proj in ("q", "k", "v"):
            copy(f"{pre}self_attn.{proj}_proj.weight", "attention", i)
        for proj in ("q", "k", "v"):
            name = f"{pre}self_attn.{proj}_proj.bias"
            if p.qkv_bias:
                copy(name, "attention", i)
            elif fmt.qkv_bias == "always":
                rows = (p.num_heads if proj == "q" else p.num_kv_heads) * p.head_dim
                zeros(name, (rows,), "attention", i)
        copy(f"{pre}self_attn.o_proj.weight", "attention", i)
        if p.o_bias:
            copy(f"{pre}self_attn.o_proj.bias", "attention", i)
        if p.qk_norm:
            copy(f"{pre}self_attn.q_norm.weight", "norm", i)
            copy(f"{pre}self_attn.k_norm.weight", "norm", i)
        if p.norm_style == "pre":
            copy(f"{pre}input_layernorm.weight", "norm", i)
            copy(f"{pre}post_attention_layernorm.weight", "norm", i)
        else:
            copy(f"{pre}post_attention_layernorm.weight", "norm", i)
            copy(f"{pre}post_feedforward_layernorm.weight", "norm", i)
        lay = layouts[i]
        if not lay.moe:
            for w in ("gate", "up", "down"):
                copy(f"{pre}mlp.{w}_proj.weight", "dense_mlp", i)
            continue
        _moe_tensors(T, plan, wf, lay, pre, out_dtype, H)
    copy("model.norm.weight", "norm")
    if not p.tie_word_embeddings:
        copy("lm_head.weight", "embed")
    return plan


def _moe_tensors(T: list, plan: Plan, wf: WeightFactory, lay: LayerLayout, pre: str, out: str, H: int) -> None:
    """The MoE layer's tensors, named and laid out by its MoE type, filled from the layout's expert origins."""
    fmt, r = plan.fmt, plan.recipe
    width = plan.parent.intermediate_size // r.granularity
    specs = fmt.moe_tensors(r.experts, width, r.shared_experts * width, H, lay.shared is not None)
    for spec in specs:
        T.append(_out_tensor(spec, wf, lay, pre + spec.name, out, H))


def _out_tensor(spec: TensorSpec, wf: WeightFactory, lay: LayerLayout, name: str, out: str, H: int) -> OutTensor:
    i, code = lay.index, spec.dtype or out
    if spec.source == "router":
        return OutTensor(name, code, spec.shape, _one(lambda: wf.router(i, H)), spec.kind, i)
    if spec.source == "zeros":
        return OutTensor(name, code, spec.shape, _one(lambda: wf.zeros(spec.shape, spec.dtype)), spec.kind, i)

    def origin(part):
        return lay.shared if part.expert < 0 else lay.experts[part.expert]

    def produce():
        for part in spec.parts:
            yield wf.expert(i, origin(part), part.which, part.expert)

    copy_from = None
    if spec.kind == "expert" and len(spec.parts) == 1:
        # an unscaled, unperturbed expert that is a run of whole parent rows is copied byte for byte
        part = spec.parts[0]
        copy_from = None if origin(part).reinit is not None else wf.expert_range(i, origin(part), part.which)
    return OutTensor(name, code, spec.shape, produce, spec.kind, i, copy_from)
