"""Memory honesty: what a command will need, estimated before anything is loaded, against what is available.

Available memory is probed, never assumed: MemAvailable from /proc/meminfo and, when the process runs in a
cgroup with a limit (containers, systemd slices, CI runners), that limit minus the cgroup's current usage; the
smaller wins. UPCYCLE_MEMORY_AVAILABLE (e.g. 4GiB) overrides the probe (for tests and for users who want a
margin). Estimates are sums of named parts (weights, gradients, AdamW states, activations, runtime) so that the
one-line refusal can say where the memory goes and which option reduces it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from upcycle.core.errors import UpcycleError
from upcycle.core.tensors import human_bytes, parse_size

# Resident size of a Python process once torch and transformers are imported (measured about 250 MB on
# Linux x86-64 with torch 2.x CPU and transformers 5; allocator slack added).
TORCH_RUNTIME = 320 << 20
NUMPY_RUNTIME = 60 << 20
TOKENIZER_RUNTIME = 64 << 20  # a tokenizer loaded through transformers' AutoTokenizer, on top of TORCH_RUNTIME
GiB = 1 << 30


class InsufficientMemory(UpcycleError):
    """The estimate of what a command needs exceeds the memory available; nothing was loaded."""


@dataclass(frozen=True)
class Estimate:
    what: str  # "convert", "train", "verification (whole model)", ...
    parts: tuple[tuple[str, int], ...]  # (label, bytes), summed
    reduce: tuple[str, ...] = ()  # options that lower the estimate, phrased for the user

    def __post_init__(self):
        if any(b < 0 for _, b in self.parts):
            raise ValueError(f"negative part in memory estimate {self.parts}")

    @property
    def total(self) -> int:
        return sum(b for _, b in self.parts)

    def describe(self) -> str:
        return ", ".join(f"{label} {human_bytes(b)}" for label, b in self.parts if b)

    def refusal(self, available: int, where: str) -> str:
        hint = f"; to reduce it: {'; '.join(self.reduce)}" if self.reduce else ""
        return (f"{self.what} needs about {human_bytes(self.total)} of memory ({self.describe()}), "
                f"{human_bytes(available)} is available ({where}){hint}")


# ------------------------------------------------------------------------------------------------ available

def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    if not text or text == "max":
        return None
    try:
        return int(text)
    except ValueError:
        return None


def _meminfo_available() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def _cgroup_headroom() -> int | None:
    """Limit minus usage of the tightest cgroup (v2 or v1) on this process's path, or None without a limit."""
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return None
    best = None
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, rel = parts
        if controllers == "":  # cgroup v2: walk up, a parent's limit binds too
            root = Path("/sys/fs/cgroup")
            p = root / rel.lstrip("/")
            while True:
                limit, used = _read_int(p / "memory.max"), _read_int(p / "memory.current")
                if limit is not None and used is not None:
                    best = min(best, limit - used) if best is not None else limit - used
                if p == root or root not in p.parents:
                    break
                p = p.parent
        elif "memory" in controllers.split(","):
            for base in (Path("/sys/fs/cgroup/memory") / rel.lstrip("/"), Path("/sys/fs/cgroup/memory")):
                limit = _read_int(base / "memory.limit_in_bytes")
                used = _read_int(base / "memory.usage_in_bytes")
                if limit is not None and used is not None and limit < (1 << 60):
                    best = min(best, limit - used) if best is not None else limit - used
                    break
    return None if best is None else max(best, 0)


def available() -> tuple[int, str]:
    """(bytes this process can still use, where that number comes from)."""
    override = os.environ.get("UPCYCLE_MEMORY_AVAILABLE")
    if override:
        try:
            return parse_size(override), "UPCYCLE_MEMORY_AVAILABLE"
        except ValueError:
            pass
    found = []
    mem = _meminfo_available()
    if mem is not None:
        found.append((mem, "MemAvailable"))
    cg = _cgroup_headroom()
    if cg is not None:
        found.append((cg, "cgroup limit"))
    if not found:
        return 1 << 62, "not measurable here"
    return min(found)


