"""What `upcycle convert` needs in memory: the streaming writer, the float64 verification, the router init."""

from __future__ import annotations

from upcycle.core.memory import NUMPY_RUNTIME, TOKENIZER_RUNTIME, TORCH_RUNTIME, Estimate


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
    if r.partition:
        # the held-out loss (verify_heldout): the parent's, then the MoE's float32 layers over its tokens, every
        # routed expert of a layer in float64, both runs' final hidden states and one sweep of the head's rows
        from upcycle.convert.verify_heldout import BLOCK, HEAD_ROWS, HELDOUT_TOKENS

        acts = HELDOUT_TOKENS * (p.hidden_size * 8 + p.intermediate_size * 3) * 4
        attention = (HELDOUT_TOKENS // BLOCK) * p.num_heads * BLOCK ** 2 * 4 * 3
        head = 2 * HELDOUT_TOKENS * HEAD_ROWS * 4 * 2 + HEAD_ROWS * p.hidden_size * 4
        parts["heldout"] = _layer_params(p) * 4 + acts + attention + mlp * 8 + head + emb * 4
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
        # experts from other checkpoints, a partition's held-out loss: after the parent's run (its thread has ended)
        need = max(need, c.get("mixed", 0), c.get("heldout", 0))
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
    if r.sample_pass:  # grouping neurons / fitting a partition's router: before writing, like the k-means pass
        from upcycle.convert.partition import SCALE_TOKENS
        from upcycle.convert.router_init import BLOCK, MAX_TOKENS

        attention = (MAX_TOKENS // BLOCK) * p.num_heads * BLOCK ** 2 * 4 * 3
        activations = MAX_TOKENS * (p.hidden_size * 6 + p.intermediate_size * 3) * 4
        # the layer's MLP in float32 and its activations twice (their absolute values as k-means features), the
        # experts' outputs and the scale search's stack of them
        fit = 3 * p.hidden_size * p.intermediate_size * 4 + MAX_TOKENS * p.intermediate_size * 4 * 2
        fit += MAX_TOKENS * p.hidden_size * 4 * 2 + r.experts * SCALE_TOKENS * p.hidden_size * 4 * 2
        init = TOKENIZER_RUNTIME + _layer_params(p) * 4 + attention + activations + fit + emb * 4
        (label, size) = parts[-1]
        parts = [("runtime", TORCH_RUNTIME), (f"{label} or grouping", max(size, init))]
    return Estimate("convert", tuple(parts), ("--no-verify skips the checks (the writer alone streams)",
                                              "--router-init random skips the parent run of the k-means router"))


def whole_model_estimate(plan) -> Estimate:
    """Parent and MoE both in float32 through transformers, plus logits for a short prompt."""
    act = 64 * plan.parent.vocab_size * 4 * 4 + 64 * plan.parent.hidden_size * 64 * 8
    return Estimate("the whole-model check", (("runtime", TORCH_RUNTIME), ("parent float32", plan.parent_params * 4),
                                              ("MoE float32", plan.total_params * 4), ("activations", act)),
                    ("--full-check never skips it (the layer-by-layer check still runs)",))


