"""Hugging Face MoE model types as data: what each can hold exactly, its on-disk names and its config.

One entry per type. `supports()` answers "can this type hold this parent with these options, exactly?" and,
with explain=True, lists every reason it cannot, so that a refusal can say what would work instead.
Facts behind the entries are in docs/background.md sections 1 and 3 and are re-checked by the test suite
against transformers' own modeling code on tiny random parents.
"""

from __future__ import annotations

from dataclasses import dataclass

from upcycle.families.parents import ParentSpec
from upcycle.core.errors import UnsupportedError
from upcycle.core.layers import format_ranges
from upcycle.convert.recipe import Recipe


@dataclass(frozen=True)
class MoEFormat:
    model_type: str
    architecture: str
    scoring: str  # "softmax" (then top-k, renormalised) | "sigmoid" (group-limited, bias for selection) | "topk_softmax"
    shared: str | None  # None | "gated" (one wide expert times sigmoid(gate)) | "plain" (one wide expert, no gate)
    dense_layers: str | None  # None | "any" (mlp_only_layers) | "prefix" (first_k_dense_replace)
    qkv_bias: str  # "never" | "always" (zeros written when the parent has none) | "config"
    o_bias: bool  # whether attention_bias also puts a bias on o_proj
    qk_norms: tuple  # parent q/k-norm kinds this type reproduces
    norm_style: str = "pre"
    multipliers: bool = False
    partial_rotary: bool = False
    sliding: str = "none"  # "none" | "uniform" | "layer_types"
    custom_head_dim: bool = True
    moe_prefix: str = "mlp"
    router_key: str = "gate.weight"
    expert_names: tuple | None = ("gate_proj", "up_proj", "down_proj")  # None: fused 3-D tensors (granitemoe)
    shared_prefix: str | None = None  # relative to the decoder layer
    selection_bias: bool = False


FORMATS: dict[str, MoEFormat] = {
    f.model_type: f
    for f in [
        MoEFormat("mixtral", "MixtralForCausalLM", "softmax", None, None, "never", False, (None,), sliding="uniform",
                  moe_prefix="block_sparse_moe", expert_names=("w1", "w3", "w2")),
        MoEFormat("qwen2_moe", "Qwen2MoeForCausalLM", "softmax", "gated", "any", "always", False, (None,),
                  sliding="layer_types", shared_prefix="mlp.shared_expert"),
        MoEFormat("qwen3_moe", "Qwen3MoeForCausalLM", "softmax", None, "any", "config", True, ("head",), sliding="uniform"),
        MoEFormat("granitemoe", "GraniteMoeForCausalLM", "topk_softmax", None, None, "config", True, (None,),
                  multipliers=True, custom_head_dim=False, moe_prefix="block_sparse_moe", router_key="router.layer.weight",
                  expert_names=None),
        MoEFormat("granitemoeshared", "GraniteMoeSharedForCausalLM", "topk_softmax", "plain", None, "config", True, (None,),
                  multipliers=True, custom_head_dim=False, moe_prefix="block_sparse_moe", router_key="router.layer.weight",
                  expert_names=None, shared_prefix="shared_mlp"),
        MoEFormat("dots1", "Dots1ForCausalLM", "sigmoid", "plain", "prefix", "config", True, ("head",),
                  sliding="layer_types", shared_prefix="mlp.shared_experts", selection_bias=True),
        MoEFormat("glm4_moe", "Glm4MoeForCausalLM", "sigmoid", "plain", "prefix", "config", False, (None, "head"),
                  partial_rotary=True, shared_prefix="mlp.shared_experts", selection_bias=True),
        MoEFormat("flex_olmo", "FlexOlmoForCausalLM", "softmax", None, None, "config", True, ("full",), norm_style="post"),
    ]
}

# auto picks the first that fits: the most widely supported types first (vLLM, SGLang, llama.cpp all run
# mixtral and qwen2_moe; the others have fewer runtimes).
PREFERENCE = ("mixtral", "qwen2_moe", "qwen3_moe", "granitemoe", "granitemoeshared", "dots1", "glm4_moe", "flex_olmo")


def _default_multipliers(p: ParentSpec) -> bool:
    m = p.multipliers
    return not m or (
        m["embedding_multiplier"] == 1.0 and m["residual_multiplier"] == 1.0 and m["logits_scaling"] == 1.0
        and abs(m["attention_multiplier"] - p.head_dim**-0.5) < 1e-12
    )


