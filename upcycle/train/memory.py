"""What `upcycle train` needs in memory: weights, gradients, AdamW states, activations, logits."""

from __future__ import annotations

from upcycle.core.memory import MODEL_RUNTIME, Estimate
from upcycle.storage.counts import parameter_counts


# Bytes of saved activations per token and layer, in units of the hidden size and of the routed intermediate
# width (float32). Measured on tiny and SmolLM2-sized models with transformers 5 on CPU (tests/test_memory.py
# checks the whole estimate against peak RSS); attention uses sdpa, so no seq x seq score matrix is kept.
ACT_PER_HIDDEN = 18
ACT_PER_INTER = 5


def tensor_role(name: str) -> str:
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
        role = tensor_role(name)
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
    parts = [("runtime", MODEL_RUNTIME), ("weights fp32", P * 4), ("gradients", T * 4), ("AdamW states", T * 8)]
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


