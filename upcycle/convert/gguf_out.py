"""`upcycle convert PARENT OUT.gguf`: the MoE as one GGUF file that llama.cpp runs, from a GGUF parent.

Why not go through a Hugging Face folder and llama.cpp's own converter: that path dequantizes (a Q4_1 parent becomes
an f32 or re-quantized MoE, a different function from the parent file the user runs), and the engines' converters
are where merged MoEs break. Here the parent's bytes are kept:

* every tensor that is not an MLP projection (embeddings, attention, norms) is copied byte for byte, and so is the
  parent's metadata (tokenizer, chat template, rope and norm settings); only the feed-forward keys change;
* each MLP becomes `ffn_{gate,up,down}_exps`: every expert is a run of the parent's own quant blocks. gate/up are
  sliced by rows (whole rows are whole blocks, so any neuron subset is byte-exact); down_proj is sliced along its
  rows, where a block holds 32 (or, for K-quants, 256) consecutive neurons, so a fine-grained slice is byte-exact
  only when it starts and ends on block boundaries; anything else is refused with the reason;
* the router `ffn_gate_inp` is added in float32, its rows tied within each virtual group as in the folder output;
* the group factor of fine-grained experts (every picked slice gets 1/G of its copy's weight) cannot be applied
  to quantized bytes exactly, so it is stored as llama.cpp's per-expert output scale `ffn_down_exps.scale` (an
  f32 multiplier applied after the expert's down projection) and the expert bytes stay the parent's.

The output types are the parent's own (the default: the MoE then computes the quantized parent's function in
llama.cpp, not an approximation of it), or f32/f16/bf16/q8_0 on request (every 2-D tensor dequantized and, for the
last three, rounded or re-quantized; 1-D tensors stay f32). A re-typed MoE computes what the parent re-typed the same
way computes; `retype_dense` writes that dense reference.

Which parent architectures have an MoE counterpart in llama.cpp that this writer produces is `TARGETS`; every other
MoE output type is refused with the reason (`GGUF_REFUSED`).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from upcycle.core.errors import InputError, OutputError, UnsupportedError, UsageError, VerificationError
from upcycle.core.events import SILENT, Events

GGUF_TYPES = ("auto", "f32", "f16", "bf16", "q8_0")

# The Hugging Face MoE type whose layout (router rows, expert slices, scales) each llama.cpp target follows, by the
# parent's GGUF architecture name. llama.cpp runs a mixtral as its `llama` architecture with expert tensors.
TARGETS: dict[str, tuple[str, str]] = {"llama": ("mixtral", "llama")}

# Output types that llama.cpp has no loader for, or whose llama.cpp loader needs tensors a dense parent cannot give
# without changing the function (docs/compatibility.md gives the same reasons with the loader files).
GGUF_REFUSED = {
    "qwen2_moe": "llama.cpp's qwen2moe wants an untied output.weight, a shared expert with its sigmoid gate, NEOX rope "
                 "order, and never renormalises top-k weights; this writer does not rebuild a llama parent that way",
    "qwen3_moe": "llama.cpp's qwen3moe normalises q and k per head (attn_q_norm/attn_k_norm), which this parent lacks",
    "granitemoe": "not written as GGUF by this tool (llama.cpp's granitemoe adds embedding/residual/logit multipliers)",
    "granitemoeshared": "not written as GGUF by this tool (llama.cpp's granitemoe adds embedding/residual/logit "
                        "multipliers and a shared expert)",
    "dots1": "llama.cpp's dots1 requires a shared expert and a selection bias (exp_probs_b)",
    "glm4_moe": "llama.cpp's glm4moe requires a selection bias (exp_probs_b) and a post-attention norm",
    "flex_olmo": "llama.cpp has no FlexOlmo architecture",
}

_MLP = ("gate", "up", "down")


def _gguf():
    try:
        import gguf
    except ImportError:
        raise InputError("writing GGUF files needs the gguf package: pip install 'upcycle[gguf]'") from None
    return gguf


def is_gguf_path(path: str | Path) -> bool:
    return Path(path).suffix.lower() == ".gguf"


@dataclass(frozen=True)
class OutTensor:
    name: str
    shape: tuple[int, ...]  # numpy order (slowest first), in elements
    qtype: object  # gguf.GGMLQuantizationType
    nbytes: int
    chunks: Callable[[], Iterator[np.ndarray]]  # byte arrays whose concatenation is the tensor
    kind: str  # copy | expert | router | scale


@dataclass
class GGUFResult:
    out: Path
    parent: Path
    arch: str
    moe_type: str
    out_type: str  # auto (the parent's own types) | f32 | f16 | bf16 | q8_0
    experts: int
    top_k: int
    granularity: int
    tensors: int
    output_bytes: int
    parent_bytes: int
    expert_types: dict[str, int]  # ggml type name -> number of expert tensors
    seconds: float
    phases: dict[str, float] = field(default_factory=dict)
    verification: dict | None = None
    router: str = ""


# --------------------------------------------------------------------------------------------------- reading


def _open_reader(path: Path):
    gguf = _gguf()
    if not path.is_file():
        raise InputError(f"no such GGUF file: {path}")
    try:
        return gguf.GGUFReader(str(path))
    except Exception as exc:  # gguf raises ValueError/struct.error/... on damaged files
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise InputError(f"{path} is not a readable GGUF file: {msg}") from None


def _field(reader, key: str, default=None):
    f = reader.fields.get(key)
    if f is None:
        return default
    return f.contents()


def _arch_enum(name: str):
    gguf = _gguf()
    for arch, arch_name in gguf.MODEL_ARCH_NAMES.items():
        if arch_name == name:
            return arch
    raise UnsupportedError(f"GGUF architecture {name!r} is unknown to the installed gguf package")


def _name_table(arch, n_layers: int) -> dict[str, tuple[object, int | None]]:
    """GGUF tensor base name (without .weight/.bias) -> (MODEL_TENSOR, layer), from gguf's own name tables."""
    gguf = _gguf()
    table = {}
    for t in gguf.MODEL_TENSORS[arch]:
        fmt = gguf.TENSOR_NAMES[t]
        if "{bid}" in fmt:
            for i in range(n_layers):
                table[fmt.format(bid=i)] = (t, i)
        else:
            table[fmt] = (t, None)
    return table