def require(estimate: Estimate, probed: tuple[int, str] | None = None) -> int:
    """Raise InsufficientMemory (one line) unless the estimate fits; return the bytes available. probed: what
    `available()` returned earlier in the same decision, so that one decision reads the memory once."""
    have, where = probed or available()
    if estimate.total > have:
        raise InsufficientMemory(estimate.refusal(have, where))
    return have


def peak_rss() -> int:
    """This process's peak resident set size so far, in bytes: VmHWM of its address space (getrusage's ru_maxrss
    would carry a parent's peak across fork and exec)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    import resource  # not Linux: the closest figure there is

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def release_unused() -> None:
    """Free what the stage that just ended left behind, so that it does not count in the next stage's RSS.

    Collects reference cycles (a trained model, its optimizer and accelerate's wrappers reference each other, so
    they outlive the call that made them until the cyclic collector runs, which in a large process can be much
    later), then asks glibc to hand freed heap pages back to the system (malloc_trim): tensors under its mmap
    threshold (32 MiB at most) live in the heap, which otherwise keeps its high-water mark.
    """
    import gc

    gc.collect()
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to trim
        pass


# ------------------------------------------------------------------------------------------------ convert

def _layer_params(p) -> int:
    attn = p.hidden_size * p.head_dim * (2 * p.num_heads + 2 * p.num_kv_heads)
    return attn + 3 * p.hidden_size * p.intermediate_size + 4 * p.hidden_size


# The verification prompts' length in tokens, rounded up (upcycle.convert.verify.PROMPTS: 57 with SmolLM2's tokenizer).
VERIFY_TOKENS = 96


def _convert_parts(plan) -> dict[str, int]:
    """Bytes of each stage of a conversion (what is in memory at once within it)."""
    from upcycle.core.tensors import itemsize

    p, r = plan.parent, plan.recipe
    out = itemsize(plan.out_dtype)
    mlp = 3 * p.hidden_size * p.intermediate_size
    shared = mlp * max(r.shared_full_copies, 1) if r.shared_experts else 0
    largest = max((t.nbytes for t in plan.tensors), default=0)
    emb = p.vocab_size * p.hidden_size
    moe_layers = sum(1 for lay in plan.layouts if lay.moe)
    sources = len(r.expert_from)
    distinct = max(sources, 1)  # experts of different --expert-from sources are different tensors
    layer64 = _layer_params(p) * 8 * 3 // 2
    parts = {
        # writer: the layer's MLP in float32, the distinct expert tensors of the layer in the output type, and the
        # largest tensor in flight in its parent and output types (plus a float32 view when it converts)
        "stream": mlp * 4 + (mlp + shared) * out + largest * 2 + emb * 4,
        # the parent run: one layer's weights in float64, plus one tensor being converted
        "layer64": layer64,
        # the MLP inputs and outputs it keeps for every MoE layer (float64)
        "states": moe_layers * VERIFY_TOKENS * p.hidden_size * 8 * 2,
        # expert checks: the MLPs the neurons come from (the parent's, and each --expert-from source's), expected
        # experts + their float64 copies, the tensor read back
        "moe": mlp * 4 * (distinct + 1 if sources else 1) + (mlp * distinct + shared) * (out + 8) + largest * 2,
        # copied tensors: the parent's and the written embedding, and a float32 view
        "copied": emb * (2 * out + 4),
    }
    if sources:
        # a second source's MLP in float32 and its expert tensors; --average-shared: a float64 sum, one source's
        # tensor and the float32 mean of the largest tensor
        parts["stream"] += mlp * (4 + out) + (largest // out * 16 if r.average_shared else 0)
        # end to end, after the parent run (verify_mix): the MoE one layer at a time with every routed expert read
        # back in float64, and logits of the prompts
        parts["mixed"] = layer64 + r.experts * mlp // r.granularity * 8 + 256 * p.vocab_size * 8 * 4
    return parts


def overlap_parent(plan, thread_safe: bool) -> bool:
    """Whether convert runs verification's float64 parent layers in a thread beside the writer and the byte checks.

    It saves most of the verification's time on small models (the imports and the parent's layers then cost
    nothing extra), and it costs one parent layer in float64 on top of the writer's memory: done only where that
    adds at most a quarter to the peak (and where the parent's source can be read by two threads at once).

    thread_safe is the parent's own source's: with --expert-from that is still the only source the thread reads
    (ParentStates), while the other checkpoints and the --average-shared mean are read by the calling thread
    alone; the mean reads the parent's source too, which thread_safe covers."""
    c = _convert_parts(plan)
    return thread_safe and c["layer64"] * 4 <= max(c["stream"], c["moe"], c["copied"])


def convert_estimate(plan, *, verify: bool, overlap: bool | None = None, router_beside: bool = False) -> Estimate:
    """Streaming conversion, plus the layer-by-layer float64 verification when asked, and the parent run of the
    k-means or prompts router init (before writing: the larger of the two phases counts; with router_beside, the
    k-means pass runs during writing, so it adds to the writer; the verification's parent layers, when they overlap
    the writer, follow it on the same thread, so the larger of the two counts).

    overlap: whether the parent layers run beside the writer (see overlap_parent; None: decide as convert does,
    for a source that can be read by two threads)."""
    p, r = plan.parent, plan.recipe
    c = _convert_parts(plan)
    emb = p.vocab_size * p.hidden_size
    parts = [("runtime", NUMPY_RUNTIME), ("streaming", c["stream"])]
    if verify:
        if overlap is None:
            overlap = overlap_parent(plan, True)
        if overlap:
            need = max(c["stream"], c["moe"], c["copied"]) + c["layer64"]
        else:
            need = max(c["layer64"], c["moe"], c["copied"], c["stream"])
        # experts from other checkpoints: the end-to-end run comes after the parent's (its thread has ended)
        need = max(need, c.get("mixed", 0))
        parts = [("runtime", TORCH_RUNTIME), ("verification", need + c["states"])]
    sources = len(r.expert_from)
    if r.router_init_mode[0] == "prompts":  # one float64 layer, and eager attention over a batch of the sources
        from upcycle.convert.router_init import MAX_PROMPT_TOKENS

        attention = sources * p.num_heads * MAX_PROMPT_TOKENS ** 2 * 8 * 3
        init = _layer_params(p) * 8 + attention + emb * 8
        (label, size) = parts[-1]  # router init runs before writing: the larger of the two phases counts
        parts = [("runtime", TORCH_RUNTIME), (f"{label} or router init", max(size, init))]
    if r.router_init_mode[0] == "kmeans":  # the parent in float32, one layer at a time, over blocks of text
        from upcycle.convert.router_init import BLOCK, MAX_TOKENS

        attention = (MAX_TOKENS // BLOCK) * p.num_heads * BLOCK ** 2 * 4 * 3  # eager scores, softmax, mask
        activations = MAX_TOKENS * (p.hidden_size * 6 + p.intermediate_size * 3) * 4
        # + the tokenizer through transformers (measured about 60 MB) and a GGUF embedding table decoded whole
        init = TOKENIZER_RUNTIME + _layer_params(p) * 4 + attention + activations + emb * 4
        (label, size) = parts[-1]
        if router_beside:
            # during writing: the writer, plus the one torch thread beside it, which runs the k-means pass and then
            # (overlap) the verification's float64 parent layers, never both at once
            writing = c["stream"] + max(init, c["layer64"] + c["states"] if verify and overlap else 0)
            parts = [("runtime", TORCH_RUNTIME), (f"{label} or writing with the router init beside it",
                                                   max(size, writing))]
        else:  # router init runs before writing: the larger of the two phases counts
            parts = [("runtime", TORCH_RUNTIME), (f"{label} or router init", max(size, init))]
    return Estimate("convert", tuple(parts), ("--no-verify skips the checks (the writer alone streams)",
                                              "--router-init random skips the parent run of the k-means router"))


def whole_model_estimate(plan) -> Estimate:
    """Parent and MoE both in float32 through transformers, plus logits for a short prompt."""
    act = 64 * plan.parent.vocab_size * 4 * 4 + 64 * plan.parent.hidden_size * 64 * 8
    return Estimate("the whole-model check", (("runtime", TORCH_RUNTIME), ("parent float32", plan.parent_params * 4),
                                              ("MoE float32", plan.total_params * 4), ("activations", act)),
                    ("--full-check never skips it (the layer-by-layer check still runs)",))


# ------------------------------------------------------------------------------------------------ train / eval

# Bytes of saved activations per token and layer, in units of the hidden size and of the routed intermediate
# width (float32). Measured on tiny and SmolLM2-sized models with transformers 5 on CPU (tests/test_memory.py
# checks the whole estimate against peak RSS); attention uses sdpa, so no seq x seq score matrix is kept.
ACT_PER_HIDDEN = 18
ACT_PER_INTER = 5
TRAIN_RUNTIME = 480 << 20  # torch, transformers, accelerate, the tokenizer and the data pipeline


def parameter_counts(spec: str, *, allow_pickle: bool = False) -> tuple[dict[str, int], dict]:
    """({tensor name: parameters}, config) of a model folder or .gguf file, from file headers only."""
    import json

    p = Path(spec)
    if p.suffix.lower() == ".gguf":
        from upcycle.convert.parent import open_parent

        ckpt = open_parent(p)
        try:
            counts = {n: _numel(ckpt.source.meta(n).shape) for n in ckpt.source.names()}
            return counts, dict(ckpt.spec.raw)
        finally:
            ckpt.close()
    from upcycle.convert.sources import PickleSource, SafetensorsSource

    if not (p / "config.json").is_file():  # a hub id: nothing to read before it is fetched
        return {}, {}
    cfg = json.loads((p / "config.json").read_text())
    source = SafetensorsSource(p) if any(p.glob("*.safetensors")) else PickleSource(p) if allow_pickle else None
    if source is None:
        return {}, cfg
    try:
        return {n: _numel(source.meta(n).shape) for n in source.names()}, cfg
    finally:
        source.close()


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


def _role(name: str) -> str:
    """--train group of an on-disk tensor name (the names upcycle convert writes; see train.freeze)."""
    from upcycle.train.freeze import parameter_role

    moe = "block_sparse_moe." in name or ".mlp." in name
    router = moe and (name.endswith((".gate.weight", ".router.layer.weight")))
    experts = moe and (".experts." in name or (("input_linear" in name or "output_linear" in name) and "shared" not in name))
    return parameter_role(name, {name} if router else set(), {name} if experts else set())


def train_estimate(spec: str, cfg, *, precision: str, allow_pickle: bool = False) -> tuple[Estimate, dict[str, int], dict[str, int]]:
    """(estimate, trainable parameters per group, all parameters per group) for `upcycle train`, from headers."""
    counts, mcfg = parameter_counts(spec, allow_pickle=allow_pickle)
    sel = cfg.selection
    total: dict[str, int] = {}
    trainable: dict[str, int] = {}
    for name, n in counts.items():
        if name.endswith("e_score_correction_bias"):
            continue  # a buffer, not a parameter
        role = _role(name)
        total[role] = total.get(role, 0) + n
        if sel.everything or role in sel.groups:
            trainable[role] = trainable.get(role, 0) + n
        elif role == "experts" and sel.some_experts:
            # a fraction of the layer's experts trains (frozen ones still carry gradients in the fused tensor)
            trainable[role] = trainable.get(role, 0) + n
    P, T = sum(total.values()), sum(trainable.values())
    H = int(mcfg.get("hidden_size") or 0)
    L = int(mcfg.get("num_hidden_layers") or 0)
    V = int(mcfg.get("vocab_size") or 0)
    k = int(mcfg.get("num_experts_per_tok") or 1)
    inter = int(mcfg.get("moe_intermediate_size") or mcfg.get("intermediate_size") or 0)
    if "shared_expert_intermediate_size" in mcfg or "shared_intermediate_size" in mcfg:
        inter_shared = int(mcfg.get("shared_expert_intermediate_size") or mcfg.get("shared_intermediate_size") or 0)
    else:
        inter_shared = int(mcfg.get("n_shared_experts") or 0) * inter
    tokens = cfg.batch_size * cfg.seq_len
    per_layer = tokens * 4 * (ACT_PER_HIDDEN * H + ACT_PER_INTER * (k * inter + inter_shared))
    if cfg.gradient_checkpointing:
        acts = tokens * 4 * H * L + per_layer
    else:
        acts = per_layer * L
    logits = tokens * V * 4 * 3  # logits, their log-softmax and its gradient
    stored = {"bfloat16": 2, "float16": 2}.get(str(mcfg.get("dtype") or mcfg.get("torch_dtype") or "float32"), 4)
    parts = [("runtime", TRAIN_RUNTIME), ("weights fp32", P * 4), ("gradients", T * 4), ("AdamW states", T * 8)]
    if precision == "bf16":
        parts.append(("bf16 weight copies", P * 2))
    parts += [("activations", acts), ("logits", logits)]
    # Loading reads the checkpoint through a memory map: its pages count in the process's RSS (and a cgroup's
    # memory) next to the fp32 copy the model keeps, until loading ends (upcycle.train.model gives every tensor
    # its own memory so that the map goes before training allocates anything). The peak is the larger of loading
    # and training, so the pages count only where they exceed what training adds to the weights.
    training_state = sum(b for label, b in parts if label not in ("runtime", "weights fp32"))
    parts.insert(2, ("checkpoint pages while loading", max(0, P * stored - training_state)))
    reduce = []
    if cfg.batch_size > 1:
        reduce.append(f"a smaller --batch-size (with --grad-accum {cfg.grad_accum * 2} for the same tokens per step)")
    if not cfg.gradient_checkpointing:
        reduce.append("--gradient-checkpointing")
    if sel.everything:
        reduce.append("--train with fewer groups (e.g. router,shared,attention,norms)")
    if cfg.seq_len > 256:
        reduce.append("a shorter --seq-len")
    return Estimate("train", tuple(parts), tuple(reduce)), trainable, total


def eval_estimate(model: str, parent: str | None, *, dtype: str, batch_tokens: int, allow_pickle: bool = False) -> Estimate:
    """`upcycle eval`: the parent first (then only its MLPs kept for drift), then the model; no gradients."""
    size = {"float32": 4, "bfloat16": 2, "float16": 2}.get(dtype, 4)
    counts, cfg = parameter_counts(model, allow_pickle=allow_pickle)
    m = sum(counts.values()) * size
    p_all = p_mlp = 0
    if parent is not None:
        pc, _ = parameter_counts(parent, allow_pickle=allow_pickle)
        p_all = sum(pc.values()) * size
        p_mlp = sum(n for name, n in pc.items() if ".mlp." in name) * 4
    H, V = int(cfg.get("hidden_size") or 0), int(cfg.get("vocab_size") or 0)
    acts = batch_tokens * (H * 4 * 16 + V * 4 * 3)
    weights = max(p_all, m + p_mlp)
    return Estimate("eval", (("runtime", TRAIN_RUNTIME), ("weights", weights), ("activations", acts)),
                    ("a smaller --batch-size or --seq-len", "--dtype bfloat16"))