def portability_notes(fmt: MoEFormat, parent: ParentSpec, recipe: Recipe) -> list[str]:
    """Runtimes other than transformers that may read this folder differently (shown in --dry-run and the card)."""
    notes = []
    if fmt.model_type in ("qwen2_moe", "granitemoe", "granitemoeshared") and not parent.has_default_head_dim:
        notes.append(f"vLLM's {fmt.model_type} ignores head_dim ({parent.head_dim} here)")
    if fmt.shared and not recipe.shared_experts:
        notes.append(f"{fmt.model_type} always has a shared expert; it is written zero-width, which other runtimes may reject")
    if fmt.model_type == "qwen2_moe" and parent.sliding_windows:
        notes.append("vLLM's qwen2_moe applies no sliding window")
    if fmt.model_type in ("mixtral", "qwen3_moe") and parent.sliding_windows:
        notes.append(f"vLLM's {fmt.model_type} applies no sliding window")
    return notes


def supports(fmt: MoEFormat, parent: ParentSpec, recipe: Recipe, moe_layers: list[int], explain: bool = False):
    """True/False, or with explain=True the list of reasons this type cannot hold parent + recipe exactly."""
    why: list[str] = []
    if parent.norm_style != fmt.norm_style:
        why.append(f"{parent.model_type} normalises {'after' if parent.norm_style == 'post' else 'before'} each block, {fmt.model_type} does not")
    if parent.qk_norm not in fmt.qk_norms:
        have = {None: "no q/k norm", "head": "per-head q/k norms", "full": "full-width q/k norms"}
        why.append(f"the parent has {have[parent.qk_norm]}, {fmt.model_type} needs {' or '.join(have[k] for k in fmt.qk_norms)}")
    if parent.qkv_bias and fmt.qkv_bias == "never":
        why.append(f"the parent has q/k/v biases, {fmt.model_type} has none")
    if parent.o_bias and not fmt.o_bias:
        why.append(f"the parent has an o_proj bias, {fmt.model_type} has none")
    if not fmt.multipliers and not _default_multipliers(parent):
        why.append("the parent's granite multipliers exist only in granitemoe types")
    if parent.partial_rotary_factor != 1.0 and not fmt.partial_rotary:
        why.append(f"the parent rotates {parent.partial_rotary_factor:g} of each head, {fmt.model_type} rotates all of it")
    windows = parent.sliding_windows
    if windows:
        uniform = len(windows) == 1 and None not in parent.layer_windows
        if fmt.sliding == "none":
            why.append(f"the parent uses sliding-window attention, {fmt.model_type} has none")
        elif fmt.sliding == "uniform" and not uniform:
            why.append(f"the parent mixes sliding and full attention layers, {fmt.model_type} slides on all or none")
    if not parent.has_default_head_dim and not fmt.custom_head_dim:
        why.append(f"the parent's head_dim {parent.head_dim} is not hidden/heads, which {fmt.model_type} assumes")
    if recipe.shared_experts and not fmt.shared:
        why.append(f"{fmt.model_type} has no shared experts")
    dense = [i for i in range(parent.num_layers) if i not in set(moe_layers)]
    if dense:
        if fmt.dense_layers is None:
            why.append(f"{fmt.model_type} makes every layer MoE (asked for dense layers {format_ranges(dense)})")
        elif fmt.dense_layers == "prefix" and dense != list(range(len(dense))):
            why.append(f"{fmt.model_type} can keep only the first layers dense (asked for dense layers {format_ranges(dense)})")
    if fmt.scoring == "sigmoid" and recipe.group_size == 1 and recipe.experts < 2:
        why.append(f"{fmt.model_type} needs at least 2 routed experts")
    return why if explain else not why


def choose_format(parent: ParentSpec, recipe: Recipe, moe_layers: list[int]) -> MoEFormat:
    """The requested type if it fits, else the first fitting type in PREFERENCE; refuse with reasons otherwise."""
    if recipe.format != "auto":
        fmt = FORMATS[recipe.format]
        why = supports(fmt, parent, recipe, moe_layers, explain=True)
        if why:
            fits = [n for n in PREFERENCE if supports(FORMATS[n], parent, recipe, moe_layers)]
            alt = f"; types that fit: {', '.join(fits)}" if fits else "; no type fits these options"
            raise UnsupportedError(f"--format {fmt.model_type} cannot hold this {parent.model_type} parent exactly: {'; '.join(why)}{alt}")
        return fmt
    for name in PREFERENCE:
        if supports(FORMATS[name], parent, recipe, moe_layers):
            return FORMATS[name]
    reasons = "; ".join(f"{n}: {supports(FORMATS[n], parent, recipe, moe_layers, explain=True)[0]}" for n in PREFERENCE)
    raise UnsupportedError(f"no MoE type holds this {parent.model_type} parent with these options exactly ({reasons})")