def _row_bytes(qtype, ne0: int) -> int:
    gguf = _gguf()
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    return ne0 // block * size


def _raw(t) -> np.ndarray:
    """A reader tensor's stored bytes as a flat uint8 view (no copy)."""
    return np.asarray(t.data).reshape(-1).view(np.uint8)


def _rows(t) -> np.ndarray:
    """A 2-D reader tensor's bytes as (rows, row bytes)."""
    ne0 = int(t.shape[0])
    return _raw(t).reshape(-1, _row_bytes(t.tensor_type, ne0))


def _f32(t) -> np.ndarray:
    """A reader tensor dequantized to float32, in numpy order."""
    gguf = _gguf()
    shape = tuple(int(d) for d in reversed(t.shape.tolist()))
    return np.ascontiguousarray(gguf.dequantize(t.data, t.tensor_type), dtype=np.float32).reshape(shape)


# --------------------------------------------------------------------------------------------------- output types


def _target_qtype(out_type: str, parent_qtype, ndim: int):
    gguf = _gguf()
    Q = gguf.GGMLQuantizationType
    if out_type == "auto":
        return parent_qtype
    if ndim < 2:
        return Q.F32  # norms stay f32 in every type, as llama.cpp's own converter keeps them
    return {"f32": Q.F32, "f16": Q.F16, "bf16": Q.BF16, "q8_0": Q.Q8_0}[out_type]


def _file_type(out_type: str, parent_file_type):
    gguf = _gguf()
    F = gguf.LlamaFileType
    if out_type == "auto":
        return parent_file_type
    return {"f32": F.ALL_F32, "f16": F.MOSTLY_F16, "bf16": F.MOSTLY_BF16, "q8_0": F.MOSTLY_Q8_0}[out_type]


