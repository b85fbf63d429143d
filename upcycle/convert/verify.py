"""Checking a converted folder against its parent, layer by layer, in float64, at about one layer of memory.

What is checked, all read back from the shards just written (never from what the writer held in memory):

* every tensor copied from the parent (embeddings, attention, norms, dense MLPs, and the zeros a format needs)
  is compared with the parent's tensor byte for byte, after the same dtype conversion;
* every routed and shared expert is compared byte for byte with the parent neurons the plan gives it (slice,
  down_proj scale, copies), so that a swapped pair, a wrong scale or a tiny error in an expert no prompt routes to
  is still found; the router and the formats' extra buffers are compared with what the plan draws from its seed;
* function: real text runs through the parent one decoder layer at a time (transformers' own layer, weights
  read from the parent's source in float64 and freed after use). At every MoE layer the parent MLP's input and
  output are kept, and the MoE block is rebuilt from the written tensors and config.json and run in float64 with
  the format's own routing rule (upcycle.families.moe.routing.select_experts: softmax/sigmoid, top-k, renormalised or
  not, routed_scaling_factor, shared experts and their gates, granitemoe's fused layout).

float64 keeps roundoff near 1e-15, so the bound on the function check (FUNCTION_RTOL, relative to the largest
MLP output) can be tight enough that a real error of 1e-6 relative in an expert is caught.

Where it costs: the parent's layers (and importing torch and transformers for them) run in a thread
(`ParentStates`) beside the writer and the byte checks when that adds little memory, and the byte checks run
first, so a layer's function check uses the expected weights they already derived. A recipe that is not
exact by design (drop:R, noise:STD, a non-power-of-two scale rounded to 16 bits) gets the measured differences
reported instead of a failure.

`verify_whole_model` is the older end-to-end check through plain transformers (both models in float32, logits
and greedy decoding); convert runs it only where its memory estimate fits (upcycle.convert.memory).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import numpy as np

from upcycle.convert.parent_pass import PROMPTS, ParentStates, f64
from upcycle.core.errors import VerificationError
from upcycle.core.tensors import from_f32, to_f32

FUNCTION_RTOL = 1e-9  # float64 roundoff is ~1e-15; an expert off by 1e-6 relative moves the output by far more
# A group scale that is not a power of two (e.g. 3 for groups of three slices) is stored pre-multiplied on down_proj
# and rounded once per weight: the function then moves by a few units of the storage type's roundoff.
STORED_SCALE_ROUNDINGS = 4
WHOLE_MODEL_RTOL = 1e-4  # float32 end to end: relative to the largest |logit|
COPIED_KINDS = ("embed", "attention", "norm", "dense_mlp")


# ------------------------------------------------------------------------------------------------ small helpers

def _rel(got: np.ndarray, want: np.ndarray, code: str) -> float:
    """max |got - want| / max |want|, in float64 (0 when both are empty)."""
    if got.size == 0:
        return 0.0
    a = to_f32(got, code).astype(np.float64)
    b = to_f32(want, code).astype(np.float64)
    scale = float(np.abs(b).max()) or 1.0
    return float(np.abs(a - b).max()) / scale


def _same_bytes(a: np.ndarray, b: np.ndarray) -> bool:
    if a.shape != b.shape or a.dtype.itemsize != b.dtype.itemsize:
        return False
    if a.size == 0:
        return True
    a, b = np.ascontiguousarray(a).reshape(-1).view(np.uint8), np.ascontiguousarray(b).reshape(-1).view(np.uint8)
    # compared as the widest words the length allows: fewer, larger comparisons (~30% faster on 32 MB)
    u = next(t for t in (np.uint64, np.uint32, np.uint16, np.uint8) if a.size % np.dtype(t).itemsize == 0)
    return bool(np.array_equal(a.view(u), b.view(u)))


# ------------------------------------------------------------------------------------------------ the check

class _Checker:
    def __init__(self, ckpt, plan, out: Path, exact: bool):
        from upcycle.storage.sources import SafetensorsSource
        from upcycle.convert.weights import ParentReader

        self.ckpt, self.plan, self.out, self.exact = ckpt, plan, Path(out), exact
        sources = plan.sources
        # copied tensors and shared experts: the parent's, or the mean with --average-shared; routed experts: the
        # neurons of their own --expert-from source, which are copied exactly even when the function is not. All
        # read through one-tensor memory maps where the source has them (no copy: these are only compared)
        self.reader = ParentReader(sources.shared_source if sources else ckpt.source, plan.parent, cache_size=2,
                                   mapped=True)
        self.expert_readers = ([ParentReader(sources.source(j), plan.parent, cache_size=1, mapped=True)
                                for j in range(len(sources.specs))] if sources else [])
        # experts copied from their neurons must hold exactly those, whether or not the function is the parent's (a
        # partition, a router that is not exact): only Drop-Upcycling and noise change them on purpose
        self.strict_experts = (exact or (sources is not None and plan.layout_inexact_reason is None)
                               or (sources is None and plan.recipe.expert_init_mode[0] == "copy"))
        self.written = SafetensorsSource(self.out)
        self.cfg = json.loads((self.out / "config.json").read_text())
        self.code = plan.out_dtype
        self.checked: set[str] = set()
        self.report: dict = {"method": "layers", "exact_expected": exact, "function_rtol": FUNCTION_RTOL,
                             "experts_from_sources": bool(sources),
                             "copied_tensors": 0, "expert_tensors": 0, "layers": [], "expert_max_rel_diff": 0.0,
                             "max_rel_diff": 0.0}
        self.by_name = {t.name: t for t in plan.tensors}

    def close(self) -> None:
        self.written.close()

    def _fail(self, msg: str) -> None:
        raise VerificationError(msg + "; nothing was written. Please report this with the command you ran")

    def _read(self, name: str) -> np.ndarray:
        self.checked.add(name)
        return self.written.view(name)

    # -------------------------------------------------------------------------------------------- bytes

    def copied_tensors(self) -> None:
        """Pass-through tensors: the parent's bytes after the same dtype conversion, or the zeros a format needs."""
        from upcycle.core.tensors import convert

        for t in self.plan.tensors:
            if t.kind not in COPIED_KINDS:
                continue
            if self.reader.has(t.name):
                want = convert(self.reader.raw(t.name), self.reader.code(t.name), t.dtype)
            else:  # e.g. qwen2_moe's q/k/v biases for a parent without them
                want = from_f32(np.zeros(t.shape, np.float32), t.dtype)
            got = self._read(t.name)
            if not _same_bytes(got, want):
                where = f"layer {t.layer}: " if t.layer is not None else ""
                self._fail(f"{where}{t.name} is not a byte copy of the parent's tensor "
                           f"(max relative difference {_rel(got, want, t.dtype):.3g})")
            self.report["copied_tensors"] += 1

    def planned_tensors(self, layer: int) -> None:
        """Router rows, selection biases and shared-expert gates: what the plan draws from the seed, byte for byte."""
        for t in self.plan.tensors:
            if t.layer != layer or t.kind not in ("router", "buffer") and not t.name.endswith("shared_expert_gate.weight"):
                continue
            want = np.concatenate([np.ascontiguousarray(c).reshape(-1) for c in t.produce()]).reshape(t.shape)
            got = self._read(t.name)
            if not _same_bytes(got, want):
                self._fail(f"layer {layer}: {t.name} is not what the plan draws for it "
                           f"(max relative difference {_rel(got, want, t.dtype):.3g})")
            if t.kind == "router" and not self.plan.recipe.partition:  # a partition's experts each have their row
                v = self.plan.recipe.group_size
                rows = got.reshape(t.shape[0] // v, v, -1)
                if not all(_same_bytes(rows[g, j], rows[g, 0]) for g in range(rows.shape[0]) for j in range(v)):
                    self._fail(f"layer {layer}: {t.name} has untied rows inside a virtual group of {v} experts")

    def _expected(self, mlp: dict, origin, which: str) -> np.ndarray:
        """The parent neurons an expert should hold, in the output dtype (down_proj times its scale)."""
        w, code = mlp[which]
        n = origin.neurons
        if n.size and np.array_equal(n, np.arange(n[0], n[0] + n.size)):
            n = slice(int(n[0]), int(n[0]) + n.size)  # a contiguous run: a view, not a gathered copy
        part = w[:, n] if which == "down" else w[n]
        if origin.copies > 1:
            part = np.concatenate([part] * origin.copies, axis=1 if which == "down" else 0)
        scaled = which == "down" and origin.down_scale != 1.0
        if code == self.code and not scaled:
            return part  # the stored values themselves: widening and narrowing again would give the same bytes
        part = to_f32(part, code)
        if scaled:
            # float64 product of two float32 values is exact, so one rounding to float32 follows
            part = (part.astype(np.float64) * origin.down_scale).astype(np.float32)
        return from_f32(part, self.code)

    def _part_locations(self, layer: int) -> dict:
        """{(which, expert): (tensor name, row of a fused 3-D tensor or None, slice of that row or None)}, taken
        from the type's own tensor layout (expert -1: the shared expert), so fused layouts need no special case."""
        fmt, r, p = self.plan.fmt, self.plan.recipe, self.plan.parent
        width = p.intermediate_size // r.granularity
        # has_shared=True even without shared experts: a type that insists on one writes it zero-width, and the
        # same names and (empty) slices then locate it for the zero-width check
        specs = fmt.moe_tensors(r.experts, width, r.shared_experts * width, p.hidden_size, True)
        where: dict = {}
        for spec in specs:
            if not spec.parts:
                continue
            name = f"model.layers.{layer}.{spec.name}"
            if len(spec.shape) == 3:  # (experts, rows, cols): each expert's row holds its parts one after another
                per = len(spec.parts) // spec.shape[0]
                rows = spec.shape[1] // per
                for i, part in enumerate(spec.parts):
                    k = i % per
                    where[(part.which, part.expert)] = (name, part.expert, slice(k * rows, (k + 1) * rows) if per > 1 else None)
            elif len(spec.parts) == 1:
                where[(spec.parts[0].which, spec.parts[0].expert)] = (name, None, None)
            else:  # a 2-D tensor of stacked parts (a fused shared expert)
                rows = spec.shape[0] // len(spec.parts)
                for i, part in enumerate(spec.parts):
                    where[(part.which, part.expert)] = (name, None, slice(i * rows, (i + 1) * rows))
        return where

    def _expert_names(self, locations: dict, e: int) -> dict:
        return {w: locations[(w, e)] for w in ("gate", "up", "down")}

    def _read_part(self, name: str, row: int | None, part: slice | None) -> np.ndarray:
        self.checked.add(name)
        a = self.written.view(name)
        a = a[row] if row is not None else a
        return a[part] if part is not None else a

    def _expert_jobs(self, layer: int, lay) -> list:
        """(expert, origin, {which: (tensor name, row, slice)}) for every routed expert and the shared one."""
        locations = self._part_locations(layer)
        jobs = [(e, o, self._expert_names(locations, e)) for e, o in enumerate(lay.experts)]
        if self.plan.fmt.shared is not None:
            jobs.append((-1, lay.shared, self._expert_names(locations, -1)))
        return jobs

    def _mlp_of(self, layer: int, origin, cache: dict) -> dict:
        """{which: (stored values, dtype code)} of the MLP of `layer` that `origin`'s neurons come from, read once per
        layer into cache["mlps"]: the parent's (the mean with --average-shared for a shared expert), or its own
        --expert-from source's."""
        mlps = cache.setdefault("mlps", {})
        if origin.source not in mlps:
            pre = f"model.layers.{layer}.mlp."
            reader = self.reader if origin.source is None else self.expert_readers[origin.source]
            mlps[origin.source] = {w: (reader.raw(f"{pre}{w}_proj.weight"), reader.code(f"{pre}{w}_proj.weight"))
                                   for w in ("gate", "up", "down")}
        return mlps[origin.source]

    def expert_bytes(self, layer: int, lay) -> tuple[set, dict]:
        """Byte check of every routed and shared expert of `layer` against the neurons it should hold (the parent's,
        or those of its --expert-from source).

        Returns the (expert, which) parts that differ (only where the recipe is not exact by design: otherwise a
        difference fails here) and the cache of expected parts, which `expert_weights` can reuse."""
        cache: dict = {}
        differ: set = set()
        worst = 0.0
        for e, origin, names in self._expert_jobs(layer, lay):
            label = f"expert {e}" if e >= 0 else "the shared expert"
            for which, (name, row, part) in names.items():
                got = self._read_part(name, row, part)
                if origin is None:  # a zero-width shared expert the format insists on
                    if got.size:
                        self._fail(f"layer {layer}: {name} should be zero-width, it has shape {list(got.shape)}")
                    continue
                key = (which, origin.slice_key, origin.down_scale, origin.copies)
                if key not in cache:
                    cache[key] = self._expected(self._mlp_of(layer, origin, cache), origin, which)
                want = cache[key]
                if not _same_bytes(got, want):
                    rel = _rel(got, want, self.code)
                    worst = max(worst, rel)
                    if self.strict_experts:
                        span = origin.neurons
                        whose = "parent" if origin.source is None else f"--expert-from {self.plan.sources.specs[origin.source]}"
                        self._fail(f"layer {layer}: {name} ({label}, {which}_proj) differs from the {whose} neurons "
                                   f"{int(span.min())}..{int(span.max())} it should hold (max relative difference {rel:.3g})")
                    differ.add((e, which))
                self.report["expert_tensors"] += 1
        self.report["expert_max_rel_diff"] = max(self.report["expert_max_rel_diff"], worst)
        return differ, cache

    def expert_weights(self, layer: int, lay, differ: set, cache: dict | None = None) -> dict:
        """{(expert, which): float64 weights} for the function check: the written bytes, taken from the expected
        parts where `expert_bytes` found them equal (one float64 copy serves every equal expert) and read back
        from the file where they differ."""
        cache = cache if cache is not None else {}
        weights: dict = {}
        for e, origin, names in self._expert_jobs(layer, lay):
            for which, (name, row, part) in names.items():
                if origin is None or (e, which) in differ:
                    weights[(e, which)] = f64(self._read_part(name, row, part), self.code)
                    continue
                key = (which, origin.slice_key, origin.down_scale, origin.copies)
                if ("f64", key) not in cache:
                    want = cache.get(key)
                    if want is None:
                        want = cache[key] = self._expected(self._mlp_of(layer, origin, cache), origin, which)
                    cache[("f64", key)] = f64(want, self.code)
                weights[(e, which)] = cache[("f64", key)]
        return weights

    def experts(self, layer: int, lay) -> dict:
        """Byte check of every routed and shared expert; returns {(expert, which): float64 weights} for the
        function check."""
        differ, cache = self.expert_bytes(layer, lay)
        return self.expert_weights(layer, lay, differ, cache)

    # -------------------------------------------------------------------------------------------- function

    def _routing(self, layer: int):
        from upcycle.families.moe.routing import MoELayer

        fmt, cfg, r = self.plan.fmt, self.cfg, self.plan.recipe
        scoring = fmt.scoring
        bias = None
        if fmt.selection_bias:
            bias = f64(self._read(f"model.layers.{layer}.{fmt.moe_prefix}.gate.e_score_correction_bias"), "F32")
        return MoELayer(
            index=layer, block=None, router=None, experts=None, num_experts=r.experts,
            top_k=int(cfg["num_experts_per_tok"]), scoring=scoring, selection_bias=bias,
            norm_topk_prob=bool(cfg.get("norm_topk_prob", True)) if scoring != "topk_softmax" else True,
            n_group=int(cfg.get("n_group") or 1) if scoring == "sigmoid" else 1,
            topk_group=int(cfg.get("topk_group") or 1) if scoring == "sigmoid" else 1,
            scale=float(cfg.get("routed_scaling_factor") or 1.0) if scoring == "sigmoid" else 1.0,
        )

    def moe_output(self, layer: int, x, weights: dict):
        """The MoE block rebuilt from the written tensors, run on x ([T, H] float64): (output, experts used, routing)."""
        import torch
        from transformers.activations import ACT2FN

        from upcycle.families.moe.routing import select_experts

        fmt = self.plan.fmt
        act = ACT2FN[self.cfg.get("hidden_act", "silu")]
        router_name = f"model.layers.{layer}.{fmt.moe_prefix}.{fmt.router_key}"
        w_router = f64(self._read(router_name), self.code)
        # identical router rows must give identical logits (they do in exact arithmetic): compute each once
        uniq, inverse = torch.unique(w_router, dim=0, return_inverse=True)
        logits = (x @ uniq.T)[:, inverse]
        info = self._routing(layer)
        gate_w, idx = select_experts(info, logits, info.selection_bias)

        def mlp(e: int, xs):
            return (act(xs @ weights[(e, "gate")].T) * (xs @ weights[(e, "up")].T)) @ weights[(e, "down")].T

        y = torch.zeros_like(x)
        used = sorted(int(e) for e in torch.unique(idx))
        # Experts that hold the very same float64 weights (byte-equal experts share one copy, see expert_weights)
        # compute the same function: each distinct set runs once, on the tokens that picked any of its experts,
        # times the sum of their routing weights. The same sum in another order: float64 roundoff, far below the
        # bound; an expert whose weights differ in any way has its own copy and runs alone.
        distinct: dict = {}
        for e in used:
            distinct.setdefault(tuple(id(weights[(e, w)]) for w in ("gate", "up", "down")), []).append(e)
        for members in distinct.values():
            picked = torch.isin(idx, torch.tensor(members, dtype=idx.dtype))  # [T, k]; a token picks an expert once
            tok = torch.nonzero(picked.any(dim=-1), as_tuple=True)[0]
            coef = (gate_w * picked).sum(dim=-1)[tok]
            y[tok] += mlp(members[0], x[tok]) * coef[:, None]
        if fmt.shared is not None:
            shared = mlp(-1, x)
            if fmt.shared == "gated":
                g = f64(self._read(f"model.layers.{layer}.mlp.shared_expert_gate.weight"), self.code)
                shared = torch.sigmoid(x @ g.T) * shared
            y = y + shared
        return y, used, info

    def moe_function(self, layer: int, x, y_ref, weights: dict) -> dict:
        """Run the MoE block rebuilt from the written tensors on the parent MLP's input; compare with its output."""
        y, used, info = self.moe_output(layer, x, weights)
        router_name = f"model.layers.{layer}.{self.plan.fmt.moe_prefix}.{self.plan.fmt.router_key}"
        scale = float(y_ref.abs().max()) or 1.0
        rel = float((y - y_ref).abs().max()) / scale
        bound = self.function_bound(layer)
        if self.exact and not rel <= bound:
            extra = f", routed_scaling_factor {info.scale:g} from config.json" if info.scoring == "sigmoid" else ""
            self._fail(f"layer {layer}: the MoE block rebuilt from {router_name} and its experts{extra} differs from the "
                       f"parent's MLP by {rel:.3g} relative (bound {bound:.3g}) on {x.shape[0]} tokens")
        return {"layer": layer, "max_rel_diff": rel, "bound": bound, "tokens": int(x.shape[0]), "experts_used": len(used)}

    def written_experts(self, layer: int) -> dict:
        """{(expert, which): float64 weights} of every routed (and shared) expert, read back from the written files."""
        weights = {}
        for (which, e), (name, row, part) in self._part_locations(layer).items():
            if e >= 0 or self.plan.fmt.shared is not None:
                weights[(e, which)] = f64(self._read_part(name, row, part), self.code)
        return weights

    def function_bound(self, layer: int) -> float:
        import math

        lay = next(x for x in self.plan.layouts if x.index == layer)
        origins = lay.experts + ([lay.shared] if lay.shared else [])
        if all(math.frexp(o.down_scale)[0] == 0.5 for o in origins):
            return FUNCTION_RTOL
        unit = {"F32": 2.0**-24, "BF16": 2.0**-9, "F16": 2.0**-11, "F64": 2.0**-53}[self.code]
        return FUNCTION_RTOL + STORED_SCALE_ROUNDINGS * unit

    def finish(self) -> dict:
        missing = [t.name for t in self.plan.tensors if t.name not in self.checked]
        if missing:  # a planned tensor no check looked at is a bug in this module, not in the output
            raise AssertionError(f"verification did not look at {len(missing)} tensor(s), e.g. {missing[0]}")
        return self.report


def verify_layers(ckpt, plan, out: Path, *, exact: bool, on_layer: Callable[[int], None] | None = None,
                  parent: ParentStates | None = None) -> dict:
    """Layer-by-layer float64 verification of the folder `out` just written from `ckpt` with `plan`.

    parent: the parent's MLP states, when the caller started them earlier (convert does, before writing);
    otherwise they are computed here, in a background thread where the parent's source allows it, while the
    byte checks run. A layer whose parent state is not there yet when its bytes are checked gets its function
    check later (its expected weights are then derived again from the parent)."""
    own = parent is None
    if own:
        from upcycle.convert.memory import overlap_parent

        # beside the byte checks only where it adds little memory (as convert decides); else first, in this thread
        parent = ParentStates(ckpt, plan, out, background=overlap_parent(plan, ckpt.source.thread_safe))
    chk = _Checker(ckpt, plan, out, exact)
    try:
        chk.copied_tensors()
        deferred = []

        def function(lay, differ: set, cache: dict | None) -> None:
            x, y = parent.get(lay.index)
            weights = chk.expert_weights(lay.index, lay, differ, cache)
            res = chk.moe_function(lay.index, x, y, weights)
            chk.report["layers"].append(res)
            chk.report["max_rel_diff"] = max(chk.report["max_rel_diff"], res["max_rel_diff"])
            if on_layer:
                on_layer(lay.index)

        for lay in plan.layouts:
            if not lay.moe:
                if on_layer:
                    on_layer(lay.index)
                continue
            chk.planned_tensors(lay.index)
            differ, cache = chk.expert_bytes(lay.index, lay)
            if parent.ready(lay.index):
                function(lay, differ, cache)
            else:
                deferred.append((lay, differ))
            del cache
        for lay, differ in deferred:
            function(lay, differ, None)
        chk.report["layers"].sort(key=lambda r: r["layer"])
        chk.report["tokens"] = parent.tokens
        if parent.mixed:  # experts from other checkpoints: how far the whole function moved, measured end to end
            import torch

            from upcycle.convert.verify_mix import measure_mixed

            hidden = parent.final_hidden()  # the parent run has ended: its layer is freed before the MoE's run
            threads = torch.get_num_threads()
            torch.set_num_threads(1)  # small operations on a few dozen tokens, as in the parent's run
            try:
                chk.report["mixed"] = measure_mixed(chk, ckpt, plan, parent.ids, parent.round_code, hidden)
            finally:
                torch.set_num_threads(threads)
        if plan.recipe.partition:  # what the partition costs in next-token loss, on text it was not fitted on
            from upcycle.convert.verify_heldout import measure_heldout

            chk.report["heldout"] = measure_heldout(chk, ckpt, plan)
        return chk.finish()
    finally:
        if own:
            parent.close()
        chk.close()


# ------------------------------------------------------------------------------------------------ whole model

def verify_whole_model(parent_spec: str, out: Path, *, out_dtype: str, exact: bool, max_new_tokens: int = 8,
                       allow_pickle: bool = False) -> dict:
    """Both models through plain transformers in float32: logits on the prompts and greedy decoding.

    When the MoE was stored in a lower precision the parent's weights are rounded through it first, so that what
    is measured is the conversion. The bound is relative to the largest |logit| (float32 noise grows with depth
    and logit size; the layer-wise float64 check is the exact one).
    """
    import torch

    from upcycle.core.loading import load_causal_lm, load_tokenizer

    torch.manual_seed(0)
    parent = load_causal_lm(parent_spec, dtype="float32", allow_pickle=allow_pickle)
    if out_dtype != "float32":
        low = getattr(torch, out_dtype)
        with torch.no_grad():
            for p in parent.parameters():
                p.copy_(p.to(low).to(torch.float32))
    moe = load_causal_lm(out, dtype="float32")
    tok = load_tokenizer(out)
    max_diff, max_logit, mean_num, tokens, agree, total, samples = 0.0, 0.0, 0.0, 0, 0, 0, []
    with torch.no_grad():
        for prompt in PROMPTS:
            ids = tok(prompt, return_tensors="pt").input_ids
            a = parent(ids).logits.float()
            b = moe(ids).logits.float()
            d = (a - b).abs()
            max_diff = max(max_diff, float(d.max()))
            max_logit = max(max_logit, float(a.abs().max()))
            mean_num += float(d.mean()) * ids.shape[1]
            tokens += ids.shape[1]
            kw = dict(max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tok.pad_token_id or tok.eos_token_id)
            ga = parent.generate(ids, attention_mask=torch.ones_like(ids), **kw)[0, ids.shape[1]:]
            gb = moe.generate(ids, attention_mask=torch.ones_like(ids), **kw)[0, ids.shape[1]:]
            n = min(len(ga), len(gb))
            # agreement counts the common prefix: after the first difference the contexts differ anyway
            same = 0
            while same < n and int(ga[same]) == int(gb[same]):
                same += 1
            agree += same
            total += max(len(ga), len(gb))
            samples.append({"prompt": prompt, "parent": tok.decode(ga), "moe": tok.decode(gb)})
    report = {
        "max_abs_diff": max_diff,
        "max_abs_logit": max_logit,
        "mean_abs_diff": mean_num / max(tokens, 1),
        "tokens": tokens,
        "greedy_agree": agree,
        "greedy_total": total,
        "exact_expected": exact,
        "tolerance": WHOLE_MODEL_RTOL,
        "samples": samples,
    }
    if exact and max_diff > WHOLE_MODEL_RTOL * max(max_logit, 1.0):
        raise VerificationError(
            f"the converted model does not reproduce the parent through transformers: max |logits diff| {max_diff:.3g} "
            f"> {WHOLE_MODEL_RTOL:g} x max |logit| {max_logit:.3g} for a recipe that should be exact; nothing was "
            f"written. Please report this with the command you ran"
        )
    return report



def summary(v: dict) -> str:
    """One or two sentences on what a verification report found (model card, convert's last lines)."""
    exact = v["exact_expected"]
    bound = max((e.get("bound", v["function_rtol"]) for e in v["layers"]), default=v["function_rtol"])
    mixed = v.get("mixed")
    if mixed is not None:
        experts = (f"{v['expert_tensors']} expert tensors hold the neurons of their --expert-from sources"
                   + ("" if not v["expert_max_rel_diff"] else f" up to a relative difference of {v['expert_max_rel_diff']:.3g}"))
    else:
        experts = (f"{v['expert_tensors']} expert tensors hold their parent neurons"
                   + ("" if exact or not v["expert_max_rel_diff"] else
                      f" up to a relative difference of {v['expert_max_rel_diff']:.3g}"))
    text = (f"layer by layer in float64 on {v['tokens']} tokens of text: {len(v['layers'])} MoE block(s) against the "
            f"parent's MLP, max relative difference {v['max_rel_diff']:.3g} "
            + (f"(bound {bound:.3g})" if exact else "(not exact by design: measured, not bounded)")
            + f"; {experts}; {v['copied_tensors']} copied tensors are byte-identical")
    held = v.get("heldout")
    if held is not None:
        text += (f". Next-token loss on {held['tokens']} tokens of held-out text ({held['text']}): parent "
                 f"{held['parent_loss']:.4f}, MoE {held['moe_loss']:.4f} ({held['diff']:+.4f} nats, 95% interval "
                 f"{held['ci95'][0]:+.4f} to {held['ci95'][1]:+.4f}); same top-1 token at {held['top1_agree']}/"
                 f"{held['tokens']} positions")
    if mixed is not None:
        text += (f". NOT the parent's function (experts from other checkpoints); end to end on the same "
                 f"{mixed['tokens']} tokens: max |logit difference| {mixed['max_abs_logit_diff']:.3g} "
                 f"({mixed['max_rel_logit_diff']:.3g} of the largest logit), mean KL(parent || MoE) "
                 f"{mixed['mean_kl']:.3g} nats, same top-1 token at {mixed['top1_agree']}/{mixed['tokens']} positions")
    w = v.get("whole_model")
    if w is not None:
        text += (f". Whole model through transformers (float32): max |logits diff| {w['max_abs_diff']:.3g}, greedy "
                 f"decoding agrees on {w['greedy_agree']}/{w['greedy_total']} tokens")
    elif v.get("whole_model_note"):
        text += f". {v['whole_model_note'][0].upper()}{v['whole_model_note'][1:]}"
    return text