def _encode(values: np.ndarray, qtype) -> np.ndarray:
    """float32 values (numpy order) in a ggml type, as bytes."""
    gguf = _gguf()
    if qtype in _block_types() and values.shape[-1] % gguf.GGML_QUANT_SIZES[qtype][0]:
        raise UnsupportedError(f"rows of {values.shape[-1]} values cannot be stored as {qtype.name}, whose blocks "
                               f"hold {gguf.GGML_QUANT_SIZES[qtype][0]}")
    return np.ascontiguousarray(gguf.quants.quantize(np.ascontiguousarray(values, np.float32), qtype)).reshape(-1).view(np.uint8)


def _block_types():
    gguf = _gguf()
    return {q for q, (block, _) in gguf.GGML_QUANT_SIZES.items() if block > 1}


def _tensor_bytes(t, qtype) -> np.ndarray:
    """The whole parent tensor in `qtype`: its own bytes when the type is unchanged."""
    if qtype == t.tensor_type:
        return _raw(t)
    return _encode(_f32(t), qtype)


# --------------------------------------------------------------------------------------------------- slicing


def _down_blocks(neurons: np.ndarray, block: int) -> np.ndarray | None:
    """Indices of the parent's down_proj blocks (along a row) that make up these neurons, in order, or None when
    the neurons do not fall on whole aligned blocks."""
    if neurons.size % block:
        return None
    runs = neurons.reshape(-1, block)
    starts = runs[:, 0]
    if np.any(starts % block) or not np.array_equal(runs, starts[:, None] + np.arange(block)):
        return None
    return starts // block


class _Layer:
    """One parent layer's MLP in the output types, kept while its experts are written."""

    def __init__(self, tensors: dict[str, object], qtypes: dict[str, object]):
        self.t, self.q = tensors, qtypes
        self._bytes: dict[str, np.ndarray] = {}

    def rows(self, which: str) -> np.ndarray:
        """(rows, row bytes) of the projection in its output type."""
        if which not in self._bytes:
            t = self.t[which]
            data = _tensor_bytes(t, self.q[which])
            self._bytes[which] = data.reshape(int(t.shape[1]), -1)
        return self._bytes[which]


def _expert_chunks(layer: _Layer, which: str, origins: list, block: int) -> Iterator[np.ndarray]:
    rows = layer.rows(which)
    for o in origins:
        if which != "down":
            yield np.ascontiguousarray(rows[o.neurons])
            continue
        idx = _down_blocks(o.neurons, block)
        per_block = rows.shape[1] * block // int(layer.t["down"].shape[0])
        blocks = rows.reshape(rows.shape[0], -1, per_block)
        yield np.ascontiguousarray(blocks[:, idx]).reshape(-1)


# --------------------------------------------------------------------------------------------------- the recipe


def _check_recipe(recipe, parent_arch: str, out_type: str) -> tuple[str, str]:
    """(MoE type, output GGUF architecture) for this parent and recipe, or a one-line refusal."""
    if out_type not in GGUF_TYPES:
        raise UsageError(f"unknown --gguf-type {out_type!r}; choose one of {', '.join(GGUF_TYPES)}")
    if parent_arch not in TARGETS:
        raise UnsupportedError(
            f"GGUF architecture {parent_arch!r} has no MoE counterpart in llama.cpp that upcycle writes "
            f"(GGUF output supports: {', '.join(TARGETS)}); write a Hugging Face folder instead (OUT without .gguf)")
    moe_type, arch = TARGETS[parent_arch]
    if recipe.format not in ("auto", moe_type):
        why = GGUF_REFUSED.get(recipe.format, "not a GGUF output type")
        raise UnsupportedError(f"--format {recipe.format} as GGUF: {why}; use --format {moe_type} (or auto) for "
                               f"a .gguf OUT, or write a folder for --format {recipe.format}")
    if recipe.shared_experts:
        raise UnsupportedError(f"--shared-experts: llama.cpp's {arch} MoE has no shared experts; drop the option "
                               f"for a .gguf OUT, or write a folder")
    if recipe.moe_layers.strip() != "all":
        raise UnsupportedError(f"--moe-layers {recipe.moe_layers}: llama.cpp's {arch} MoE makes every layer MoE")
    if recipe.expert_init_mode[0] != "copy":
        raise UnsupportedError(f"--expert-init {recipe.expert_init}: a .gguf OUT keeps the parent's blocks (copy); "
                               "write a folder for a training start that perturbs experts")
    if recipe.expert_from:
        raise UnsupportedError("--expert-from is not supported for a .gguf OUT; write a folder")
    if recipe.routing != "renorm":
        raise UnsupportedError(f"--routing {recipe.routing}: llama.cpp's {arch} MoE renormalises the top-k weights "
                               "(--routing renorm)")
    if recipe.dtype != "auto":
        raise UsageError(f"--dtype {recipe.dtype} applies to a folder; for a .gguf OUT use --gguf-type "
                         f"({', '.join(GGUF_TYPES)})")
    return moe_type, arch


def _check_slices(plan, mlp_types: dict[int, dict[str, object]], out_type: str) -> None:
    gguf = _gguf()
    for lay in plan.layouts:
        q = _target_qtype(out_type, mlp_types[lay.index]["down"], 2)
        block = gguf.GGML_QUANT_SIZES[q][0]
        for e, o in enumerate(lay.experts):
            if _down_blocks(o.neurons, block) is None:
                width = o.neurons.size
                how = ("--slice-order random scatters neurons across blocks" if plan.recipe.slice_order == "random"
                       else f"slices of {width} neurons")
                raise UnsupportedError(
                    f"layer {lay.index} expert {e}: {how}, but down_proj's {q.name} blocks hold {block} consecutive "
                    f"neurons, so the slice is not a run of whole blocks; use --slice-order contiguous with a "
                    f"granularity whose width is a multiple of {block}, or --gguf-type f32/f16/bf16")


# --------------------------------------------------------------------------------------------------- writing


def _copy_fields(reader, writer, skip: set[str]) -> None:
    gguf = _gguf()
    T = gguf.GGUFValueType
    for key, f in reader.fields.items():
        if key.startswith("GGUF.") or key in skip:
            continue
        vtype = f.types[0]
        if vtype == T.ARRAY:
            sub = f.types[1] if len(f.types) > 1 else None
            if sub == T.ARRAY:
                raise UnsupportedError(f"{key}: nested arrays in GGUF metadata are not copied by this writer")
            writer.add_key_value(key, f.contents(), vtype, sub_type=sub)
        else:
            writer.add_key_value(key, f.contents(), vtype)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def check_gguf_output(out: Path, overwrite: bool) -> None:
    if out.exists() and not overwrite:
        raise OutputError(f"{out} exists; pass --overwrite to replace it")
    if out.exists() and not out.is_file():
        raise OutputError(f"{out} exists and is not a file")
    if not out.parent.is_dir():
        raise OutputError(f"{out.parent} is not a folder")


def convert_gguf(parent: str | Path, out: str | Path, recipe, *, gguf_type: str = "auto", overwrite: bool = False,
                 verify: bool = True, command: list[str] | None = None, events: Events = SILENT) -> GGUFResult:
    """Write the MoE of `recipe` for the GGUF `parent` as the GGUF file `out`; return what was written.

    Prints nothing: progress goes to `events`. Nothing is left at `out` (or beside it) when this raises."""
    note = events.info
    start = time.perf_counter()
    phases: dict[str, float] = {}
    mark = [start]

    def phase(name: str) -> None:
        now = time.perf_counter()
        phases[name] = phases.get(name, 0.0) + now - mark[0]
        mark[0] = now

    parent, out = Path(parent).expanduser(), Path(out).expanduser()
    if not is_gguf_path(parent):
        raise UnsupportedError(
            f"{parent}: a .gguf OUT is written from a GGUF parent (its quant blocks are kept); for a Hugging Face "
            "parent write a folder and convert it with llama.cpp's convert_hf_to_gguf.py (docs/compatibility.md)")
    check_gguf_output(out, overwrite)
    reader = _open_reader(parent)
    parent_arch = _field(reader, "general.architecture")
    moe_type, arch_name = _check_recipe(recipe, parent_arch, gguf_type)

    from upcycle.storage.parent import open_parent
    from upcycle.convert.run import build_plan

    note(f"reading {parent} (GGUF metadata is slow to parse)")
    ckpt = open_parent(parent)
    routers: dict[int, np.ndarray] = {}
    try:
        plan, _ = build_plan(ckpt, recipe)
        if plan.fmt.model_type != moe_type:
            raise UnsupportedError(f"this recipe gives a {plan.fmt.model_type} MoE; a .gguf OUT of a {parent_arch} "
                                   f"parent is a {moe_type}")
        # every refusal (names, slices that cut quant blocks) comes before the router's parent pass
        tensors = _plan_tensors(reader, plan, arch_name, gguf_type, routers)
        phase("plan")
        mode, init_file = recipe.router_init_mode
        if mode == "kmeans":
            from upcycle.convert.router_init import kmeans_job

            plan, _ = build_plan(ckpt, recipe, kmeans_job(ckpt, init_file, plan, events=events)())
            phase("router init")
        elif mode != "random":
            raise UnsupportedError(f"--router-init {recipe.router_init} is not supported for a .gguf OUT")
        routers.update({t.layer: np.concatenate([np.asarray(c, np.float32) for c in t.produce()])
                        for t in plan.tensors if t.kind == "router"})
    finally:
        ckpt.close()
    from upcycle.convert.writer import check_space

    # metadata (the tokenizer) is a few MB at most; the tensors are padded to the file's alignment
    check_space(out, sum(t.nbytes + 64 for t in tensors) + (64 << 20))
    note(f"writing {out.name}")
    tmp = out.with_name(f".{out.name}.partial-{os.getpid()}")
    try:
        _write(reader, plan, tensors, tmp, arch_name, gguf_type, moe_type, parent, command)
        phase("write")
        verification = None
        if verify:
            note("verifying the written file against the parent")
            verification = verify_gguf(reader, tmp, plan, gguf_type, routers)
            phase("verify")
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    counts: dict[str, int] = {}
    for t in tensors:
        if t.kind == "expert":
            counts[t.qtype.name] = counts.get(t.qtype.name, 0) + 1
    return GGUFResult(out, parent, arch_name, moe_type, gguf_type, recipe.experts, recipe.top_k, recipe.granularity,
                      len(tensors), out.stat().st_size, parent.stat().st_size, counts, time.perf_counter() - start,
                      phases, verification, recipe.router_description)


def _plan_tensors(reader, plan, arch_name: str, out_type: str, routers: dict[int, np.ndarray]):
    gguf = _gguf()
    MT = gguf.MODEL_TENSOR
    p, r = plan.parent, plan.recipe
    arch = _arch_enum(arch_name)
    table = _name_table(_arch_enum(_field(reader, "general.architecture")), p.num_layers)
    mlp_kind = {MT.FFN_GATE: "gate", MT.FFN_UP: "up", MT.FFN_DOWN: "down"}
    mlps: dict[int, dict[str, object]] = {i: {} for i in range(p.num_layers)}
    others = []
    for t in reader.tensors:
        base, _, suffix = t.name.rpartition(".")
        kind = table.get(base)
        if kind is None:
            raise UnsupportedError(f"tensor {t.name} is not in gguf's tensor table for this architecture")
        if kind[0] in mlp_kind and suffix == "weight":
            mlps[kind[1]][mlp_kind[kind[0]]] = t
        elif kind[0] in mlp_kind:
            raise UnsupportedError(f"{t.name}: MLP biases are not carried into experts by the GGUF writer")
        else:
            if kind[0] not in gguf.MODEL_TENSORS[arch]:
                raise UnsupportedError(f"{t.name} has no place in llama.cpp's {arch_name} MoE")
            others.append((kind, t))
    for i, m in mlps.items():
        missing = [w for w in _MLP if w not in m]
        if missing:
            raise InputError(f"layer {i} of the parent lacks ffn_{missing[0]}")
    mlp_types = {i: {w: _target_qtype(out_type, m[w].tensor_type, 2) for w in _MLP} for i, m in mlps.items()}
    _check_slices(plan, mlp_types, out_type)

    E, H = r.experts, p.hidden_size
    width = p.intermediate_size // r.granularity
    exp_name = {"gate": MT.FFN_GATE_EXP, "up": MT.FFN_UP_EXP, "down": MT.FFN_DOWN_EXP}
    for mt in (MT.FFN_GATE_INP, *exp_name.values()):
        if mt not in gguf.MODEL_TENSORS[arch]:  # pragma: no cover - a gguf release without MoE names for the arch
            raise UnsupportedError(f"the installed gguf package lists no {mt.name} for {arch_name}")

    def copied(t) -> OutTensor:
        q = _target_qtype(out_type, t.tensor_type, len(t.shape))
        shape = tuple(int(d) for d in reversed(t.shape.tolist()))
        nbytes = int(np.prod(shape[:-1], dtype=np.int64)) * _row_bytes(q, shape[-1])
        return OutTensor(t.name, shape, q, nbytes, lambda: iter((_tensor_bytes(t, q),)), "copy")

    # global tensors first, then each layer's own tensors (the parent's order) followed by its MoE tensors
    out = [copied(t) for kind, t in others if kind[1] is None]
    for i in range(p.num_layers):
        own = [t for kind, t in others if kind[1] == i]
        if not own:
            raise InputError(f"layer {i} of the parent has no attention or norm tensors")
        out.extend(copied(t) for t in own)
        out.extend(_moe_tensors(i, mlps[i], mlp_types[i], plan, routers, exp_name, E, H, width))
    return out


def _moe_tensors(i: int, mlp: dict, qtypes: dict, plan, routers: dict[int, np.ndarray], exp_name: dict, E: int,
                 H: int, width: int) -> list[OutTensor]:
    """routers: {layer: (E, H) float32 rows}, filled after planning (the k-means pass runs once nothing refuses)."""
    gguf = _gguf()
    Q = gguf.GGMLQuantizationType
    lay = plan.layouts[i]
    layer = _Layer(mlp, qtypes)
    res = [OutTensor(gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.FFN_GATE_INP].format(bid=i) + ".weight", (E, H), Q.F32,
                     E * H * 4, lambda: iter((np.ascontiguousarray(routers[i], np.float32).reshape(-1).view(np.uint8),)),
                     "router")]
    for which in _MLP:
        q = qtypes[which]
        block = gguf.GGML_QUANT_SIZES[q][0]
        shape = (E, width, H) if which != "down" else (E, H, width)
        nbytes = E * shape[1] * _row_bytes(q, shape[2])
        res.append(OutTensor(gguf.TENSOR_NAMES[exp_name[which]].format(bid=i) + ".weight", shape, q, nbytes,
                             lambda which=which, block=block: _expert_chunks(layer, which, lay.experts, block),
                             "expert"))
    scales = np.array([o.down_scale for o in lay.experts], np.float32)
    if np.any(scales != 1.0):
        # llama.cpp multiplies each expert's down-projected output by this f32 factor (the group scale G): exact in
        # f32 for a power of two, and it leaves the expert's quant blocks as the parent's
        res.append(OutTensor(gguf.TENSOR_NAMES[exp_name["down"]].format(bid=i) + ".scale", (E,), Q.F32, E * 4,
                             lambda: iter((scales.view(np.uint8),)), "scale"))
    return res


def _write(reader, plan, tensors: list[OutTensor], tmp: Path, arch_name: str, out_type: str, moe_type: str,
           parent: Path, command) -> None:
    gguf = _gguf()
    K = gguf.Keys
    r, p = plan.recipe, plan.parent
    parent_arch = _field(reader, "general.architecture")
    width = p.intermediate_size // r.granularity
    writer = gguf.GGUFWriter(str(tmp), arch_name)
    try:
        alignment = _field(reader, "general.alignment")
        if alignment is not None:
            writer.data_alignment = int(alignment)
        ff_key = K.LLM.FEED_FORWARD_LENGTH.format(arch=parent_arch)
        skip = {"general.architecture", "general.file_type", ff_key,
                K.LLM.EXPERT_COUNT.format(arch=parent_arch), K.LLM.EXPERT_USED_COUNT.format(arch=parent_arch)}
        _copy_fields(reader, writer, skip)
        file_type = _file_type(out_type, _field(reader, "general.file_type"))
        if file_type is not None:
            writer.add_uint32("general.file_type", int(file_type))
        # llama's MoE reads the experts' width from feed_forward_length
        writer.add_uint32(K.LLM.FEED_FORWARD_LENGTH.format(arch=arch_name), width)
        writer.add_uint32(K.LLM.EXPERT_COUNT.format(arch=arch_name), r.experts)
        writer.add_uint32(K.LLM.EXPERT_USED_COUNT.format(arch=arch_name), r.top_k)
        writer.add_string("upcycle.recipe", json.dumps({
            "moe_type": moe_type, "experts": r.experts, "top_k": r.top_k, "granularity": r.granularity,
            "slice_order": r.slice_order, "router": r.router_description, "seed": r.seed, "gguf_type": out_type,
            "parent": parent.name, "parent_sha256": _sha256(parent), "command": command,
        }, sort_keys=True))
        for t in tensors:
            writer.add_tensor_info(t.name, t.shape, np.dtype(np.float32), t.nbytes, raw_dtype=t.qtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        fout = writer.fout[0]
        for t in tensors:
            writer.write_padding(fout, fout.tell())
            written = 0
            for chunk in t.chunks():
                chunk = np.ascontiguousarray(chunk).reshape(-1).view(np.uint8)
                chunk.tofile(fout)
                written += chunk.nbytes
            if written != t.nbytes:  # pragma: no cover - a producer bug
                raise AssertionError(f"{t.name}: wrote {written} bytes, planned {t.nbytes}")
            writer.write_padding(fout, t.nbytes)
        fout.flush()
        os.fsync(fout.fileno())
    finally:
        writer.close()


# --------------------------------------------------------------------------------------------------- verification


def verify_gguf(parent_reader, written: Path, plan, out_type: str, routers: dict[int, np.ndarray]) -> dict:
    """Read the written file back and check it against the parent, independently of how it was produced:

    * every copied tensor: the same bytes (own type) or the same values after one rounding (other types);
    * every expert: dequantized, equal (bit for bit) to the parent's neurons it was cut from, dequantized the same
      way; for the parent's own type its blocks are also compared byte for byte;
    * the router rows and per-expert scales as planned, and the tokenizer metadata unchanged.
    """
    gguf = _gguf()
    src, dst = parent_reader, _open_reader(written)
    by_name = {t.name: t for t in dst.tensors}
    parent_t = {t.name: t for t in src.tensors}
    exp_bytes = tok_keys = copied = 0
    for t in src.tensors:
        if t.name in by_name:
            o = by_name[t.name]
            q = _target_qtype(out_type, t.tensor_type, len(t.shape))
            if o.tensor_type != q:
                raise VerificationError(f"{t.name} is {o.tensor_type.name} in the output, expected {q.name}")
            if not np.array_equal(_raw(o), _tensor_bytes(t, q)):
                raise VerificationError(f"{t.name}: the output bytes differ from the parent's")
            copied += 1
    for key, f in src.fields.items():
        if key.startswith("tokenizer."):
            g = dst.fields.get(key)
            if g is None or g.contents() != f.contents():
                raise VerificationError(f"tokenizer metadata {key} differs from the parent's")
            tok_keys += 1
    for lay in plan.layouts:
        i = lay.index
        pre = f"blk.{i}."
        router = by_name[pre + "ffn_gate_inp.weight"]
        if not np.array_equal(_f32(router), routers[i]):
            raise VerificationError(f"{pre}ffn_gate_inp.weight differs from the planned router")
        for which in _MLP:
            dense = parent_t[f"{pre}ffn_{which}.weight"]
            full = _f32(dense)
            if out_type != "auto":  # the dense projection in the output type, as a reader of that file sees it
                q = _target_qtype(out_type, dense.tensor_type, 2)
                full = gguf.dequantize(_tensor_bytes(dense, q).reshape(full.shape[0], -1), q).reshape(full.shape)
            out = by_name[f"{pre}ffn_{which}_exps.weight"]
            per_expert = _raw(out).reshape(len(lay.experts), -1)
            seen: dict[bytes, int] = {}
            for e, o in enumerate(lay.experts):
                key = o.neurons.tobytes()
                if key in seen:  # a copy of an expert already checked: the same bytes
                    if not np.array_equal(per_expert[e], per_expert[seen[key]]):
                        raise VerificationError(f"{pre}ffn_{which}_exps expert {e} differs from expert {seen[key]}, "
                                                "a copy of the same neurons")
                    continue
                seen[key] = e
                want = full[o.neurons] if which != "down" else full[:, o.neurons]
                got = gguf.dequantize(per_expert[e].reshape(want.shape[0], -1), out.tensor_type).reshape(want.shape)
                if not np.array_equal(got, want):
                    raise VerificationError(f"{pre}ffn_{which}_exps expert {e} is not the parent's neurons")
            exp_bytes += out.n_bytes
        scale = by_name.get(pre + "ffn_down_exps.scale")
        want_scale = np.array([o.down_scale for o in lay.experts], np.float32)
        got_scale = _f32(scale) if scale is not None else np.ones_like(want_scale)
        if not np.array_equal(got_scale, want_scale):
            raise VerificationError(f"{pre}ffn_down_exps.scale is not the group scale")
    return {"copied_tensors": copied, "expert_bytes": int(exp_bytes), "tokenizer_keys": tok_keys,
            "layers": len(plan.layouts)}


# --------------------------------------------------------------------------------------------------- dense reference


def retype_dense(parent: str | Path, out: str | Path, out_type: str) -> Path:
    """The dense parent with every tensor in `out_type` (as convert_gguf would type it), for comparisons: a re-typed
    MoE computes what this file computes."""
    gguf = _gguf()
    parent, out = Path(parent), Path(out)
    if out_type not in GGUF_TYPES:
        raise UsageError(f"unknown GGUF type {out_type!r}; choose one of {', '.join(GGUF_TYPES)}")
    reader = _open_reader(parent)
    arch = _field(reader, "general.architecture")
    tmp = out.with_name(f".{out.name}.partial-{os.getpid()}")
    writer = gguf.GGUFWriter(str(tmp), arch)
    try:
        _copy_fields(reader, writer, {"general.architecture", "general.file_type"})
        ft = _file_type(out_type, _field(reader, "general.file_type"))
        if ft is not None:
            writer.add_uint32("general.file_type", int(ft))
        for t in reader.tensors:
            q = _target_qtype(out_type, t.tensor_type, len(t.shape))
            shape = tuple(int(d) for d in reversed(t.shape.tolist()))
            data = _tensor_bytes(t, q)
            # with uint8 data, gguf's writer takes the shape in bytes along the last axis
            writer.add_tensor(t.name, data, raw_shape=(*shape[:-1], _row_bytes(q, shape[-1])), raw_dtype=q)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(tmp, out)
    except BaseException:
        writer.close()
        tmp.unlink(missing_ok=True)
        raise
    return out
